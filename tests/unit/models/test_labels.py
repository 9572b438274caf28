"""What `read_rsna` and `load_image` refuse, and name: labels that are not months, an id
listed twice, an image file that cannot be read; a `val_fraction` out of range."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.data import load_image, read_rsna, split_groups
from models.train import TrainConfig


def _rsna(folder: Path, ages: list[str], *, ids: list[str] | None = None) -> Path:
    """An RSNA-layout set: ``labels.csv`` with the ages given, and a PNG per id."""
    images = folder / "images"
    images.mkdir(exist_ok=True)
    keys = ids if ids is not None else [str(k) for k in range(len(ages))]
    for key in keys:
        Image.fromarray(np.full((16, 16), 100, np.uint8)).save(images / f"{key}.png")
    path = folder / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "boneage", "male"])
        writer.writerows([key, age, "True"] for key, age in zip(keys, ages, strict=True))
    return path


@pytest.mark.parametrize("age", ["nan", "inf", "-inf", "-40", "240.5", "1e9", ""])
def test_a_bone_age_that_is_not_months_is_refused_with_its_line(tmp_path: Path, age: str) -> None:
    """One NaN made a run stop as "diverged ... try a lower --lr", and an evaluation's MAE
    silently NaN; a negative age or one of 20 years and more trained on nonsense."""
    labels = _rsna(tmp_path, ["100", age, "60"])
    with pytest.raises(ValueError, match=r"labels\.csv:3: boneage .* (months|not a number)"):
        read_rsna(labels, tmp_path / "images")


def test_the_bounds_of_months_are_accepted(tmp_path: Path) -> None:
    labels = _rsna(tmp_path, ["0", "240", " 12.5 "])
    assert [it.age_months for it in read_rsna(labels, tmp_path / "images")] == [0.0, 240.0, 12.5]


def test_labels_that_look_like_years_are_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    years = _rsna(tmp_path, [str(age) for age in (3, 7, 12, 15.5, 9, 17, 11, 5)])
    with caplog.at_level(logging.WARNING, logger="models.data"):
        assert len(read_rsna(years, tmp_path / "images")) == 8
    said = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "look like years" in said and "months" in said and str(years) in said

    caplog.clear()
    months = _rsna(tmp_path, [str(age) for age in (3, 7, 12, 15.5, 9, 17, 11, 150)])
    few = tmp_path / "few"
    few.mkdir()
    handful = _rsna(few, ["3", "7", "12"])  # a handful of infants: not said
    with caplog.at_level(logging.WARNING, logger="models.data"):
        read_rsna(months, tmp_path / "images")
        read_rsna(handful, few / "images")
    assert "years" not in caplog.text


def test_an_id_listed_twice_is_refused_naming_both_lines(tmp_path: Path) -> None:
    """Each row was its own group: one image listed twice could be trained on and
    validated on, flattering the validation MAE and the intervals."""
    labels = _rsna(tmp_path, ["100", "60", "100"], ids=["7", "8", "7"])
    with pytest.raises(ValueError, match=r"labels\.csv:4: id '7' is listed again .*line 2"):
        read_rsna(labels, tmp_path / "images")


def test_distinct_ids_are_groups_of_their_own(tmp_path: Path) -> None:
    items = read_rsna(_rsna(tmp_path, ["100", "60", "100"]), tmp_path / "images")
    assert len(set(split_groups(items))) == 3


@pytest.mark.parametrize("damage", ["truncated", "not an image", "missing"])
def test_an_image_file_that_cannot_be_read_is_named(tmp_path: Path, damage: str) -> None:
    """A truncated PNG among thousands stopped training with "image file is truncated",
    naming no file, and `evaluate` with a traceback (an OSError it did not catch)."""
    path = tmp_path / "5.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "not an image":
        path.write_bytes(b"id,boneage\n" * 10)
    else:
        path.unlink()
    with pytest.raises(ValueError, match=rf"cannot read {path}: "):
        load_image(path)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.7, float("nan")])
def test_a_val_fraction_out_of_range_is_refused_by_the_configuration(fraction: float) -> None:
    """Refused when the settings are made, not after a folder of images was read."""
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0\.5\]"):
        TrainConfig(val_fraction=fraction)


@pytest.mark.parametrize("size", [16, 4096])
def test_an_input_size_no_checkpoint_may_name_is_refused_before_training(size: int) -> None:
    """Refused when the settings are made: taken, the whole run went by, and the
    checkpoint it ended with was refused (input_size at most 2048)."""
    with pytest.raises(ValueError, match=f"input_size must be from 32 to 2048, got {size}"):
        TrainConfig(input_size=size)
