"""The Storage SCP: receives images from the PACS and makes them durable.

For each C-STORE the order is fixed, because the PACS forgets an image once we
answer Success:

1. the dataset, streamed by pynetdicom to a temporary file *inside the spool*,
   is fsynced and renamed to its final name (then the directory is fsynced);
2. ``record`` commits a row for it (supplied by the caller: no SQL here);
3. only then is 0x0000 returned; any failure in 1 or 2 returns 0xA700 so the
   PACS keeps the image and retries (as does less free space on the spool's file
   system than the listener keeps for the results of the images it took, see
   `SpaceReserve`);
4. ``notify`` hands the row id on (supplied by the caller: no Celery here). It
   must not block; if it fails, the row stays ``received`` and the reconciler
   finds it.

Non-image SOP classes are refused at association (no presentation context is
accepted for them), and unknown calling AE titles are rejected. One peer address
gets a bounded share of the associations: past `MAXIMUM_ASSOCIATIONS_PER_PEER` (or
what the listener is told) at once, an association from it is rejected, transiently,
and the PACS's still get in. It gets a bounded share of the connections too (twice
that), so that connections that never ask for an association take no more.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import ipaddress
import logging
import os
import queue
import re
import secrets
import select
import socket
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from pydicom import uid as pyuid
from pydicom.dataset import FileDataset
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.tag import BaseTag, Tag
from pynetdicom import AE, _config, evt, sop_class
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_io.budget import BudgetedFile, over_budget
from dicom_io.tcp import LOW_LATENCY_HANDLERS

logger = logging.getLogger(__name__)

#: Verification SOP Class (C-ECHO), PS3.4 Annex A.
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: A C-STORE slower than this is logged: peers time out at 30-120 s.
SLOW_STORE_SECONDS = 10.0

#: A file in spool/.incoming untouched this long belongs to no transfer (see
#: `StorageSCP.sweep_incoming`).
INCOMING_MAX_AGE_SECONDS = 3600.0

#: A listener's incoming directory whose lock is free, made on another host and untouched
#: this long, is removed (see `StorageSCP.sweep_incoming`): a running listener touches its
#: own at every sweep.
INCOMING_ABANDONED_SECONDS = 86400.0

#: The file in each listener's incoming directory that the listener holds locked while it
#: runs.
INCOMING_LOCK_NAME = "listener.lock"

#: The file at the top of the spool that a listener holds a shared lock on from before it
#: renames a received file into place until its row is committed, or not
#: (`_RecordingHold`; the listener makes it when it starts); retention takes it
#: exclusively to remove a received file no row names (`recording_lock`,
#: worker.retention).
RECORDING_LOCK_NAME = ".recording.lock"

# Status codes of the Storage Service Class (PS3.4 Annex B.2.3).
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

#: Largest PDU we accept, in bytes; see `StorageSCP._make_ae`.
MAXIMUM_PDU_SIZE = 1 << 20

#: Associations at once; pynetdicom answers one more with an A-ASSOCIATE-RJ (transient,
#: local limit exceeded), which a PACS retries.
MAXIMUM_ASSOCIATIONS = 64
#: Associations at once from one peer address, unless the listener is told otherwise
#: (``BONEAGE_MAX_ASSOCIATIONS_PER_PEER``): one more is answered with an A-ASSOCIATE-RJ
#: (transient, local limit exceeded), so that one caller, misbehaving or hostile, cannot
#: take every one of `MAXIMUM_ASSOCIATIONS` and shut the PACS out. A PACS sends over a few
#: associations at once (Orthanc 1 to 4, by its jobs' concurrency).
MAXIMUM_ASSOCIATIONS_PER_PEER = 16
#: Connections at once, associations and TLS handshakes together
#: (:class:`_BoundedAssociationServer`): past it a connection is closed as soon as it is
#: accepted. Twice the associations, so a PACS is answered by the A-ASSOCIATE-RJ above
#: first, and a flood of idle connections (a port scan, a client that connects and
#: never speaks) takes neither a thread each nor memory without bound.
MAXIMUM_CONNECTIONS = 2 * MAXIMUM_ASSOCIATIONS
#: Connections at once from one peer address, associations and TLS handshakes together:
#: twice its associations (`MAXIMUM_ASSOCIATIONS_PER_PEER`, or what the listener is told),
#: as `MAXIMUM_CONNECTIONS` is twice `MAXIMUM_ASSOCIATIONS`. Past it a connection from
#: that address is closed as soon as it is accepted: without it, one host's connections
#: that never send an A-ASSOCIATE-RQ (each held until ARTIM), or never finish their TLS
#: handshake, could take every one of `MAXIMUM_CONNECTIONS` and shut the PACS out. A PACS
#: past its share of associations is answered by the A-ASSOCIATE-RJ first.
MAXIMUM_CONNECTIONS_PER_PEER = 2 * MAXIMUM_ASSOCIATIONS_PER_PEER
#: A connection refused for being one too many is logged at most this often, and a
#: connection or an association refused for its peer's bound at most this often for each
#: address.
REFUSED_LOG_SECONDS = 60.0
#: Addresses whose last refusal for their bound the listener remembers, for that log.
_PEER_REFUSALS_KEPT = 1024

#: Transfer syntaxes we accept: uncompressed, and every compressed syntax pydicom can
#: decode with the pylibjpeg plugins we install. Not Deflated Explicit VR Little Endian:
#: pydicom inflates a deflated data set whole before it reads a byte of it (the listener's
#: header, the worker's pixels), so a few hundred kilobytes on the wire could take
#: gigabytes of memory, and a listener killed for it was sent the same data set again.
#: A PACS sends the image uncompressed instead: every Storage SCU can send Implicit VR
#: Little Endian (PS3.5 10.1), and storescu, Orthanc and others propose the uncompressed
#: syntaxes beside Deflated.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    pyuid.ExplicitVRLittleEndian,
    pyuid.ImplicitVRLittleEndian,
    pyuid.ExplicitVRBigEndian,
    pyuid.JPEGBaseline8Bit,
    pyuid.JPEGExtended12Bit,
    pyuid.JPEGLossless,
    pyuid.JPEGLosslessSV1,
    pyuid.JPEGLSLossless,
    pyuid.JPEGLSNearLossless,
    pyuid.JPEG2000Lossless,
    pyuid.JPEG2000,
    pyuid.HTJ2KLossless,
    pyuid.HTJ2KLosslessRPCL,
    pyuid.HTJ2K,
    pyuid.RLELossless,
)


def image_storage_sop_classes() -> list[str]:
    """Every image storage SOP class pynetdicom knows (CR, DX, SC, CT, ...).

    We accept all images, not only hand radiographs: an image we cannot assess
    is accepted and recorded with a reason, so the PACS does not retry it forever.
    """
    return [
        str(uid)
        for name, uid in sop_class._STORAGE_CLASSES.items()
        if "Image" in name or "SecondaryCapture" in name
    ]


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener learned about one stored instance (no patient data)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str | None
    transfer_syntax_uid: str
    calling_ae_title: str
    path: Path
    size_bytes: int


RecordFn = Callable[[ReceivedInstance], int]
NotifyFn = Callable[[int], None]


def spool_path(spool_dir: Path, sop_instance_uid: str) -> Path:
    """Final spool location of an instance: a hash, never the raw UID, names the file.

    The hash is of the UID's UTF-8 (a valid UID's ASCII, as it always was): one file for
    each UID, where UIDs that differ only in characters a UID may not hold (pynetdicom
    checks a UID's length alone) would share one as ASCII with "?" in their place.
    """
    digest = hashlib.sha256(sop_instance_uid.encode("utf-8", "surrogatepass")).hexdigest()
    return spool_dir / digest[:2] / f"{digest[2:34]}.dcm"


def uid_tag(uid: str) -> str:
    """A short stable token for logs, so UIDs never appear in them."""
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_spool_folder(path: Path) -> None:
    """Make the spool folder ``path`` where it is not there, its entry in the spool durable
    before a file is renamed into it: the fsync of the folder after the rename makes the
    file's entry durable, not the folder's."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    fsync_directory(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_sync_file_range() -> Callable[[int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, 0, SYNC_FILE_RANGE_WRITE)``, or None.

    It starts writing a file's dirty pages from `offset` to its end and returns
    without waiting for them. Python has no binding for it; ctypes releases the GIL
    for the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    start_writing = 2  # SYNC_FILE_RANGE_WRITE

    def write_back(fd: int, offset: int) -> None:
        if function(fd, offset, 0, start_writing) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return write_back


_start_writeback = _load_sync_file_range()

#: Bytes of a dataset received between two writebacks started (see `_WritingBackDIMSE`).
WRITEBACK_BYTES = 1 << 20

#: Longest command set a DIMSE message may have. pynetdicom keeps a command's fragments in
#: memory until its last one comes; a real command set takes a few hundred bytes.
COMMAND_SET_LIMIT = 64 * 1024

#: Longest data set kept in memory for a message that is no C-STORE request (a C-STORE's
#: streams to its file): pynetdicom keeps it until its last fragment comes, and nothing we
#: serve has one (a C-ECHO has none).
HELD_DATA_SET_LIMIT = 1 << 20


class SpaceReserve:
    """Free space a listener keeps on its spool's file system: a C-STORE that comes
    while less is free is answered 0xA700 (Out of Resources) and nothing of it is kept,
    and one under way stops being written once less would be free without it.

    The images already taken (the PACS forgot them on our Success) still need room for
    their SR and SC, the database's rows and the broker's messages, which mostly share
    that file system: filled to the last byte by new images, the node could finish none
    of them. The PACS keeps what is refused so and sends it again. A margin, not a
    promise: 1 GiB holds the SR and SC of about a hundred images at the largest SC.
    """

    def __init__(self, directory: Path, reserve_bytes: int) -> None:
        self.directory = directory
        self.reserve_bytes = reserve_bytes

    def shortfall(self, own_bytes: int = 0) -> ReserveReached | None:
        """Why a data set that has written ``own_bytes`` so far may not be kept, or None
        while enough would be free without them (or the file system cannot be asked:
        writing then says what is wrong). Its own bytes do not count against it, up to
        half the reserve: taken while enough was free, it is not refused for its own
        size, to be sent again and refused again for ever (a radiograph is some tens of
        megabytes); others written meanwhile do, and a data set of gigabytes takes no
        more than half the reserve."""
        if self.reserve_bytes <= 0:
            return None
        try:
            usage = os.statvfs(self.directory)
        except OSError:
            return None
        free = usage.f_bavail * usage.f_frsize
        if free + min(own_bytes, self.reserve_bytes // 2) >= self.reserve_bytes:
            return None
        return ReserveReached(free, self.reserve_bytes)


class ReserveReached(OSError):
    """Less free space on the spool's file system than the listener keeps."""

    def __init__(self, free_bytes: int, reserve_bytes: int) -> None:
        super().__init__(
            errno.ENOSPC,
            f"{free_bytes / 2**20:.0f} MiB free on the spool's file system, less than the "
            f"{reserve_bytes / 2**20:.0f} MiB kept for the results of the images taken",
        )


class _SpoolFile:
    """The temporary file a C-STORE's data set streams into, whose write errors end the
    writing and not the association.

    pynetdicom writes each data fragment to its temporary file on the DUL's thread; a
    full disk (ENOSPC) or a file size limit (EFBIG) raised there killed the association
    with an uncaught exception, and the PACS heard no status. Here the first error closes
    and removes the file, the rest of the data set is read and discarded, and the
    C-STORE handler answers 0xA700 (`error` says why).
    """

    def __init__(self, wrapped: Any, path: Path | None, error: OSError | None = None) -> None:
        self._wrapped = wrapped  # pynetdicom's NamedTemporaryFile, or None
        self._path = path
        self.name = str(path) if path is not None else ""  # pynetdicom unlinks it
        self.error = error

    @property
    def file(self) -> _SpoolFile:
        return self  # pynetdicom flushes ``file``, as on a NamedTemporaryFile

    def write(self, data: Any) -> int:
        if self.error is None:
            try:
                return int(self._wrapped.write(data))
            except OSError as exc:
                self.fail(exc)
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self._wrapped.flush()
            except OSError as exc:
                self.fail(exc)

    def tell(self) -> int:
        return int(self._wrapped.tell())

    def fileno(self) -> int:
        return int(self._wrapped.fileno())

    def close(self) -> None:
        if self._wrapped is not None:
            with contextlib.suppress(OSError):  # a full disk fails the last flush too
                self._wrapped.close()

    def discard(self) -> None:
        """Close the file and remove it: nothing of it is kept."""
        self.close()
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink(missing_ok=True)

    def fail(self, exc: OSError) -> None:
        """Stop writing for ``exc``: the file goes, the rest of the data set is read and
        discarded, and the C-STORE is answered 0xA700 (and logged then)."""
        self.error = exc
        self.discard()
        if not isinstance(exc, ReserveReached):
            logger.error(
                "a data set could not be written to the spool (%s): the rest is discarded",
                exc.strerror or type(exc).__name__,
            )


def _spool_file_of(message: Any) -> _SpoolFile:
    """The :class:`_SpoolFile` a DIMSE message's data set streams into, wrapped around
    pynetdicom's temporary file (or its absence) the first time it is asked for."""
    spool_file = message._data_set_file
    if not isinstance(spool_file, _SpoolFile):
        path = message._data_set_path
        spool_file = _SpoolFile(spool_file, path if isinstance(path, Path) else None)
        message._data_set_file = spool_file
    return cast(_SpoolFile, spool_file)


class _WritingBackDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, having the kernel write a dataset while it comes,
    and writing it through a :class:`_SpoolFile`.

    The listener answers a C-STORE only once the file is on disk, and the PACS waits
    for that answer before it sends the next image. Left to the final fsync, a 10 MB
    radiograph's pages were all written then: 19 ms of a 52 ms C-STORE on the
    development VM, with the network idle. Here each megabyte received is handed to
    the disk at once (``sync_file_range``, which does not wait), so the fsync finds
    little left to write. It runs after each P-DATA on the DUL's thread, the one
    that writes the file. Nothing changes where the call is missing (not
    Linux) or fails; the fsync still decides durability.

    A P-DATA carrying several fragments is taken a fragment at a time, so that the
    file pynetdicom opens after a C-STORE's command is wrapped before any data set
    fragment is written to it.

    What pynetdicom keeps in memory until a message's last fragment is bounded: a
    command set past `COMMAND_SET_LIMIT`, or the data set of a message that is no
    C-STORE request past `HELD_DATA_SET_LIMIT`, ends the association with an A-ABORT.
    Unbounded, a peer sending "command, not the last fragment" for ever, or a C-ECHO
    with a data set, grew the listener until the kernel killed it.
    """

    _writeback_from = 0
    _command_bytes = 0  # of the message coming in, kept in memory by pynetdicom
    _held_bytes = 0  # the same, of a data set that streams to no file
    _refused = False  # the association is being aborted: nothing more is taken
    #: The listener's, given by :class:`_StreamingRequestHandler` (`_keep_the_reserve`).
    space_reserve: SpaceReserve | None = None
    _reserve_asked_at = 0  # bytes of the data set coming in when the reserve was asked

    def receive_primitive(self, primitive: Any) -> None:
        items = primitive.presentation_data_value_list
        if len(items) == 1:
            self._receive_fragment(primitive, items[0][1])
            return
        for item in items:
            single = P_DATA()
            single.presentation_data_value_list = [item]
            self._receive_fragment(single, item[1])

    def discard_unfinished(self) -> None:
        """Remove the files of data sets that will never be answered: the one coming in,
        and those received but not yet handled (the association ended first). The PACS
        was not told Success for any of them and sends them again."""
        files = []
        message = self.message
        if message is not None and message._data_set_file is not None:
            files.append(message._data_set_file)
            message._data_set_file = None
        pending = self.msg_queue
        with pending.mutex:  # the association's thread takes from it too
            unhandled = [i for i in pending.queue if getattr(i[1], "_dataset_file", None)]
            for item in unhandled:
                pending.queue.remove(item)
        files += [item[1]._dataset_file for item in unhandled]
        for spool_file in files:
            if isinstance(spool_file, _SpoolFile):
                spool_file.discard()
            else:  # (not wrapped yet: closed and removed the same way)
                _SpoolFile(spool_file, Path(spool_file.name)).discard()
        if files:
            logger.info("%d partly received data set(s) removed", len(files))

    def _receive_fragment(self, primitive: Any, data: Any) -> None:
        if self._refused:
            return
        message = self.message
        if data[0] & 1:  # a command fragment (PS3.8 E.2)
            self._command_bytes += len(data)
            if self._command_bytes > COMMAND_SET_LIMIT:
                self._refuse("a command set", COMMAND_SET_LIMIT)
                return
        elif message is None or message._data_set_file is None:
            self._held_bytes += len(data)
            if self._held_bytes > HELD_DATA_SET_LIMIT:
                self._refuse("a data set of no C-STORE request", HELD_DATA_SET_LIMIT)
                return
        try:
            super().receive_primitive(primitive)
        except OSError as exc:
            # pynetdicom could not make the temporary file (its command said a data
            # set follows): the data set is read and discarded, and answered 0xA700
            message = self.message
            if message is None:
                raise
            _spool_file_of(message).fail(exc)
            return
        message = self.message
        if message is None:  # complete: the next message starts its own counts and file
            self._writeback_from = self._command_bytes = self._held_bytes = 0
            return
        if message._data_set_file is None:
            self._writeback_from = 0
            return
        first = not isinstance(message._data_set_file, _SpoolFile)
        spool_file = _spool_file_of(message)
        if self.space_reserve is not None and spool_file.error is None:
            self._keep_the_reserve(self.space_reserve, spool_file, first=first)
        if _start_writeback is None or spool_file.error is not None:
            return
        try:
            position = spool_file.tell()
            if position - self._writeback_from >= WRITEBACK_BYTES:
                _start_writeback(spool_file.fileno(), self._writeback_from)
                self._writeback_from = position
        except (OSError, ValueError) as exc:  # only an optimisation: the fsync decides
            logger.debug("writeback not started (%s)", exc)

    def _keep_the_reserve(
        self, reserve: SpaceReserve, spool_file: _SpoolFile, *, first: bool
    ) -> None:
        """Stop writing the data set coming in (it is read and discarded, and answered
        0xA700) where less than ``reserve`` is free, its own bytes not counted: asked once
        its command has come (pynetdicom opens the file then, before a byte of the data
        set, which therefore takes nothing when refused), and again after each
        :data:`WRITEBACK_BYTES` it writes, so that transfers under way at once stop within
        a megabyte each once the space is gone, whatever their size."""
        try:
            written = 0 if first else spool_file.tell()
        except (OSError, ValueError):
            return  # the write that fails says so
        if not first and written - self._reserve_asked_at < WRITEBACK_BYTES:
            return
        self._reserve_asked_at = written
        short = reserve.shortfall(own_bytes=written)
        if short is not None:
            spool_file.fail(short)

    def _refuse(self, what: str, limit: int) -> None:
        """End the association at once, for a message that would keep more than `limit`
        bytes of `what` in memory: an A-ABORT (service provider, no reason given), and the
        connection closed. Called on the DUL's thread, in the middle of its state
        machine's action: the socket is closed here, so that nothing more is read before
        the closing (event 17) is handled. Files of data sets not yet answered are
        removed when the DUL's thread ends, as for any association that ends."""
        self._refused = True
        dul = cast("_StreamingDUL", self.dul)
        logger.warning(
            "%s sent %s longer than %d bytes: A-ABORT, connection closed",
            dul._peer(),
            what,
            limit,
        )
        abort = A_ABORT_RQ()
        abort.source = 0x02  # service provider
        abort.reason_diagnostic = 0x00
        transport = dul.socket
        if transport is None:  # closed already
            return
        with contextlib.suppress(OSError):  # the peer may be gone already
            transport.send(abort.encode())
        transport.close()  # puts event 17 on the state machine's queue


class _StreamingSocket(AssociationSocket):
    """pynetdicom's association socket, reading with few large ``recv_into`` calls.

    pynetdicom reads a PDU in 4 KiB ``recv`` calls, each a fresh ``bytes`` object
    appended to a growing buffer: some 2,500 calls and GIL hand-offs for a 10 MB
    radiograph, which the listener's other threads (enqueuer, heartbeat) then slow
    further. Here the bytes go straight into the caller's buffer, as much as the
    kernel holds per call. :class:`_StreamingDUL`, pynetdicom's only reader of the
    socket, reads through `read_into`; pynetdicom's ``recv`` is left unused.
    """

    def read_into(self, view: memoryview, deadline: float | None = None) -> int:
        """Fill `view`; return how many bytes came (fewer if the peer closed).

        Raises
        ------
        TimeoutError
            ``deadline`` (``time.monotonic()``) passed before `view` was filled. The
            socket's own timeout bounds each ``recv`` only: a peer sending a byte now
            and then would hold the read, and the thread, for ever without it.
        """
        sock = cast(socket.socket, self.socket)
        nr_read, nr_bytes = 0, len(view)
        original = per_read = sock.gettimeout()
        shortened = False
        try:
            while nr_read < nr_bytes:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"{nr_read} of {nr_bytes} bytes came in time")
                    if per_read is None or remaining < per_read:
                        # only in a read's last stretch: settimeout is a system call
                        sock.settimeout(remaining)
                        per_read, shortened = remaining, True
                count = sock.recv_into(view[nr_read:], nr_bytes - nr_read)
                if not count:  # connection closed: the caller gets what came
                    break
                nr_read += count
        finally:
            if shortened:
                with contextlib.suppress(OSError):  # closed meanwhile
                    sock.settimeout(original)
        return nr_read


#: PDU types of PS3.8 Table 9-1; anything else is an invalid PDU (event 19).
_PDU_TYPES = range(0x01, 0x08)
_P_DATA_TF = 0x04

#: Room above our Maximum Length Received (`MAXIMUM_PDU_SIZE`) that a P-DATA-TF may take.
#: That length counts the PDU's variable field (PS3.8 D.1), which a P-DATA-TF's length
#: field gives too; an implementation that counts its 6-byte header in, or its PDV
#: headers twice, still gets through.
P_DATA_MARGIN = 64 * 1024

#: Longest A-ASSOCIATE-RQ (or -AC) we read. Presentation contexts number at most 128
#: (odd ids 1-255); 128 of them with 20 transfer syntaxes each take about 80 KiB, and
#: a User Identity item two 64 KiB fields at most (a SAML assertion or a JWT). 256 KiB
#: holds that with room; a peer claiming more is not negotiating but probing.
ASSOCIATE_PDU_LIMIT = 256 * 1024

#: Longest A-ASSOCIATE-RJ, A-RELEASE-RQ/RP or A-ABORT: their variable fields are 4 bytes.
SMALL_PDU_LIMIT = 64


def pdu_length_limit(pdu_type: int) -> int:
    """The largest length field we accept for a PDU of ``pdu_type`` (PS3.8 Table 9-1).

    The 4-byte field comes before any authentication: unchecked, a 6-byte header made
    the listener allocate up to 4 GiB for the body it promised.
    """
    if pdu_type == _P_DATA_TF:
        return MAXIMUM_PDU_SIZE + P_DATA_MARGIN
    if pdu_type in (0x01, 0x02):
        return ASSOCIATE_PDU_LIMIT
    return SMALL_PDU_LIMIT


#: A-ABORT reason "invalid PDU parameter value" (PS3.8 Table 9-26).
_INVALID_PDU_PARAMETER = 0x06


class _StreamingDUL(DULServiceProvider):
    """pynetdicom's DUL provider, holding each received PDU once, within bounds.

    pynetdicom copies every P-DATA-TF PDU five times before its data reach the
    file: appended to the PDU header's buffer, made ``bytes``, sliced past the
    header, sliced per PDV item, sliced past the message control header. For a
    10 MB radiograph that is 50 MB of copying, a fifth of the listener's CPU. Here
    the PDU is read into one buffer of its final size and a P-DATA-TF is decoded
    into views of it, so the dataset's fragments are written to the spool file
    from the bytes the socket filled. Every other PDU is decoded by pynetdicom as
    it comes. The events put on the state machine's queue are pynetdicom's
    (PS3.8 9.2): 17 when the connection closes mid-PDU, 19 for an invalid PDU.

    Two bounds pynetdicom does not set: a PDU longer than `pdu_length_limit` for its
    type is answered with an A-ABORT and the connection closed before anything is
    allocated for it, and a whole PDU must come within the ARTIM timeout before the
    association is established (the network timeout after), or the connection is
    closed: the socket's timeout alone bounds each ``recv``, which a peer sending a
    byte every few seconds never reaches.
    """

    socket: _StreamingSocket

    def _read_deadline(self) -> float | None:
        """When the PDU about to be read must be in (``time.monotonic()``), or None."""
        if self.assoc.is_established:
            seconds = self.network_timeout
        elif self.artim_timer.timeout is not None:
            seconds = max(0.0, self.artim_timer.remaining)  # running since the connection
        else:
            seconds = self.network_timeout
        return None if seconds is None else time.monotonic() + seconds

    def _peer(self) -> str:
        requestor = self.assoc.requestor
        try:
            return f"{requestor.address}:{requestor.port}"
        except (AttributeError, TypeError):  # not yet known
            return "an unknown peer"

    def _read_pdu_data(self) -> None:
        deadline = self._read_deadline()
        header = bytearray(6)
        try:
            with memoryview(header) as view:
                complete = self.socket.read_into(view, deadline) == 6
        except TimeoutError:
            self._drop_slow_peer()
            return
        except OSError:
            logger.warning("association connection failed while a PDU header was read")
            self._transport_closed()
            return
        if not complete:  # the peer closed the connection
            self._transport_closed()
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            logger.warning("unknown PDU type 0x%02X received from %s", pdu_type, self._peer())
            self._invalid_pdu()
            return
        if pdu_length > pdu_length_limit(pdu_type):
            self._refuse_oversized(pdu_type, pdu_length)
            return
        pdu_bytes = bytearray(6 + pdu_length)
        pdu_bytes[:6] = header
        try:
            with memoryview(pdu_bytes) as view:
                complete = self.socket.read_into(view[6:], deadline) == pdu_length
        except TimeoutError:
            self._drop_slow_peer()
            return
        except OSError:
            complete = False
        if not complete:
            logger.warning("association connection closed before a whole PDU was received")
            self._transport_closed()
            return
        try:
            pdu, event = self._decode_pdu(pdu_bytes)
        except Exception:  # a malformed PDU: pynetdicom's own decoders raise anything
            logger.exception("a received PDU could not be decoded")
            self._invalid_pdu()
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _transport_closed(self) -> None:
        """The connection closed, or is to be closed as if it had (PS3.8 event 17)."""
        self.event_queue.put("Evt17")
        self._no_request_coming()

    def _invalid_pdu(self) -> None:
        """An invalid or unknown PDU came (PS3.8 event 19)."""
        self.event_queue.put("Evt19")
        self._no_request_coming()

    def _no_request_coming(self) -> None:
        """Before an A-ASSOCIATE-RQ, the acceptor's thread waits for one on the queue to
        the user until the ACSE timeout, whatever the state machine does: a connection
        that closed, or sent what is no request (an HTTP or TLS probe to the plain
        port, a PDU too long, one cut short), held its place among the associations
        (and the listener's connections) that long. The None its wait returns when it
        times out ends it now.
        """
        if self.state_machine.current_state == "Sta2":
            self.to_user_queue.put(None)  # type: ignore[arg-type]

    def _drop_slow_peer(self) -> None:
        logger.warning(
            "%s took longer than the %s timeout to send one PDU: connection closed",
            self._peer(),
            "network" if self.assoc.is_established else "ARTIM",
        )
        # as if the peer had closed: the state machine ends the association (AA-4,
        # AA-5) and shuts the socket down
        self._transport_closed()

    def _refuse_oversized(self, pdu_type: int, pdu_length: int) -> None:
        logger.warning(
            "%s sent a PDU of type 0x%02X claiming %d bytes (at most %d taken): "
            "A-ABORT, connection closed",
            self._peer(),
            pdu_type,
            pdu_length,
            pdu_length_limit(pdu_type),
        )
        abort = A_ABORT_RQ()
        abort.source = 0x02  # service provider
        abort.reason_diagnostic = _INVALID_PDU_PARAMETER
        with contextlib.suppress(OSError):  # the peer may be gone already
            self.socket.send(abort.encode())
        # Not event 19 (invalid PDU): that waits in Sta13 for the peer to close, reading
        # whatever it still sends as PDUs. The body is never read; the connection closes.
        self._transport_closed()

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[0] != _P_DATA_TF:
            return super()._decode_pdu(bytestream)
        if self.assoc.get_handlers(evt.EVT_DATA_RECV):  # only a handler needs a copy
            evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": bytes(bytestream)})
        pdu = P_DATA_TF()
        # Views, not copies: the PDV items, their fragments and what the DIMSE layer
        # writes to the spool file all refer to `bytestream`, which nothing resizes.
        pdu.decode(memoryview(bytestream))  # type: ignore[arg-type]  # sliced only
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt10"


#: Longest an association's two threads wait, when nothing wakes them, before they look
#: at what nothing signals: the ARTIM and network timers. pynetdicom's threads look every
#: millisecond instead, about 3 % of a core for each open association, idle or not.
IDLE_CHECK_SECONDS = 0.05

# What the two loops below log, they log as pynetdicom's own loops do (its loggers).
_PYNETDICOM_ASSOC_LOG = logging.getLogger("pynetdicom.association")
_PYNETDICOM_DUL_LOG = logging.getLogger("pynetdicom.dul")


def _wait_readable(descriptors: list[int], timeout: float) -> set[int]:
    """Those of ``descriptors`` that have something to read (or are closed), after at most
    ``timeout`` seconds. ``poll`` where there is one: ``select`` refuses descriptors past
    1023, which a busy listener's sockets may reach."""
    if hasattr(select, "poll"):
        poller = select.poll()
        for descriptor in descriptors:
            poller.register(descriptor, select.POLLIN)
        return {descriptor for descriptor, _ in poller.poll(timeout * 1000)}
    ready, _, _ = select.select(descriptors, [], [], timeout)
    return set(ready)


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after each put, so that its reader need not poll."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _WakeableDUL(_StreamingDUL):
    """:class:`_StreamingDUL` whose thread, with nothing to do, waits on its socket.

    pynetdicom's DUL thread sleeps a millisecond and looks again whenever nothing came.
    This one waits (``poll``) until the peer sends, a primitive is queued for it to
    send (the association's thread writes a byte to a socket pair then), it is told to
    stop, or `IDLE_CHECK_SECONDS` pass (for the ARTIM timer). The work done on each turn,
    and its order, are pynetdicom's.
    """

    _wake_reader: socket.socket
    _wake_writer: socket.socket

    def prepare_wakeups(self) -> None:
        """Make the wake-up pair and the waking send queue (before the thread starts)."""
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.to_provider_queue = _NotifyingQueue(self._wake)

    def run(self) -> None:
        # pynetdicom gave the thread its own run_reactor as the target, bound before this
        # object was re-classed; the thread runs this class's instead (pynetdicom wraps the
        # target only to pass context variables, which _config.PASS_CONTEXTVARS leaves off)
        self.run_reactor()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already awake (pair full), or closed: fine
            self._wake_writer.send(b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            # pynetdicom's sets the flag and then waits for the thread: wake it first
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _wait_for_work(self) -> None:
        waiting = [self._wake_reader.fileno()]
        peer = getattr(self.socket, "socket", None)
        if peer is not None and peer.fileno() >= 0:
            waiting.append(peer.fileno())
        try:
            woken = _wait_readable(waiting, IDLE_CHECK_SECONDS)
        except (OSError, ValueError):  # a socket closed meanwhile: pynetdicom's short sleep
            time.sleep(self._run_loop_delay)
            return
        if waiting[0] in woken:
            with contextlib.suppress(OSError):  # BlockingIOError once drained
                while self._wake_reader.recv(4096):
                    pass

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, with `_wait_for_work` where it sleeps a millisecond."""
        try:
            self._idle_timer.start()
            idle = False
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    idle = True
                if idle:
                    self._wait_for_work()
                if self._kill_thread:
                    break
                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")
                # one primitive sent or one PDU received a turn, as pynetdicom does
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception:
                    # pynetdicom's own handling: log, send A-ABORT, stop both threads
                    self._abort_after(sys.exc_info()[1])
                    return
                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    idle = True
                    continue
                self.state_machine.do_action(event)
                idle = False
        finally:
            # This thread alone writes the files of incoming data sets: now it is done,
            # what the association can no longer answer is removed at once, not left in
            # spool/.incoming until a sweep.
            discard = getattr(self.assoc.dimse, "discard_unfinished", None)
            if discard is not None:
                try:
                    discard()
                except Exception:  # never in the way of ending the association
                    logger.exception("partly received data sets not removed")
            waking = getattr(self.assoc, "wake", None)
            if waking is not None:
                waking()  # the association's thread sees this one has ended
            self._wake_reader.close()
            self._wake_writer.close()

    def _abort_after(self, exc: BaseException | None) -> None:
        _PYNETDICOM_DUL_LOG.error("Exception in DUL.run(), aborting association")
        # its type, not its message (a library's, which may quote a data set's values);
        # the traceback as every exception's is written (worker.logs)
        _PYNETDICOM_DUL_LOG.error("%s", type(exc).__name__, exc_info=exc)
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        with contextlib.suppress(Exception):  # the connection may be the trouble
            self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class _WakeableAssociation(Association):
    """pynetdicom's association, whose thread waits to be woken instead of polling.

    pynetdicom's acceptor thread sleeps a millisecond and then looks for a complete DIMSE
    message, a release or abort from the peer, its DUL thread's end and the network
    timeout. Each of the first three arrives on a queue that now wakes it (the DIMSE
    message queue, the DUL's queue to the user), the DUL thread wakes it when it ends,
    and it looks at the network timer every `IDLE_CHECK_SECONDS`. What it does on each
    turn is pynetdicom's.
    """

    _woken: threading.Event

    def prepare_wakeups(self) -> None:
        """Make the wake-up and the waking queues (before either thread starts)."""
        self._woken = threading.Event()
        self.dimse.msg_queue = _NotifyingQueue(self.wake)
        self.dul.to_user_queue = _NotifyingQueue(self.wake)

    def wake(self) -> None:
        self._woken.set()

    def kill(self) -> None:
        self._kill = True
        self.wake()  # before pynetdicom's kill, which waits for the DUL thread to stop
        super().kill()

    def _run_reactor(self) -> None:
        self._is_paused = False
        busy = False
        while not self._kill:
            if not busy:
                self._woken.wait(IDLE_CHECK_SECONDS)
            self._woken.clear()  # before looking: a later put wakes the next wait
            busy = False

            # paused while another thread of ours sends on the association
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, message = self.dimse.get_msg(block=False)
            if message:
                self._serve_request(message, cast(int, context_id))
                busy = True  # another message may be waiting: look before waiting

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                _PYNETDICOM_ASSOC_LOG.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                _PYNETDICOM_ASSOC_LOG.info(
                    "Association Aborted"
                    + (" (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                )
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                _PYNETDICOM_ASSOC_LOG.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _tls_handshake(connection: ssl.SSLSocket, peer: str) -> bool:
    """Complete a TLS connection's handshake on its own thread; False, the connection
    closed and the reason logged, when it fails.

    The accept loop leaves it undone (`worker.tls`), so that an idle connection holds up
    nobody else; the context's sockets bound it in time. Where the accept loop did it
    already, this returns at once.
    """
    try:
        connection.do_handshake()
        return True
    except TimeoutError:
        logger.warning("%s did not complete the TLS handshake in time: connection closed", peer)
    except (ssl.SSLEOFError, ConnectionError):  # a probe or a scanner, most likely
        logger.info("%s closed the connection during the TLS handshake", peer)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        logger.warning("TLS handshake with %s failed (%s): connection closed", peer, reason)
    with contextlib.suppress(OSError):
        connection.close()
    return False


class _StreamingRequestHandler(RequestHandler):
    """Accepts associations that read through :class:`_StreamingDUL` and
    :class:`_WritingBackDIMSE`, and whose threads wait to be woken
    (:class:`_WakeableDUL`, :class:`_WakeableAssociation`), after the TLS handshake
    if any (:func:`_tls_handshake`, on this connection's thread)."""

    def handle(self) -> None:
        connection = self.request
        host, port = self.client_address[:2]
        if isinstance(connection, ssl.SSLSocket) and not _tls_handshake(
            connection, f"{host}:{port}"
        ):
            return
        # pynetdicom's handle(), the association started where the bound counts it
        assoc = self._create_association()
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        if isinstance(self.server, _BoundedAssociationServer):
            with self.server.handing_over(connection):
                assoc.start()
        else:
            assoc.start()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # Only reading and waiting differ, so the objects pynetdicom made are re-classed
        # rather than their construction copied here (neither thread has started yet).
        assoc.dul.socket.__class__ = _StreamingSocket
        assoc.dul.__class__ = _WakeableDUL
        assoc.dimse.__class__ = _WritingBackDIMSE
        assoc.__class__ = _WakeableAssociation
        cast(_WritingBackDIMSE, assoc.dimse).space_reserve = getattr(
            self.server, "space_reserve", None
        )
        cast(_WakeableDUL, assoc.dul).prepare_wakeups()
        cast(_WakeableAssociation, assoc).prepare_wakeups()
        return assoc


class _PeerRefusals:
    """When to log the refusals of one kind for each peer address: the first at once,
    then at most every :data:`REFUSED_LOG_SECONDS` for that address, with a count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # peer address: (when a refusal was last logged, refusals not logged since)
        self._peers: dict[str, tuple[float, int]] = {}

    def due(self, peer: str) -> int:
        """Count one refusal of ``peer``: the refusals to log now, this one and those not
        logged before it; 0 while the last logged is too recent (this one waits)."""
        now = time.monotonic()
        with self._lock:
            logged_at, unlogged = self._peers.get(peer, (-REFUSED_LOG_SECONDS, 0))
            if now - logged_at < REFUSED_LOG_SECONDS:
                self._peers[peer] = (logged_at, unlogged + 1)
                return 0
            if len(self._peers) >= _PEER_REFUSALS_KEPT:  # many addresses: forget
                self._peers = {
                    address: entry
                    for address, entry in self._peers.items()
                    if now - entry[0] < REFUSED_LOG_SECONDS
                }
            self._peers[peer] = (now, 0)
        return unlogged + 1


def _requestor_address(assoc: Association) -> str | None:
    """The peer address of ``assoc`` (`_address`), None where not known."""
    info = assoc.requestor.address_info
    return _address(info.address) if info is not None else None


class _BoundedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with at most ``maximum_connections`` connections at
    once, and ``maximum_connections_per_peer`` from one peer address: those whose TLS
    handshake is under way on their own thread (:class:`_StreamingRequestHandler`) and
    the associations.

    pynetdicom bounds the associations only once a peer has sent its A-ASSOCIATE-RQ, and
    starts a thread for every connection before that: connections that never speak each
    held a thread until their timeout, however many came, and one host could hold every
    place so. One past either bound is closed as soon as it is accepted, before its
    thread or its handshake.

    A connection counts from when it is admitted (:meth:`verify_request`) until its
    association's thread starts, and then as that thread, until it ends: however the
    connection ends (closed before its A-ASSOCIATE-RQ, its handshake failed, rejected,
    aborted, released), nothing is left to take back.
    """

    maximum_connections = MAXIMUM_CONNECTIONS
    maximum_connections_per_peer = MAXIMUM_CONNECTIONS_PER_PEER
    space_reserve: SpaceReserve | None = None  # the listener's, for its associations

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._bound_lock = threading.Lock()
        # connections admitted and not yet handed to an association, whose thread
        # pynetdicom counts from then on (:meth:`handing_over`): their peer addresses
        self._handling: dict[int, str] = {}
        self.refused_connections = 0  # for either bound
        self._refused_in_all = 0  # for `maximum_connections`
        self._refused_logged = 0  # _refused_in_all when last logged
        self._refused_logged_at = -REFUSED_LOG_SECONDS
        self._peer_refusals = _PeerRefusals()
        super().__init__(*args, **kwargs)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit the connection if there is room, in all and for its peer address,
        counting it until its association runs; else count it and log it (at most every
        :data:`REFUSED_LOG_SECONDS`, for each address where its own bound refused it)."""
        host = client_address[0] if isinstance(client_address, tuple) else client_address
        peer = _address(str(host))
        with self._bound_lock:
            associations = self.ae.active_associations
            full = len(self._handling) + len(associations) >= self.maximum_connections
            if not full and (
                self._connections_from(peer, associations) < self.maximum_connections_per_peer
            ):
                self._handling[id(request)] = peer
                return True
            self.refused_connections += 1
            if full:
                self._refused_in_all += 1
                now = time.monotonic()
                if now - self._refused_logged_at < REFUSED_LOG_SECONDS:
                    return False
                refused = self._refused_in_all - self._refused_logged
                self._refused_logged, self._refused_logged_at = self._refused_in_all, now
        if full:
            logger.warning(
                "%d connection(s) closed on arrival, the last from %s: %d connections at "
                "once is the most this listener takes",
                refused,
                peer,
                self.maximum_connections,
            )
        elif refused := self._peer_refusals.due(peer):
            logger.warning(
                "%d connection(s) from %s closed on arrival: %d at once from one address is "
                "the most this listener takes",
                refused,
                peer,
                self.maximum_connections_per_peer,
            )
        return False

    def connections_from(self, address: str) -> int:
        """This server's connections from ``address`` (IPv4-mapped or not) that count
        against its bound: in their TLS handshake, or with an association's thread."""
        with self._bound_lock:
            return self._connections_from(_address(address), self.ae.active_associations)

    def _connections_from(self, peer: str, associations: list[Association]) -> int:
        """As `connections_from`, for ``peer`` as `_address` gives it, with the AE's
        association threads given; the caller holds ``_bound_lock``."""
        handling = sum(1 for address in self._handling.values() if address == peer)
        return handling + sum(1 for assoc in associations if _requestor_address(assoc) == peer)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self.handed_over(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:  # the handshake failed, or the association could not start
            self.handed_over(request)

    def handed_over(self, request: Any) -> None:
        """Stop counting ``request`` here: it is closed, or its association counts it.
        Once or more."""
        with self._bound_lock:
            self._handling.pop(id(request), None)

    @contextlib.contextmanager
    def handing_over(self, request: Any) -> Iterator[None]:
        """Start ``request``'s association inside this: the connection stops counting
        here as its association's thread starts counting, with no moment between where
        it counts twice (a connection that fits refused) or not at all (one too many
        let in)."""
        with self._bound_lock:
            yield
            self._handling.pop(id(request), None)


_HEADER_TAGS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
)
_HEADER_TAG_LIST: list[BaseTag | int] = [Tag(keyword) for keyword in _HEADER_TAGS]
_LAST_HEADER_TAG = max(_HEADER_TAG_LIST)

#: What the listener reads of a data set before the last of `_HEADER_TAGS` at most
#: (`dicom_io.budget.BudgetedFile`): reads of the file (an element or a sequence item
#: takes one to four) and bytes. Past either the data set is refused (0xC210). pydicom
#: builds each item of a sequence of undefined length there, even one it leaves out of the
#: header: an empty item, 8 bytes sent, took some 700 bytes, and 25 MB of them would have
#: taken a 2 GiB listener, and the same again when the PACS sent it again. A real header
#: has a few hundred elements there (the ICC profile, overlays and the functional groups
#: come after), and a sequence of 5000 references takes 40 000 reads; these hold one
#: C-STORE's header to some 90 MiB.
HEADER_READS = 1 << 17
HEADER_BYTES = 4 << 20


def _past_header(tag: BaseTag, _vr: str | None, _length: int) -> bool:
    """``stop_when`` of the header's read: nothing after the last of `_HEADER_TAGS`."""
    return tag > _LAST_HEADER_TAG


#: The transfer syntaxes whose data sets pydicom reads in either, finding the VR's
#: presence from the elements themselves.
_NATIVE_LITTLE_ENDIAN = frozenset((pyuid.ImplicitVRLittleEndian, pyuid.ExplicitVRLittleEndian))


class ForeignFileMeta(ValueError):
    """A data set that begins with File Meta Information (group 0002) of its own naming
    another transfer syntax than the one its presentation context negotiated."""


def _read_header(path: Path, negotiated: str) -> FileDataset:
    """`_HEADER_TAGS` of the data set in the file at ``path``, read within `HEADER_READS`
    and `HEADER_BYTES` (else `dicom_io.budget.HeaderTooLargeError`, perhaps wrapped).

    pynetdicom writes the File Meta Information, with the ``negotiated`` transfer
    syntax, and the data set after it as sent. A data set may carry no group 0002 (PS3.7
    7.5.1), but some senders leave their own there: pydicom reads it on as the file's,
    the last value of an element winning, and would take the data set for another
    transfer syntax than it came in. Deflated, it would inflate the whole of it in
    memory before its first element (a few hundred kilobytes sent made 300 MB here),
    and a transcoded one would be recorded, and decoded, as what it was before. Such a
    data set is refused (`ForeignFileMeta`, 0xC210) unless it names the negotiated one,
    or the other of Implicit and Explicit VR Little Endian: pydicom finds which of
    those the elements are in as it reads them, whatever the file meta says.
    """
    with open(path, "rb") as fh:
        budgeted = cast(BinaryIO, BudgetedFile(fh, max_reads=HEADER_READS, max_bytes=HEADER_BYTES))
        read_preamble(budgeted, False)
        stated = _read_file_meta_info(budgeted).get("TransferSyntaxUID")
        if str(stated) != negotiated and not {str(stated), negotiated} <= _NATIVE_LITTLE_ENDIAN:
            raise ForeignFileMeta(
                "the data set begins with File Meta Information (group 0002) naming "
                f"transfer syntax {str(stated)[:64]!r}, not {negotiated} negotiated "
                "for its presentation context"
            )
        fh.seek(0)
        budgeted = cast(BinaryIO, BudgetedFile(fh, max_reads=HEADER_READS, max_bytes=HEADER_BYTES))
        return read_partial(budgeted, stop_when=_past_header, specific_tags=_HEADER_TAG_LIST)


def _incoming_name() -> str:
    """A new name for a listener's incoming directory: its host, its process, and a
    random part (another host's listener may have the same name and process id)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


def _incoming_host(name: str) -> str:
    """The host part of a name `_incoming_name` made."""
    return name.rsplit("-", 2)[0]


def _lock_free(path: Path, *, create: bool) -> int | None:
    """A descriptor of `path` holding its exclusive lock, taken without waiting; None
    where another open file holds it, `path` is missing (unless `create`), or the file
    system takes no locks. Closing the descriptor, or the process ending, frees it.

    ``flock``: its locks belong to an open file, so a second listener in the same
    process is told the first holds it (POSIX locks would tell it the lock is its own).
    """
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


class _RecordingHold:
    """A listener's side of the spool's recording lock (`RECORDING_LOCK_NAME`).

    The listener holds it shared from before it renames a received file into the spool
    until that file's row is committed, or has failed: a file there that no row names
    may be one whose row is about to be, however old its time says it is. Retention
    takes it exclusively (`recording_lock`) to remove such files.

    The listener makes the file when it starts (`open`), so that it is the listener's
    user's, and keeps it open: a C-STORE takes no ``open`` of its own. One descriptor
    is one lock for all the listener's associations (``flock`` locks belong to an open
    file): it is taken by the first C-STORE to need it and let go by the last, so that
    one finishing never frees it under another. Before, the first process to touch the
    file made it: ``boneage-worker retention`` run as root made it root's, mode 0600,
    and every C-STORE of the listener then went on without it.

    The lock is waited for outside the object's mutex (a count of C-STOREs taking it
    keeps it from being let go, or its file closed, meanwhile): `close` never waits for
    retention. Nothing here raises into a C-STORE: a failure is logged, and the store
    goes on without the lock.
    """

    def __init__(self, spool_dir: Path) -> None:
        self.path = spool_dir / RECORDING_LOCK_NAME
        self._descriptor: int | None = None
        #: C-STOREs holding the lock, and C-STOREs taking it (in ``flock``, which may
        #: wait for retention, outside the mutex)
        self._holders = 0
        self._taking = 0
        self._stopped = False
        #: False where the lock cannot be had (said at start): C-STOREs go on without it.
        self._usable = True
        self._failed_since_start = False
        self._mutex = threading.Lock()

    def open(self) -> None:
        """Make or open the lock file and check that locks can be taken on it; where
        not, say so now (C-STOREs go on without it)."""
        with self._mutex:
            self._stopped = False
            if self._descriptor is not None:
                return
            try:
                descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                self._unusable(exc)
                return
            try:
                fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(descriptor, fcntl.LOCK_UN)
            except BlockingIOError:
                pass  # retention holds it now: locks work here
            except OSError as exc:  # the file system takes no locks
                os.close(descriptor)
                self._unusable(exc)
                return
            self._descriptor, self._usable, self._failed_since_start = descriptor, True, False

    def _unusable(self, exc: OSError) -> None:
        self._usable = False
        logger.warning(
            "the spool's recording lock (%s) cannot be used (%s): C-STOREs go on without "
            "it, and retention then removes no received image that no instance records",
            self.path,
            exc.strerror or type(exc).__name__,
        )

    def close(self) -> None:
        """Let the file go once no C-STORE holds the lock or waits for it (the listener
        stops); the last of those lets it go then."""
        with self._mutex:
            self._stopped = True
            self._let_go_if_idle()

    def _let_go_if_idle(self) -> None:
        """Where no C-STORE holds the lock or is taking it, let it go: close the file
        if the listener stopped, else unlock it. Under the mutex; never raises."""
        if self._holders or self._taking or self._descriptor is None:
            return
        if not self._stopped:
            try:
                fcntl.flock(self._descriptor, fcntl.LOCK_UN)
                return
            except OSError as exc:
                # Closing the file lets the lock go as well; the next C-STORE opens it
                # again. Kept, the lock would keep retention out for good.
                logger.warning(
                    "the spool's recording lock could not be let go (%s): its file is "
                    "closed instead, and opened again by the next C-STORE",
                    exc.strerror or type(exc).__name__,
                )
        descriptor, self._descriptor = self._descriptor, None
        try:
            os.close(descriptor)
        except OSError as exc:  # the descriptor, and its lock, are gone all the same
            logger.warning(
                "the spool's recording lock file could not be closed cleanly (%s)",
                exc.strerror or type(exc).__name__,
            )

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock, shared, for the ``with`` block; waits while retention holds
        it. Where it cannot be had, the block runs without it. Never raises."""
        held = self._acquire()
        try:
            yield
        finally:
            if held:
                self._release()

    def _acquire(self) -> bool:
        with self._mutex:
            if not self._usable:
                return False
            if self._holders:  # one descriptor, one lock: held already
                self._holders += 1
                return True
            try:
                if self._descriptor is None:  # stopped, an association still storing
                    self._descriptor = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                self._went_without(exc)
                return False
            descriptor = self._descriptor
            self._taking += 1
        # Waits while retention holds it; not under the mutex, so that neither `close`
        # nor a C-STORE letting go waits for retention. Meanwhile `_taking` keeps them
        # from closing or unlocking the descriptor (another C-STORE's lock on it is
        # this one's as soon as flock returns).
        failed: OSError | None = None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
        except OSError as exc:
            failed = exc
        with self._mutex:
            self._taking -= 1
            if failed is None:
                self._holders += 1
                return True
            self._let_go_if_idle()  # and close a file opened again after `close`
            self._went_without(failed)
            return False

    def _went_without(self, exc: OSError) -> None:
        """Say (once since the start) that a C-STORE goes on without the lock; under
        the mutex."""
        if not self._failed_since_start:
            self._failed_since_start = True
            logger.warning(
                "the spool's recording lock could not be taken for a C-STORE (%s): it went "
                "on without it (said once)",
                exc.strerror or type(exc).__name__,
            )

    def _release(self) -> None:
        with self._mutex:
            self._holders -= 1
            self._let_go_if_idle()  # the last holder, none taking it


@contextlib.contextmanager
def recording_lock(spool_dir: Path) -> Iterator[OSError | None]:
    """Hold the spool's recording lock (`RECORDING_LOCK_NAME`) exclusively for the
    ``with`` block, without waiting: retention, before it removes a received file that
    no row names (worker.retention). Yields None where it is held; else why not, and
    the block runs without it:

    - `BlockingIOError` (``EWOULDBLOCK``): a listener holds it, between renaming a
      received file into place and committing its row (`_RecordingHold`): worth trying
      again in a moment;
    - `FileNotFoundError`: no listener has made it. None is recording now, but one
      starting meanwhile would make it and record under a lock retention does not hold
      (and a listener whose file was removed under it holds a lock on the removed file):
      no lock is possible until a listener has started. It is never made here: made by
      another user (root), the listener could not open it;
    - another `OSError`: no lock is possible here. The file system takes no locks, or
      the file is not one the listener can use (not a file, not the spool owner's, not
      open to its owner: a listener that cannot open it records without it).
    """
    try:
        descriptor = os.open(spool_dir / RECORDING_LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        yield exc
        return
    refused: OSError | None = None
    try:
        lock, spool = os.fstat(descriptor), os.stat(spool_dir)
        if not stat.S_ISREG(lock.st_mode):
            refused = OSError(errno.EINVAL, "not a file")
        elif lock.st_uid != spool.st_uid or lock.st_mode & 0o600 != 0o600:
            refused = PermissionError(
                errno.EACCES, "not the spool owner's to read and write: a listener may not open it"
            )
        else:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:  # BlockingIOError: a listener holds it; else no locks here
        refused = exc
    try:
        yield refused
    finally:
        os.close(descriptor)  # and the lock with it


def local_fault(exc: BaseException) -> bool:
    """Whether `exc` is this machine's trouble, not the data's: an operating system error
    (EIO, ESTALE, ENOENT: it has an ``errno``) or memory exhausted, raised or wrapped.
    The listener answers it 0xA700; the worker does not take it for a file it cannot
    parse (worker.pipeline): an OSError the task retries, memory exhausted ends the
    attempt, which the reconciler queues again.

    pydicom raises a bare ``OSError`` (no ``errno``) for data it cannot parse, and turns
    any error reading a sequence item into one: the chain it was raised from tells.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, MemoryError):
            return True
        if isinstance(cause, OSError) and cause.errno is not None:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _reject(assoc: Association, result: int, source: int, diagnostic: int) -> None:
    """Answer ``assoc``'s A-ASSOCIATE-RQ with an A-ASSOCIATE-RJ, from an EVT_REQUESTED
    handler, and end the association once the peer has it, as pynetdicom ends those it
    rejects itself. Sent and left, the connection was closed as the handler returned,
    before the DUL's thread had written the A-ASSOCIATE-RJ: the peer saw an abort, and
    never the reason (transient: try again; permanent: do not)."""
    assoc.acse.send_reject(result, source, diagnostic)
    assoc.kill()  # waits for the DUL's state machine to finish (the peer closes, or ARTIM)


def _address(text: str) -> str:
    """An IP address as one text for each address: ``::ffff:10.0.0.5`` (an IPv4 caller
    of a listener on ``::``) and ``10.0.0.5`` are the same caller. Other text as it is."""
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return text
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped or address)


class StorageSCP:
    """A pynetdicom Storage SCP that spools durably before it answers Success.

    Parameters
    ----------
    ae_title
        Our AE title; associations addressed to another title are rejected.
    spool_dir
        Where instances are kept until processed. Incoming data is streamed to this
        listener's own directory in ``spool_dir/.incoming`` (same file system, so the
        final rename is atomic; see `start`).
    record
        Commits a row for a received instance and returns its id; raising means
        "not recorded" and the PACS is told to retry (0xA700).
    notify
        Called with the row id after it is committed; must not block.
    allowed_callers
        ``(ae_title, host or None)`` pairs allowed to associate; empty allows anyone.
    host, port
        Where to listen; port 0 picks a free port (see `port`).
    ssl_context
        Serve DICOM over TLS when given.
    network_timeout, acse_timeout, dimse_timeout
        Seconds pynetdicom waits on a silent peer: on the socket, for association
        negotiation, and for a DIMSE message. A stalled client loses only its own
        connection; tests make these short.
    maximum_connections
        Connections at once, TLS handshakes and associations together; one more is
        closed on arrival (:data:`MAXIMUM_CONNECTIONS`).
    maximum_associations_per_peer
        Associations at once from one peer address; one more is rejected, transiently
        (:data:`MAXIMUM_ASSOCIATIONS_PER_PEER`). Twice as many connections at once from
        one address are taken; one more is closed on arrival
        (:data:`MAXIMUM_CONNECTIONS_PER_PEER`).
    reserve_bytes
        Free space kept on the spool's file system (:class:`SpaceReserve`): a C-STORE
        that comes while less is free is answered 0xA700. 0 keeps none.
    """

    def __init__(
        self,
        *,
        ae_title: str,
        spool_dir: Path,
        record: RecordFn,
        notify: NotifyFn,
        allowed_callers: Sequence[tuple[str, str | None]] = (),
        host: str = "0.0.0.0",
        port: int = 11112,
        ssl_context: ssl.SSLContext | None = None,
        network_timeout: float = 60,
        acse_timeout: float = 30,
        dimse_timeout: float = 120,
        maximum_connections: int = MAXIMUM_CONNECTIONS,
        maximum_associations_per_peer: int = MAXIMUM_ASSOCIATIONS_PER_PEER,
        reserve_bytes: int = 0,
    ) -> None:
        if maximum_associations_per_peer < 1:
            raise ValueError(
                f"maximum_associations_per_peer must be at least 1, got "
                f"{maximum_associations_per_peer}"
            )
        self.ae_title = ae_title
        self.maximum_connections = maximum_connections
        self.maximum_associations_per_peer = maximum_associations_per_peer
        self.maximum_connections_per_peer = 2 * maximum_associations_per_peer
        self.spool_dir = Path(spool_dir)
        self.incoming_root = self.spool_dir / ".incoming"
        self.space_reserve = SpaceReserve(self.spool_dir, reserve_bytes)
        # this listener's own, named and locked when it starts
        self.incoming_dir = self.incoming_root / _incoming_name()
        self._incoming_lock: int | None = None
        self._incoming_claimed = False
        self._recording = _RecordingHold(self.spool_dir)
        self._record = record
        self._notify = notify
        self._allowed = [(ae.strip(), host) for ae, host in allowed_callers]
        self._address = (host, port)
        self._ssl_context = ssl_context
        self._timeouts = (network_timeout, acse_timeout, dimse_timeout)
        self._server: _BoundedAssociationServer | None = None
        self._saved_tempdir: str | None = None
        # refused: associations; deferred: C-STOREs refused for the reserve; failed: others
        self.counters = {"stored": 0, "refused": 0, "failed": 0, "deferred": 0}
        self._counter_lock = threading.Lock()
        self._peer_refusals = _PeerRefusals()  # of associations, for their peer's bound
        # C-STOREs refused for the reserve (_log_deferred), under _counter_lock: whether
        # since the space was last enough, those not logged yet, and when last logged
        self._deferring = False
        self._deferred_unlogged = 0
        self._deferred_logged_at = -REFUSED_LOG_SECONDS

    # -- life cycle -------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        # Not unlimited (0): a received PDU is held in memory whole, and a peer told
        # "unlimited" sends a whole image as one PDU (a 128 MB image grew the
        # listener by 490 MB when pynetdicom still copied each PDU several times; by
        # 4 MB with this cap). 1 MiB still means few PDUs for a 10 MB radiograph.
        ae.maximum_pdu_size = MAXIMUM_PDU_SIZE
        ae.require_called_aet = True
        # pynetdicom rejects unknown calling AE titles itself; host pins are checked
        # in `_on_requested`.
        ae.require_calling_aet = sorted({ae_title for ae_title, _ in self._allowed})
        ae.maximum_associations = MAXIMUM_ASSOCIATIONS
        ae.network_timeout, ae.acse_timeout, ae.dimse_timeout = self._timeouts
        for uid in image_storage_sop_classes():
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        # the one storage SOP class taken that is no image: IOCM rejection notes, by which
        # the PACS tells of images it rejected (dicom_io.ko, worker.pipeline)
        ae.add_supported_context(pyuid.KeyObjectSelectionDocumentStorage, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        return ae

    def start(self) -> None:
        """Start listening in background threads; returns once the port is bound.

        Data sets stream into a directory of this listener's own, in
        ``spool/.incoming``, which it holds locked while it runs: another listener on
        the same spool (the other of a pair, or ``listen`` run beside ``serve``) neither
        writes there nor removes what is there, and removes it only once its lock is
        free (`sweep_incoming`). Before, a listener starting removed every partial file
        in ``spool/.incoming``, the running one's too, whose C-STOREs then failed.
        """
        for d in (self.spool_dir, self.incoming_root):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The spool's recording lock: made now, so that it is this user's (not that of
        # a command run as root before the first C-STORE), and a failure is said now.
        self._recording.open()
        self._claim_incoming()
        # pynetdicom streams each dataset to a NamedTemporaryFile in the default temp
        # dir; pointing that at the spool makes the final step a rename, not a copy.
        # This is process-wide, which is why the listener runs in its own process.
        _config.STORE_RECV_CHUNKED_DATASET = True
        self._saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.incoming_dir)
        self.sweep_incoming()
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            *LOW_LATENCY_HANDLERS,  # answers and the PACS's next request never wait
        ]
        ae = self._make_ae()
        server = ae.make_server(
            self._address,
            evt_handlers=handlers,  # type: ignore[arg-type]
            ssl_context=self._ssl_context,
            server_class=_BoundedAssociationServer,
            request_handler=_StreamingRequestHandler,
        )
        ae._servers.append(server)  # as AE.start_server does: server.shutdown() expects it
        self._server = cast(_BoundedAssociationServer, server)
        self._server.maximum_connections = self.maximum_connections
        self._server.maximum_connections_per_peer = self.maximum_connections_per_peer
        self._server.space_reserve = self.space_reserve
        threading.Thread(
            target=server.serve_forever, name=f"dicom-acceptor-{self.port}", daemon=True
        ).start()
        logger.info(
            "listening as %s on %s:%d%s",
            self.ae_title,
            self._address[0],
            self.port,
            " (TLS)" if self._ssl_context else "",
        )

    @property
    def refused_connections(self) -> int:
        """Connections closed on arrival since the listener started, for being more
        than ``maximum_connections`` at once, or ``maximum_connections_per_peer`` from
        one address."""
        return self._server.refused_connections if self._server is not None else 0

    def connections_from(self, address: str) -> int:
        """Connections from ``address`` open now that count against
        ``maximum_connections_per_peer`` (0 when not listening)."""
        return self._server.connections_from(address) if self._server is not None else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        tempfile.tempdir = self._saved_tempdir
        self._release_incoming()
        self._recording.close()

    @property
    def port(self) -> int:
        if self._server is None:
            return self._address[1]
        return int(self._server.server_address[1])

    def _claim_incoming(self) -> None:
        """Make this listener's incoming directory (a new name each start: host, process,
        a random part) and lock it for as long as the listener runs."""
        self.incoming_dir = self.incoming_root / _incoming_name()
        self.incoming_dir.mkdir(mode=0o700)
        self._incoming_claimed = True
        self._incoming_lock = _lock_free(self.incoming_dir / INCOMING_LOCK_NAME, create=True)
        if self._incoming_lock is None:
            logger.warning(
                "the spool's file system takes no locks: another listener on it removes "
                "this one's partial files only when they are %d s old",
                INCOMING_MAX_AGE_SECONDS,
            )

    def _release_incoming(self) -> None:
        """Remove this listener's incoming directory, if nothing is left in it, and its
        lock. What an association still running writes there keeps the lock held until
        the process ends."""
        if not self._incoming_claimed:
            return
        with contextlib.suppress(FileNotFoundError):
            if any(p.name != INCOMING_LOCK_NAME for p in self.incoming_dir.iterdir()):
                return
        self._incoming_claimed = False
        with contextlib.suppress(OSError):
            (self.incoming_dir / INCOMING_LOCK_NAME).unlink(missing_ok=True)
            self.incoming_dir.rmdir()
        if self._incoming_lock is not None:
            os.close(self._incoming_lock)
            self._incoming_lock = None

    def _remove_abandoned_incoming(self) -> int:
        """Remove the incoming directories of listeners that are gone, with what they
        hold; the count of files removed.

        A listener is gone when its directory's lock is free (the kernel frees it when
        the process ends, however it ends) and the directory was made on this host, or
        on another and untouched for `INCOMING_ABANDONED_SECONDS`: a file system shared
        over the network may keep locks on each host alone, and a running listener
        touches its directory at every sweep. Partial transfers of a crash were never
        acknowledged: the PACS still holds them and sends them again.
        """
        host = _incoming_host(self.incoming_dir.name)
        cutoff = time.time() - INCOMING_ABANDONED_SECONDS
        removed = directories = 0
        for directory in self.incoming_root.iterdir():
            if directory == self.incoming_dir or not directory.is_dir():
                continue
            # (create=False: a listener starting makes its directory, then the lock)
            lock = _lock_free(directory / INCOMING_LOCK_NAME, create=False)
            if lock is None:  # its listener runs (or no lock can tell)
                continue
            try:
                if _incoming_host(directory.name) != host and directory.stat().st_mtime > cutoff:
                    continue
                for leftover in directory.iterdir():
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                        if leftover.suffix == ".dcm":
                            removed += 1
                directory.rmdir()
                directories += 1
            except OSError:  # removed meanwhile by another listener, or not empty
                continue
            finally:
                os.close(lock)
        if directories:
            logger.info(
                "%d incoming folder(s) of listeners that are gone removed, with %d partial file(s)",
                directories,
                removed,
            )
        return removed

    def sweep_incoming(self, older_than: float | None = None) -> int:
        """Remove the partial files nothing will finish; their count.

        Those in the incoming directories of listeners that are gone
        (`_remove_abandoned_incoming`), and any in ``spool/.incoming``, whichever
        listener's, untouched for ``older_than`` seconds (default
        `INCOMING_MAX_AGE_SECONDS`, at least ten network timeouts). An association
        removes its partial files when it ends; this catches what a fault left behind,
        without a restart. A data set still coming is written at least once a network
        timeout (or its association is dropped), and one received is renamed out of
        here within seconds, so neither is this old. This listener's own directory is
        touched (made again if something removed it), so that others see it in use.
        """
        if self._incoming_claimed:
            if not self.incoming_dir.is_dir():
                logger.warning("this listener's incoming directory was removed: made again")
                self._release_incoming()
                self._claim_incoming()
                tempfile.tempdir = str(self.incoming_dir)
            os.utime(self.incoming_dir)
        removed = self._remove_abandoned_incoming()
        bound = max(older_than or INCOMING_MAX_AGE_SECONDS, 10 * (self._timeouts[0] or 0))
        cutoff = time.time() - bound
        # (files of listeners before their directories were their own: *.dcm at the top)
        for pattern in ("*.dcm", "*/*.dcm"):
            for candidate in self.incoming_root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    if candidate.stat().st_mtime < cutoff:
                        candidate.unlink()
                        removed += 1
        if removed:
            logger.warning("%d abandoned partial file(s) removed from the spool", removed)
        return removed

    # -- association ------------------------------------------------------

    def _on_connection(self, event: evt.Event) -> None:
        # Python gives accepted sockets no timeout, so pynetdicom's read of a PDU body
        # blocks forever when a peer sends a PDU header and then stalls (its ARTIM and
        # idle timers cannot fire while the reactor sits in recv). Bounding every read
        # by the network timeout makes such a peer lose its connection and thread
        # instead of holding one of `maximum_associations` for good.
        transport = event.assoc.dul.socket
        if transport is not None and transport.socket is not None:
            transport.socket.settimeout(self._timeouts[0])

    def _on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        assert requestor.primitive is not None  # EVT_REQUESTED: the A-ASSOCIATE-RQ is in
        calling = requestor.primitive.calling_ae_title.strip()
        pins = {host for ae, host in self._allowed if ae == calling}
        peer_host = requestor.address
        pinned = bool(pins) and None not in pins
        if pinned and _address(peer_host) not in {_address(p) for p in pins if p}:
            logger.warning("calling AE %r is not allowed from %s", calling, peer_host)
            self._count("refused")
            # Rejected-permanent, service-user, calling AE title not recognised.
            _reject(event.assoc, 0x01, 0x01, 0x03)
            return
        # (unknown titles are rejected by pynetdicom's own check, after this)
        if self._associations_from(event.assoc) >= self.maximum_associations_per_peer:
            self._count("refused")
            self._log_refused_peer(_address(peer_host))
            # Rejected-transient, service-provider (presentation), local limit exceeded:
            # as pynetdicom answers one past `MAXIMUM_ASSOCIATIONS`; a PACS tries again.
            _reject(event.assoc, 0x02, 0x03, 0x02)

    def _log_refused_peer(self, peer: str) -> None:
        """Say that an association from ``peer`` was refused for its bound: at once, and
        then at most every :data:`REFUSED_LOG_SECONDS` for that address, with a count."""
        refused = self._peer_refusals.due(peer)
        if not refused:
            return
        logger.warning(
            "%d association(s) from %s refused: %d at once from one address is the most "
            "this listener takes",
            refused,
            peer,
            self.maximum_associations_per_peer,
        )

    def _associations_from(self, assoc: Association) -> int:
        """This listener's other associations from ``assoc``'s peer address that were
        requested and are not over (released, aborted or rejected).

        Each association counts those requested before it, whether accepted yet or not,
        so two asking at once from one address never both get the last place.
        """
        server = self._server
        if server is None:
            return 0
        peer = _address(assoc.requestor.address)
        return sum(
            1
            for other in server.active_associations
            if other is not assoc
            and other.requestor.primitive is not None
            and not (other.is_rejected or other.is_released or other.is_aborted)
            and _address(other.requestor.address) == peer
        )

    def _on_rejected(self, event: evt.Event) -> None:
        primitive = event.assoc.requestor.primitive
        assert primitive is not None
        logger.warning(
            "rejected association from calling AE %r to called AE %r at %s",
            primitive.calling_ae_title.strip(),
            primitive.called_ae_title.strip(),
            event.assoc.requestor.address,
        )
        self._count("refused")

    # -- C-STORE ----------------------------------------------------------

    def _count(self, key: str) -> None:
        with self._counter_lock:
            self.counters[key] += 1

    def _log_deferred(self, short: ReserveReached) -> None:
        """Say that C-STOREs are refused for the reserve: the first at once, then at most
        every :data:`REFUSED_LOG_SECONDS`, with a count (a PACS with thousands of images
        queued sends them again every few seconds, and the log shares the disk)."""
        now = time.monotonic()
        with self._counter_lock:
            self._deferring = True
            self._deferred_unlogged += 1
            if now - self._deferred_logged_at < REFUSED_LOG_SECONDS:
                return
            refused, self._deferred_unlogged = self._deferred_unlogged, 0
            self._deferred_logged_at = now
        logger.error(
            "%d C-STORE(s) answered 0xA700, nothing of them kept: %s "
            "(BONEAGE_MIN_FREE_MB); the PACS sends them again",
            refused,
            short.strerror,
        )

    def _space_again(self) -> None:
        """Say that C-STOREs are taken again, with the refusals not said before; the
        next shortage is said at once."""
        with self._counter_lock:
            if not self._deferring:
                return
            unlogged, self._deferring, self._deferred_unlogged = self._deferred_unlogged, False, 0
            self._deferred_logged_at = -REFUSED_LOG_SECONDS
        logger.warning(
            "enough space again: C-STOREs are taken again%s",
            f" ({unlogged} more were answered 0xA700 before)" if unlogged else "",
        )

    def _not_durable(self, sop_uid: str, exc: OSError) -> int:
        self._count("failed")
        logger.error(
            "C-STORE %s: cannot make the file durable (%s): 0xA700",
            uid_tag(sop_uid),
            exc.strerror or type(exc).__name__,
        )
        return OUT_OF_RESOURCES

    def _on_store(self, event: evt.Event) -> int:
        """Handle one C-STORE. Never raises: every failure is a status and a log line."""
        started = time.monotonic()
        calling = event.assoc.requestor.ae_title.strip()
        request: Any = event.request
        command_uid = str(request.AffectedSOPInstanceUID)
        command_class = str(request.AffectedSOPClassUID)
        if command_class != event.context.abstract_syntax:
            # pynetdicom serves a C-STORE by the class it names, on whichever presentation
            # context it came: a peer that negotiated CR alone could send any storage class
            # (an encapsulated PDF) on that context. Refused, as the SOP classes not
            # negotiated are; pynetdicom removes the file.
            self._count("failed")
            logger.warning(
                "C-STORE %s from %s: its SOP class is not the one negotiated for its "
                "presentation context: 0x0122",
                uid_tag(command_uid),
                calling,
            )
            return SOP_CLASS_NOT_SUPPORTED
        spool_file = getattr(request, "_dataset_file", None)
        error = spool_file.error if isinstance(spool_file, _SpoolFile) else None
        if isinstance(error, ReserveReached):
            self._count("deferred")
            self._log_deferred(error)
            return OUT_OF_RESOURCES
        if error is not None:
            self._count("failed")
            logger.error(
                "C-STORE %s from %s: the data set could not be written (%s): 0xA700",
                uid_tag(command_uid),
                calling,
                error.strerror or type(error).__name__,
            )
            return OUT_OF_RESOURCES
        temp = Path(event.dataset_path)
        try:
            header = _read_header(temp, str(event.context.transfer_syntax))
            if "SOPClassUID" not in header and "SOPInstanceUID" not in header:
                # Bytes that are no DICOM data set (a text file, a truncated stream, an
                # empty data set) still "parse" into an empty header: neither Type 1 SOP
                # Common UID means we did not understand it, so the PACS must not
                # believe it delivered an image.
                raise ValueError("the data set has neither SOP Class UID nor SOP Instance UID")
            sop_uid = str(header.get("SOPInstanceUID") or command_uid)
            if sop_uid != command_uid:
                raise ValueError("SOP Instance UID in the dataset differs from the request")
            if "SOPClassUID" in header and str(header.SOPClassUID) != command_class:
                # The SOP class was negotiated and named in the request; a data set of
                # another is refused, not stored under a class it is not (PS3.4 B.2.3).
                self._count("failed")
                logger.warning(
                    "C-STORE %s from %s: the data set's SOP class differs from the "
                    "request's: 0xA900",
                    uid_tag(command_uid),
                    calling,
                )
                return DATA_SET_DOES_NOT_MATCH_SOP_CLASS
            for keyword in (
                "SOPClassUID",
                "SOPInstanceUID",
                "StudyInstanceUID",
                "SeriesInstanceUID",
            ):
                # UI is at most 64 characters (PS3.5 6.2); a longer one cannot be
                # recorded, and answering 0xA700 would make the PACS retry for ever.
                if len(str(header.get(keyword) or "")) > 64:
                    raise ValueError(f"{keyword} is longer than 64 characters")
            transfer_syntax = str(header.file_meta.TransferSyntaxUID)
            size = temp.stat().st_size
        except Exception as exc:  # pydicom raises many types for malformed data
            self._count("failed")
            if local_fault(exc):
                # The file could not be read back (a disk error, a stale handle, a file
                # removed under us) or memory ran out: nothing wrong with the data set,
                # and the PACS, told 0xC210, would drop the image for good.
                logger.error(
                    "C-STORE %s from %s: the received data set could not be read back (%s): 0xA700",
                    uid_tag(command_uid),
                    calling,
                    getattr(exc, "strerror", None) or type(exc).__name__,
                )
                return OUT_OF_RESOURCES
            if (over := over_budget(exc)) is not None:
                logger.warning(
                    "C-STORE %s from %s: refused: %s: 0xC210", uid_tag(command_uid), calling, over
                )
                return CANNOT_UNDERSTAND
            if isinstance(exc, ForeignFileMeta):
                logger.warning(
                    "C-STORE %s from %s: refused: %s: 0xC210", uid_tag(command_uid), calling, exc
                )
                return CANNOT_UNDERSTAND
            logger.warning(
                "C-STORE %s from %s: cannot read the dataset (%s): 0xC210",
                uid_tag(command_uid),
                calling,
                type(exc).__name__,
            )
            return CANNOT_UNDERSTAND

        final = spool_path(self.spool_dir, sop_uid)
        received = ReceivedInstance(
            sop_instance_uid=sop_uid,
            sop_class_uid=str(header.get("SOPClassUID") or request.AffectedSOPClassUID),
            study_instance_uid=str(header.get("StudyInstanceUID") or ""),
            series_instance_uid=str(header.get("SeriesInstanceUID") or ""),
            modality=str(header.get("Modality"))[:16] if header.get("Modality") else None,
            transfer_syntax_uid=transfer_syntax,
            calling_ae_title=calling,
            path=final,
            size_bytes=size,
        )
        try:
            _fsync_file(temp)
            _make_spool_folder(final.parent)
        except OSError as exc:
            return self._not_durable(sop_uid, exc)
        # From the rename until the row is committed the file is in the spool and no row
        # names it yet: retention, which removes such files, waits (`_RecordingHold`).
        with self._recording.shared():
            try:
                os.replace(temp, final)
                fsync_directory(final.parent)
            except OSError as exc:
                return self._not_durable(sop_uid, exc)
            try:
                instance_id = self._record(received)
            except Exception as exc:  # database trouble of any kind: the PACS must retry
                self._count("failed")
                logger.error(
                    "C-STORE %s: cannot record the instance (%s): 0xA700",
                    uid_tag(sop_uid),
                    type(exc).__name__,
                )
                return OUT_OF_RESOURCES

        self._count("stored")
        logger.info("stored instance %d from %s (%d bytes)", instance_id, calling, size)
        if self._deferring and self.space_reserve.shortfall() is None:
            self._space_again()
        elapsed = time.monotonic() - started
        if elapsed > SLOW_STORE_SECONDS:
            # Past the peer's DIMSE timeout the PACS gives up and retries: worth knowing.
            logger.warning(
                "storing instance %d took %.1fs (disk or database slow)", instance_id, elapsed
            )
        try:
            self._notify(instance_id)
        except Exception:  # the row is durable; the reconciler re-enqueues it
            logger.exception("instance %d recorded but not handed on; reconciler will", instance_id)
        return SUCCESS
