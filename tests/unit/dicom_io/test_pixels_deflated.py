"""read_image on Deflated Explicit VR Little Endian files, which a user gives by hand
(``boneage-worker predict FILE``, ``evaluate``): inflated a piece at a time, within a
limit, so a deflate bomb of a few hundred kilobytes is refused before it is held in
memory; a deflated hand reads as pydicom reads it."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_io import pixels
from dicom_io.pixels import decode_as_assessed, decode_for_display, read_image
from dicom_io.synthetic import make_radiograph_dataset

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

#: The bomb's zero bytes: four times the limit, 260 KB deflated.
BOMB_ZEROS = 256 << 20
#: Where the zeros go: a private element after Image Pixel, before Pixel Data.
_CREATOR, _ELEMENT = 0x00290010, 0x00291000


def _hand() -> Dataset:
    ds = make_radiograph_dataset(
        hand_like(256, 192), birth_date=BIRTH_DATE, study_date=STUDY_DATE, sex="F"
    )
    ds["PixelData"].VR = "OW"  # 16 bits: encoded alone, as the bomb's last piece
    return ds


def _encoded(part: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, part)
    return buffer.getvalue()


def _data_set_pieces(ds: Dataset, zeros: int) -> Iterator[bytes]:
    """``ds`` encoded Explicit VR Little Endian, with a private OB element of ``zeros``
    zero bytes before Pixel Data, a megabyte at a time."""
    yield _encoded(ds[:_CREATOR])
    creator = b"BOMB"
    yield struct.pack("<HH2sH", 0x0029, 0x0010, b"LO", len(creator)) + creator
    yield struct.pack("<HH2sHL", 0x0029, 0x1000, b"OB", 0, zeros)
    chunk = bytes(1 << 20)
    for start in range(0, zeros, len(chunk)):
        yield chunk[: zeros - start]
    yield _encoded(ds[_ELEMENT + 1 :])


def write_deflated(ds: Dataset, path: Path, zeros: int = 0) -> Path:
    """``ds`` as a Deflated Explicit VR Little Endian file, ``zeros`` zero bytes added
    (above): deflated a piece at a time, so that the test never holds them inflated."""
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)  # type: ignore[arg-type]
        pieces = _data_set_pieces(ds, zeros) if zeros else iter([_encoded(ds)])
        for piece in pieces:
            out.write(deflate.compress(piece))
        out.write(deflate.flush())
    return path


def _deflated_part(path: Path) -> bytes:
    """The file's bytes after its File Meta Information."""
    data = path.read_bytes()
    meta_length = struct.unpack("<L", data[140:144])[0]  # (0002,0000) after DICM
    return data[144 + meta_length :]


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_deflated(_hand(), tmp_path_factory.mktemp("bomb") / "bomb.dcm", BOMB_ZEROS)
    assert path.stat().st_size < 512 << 10  # a few hundred kilobytes on disk
    return path


def test_a_deflate_bomb_is_refused_naming_the_file_and_the_limit(bomb: Path) -> None:
    """Not a MemoryError, nor the bomb inflated whole (as pydicom inflates it)."""
    with pytest.raises(ValueError, match="inflates past 64 MiB") as refused:
        read_image(bomb)
    assert type(refused.value).__name__ == "InflatedTooLargeError"
    assert str(bomb) in str(refused.value)


#: Reads the file argv[1] and prints by how much the process's peak memory grew, in
#: bytes, and what the read raised ("nothing" for nothing). In a process of its own: its
#: peak is its alone, C allocations (zlib's) included. Its memory's high-water mark
#: (VmHWM), not getrusage's ru_maxrss: that one keeps the parent's (pytest's, perhaps
#: large) across fork and exec.
_PEAK_OF_READING = r"""
import re, sys
from dicom_io.pixels import read_image

def peak():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024

before = peak()
try:
    read_image(sys.argv[1])
    raised = "nothing"
except Exception as exc:
    raised = type(exc).__name__
print(peak() - before, raised)
"""


def peak_of_reading(path: Path, *, timeout: float) -> tuple[int, str]:
    """By how much reading ``path`` with `read_image` grew a process's peak memory, in
    bytes, and the name of what the read raised ("nothing" for nothing)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_READING, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[3],
        timeout=timeout,
    )
    grown, raised = done.stdout.split()
    return int(grown), raised


def test_a_deflate_bomb_takes_no_more_memory_than_the_limit(bomb: Path) -> None:
    """The limit and a piece inflated: a quarter of the bomb, however large a bomb is."""
    grown, raised = peak_of_reading(bomb, timeout=120)
    assert grown < (64 + 16) << 20, f"reading the bomb took {grown >> 20} MiB"
    assert raised == "InflatedTooLargeError"


def test_the_limit_is_a_hand_radiographs_size() -> None:
    """A 43 x 43 cm detector at 100 um, 16 bits, fits; a bomb of four times it does not."""
    assert 4300 * 4300 * 2 < pixels.MAX_INFLATED_BYTES < BOMB_ZEROS


def test_a_deflated_hand_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    path = write_deflated(_hand(), tmp_path / "hand.dcm")
    plain = tmp_path / "plain.dcm"
    _hand().save_as(plain, enforce_file_format=True)
    assert path.stat().st_size < plain.stat().st_size  # deflated indeed

    ours, theirs = read_image(path), dcmread(path)
    assert ours == theirs  # every element, pixel data included
    assert ours.file_meta == theirs.file_meta
    assert ours.preamble == theirs.preamble
    assert ours.original_encoding == theirs.original_encoding == (False, True)
    assert ours.filename == theirs.filename == str(path)
    image = decode_for_display(ours)
    np.testing.assert_array_equal(image, decode_for_display(dcmread(plain)))
    np.testing.assert_array_equal(
        decode_as_assessed(ours, input_size=128, sc_min_long_side=256),
        decode_as_assessed(read_image(plain), input_size=128, sc_min_long_side=256),
    )
    # written back as it came
    again = tmp_path / "again.dcm"
    ours.save_as(again, enforce_file_format=True)
    assert dcmread(again) == theirs
    assert dcmread(again).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian


def test_a_data_set_of_the_limit_exactly_is_read_and_one_byte_more_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_deflated(_hand(), tmp_path / "hand.dcm", zeros=3 << 20)
    size = len(zlib.decompress(_deflated_part(path), -zlib.MAX_WBITS))
    monkeypatch.setattr(pixels, "MAX_INFLATED_BYTES", size)
    assert read_image(path) == dcmread(path)
    monkeypatch.setattr(pixels, "MAX_INFLATED_BYTES", size - 1)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        read_image(path)


def test_a_deflated_data_set_cut_short_is_refused_as_pydicom_refuses_it(tmp_path: Path) -> None:
    """Never read as the elements inflated before the cut: the image would be another."""
    path = write_deflated(_hand(), tmp_path / "hand.dcm")
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(zlib.error):
        dcmread(path)
    with pytest.raises(zlib.error, match="cut short"):
        read_image(path)


def test_an_uncompressed_file_is_read_as_before(tmp_path: Path) -> None:
    """The file meta read first to tell a deflated file leaves the others to dcmread."""
    plain = tmp_path / "plain.dcm"
    ds = _hand()
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    ds.save_as(plain, enforce_file_format=True)
    assert read_image(plain) == dcmread(plain)
    not_dicom = tmp_path / "not.dcm"
    not_dicom.write_bytes(b"not a DICOM file" * 20)
    with pytest.raises(Exception, match="DICM") as ours:
        read_image(not_dicom)
    with pytest.raises(Exception, match="DICM") as theirs:
        dcmread(not_dicom)
    assert str(ours.value) == str(theirs.value)
