"""The Storage SCU: sends our SR and SC objects to a DICOM node."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import queue
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicom_io.scp import VERIFICATION_SOP_CLASS
from dicom_io.stored_text import read_keeping_text
from dicom_io.tcp import LOW_LATENCY_HANDLERS

logger = logging.getLogger(__name__)

# A C-STORE of a file path sends the file's encoded dataset as it is stored, read in
# PDU-sized pieces: not decoded into a Dataset and encoded again (most of a delivery's
# CPU time before), and never changed on the way. It applies to paths only; a Dataset
# handed to send_c_store is encoded as before.
_config.STORE_SEND_CHUNKED_DATASET = True


@dataclass(frozen=True)
class NotAccepted:
    """What an object came to when the destination accepted no presentation context
    for its SOP class (in any transfer syntax we could send it in): it was not sent."""

    reason: str


#: What the destination made of one object: its C-STORE status, or `NotAccepted`.
Answer = int | NotAccepted


class SendError(RuntimeError):
    """The destination could not be reached, or the association broke.

    ``answered`` holds what became of the objects before the break (a C-STORE status,
    or `NotAccepted`), in the order they were given; the objects after those were not
    stored, except where ``unanswered``: the next one was sent and its answer never
    came, so the destination may have stored it.
    """

    def __init__(
        self, message: str, *, answered: Sequence[Answer] = (), unanswered: bool = False
    ) -> None:
        super().__init__(message)
        self.answered = tuple(answered)
        self.unanswered = unanswered


#: Warning statuses outside 0xBxxx (PS3.7 Annex C): 0x0001 requested optional attributes
#: not supported, 0x0107 attribute list error, 0x0116 attribute value out of range. The
#: object was stored, as pynetdicom's ``code_to_category`` has it too.
OTHER_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


def warning(status: Answer) -> bool:
    """Whether a C-STORE status is a warning: the peer stored the object, with a remark
    (0xBxxx, such as 0xB000 coercion or 0xB007 elements discarded, or `OTHER_WARNINGS`)."""
    if isinstance(status, NotAccepted):
        return False
    return (status & 0xF000) == 0xB000 or status in OTHER_WARNINGS


def stored(status: Answer) -> bool:
    """Whether a C-STORE status means the peer stored the object: Success, or a
    `warning`. An object that was not sent (`NotAccepted`) was not stored.
    """
    return status == 0x0000 or warning(status)


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int  # DICOM status from the peer; 0x0000 success, 0xBxxx and others warnings

    @property
    def ok(self) -> bool:
        return stored(self.status)


def open_association(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str] | None]],
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    error: type[Exception] = SendError,
) -> Association:
    """An established association as ``calling_ae_title``, over TLS with ``ssl_context``.

    Parameters
    ----------
    contexts
        ``(abstract syntax, transfer syntaxes or None for pynetdicom's defaults)`` to
        propose.
    timeout
        ACSE, network and DIMSE timeout in seconds, and the longest a send or read on the
        connection may make no progress (a peer that stops reading, or stops halfway
        through a PDU, breaks it); the connection's (TCP connect and TLS handshake) too,
        up to :data:`CONNECT_TIMEOUT`.
    error
        The exception raised, with the reason, when no association is made.
    """
    assoc, reason = _associate(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        contexts=contexts,
        timeout=timeout,
        ssl_context=ssl_context,
    )
    if assoc is None or reason is not None:
        raise error(f"association with {ae_title}@{host}:{port} failed: {reason}")
    return assoc


#: The longest a TCP connect and TLS handshake may take, in seconds, whatever the
#: association's timeout: a C-MOVE's is 10 minutes (a PACS may take that long to send a
#: series), and a host gone silently (its packets dropped, not refused) held each of
#: backfill's series that long, three of them before the run stopped. A peer on a
#: hospital network connects in well under a second.
CONNECT_TIMEOUT = 30.0

#: Keep-alive probes a silent connection gets before the kernel gives it up.
_KEEPALIVE_PROBES = 3


def _bound_every_wait(timeout: float) -> Callable[[evt.Event], None]:
    """An ``EVT_CONN_OPEN`` handler: every later send or read on the association's
    socket (TLS or not) that makes no progress in ``timeout`` seconds fails.

    pynetdicom clears the socket's timeout once connected (``AssociationSocket.connect``
    calls ``settimeout(None)``, then fires this event). A destination that stopped
    reading (its receive window at zero) then blocked the DUL thread's send for ever,
    and a destination that stopped halfway through writing a PDU blocked its read; the
    abort after the DIMSE timeout waits for that thread to reach the idle state
    (``Association.kill``), so the delivery worker hung with it, whatever the timeouts.
    Failing instead, the DUL takes the stall as the connection closed (Evt17): it
    aborts, and the C-STORE returns without an answer (`SendError`). Nothing else waits
    on the socket itself: pynetdicom reads only once ``select`` says data has come, and
    the ACSE and DIMSE timeouts bound the waits for answers.

    TCP keep-alive is set as well (probes after ``timeout`` seconds of silence), so that
    the kernel too gives up a connection whose peer vanished.
    """

    def bound(event: evt.Event) -> None:
        transport = event.assoc.dul.socket
        sock = transport.socket if transport is not None else None
        if sock is None:
            return
        try:
            sock.settimeout(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            idle = max(1, math.ceil(timeout))
            interval = max(1, math.ceil(timeout / _KEEPALIVE_PROBES))
            for name, value in (
                ("TCP_KEEPIDLE", idle),
                ("TCP_KEEPINTVL", interval),
                ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
            ):
                option = getattr(socket, name, None)  # Linux's; elsewhere the defaults
                if option is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
        except OSError as exc:  # closed as it opened: the DUL finds out by itself
            logger.debug("socket options not set: %s", exc)

    return bound


#: How often a wait for an answer looks at whether the request is still going out, in
#: seconds at most: the answer itself ends the wait as it comes.
_PROGRESS_POLL = 0.25


class _WaitFromLastProgress:
    """Makes every DIMSE wait for an answer on one association last ``timeout`` seconds
    from the last progress of what we send, not from the request.

    pynetdicom queues every P-DATA PDU of a request at once and then waits at most its
    DIMSE timeout, in all, for the answer (``DIMSEServiceProvider.get_msg``): a 12 MB
    heat map over a link slower than about 3 Mbit/s was aborted on every attempt, as
    "no answer", while the data flowed. Here the wait goes on while the DUL still has
    PDUs to send or is sending one (each send that makes no progress for ``timeout``
    fails: `_bound_every_wait`; the DUL then aborts and the wait ends), and while the
    peer acknowledges what the kernel still holds of them (Linux's ``TIOCOUTQ``, the
    bytes sent and not yet acknowledged, going down); ``timeout`` seconds after the
    last of these, with no answer, it ends as pynetdicom's does: no answer, aborted.
    It ends so at ``deadline`` too (a `time.monotonic` instant), progress or not: the
    end of the time the sender has (a delivery's claim, after which another worker may
    send the same objects); what is left of the request unsent is then dropped, so that
    the abort goes at once.

    Installed by an ``EVT_CONN_OPEN`` handler; on a pynetdicom without the public
    attributes this uses (``dul.to_provider_queue``, ``dimse.msg_queue``, the socket's
    ``send``) it installs nothing, and the DIMSE timeout bounds the whole request again.
    """

    def __init__(self, timeout: float, deadline: float | None = None) -> None:
        self.timeout = timeout
        self.deadline = math.inf if deadline is None else deadline
        self._sending = 0  # sends of the DUL under way (one at most)
        self._last_progress = time.monotonic()

    def __call__(self, event: evt.Event) -> None:
        assoc = event.assoc
        transport = getattr(assoc.dul, "socket", None)
        outgoing: queue.Queue[Any] | None = getattr(assoc.dul, "to_provider_queue", None)
        answers: queue.Queue[Any] | None = getattr(assoc.dimse, "msg_queue", None)
        send = getattr(transport, "send", None)
        if transport is None or outgoing is None or answers is None or send is None:
            logger.debug("pynetdicom's DIMSE timeout bounds each whole request")
            return
        sock = transport.socket

        def counted_send(data: bytes) -> None:
            self._sending += 1
            try:
                send(data)
            finally:
                self._sending -= 1
                self._last_progress = time.monotonic()

        get = assoc.dimse.get_msg

        def get_msg(block: bool = False) -> Any:
            if not block:
                return get(block=False)
            self._last_progress = time.monotonic()
            unacknowledged = _unacknowledged(sock)
            while True:
                now = time.monotonic()
                left = min(self._last_progress + self.timeout, self.deadline) - now
                if left <= 0:
                    if now >= self.deadline:
                        # pynetdicom's abort goes behind what is queued, and its wait
                        # for the DUL to stop with it: the rest of the object, which
                        # kept going, would go first
                        _drop_queued(outgoing)
                    return None, None
                try:
                    return answers.get(timeout=min(left, _PROGRESS_POLL))
                except queue.Empty:
                    pass
                before, unacknowledged = unacknowledged, _unacknowledged(sock)
                busy = assoc.dul.is_alive() and (self._sending or not outgoing.empty())
                draining = (
                    before is not None and unacknowledged is not None and unacknowledged < before
                )
                if busy or draining:
                    self._last_progress = time.monotonic()

        # instance attributes in front of the methods: both are looked up on each call
        setattr(transport, "send", counted_send)  # noqa: B010
        setattr(assoc.dimse, "get_msg", get_msg)  # noqa: B010


def _drop_queued(outgoing: queue.Queue[Any]) -> None:
    """Empty the DUL's queue of PDUs still to send (the rest of a request's)."""
    while True:
        try:
            outgoing.get_nowait()
        except queue.Empty:
            return


def _unacknowledged(sock: socket.socket | None) -> int | None:
    """Bytes written to ``sock`` that the peer has not acknowledged yet; None where the
    kernel does not say (not Linux, or the socket closed)."""
    request = getattr(termios, "TIOCOUTQ", None)
    if sock is None or request is None:
        return None
    try:
        answer = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return None
    return int(struct.unpack("i", answer)[0])


def _associate(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str] | None]],
    timeout: float,
    ssl_context: ssl.SSLContext | None,
    deadline: float | None = None,
) -> tuple[Association | None, str | None]:
    """An association, and why it is not established (None when it is); no association
    where ``host`` is a name that does not resolve."""
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    # TCP connect and TLS handshake: pynetdicom leaves them unbounded, and a destination
    # that accepts the connection but never answers the handshake held a delivery for ever
    connect_timeout = min(timeout, CONNECT_TIMEOUT)
    ae.connection_timeout = connect_timeout
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes) if syntaxes is not None else None)
    tls = (ssl_context, host) if ssl_context is not None else None
    seen: set[str] = set()
    handlers: list[Any] = [
        *LOW_LATENCY_HANDLERS,
        (evt.EVT_CONN_OPEN, _bound_every_wait(timeout)),
        (evt.EVT_CONN_OPEN, _WaitFromLastProgress(timeout, deadline)),
        (evt.EVT_CONN_OPEN, lambda _: seen.add("connected")),
        (evt.EVT_ACCEPTED, lambda _: seen.add("accepted")),
    ]
    try:
        assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls, evt_handlers=handlers)
    except (socket.gaierror, UnicodeError) as exc:  # raised here, in the caller's thread
        _abandon(ae)
        why = exc.strerror if isinstance(exc, socket.gaierror) else exc
        return None, f"host name {host!r} not resolved ({why or exc})"
    except BaseException:
        _abandon(ae)
        raise
    if assoc.is_established:
        return assoc, None
    if "connected" not in seen:
        # pynetdicom logs a TLS handshake's failure and goes on as if nothing connected: an
        # expired or mistrusted certificate read as a network outage, retried for a day
        if ssl_context is not None and (
            refused := _tls_refusal(host, port, ssl_context, min(connect_timeout, 5.0))
        ):
            return assoc, refused
        handshake = "TCP or TLS handshake" if ssl_context is not None else "TCP connection"
        return (
            assoc,
            f"no connection (refused, unreachable, or no {handshake} in {connect_timeout:g} s)",
        )
    if assoc.is_rejected:
        return assoc, _rejection(assoc.acceptor.primitive)
    if "accepted" in seen and not assoc.accepted_contexts:
        # the peer accepted the association and none of its presentation contexts;
        # pynetdicom then aborts it
        names = ", ".join(
            sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
        )
        return assoc, f"no presentation context accepted for {names}"
    return assoc, "aborted" if assoc.is_aborted else "no answer"


def _tls_refusal(host: str, port: int, ssl_context: ssl.SSLContext, timeout: float) -> str | None:
    """Why a TLS handshake with ``host:port`` fails, where TLS itself refuses it (the
    destination's certificate, or ours, or the protocol); None where it fails otherwise
    (no connection, no answer in ``timeout`` seconds) or succeeds now."""
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            ssl_context.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: the destination's certificate is refused ({exc.verify_message})"
    except ssl.SSLEOFError:  # closed on us (a proxy with no backend): no TLS refusal
        return None
    except ssl.SSLError as exc:
        return f"TLS handshake refused ({exc.reason or exc})"
    except OSError:
        return None


def _abandon(ae: AE) -> None:
    """Abort what ``ae.associate`` left when it was interrupted (Ctrl-C) mid-way.

    Its DUL thread is no daemon, and no association was handed back to end it: the
    process would wait for it, after a command's summary, until the ACSE timeout (a
    peer that never answers) or the network timeout (one that did). A connection not
    made yet (a TCP connect or TLS handshake under way, with a host that drops packets)
    is shut first: the abort waits for the DUL to leave the connect, which it does only
    at :data:`CONNECT_TIMEOUT`, where a socket shut makes it fail at once.
    """
    for thread in threading.enumerate():
        if not (isinstance(thread, DULServiceProvider) and thread.assoc.ae is ae):
            continue
        connection = thread.socket  # pynetdicom's AssociationSocket, once it made one
        raw = getattr(connection, "socket", None)
        if raw is not None and not getattr(connection, "_is_connected", True):
            with contextlib.suppress(OSError):  # no connect begun: nothing to stop
                raw.shutdown(socket.SHUT_RDWR)
        thread.assoc.abort()


def release(assoc: Association) -> None:
    """Release an association with nothing outstanding; interrupted (Ctrl-C) while the
    peer has not answered, abort it: its DUL thread, no daemon, would hold the process
    until the ACSE timeout."""
    if not assoc.is_established:
        return
    try:
        assoc.release()
    except BaseException:
        assoc.abort()
        raise


def _rejection(answer: A_ASSOCIATE | None) -> str:
    """Why the peer rejected the association, in the words of its A-ASSOCIATE-RJ
    (PS3.8 9.3.4): "rejected (permanent): Called AE title not recognised"."""
    if answer is None or answer.result not in (0x01, 0x02):
        return "rejected"
    lasting = "permanent" if answer.result == 0x01 else "transient"
    return f"rejected ({lasting}): {answer.reason_str}"


def echo(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    timeout: float = 10,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO a node (over TLS with ``ssl_context``); the status it answered (0x0000
    Success).

    Raises
    ------
    SendError
        No association, with the reason (no connection, rejected and why, ...), or no
        answer to the C-ECHO.
    """
    assoc = open_association(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        contexts=[(VERIFICATION_SOP_CLASS, None)],
        timeout=timeout,
        ssl_context=ssl_context,
    )
    try:
        status = assoc.send_c_echo()
    finally:
        release(assoc)
    if not status or "Status" not in status:
        raise SendError(f"{ae_title}@{host}:{port} did not answer the C-ECHO")
    return int(status.Status)


def send_files(
    paths: Sequence[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 30,
    ssl_context: ssl.SSLContext | None = None,
    deadline: float | None = None,
) -> list[SendOutcome]:
    """Send DICOM files over one association, each as it is stored where it can be.

    Parameters
    ----------
    paths
        Part 10 files; each is offered in its own SOP class and transfer syntax (its
        file meta) and sent byte for byte, without being decoded, or re-encoded in the
        uncompressed syntax the destination took (see :func:`send_datasets`).
    ae_title, host, port
        The destination.
    calling_ae_title
        Our AE title as the destination knows it.
    deadline
        A `time.monotonic` instant by which each answer must have come, however the
        send progresses (see :func:`send_datasets`); None: no such bound.

    Returns
    -------
    list of SendOutcome
        One per file, in order.

    Raises
    ------
    SendError
        When no association could be made, or it broke before every file was sent,
        or the destination accepted no presentation context for a file's SOP class:
        raised once every other file was sent, naming what became of each
        (``answered``).
    NotSendable
        When a file is no Part 10 file that says what it holds (nothing is sent).
    """
    paths = [Path(p) for p in paths]
    answers = send_datasets(
        paths,
        ae_title=ae_title,
        host=host,
        port=port,
        calling_ae_title=calling_ae_title,
        timeout=timeout,
        ssl_context=ssl_context,
        deadline=deadline,
    )
    refused = [answer.reason for answer in answers if isinstance(answer, NotAccepted)]
    if refused:
        each = ", ".join(
            f"{path.name}: "
            + ("not sent" if isinstance(answer, NotAccepted) else f"status 0x{answer:04X}")
            for path, answer in zip(paths, answers, strict=True)
        )
        raise SendError(f"{'; '.join(dict.fromkeys(refused))} ({each})", answered=answers)
    return [SendOutcome(p, cast(int, status)) for p, status in zip(paths, answers, strict=True)]


class NotSendable(ValueError):
    """A file that cannot be offered: no Part 10 file, or its file meta lacks what a
    C-STORE needs (SOP class, SOP instance, transfer syntax)."""


#: File meta elements a C-STORE of a file needs, and what each says.
_NEEDED_META = {
    "MediaStorageSOPClassUID": "SOP Class UID",
    "MediaStorageSOPInstanceUID": "SOP Instance UID",
    "TransferSyntaxUID": "Transfer Syntax UID",
}


def stored_syntax(path: Path) -> tuple[str, str]:
    """``(SOP class UID, transfer syntax UID)`` of a Part 10 file, from its file meta.

    Raises
    ------
    OSError
        The file cannot be read (``FileNotFoundError``: it is not there).
    NotSendable
        It is no Part 10 file, or its file meta lacks what a C-STORE needs.
    """
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError, NotImplementedError) as exc:
        raise NotSendable(f"{path.name} is no DICOM Part 10 file ({exc})") from None
    missing = [name for keyword, name in _NEEDED_META.items() if not meta.get(keyword)]
    if missing:
        raise NotSendable(f"the file meta of {path.name} has no {', '.join(missing)}")
    return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)


#: Uncompressed syntaxes an object stored in another uncompressed little-endian syntax
#: is also offered in, in this order: Implicit VR Little Endian is the default every
#: implementation supports (PS3.5 10.1).
FALLBACK_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def offered_syntaxes(stored: str) -> list[str]:
    """Transfer syntaxes an object stored in ``stored`` is offered in, by preference.

    Its own first; an uncompressed little-endian one then also the `FALLBACK_SYNTAXES`,
    into which it re-encodes losing nothing. A compressed one only as it is (sending
    it otherwise would mean decoding its pixels), and so Big Endian.
    """
    syntax = UID(stored)
    if syntax.is_encapsulated or not syntax.is_little_endian:
        return [stored]
    return list(dict.fromkeys([stored, *FALLBACK_SYNTAXES]))


def send_datasets(
    datasets: Sequence[Dataset | Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 30,
    ssl_context: ssl.SSLContext | None = None,
    deadline: float | None = None,
) -> list[Answer]:
    """C-STORE datasets over one association; returns what became of each, in order.

    Each dataset is offered in its own SOP class, in the transfer syntax it is stored
    in (its file meta) and, when that is uncompressed, in Explicit and then Implicit
    VR Little Endian, each syntax its own presentation context. It goes in the first
    of those the destination accepted: a path in its own syntax is sent as the file
    is stored, byte for byte (see :func:`send_files`); otherwise the data set is read
    and encoded in the accepted one. A dataset whose SOP class the destination took
    in no such syntax is not sent (`NotAccepted`, with the reason); the others are.

    Raises
    ------
    SendError
        When no association could be made, or it broke before every dataset was
        answered: among others, the destination stopped reading what we send, or
        stopped halfway through an answer, for ``timeout`` seconds, or an answer had
        not come by ``deadline`` (a `time.monotonic` instant; None: none), however the
        send progressed. ``answered`` holds what became of the datasets before that.
    """
    needs = [_syntax_of(ds) for ds in datasets]
    contexts: dict[tuple[str, str], None] = {}
    for sop_class, syntax in needs:
        for offered in offered_syntaxes(syntax):
            contexts[sop_class, offered] = None
    assoc, why = _associate(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        contexts=[(sop_class, [syntax]) for sop_class, syntax in contexts],
        timeout=timeout,
        ssl_context=ssl_context,
        deadline=deadline,
    )
    destination = f"{ae_title}@{host}:{port}"
    if (
        assoc is not None
        and why is not None
        and not assoc.accepted_contexts
        and assoc.rejected_contexts
    ):
        return [
            NotAccepted(_not_accepted(sop_class, ae_title, host, port)) for sop_class, _ in needs
        ]
    if assoc is None or why is not None:
        raise SendError(f"association with {destination} failed: {why}")
    answers: list[Answer] = []
    unanswered = False
    try:
        for ds, (sop_class, syntax) in zip(datasets, needs, strict=True):
            accepted = {
                str(cx.transfer_syntax[0])
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == sop_class
            }
            chosen = next((s for s in offered_syntaxes(syntax) if s in accepted), None)
            if chosen is None:
                answers.append(NotAccepted(_not_accepted(sop_class, ae_title, host, port)))
                continue
            if chosen != syntax and isinstance(ds, Path):
                # pynetdicom sends a file only in its own syntax; a data set it encodes
                # in the accepted one (the first it finds of those we offered after it),
                # its text kept as stored where decoding it lost characters (a Patient ID
                # copied as received would otherwise reach the PACS as another)
                ds = read_keeping_text(ds)
            try:
                status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError, AttributeError) as exc:
                if not assoc.is_established:  # pynetdicom's RuntimeError: aborted, released
                    raise SendError(
                        f"the association with {destination} ended before a C-STORE was sent",
                        answered=answers,
                    ) from None
                raise SendError(
                    f"{destination} cannot take the object: {exc}", answered=answers
                ) from exc
            if not status or "Status" not in status:
                unanswered = True
                raise SendError(
                    f"{destination} did not answer a C-STORE", answered=answers, unanswered=True
                )
            answer = int(status.Status)
            if warning(answer):
                logger.warning(
                    "%s stored an object with warning status 0x%04X", destination, answer
                )
            answers.append(answer)
    finally:
        if assoc.is_established:
            # A request without its answer is not released (the peer may still answer
            # it, or the link is gone): aborted, as pynetdicom does after its timeout
            if unanswered:
                assoc.abort()
            else:
                release(assoc)
    return answers


def _not_accepted(sop_class: str, ae_title: str, host: str, port: int) -> str:
    return (
        f"no presentation context accepted for {UID(sop_class).name} "
        f"by AE {ae_title} at {host}:{port}"
    )


def _syntax_of(dataset: Dataset | Path) -> tuple[str, str]:
    if isinstance(dataset, Dataset):
        return str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID)
    return stored_syntax(dataset)
