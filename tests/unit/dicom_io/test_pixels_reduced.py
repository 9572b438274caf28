"""Reduced-resolution JPEG 2000 decoding: the shape asked for, close to a downscaled decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless

from dicom_io.pixels import decode_for_display, decode_frame, jpeg2000_reduction
from dicom_io.synthetic import make_radiograph_dataset

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

pytest.importorskip("openjpeg")
PIL_features = pytest.importorskip("PIL.features")
if not PIL_features.check("jpg_2000"):
    pytest.skip("Pillow was built without OpenJPEG", allow_module_level=True)

ROWS, COLUMNS = 600, 440


def _j2k(tmp_path: Path, *, rows: int = ROWS, columns: int = COLUMNS) -> Dataset:
    ds = make_radiograph_dataset(
        hand_like(rows, columns),
        modality="CR",
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        bits_stored=12,
    )
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    path = tmp_path / "j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def _box_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    rows, columns = image.shape[0] // factor * factor, image.shape[1] // factor * factor
    blocks = image[:rows, :columns].reshape(rows // factor, factor, columns // factor, factor)
    return blocks.mean(axis=(1, 3))


@pytest.mark.parametrize("reduce", [1, 2])
def test_reduced_decode_has_the_reduced_shape(tmp_path: Path, reduce: int) -> None:
    ds = _j2k(tmp_path)
    image = decode_for_display(ds, reduce=reduce)
    factor = 1 << reduce
    assert image.shape == (-(-ROWS // factor), -(-COLUMNS // factor))
    assert image.dtype == np.float32
    assert 0.0 <= float(image.min()) <= float(image.max()) <= 1.0


@pytest.mark.parametrize("reduce", [1, 2])
def test_reduced_decode_is_close_to_a_downscaled_full_decode(tmp_path: Path, reduce: int) -> None:
    ds = _j2k(tmp_path)
    factor = 1 << reduce
    full = _box_downscale(decode_frame(ds).astype(np.float64), factor)
    reduced = decode_frame(ds, reduce=reduce).astype(np.float64)
    reduced = reduced[: full.shape[0], : full.shape[1]]
    assert reduced.max() <= 4095  # stored values, not Pillow's 16-bit scale
    # within 2% of the 12-bit range on average: the wavelet low band, not a box filter
    assert np.abs(reduced - full).mean() < 0.02 * 4095
    assert np.corrcoef(reduced.ravel(), full.ravel())[0, 1] > 0.99


def test_reduce_zero_is_the_lossless_full_decode(tmp_path: Path) -> None:
    ds = _j2k(tmp_path)
    np.testing.assert_array_equal(decode_frame(ds, reduce=0), ds.pixel_array)


def test_reduction_keeps_the_sides_the_consumer_needs(tmp_path: Path) -> None:
    ds = _j2k(tmp_path)
    assert jpeg2000_reduction(ds, min_short_side=220) == 1  # 440 / 2 = 220
    assert jpeg2000_reduction(ds, min_short_side=221) == 0
    assert jpeg2000_reduction(ds, min_short_side=100) == 2  # 440 / 4 = 110
    assert jpeg2000_reduction(ds, min_short_side=100, min_long_side=300) == 1
    assert jpeg2000_reduction(ds, min_short_side=1) <= 5  # never past the codestream's levels


def test_uncompressed_images_are_never_reduced(tmp_path: Path) -> None:
    ds = make_radiograph_dataset(
        hand_like(ROWS, COLUMNS), birth_date=BIRTH_DATE, study_date=STUDY_DATE, bits_stored=12
    )
    assert jpeg2000_reduction(ds, min_short_side=32) == 0
    assert decode_for_display(ds, reduce=2).shape == (ROWS, COLUMNS)
