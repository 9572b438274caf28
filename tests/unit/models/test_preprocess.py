"""Preprocessing: intensity normalisation, hand crop, tensor, CAM back onto the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.phantoms import make_phantom
from models.preprocess import (
    _grow,
    _largest_component,
    cam_to_image,
    hand_box,
    normalise_intensity,
    otsu_threshold,
    prepare,
)

# shared/ lies beside the repository on the development machines and in CI.
REAL_HANDS = sorted(
    (Path(__file__).resolve().parents[4] / "shared" / "data" / "real-hands").glob("*.png")
)


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0


def _inside(box: tuple[int, int, int, int], rows: np.ndarray, cols: np.ndarray) -> float:
    top, left, bottom, right = box
    ok = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    return float(ok.mean())


def test_prepare_shape_and_standardisation(rng: np.random.Generator) -> None:
    phantom = make_phantom(100.0, male=True, size=160, rng=rng)
    prepared = prepare(phantom.image, 64)
    assert prepared.tensor.shape == (1, 64, 64)
    assert abs(float(prepared.tensor.mean())) < 1e-4
    assert float(prepared.tensor.std()) == pytest.approx(1.0, abs=1e-2)
    top, left, bottom, right = prepared.crop_box
    assert bottom - top == right - left


def test_crop_keeps_the_informative_region_of_phantoms() -> None:
    rng = np.random.default_rng(7)
    for _ in range(10):
        phantom = make_phantom(float(rng.uniform(0, 228)), male=True, size=192, rng=rng)
        box = prepare(phantom.image, 64).crop_box
        rows, cols = np.nonzero(phantom.informative_mask)
        assert _inside(box, rows, cols) > 0.95
        assert (box[2] - box[0]) < 192 * 1.15


def test_crop_ignores_a_bright_marker() -> None:
    # A small hand in a large plate, so the crop is much smaller than the image.
    phantom = make_phantom(120.0, male=False, size=160, rng=np.random.default_rng(0))
    plate = np.full((400, 400), float(np.median(phantom.image[:10, :10])), dtype=np.float32)
    plate[200:360, 150:310] = phantom.image
    without = hand_box(normalise_intensity(plate))
    plate[10:40, 10:30] = 1.0  # side marker in a corner, away from the hand
    with_marker = hand_box(normalise_intensity(plate))
    assert with_marker == without
    assert without[0] > 150


@pytest.mark.skipif(not REAL_HANDS, reason="real radiographs not available")
@pytest.mark.parametrize("path", REAL_HANDS, ids=lambda p: p.name)
def test_crop_on_real_radiographs(path: Path) -> None:
    image = _load(path)
    prepared = prepare(image, 128)
    top, left, bottom, right = prepared.crop_box
    height, width = image.shape
    assert bottom - top == right - left
    # The hand fills most of these plates: the crop must keep its bright (bone and soft
    # tissue) pixels and must not collapse onto a marker or a finger.
    bright = normalise_intensity(image) > otsu_threshold(normalise_intensity(image))
    rows, cols = np.nonzero(bright)
    assert _inside(prepared.crop_box, rows, cols) > 0.9
    assert bottom - top > 0.6 * max(height, width)
    assert np.isfinite(prepared.tensor.numpy()).all()


def test_prepare_accepts_integer_images() -> None:
    image = (np.random.default_rng(0).random((80, 60)) * 4095).astype(np.uint16)
    assert prepare(image, 32).tensor.shape == (1, 32, 32)


def test_prepare_on_constant_image_is_finite() -> None:
    prepared = prepare(np.full((50, 70), 0.3, dtype=np.float32), 32)
    assert np.isfinite(prepared.tensor.numpy()).all()


def test_prepare_with_clahe() -> None:
    phantom = make_phantom(60.0, male=True, size=128, rng=np.random.default_rng(2))
    plain = prepare(phantom.image, 64)
    equalised = prepare(phantom.image, 64, clahe=True)
    assert equalised.crop_box == plain.crop_box
    assert not np.allclose(equalised.tensor.numpy(), plain.tensor.numpy())


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3)), np.zeros(10), np.zeros((1, 5))])
def test_prepare_rejects_non_2d(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D"):
        prepare(bad, 32)


def test_prepare_rejects_nan() -> None:
    image = np.zeros((20, 20), dtype=np.float32)
    image[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        prepare(image, 32)


def test_cam_to_image_places_the_map_in_the_crop() -> None:
    cam = np.ones((4, 4), dtype=np.float32)
    full = cam_to_image(cam, (10, 20, 50, 60), (100, 80))
    assert full.shape == (100, 80)
    assert full.dtype == np.float32
    assert full[10:50, 20:60].min() == pytest.approx(1.0)
    assert full.sum() == pytest.approx(40 * 40)


def test_cam_to_image_with_a_box_past_the_border() -> None:
    cam = np.zeros((2, 2), dtype=np.float32)
    cam[0, 1] = 1.0  # top-right cell
    full = cam_to_image(cam, (-10, -10, 30, 30), (20, 20))
    assert full.shape == (20, 20)
    assert full.min() >= 0.0
    assert full.max() <= 1.0
    # The top-right of the crop lands at the top-right of the visible part.
    assert full[:5, -5:].mean() > full[-5:, :5].mean()


def test_cam_follows_the_crop_on_the_full_image(rng: np.random.Generator) -> None:
    phantom = make_phantom(100.0, male=True, size=160, rng=rng)
    prepared = prepare(phantom.image, 64)
    cam = np.zeros((8, 8), dtype=np.float32)
    cam[4, 4] = 1.0
    full = cam_to_image(cam, prepared.crop_box, phantom.image.shape)
    top, left, bottom, right = prepared.crop_box
    peak = np.unravel_index(int(np.argmax(full)), full.shape)
    # cell 4 of 8 is centred on input pixel 4 * 32 of 8 * 32: the middle of the crop
    expected = (top + (bottom - top) * 4 / 8, left + (right - left) * 4 / 8)
    assert abs(peak[0] - expected[0]) <= (bottom - top) / 8
    assert abs(peak[1] - expected[1]) <= (right - left) / 8


@pytest.mark.parametrize("input_size", [512, 500])
def test_cam_to_image_draws_a_cell_where_the_network_saw_it(input_size: int) -> None:
    cam = np.zeros((16, 16), dtype=np.float32)
    cam[8, 3] = 1.0  # centred on input pixel (256, 96), the crop resized to input_size
    full = cam_to_image(cam, (100, 200, 2100, 2200), (2400, 2400), input_size=input_size)
    peak = np.unravel_index(int(np.argmax(full)), full.shape)
    scale = 2000 / input_size
    assert abs(peak[0] - (100 + (256 + 0.5) * scale - 0.5)) <= 1
    assert abs(peak[1] - (200 + (96 + 0.5) * scale - 0.5)) <= 1


def test_components_are_eight_connected() -> None:
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # a diagonal: one 8-connected piece
    mask[5, 0:4] = True  # four pixels apart from it
    largest = _largest_component(mask)
    assert largest.sum() == 4 and bool(largest[5, 3])
    mask[3, 3] = mask[3, 4] = True  # now the diagonal piece has five
    largest = _largest_component(mask)
    assert largest.sum() == 5 and bool(largest[0, 0]) and not largest[5].any()

    allowed = torch.zeros(6, 6, dtype=torch.bool)
    allowed[0, 1:6] = True  # touches the seed
    allowed[4:6, 0] = True  # does not
    seed = torch.zeros(6, 6, dtype=torch.bool)
    seed[1, 0] = True
    grown = _grow(seed, allowed)
    assert grown[0, 1:].all() and grown[1, 0] and not grown[0, 0]
    assert not grown[4:6, 0].any()


def test_preparing_a_large_image_matches_preparing_it_windowed_first() -> None:
    # The window is applied after the resize (the multi-megapixel image is never
    # rewritten); the network input stays that of the windowed image to within the
    # clipping of the brightest and darkest 1 %.
    phantom = make_phantom(120.0, male=False, size=1024, rng=np.random.default_rng(3))
    raw = phantom.image.astype(np.float32) * 3000 + 500
    direct = prepare(raw, 256)
    windowed = prepare(normalise_intensity(raw), 256)
    assert direct.crop_box == windowed.crop_box
    difference = (direct.tensor - windowed.tensor).abs()
    assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.2


def test_network_input_from_a_reduced_decode_matches_the_full_decode() -> None:
    """The worker decodes a large uncompressed radiograph at half size (block average);
    the network sees what it would have seen from the full decode."""
    import datetime

    from dicom_io.pixels import decode_for_display, decode_reduction
    from dicom_io.synthetic import make_radiograph_dataset

    phantom = make_phantom(150.0, male=True, size=1400, rng=np.random.default_rng(5))
    ds = make_radiograph_dataset(
        phantom.image[:1400, 100:1300],
        birth_date=datetime.date(2012, 1, 1),
        study_date=datetime.date(2024, 1, 1),
        bits_stored=12,
    )
    reduce = decode_reduction(ds, min_short_side=512, min_long_side=700)
    assert reduce == 1
    full = prepare(decode_for_display(ds), 512)
    half = prepare(decode_for_display(ds, reduce=reduce), 512)
    scaled = tuple(side * 2 for side in half.crop_box)
    assert max(abs(a - b) for a, b in zip(scaled, full.crop_box, strict=True)) <= 4
    difference = (full.tensor - half.tensor).abs()  # standardised units
    assert float(difference.mean()) < 0.05
    assert np.corrcoef(full.tensor.ravel(), half.tensor.ravel())[0, 1] > 0.99
