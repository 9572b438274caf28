"""An image the service decodes but that shows nothing is not assessed, with its reason.

All-zero pixel data, or a 12-bit hand under a window (centre 100, width 10) that sends
nearly every pixel to white, got an SR with a bone age (found in review): the pipeline
refuses them where it decodes them, as it refuses pixel data it cannot decode.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.engine import session_scope
from db.queries import reason_category
from db.schema import InstanceState, Result
from dicom_io.synthetic import make_radiograph_dataset
from models.checkpoint import load_checkpoint, save_checkpoint
from models.phantoms import make_phantom
from tests.integration.test_pipeline import make_runtime, spool_dataset, state_and_reason
from worker.pipeline import OUTSIDE_THE_REPORTED_RANGE, assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    return make_runtime(tmp_path, tiny_checkpoint)


def _hand(blank: bool) -> np.ndarray:
    if blank:
        return np.zeros((256, 256), np.uint16)
    phantom = make_phantom(100.0, male=False, size=256, rng=np.random.default_rng(3))
    return np.round(300 + phantom.image * 3700).astype(np.uint16)  # a detector's 12 bits


@pytest.mark.parametrize(
    ("blank", "window", "shown"),
    [
        (True, None, "100.0% of its pixels are"),
        (False, (100, 10), "of its pixels are white after the window"),
    ],
    ids=["all-zero pixel data", "window centre 100 width 10"],
)
def test_an_image_without_usable_contrast_is_not_assessed(
    runtime: Runtime, blank: bool, window: tuple[int, int] | None, shown: str
) -> None:
    ds = make_radiograph_dataset(
        _hand(blank), sex="F", birth_date=dt.date(2017, 1, 1), study_date=dt.date(2025, 5, 1)
    )
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    instance_id = spool_dataset(runtime, ds, modality="DX")

    outcome = assess_instance(runtime, instance_id)

    assert outcome.state == "not_assessed"
    state, reason = state_and_reason(runtime, instance_id)
    assert state is InstanceState.NOT_ASSESSED
    # said as it is, not as pixel data that cannot be decoded; counted as a pixels reason
    assert reason is not None and reason.startswith("pixel data: the image has no usable contrast")
    assert reason_category(reason) == "pixels"
    assert shown in reason
    with session_scope(runtime.database_url) as session:
        assert list(session.scalars(select(Result))) == []


def test_the_same_hand_in_a_window_that_shows_it_is_assessed(runtime: Runtime) -> None:
    ds = make_radiograph_dataset(
        _hand(False), sex="F", birth_date=dt.date(2017, 1, 1), study_date=dt.date(2025, 5, 1)
    )
    ds.WindowCenter, ds.WindowWidth = 2150, 3700
    outcome = assess_instance(runtime, spool_dataset(runtime, ds, modality="DX"))
    assert outcome.state == "assessed", outcome.reason


def test_an_estimate_outside_the_ages_reported_is_said_in_the_instance_reason(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The note the SR and SC carry reaches the instance's reason too, which `status`
    shows: a model whose output is far above 20 years (its target mean moved)."""
    loaded = load_checkpoint(tiny_checkpoint)
    far = tmp_path / "far.safetensors"
    save_checkpoint(far, loaded.model, dataclasses.replace(loaded.meta, target_mean=10_000.0))
    runtime = make_runtime(tmp_path, far)
    ds = make_radiograph_dataset(
        _hand(False), sex="F", birth_date=dt.date(2017, 1, 1), study_date=dt.date(2025, 5, 1)
    )
    ds.WindowCenter, ds.WindowWidth = 2150, 3700
    instance_id = spool_dataset(runtime, ds, modality="DX")

    assert assess_instance(runtime, instance_id).state == "assessed"
    state, reason = state_and_reason(runtime, instance_id)
    assert state is InstanceState.ASSESSED
    assert reason is not None and OUTSIDE_THE_REPORTED_RANGE in reason
    with session_scope(runtime.database_url) as session:
        [result] = session.scalars(select(Result))
        assert result.bone_age_months == 240.0 and result.sds is None
