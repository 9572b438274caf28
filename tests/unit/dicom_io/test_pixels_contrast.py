"""An image without usable contrast is refused where it is decoded for an assessment.

Blank pixel data, or a window that sends nearly every pixel to one end, decoded to an
image of one grey that the model gave a confident bone age (found in review). The
images go the service's way: written to a file, read by :func:`read_image`, decoded by
:func:`decode_as_assessed`. Real radiographs and the synthetic phantoms pass with a
wide margin.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset

from dicom_io.pixels import (
    MAX_SHARE_AT_ONE_LEVEL,
    NoContrastError,
    PixelDataError,
    decode_as_assessed,
    read_image,
    share_at_one_level,
)
from dicom_io.synthetic import make_radiograph_dataset
from models.phantoms import make_phantom

# shared/ lies beside the repository on the development machines and in CI.
REAL_HANDS = sorted(
    (Path(__file__).resolve().parents[4] / "shared" / "data" / "real-hands").glob("*.png")
)
#: The largest share at one grey level a radiograph is expected to reach: far below the
#: refusal's.
RADIOGRAPH_SHARE = 0.5


def _dx(pixels: np.ndarray, **kwargs: object) -> Dataset:
    return make_radiograph_dataset(
        pixels,
        sex="F",
        birth_date=dt.date(2016, 1, 10),
        study_date=dt.date(2026, 3, 15),
        **kwargs,  # type: ignore[arg-type]
    )


def _as_the_service_decodes(ds: Dataset, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    return decode_as_assessed(read_image(path), input_size=128, sc_min_long_side=256)


def _phantom_12_bit(size: int = 320) -> np.ndarray:
    """A 12-bit hand whose stored values, as a detector's, stay clear of 0: 300-4000."""
    phantom = make_phantom(100.0, male=False, size=size, rng=np.random.default_rng(3))
    return np.round(300 + phantom.image * 3700).astype(np.uint16)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_all_zero_pixel_data_is_refused(tmp_path: Path, photometric: str) -> None:
    ds = _dx(np.zeros((320, 256), np.uint16), photometric=photometric)
    with pytest.raises(NoContrastError, match=r"no usable contrast: 100\.0% of its pixels"):
        _as_the_service_decodes(ds, tmp_path)


def test_a_window_that_saturates_a_12_bit_radiograph_is_refused(tmp_path: Path) -> None:
    """Window centre 100, width 10 on a 12-bit hand: every pixel above the window, white."""
    ds = _dx(_phantom_12_bit())
    ds.WindowCenter, ds.WindowWidth = 100, 10
    with pytest.raises(NoContrastError, match="are white after the window") as refused:
        _as_the_service_decodes(ds, tmp_path)
    assert isinstance(refused.value, PixelDataError)  # the pipeline's not-assessed path


def test_the_same_radiograph_in_its_own_window_is_assessed(tmp_path: Path) -> None:
    ds = _dx(_phantom_12_bit())
    ds.WindowCenter, ds.WindowWidth = 2150, 3700
    image = _as_the_service_decodes(ds, tmp_path)
    assert share_at_one_level(image)[0] < RADIOGRAPH_SHARE


@pytest.mark.skipif(not REAL_HANDS, reason="shared/data/real-hands is not beside the checkout")
@pytest.mark.parametrize("path", REAL_HANDS, ids=lambda p: p.name)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_real_radiographs_pass_with_a_wide_margin(
    tmp_path: Path, path: Path, photometric: str
) -> None:
    grey = np.asarray(Image.open(path).convert("L"))
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    ds = _dx(grey.astype(np.uint8), bits_stored=8, photometric=photometric)
    image = _as_the_service_decodes(ds, tmp_path)
    assert share_at_one_level(image)[0] < RADIOGRAPH_SHARE < MAX_SHARE_AT_ONE_LEVEL


@pytest.mark.parametrize("age", [0.0, 6.0, 60.0, 120.0, 200.0, 228.0])
@pytest.mark.parametrize("size", [160, 512])
def test_phantoms_pass_with_a_wide_margin(tmp_path: Path, age: float, size: int) -> None:
    phantom = make_phantom(age, male=True, size=size, rng=np.random.default_rng(int(age)))
    ds = _dx(np.round(phantom.image * 4095).astype(np.uint16))
    image = _as_the_service_decodes(ds, tmp_path)
    assert share_at_one_level(image)[0] < RADIOGRAPH_SHARE
