"""read_image reads a data set besides its pixel data within a budget of reads and bytes
(dicom_io.budget): a header of a million empty sequence items, 8 MB that pydicom parsed
whole into 700 MiB, is refused as damaged, naming the file, in bounded memory; headers
with large sequences, an ICC profile and an overlay, and pixel data of any size, read as
pydicom reads them."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless

from dicom_io import pixels
from dicom_io.pixels import HeaderTooLargeError, decode_for_display, read_image
from dicom_io.scp import local_fault
from dicom_io.synthetic import make_radiograph_dataset

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like
from .test_pixels_deflated import peak_of_reading

#: Request Attributes Sequence: after the header the listener reads, before Pixel Data.
_REQUEST_ATTRIBUTES = 0x00400275


def _hand() -> Dataset:
    ds = make_radiograph_dataset(
        hand_like(256, 192), birth_date=BIRTH_DATE, study_date=STUDY_DATE, sex="F"
    )
    ds["PixelData"].VR = "OW"  # 16 bits: encoded apart from the rest
    return ds


def _encoded(part: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, part)
    return buffer.getvalue()


def with_items(ds: Dataset, items: int, tag: int = _REQUEST_ATTRIBUTES) -> bytes:
    """``ds``'s data set, Explicit VR Little Endian, with a sequence of undefined length
    of ``items`` empty items at ``tag``: 8 bytes an item."""
    return (
        _encoded(ds[:tag])
        + struct.pack("<HH2sHL", tag >> 16, tag & 0xFFFF, b"SQ", 0, 0xFFFFFFFF)
        + struct.pack("<HHL", 0xFFFE, 0xE000, 0) * items
        + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
        + _encoded(ds[tag + 1 :])
    )


def _write(ds: Dataset, data_set: bytes, path: Path) -> Path:
    with path.open("wb") as out:
        out.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(out, ds.file_meta)  # type: ignore[arg-type]
        out.write(data_set)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reviewer's: a million empty items, 8 MB."""
    ds = _hand()
    return _write(ds, with_items(ds, 1_000_000), tmp_path_factory.mktemp("bomb") / "bomb.dcm")


def test_a_million_items_are_refused_as_damaged_naming_the_file(bomb: Path) -> None:
    with pytest.raises(HeaderTooLargeError, match="more elements and sequence items") as refused:
        read_image(bomb)
    assert str(bomb) in str(refused.value)
    assert isinstance(refused.value, ValueError)
    assert not local_fault(refused.value)  # the data's fault: not retried as the machine's


def test_a_million_items_take_bounded_memory(bomb: Path) -> None:
    """pydicom alone took some 700 MiB for them, and ten times the bomb ten times that."""
    grown, raised = peak_of_reading(bomb, timeout=300)  # its own process, as there
    assert grown < 128 << 20, f"reading the bomb took {grown >> 20} MiB"
    assert raised == "HeaderTooLargeError"


def test_a_deflated_data_set_of_a_million_items_is_refused(tmp_path: Path) -> None:
    """8 MB inflated, within MAX_INFLATED_BYTES: the budget refuses it all the same."""
    ds = _hand()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflate.compress(with_items(ds, 1_000_000)) + deflate.flush()
    path = _write(ds, deflated, tmp_path / "bomb.dcm")
    with pytest.raises(HeaderTooLargeError, match=re.escape(str(path))):
        read_image(path)


def test_bytes_besides_pixel_data_past_the_budget_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Values of at most DEFERRED_BYTES each are read: many of them are counted."""
    monkeypatch.setattr(pixels, "MAX_HEADER_BYTES", 2 << 20)
    ds = _hand()
    block = ds.private_block(0x0029, "BONEAGE TEST", create=True)
    for element in range(3):
        block.add_new(element, "OB", bytes(900 << 10))
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(HeaderTooLargeError, match="more than 2 MiB besides its pixel data"):
        read_image(path)


def test_pixel_data_is_left_out_of_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Encapsulated pixel data, of undefined length, is read through to its end: 3 MiB of
    it, past a budget of 1 MiB and 1000 reads, and the elements after it are counted."""
    monkeypatch.setattr(pixels, "MAX_HEADER_BYTES", 1 << 20)
    monkeypatch.setattr(pixels, "MAX_HEADER_READS", 1000)
    ds = _hand()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([bytes(3 << 20)])
    ds["PixelData"].is_undefined_length = True
    path = tmp_path / "encapsulated.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert read_image(path) == dcmread(path)

    after = tmp_path / "after.dcm"  # elements after Pixel Data: counted again
    with after.open("wb") as out:
        out.write(path.read_bytes())
        out.write(struct.pack("<HH2sHL", 0xFFFA, 0xFFFA, b"SQ", 0, 0xFFFFFFFF))
        out.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0) * 2000)
        out.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    with pytest.raises(HeaderTooLargeError):
        read_image(after)


def test_large_sequences_an_icc_profile_and_an_overlay_read_as_pydicom_reads_them(
    tmp_path: Path,
) -> None:
    """At the defaults: 5000 references (items of undefined length), a private sequence
    of 20 000 items, an ICC profile and an overlay of a megabyte each."""
    ds = _hand()
    references = [Dataset() for _ in range(5000)]
    for item in references:
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, "1.2.3"
        item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = references
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.ICCProfile = bytes(1 << 20)
    ds.add_new(0x60000010, "US", ds.Rows)
    ds.add_new(0x60000011, "US", ds.Columns)
    ds.add_new(0x60003000, "OW", bytes(900 << 10))  # read: under DEFERRED_BYTES
    block = ds.private_block(0x0029, "BONEAGE TEST", create=True)
    block.add_new(0x01, "SQ", [Dataset() for _ in range(20_000)])
    path = tmp_path / "large-header.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    ours, theirs = read_image(path), dcmread(path)
    assert ours == theirs
    # as dcmread leaves a file it opened: dicom_io.sr reads it again from its file
    assert (ours.filename, ours.buffer) == (str(path), None)
    np.testing.assert_array_equal(decode_for_display(ours), decode_for_display(theirs))
