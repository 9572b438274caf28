"""Grad-CAM for :class:`~models.net.BoneAgeNet` from a single trunk forward pass.

The trunk's last block feeds only global average pooling ``p_k = mean_ij A_k(i, j)``, so

    dy/dA_k(i, j) = (dy/dp_k) / (H * W)      for every position (i, j).

Grad-CAM's channel weight ``alpha_k = mean_ij dy/dA_k(i, j)`` is therefore
``(dy/dp_k) / (H * W)``: the gradient is taken through the small head only, with the pooled
features as a leaf, and the trunk runs once under :func:`torch.inference_mode`.
:func:`full_autograd_gradcam` is the textbook version (hooks, back-propagation through the
whole graph) kept as the reference for tests and benchmarks.

Under a lower precision only the trunk runs in it (the caller's autocast); the pooling and
the head run in float32. :func:`predict_z` is the same prediction without the maps, for
``evaluate`` and ``train``'s validation: they report the numbers the service computes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from models.net import FEATURE_STRIDE, BoneAgeNet

logger = logging.getLogger(__name__)


def _as_sex(male: Tensor | float | bool, n: int, device: torch.device) -> Tensor:
    sex = torch.as_tensor(male, dtype=torch.float32, device=device).reshape(-1)
    if sex.numel() == 1 and n > 1:
        sex = sex.expand(n)
    return sex


def _cam_from(a: Tensor, alpha: Tensor) -> Tensor:
    """ReLU of the alpha-weighted sum of maps, scaled to [0, 1] per image (zero stays zero)."""
    cam = torch.relu(torch.einsum("nc,nchw->nhw", alpha, a))
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), cam)


def _pool(maps: Tensor) -> Tensor:
    """Global average pooling of the ``layer4`` maps, in float32 whatever the trunk ran in."""
    return maps.float().mean(dim=(2, 3))


def _float32_head(model: BoneAgeNet, pooled: Tensor, male: Tensor | float | bool) -> Tensor:
    """The head on float32 pooled features, with any autocast of the caller switched off:
    in bfloat16 it would round the output to 8 significant bits (steps of 0.32 months
    between 14 and 17 years with the default target SD of 41 months)."""
    with torch.autocast(pooled.device.type, enabled=False):
        return model.head(pooled, _as_sex(male, pooled.shape[0], pooled.device))


def predict_z(model: BoneAgeNet, x: Tensor, male: Tensor | float | bool) -> Tensor:
    """Predict z-scored bone age as :func:`predict_with_cam` does, without the maps.

    The trunk runs under the caller's autocast, if any (the worker's precision); pooling
    and the head in float32. The result equals :func:`predict_with_cam`'s prediction.

    Parameters
    ----------
    model : BoneAgeNet
        The model, in eval mode.
    x : Tensor
        Images, shape ``(N, 1, H, W)``, on the model's device.
    male : Tensor or float or bool
        1.0 for male, 0.0 for female: shape ``(N,)``, ``(N, 1)`` or a scalar for all.

    Returns
    -------
    Tensor
        z-scored bone age, shape ``(N,)``, float32, no grad.
    """
    with torch.inference_mode():
        return _float32_head(model, _pool(model.features(x)), male)


def predict_with_cam(
    model: BoneAgeNet, x: Tensor, male: Tensor | float | bool
) -> tuple[Tensor, Tensor]:
    """Predict z-scored bone age and Grad-CAM maps from one trunk forward pass.

    Parameters
    ----------
    model : BoneAgeNet
        The model; put it in eval mode first (dropout in the head would otherwise make the
        gradient random).
    x : Tensor
        Images, shape ``(N, 1, H, W)``, on the model's device.
    male : Tensor or float or bool
        1.0 for male, 0.0 for female: shape ``(N,)``, ``(N, 1)`` or a scalar for all.

    Returns
    -------
    prediction : Tensor
        z-scored bone age, shape ``(N,)``, float32, no grad.
    cam : Tensor
        Grad-CAM maps on the ``layer4`` grid, shape ``(N, h, w)``, float32 in [0, 1]
        (an all-zero map stays zero).
    """
    with torch.inference_mode():
        a_inf = model.features(x)
    # Leave inference mode (even if the caller is in it) for the head-only gradient;
    # the clone turns the inference tensor into an ordinary one autograd may use.
    # Autocast (if the caller enabled it for the trunk) is switched off: the head and the
    # CAM weights are computed in float32.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(a_inf.device.type, enabled=False),
    ):
        a = a_inf.float().clone()
        pooled = _pool(a).requires_grad_(True)
        y = _float32_head(model, pooled, male)
        (grad_p,) = torch.autograd.grad(y.sum(), pooled)
        # Each image's output depends on its own pooled vector only, so the gradient of the
        # sum is the per-image gradient.
        alpha = grad_p / float(a.shape[2] * a.shape[3])
        cam = _cam_from(a, alpha.detach())
    return y.detach(), cam.detach()


def full_autograd_gradcam(
    model: BoneAgeNet, x: Tensor, male: Tensor | float | bool
) -> tuple[Tensor, Tensor]:
    """Reference Grad-CAM: hook ``layer4`` and back-propagate through the whole graph.

    Parameters
    ----------
    model : BoneAgeNet
        The model, in eval mode.
    x : Tensor
        Images, shape ``(N, 1, H, W)``.
    male : Tensor or float or bool
        1.0 for male, 0.0 for female.

    Returns
    -------
    prediction : Tensor
        z-scored bone age, shape ``(N,)``.
    cam : Tensor
        Grad-CAM maps, shape ``(N, h, w)``, in [0, 1].
    """
    stored: dict[str, Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: Tensor) -> None:
        output.retain_grad()
        stored["a"] = output

    handle = model.layer4.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            y = model(x, _as_sex(male, x.shape[0], x.device))
            model.zero_grad(set_to_none=True)
            y.sum().backward()
    finally:
        handle.remove()
    a = stored["a"]
    assert a.grad is not None
    alpha = a.grad.float().mean(dim=(2, 3))
    model.zero_grad(set_to_none=True)
    return y.detach(), _cam_from(a.detach().float(), alpha)


def _cell_weights(cells: int, pixels: int, input_size: int, stride: int) -> np.ndarray:
    """``(pixels, cells)`` bilinear weights along one axis: pixel ``y`` of ``pixels``
    spanning the network input takes the map at feature coordinate ``u / stride``, where
    ``u = (y + 0.5) * input_size / pixels - 0.5`` is the input pixel it covers (the
    half-pixel centres of :func:`~models.preprocess.prepare`'s resize); beyond the first
    and the last cell's centre the map is replicated."""
    u = (np.arange(pixels, dtype=np.float64) + 0.5) * (input_size / pixels) - 0.5
    f = np.clip(u / stride, 0.0, cells - 1)
    low = np.floor(f).astype(np.intp)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((pixels, cells), dtype=np.float64)
    rows = np.arange(pixels)
    np.add.at(weights, (rows, low), 1.0 - (f - low))
    np.add.at(weights, (rows, high), f - low)
    return weights.astype(np.float32)


def upsample_cam(
    cam: np.ndarray,
    shape: Sequence[int],
    *,
    input_size: int | None = None,
    stride: int = FEATURE_STRIDE,
) -> np.ndarray:
    """Resize a Grad-CAM map bilinearly onto the image the network saw (or a resize of it),
    each cell drawn at the centre of its receptive field.

    Cell ``j`` of a ``layer4`` map is centred on network-input pixel ``stride * j``
    (:data:`~models.net.FEATURE_STRIDE`), not on the middle of the ``j``-th of ``h``
    equal strips, where a plain bilinear resize draws it: half a cell (16 input pixels)
    lower and further right, 60 pixels on a 2000-pixel crop.

    Parameters
    ----------
    cam : numpy.ndarray
        Map of shape ``(h, w)``.
    shape : sequence of int
        Target ``(H, W)``, covering the whole network input.
    input_size : int, optional
        Side of the square network input the map was computed on; by default
        ``stride`` times the map's side.
    stride : int
        Network-input pixels between neighbouring cells.

    Returns
    -------
    numpy.ndarray
        float32 map of shape ``(H, W)``, clipped to the input's value range.
    """
    if cam.ndim != 2:
        raise ValueError(f"cam must be 2-D, got shape {cam.shape}")
    height, width = int(shape[0]), int(shape[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"target shape must be positive, got {tuple(shape)}")
    if input_size is not None and input_size <= 0:
        raise ValueError(f"input_size must be positive, got {input_size}")
    rows, cols = cam.shape
    along_y = _cell_weights(rows, height, input_size or rows * stride, stride)
    along_x = _cell_weights(cols, width, input_size or cols * stride, stride)
    out = along_y @ np.asarray(cam, dtype=np.float32) @ along_x.T
    # bilinear weights are convex, so only rounding can leave the input's range
    return np.clip(out, float(cam.min()), float(cam.max()), out=out)
