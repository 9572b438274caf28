"""A resumed run's learning rates are those of the same run uninterrupted: the cosine
schedule is planned over the epochs a run starts with, and a resume that would move it
(another number of epochs) is refused before any image is read."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.data import LabelledImage, phantom_items
from models.train import STATE_JSON, TrainConfig, train

CONFIG = TrainConfig(
    arch="resnet18",
    input_size=32,
    epochs=3,
    batch_size=4,
    warmup_steps=2,
    patience=5,
    augment=True,
    device="cpu",
)


class Crash(RuntimeError):
    """What stops the interrupted run (a worker killed, the machine going down)."""


def _loaded(crash_after: int | None = None) -> tuple[list[LabelledImage], list[int]]:
    """20 phantoms read from loaders (read again each epoch, as files are), the reads
    counted; with ``crash_after``, the read after that many raises :class:`Crash`."""
    reads = [0]

    def loader(image: np.ndarray) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            if crash_after is not None and reads[0] >= crash_after:
                raise Crash("interrupted")
            reads[0] += 1
            return image

        return load

    items = []
    for item in phantom_items(20, size=64):
        assert isinstance(item.image, np.ndarray)
        items.append(dataclasses.replace(item, image=loader(item.image)))
    return items, reads


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_a_cosine_run_resumed_after_a_crash_follows_the_uninterrupted_run(
    tmp_path: Path,
) -> None:
    items, _ = _loaded()
    whole = train(
        items,
        tmp_path / "whole.safetensors",
        config=CONFIG,
        state_dir=tmp_path / "a",
        progress=False,
    )

    state = tmp_path / "b"
    crashing, reads = _loaded(crash_after=30)  # an epoch reads the 20 images once
    with pytest.raises(Crash):
        train(crashing, tmp_path / "b.safetensors", config=CONFIG, state_dir=state, progress=False)
    assert json.loads((state / STATE_JSON).read_text())["progress"]["epoch_done"] == 1
    assert reads[0] == 30  # it stopped inside the second epoch

    again, _ = _loaded()
    resumed = train(
        again,
        tmp_path / "resumed.safetensors",
        config=CONFIG,
        state_dir=state,
        resume=True,
        progress=False,
    )
    # the learning rate at the end of each epoch, and so every step's (the weights are
    # those of the same steps at the same rates)
    assert [r["lr"] for r in resumed.history] == [r["lr"] for r in whole.history]
    assert len(whole.history) == 3 and whole.history[-1]["lr"] < whole.history[0]["lr"]
    assert resumed.meta.extra["lr_schedule"] == whole.meta.extra["lr_schedule"]
    plan = whole.meta.extra["lr_schedule"]
    assert (plan["kind"], plan["epochs"], plan["warmup_steps"]) == ("cosine", 3, 2)
    a, b = _weights(whole.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def test_resuming_a_cosine_run_with_other_epochs_is_refused_before_any_image_is_read(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    short = dataclasses.replace(CONFIG, epochs=1)
    train(
        phantom_items(20), tmp_path / "a.safetensors", config=short, state_dir=state, progress=False
    )
    before = (state / STATE_JSON).read_bytes()

    for epochs in (3, 2):  # longer, and shorter than planned... both move the curve
        items, reads = _loaded()
        with pytest.raises(ValueError) as refused:
            train(
                items,
                tmp_path / "b.safetensors",
                config=dataclasses.replace(short, epochs=epochs),
                state_dir=state,
                resume=True,
                progress=False,
            )
        said = str(refused.value)
        assert said.startswith(f"cannot resume: epochs was 1, now {epochs} (the cosine schedule")
        assert "planned over 1 epochs" in said and "--restart" in said
        assert reads[0] == 0
    assert (state / STATE_JSON).read_bytes() == before
    assert not (tmp_path / "b.safetensors").exists()


def test_a_plateau_run_may_be_resumed_for_more_epochs(tmp_path: Path) -> None:
    # its learning rate follows the validation MAE, not a plan over the epochs
    state = tmp_path / "state"
    short = dataclasses.replace(CONFIG, epochs=1, schedule="plateau")
    train(
        phantom_items(20), tmp_path / "a.safetensors", config=short, state_dir=state, progress=False
    )
    longer = dataclasses.replace(short, epochs=2)
    result = train(
        phantom_items(20),
        tmp_path / "b.safetensors",
        config=longer,
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert result.meta.extra["epochs_run"] == 2
    assert result.meta.extra["train_config"]["epochs"] == 2
    assert result.meta.extra["lr_schedule"]["kind"] == "plateau"
