"""Helpers shared by the models unit tests."""

from __future__ import annotations

import torch

from models.net import BoneAgeNet


def with_trained_batch_norms(model: BoneAgeNet, *, seed: int = 7) -> BoneAgeNet:
    """Give every batch norm statistics and an affine map far from the identity; eval mode.

    A freshly built model's batch norms are the identity in eval mode, so folding them
    (or anything built on the fold) would be checked against nothing.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.3 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model.eval()


def assert_same_results(reference: BoneAgeNet, other: BoneAgeNet, x: torch.Tensor) -> None:
    """``other`` gives ``reference``'s ``layer4`` maps, bone age and Grad-CAM maps.

    Maps to 1e-5 of their range, z-scored ages to 1e-4 (relative), heat maps to 1e-4:
    what float rounding moves between two ways of computing the same network.
    """
    from models.gradcam import predict_with_cam

    male = torch.tensor([float(i % 2 == 0) for i in range(x.shape[0])])
    with torch.inference_mode():
        a, a_other = reference.features(x), other.features(x)
    assert a_other.shape == a.shape
    torch.testing.assert_close(a_other, a, rtol=0, atol=1e-5 * float(a.abs().max()))
    z, cam = predict_with_cam(reference, x, male)
    z_other, cam_other = predict_with_cam(other, x, male)
    torch.testing.assert_close(z_other, z, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cam_other, cam, rtol=0, atol=1e-4)
