"""The Storage SCU: sends our SR and SC objects to a DICOM node."""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from dicom_io.scp import VERIFICATION_SOP_CLASS
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


def stored(status: Answer) -> bool:
    """Whether a C-STORE status means the peer stored the object.

    Success, or a warning (0xB000, 0xB006, 0xB007: stored, with coercion or elements
    discarded). An object that was not sent (`NotAccepted`) was not stored.
    """
    if isinstance(status, NotAccepted):
        return False
    return status == 0x0000 or (status & 0xF000) == 0xB000


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int  # DICOM status from the peer; 0x0000 success, 0xB000.. warnings

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
    if reason is not None:
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


def _associate(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, Sequence[str] | None]],
    timeout: float,
    ssl_context: ssl.SSLContext | None,
) -> tuple[Association, str | None]:
    """An association, and why it is not established (None when it is)."""
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
        (evt.EVT_CONN_OPEN, lambda _: seen.add("connected")),
        (evt.EVT_ACCEPTED, lambda _: seen.add("accepted")),
    ]
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls, evt_handlers=handlers)
    if assoc.is_established:
        return assoc, None
    if "connected" not in seen:
        handshake = "TCP or TLS handshake" if ssl_context is not None else "TCP connection"
        return (
            assoc,
            f"no connection (refused, unreachable, or no {handshake} in {connect_timeout:g} s)",
        )
    if assoc.is_rejected:
        return assoc, "rejected"
    if "accepted" in seen and not assoc.accepted_contexts:
        # the peer accepted the association and none of its presentation contexts;
        # pynetdicom then aborts it
        names = ", ".join(
            sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.rejected_contexts})
        )
        return assoc, f"no presentation context accepted for {names}"
    return assoc, "aborted" if assoc.is_aborted else "no answer"


def echo(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str,
    timeout: float = 10,
    ssl_context: ssl.SSLContext | None = None,
) -> bool:
    """C-ECHO a node (over TLS with ``ssl_context``); True when it answered Success."""
    try:
        assoc = open_association(
            ae_title,
            host,
            port,
            calling_ae_title=calling_ae_title,
            contexts=[(VERIFICATION_SOP_CLASS, None)],
            timeout=timeout,
            ssl_context=ssl_context,
        )
    except SendError:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


def send_files(
    paths: Sequence[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae_title: str,
    timeout: float = 30,
    ssl_context: ssl.SSLContext | None = None,
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
        stopped halfway through an answer, for ``timeout`` seconds. ``answered`` holds
        what became of the datasets before that.
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
    )
    destination = f"{ae_title}@{host}:{port}"
    if why is not None and not assoc.accepted_contexts and assoc.rejected_contexts:
        return [
            NotAccepted(_not_accepted(sop_class, ae_title, host, port)) for sop_class, _ in needs
        ]
    if why is not None:
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
                # in the accepted one (the first it finds of those we offered after it)
                ds = dcmread(ds)
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
            answers.append(int(status.Status))
    finally:
        if assoc.is_established:
            # A request without its answer is not released (the peer may still answer
            # it, or the link is gone): aborted, as pynetdicom does after its timeout
            if unanswered:
                assoc.abort()
            else:
                assoc.release()
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
