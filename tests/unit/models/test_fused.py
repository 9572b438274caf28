"""The trunk as oneDNN fused convolutions: the model's results, or not used."""

from __future__ import annotations

import logging

import pytest
import torch

import models.fused
from models.fused import (
    FUSED_TOLERANCE,
    FusedBoneAgeNet,
    FusedConv,
    FusedResidual,
    cpu_inference_copy,
    fuse_trunk,
    fused_discrepancy,
    fusion_available,
    is_fused,
)
from models.net import BoneAgeNet, build_model, fold_batch_norm
from tests.unit.models.helpers import assert_same_results, with_trained_batch_norms

pytestmark = pytest.mark.skipif(
    fusion_available() is not None, reason=f"no fused oneDNN convolutions: {fusion_available()}"
)


def _trained(arch: str) -> BoneAgeNet:
    """A model whose batch norms have real statistics (so folding them is not trivial)."""
    return with_trained_batch_norms(build_model(arch=arch), seed=11)


def _conv_weight(fused: FusedBoneAgeNet, block: int, conv: int) -> torch.Tensor:
    """The laid-out weight of one fused convolution of the trunk."""
    residual = fused.blocks[block]
    assert isinstance(residual, FusedResidual)
    fused_conv = residual.convs[conv]
    assert isinstance(fused_conv, FusedConv)
    weight = fused_conv.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _images(n: int, rows: int, columns: int) -> torch.Tensor:
    x = torch.rand((n, 1, rows, columns), generator=torch.Generator().manual_seed(n + rows))
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("source", ["as built", "folded"])
def test_fused_trunk_gives_the_model_s_maps_prediction_and_heat_map(arch: str, source: str) -> None:
    model = _trained(arch)
    fused = fuse_trunk(fold_batch_norm(model) if source == "folded" else model, input_size=96)
    assert is_fused(fused) and not is_fused(model)
    # every convolution of the trunk is a fused one: none left to run eagerly, no batch norm
    assert not any(isinstance(m, torch.nn.Conv2d | torch.nn.BatchNorm2d) for m in fused.modules())
    convolutions = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, FusedConv) for m in fused.modules()) == convolutions
    assert_same_results(model, fused, _images(2, 96, 96))


@pytest.mark.parametrize(("n", "rows", "columns"), [(3, 96, 96), (1, 64, 80), (2, 130, 97)])
def test_shapes_other_than_the_one_laid_out_for_give_the_same_maps(
    n: int, rows: int, columns: int
) -> None:
    model = _trained("resnet18")
    fused = fuse_trunk(model, input_size=96)  # weights laid out for (1, 1, 96, 96)
    x = _images(n, rows, columns)
    with torch.inference_mode():
        a, a_fused = model.features(x), fused.features(x)
    torch.testing.assert_close(a_fused, a, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_an_image_gives_the_same_maps_alone_and_in_a_batch() -> None:
    fused = fuse_trunk(_trained("resnet18"), input_size=64)
    x = _images(3, 64, 64)
    with torch.inference_mode():
        batch = fused.features(x)
        alone = [fused.features(x[i : i + 1].clone()) for i in range(3)]
    torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=0)


def test_the_caller_s_input_and_model_are_left_as_they_were() -> None:
    # Residual blocks write their output into the shortcut's memory; resnet18's first
    # block has no downsampling, so its shortcut is its input: the stem's output, never
    # the caller's tensor.
    model = _trained("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse_trunk(model, input_size=64)
    x = _images(1, 64, 64)
    kept = x.clone()
    with torch.inference_mode():
        fused.features(x)
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)
    # the laid-out weights are not part of any checkpoint; the head's are
    assert not any(key.startswith(("stem", "blocks")) for key in fused.state_dict())
    assert any(key.startswith("regressor") for key in fused.state_dict())


def test_fused_trunk_refuses_autograd() -> None:
    fused = fuse_trunk(_trained("resnet18"), input_size=64)
    x = _images(1, 64, 64).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        fused.features(x)


def test_fuse_trunk_needs_an_eval_mode_float32_model() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fuse_trunk(build_model(arch="resnet18"), input_size=64)
    with pytest.raises(TypeError, match="float32"):
        fuse_trunk(_trained("resnet18").double(), input_size=64)


def test_discrepancy_sees_one_wrong_weight() -> None:
    model = _trained("resnet18")
    fused = fuse_trunk(model, input_size=64)
    assert fused_discrepancy(fused, model, input_size=64) <= FUSED_TOLERANCE
    weight = _conv_weight(fused, 5, 0)  # resnet18: layer3's second block
    with torch.no_grad():
        weight.mul_(1.01)  # scaling is the same in any weight layout
    assert fused_discrepancy(fused, model, input_size=64) > FUSED_TOLERANCE


def test_inference_copy_is_the_fused_trunk_when_it_agrees() -> None:
    copy = cpu_inference_copy(_trained("resnet18"), input_size=64)
    assert copy is not None and is_fused(copy)


@pytest.mark.parametrize("factor", [1.01, float("nan")])
def test_inference_copy_falls_back_when_the_trunks_disagree(
    factor: float, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fused copy that computes wrong, as a faulty oneDNN kernel would: one weight off by
    # 1 %, or NaN. The check at start, run for real, must refuse it.
    build = fuse_trunk

    def miscomputing(model: BoneAgeNet, *, input_size: int) -> FusedBoneAgeNet:
        fused = build(model, input_size=input_size)
        with torch.no_grad():
            _conv_weight(fused, 5, 0).mul_(factor)
        return fused

    monkeypatch.setattr(models.fused, "fuse_trunk", miscomputing)
    model = _trained("resnet18")
    with caplog.at_level(logging.WARNING, logger="models.fused"):
        copy = cpu_inference_copy(model, input_size=64)
    assert copy is None
    assert "running the eager model" in caplog.text


def test_inference_copy_falls_back_for_a_model_it_cannot_fuse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    double = _trained("resnet18").double()
    with caplog.at_level(logging.WARNING, logger="models.fused"):
        assert cpu_inference_copy(double, input_size=64) is None
    assert "unavailable" in caplog.text


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # torch's flags()
def test_no_fusion_where_onednn_is_switched_off(caplog: pytest.LogCaptureFixture) -> None:
    model = _trained("resnet18")
    with torch.backends.mkldnn.flags(enabled=False):
        assert "switched off" in (fusion_available() or "")
        with caplog.at_level(logging.WARNING, logger="models.fused"):
            assert cpu_inference_copy(model, input_size=64) is None
    assert "switched off" in caplog.text
