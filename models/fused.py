"""The folded trunk as oneDNN fused convolutions: CPU inference in float32.

PyTorch's eager convolution on a CPU hands each call to oneDNN with the weight in
PyTorch's layout, which oneDNN reorders into its own blocked layout on every call; the
ReLU after it, and in a residual block the addition of the shortcut, are then separate
passes over the activation. oneDNN can do all of it in one primitive (post-ops), with the
weight reordered once ahead of time. That is what ``torch.compile``'s freezing pass emits
for a ResNet on a CPU (``torch.ops.mkldnn._convolution_pointwise``); this module builds
the same thing directly from a :class:`~models.net.BoneAgeNet` (each batch norm folded
into its convolution on the way, as :func:`~models.net.fold_batch_norm` does), with no
compiler and no compile time at start.

:func:`cpu_inference_copy` is the entry point: it builds the fused copy, runs it against
the model it was built from on one input and returns it only when the two agree to float
rounding, so a PyTorch or CPU whose oneDNN kernels are missing or behave differently
falls back to the eager module (logged) instead of reporting different numbers.

The fused copy is for inference only (no autograd through the trunk, weights not
trainable) and for the CPU only; its head is a copy of the model's.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from models.net import BoneAgeNet

logger = logging.getLogger(__name__)

__all__ = [
    "FUSED_TOLERANCE",
    "FusedBoneAgeNet",
    "FusedConv",
    "FusedResidual",
    "cpu_inference_copy",
    "fuse_trunk",
    "fused_discrepancy",
    "fusion_available",
    "is_fused",
]

FUSED_TOLERANCE = 1e-4
"""Largest accepted difference between the fused trunk's ``layer4`` maps and the model's,
as a share of the largest map value (float rounding gives a few 1e-6)."""

_POINTWISE_OPS = (
    "_convolution_pointwise",
    "_convolution_pointwise_",
    "_reorder_convolution_weight",
)


def fusion_available() -> str | None:
    """Why this PyTorch cannot run fused oneDNN convolutions, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "PyTorch was built without oneDNN (mkldnn)"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN is switched off (torch.backends.mkldnn.enabled)"
    missing = [name for name in _POINTWISE_OPS if not hasattr(torch.ops.mkldnn, name)]
    if missing:
        return f"this PyTorch lacks torch.ops.mkldnn.{missing[0]}"
    acl = getattr(torch.ops.mkldnn, "_is_mkldnn_acl_supported", None)
    if acl is not None and acl():
        # Arm's Compute Library backs oneDNN there and has no fused post-ops (PyTorch's
        # own compiler leaves these fusions off on it too)
        return "oneDNN runs on Arm Compute Library, which lacks fused convolutions"
    return None


def _folded(conv: nn.Module, bn: nn.Module) -> nn.Conv2d:
    """``conv`` with ``bn`` folded into it (a new module), or ``conv`` if ``bn`` already was."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"expected an nn.Conv2d, got {type(conv).__name__}")
    if isinstance(bn, nn.Identity):
        return conv
    if isinstance(bn, nn.BatchNorm2d):
        return fuse_conv_bn_eval(conv, bn)
    raise TypeError(f"expected a BatchNorm2d (or its folded Identity), got {type(bn).__name__}")


def _conv_output_shape(conv: nn.Conv2d, shape: torch.Size) -> torch.Size:
    """Shape of ``conv``'s output for an input of ``shape`` (worked out, not computed)."""
    x = torch.empty(shape, device="meta")
    weight = conv.weight.detach().to("meta")
    return F.conv2d(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups).shape


class FusedConv(nn.Module):
    """A convolution with its bias and, optionally, a ReLU, as one oneDNN primitive.

    Parameters
    ----------
    conv : torch.nn.Conv2d
        The convolution, any batch norm after it already folded in.
    input_shape : torch.Size
        ``(N, C, H, W)`` it will mostly see: the weight is reordered for it once. Other
        shapes still work (oneDNN reorders as needed) at some cost.
    relu : bool
        Apply a ReLU to the output in the same pass.
    """

    def __init__(self, conv: nn.Conv2d, input_shape: torch.Size, *, relu: bool) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            raise TypeError(f"expected a zero-padded nn.Conv2d, got {conv!r}")
        if isinstance(conv.padding, str):
            raise TypeError(f"expected numeric padding, got {conv.padding!r}")
        # what oneDNN needs besides the tensors: padding, stride, dilation, groups
        self.geometry = (
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            int(conv.groups),
        )
        self.attr = "relu" if relu else "none"
        self.output_shape = _conv_output_shape(conv, input_shape)
        weight = conv.weight.detach().float().contiguous()
        bias = conv.bias.detach().float().clone() if conv.bias is not None else None
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            weight, *self.geometry, list(input_shape)
        )
        # Buffers, not parameters: nothing to train, and kept out of any state dict.
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(conv(x) + bias)`` (or without the ReLU), channels-last out."""
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, *self.geometry, self.attr, [], ""
        )

    def add_relu_into(self, shortcut: Tensor, x: Tensor) -> Tensor:
        """``relu(conv(x) + bias + shortcut)``, written into ``shortcut`` and returned."""
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            shortcut, x, self.weight, self.bias, *self.geometry, "add", 1.0, "relu", [], ""
        )


class FusedResidual(nn.Module):
    """A torchvision ``BasicBlock`` or ``Bottleneck`` as fused convolutions.

    Every convolution but the last runs with its ReLU; the last adds the shortcut and
    applies the block's ReLU in the same primitive, writing into the shortcut's memory
    (the block's input when there is no downsampling convolution: the block overwrites
    its input, which inside the trunk nobody reads again).

    Parameters
    ----------
    block : BasicBlock or Bottleneck
        The block, in eval mode; its batch norms are folded into the convolutions here
        (or already were: ``nn.Identity`` in their place). It is not changed.
    input_shape : torch.Size
        Shape of the block's input, for the weight layouts.
    """

    def __init__(self, block: BasicBlock | Bottleneck, input_shape: torch.Size) -> None:
        super().__init__()
        count = 3 if isinstance(block, Bottleneck) else 2
        convs: list[FusedConv] = []
        shape = input_shape
        for i in range(1, count + 1):
            conv = _folded(getattr(block, f"conv{i}"), getattr(block, f"bn{i}"))
            convs.append(FusedConv(conv, shape, relu=i < count))
            shape = convs[-1].output_shape
        self.convs = nn.ModuleList(convs)
        self.downsample: FusedConv | None = None
        if block.downsample is not None:
            parts = list(block.downsample)
            if len(parts) != 2:
                raise TypeError("FusedResidual needs a downsample of a conv and a batch norm")
            self.downsample = FusedConv(_folded(*parts), input_shape, relu=False)
        self.output_shape = shape

    def forward(self, x: Tensor) -> Tensor:
        """The block's output; ``x`` is overwritten when there is no downsampling."""
        shortcut = self.downsample(x) if self.downsample is not None else x
        y = x
        for conv in self.convs[:-1]:
            y = conv(y)
        last: FusedConv = self.convs[-1]  # type: ignore[assignment]
        return last.add_relu_into(shortcut, y)


class FusedBoneAgeNet(BoneAgeNet):
    """A :class:`~models.net.BoneAgeNet` whose trunk runs as fused convolutions.

    The trunk's weights are laid out once for one image at ``input_size``; a batch runs
    image by image (on a CPU a batch is no faster per image, and a weight laid out for
    another batch size is reordered on every call, 1.4x slower with two threads), so an
    image's result is the same alone and in any batch. The head is a copy of the model's.
    For inference on a CPU in float32 only.

    Parameters
    ----------
    model : BoneAgeNet
        The model as loaded, or :func:`~models.net.fold_batch_norm`'s copy of it; on the
        CPU, float32, eval mode. Its batch norms are folded into the laid-out weights
        (the folded copy is never built whole). It is not changed.
    input_size : int
        Side of the square network input.

    Raises
    ------
    RuntimeError
        When this PyTorch cannot run fused convolutions (:func:`fusion_available`).
    TypeError
        When ``model`` is not a float32 CPU ResNet of torchvision's blocks.
    ValueError
        When ``model`` is in training mode.
    """

    def __init__(self, model: BoneAgeNet, *, input_size: int) -> None:
        reason = fusion_available()
        if reason is not None:
            raise RuntimeError(reason)
        if model.training:
            raise ValueError("a fused trunk needs a model in eval mode")
        weight = model.conv1.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise TypeError("a fused trunk is built from a float32 CPU model")
        nn.Module.__init__(self)  # not BoneAgeNet's: it would build a trunk to throw away
        self.arch = model.arch
        self.num_features = model.num_features
        self.input_size = int(input_size)
        shape = torch.Size((1, int(model.conv1.in_channels), self.input_size, self.input_size))
        self.stem = FusedConv(_folded(model.conv1, model.bn1), shape, relu=True)
        self.maxpool = copy.deepcopy(model.maxpool)
        shape = self.maxpool(torch.empty(self.stem.output_shape, device="meta")).shape
        blocks: list[FusedResidual] = []
        for layer_name in ("layer1", "layer2", "layer3", "layer4"):
            for block in getattr(model, layer_name):
                if not isinstance(block, BasicBlock | Bottleneck):
                    raise TypeError(f"{layer_name} holds a {type(block).__name__}, not a block")
                blocks.append(FusedResidual(block, shape))
                shape = blocks[-1].output_shape
        self.blocks = nn.Sequential(*blocks)
        self.sex_embed = copy.deepcopy(model.sex_embed)
        self.regressor = copy.deepcopy(model.regressor)
        self.eval()

    def features(self, x: Tensor) -> Tensor:
        """Return the ``layer4`` feature maps (see :meth:`BoneAgeNet.features`)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(x.shape)}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("the fused trunk is for inference only (no autograd through it)")
        maps = [self._trunk(x[i : i + 1]) for i in range(x.shape[0])]
        return maps[0] if len(maps) == 1 else torch.cat(maps)

    def _trunk(self, image: Tensor) -> Tensor:
        image = image.contiguous(memory_format=torch.channels_last)
        return self.blocks(self.maxpool(self.stem(image)))


def fuse_trunk(model: BoneAgeNet, *, input_size: int) -> FusedBoneAgeNet:
    """A copy of ``model`` whose trunk runs as oneDNN fused convolutions.

    See :class:`FusedBoneAgeNet`, which this builds; :func:`cpu_inference_copy` also
    checks the copy against ``model`` before it is used.
    """
    return FusedBoneAgeNet(model, input_size=input_size)


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` is a :class:`FusedBoneAgeNet`."""
    return isinstance(model, FusedBoneAgeNet)


def fused_discrepancy(fused: BoneAgeNet, model: BoneAgeNet, *, input_size: int) -> float:
    """Largest difference of the two trunks' ``layer4`` maps on one fixed random image.

    Returns
    -------
    float
        ``max |fused - model| / max |model|`` (0 when they agree exactly).
    """
    generator = torch.Generator().manual_seed(20261203)
    x = torch.rand((1, int(model.conv1.in_channels), input_size, input_size), generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model.features(x)
        got = fused.features(x)
    scale = float(expected.abs().max())
    difference = float((got - expected).abs().max())
    return difference / scale if scale > 0 else difference


def cpu_inference_copy(
    model: BoneAgeNet,
    *,
    input_size: int,
) -> BoneAgeNet | None:
    """The fused copy of ``model`` when it can run here and gives its results, else None.

    Parameters
    ----------
    model : BoneAgeNet
        The model as loaded (or folded), CPU, float32, eval mode. It is not changed.
    input_size : int
        Side of the square network input.

    Returns
    -------
    BoneAgeNet or None
        The fused copy, or None (the reason logged) when this PyTorch cannot build it or
        its ``layer4`` maps differ from ``model``'s by more than :data:`FUSED_TOLERANCE`.
    """
    try:
        fused = fuse_trunk(model, input_size=input_size)
        discrepancy = fused_discrepancy(fused, model, input_size=input_size)
    except (RuntimeError, TypeError, ValueError) as exc:
        logger.warning("fused CPU convolutions unavailable (%s); running the eager model", exc)
        return None
    if not discrepancy <= FUSED_TOLERANCE:  # also catches NaN
        logger.warning(
            "fused CPU convolutions differ from the model by %.2e of the map range "
            "(accepted: %.0e); running the eager model",
            discrepancy,
            FUSED_TOLERANCE,
        )
        return None
    logger.debug("fused CPU convolutions agree with the model to %.1e", discrepancy)
    return fused
