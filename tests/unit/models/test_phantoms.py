"""Phantoms: shape and range, determinism, age visible only in the informative region."""

from __future__ import annotations

import numpy as np
import pytest

from models.phantoms import make_dataset, make_phantom, maturity


def test_image_and_mask(rng: np.random.Generator) -> None:
    phantom = make_phantom(100.0, male=True, size=96, rng=rng)
    assert phantom.image.shape == (96, 96)
    assert phantom.image.dtype == np.float32
    assert phantom.image.min() >= 0.0
    assert phantom.image.max() <= 1.0
    assert phantom.informative_mask.dtype == bool
    assert 0.01 < phantom.informative_mask.mean() < 0.2


def test_bone_is_brighter_than_background(rng: np.random.Generator) -> None:
    image = make_phantom(150.0, male=False, size=128, rng=rng).image
    border = np.concatenate([image[:4].ravel(), image[:, :4].ravel(), image[:, -4:].ravel()])
    assert np.percentile(image, 99) > np.median(border) + 0.3


def test_same_generator_state_gives_same_phantom() -> None:
    a = make_phantom(50.0, male=True, size=64, rng=np.random.default_rng(5))
    b = make_phantom(50.0, male=True, size=64, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(a.image, b.image)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_age_changes_pixels_only_inside_the_informative_mask(seed: int) -> None:
    young = make_phantom(20.0, male=True, size=128, rng=np.random.default_rng(seed))
    old = make_phantom(190.0, male=True, size=128, rng=np.random.default_rng(seed))
    changed = np.abs(young.image - old.image) > 1e-6
    np.testing.assert_array_equal(young.informative_mask, old.informative_mask)
    assert changed.sum() > 20
    assert not (changed & ~young.informative_mask).any()


def test_informative_region_gets_brighter_with_age() -> None:
    means = []
    for age in (10.0, 80.0, 160.0):
        phantom = make_phantom(age, male=False, size=128, rng=np.random.default_rng(9))
        means.append(float(phantom.image[phantom.informative_mask].mean()))
    assert means[0] < means[1] < means[2]


def test_girls_mature_earlier() -> None:
    assert maturity(150.0, male=False) > maturity(150.0, male=True)
    assert maturity(0.0, male=True) == 0.0
    assert maturity(400.0, male=False) == 1.0


def test_make_dataset(rng: np.random.Generator) -> None:
    data = make_dataset(6, size=48, rng=rng)
    assert len(data) == 6
    for phantom, age, male in data:
        assert phantom.image.shape == (48, 48)
        assert 0.0 <= age <= 228.0
        assert isinstance(male, bool)
