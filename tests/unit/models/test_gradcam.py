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
    # The 1.0 cell's receptive field is centred on input pixel (0, 32) of 64: the top
    # row, the middle column; the map is replicated beyond the last cell.
    assert up[:2, 15:].mean() > 0.9
    assert up[-2:, :15].mean() < 0.6


def _receptive_field_centres(
    model: BoneAgeNet, side: int, cells: list[tuple[int, int]]
) -> list[np.ndarray]:
    """Where in a ``side``-pixel input each ``layer4`` cell looks: the centroid of the
    gradient magnitude of that cell's activations with respect to the input."""
    weights = [np.zeros((side, side)) for _ in cells]
    for seed in range(2):
        x = torch.rand(1, 1, side, side, generator=torch.Generator().manual_seed(seed))
        x.requires_grad_(True)
        maps = model.features(x)
        for weight, (row, col) in zip(weights, cells, strict=True):
            (grad,) = torch.autograd.grad(maps[0, :, row, col].sum(), x, retain_graph=True)
            weight += grad[0, 0].abs().numpy()
    rows, cols = np.indices((side, side))
    return [np.array([(w * rows).sum(), (w * cols).sum()]) / w.sum() for w in weights]


def test_a_cell_is_drawn_at_the_centre_of_its_receptive_field(tiny_model: BoneAgeNet) -> None:
    # an 18 x 18 grid; these cells' receptive fields (435 pixels wide) lie inside it,
    # so the image's border does not pull their centroids inwards
    side = 576
    cells = [(8, 10), (10, 7), (9, 9)]
    centres = _receptive_field_centres(tiny_model, side, cells)
    # drawn on the network input itself, and on crops larger and smaller than it
    for cell, centre, drawn_on in zip(cells, centres, (576, 2000, 300), strict=True):
        cam = np.zeros((side // 32, side // 32), dtype=np.float32)
        cam[cell] = 1.0
        up = upsample_cam(cam, (drawn_on, drawn_on))  # the input: 32 pixels a cell
        peak = np.array(np.unravel_index(int(np.argmax(up)), up.shape), dtype=float)
        # the input pixel the peak stands on (half-pixel centres, as prepare resizes)
        seen_at = (peak + 0.5) * side / drawn_on - 0.5
        assert np.abs(seen_at - centre).max() <= 3.0, (cell, drawn_on, seen_at, centre)


def test_upsample_cam_rejects_3d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        upsample_cam(np.zeros((1, 2, 2), dtype=np.float32), (4, 4))
