"""Head-only Grad-CAM equals full-autograd Grad-CAM."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.gradcam import full_autograd_gradcam, predict_with_cam, predict_z, upsample_cam
from models.net import BoneAgeNet, build_model


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("male", [0.0, 1.0])
def test_head_only_cam_matches_full_autograd(
    tiny_model: BoneAgeNet, seed: int, male: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 96, 128, generator=gen)
    sex = torch.full((2,), male)
    y_fast, cam_fast = predict_with_cam(tiny_model, x, sex)
    y_ref, cam_ref = full_autograd_gradcam(tiny_model, x, sex)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    assert cam_fast.shape == (2, 3, 4)
    torch.testing.assert_close(cam_fast, cam_ref, atol=1e-5, rtol=0)


def test_matches_full_autograd_on_resnet50_mixed_sexes() -> None:
    model = build_model(arch="resnet50").eval()
    x = torch.randn(2, 1, 64, 64)
    sex = torch.tensor([1.0, 0.0])
    y_fast, cam_fast = predict_with_cam(model, x, sex)
    y_ref, cam_ref = full_autograd_gradcam(model, x, sex)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam_fast, cam_ref, atol=1e-5, rtol=0)


def test_cam_is_normalised_per_image(tiny_model: BoneAgeNet) -> None:
    _, cam = predict_with_cam(tiny_model, torch.randn(3, 1, 96, 96), torch.tensor([1.0, 0, 1]))
    assert float(cam.min()) >= 0.0
    peaks = cam.amax(dim=(1, 2))
    assert all(float(p) in (0.0, 1.0) for p in peaks)
    assert float(peaks.max()) == 1.0


def test_zero_gradient_gives_zero_map_not_nan(tiny_model: BoneAgeNet) -> None:
    last = tiny_model.regressor[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
    _, cam = predict_with_cam(tiny_model, torch.randn(1, 1, 64, 64), 1.0)
    assert torch.isfinite(cam).all()
    assert float(cam.abs().max()) == 0.0


def test_works_when_caller_is_in_inference_mode(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(1, 1, 64, 64)
    outside = predict_with_cam(tiny_model, x, 0.0)
    with torch.inference_mode():
        inside = predict_with_cam(tiny_model, x, 0.0)
    torch.testing.assert_close(outside[1], inside[1])


def test_prediction_equals_forward(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(2, 1, 64, 64)
    sex = torch.tensor([0.0, 1.0])
    y, _ = predict_with_cam(tiny_model, x, sex)
    with torch.inference_mode():
        torch.testing.assert_close(y, tiny_model(x, sex))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_predict_z_is_predict_with_cam_s_prediction(
    tiny_model: BoneAgeNet, dtype: torch.dtype
) -> None:
    # evaluate and train's validation use predict_z, the service predict_with_cam: under
    # the worker's autocast both run the trunk alone in the lower precision
    last = tiny_model.regressor[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias.fill_(1.3)  # z near 1.3, where bfloat16 steps by 2**-7
    x = torch.randn(3, 1, 64, 64)
    sex = torch.tensor([0.0, 1.0, 1.0])
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        with_cam, _ = predict_with_cam(tiny_model, x, sex)
        alone = predict_z(tiny_model, x, sex)
    assert alone.dtype == with_cam.dtype == torch.float32
    assert torch.equal(alone, with_cam)
    if dtype == torch.bfloat16:  # not rounded to bfloat16 at the end
        assert not torch.equal(alone, alone.to(torch.bfloat16).float())


def test_full_autograd_leaves_no_gradients_behind(tiny_model: BoneAgeNet) -> None:
    full_autograd_gradcam(tiny_model, torch.randn(1, 1, 64, 64), 1.0)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_upsample_cam_shape_and_range() -> None:
    cam = np.array([[0.0, 1.0], [0.5, 0.25]], dtype=np.float32)
    up = upsample_cam(cam, (20, 30))
    assert up.shape == (20, 30)
    assert up.dtype == np.float32
    assert up.min() >= 0.0
    assert up.max() <= 1.0
    # The top-right quarter is dominated by the 1.0 cell.
    assert up[:5, -5:].mean() > 0.9


def test_upsample_cam_rejects_3d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        upsample_cam(np.zeros((1, 2, 2), dtype=np.float32), (4, 4))
