"""Checkpoint format: round trip, model id, atomic write, clear errors, untrained model."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from models.checkpoint import (
    METADATA_KEY,
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
    untrained_model,
)
from models.net import BoneAgeNet


def _meta(**overrides: object) -> CheckpointMeta:
    fields: dict[str, object] = {
        "arch": "resnet18",
        "input_size": 64,
        "target_mean": 120.0,
        "target_sd": 40.0,
        "trained": True,
        "data": "phantoms, 300 images",
        "metrics": {"mae": 9.5},
        "quantiles": {"0.8": 12.0, "0.9": 16.0, "0.95": 20.0},
    }
    fields.update(overrides)
    return CheckpointMeta(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_weights_and_meta(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    path = tmp_path / "m.safetensors"
    meta = _meta()
    model_id = save_checkpoint(path, tiny_model, meta)

    loaded = load_checkpoint(path)

    assert loaded.model_id == model_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.meta == meta
    assert not loaded.model.training
    x, sex = torch.randn(2, 1, 64, 64), torch.tensor([1.0, 0.0])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x, sex), tiny_model(x, sex))


def test_metadata_is_json_under_boneage_key(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, _meta())
    with safetensors.safe_open(str(path), framework="pt") as handle:
        raw = json.loads(handle.metadata()[METADATA_KEY])
    assert raw["arch"] == "resnet18"
    assert raw["quantiles"] == {"0.8": 12.0, "0.9": 16.0, "0.95": 20.0}
    assert raw["format_version"] == 1
    for key in ("software_version", "created", "target_mean", "target_sd", "input_size"):
        assert key in raw


def test_save_leaves_no_temporary_file(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    save_checkpoint(tmp_path / "m.safetensors", tiny_model, _meta())
    save_checkpoint(tmp_path / "m.safetensors", tiny_model, _meta(data="again"))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_rejects_meta_of_other_arch(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    with pytest.raises(ValueError, match="resnet34"):
        save_checkpoint(tmp_path / "m.safetensors", tiny_model, _meta(arch="resnet34"))


def test_load_rejects_a_non_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_checkpoint(path)


def test_load_rejects_safetensors_without_boneage_metadata(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path)
    )
    with pytest.raises(ValueError, match="not a boneage checkpoint"):
        load_checkpoint(path)


def test_load_rejects_weights_of_another_arch(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    safetensors.torch.save_file(
        tensors, str(path), metadata={METADATA_KEY: _meta(arch="resnet50").to_json()}
    )
    with pytest.raises(ValueError, match="does not match architecture 'resnet50'"):
        load_checkpoint(path)


def test_load_rejects_missing_keys(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {
        k: v.contiguous()
        for k, v in tiny_model.state_dict().items()
        if not k.startswith("regressor.")
    }
    safetensors.torch.save_file(tensors, str(path), metadata={METADATA_KEY: _meta().to_json()})
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(path)


def test_load_rejects_unknown_format_version(tmp_path: Path, tiny_model: BoneAgeNet) -> None:
    path = tmp_path / "x.safetensors"
    raw = json.loads(_meta().to_json())
    raw["format_version"] = 99
    tensors = {k: v.contiguous() for k, v in tiny_model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(raw)})
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(path)


def test_meta_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="target_sd"):
        _meta(target_sd=0.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_mean", float("nan")),
        ("target_sd", float("nan")),
        ("target_sd", float("inf")),
        ("metrics", {"mae": 9.5, "r2": float("nan")}),
    ],
)
def test_meta_rejects_a_value_that_is_not_a_finite_number(field: str, value: object) -> None:
    # a NaN target mean makes every bone age NaN; a NaN metric would be invalid JSON
    with pytest.raises(ValueError, match="finite"):
        _meta(**{field: value})


@pytest.mark.parametrize("field", ["trained", "clahe"])
def test_meta_read_refuses_a_flag_that_is_not_true_or_false(field: str) -> None:
    # the string "false" is truthy: an untrained model would lose its UNTRAINED label
    raw = json.loads(_meta(clahe=True).to_json())
    raw[field] = "false"
    with pytest.raises(ValueError, match=f"{field} must be true or false, got 'false'"):
        CheckpointMeta.from_json(json.dumps(raw))


def test_meta_is_strict_json_with_a_diverged_epoch_in_its_history() -> None:
    history = [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": float("nan")}]
    text = _meta(extra={"history": history}).to_json()

    def refuse(constant: str) -> float:
        raise AssertionError(f"not strict JSON: {constant}")

    raw = json.loads(text, parse_constant=refuse)
    assert raw["extra"]["history"][1] == {"epoch": 2, "train_loss": None}


def test_a_nan_metric_of_an_earlier_checkpoint_is_left_out_when_read() -> None:
    # earlier releases wrote R² of a single validation image as NaN; the model is sound
    raw = json.loads(_meta().to_json())
    raw["metrics"] = {"mae": 9.5, "r2": float("nan")}
    meta = CheckpointMeta.from_json(json.dumps(raw))
    assert meta.metrics == {"mae": 9.5}


def test_meta_rejects_an_infinite_quantile() -> None:
    # an unreachable level is left out of the checkpoint, never stored as infinity
    with pytest.raises(ValueError, match=r"bad conformal quantile '0\.95'"):
        _meta(quantiles={"0.9": 16.0, "0.95": float("inf")})


@pytest.mark.parametrize(
    "absent", ["arch", "input_size", "target_mean", "target_sd", "trained", "head_hidden"]
)
def test_metadata_that_leaves_a_field_out_is_refused(absent: str) -> None:
    """Every writer has written them all: one left out took its default (a target mean of
    127 months, an input of 512 px for a model trained on others), and every bone age
    was wrong without a word."""
    raw = json.loads(_meta().to_json())
    del raw[absent]
    with pytest.raises(ValueError, match=f"checkpoint metadata lacks {absent}"):
        CheckpointMeta.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("input_size", 512.5, "input_size must be a whole number from 32 to 2048"),
        ("input_size", 30_000, "input_size must be a whole number from 32 to 2048"),
        ("input_size", True, "input_size must be a whole number from 32 to 2048"),
        ("head_hidden", 10_000_000, "head_hidden must be a whole number from 1 to 4096"),
        ("head_hidden", "256", "head_hidden must be a whole number from 1 to 4096"),
        ("head_hidden", -5, "head_hidden must be a whole number from 1 to 4096"),
        ("target_mean", "127", "target_mean must be a number"),
        ("extra", "x", "extra must be an object"),
        ("quantiles", [12.0], "quantiles must be an object"),
        ("metrics", {"mae": "9.5"}, "metric 'mae' must be a finite number"),
        ("arch", 50, "arch must be text"),
        ("created", None, "created must be text"),
    ],
)
def test_metadata_of_the_wrong_type_is_refused_when_read(
    field: str, value: object, said: str
) -> None:
    """Taken, they failed each worker at its warm-up or at every image, or built a head of
    ten million units (83 GB) before the weights' shapes were compared."""
    raw = json.loads(_meta().to_json())
    raw[field] = value
    with pytest.raises(ValueError, match=said):
        CheckpointMeta.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    "quantiles",
    [
        {"0.9": 16.0, "0.90": 17.0},  # one level twice: one silently won
        {"0.9": 16.0, "0.95": True},  # true read as 1.0
        {"0.9": 20.0, "0.95": 16.0},  # the 95 % interval inside the 90 %
        {"1.5": 20.0},
        {"x": 20.0},
    ],
)
def test_conformal_quantiles_that_cannot_be_intervals_are_refused(
    quantiles: dict[str, object],
) -> None:
    with pytest.raises(ValueError, match="quantile"):
        _meta(quantiles=quantiles)


def test_metadata_that_is_no_text_is_refused() -> None:
    with pytest.raises(ValueError, match="checkpoint metadata is not valid JSON"):
        CheckpointMeta.from_json({"arch": "resnet18"})  # type: ignore[arg-type]


def test_the_largest_input_size_is_the_settings() -> None:
    from models.checkpoint import MAX_INPUT_SIZE
    from worker.settings import Settings

    [bound] = [m.le for m in Settings.model_fields["input_size"].metadata if hasattr(m, "le")]
    assert bound == MAX_INPUT_SIZE


def test_untrained_model_is_marked_and_has_no_quantiles() -> None:
    loaded = untrained_model(arch="resnet18", input_size=64)
    assert loaded.meta.trained is False
    assert loaded.meta.quantiles == {}
    assert loaded.meta.input_size == 64
    assert not loaded.model.training
    assert len(loaded.model_id) == 64


def test_untrained_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    untrained_model(arch="resnet18")
    torch.testing.assert_close(torch.rand(3), expected)


def test_untrained_model_id_is_the_same_in_another_process() -> None:
    here = untrained_model(arch="resnet18", seed=3).model_id
    code = (
        "from models.checkpoint import untrained_model;"
        "print(untrained_model(arch='resnet18', seed=3).model_id)"
    )
    there = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert there == here
    assert untrained_model(arch="resnet18", seed=4).model_id != here


def test_untrained_model_id_matches_its_saved_bytes(tmp_path: Path) -> None:
    loaded = untrained_model(arch="resnet18", seed=0)
    model_id = save_checkpoint(tmp_path / "u.safetensors", loaded.model, loaded.meta)
    assert model_id == loaded.model_id


def _raw_meta(path: Path) -> dict[str, object]:
    with safetensors.safe_open(str(path), framework="pt") as handle:
        raw: dict[str, object] = json.loads(handle.metadata()[METADATA_KEY])
    return raw


def test_a_checkpoint_without_clahe_is_written_as_format_version_1(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    # what releases before the clahe field wrote, and all they read
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tiny_model, _meta())
    raw = _raw_meta(path)
    assert raw["format_version"] == 1
    assert "clahe" not in raw
    loaded = load_checkpoint(path)
    assert loaded.meta.clahe is False
    assert loaded.meta.format_version == 1


def test_a_clahe_checkpoint_is_format_version_2_and_round_trips(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    # Releases that read only version 1 refuse it, rather than drop the unknown field
    # and serve the model without CLAHE.
    path = tmp_path / "m.safetensors"
    meta = _meta(clahe=True)
    assert meta.format_version == 2
    save_checkpoint(path, tiny_model, meta)
    raw = _raw_meta(path)
    assert (raw["format_version"], raw["clahe"]) == (2, True)
    loaded = load_checkpoint(path)
    assert loaded.meta == meta
    assert loaded.meta.clahe is True


def test_format_version_follows_clahe_when_metadata_is_replaced() -> None:
    import dataclasses

    meta = dataclasses.replace(_meta(), clahe=True)
    assert meta.format_version == 2
    assert dataclasses.replace(meta, clahe=False).format_version == 1


def test_a_version_1_file_without_clahe_reads_as_no_clahe() -> None:
    raw = json.loads(_meta().to_json())
    raw.pop("clahe", None)
    meta = CheckpointMeta.from_json(json.dumps(raw))
    assert meta.clahe is False


def test_a_version_1_file_saying_clahe_is_refused() -> None:
    raw = json.loads(_meta(clahe=True).to_json())
    raw["format_version"] = 1
    with pytest.raises(ValueError, match="format version 1 says clahe"):
        CheckpointMeta.from_json(json.dumps(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_refuses_a_weight_that_is_not_finite(
    tmp_path: Path, tiny_model: BoneAgeNet, value: float
) -> None:
    tiny_model.state_dict()["regressor.0.weight"][0, 0] = value  # the parameter's storage
    path = tmp_path / "spoilt.safetensors"
    save_checkpoint(path, tiny_model, _meta())
    with pytest.raises(
        ValueError, match=r"spoilt\.safetensors holds NaN or infinite .*'regressor\.0\.weight'"
    ):
        load_checkpoint(path)


def test_load_accepts_finite_weights_whose_sum_overflows(
    tmp_path: Path, tiny_model: BoneAgeNet
) -> None:
    weight = tiny_model.state_dict()["regressor.0.weight"]
    weight.fill_(3e38)  # finite; their float32 sum is not
    path = tmp_path / "large.safetensors"
    save_checkpoint(path, tiny_model, _meta())
    assert torch.equal(load_checkpoint(path).model.state_dict()["regressor.0.weight"], weight)
