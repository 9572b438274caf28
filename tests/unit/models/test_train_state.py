"""The per-epoch training state survives a kill while it is written, an earlier release's
layout is still resumed, and a resume on another device (the gradient scaler on where it
was off, a GPU's random state on the CPU) does not fail."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import models.train
from models.data import IMAGE_GROUP, phantom_items
from models.train import STATE_JSON, STATE_TENSORS, TrainConfig, train

CONFIG = TrainConfig(
    arch="resnet18",
    input_size=32,
    epochs=2,
    batch_size=8,
    device="cpu",
    schedule="plateau",  # a resume may add epochs
)


class Killed(RuntimeError):
    """The process killed at that point (a machine going down, the OOM killer)."""


def _tensor_files(state: Path) -> list[str]:
    return sorted(p.name for p in state.glob("train_state*.safetensors"))


def test_a_run_killed_between_writing_the_tensors_and_the_json_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state was written as two files in place: killed after the tensors of epoch 2
    and before its JSON, the JSON of epoch 1 no longer matched them, and a resume was
    refused ("interrupted write?"): the run was lost."""
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    real_replace = os.replace
    json_writes = [0]

    def replace(src: Any, dst: Any) -> None:
        if Path(dst).name == STATE_JSON:
            json_writes[0] += 1
            if json_writes[0] == 2:  # epoch 2's JSON: its tensors are written already
                raise Killed("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train(items, tmp_path / "a.safetensors", config=CONFIG, state_dir=state, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert json.loads((state / STATE_JSON).read_text())["progress"]["epoch_done"] == 1

    resumed = train(
        items,
        tmp_path / "b.safetensors",
        config=CONFIG,
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # the JSON names the tensors it was written with; the others were removed
    saved = json.loads((state / STATE_JSON).read_text())
    assert _tensor_files(state) == [saved["tensors"]]


def test_a_state_of_the_earlier_two_file_layout_is_resumed(tmp_path: Path) -> None:
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    config = dataclasses.replace(CONFIG, epochs=1)
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    # as an earlier release wrote it: train_state.safetensors, a JSON that names no file
    saved = json.loads((state / STATE_JSON).read_text())
    (state / saved.pop("tensors")).rename(state / STATE_TENSORS)
    (state / STATE_JSON).write_text(json.dumps(saved))

    resumed = train(
        items,
        tmp_path / "b.safetensors",
        config=CONFIG,
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert _tensor_files(state) == [json.loads((state / STATE_JSON).read_text())["tensors"]]


def test_a_state_whose_tensors_are_gone_is_not_resumed(tmp_path: Path) -> None:
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    config = dataclasses.replace(CONFIG, epochs=1)
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    for name in _tensor_files(state):
        (state / name).unlink()
    with pytest.raises(FileNotFoundError, match="no training state to resume"):
        train(items, tmp_path / "b.safetensors", config=CONFIG, state_dir=state, resume=True)


def test_an_enabled_scaler_resumes_a_run_saved_with_it_off() -> None:
    """A run saved on the CPU or in bfloat16 (its scaler off: ``{}``) resumed on a GPU
    that trains in float16 failed on ``load_state_dict({})``. The CPU's scaler stands in
    for the GPU's here: no GPU on the test machines, and the two share this code."""
    off = torch.amp.GradScaler("cpu", enabled=False)
    on = torch.amp.GradScaler("cpu", enabled=True)
    models.train._restore_scaler(on, off.state_dict())
    assert on.is_enabled() and on.get_scale() == 2.0**16  # afresh, as a new run's

    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    models.train._restore_scaler(on, saved.state_dict())
    assert on.get_scale() == 1024.0
    models.train._restore_scaler(off, saved.state_dict())  # and the other way: ignored
    assert not off.is_enabled()


def test_a_gpu_s_random_state_is_ignored_on_the_cpu(tmp_path: Path) -> None:
    """A state saved on CUDA holds the GPU generator's state too; resumed on the CPU it is
    not used (and not a failure), and the CPU's is restored."""
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    config = dataclasses.replace(CONFIG, epochs=1)
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    name = json.loads((state / STATE_JSON).read_text())["tensors"]
    tensors = load_file(str(state / name))
    assert "rng.cuda" not in tensors  # a CPU run keeps none
    tensors["rng.cuda"] = torch.zeros(16, dtype=torch.uint8)  # as a GPU's would be
    expected = tensors["rng.torch"].clone()
    torch.manual_seed(123)
    models.train._restore_rng(tensors, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), expected)


def test_a_run_killed_while_writing_tensors_leaves_no_partial_file_behind(
    tmp_path: Path,
) -> None:
    """The tensors' temporary file is named by their digest: one a kill left (the size
    of the whole state: model, best weights, optimiser) was never written over, and
    stayed for good. The next save removes it."""
    items = phantom_items(20, size=48)
    state = tmp_path / "state"
    state.mkdir()
    partial = state / f".train_state-{'0' * 16}.safetensors.tmp"
    partial.write_bytes(b"cut short")
    train(items, tmp_path / "a.safetensors", config=CONFIG, state_dir=state, progress=False)
    assert not partial.exists()
    assert sorted(p.name for p in state.iterdir() if p.name.startswith(".")) == []


def test_a_file_system_that_syncs_no_folder_still_saves_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network and FUSE file systems refuse fsync on a folder (EINVAL): the state's
    folder is synced since it is written in two steps, and that refusal stopped training
    at its first save, where it had run before."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    state = tmp_path / "state"
    train(
        phantom_items(20, size=48),
        tmp_path / "a.safetensors",
        config=dataclasses.replace(CONFIG, epochs=1),
        state_dir=state,
        progress=False,
    )
    assert json.loads((state / STATE_JSON).read_text())["progress"]["epoch_done"] == 1


def test_a_run_saved_before_images_with_no_patient_had_groups_resumes(tmp_path: Path) -> None:
    """An earlier release left an image with no patient its own group (""); this one names
    it by its SOP Instance UID (IMAGE_GROUP), which changed the data's fingerprint, and a
    run saved before the upgrade was refused as "the training data changed", its split
    the same. It resumes where no image is listed twice, and is refused where one is."""
    before = phantom_items(20, size=48)
    state = tmp_path / "state"
    train(before, tmp_path / "a.safetensors", config=CONFIG, state_dir=state, progress=False)
    now = [
        dataclasses.replace(item, group=f"{IMAGE_GROUP}{index:032x}")
        for index, item in enumerate(before)
    ]
    more = dataclasses.replace(CONFIG, epochs=3)
    resumed = train(
        now, tmp_path / "b.safetensors", config=more, state_dir=state, resume=True, progress=False
    )
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]

    twice = [*now[:-1], dataclasses.replace(now[-1], group=now[0].group)]
    with pytest.raises(ValueError, match="the training data changed"):
        train(
            twice,
            tmp_path / "c.safetensors",
            config=dataclasses.replace(CONFIG, epochs=4),
            state_dir=state,
            resume=True,
            progress=False,
        )
