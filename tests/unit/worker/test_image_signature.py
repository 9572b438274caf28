"""The picture of its image an assessment keeps, and when a copy received again is of
other pixels (worker.pipeline.image_signature, signatures_differ)."""

from __future__ import annotations

import numpy as np
import pytest

from models.phantoms import make_phantom
from worker.pipeline import (
    SIGNATURE_CELLS,
    SIGNATURE_MEAN_SD,
    UNDECODABLE,
    image_signature,
    signatures_differ,
)


@pytest.fixture(scope="module")
def hand() -> np.ndarray:
    """A 512 x 512 display image in [0, 1]."""
    return make_phantom(100.0, male=False, size=512, rng=np.random.default_rng(3)).image.astype(
        np.float32
    )


def mean_levels_apart(first: bytes, second: bytes) -> float:
    a = np.frombuffer(first, np.uint8).astype(float)
    return float(np.abs(a - np.frombuffer(second, np.uint8)).mean())


def mean_sd_apart(first: bytes, second: bytes) -> float:
    """As signatures_differ measures it: each picture standardised."""
    a, b = (np.frombuffer(p, np.uint8).astype(float) for p in (first, second))
    return float(np.abs((a - a.mean()) / a.std() - (b - b.mean()) / b.std()).mean())


def test_the_picture_is_the_mean_of_each_cell_in_grey_levels() -> None:
    image = np.zeros((64, 96), np.float32)
    image[:2, :3] = 1.0  # the first cell, of 2 x 3 pixels, all white
    image[2:4, 3:6] = 0.5
    picture = np.frombuffer(image_signature(image), np.uint8).reshape(32, 32)
    assert picture[0, 0] == 255 and picture[1, 1] == 128  # round(0.5 * 255)
    assert picture.sum() == 255 + 128


def test_an_image_smaller_than_the_grid_gets_a_cell_a_pixel() -> None:
    image = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    picture = image_signature(image)
    assert len(picture) == 20 * 20
    assert signatures_differ(picture, image_signature(np.ones((64, 64), np.float32)))


def test_the_same_image_decoded_at_half_its_size_is_the_same_picture(hand: np.ndarray) -> None:
    half = hand.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    assert image_signature(hand) != b""
    assert mean_levels_apart(image_signature(hand), image_signature(half)) < 0.5
    assert not signatures_differ(image_signature(hand), image_signature(half))


def test_noise_of_a_lossy_copy_leaves_the_picture(hand: np.ndarray) -> None:
    noisy = np.clip(hand + np.random.default_rng(0).normal(0, 3 / 255, hand.shape), 0, 1)
    assert not signatures_differ(image_signature(hand), image_signature(noisy))


@pytest.mark.parametrize(
    "change",
    [
        lambda image: image[:, ::-1],  # flipped
        lambda image: image[::-1],  # upside down
        lambda image: np.roll(image, 16, axis=1),  # shifted
    ],
    ids=["flipped", "upside-down", "shifted"],
)
def test_the_image_processed_again_is_another_picture(hand: np.ndarray, change) -> None:
    assert signatures_differ(image_signature(hand), image_signature(change(hand)))


def test_another_window_is_the_same_picture(hand: np.ndarray) -> None:
    """A display image windowed on other percentiles (the same pixels decoded otherwise,
    with no window in the header) is the same image seen through another window: shifted
    and stretched by several grey levels, not of other pixels."""
    rewindowed = np.clip((hand - 0.02) * 1.05, 0, 1)
    before, after = image_signature(hand), image_signature(rewindowed)
    assert mean_levels_apart(before, after) > 2  # the old grey-level test took it for new
    assert not signatures_differ(before, after)


def test_a_change_of_tone_alone_is_not_told_apart(hand: np.ndarray) -> None:
    """Another look-up table moves the picture as little as a transcode's window does:
    the window the model is given absorbs most of it, and it does not count."""
    assert not signatures_differ(image_signature(hand), image_signature(hand**0.9))


def test_an_image_that_could_not_be_decoded_is_its_own_picture(hand: np.ndarray) -> None:
    assert not signatures_differ(UNDECODABLE, UNDECODABLE)
    assert signatures_differ(UNDECODABLE, image_signature(hand))
    assert signatures_differ(image_signature(hand), UNDECODABLE)


def test_a_blank_image_is_compared_without_dividing_by_nought() -> None:
    blank, grey = np.zeros((64, 64), np.float32), np.full((64, 64), 0.5, np.float32)
    assert not signatures_differ(image_signature(blank), image_signature(grey))
    assert signatures_differ(image_signature(blank), image_signature(np.eye(64, dtype=np.float32)))


def test_one_region_changed_is_another_picture_though_the_mean_barely_moves(
    hand: np.ndarray,
) -> None:
    """A marker or a mask in one place: one cell far apart is enough."""
    marked = hand.copy()
    side = 512 // SIGNATURE_CELLS
    marked[5 * side : 6 * side, 5 * side : 6 * side] = 1.0
    before, after = image_signature(hand), image_signature(marked)
    assert mean_sd_apart(before, after) < SIGNATURE_MEAN_SD
    assert signatures_differ(before, after)
