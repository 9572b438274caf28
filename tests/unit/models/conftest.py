"""Fixtures shared by the models unit tests: small models, fixed seeds, few threads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from models.net import BoneAgeNet, build_model


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def tiny_model() -> BoneAgeNet:
    """A randomly initialised resnet18 in eval mode."""
    return build_model(arch="resnet18").eval()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
