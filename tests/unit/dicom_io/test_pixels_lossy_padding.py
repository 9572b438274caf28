"""Pixel padding in lossy transfer syntaxes: what the codec moved off the padding value is
padding where padding encloses it or lies right beside it; bone near the value stays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit

from dicom_io.pixels import decode_for_display, decode_frame, read_image
from dicom_io.synthetic import make_radiograph_dataset

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

pytest.importorskip("openjpeg")
imagecodecs = pytest.importorskip("imagecodecs")

ROWS, COLUMNS = 480, 360
BAND, TOP = 61, 40  # padded columns on the left, rows at the top
REACH = 2  # pixels beside padding that bone near its value may lose (_LOSSY_PADDING_REACH)


def _saved(tmp_path: Path, ds: Dataset) -> Dataset:
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_image(path)


def _encoded(
    tmp_path: Path,
    stored: np.ndarray,
    photometric: str,
    pad: int,
    syntax: UID,
    bits: int,
    *,
    lossless_as: UID | None = None,
) -> Dataset:
    """``stored`` with Pixel Padding Value ``pad``, in ``syntax``: JPEG 2000 at 20:1
    (pylibjpeg-openjpeg), JPEG at quality 75 (libjpeg-turbo), each saying so in Lossy
    Image Compression "01", as a conformant encoder does; JPEG 2000 lossless, under
    ``lossless_as`` where given (JPEG 2000 (.91) carries lossless data too)."""
    ds = make_radiograph_dataset(
        stored,
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        photometric=photometric,
        bits_stored=bits,
    )
    ds.PixelPaddingValue = pad
    if syntax in (JPEG2000, JPEG2000Lossless):
        ds.compress(
            syntax,
            photometric_interpretation=photometric,
            encoding_plugin="pylibjpeg",
            j2k_cr=[20] if syntax == JPEG2000 else None,
        )
        if syntax == JPEG2000:
            ds.LossyImageCompression = "01"
        elif lossless_as is not None:
            ds.file_meta.TransferSyntaxUID = lossless_as
    else:
        frame = imagecodecs.jpeg8_encode(stored, level=75, bitspersample=bits)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
        ds.LossyImageCompression = "01"
    return _saved(tmp_path, ds)


@pytest.mark.parametrize(
    ("syntax", "bits"),
    [(JPEG2000, 12), (JPEGExtended12Bit, 12), (JPEGBaseline8Bit, 8)],
    ids=["jpeg2000", "jpeg-12", "jpeg-8"],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_lossy_padding_is_padding_though_the_codec_moved_it_off_the_value(
    tmp_path: Path, syntax: UID, bits: int, photometric: str
) -> None:
    """Only pixels at the padding value exactly were padding: JPEG 2000 at 20:1 left
    half of this shutter's pixels (a fifth of a real hand's) a few values off, and they
    were shown through the window, a band the crop took for the hand (found in review)."""
    top = (1 << bits) - 1
    stored = np.rint(hand_like(ROWS, COLUMNS) * top).astype(np.uint16 if bits > 8 else np.uint8)
    pad = top if photometric == "MONOCHROME2" else 0  # white, as the bone
    if photometric == "MONOCHROME1":
        stored = top - stored
    padded = np.zeros(stored.shape, dtype=bool)
    padded[:, :BAND] = padded[:TOP] = True
    stored[padded] = pad
    ds = _encoded(tmp_path, stored, photometric, pad, syntax, bits)
    assert np.mean(decode_frame(ds)[padded] == pad) < 0.99  # the codec moved some
    image = decode_for_display(ds)
    assert np.mean(image[padded] == 0.0) >= 0.999
    reduced = decode_for_display(ds, reduce=1)
    assert np.all(reduced[:, : BAND // 2] == 0.0)
    assert np.all(reduced[: TOP // 2] == 0.0)


def _bone_beside_padding() -> tuple[np.ndarray, tuple[slice, slice], tuple[slice, slice]]:
    """MONOCHROME1 soft tissue, padded (0) on the left, with dense bone (near 0, as the
    padding) beside the padding and elsewhere."""
    rng = np.random.default_rng(1)
    stored = np.rint(3000 - 1500 * hand_like(ROWS, COLUMNS)).astype(np.uint16)
    beside = (slice(100, 300), slice(BAND, BAND + 60))
    apart = (slice(350, 420), slice(200, 280))
    for bone in (beside, apart):
        stored[bone] = np.rint(np.clip(80 + 4 * rng.standard_normal(stored[bone].shape), 0, None))
    stored[:, :BAND] = 0
    return stored, beside, apart


@pytest.mark.parametrize(
    ("syntax", "lossless_as"),
    [(JPEG2000, None), (JPEG2000Lossless, None), (JPEG2000Lossless, JPEG2000)],
    ids=["lossy", "lossless", "lossless-in-jpeg2000"],
)
def test_bone_near_the_padding_value_loses_at_most_the_pixels_beside_the_padding(
    tmp_path: Path, syntax: UID, lossless_as: UID | None
) -> None:
    """With MONOCHROME1 and padding 0 the densest bone lies near 0 too: bone that soft
    tissue borders is never taken for padding, and beside the padded area it loses at
    most two pixels; losslessly compressed, none, in JPEG 2000 (.91) too, which carries
    lossless data as well as lossy (its bone lost two pixels; found in the second
    review)."""
    stored, beside, apart = _bone_beside_padding()
    ds = _encoded(tmp_path, stored, "MONOCHROME1", 0, syntax, 12, lossless_as=lossless_as)
    decoded = decode_frame(ds)
    assert np.mean(decoded[beside] < 160) > 0.99  # as near 0 as the codec moved padding
    image = decode_for_display(ds)
    assert np.mean(image[:, :BAND] == 0.0) >= 0.99
    masked = np.flatnonzero((image[beside] == 0.0).any(axis=0))
    lossy = syntax == JPEG2000 and lossless_as is None
    assert set(masked) <= set(range(REACH if lossy else 0))
    assert np.all(image[apart] > 0.5)  # bright bone, after the inversion
