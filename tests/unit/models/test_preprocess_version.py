"""A checkpoint records the preprocessing version it was trained on, and one of another
version is refused on load (and a training state of another, on resume), rather than
silently given inputs it was not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
from click.testing import CliRunner

from models.checkpoint import (
    METADATA_KEY,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)
from models.data import phantom_items
from models.net import BoneAgeNet
from models.preprocess import PREPROCESS_VERSION
from models.train import STATE_JSON, TrainConfig, check_destinations, train


def _meta(**overrides: object) -> CheckpointMeta:
    fields: dict[str, object] = {"arch": "resnet18", "input_size": 64, "trained": True}
    fields.update(overrides)
    return CheckpointMeta(**fields)  # type: ignore[arg-type]


def _raw_meta(path: Path) -> dict[str, object]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        raw: dict[str, object] = json.loads(handle.metadata()[METADATA_KEY])
    return raw


def _save_raw(path: Path, model: BoneAgeNet, raw: dict[str, object]) -> None:
    """A checkpoint whose metadata is ``raw`` as it stands (what another release wrote)."""
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(raw)})


def test_a_checkpoint_records_this_software_s_preprocessing_version(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, _meta())
    assert _raw_meta(path)["preprocess_version"] == PREPROCESS_VERSION
    assert load_checkpoint(path).meta.preprocess_version == PREPROCESS_VERSION


def test_a_checkpoint_of_another_preprocessing_version_is_refused_on_load(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    path = tmp_path / "m.safetensors"
    other = PREPROCESS_VERSION + 1
    meta = _meta(preprocess_version=other)
    # releases that do not know the field read no version 3 and refuse it too
    assert meta.format_version == 3
    save_checkpoint(path, tiny_model, meta)
    assert _raw_meta(path)["format_version"] == 3
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path)
    said = str(refused.value)
    assert f"{path} was trained on images prepared as preprocessing version {other}" in said
    assert f"this software prepares them as version {PREPROCESS_VERSION}" in said


def test_a_checkpoint_written_before_the_version_was_recorded_is_version_1(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    path = tmp_path / "old.safetensors"
    raw = json.loads(_meta().to_json())
    del raw["preprocess_version"]  # as every release before it wrote them
    _save_raw(path, tiny_model, raw)
    loaded = load_checkpoint(path)
    assert loaded.meta.preprocess_version == 1
    assert loaded.meta.format_version == 1


def test_an_older_layout_saying_another_preprocessing_version_is_refused() -> None:
    # a reader of format version 1 or 2 would ignore the field: no writer puts it there
    raw = json.loads(_meta().to_json())
    raw["preprocess_version"] = 2
    with pytest.raises(ValueError, match="format version 1 says preprocess_version 2"):
        CheckpointMeta.from_json(json.dumps(raw))


@pytest.mark.parametrize("value", [0, True, "1", 1.5])
def test_a_preprocessing_version_that_is_not_a_whole_number_from_1_is_refused(
    value: object,
) -> None:
    with pytest.raises(ValueError, match="preprocess_version must be a whole number"):
        _meta(preprocess_version=value)


def test_evaluate_and_predict_refuse_it_in_one_line(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    from worker.cli import main

    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, _meta(input_size=128, preprocess_version=99))
    evaluate = ["evaluate", "--model", str(path), "--phantoms", "4", "--device", "cpu"]
    predict = ["predict", "--model", str(path), "--sex", "F", str(path)]
    for args in ([*evaluate, "-o", str(tmp_path / "report")], predict):
        result = CliRunner().invoke(main, args, env={"COLUMNS": "400"})
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        assert "prepared as preprocessing version 99" in " ".join(result.output.split())
    assert not (tmp_path / "report").exists()


def test_a_training_state_of_another_preprocessing_version_is_not_resumed(
    tmp_path: Path,
) -> None:
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    state = tmp_path / "state"
    train(
        phantom_items(20),
        tmp_path / "a.safetensors",
        config=config,
        state_dir=state,
        progress=False,
    )
    saved = json.loads((state / STATE_JSON).read_text())
    assert saved["preprocess_version"] == PREPROCESS_VERSION
    check_destinations(tmp_path / "b.safetensors", state, config=config, resume=True)

    saved["preprocess_version"] = PREPROCESS_VERSION + 1
    (state / STATE_JSON).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"cannot resume: .* preprocessing version 2"):
        check_destinations(tmp_path / "b.safetensors", state, config=config, resume=True)
