"""Shared fixtures for the dicom_io unit tests."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
from pydicom import Dataset

from dicom_io.content import BoneAgeFinding
from dicom_io.synthetic import make_radiograph_dataset

MODEL_ID = "3f" * 32
BIRTH_DATE = datetime.date(2014, 3, 2)
STUDY_DATE = datetime.date(2024, 7, 1)


def hand_like(height: int = 96, width: int = 64, seed: int = 0) -> np.ndarray:
    """A float [0, 1] image with a bright blob on a dark background, bone bright."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    blob = np.exp(
        -(((yy - height / 2) / (height / 4)) ** 2 + ((xx - width / 2) / (width / 5)) ** 2)
    )
    return np.clip(0.1 + 0.8 * blob + 0.02 * rng.standard_normal((height, width)), 0.0, 1.0)


@pytest.fixture
def finding() -> BoneAgeFinding:
    return BoneAgeFinding(
        bone_age_months=124.3,
        chronological_age_months=123.0,
        sds=0.14,
        intervals={0.9: (110.2, 138.9), 0.8: (114.0, 134.0)},
        model_id=MODEL_ID,
        model_name="BoneAgeNet ResNet-50",
        model_version="1.2.0",
        model_trained=True,
        laterality="L",
    )


@pytest.fixture
def untrained_finding() -> BoneAgeFinding:
    return BoneAgeFinding(
        bone_age_months=60.0,
        chronological_age_months=None,
        sds=None,
        model_id=MODEL_ID,
        model_name="BoneAgeNet ResNet-50",
        model_version="0.0.0",
        model_trained=False,
    )


@pytest.fixture
def source() -> Dataset:
    return make_radiograph_dataset(
        hand_like(), birth_date=BIRTH_DATE, study_date=STUDY_DATE, sex="F", laterality="L"
    )
