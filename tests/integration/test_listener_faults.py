"""The listener against what a peer or the machine may do to it: a deflated data set that
inflates to hundreds of megabytes, a C-STORE of a class not negotiated for its context,
messages that would be held in memory without end, files removed or unreadable before
they are read back, and other listeners on the same spool. Real listeners (in this
process and in others), dcmtk's storescu and pynetdicom as peers, raw sockets for what
no honest peer sends."""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom import association as pynetdicom_association
from pynetdicom.dimse_messages import C_ECHO_RQ
from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.dsutils import encode

from dicom_io import scp as scp_module
from dicom_io.pixels import read_image
from dicom_io.scp import (
    CANNOT_UNDERSTAND,
    COMMAND_SET_LIMIT,
    HELD_DATA_SET_LIMIT,
    INCOMING_ABANDONED_SECONDS,
    INCOMING_LOCK_NAME,
    MAXIMUM_PDU_SIZE,
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    WRITEBACK_BYTES,
    local_fault,
)
from tests.integration.test_listener import write_hand, write_large_hand
from tests.integration.test_scp_limits import (
    Node,
    association_request,
    read_until_closed,
    storescu,
)
from tests.support import wait_for

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[Node]:
    """The listener in this process; timeouts long enough for a transfer held halfway
    while another listener starts."""
    made = Node(tmp_path, acse_timeout=30, network_timeout=30, dimse_timeout=30)
    made.scp.start()
    yield made
    made.scp.stop()


# -- other listener processes -------------------------------------------------------

#: A listener process on the spool ``argv[1]``: prints its port and incoming folder once
#: it listens, and, when stdin closes, how many instances it recorded.
_LISTENER = """
import sys
from pathlib import Path
from dicom_io.scp import StorageSCP
recorded = []
scp = StorageSCP(ae_title="BONEAGE", spool_dir=Path(sys.argv[1]),
                 record=lambda r: recorded.append(r) or len(recorded), notify=lambda i: None,
                 allowed_callers=[("PACS", None)], host="127.0.0.1", port=0)
scp.start()
print(scp.port, scp.incoming_dir, flush=True)
sys.stdin.read()
print(len(recorded), flush=True)
scp.stop()
"""


class ListenerProcess:
    """`_LISTENER` in a process of its own."""

    def __init__(self, spool: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _LISTENER, str(spool)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPOSITORY,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(self.stop())
        port, incoming = line.split()
        self.port, self.incoming_dir = int(port), Path(incoming)

    def memory_peak(self) -> int:
        """The process's largest resident size so far (VmHWM), in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        [line] = [x for x in status.splitlines() if x.startswith("VmHWM:")]
        return int(line.split()[1]) * 1024

    def recorded(self) -> int:
        """Close stdin; how many instances it recorded."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        return int(self.process.stdout.readline())

    def stop(self) -> str:
        """End it (if it runs); its log."""
        self.process.kill()
        self.process.wait(10)
        return self.process.stderr.read() if self.process.stderr else ""


# -- 1. deflated data sets ----------------------------------------------------------

#: Where the zero-filled element goes: a private group after Image Pixel, before Pixel Data.
_BOMB_CREATOR, _BOMB_ELEMENT = 0x00290010, 0x00291000


def write_deflated_bomb(source: Path, path: Path, zeros: int) -> Path:
    """`source` as Deflated Explicit VR Little Endian, with a private OB element of
    `zeros` zero bytes before Pixel Data: a few hundred kilobytes on disk. Deflated here
    piece by piece, so that the test never holds the inflated bytes either."""
    ds = dcmread(source)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    def encoded(part: Dataset) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, part)
        return buffer.getvalue()

    creator = b"BOMB"
    element = struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", len(creator)) + creator
    element += struct.pack("<HH2sHL", 0x0029, 0x1000, b"OB", 0, zeros)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)  # type: ignore[arg-type]
        out.write(deflate.compress(encoded(ds[:_BOMB_CREATOR]) + element))
        chunk = bytes(1 << 20)
        for start in range(0, zeros, len(chunk)):
            out.write(deflate.compress(chunk[: zeros - start]))
        out.write(deflate.compress(encoded(ds[_BOMB_ELEMENT + 1 :])))
        out.write(deflate.flush())
    return path


def test_deflated_is_not_negotiated_for_storage(node: Node) -> None:
    assert DeflatedExplicitVRLittleEndian not in TRANSFER_SYNTAXES
    ae = AE(ae_title="PACS")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", [DeflatedExplicitVRLittleEndian])
    ae.add_requested_context(
        "1.2.840.10008.5.1.4.1.1.1.1", [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian]
    )
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        [accepted] = assoc.accepted_contexts  # CR, offered deflated alone: rejected
        assert accepted.abstract_syntax == "1.2.840.10008.5.1.4.1.1.1.1"
        assert accepted.transfer_syntax == [ExplicitVRLittleEndian]
    finally:
        assoc.release()


def test_a_deflated_bomb_never_inflates_in_the_listener(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    """256 MiB of zeros, 260 KB deflated, offered by storescu as deflated: the listener,
    which inflated the whole data set in memory to read its header (and was killed for
    a larger one, and sent it again), takes it uncompressed, streamed to its spool."""
    zeros = 256 << 20
    bomb = write_deflated_bomb(write_hand(tmp_path / "hand.dcm"), tmp_path / "bomb.dcm", zeros)
    assert bomb.stat().st_size < 1 << 20
    listener = ListenerProcess(tmp_path / "spool")
    try:
        before = listener.memory_peak()
        sent = storescu(listener.port, bomb, extra=("-xd",))
        grown = listener.memory_peak() - before
        assert listener.recorded() == 1
    finally:
        log = listener.stop()
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert grown < 64 << 20, f"the listener grew by {grown >> 20} MiB"
    assert "Traceback" not in log, log
    [spooled] = [p for p in (tmp_path / "spool").rglob("*.dcm") if ".incoming" not in p.parts]
    header = dcmread(spooled, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    assert header.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert spooled.stat().st_size > zeros  # the data set whole, as sent


def _refused_in_bounded_memory(tmp_path: Path, send: Callable[[int], int]) -> str:
    """``send`` (given the port) to a listener process of its own: refused, 0xC210,
    nothing recorded, the listener grown by less than 64 MiB; its log."""
    listener = ListenerProcess(tmp_path / "spool")
    try:
        before = listener.memory_peak()
        status = send(listener.port)
        grown = listener.memory_peak() - before
        recorded = listener.recorded()
    finally:
        log = listener.stop()
    assert grown < 64 << 20, f"the listener grew by {grown >> 20} MiB"
    assert status == CANNOT_UNDERSTAND
    assert recorded == 0
    return log


def _send_with_its_own_file_meta(
    port: int, path: Path, embedded: bytes, monkeypatch: pytest.MonkeyPatch
) -> int:
    """C-STORE of `path`'s data set, on an Explicit VR Little Endian context, with the
    group 0002 elements `embedded` sent before it, inside the data set, as some senders
    do. pynetdicom would take them for the file's own and send from after them: it is
    told where the file's File Meta Information ends."""
    data = path.read_bytes()
    (group_length,) = struct.unpack_from("<L", data, 132 + 8)
    end = 132 + 12 + group_length
    wire = path.with_suffix(".wire.dcm")
    wire.write_bytes(data[:end] + embedded + data[end:])
    meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    monkeypatch.setattr(pynetdicom_association, "split_dataset", lambda _path: (meta, end))
    return _store_as_stored(port, wire, monkeypatch, meta=meta)


def _transfer_syntax_element(syntax: str) -> bytes:
    value = syntax.encode() + b"\0" * (len(syntax) % 2)
    return struct.pack("<HH2sH", 0x0002, 0x0010, b"UI", len(value)) + value


def test_a_data_set_naming_deflated_in_its_own_file_meta_is_refused_uninflated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deflated was refused in negotiation, but a (0002,0010) inside a data set sent on
    an Explicit VR context was read as the file's: 260 KB sent inflated to 256 MiB in
    the listener (a few times as much would kill it, and the PACS would send it again),
    and the syntax recorded was Deflated. Refused, 0xC210, before anything is inflated."""
    bomb = write_deflated_bomb(write_hand(tmp_path / "hand.dcm"), tmp_path / "bomb.dcm", 256 << 20)
    data = bomb.read_bytes()
    (group_length,) = struct.unpack_from("<L", data, 132 + 8)
    deflated = data[132 + 12 + group_length :]
    carrier = write_hand(tmp_path / "carrier.dcm", modality="CR")
    # the carrier's file meta, then the bomb's own meta and deflated stream as its data set
    raw = carrier.read_bytes()
    (carrier_length,) = struct.unpack_from("<L", raw, 132 + 8)
    carrier.write_bytes(raw[: 132 + 12 + carrier_length] + deflated)
    element = _transfer_syntax_element(DeflatedExplicitVRLittleEndian)
    log = _refused_in_bounded_memory(
        tmp_path, lambda port: _send_with_its_own_file_meta(port, carrier, element, monkeypatch)
    )
    assert (
        "begins with File Meta Information (group 0002) naming transfer syntax "
        f"'{DeflatedExplicitVRLittleEndian}', not {ExplicitVRLittleEndian} negotiated" in log
    ), log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("embedded", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_a_data_set_naming_the_negotiated_syntax_in_its_own_file_meta_is_stored(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded: str
) -> None:
    """Group 0002 in the data set is not allowed (PS3.7 7.5.1), but where it names the
    syntax negotiated it says nothing false, and where it names the other of Implicit
    and Explicit VR Little Endian pydicom reads the elements as they are: the image is
    taken, as before, and read back whole."""
    hand = write_hand(tmp_path / "hand.dcm", modality="CR")
    status = _send_with_its_own_file_meta(
        node.scp.port, hand, _transfer_syntax_element(embedded), monkeypatch
    )
    assert status == 0x0000
    [received] = node.recorded
    assert received.transfer_syntax_uid == embedded  # what the file says, as the worker reads
    image = read_image(received.path)
    assert image.SOPInstanceUID == dcmread(hand).SOPInstanceUID
    np.testing.assert_array_equal(image.pixel_array, dcmread(hand).pixel_array)


# -- 1b. headers of a million sequence items --------------------------------------


def _explicit_little(part: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, part)
    return buffer.getvalue()


def write_sequence_bomb(source: Path, path: Path, items: int, tag: int = 0x00081140) -> Path:
    """`source` (Explicit VR Little Endian) with a sequence of undefined length of `items`
    empty items at `tag`, 8 bytes an item: Referenced Image Sequence, before the Study
    and Series Instance UIDs, which pydicom parsed whole however ``specific_tags`` left
    it out."""
    ds = dcmread(source)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)  # type: ignore[arg-type]
        out.write(_explicit_little(ds[:tag]))
        out.write(struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF))
        out.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0) * items)
        out.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))  # Sequence Delimitation Item
        out.write(_explicit_little(ds[tag + 1 :]))
    return path


#: Computed Radiography Image Storage.
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _store_as_stored(
    port: int, path: Path, monkeypatch: pytest.MonkeyPatch, *, meta: Dataset | None = None
) -> int:
    """The status of a C-STORE of `path`'s bytes as they are (pynetdicom would decode
    and encode half a million items again first)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    if meta is None:  # (``meta``: the file's, where its data set carries group 0002 too)
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_a_header_of_half_a_million_items_is_refused_within_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 MB on the wire, half a million empty items before the Series Instance UID: read
    whole, they took the listener some 400 MiB and seconds, and a few times as many
    took its 2 GiB, answered by a kill, then the same data set again. Refused, 0xC210,
    within a budget of reads."""
    source = write_hand(tmp_path / "hand.dcm", modality="CR")
    bomb = write_sequence_bomb(source, tmp_path / "bomb.dcm", 500_000)
    log = _refused_in_bounded_memory(
        tmp_path, lambda port: _store_as_stored(port, bomb, monkeypatch)
    )
    assert "refused: its header holds more elements and sequence items than" in log, log
    assert "Traceback" not in log, log


def test_a_header_with_large_sequences_is_stored(node: Node, tmp_path: Path) -> None:
    """Well within the budget: 5000 references (items of undefined length) before the
    Series Instance UID; after it, what the listener does not read: a private sequence of
    20 000 items, an ICC profile and an overlay of a megabyte each, as sent."""
    ds = dcmread(write_hand(tmp_path / "hand.dcm", modality="CR"))
    references = [Dataset() for _ in range(5000)]
    for item in references:
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CR_IMAGE_STORAGE, "1.2.3"
        item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = references
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.ICCProfile = bytes(1 << 20)
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60003000, "OW", bytes(1 << 20))
    block = ds.private_block(0x0029, "BONEAGE TEST", create=True)
    block.add_new(0x01, "SQ", [Dataset() for _ in range(20_000)])
    path = tmp_path / "large-header.dcm"
    ds.save_as(path, enforce_file_format=True)
    sent = node.storescu(path)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [received] = node.recorded
    assert received.path.read_bytes()[-(1 << 16) :] == path.read_bytes()[-(1 << 16) :]
    assert received.series_instance_uid == ds.SeriesInstanceUID


# -- 2. local faults, other listeners on the spool ----------------------------------

#: A pynetdicom peer whose C-STORE stops after its first ``argv[3]`` P-DATA (the command's
#: and the data set's first, of a megabyte each: the listener's largest PDU): it says so,
#: waits for a line on stdin, sends the rest and prints the status it is answered.
_HALF_THEN_THE_REST = """
import sys
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.pdu_primitives import P_DATA

ds = dcmread(sys.argv[1])
ae = AE(ae_title="PACS")
ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", int(sys.argv[2]), ae_title="BONEAGE")
assert assoc.is_established
send_pdu, sent, pause_after = assoc.dul.send_pdu, [], int(sys.argv[3])

def held_halfway(primitive):
    send_pdu(primitive)
    if isinstance(primitive, P_DATA):
        sent.append(primitive)
        if len(sent) == pause_after:
            print("half sent", flush=True)
            sys.stdin.readline()

assoc.dul.send_pdu = held_halfway
status = assoc.send_c_store(ds)
print(f"0x{int(status.Status):04X}" if "Status" in status else "none", flush=True)
assoc.release()
"""


class HalfStore:
    """`_HALF_THEN_THE_REST` sending `path` (more than 2 MiB) to `port`: held after the
    command and two megabytes of the data set."""

    def __init__(self, path: Path, port: int) -> None:
        assert path.stat().st_size > 2 * MAXIMUM_PDU_SIZE + 65536
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HALF_THEN_THE_REST, str(path), str(port), "3"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "half sent\n", self.finish()

    def rest(self) -> str:
        """Send the rest; the status answered."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("go on\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def finish(self) -> str:
        self.process.kill()
        self.process.wait(10)
        return self.process.stderr.read() if self.process.stderr else ""


def partial_file(node: Node) -> Path:
    """The file the C-STORE under way streams into, once a megabyte of it is in."""
    [partial] = wait_for(
        lambda: [p for p in node.incoming() if p.stat().st_size > 1 << 20],
        timeout=30,
        what="a partial file in spool/.incoming",
    )
    return partial


def test_a_listener_starting_on_the_spool_leaves_a_transfer_under_way_alone(
    node: Node, tmp_path: Path
) -> None:
    """Another listener on the same spool (the other of a pair, ``listen`` beside
    ``serve``) removed every partial file in spool/.incoming when it started: the C-STORE
    under way then found no file and was answered 0xC210, and the PACS dropped it."""
    large = write_large_hand(tmp_path / "large.dcm")
    peer = HalfStore(large, node.scp.port)
    other: ListenerProcess | None = None
    try:
        partial = partial_file(node)
        other = ListenerProcess(node.spool)  # started: it has swept the spool
        left_alone = partial.exists()
        assert peer.rest() == "0x0000"
        assert left_alone
        assert other.incoming_dir != node.scp.incoming_dir
    finally:
        log = peer.finish()
        if other is not None:
            other.stop()
    assert len(node.recorded) == 1, log
    assert dcmread(node.recorded[0].path).PixelData == dcmread(large).PixelData


def test_a_data_set_removed_before_it_is_read_back_is_answered_out_of_resources(
    node: Node, tmp_path: Path
) -> None:
    """The partial file removed while its data set streams in (an administrator, a
    cleaner of temporary files): the read back fails with ENOENT, the machine's fault,
    not the data's. 0xA700, so that the PACS sends it again; it was 0xC210."""
    large = write_large_hand(tmp_path / "large.dcm")
    peer = HalfStore(large, node.scp.port)
    try:
        partial_file(node).unlink()
        assert peer.rest() == f"0x{OUT_OF_RESOURCES:04X}"
    finally:
        log = peer.finish()
    assert node.recorded == [], log
    again = storescu(node.scp.port, large)  # what the PACS does next
    assert again.returncode == 0, again.stderr
    assert len(node.recorded) == 1


def test_memory_exhausted_reading_a_data_set_back_is_answered_out_of_resources(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (injected: no real MemoryError can be had from reading a header of a few kB)
    def exhausted(*_args: Any, **_kwargs: Any) -> Dataset:
        raise MemoryError

    monkeypatch.setattr(scp_module, "_read_header", exhausted)
    ae = AE(ae_title="PACS")
    ds = dcmread(write_hand(tmp_path / "hand.dcm"))
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == OUT_OF_RESOURCES
    finally:
        assoc.release()
    assert node.recorded == []


def _wrapped(error: BaseException, wrapper: BaseException) -> BaseException:
    """`wrapper` as raised while `error` was handled (as pydicom does)."""
    try:
        try:
            raise error
        except BaseException:
            raise wrapper  # noqa: B904  # the implicit chain is the point
    except BaseException as raised:
        return raised


@pytest.mark.parametrize(
    ("error", "local"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), True),
        (OSError(errno.EIO, "Input/output error"), True),
        (OSError(errno.ESTALE, "Stale file handle"), True),
        (MemoryError(), True),
        (OSError("No tag to read at file position 1A2"), False),  # pydicom's, for data
        (ValueError("bad value"), False),
        (_wrapped(OSError(errno.EIO, "Input/output error"), OSError("No tag to read")), True),
        (_wrapped(struct.error("unpack requires 8 bytes"), OSError("No tag to read")), False),
    ],
    ids=["ENOENT", "EIO", "ESTALE", "memory", "pydicom", "value", "EIO-wrapped", "data-wrapped"],
)
def test_local_faults_are_told_from_faults_of_the_data(error: BaseException, local: bool) -> None:
    assert local_fault(error) is local


def test_a_listener_that_is_gone_has_its_partial_files_removed_and_no_other(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    """What a listener killed mid-transfer left is removed when a listener starts on the
    spool; a running listener's partial file is not."""
    spool = tmp_path / "spool"
    gone, running = ListenerProcess(spool), ListenerProcess(spool)
    try:
        (gone.incoming_dir / "tmpgone.dcm").write_bytes(b"\0" * 1000)
        in_flight = running.incoming_dir / "tmprunning.dcm"
        in_flight.write_bytes(b"\0" * 1000)
        gone.process.send_signal(signal.SIGKILL)
        gone.process.wait(10)

        node = Node(tmp_path, acse_timeout=30, network_timeout=30, dimse_timeout=30)
        node.scp.start()
        try:
            assert in_flight.exists()
            assert not gone.incoming_dir.exists()
            assert node.scp.sweep_incoming() == 0  # its sweeps too
            assert in_flight.exists()
        finally:
            node.scp.stop()
    finally:
        gone.stop()
        running.stop()


def test_another_hosts_folder_goes_only_unlocked_and_a_day_old(node: Node) -> None:
    """A network file system may keep each host's locks to itself: another host's
    folder, its lock free, is removed only once no sweep of its listener touched it
    for a day."""
    other = node.scp.incoming_root / "elsewhere-1234-0a0b0c0d"
    other.mkdir()
    (other / INCOMING_LOCK_NAME).touch()
    (other / "tmpelsewhere.dcm").write_bytes(b"\0" * 1000)
    assert node.scp.sweep_incoming() == 0
    assert other.exists()
    old = time.time() - INCOMING_ABANDONED_SECONDS - 60
    os.utime(other, (old, old))
    assert node.scp.sweep_incoming() == 1
    assert not other.exists()


def test_a_listeners_own_folder_is_removed_when_it_stops(tmp_path: Path) -> None:
    node = Node(tmp_path, acse_timeout=30, network_timeout=30, dimse_timeout=30)
    node.scp.start()
    own = node.scp.incoming_dir
    assert own.parent == node.spool / ".incoming" and own.is_dir()
    node.scp.stop()
    assert not own.exists()


# -- 3. the SOP class of a C-STORE --------------------------------------------------


def encapsulated_pdf() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = EncapsulatedPDFStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.MIMETypeOfEncapsulatedDocument = "DOC", "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%%EOF\n"
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_a_c_store_of_a_class_not_negotiated_on_its_context_is_refused(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pynetdicom serves a C-STORE by the class its request names, whatever context it
    came on: an encapsulated PDF sent on the context negotiated for CR was stored,
    recorded and queued."""
    cr = dcmread(write_hand(tmp_path / "hand.dcm", modality="CR"))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(cr.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="BONEAGE")
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        # the peer's own check of its context, bypassed
        monkeypatch.setattr(assoc, "_get_valid_context", lambda *_a, **_k: context)
        assert int(assoc.send_c_store(encapsulated_pdf()).Status) == SOP_CLASS_NOT_SUPPORTED
        assert int(assoc.send_c_store(cr).Status) == 0  # the association carries on
    finally:
        assoc.release()
    [stored] = node.recorded
    assert stored.sop_class_uid == cr.SOPClassUID
    spooled = [p for p in node.spool.rglob("*.dcm") if ".incoming" not in p.parts]
    assert spooled == [stored.path]
    assert node.incoming() == []


# -- 4. messages held in memory -----------------------------------------------------


def p_data(control: int, payload: bytes, context_id: int = 1) -> bytes:
    """A P-DATA-TF PDU of one fragment (PS3.8 9.3.5, E.2)."""
    item = struct.pack(">LBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def echo_command_with_a_data_set() -> bytes:
    """A C-ECHO-RQ command set that says a data set follows."""
    request = C_ECHO()
    request.MessageID, request.AffectedSOPClassUID = 1, VERIFICATION_SOP_CLASS
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    message.command_set.CommandDataSetType = 0x0001  # (same length: the group length holds)
    encoded = encode(message.command_set, True, True)
    assert encoded is not None
    return encoded


def abort_after(node: Node, pdus: Callable[[], Iterator[bytes]]) -> bytes:
    """Associate (Verification) over a raw socket, send `pdus`, and return what the
    listener sends until it closes the connection."""
    with node.connect() as sock:
        sock.sendall(association_request())
        accept = sock.recv(6)
        assert accept[:1] == b"\x02"  # A-ASSOCIATE-AC
        sock.recv(struct.unpack(">L", accept[2:6])[0], socket.MSG_WAITALL)
        for pdu in pdus():
            sock.sendall(pdu)
        sock.settimeout(10)
        try:
            return read_until_closed(sock)
        except TimeoutError:
            return b"(nothing: the association still stands)"


#: A-ABORT from the service provider, no reason given.
A_ABORT = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x00])


def test_a_command_set_that_never_ends_is_aborted(node: Node, tmp_path: Path) -> None:
    """Fragments of a command, none the last: held in memory until the last one, which
    never comes. The listener aborts once the command passes its bound, after the PDU
    that took it there: no more than one PDU past it is ever held."""
    fragment = bytes(60 * 1024)

    def pdus() -> Iterator[bytes]:
        for _ in range(COMMAND_SET_LIMIT // len(fragment) + 1):
            yield p_data(0x01, fragment)  # command, not the last fragment

    assert abort_after(node, pdus) == A_ABORT
    server = node.scp._server
    assert server is not None
    wait_for(lambda: not server.active_associations, timeout=10, what="the association to end")
    done = node.storescu(write_hand(tmp_path / "hand.dcm"))
    assert done.returncode == 0, done.stderr
    assert len(node.recorded) == 1


def test_a_c_echo_with_a_data_set_past_the_bound_is_aborted(node: Node) -> None:
    fragment = bytes(512 * 1024)

    def pdus() -> Iterator[bytes]:
        yield p_data(0x03, echo_command_with_a_data_set())  # command, the last fragment
        for _ in range(HELD_DATA_SET_LIMIT // len(fragment) + 1):
            yield p_data(0x00, fragment)  # data set, not the last fragment

    assert abort_after(node, pdus) == A_ABORT
    assert node.incoming() == []


def test_a_c_echo_with_a_small_data_set_is_still_answered(node: Node) -> None:
    """Below the bounds nothing changes: pynetdicom answers it and drops the data set."""

    def pdus() -> Iterator[bytes]:
        yield p_data(0x03, echo_command_with_a_data_set())
        yield p_data(0x02, bytes(1024))  # data set, the last fragment

    with node.connect() as sock:
        sock.sendall(association_request())
        accept = sock.recv(6)
        sock.recv(struct.unpack(">L", accept[2:6])[0], socket.MSG_WAITALL)
        for pdu in pdus():
            sock.sendall(pdu)
        sock.settimeout(10)
        answer = sock.recv(6, socket.MSG_WAITALL)
    assert answer[:1] == b"\x04"  # a P-DATA-TF: the C-ECHO-RSP


# -- the free space kept for the results of the images taken ------------------------


def _reserve_past_what_is_free(spool: Path) -> int:
    """A reserve a terabyte more than the spool's file system has free now."""
    usage = os.statvfs(spool)
    return usage.f_bavail * usage.f_frsize + (1 << 40)


def _node_with_reserve(tmp_path: Path, reserve_bytes: int) -> Node:
    """The listener in this process, keeping ``reserve_bytes`` free, started."""
    node = Node(
        tmp_path, acse_timeout=30, network_timeout=30, dimse_timeout=30, reserve_bytes=reserve_bytes
    )
    node.scp.start()
    return node


def test_images_are_refused_while_less_than_the_reserve_is_free(
    tmp_path: Path,
    dcmtk: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Asked once the command has come, before a byte of the data set: answered 0xA700
    and nothing of it stays, counted `deferred`, and said once, not once per C-STORE (a
    PACS sends its queue again every few seconds). Once enough is free again (here: the
    reserve lowered, a real file system cannot be filled in a test) the PACS's resend is
    stored, and the log says so."""
    (tmp_path / "spool").mkdir()
    node = _node_with_reserve(tmp_path, _reserve_past_what_is_free(tmp_path / "spool"))
    try:
        hand = write_hand(tmp_path / "hand.dcm")
        assert hand.stat().st_size < MAXIMUM_PDU_SIZE // 2  # one fragment
        for _ in range(3):
            assert _store_as_stored(node.scp.port, hand, monkeypatch) == OUT_OF_RESOURCES
        assert node.recorded == []
        assert node.incoming() == []
        assert not list(node.spool.glob("*/*.dcm"))
        assert (node.scp.counters["deferred"], node.scp.counters["failed"]) == (3, 0)
        [line] = [r.getMessage() for r in caplog.records if "answered 0xA700" in r.getMessage()]
        assert line.startswith("1 C-STORE(s) answered 0xA700, nothing of them kept: ")
        assert "MiB free on the spool's file system, less than the" in line

        node.scp.space_reserve.reserve_bytes = 1 << 20  # space freed
        again = node.storescu(hand)
        assert again.returncode == 0, again.stderr
        assert len(node.recorded) == 1
        assert "enough space again: C-STOREs are taken again" in caplog.text
    finally:
        node.scp.stop()


def test_a_large_image_is_refused_before_a_byte_of_it_is_written(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    """While the transfer is held after two megabytes of its data set, the listener
    keeps no file of it (it would hold over a megabyte: see `partial_file`); the rest
    is read and discarded, the answer 0xA700, and the association carries on."""
    (tmp_path / "spool").mkdir()
    node = _node_with_reserve(tmp_path, _reserve_past_what_is_free(tmp_path / "spool"))
    large = write_large_hand(tmp_path / "large.dcm")
    peer = HalfStore(large, node.scp.port)
    try:

        def refused_at_a_fragment() -> bool:
            server = node.scp._server
            assert server is not None
            for assoc in server.active_associations:
                message = assoc.dimse.message
                spool_file = getattr(message, "_data_set_file", None)
                if isinstance(spool_file, scp_module._SpoolFile):
                    return isinstance(spool_file.error, scp_module.ReserveReached)
            return False

        wait_for(refused_at_a_fragment, timeout=30, what="the data set refused at a fragment")
        assert node.incoming() == []
        assert peer.rest() == f"0x{OUT_OF_RESOURCES:04X}"
    finally:
        log = peer.finish()
        node.scp.stop()
    assert node.recorded == [], log
    assert node.incoming() == []


def test_a_transfer_under_way_stops_within_a_megabyte_once_the_space_is_gone(
    tmp_path: Path, dcmtk: dict[str, str]
) -> None:
    """Taken while enough was free, held after two megabytes; the space goes meanwhile
    (others' writes: here the reserve raised past what is free). The rest stops being
    written at the next megabyte, and the C-STORE is answered 0xA700 with nothing kept.
    Before, a transfer under way wrote to its end, however large, whatever was left."""
    (tmp_path / "spool").mkdir()
    node = _node_with_reserve(tmp_path, 1 << 20)
    large = write_large_hand(tmp_path / "large.dcm", rows=2000, columns=2000)  # 8 MB
    peer = HalfStore(large, node.scp.port)
    try:
        partial = partial_file(node)
        node.scp.space_reserve.reserve_bytes = _reserve_past_what_is_free(tmp_path / "spool")
        written_before = _bytes_written()
        assert peer.rest() == f"0x{OUT_OF_RESOURCES:04X}"
        written = _bytes_written() - written_before
        assert not partial.exists()
    finally:
        log = peer.finish()
        node.scp.stop()
    assert node.recorded == [], log
    assert node.scp.counters["deferred"] == 1
    assert node.incoming() == []
    # of the 6 MB left to come: a megabyte at most (and the log's lines), not all of it
    assert written < 2 * WRITEBACK_BYTES, f"{written} bytes written after the space went"


def _bytes_written() -> int:
    """Bytes this process (the listener's threads among its own) has written so far."""
    io = Path("/proc/self/io").read_text()
    [line] = [x for x in io.splitlines() if x.startswith("wchar:")]
    return int(line.split()[1])


def test_a_transfer_is_not_refused_for_its_own_size(tmp_path: Path, dcmtk: dict[str, str]) -> None:
    """Free space just over the reserve when it comes: what it writes itself does not
    count against it (refused for its own size, it would be sent and refused for ever)."""
    (tmp_path / "spool").mkdir()
    large = write_large_hand(tmp_path / "large.dcm", rows=2000, columns=2000)
    usage = os.statvfs(tmp_path / "spool")
    free = usage.f_bavail * usage.f_frsize
    # less than the image is left over above the reserve
    node = _node_with_reserve(tmp_path, free - large.stat().st_size * 3 // 4)
    try:
        stored = node.storescu(large)
        assert stored.returncode == 0, stored.stderr
        assert len(node.recorded) == 1
        assert node.scp.counters["deferred"] == 0
    finally:
        node.scp.stop()


def test_the_reserve_is_a_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from worker.listener import Listener
    from worker.settings import load_settings

    assert load_settings(data_dir=tmp_path).min_free_mb == 1024
    monkeypatch.setenv("BONEAGE_MIN_FREE_MB", "5")
    settings = load_settings(data_dir=tmp_path)
    reserve = Listener(settings).scp.space_reserve
    assert (reserve.directory, reserve.reserve_bytes) == (settings.spool_dir, 5 << 20)
    monkeypatch.setenv("BONEAGE_MIN_FREE_MB", "-1")
    with pytest.raises(ValidationError, match="min_free_mb"):
        load_settings(data_dir=tmp_path)
    readme = (REPOSITORY / "README.md").read_text()
    assert "| `BONEAGE_MIN_FREE_MB` |" in readme


def test_a_data_sets_own_bytes_are_let_through_up_to_half_the_reserve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The file system's answer fixed (a real one cannot be filled in a test): a data set
    is not refused for its own bytes, but a data set of gigabytes, alone, takes no more
    than half the reserve (it took the disk to its last byte)."""
    mib = 1 << 20
    free = [0]

    def statvfs(_path: object) -> os.statvfs_result:
        blocks = free[0] // 4096
        return os.statvfs_result((4096, 4096, 10 * blocks, blocks, blocks, 0, 0, 0, 0, 255))

    monkeypatch.setattr(scp_module.os, "statvfs", statvfs)
    reserve = scp_module.SpaceReserve(Path("/spool"), 1000 * mib)
    free[0] = 900 * mib
    assert reserve.shortfall() is not None  # a new one: refused
    assert reserve.shortfall(own_bytes=100 * mib) is None  # its own 100 MiB took it there
    free[0] = 400 * mib
    assert reserve.shortfall(own_bytes=600 * mib) is not None  # 500 MiB past half the reserve
    free[0] = 500 * mib
    assert reserve.shortfall(own_bytes=600 * mib) is None  # at half: let through
