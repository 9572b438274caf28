"""BoneAgeNet: shapes, sex input, trunk/head split, builder."""

from __future__ import annotations

import pytest
import torch

from models.net import BoneAgeNet, build_model, fold_batch_norm
from tests.unit.models.helpers import assert_same_results, with_trained_batch_norms


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 128), (77, 50)])
def test_any_input_size_gives_one_output_per_image(
    tiny_model: BoneAgeNet, height: int, width: int
) -> None:
    y = tiny_model(torch.randn(3, 1, height, width), torch.tensor([1.0, 0.0, 1.0]))
    assert y.shape == (3,)


def test_sex_accepts_n_and_n_by_1(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(2, 1, 64, 64)
    flat = tiny_model(x, torch.tensor([1.0, 0.0]))
    column = tiny_model(x, torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(flat, column)


def test_sex_changes_the_output(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(1, 1, 64, 64)
    assert not torch.allclose(tiny_model(x, torch.ones(1)), tiny_model(x, torch.zeros(1)))


def test_forward_is_head_of_pooled_features(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(2, 1, 96, 96)
    male = torch.tensor([0.0, 1.0])
    a = tiny_model.features(x)
    assert a.shape == (2, tiny_model.num_features, 3, 3)
    torch.testing.assert_close(tiny_model.head(a.mean(dim=(2, 3)), male), tiny_model(x, male))


def test_rejects_rgb_input(tiny_model: BoneAgeNet) -> None:
    with pytest.raises(ValueError, match="N, 1, H, W"):
        tiny_model(torch.randn(1, 3, 64, 64), torch.ones(1))


def test_rejects_sex_count_mismatch(tiny_model: BoneAgeNet) -> None:
    x = torch.randn(2, 1, 64, 64)
    with pytest.raises(ValueError, match="sex values"):
        tiny_model(x, torch.ones(3))


@pytest.mark.parametrize(("arch", "features"), [("resnet18", 512), ("resnet50", 2048)])
def test_build_model_arch(arch: str, features: int) -> None:
    model = build_model(arch=arch)
    assert isinstance(model, BoneAgeNet)
    assert model.arch == arch
    assert model.num_features == features
    assert model.conv1.in_channels == 1


def test_build_model_rejects_unknown_arch() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(arch="vgg16")


def test_build_model_rejects_unknown_pretrained() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_model(arch="resnet18", pretrained="coco")  # type: ignore[arg-type]


def test_imagenet_weights_are_summed_over_rgb(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the download is replaced: torchvision's own resnet18, randomly initialised,
    # stands in for the ImageNet one, so the copy and the conv1 sum are checked for real.
    import torchvision

    reference = torchvision.models.resnet18(weights=None).eval()
    real_get_model = torchvision.models.get_model

    def offline_get_model(name: str, **kwargs: object) -> torch.nn.Module:
        if kwargs.get("weights") is None:  # building our own trunk
            return real_get_model(name, **kwargs)
        assert name == "resnet18"
        return reference

    monkeypatch.setattr(torchvision.models, "get_model", offline_get_model)
    model = build_model(arch="resnet18", pretrained="imagenet").eval()
    monkeypatch.setattr(torchvision.models, "get_model", real_get_model)

    grey = torch.rand(2, 1, 64, 64)
    rgb_trunk = torch.nn.Sequential(*list(reference.children())[:-2])
    with torch.no_grad():
        expected = rgb_trunk(grey.expand(-1, 3, -1, -1))
        assert torch.allclose(model.features(grey), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_model_gives_the_same_maps_and_prediction(arch: str) -> None:
    model = with_trained_batch_norms(build_model(arch=arch))
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert_same_results(model, folded, torch.randn(2, 1, 96, 96))


def test_fold_leaves_the_model_as_it_was() -> None:
    model = with_trained_batch_norms(build_model(arch="resnet18"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold_batch_norm(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)


def test_fold_needs_eval_mode() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(build_model(arch="resnet18"))
