"""The validation split holds the share of patients asked for (to the nearest whole
patient), not 1 / round(1 / val_fraction) of them, and a run says what it held out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from models.data import phantom_items, stratified_split, validation_group_count
from models.train import STATE_JSON, TrainConfig, check_destinations, train


@pytest.mark.parametrize(
    ("n", "fraction"),
    [(100, 0.15), (200, 0.15), (40, 0.4), (90, 0.45), (60, 0.3), (33, 0.1), (7, 0.3)],
)
def test_the_split_holds_the_fraction_of_images_asked_for(n: int, fraction: float) -> None:
    # 0.15 was cut into runs of round(1 / 0.15) = 7, one each: 14.3 %; 0.4 into runs of
    # 2: 50 %; 0.45 into runs of 2 as well
    rng = np.random.default_rng(n)
    ages = rng.uniform(0, 228, size=n).tolist()
    males = (rng.random(n) < 0.5).tolist()
    train_idx, val_idx = stratified_split(ages, males, fraction, seed=2)
    assert len(val_idx) == round(fraction * n + 1e-9) == validation_group_count(n, fraction)
    assert sorted(train_idx + val_idx) == list(range(n))
    # still stratified: each sex holds its share, to a whole image
    for sex in (False, True):
        of_sex = sum(1 for m in males if m == sex)
        held = sum(1 for i in val_idx if males[i] == sex)
        assert abs(held - fraction * of_sex) < 1.0 + 1e-9, (sex, held, fraction * of_sex)


def test_the_split_by_patient_holds_the_fraction_of_patients_asked_for() -> None:
    rng = np.random.default_rng(5)
    ages: list[float] = []
    males: list[bool] = []
    groups: list[str] = []
    for child in range(120):  # one to three images each
        age, male = float(rng.uniform(0, 200)), bool(rng.random() < 0.5)
        for visit in range(int(rng.integers(1, 4))):
            ages.append(age + 12.0 * visit)
            males.append(male)
            groups.append(f"child-{child}")
    for fraction in (0.15, 0.4):
        _, val_idx = stratified_split(ages, males, fraction, seed=1, groups=groups)
        assert len({groups[i] for i in val_idx}) == round(fraction * 120)  # 18, 48


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [(2, 0.15, 1), (20, 0.15, 3), (3, 0.5, 2), (10, 0.25, 3), (10, 0.5, 5)],
)
def test_the_count_is_rounded_to_a_whole_patient_leaving_one_on_each_side(
    n: int, fraction: float, expected: int
) -> None:
    assert validation_group_count(n, fraction) == expected


def test_a_run_says_what_it_held_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = TrainConfig(
        arch="resnet18", input_size=32, epochs=1, batch_size=8, val_fraction=0.4, device="cpu"
    )
    with caplog.at_level(logging.INFO, logger="models.train"):
        result = train(
            phantom_items(40, size=48),
            tmp_path / "m.safetensors",
            config=config,
            state_dir=tmp_path / "state",
            progress=False,
        )
    split = result.meta.extra["split"]
    assert split == {
        "val_fraction": 0.4,
        "val_patients": 16,
        "patients": 40,
        "val_images": 16,
        "images": 40,
    }
    assert result.meta.extra["n_val"] == 16
    assert "validation 16 of 40 patients (40.0 %), 16 of 40 images (40.0 %)" in caplog.text
    assert json.loads((tmp_path / "state" / STATE_JSON).read_text())["val_sha256"]


def test_a_saved_run_without_its_validation_images_recorded_is_not_resumed(
    tmp_path: Path,
) -> None:
    # Written by a release whose split was another: resumed, the new split would train
    # on images the saved run validated on.
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    saved = json.loads((state / STATE_JSON).read_text())
    del saved["val_sha256"]
    (state / STATE_JSON).write_text(json.dumps(saved))
    with pytest.raises(
        ValueError, match=r"cannot resume: .* did not record the images it validated"
    ):
        train(items, tmp_path / "b.safetensors", config=config, state_dir=state, resume=True)
    assert not (tmp_path / "b.safetensors").exists()
    # and before any image is read: the state alone says so
    with pytest.raises(ValueError, match=r"did not record the images it validated on"):
        check_destinations(tmp_path / "b.safetensors", state, config=config, resume=True)


def test_a_saved_run_that_validated_on_other_images_is_not_resumed(tmp_path: Path) -> None:
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    saved = json.loads((state / STATE_JSON).read_text())
    saved["val_sha256"] = "0" * 64  # another split's images
    (state / STATE_JSON).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"cannot resume: the run in .* validated on other images"):
        train(items, tmp_path / "b.safetensors", config=config, state_dir=state, resume=True)
    assert not (tmp_path / "b.safetensors").exists()
