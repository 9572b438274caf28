"""A compressed frame whose own header says more samples than the data set's: refused
before any decoder allocates them.

A constant image compresses to next to nothing, so a file of a few kilobytes can hold a
frame of gigabytes under a header that says 256 x 256. The frames here are real
codestreams (imagecodecs' encoders), larger than their data set says; the decode is
measured with tracemalloc, which sees numpy's allocations, the decoders' results among
them.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DigitalXRayImageStorageForPresentation,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLSLossless,
    generate_uid,
)

from dicom_io.pixels import PixelDataError, decode_for_display, decode_frame

imagecodecs = pytest.importorskip("imagecodecs")

#: The frame's side, and the side the data set says.
SIDE, SAID = 2048, 256

_ENCODERS: dict[str, tuple[UID, int, Callable[[np.ndarray], bytes]]] = {
    "JPEG 2000": (
        JPEG2000Lossless,
        1,
        lambda a: imagecodecs.jpeg2k_encode(a, level=0, codecformat="J2K", reversible=True),
    ),
    "JPEG-LS": (JPEGLSLossless, 1, lambda a: imagecodecs.jpegls_encode(a, level=0)),
    "lossless JPEG": (JPEGLossless, 1, lambda a: imagecodecs.ljpeg_encode(a, bitspersample=8)),
    # colour: pydicom's decoders, not ours
    "JPEG baseline, colour": (JPEGBaseline8Bit, 3, lambda a: imagecodecs.jpeg8_encode(a)),
}


def _dataset(syntax: UID, samples: int, codestream: bytes, rows: int, columns: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "YBR_FULL_422"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return ds


def _frame(name: str, side: int) -> tuple[UID, int, bytes]:
    syntax, samples, encode = _ENCODERS[name]
    shape = (side, side, samples) if samples > 1 else (side, side)
    return syntax, samples, bytes(encode(np.full(shape, 100, np.uint8)))


@pytest.mark.parametrize("name", sorted(_ENCODERS))
def test_a_frame_larger_than_its_header_is_refused_undecoded(name: str) -> None:
    syntax, samples, codestream = _frame(name, SIDE)
    assert len(codestream) < SIDE * SIDE // 4  # a constant image: some bits a pixel
    ds = _dataset(syntax, samples, codestream, SAID, SAID)
    tracemalloc.start()
    try:
        with pytest.raises(PixelDataError) as refused:
            decode_frame(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f"frame holds {SIDE} x {SIDE} x {samples} samples, more than Rows" in str(refused.value)
    assert f"({SAID} x {SAID} x {samples}); not decoded" in str(refused.value)
    assert peak < SIDE * SIDE, f"{peak} bytes: the frame was decoded"


@pytest.mark.parametrize("name", sorted(_ENCODERS))
def test_a_frame_of_its_headers_size_is_decoded(name: str) -> None:
    syntax, samples, codestream = _frame(name, SAID)
    image = decode_for_display(_dataset(syntax, samples, codestream, SAID, SAID))
    assert image.shape == (SAID, SAID)


@pytest.mark.parametrize("name", ["JPEG 2000", "JPEG-LS", "lossless JPEG"])
def test_a_frame_smaller_than_its_header_is_still_left_to_the_decoders(name: str) -> None:
    """What was so before: such a frame allocates no more than the header says, and
    pydicom's decoder decodes it or says why it cannot."""
    syntax, samples, codestream = _frame(name, SAID)
    ds = _dataset(syntax, samples, codestream, SAID + 8, SAID)
    with pytest.raises(PixelDataError) as refused:
        decode_frame(ds)
    assert "not decoded" not in str(refused.value)


def _decoded_within(limit: int, decode: Callable[[], object]) -> object:
    """``decode()``'s result or PixelDataError, with numpy's peak under ``limit`` bytes."""
    tracemalloc.start()
    try:
        try:
            result: object = decode()
        except PixelDataError as exc:
            result = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"{peak} bytes: a frame was decoded"
    return result


def test_a_frame_past_number_of_frames_is_not_decoded() -> None:
    """Behind a frame of the header's size, one of 2048 x 2048 the offset table lists:
    pydicom decoded every frame the pixel data holds before it compared their length."""
    _, _, small = _frame("JPEG baseline, colour", SAID)
    _, _, large = _frame("JPEG baseline, colour", SIDE)
    ds = _dataset(JPEGBaseline8Bit, 3, small, SAID, SAID)
    ds.PixelData = encapsulate([small, large], has_bot=True)
    image = _decoded_within(SIDE * SIDE, lambda: decode_frame(ds))
    assert isinstance(image, np.ndarray) and image.shape == (SAID, SAID, 3)


def _jp2(side: int, before_codestream: bytes = b"") -> bytes:
    """A JP2 file of a constant ``side`` x ``side`` image, ``before_codestream`` boxes
    put before its codestream box."""
    jp2 = bytes(
        imagecodecs.jpeg2k_encode(
            np.full((side, side), 100, np.uint8), level=0, codecformat="JP2", reversible=True
        )
    )
    at = jp2.index(b"jp2c") - 4
    return jp2[:at] + before_codestream + jp2[at:]


def test_a_jp2_file_is_read_to_its_codestream_box() -> None:
    """A JP2 wrapper (some modalities write one; pydicom's decoder takes it), a 5 kB box
    before its codestream: its size is read where the decoder reads it, not missed."""
    xml = b"<x>" + b" " * 5000 + b"</x>"
    box = (8 + len(xml)).to_bytes(4, "big") + b"xml " + xml
    ds = _dataset(JPEG2000Lossless, 1, _jp2(SIDE, box), SAID, SAID)
    refused = _decoded_within(SIDE * SIDE, lambda: decode_frame(ds))
    assert isinstance(refused, PixelDataError)
    assert f"frame holds {SIDE} x {SIDE} x 1 samples" in str(refused)
    image = decode_for_display(_dataset(JPEG2000Lossless, 1, _jp2(SAID, box), SAID, SAID))
    assert image.shape == (SAID, SAID)


def test_a_jpeg_2000_frame_that_is_no_codestream_is_not_decoded() -> None:
    _, _, codestream = _frame("JPEG 2000", SAID)
    ds = _dataset(JPEG2000Lossless, 1, bytes(64) + codestream, SAID, SAID)
    refused = _decoded_within(SAID * SAID, lambda: decode_frame(ds))
    assert isinstance(refused, PixelDataError)
    assert "neither a JPEG 2000 codestream (SOC and SIZ at its start) nor a JP2" in str(refused)


def test_a_jpeg_frame_header_past_64_kib_of_segments_is_read() -> None:
    """Application segments (an ICC profile, say) of 128 kB before the frame header."""
    _, _, stream = _frame("JPEG baseline, colour", SIDE)
    app15 = b"\xff\xef" + (65535).to_bytes(2, "big") + bytes(65533)
    stream = stream[:2] + app15 + app15 + stream[2:]
    ds = _dataset(JPEGBaseline8Bit, 3, stream, SAID, SAID)
    refused = _decoded_within(SIDE * SIDE, lambda: decode_frame(ds))
    assert isinstance(refused, PixelDataError)
    assert f"frame holds {SIDE} x {SIDE} x 3 samples" in str(refused)


def test_a_frame_whose_header_leaves_its_size_for_later_is_not_decoded() -> None:
    """0 rows in SOFn: the height a DNL marker (JPEG) or an LSE segment (JPEG-LS) gives
    after, which no check before decoding can read."""
    _, _, stream = _frame("lossless JPEG", SAID)
    sof = stream.index(b"\xff\xc3")
    stream = stream[: sof + 5] + bytes(2) + stream[sof + 7 :]
    ds = _dataset(JPEGLossless, 1, stream, SAID, SAID)
    refused = _decoded_within(SAID * SAID, lambda: decode_frame(ds))
    assert isinstance(refused, PixelDataError)
    assert f"header says 0 x {SAID} samples, its size left to a later segment" in str(refused)


def test_an_image_of_more_pixels_than_the_gate_takes_is_not_decoded() -> None:
    """Whoever decodes (a copy received again compared, training on a folder): the
    gate's bound holds in the decoder too."""
    _, _, codestream = _frame("JPEG 2000", SAID)
    ds = _dataset(JPEG2000Lossless, 1, codestream, 9000, 9000)
    refused = _decoded_within(SAID * SAID, lambda: decode_frame(ds))
    assert isinstance(refused, PixelDataError)
    assert "The image is 9000x9000 pixels, more than 67 million; not decoded." in str(refused)


def test_a_jpeg_frame_with_no_scan_is_not_decoded() -> None:
    """A frame header of the data set's size and no scan after it: pylibjpeg-libjpeg
    made an image up for it, and it was assessed."""
    sof = b"\xff\xc3\x00\x0b\x08" + SAID.to_bytes(2, "big") + SAID.to_bytes(2, "big")
    sof += b"\x01\x01\x11\x00"
    ds = _dataset(JPEGLossless, 1, b"\xff\xd8" + sof + b"\xff\xd9", SAID, SAID)
    with pytest.raises(PixelDataError, match=r"no frame header \(SOFn\) and scan \(SOS\)"):
        decode_frame(ds)


def test_a_stray_byte_between_segments_is_passed_over_as_the_decoders_do() -> None:
    """An encoder that leaves a byte between two marker segments: libjpeg passes over it
    (its next_marker), and the frame is decoded, not refused for its header."""
    _, _, stream = _frame("JPEG baseline, colour", SAID)
    dqt = stream.index(b"\xff\xdb")
    ds = _dataset(JPEGBaseline8Bit, 3, stream[:dqt] + b"\x00" + stream[dqt:], SAID, SAID)
    assert decode_frame(ds).shape == (SAID, SAID, 3)
