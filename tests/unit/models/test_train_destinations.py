"""`train` refuses, before any image is read, what it could not write or would overwrite,
and a resume with other training settings; its validation passes show progress."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models.checkpoint
from models.data import LabelledImage, phantom_items
from models.train import STATE_JSON, TrainConfig, check_destinations, train

CONFIG = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")


class Reads:
    """Phantoms whose images count how often they are read."""

    def __init__(self, n: int = 20) -> None:
        self.count = 0
        self.items = [dataclasses.replace(it, image=self._loader(it)) for it in phantom_items(n)]

    def _loader(self, item: LabelledImage) -> Callable[[], np.ndarray]:
        image = item.image
        assert isinstance(image, np.ndarray)

        def load() -> np.ndarray:
            self.count += 1
            return image

        return load


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The state folder of a one-epoch run (copied by each test that changes it)."""
    folder = tmp_path_factory.mktemp("saved")
    state = folder / "state"
    train(
        phantom_items(20), folder / "a.safetensors", config=CONFIG, state_dir=state, progress=False
    )
    return state


@pytest.fixture
def saved(one_epoch: Path, tmp_path: Path) -> Path:
    """A state folder that holds a one-epoch run, this test's own."""
    return Path(shutil.copytree(one_epoch, tmp_path / "state"))


def _epochs_done(state: Path) -> int:
    return int(json.loads((state / STATE_JSON).read_text())["progress"]["epoch_done"])


# -- the checkpoint's folder -------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_an_output_folder_that_is_not_there_is_refused_before_any_image_is_read(
    tmp_path: Path, where: str
) -> None:
    parent = tmp_path / "models"
    if where == "a file":
        parent.write_text("not a folder")
    data = Reads()
    problem = "does not exist" if where == "missing" else "is not a folder"
    with pytest.raises(ValueError, match=f"its folder {parent} {problem}"):
        train(data.items, parent / "m.safetensors", config=CONFIG, progress=False)
    assert data.count == 0


def test_an_output_folder_no_file_can_be_created_in_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_args: object, **_kwargs: object) -> tuple[int, str]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(models.checkpoint.tempfile, "mkstemp", refused)
    with pytest.raises(ValueError, match=f"no file can be created in {tmp_path}.*Permission"):
        check_destinations(tmp_path / "m.safetensors")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="no file can be created"):
            check_destinations(folder / "m.safetensors")
    finally:
        folder.chmod(0o700)


def test_the_check_leaves_nothing_behind(tmp_path: Path) -> None:
    check_destinations(tmp_path / "m.safetensors", tmp_path / "state")
    assert list(tmp_path.iterdir()) == [tmp_path / "state"]
    assert list((tmp_path / "state").iterdir()) == []


# -- a state folder that holds a run ---------------------------------------------------


def test_a_saved_run_is_not_overwritten_by_a_new_one(tmp_path: Path, saved: Path) -> None:
    state = saved
    data = Reads()
    with pytest.raises(ValueError, match=r"holds a saved training run \(1 of 1 epochs done\)"):
        train(data.items, tmp_path / "b.safetensors", config=CONFIG, state_dir=state)
    assert data.count == 0
    assert not (tmp_path / "b.safetensors").exists()


def test_restart_trains_anew_over_a_saved_run(tmp_path: Path, saved: Path) -> None:
    state = saved
    longer = dataclasses.replace(CONFIG, epochs=2)
    train(
        phantom_items(20),
        tmp_path / "a2.safetensors",
        config=longer,
        state_dir=state,
        restart=True,
        progress=False,
    )
    assert _epochs_done(state) == 2  # the 1-epoch run replaced by a 2-epoch one
    result = train(
        phantom_items(20),
        tmp_path / "b.safetensors",
        config=CONFIG,
        state_dir=state,
        restart=True,
        progress=False,
    )
    assert result.meta.extra["epochs_run"] == 1
    assert _epochs_done(state) == 1  # the new run's state


def test_resume_and_restart_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        check_destinations(tmp_path / "m.safetensors", tmp_path, resume=True, restart=True)


# -- what a resumed run may change -----------------------------------------------------


def test_resume_refuses_each_changed_training_setting_by_name(tmp_path: Path, saved: Path) -> None:
    state = saved
    changed = dataclasses.replace(
        CONFIG,
        epochs=2,
        lr=5e-2,
        batch_size=4,
        weight_decay=0.5,
        huber_delta=1.0,
        warmup_steps=7,
        dropout=0.5,
        amp=False,
    )
    data = Reads()
    with pytest.raises(ValueError) as refused:
        train(data.items, tmp_path / "b.safetensors", config=changed, state_dir=state, resume=True)
    message = str(refused.value)
    assert message.startswith("cannot resume: ")
    for said in (
        "lr was 0.0003, now 0.05",
        "batch_size was 8, now 4",
        "weight_decay was 0.0001, now 0.5",
        "huber_delta was 0.25, now 1.0",
        "warmup_steps was 100, now 7",
        "dropout was 0.2, now 0.5",
        "amp was True, now False",
        # the cosine schedule is planned over the epochs (test_resume_schedule.py)
        "epochs was 1, now 2 (the cosine schedule",
    ):
        assert said in message
    assert data.count == 0
    assert _epochs_done(state) == 1


@pytest.mark.parametrize("setting", ["lr", "batch_size", "weight_decay", "dropout", "amp"])
def test_resume_refuses_one_changed_training_setting(
    tmp_path: Path, one_epoch: Path, setting: str
) -> None:
    state = one_epoch  # only read
    value: dict[str, Any] = {
        "lr": 1e-3,
        "batch_size": 4,
        "weight_decay": 0.0,
        "dropout": 0.0,
        "amp": False,
    }
    changed = dataclasses.replace(CONFIG, **{setting: value[setting]})
    with pytest.raises(ValueError, match=f"cannot resume: {setting} was"):
        check_destinations(tmp_path / "b.safetensors", state, config=changed, resume=True)


def test_resume_may_change_patience_and_how_it_runs(tmp_path: Path, saved: Path) -> None:
    # and epochs with the plateau schedule (test_resume_schedule.py)
    state = saved
    changed = dataclasses.replace(
        CONFIG, patience=3, num_workers=0, version="v2", data_description="again"
    )
    result = train(
        phantom_items(20),
        tmp_path / "b.safetensors",
        config=changed,
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert result.meta.extra["train_config"]["lr"] == CONFIG.lr
    assert result.meta.extra["train_config"]["version"] == "v2"
    assert result.meta.extra["epochs_run"] == 1


# -- progress --------------------------------------------------------------------------


def test_validation_passes_show_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(phantom_items(20), tmp_path / "m.safetensors", config=CONFIG, progress=True)
    shown = capsys.readouterr().err
    assert "validate 1/1" in shown
    assert "calibrate" in shown
    train(phantom_items(20), tmp_path / "n.safetensors", config=CONFIG, progress=False)
    assert "validate" not in capsys.readouterr().err


# -- a run that diverges ------------------------------------------------------------------


def test_a_run_that_diverges_writes_no_checkpoint(tmp_path: Path) -> None:
    """A learning rate far too high makes the weights infinite in the first epoch: no
    epoch gave a usable model, and the untrained weights are not written as a trained
    checkpoint."""
    config = dataclasses.replace(CONFIG, epochs=3, lr=1e30)
    output, state = tmp_path / "m.safetensors", tmp_path / "state"
    with pytest.raises(ValueError, match=r"training diverged in epoch 1 .* lower --lr than 1e\+30"):
        train(phantom_items(20), output, config=config, state_dir=state, progress=False)
    assert not output.exists()
    assert not (state / STATE_JSON).exists()  # nothing a resume would continue from
