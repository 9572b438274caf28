"""BoneAgeNet: a torchvision ResNet trunk with patient sex as a second input.

The network regresses a z-scored bone age (``(months - mean) / sd``); the mean and SD live
in the checkpoint metadata (see :mod:`models.checkpoint`). The trunk ends at ``layer4`` and
feeds only global average pooling, which is what lets :mod:`models.gradcam` compute
Grad-CAM from the head alone.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

logger = logging.getLogger(__name__)

ARCHITECTURES: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")
"""Trunks :func:`build_model` accepts."""

SEX_FEATURES = 32
"""Width of the sex embedding concatenated with the pooled image features."""

FEATURE_STRIDE = 32
"""Input pixels between neighbouring ``layer4`` cells, for every trunk of :data:`ARCHITECTURES`.

Cell ``j``'s receptive field is centred on input pixel ``32 * j`` (pixel centres counted
from 0): ``conv1``, the max pool and the first convolution of ``layer2`` … ``layer4`` each
halve the grid, padded so that output ``i`` is centred on input ``2 * i``.
"""


class BoneAgeNet(nn.Module):
    """ResNet trunk (1-channel input) + sex embedding + MLP head -> z-scored bone age.

    Parameters
    ----------
    arch : str
        One of :data:`ARCHITECTURES`.
    hidden : int
        Width of the hidden layer of the head.
    dropout : float
        Dropout probability in the head (active in training mode only).

    Notes
    -----
    Layer names follow torchvision's ResNet (``conv1``, ``bn1``, ``layer1`` … ``layer4``) so
    ImageNet weights map one-to-one except for ``conv1``, which has one input channel.
    """

    def __init__(self, *, arch: str = "resnet50", hidden: int = 256, dropout: float = 0.2) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
        self.arch = arch
        base = torchvision.models.get_model(arch, weights=None)
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = base.bn1
        self.relu = base.relu
        self.maxpool = base.maxpool
        self.layer1 = base.layer1
        self.layer2 = base.layer2
        self.layer3 = base.layer3
        self.layer4 = base.layer4
        self.num_features: int = base.fc.in_features
        self.sex_embed = nn.Sequential(nn.Linear(1, SEX_FEATURES), nn.ReLU(inplace=True))
        self.regressor = nn.Sequential(
            nn.Linear(self.num_features + SEX_FEATURES, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def features(self, x: Tensor) -> Tensor:
        """Return the ``layer4`` feature maps.

        Parameters
        ----------
        x : Tensor
            Images, shape ``(N, 1, H, W)``.

        Returns
        -------
        Tensor
            Feature maps ``A``, shape ``(N, C, h, w)`` with ``h ≈ H/32``, ``w ≈ W/32``.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected images of shape (N, 1, H, W), got {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def head(self, pooled: Tensor, male: Tensor) -> Tensor:
        """Map pooled features and sex to the z-scored bone age.

        Parameters
        ----------
        pooled : Tensor
            Globally average-pooled ``layer4`` features, shape ``(N, C)``.
        male : Tensor
            1.0 for male, 0.0 for female, shape ``(N,)`` or ``(N, 1)``.

        Returns
        -------
        Tensor
            z-scored bone age, shape ``(N,)``.
        """
        sex = male.reshape(-1, 1).to(dtype=pooled.dtype, device=pooled.device)
        if sex.shape[0] != pooled.shape[0]:
            raise ValueError(f"got {sex.shape[0]} sex values for {pooled.shape[0]} images")
        z = torch.cat([pooled, self.sex_embed(sex)], dim=1)
        return self.regressor(z).squeeze(1)

    def forward(self, x: Tensor, male: Tensor) -> Tensor:
        """Predict the z-scored bone age.

        Parameters
        ----------
        x : Tensor
            Images, shape ``(N, 1, H, W)``; any ``H, W`` ≥ 32.
        male : Tensor
            1.0 for male, 0.0 for female, shape ``(N,)`` or ``(N, 1)``.

        Returns
        -------
        Tensor
            z-scored bone age, shape ``(N,)``.
        """
        return self.head(self.features(x).mean(dim=(2, 3)), male)


def _conv_bn_pairs(model: BoneAgeNet) -> list[tuple[nn.Module, str, str]]:
    """``(owner, conv attribute, batch-norm attribute)`` for every BN that follows a conv."""
    pairs: list[tuple[nn.Module, str, str]] = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            for i in (1, 2, 3):  # BasicBlock has two conv/bn pairs, Bottleneck three
                if hasattr(block, f"conv{i}"):
                    pairs.append((block, f"conv{i}", f"bn{i}"))
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    return pairs


def fold_batch_norm(model: BoneAgeNet) -> BoneAgeNet:
    """An inference copy of ``model`` with every batch norm folded into its convolution.

    In eval mode a batch norm is a fixed per-channel affine map, so it can be absorbed
    into the weights and a bias of the convolution before it: the trunk then makes one
    pass over each activation instead of two (with channels-last memory, 1.2-1.3x faster
    on the development CPU; docs/performance.md). Outputs and ``layer4`` maps (hence
    Grad-CAM) are the same up to float rounding.

    Parameters
    ----------
    model : BoneAgeNet
        The model, in eval mode (the fold uses the running statistics). It is not changed.

    Returns
    -------
    BoneAgeNet
        A new module in eval mode, with ``nn.Identity`` where the batch norms were. It is
        for inference only: training it would no longer normalise.

    Raises
    ------
    ValueError
        If ``model`` is in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (model.eval())")
    folded = copy.deepcopy(model)
    for owner, conv_name, bn_name in _conv_bn_pairs(folded):
        conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected Conv2d + BatchNorm2d, got {type(conv)} + {type(bn)}")
        setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(owner, bn_name, nn.Identity())
    return folded.eval()


def _load_imagenet_trunk(model: BoneAgeNet) -> None:
    """Copy torchvision's ImageNet weights into the trunk, conv1 summed over RGB."""
    weights = torchvision.models.get_model_weights(model.arch).DEFAULT
    logger.info("loading ImageNet weights %s for %s", weights, model.arch)
    reference = torchvision.models.get_model(model.arch, weights=weights)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    # A grey image is R = G = B: summing the RGB filters gives the same response.
    state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise RuntimeError(f"unexpected ImageNet keys: {unexpected}")
    trunk_missing = [k for k in missing if not k.startswith(("sex_embed.", "regressor."))]
    if trunk_missing:
        raise RuntimeError(f"ImageNet weights lack trunk keys: {trunk_missing}")


def build_model(
    *,
    arch: str = "resnet50",
    pretrained: Literal["imagenet"] | None = None,
    hidden: int = 256,
    dropout: float = 0.2,
) -> BoneAgeNet:
    """Build a :class:`BoneAgeNet`.

    Parameters
    ----------
    arch : str
        ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
    pretrained : {"imagenet", None}
        ``"imagenet"`` loads torchvision's ImageNet weights into the trunk (downloaded by
        torchvision on first use); ``None`` leaves a random initialisation.
    hidden : int
        Width of the hidden layer of the head.
    dropout : float
        Dropout probability in the head.

    Returns
    -------
    BoneAgeNet
        The model, in training mode.
    """
    model = BoneAgeNet(arch=arch, hidden=hidden, dropout=dropout)
    if pretrained == "imagenet":
        _load_imagenet_trunk(model)
    elif pretrained is not None:
        raise ValueError(f"pretrained must be 'imagenet' or None, got {pretrained!r}")
    return model
