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
