"""The listener against what a peer or the machine may do to it: a deflated data set that
inflates to hundreds of megabytes, a C-STORE of a class not negotiated for its context,
messages that would be held in memory without end, files removed or unreadable before
they are read back, and other listeners on the same spool. Real listeners (in this
process and in others), dcmtk's storescu and pynetdicom as peers, raw sockets for what
no honest peer sends."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)
from pynetdicom import AE

from dicom_io.scp import (
    TRANSFER_SYNTAXES,
)
from tests.integration.test_listener import write_hand
from tests.integration.test_scp_limits import (
    Node,
    storescu,
)

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
