"""A GPU that fails mid-run (a sticky CUDA error: an illegal memory access, an ECC error,
a GPU fallen off the bus) stops its worker, which is restarted, instead of taking every
image it is sent and failing each three times.

No GPU here: the device error is raised where the forward pass would raise it
(``models.predictor.predict_with_cam``), and the predictor is told that it runs on CUDA
where it asks (``models.predictor.is_device_failure``, tested on its own in
tests/unit/models/test_predictor.py). On a CPU the same error stays an ordinary fault.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import torch

import models.predictor
from db.schema import InstanceState
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import attempt_began_before, reconcile_once, spool_instance
from tests.integration.test_received_again_identity import instance_row
from worker import pipeline, tasks
from worker.heartbeat import HeartbeatThread
from worker.pipeline import GIVEN_BACK_FROM_A_FAILED_DEVICE, assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime

ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


def _gpu_fails(monkeypatch: pytest.MonkeyPatch, *, on_cuda: bool = True) -> None:
    """The forward pass raises what a failed GPU raises; ``on_cuda``: the predictor runs
    on a CUDA device as far as telling a device failure goes, and the device, asked
    again, fails the same way."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    monkeypatch.setattr(models.predictor, "predict_with_cam", forward)
    if on_cuda:
        real = models.predictor.is_device_failure
        monkeypatch.setattr(
            models.predictor, "is_device_failure", lambda e, _: real(e, "cuda", probe=forward)
        )


def test_an_image_a_failed_gpu_met_is_given_back_without_spending_an_attempt(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = spool_instance(runtime)
    with monkeypatch.context() as failed:
        _gpu_fails(failed)
        with pytest.raises(models.predictor.DeviceFailure):
            assess_instance(runtime, instance_id)
    instance = instance_row(runtime, instance_id)
    assert (instance.state, instance.claimed_by, instance.attempts) == (
        InstanceState.RECEIVED,
        None,
        0,
    )
    assert (instance.reason or "").startswith("attempt 1 failed: DeviceFailure in models/")
    assert (instance.reason or "").endswith(GIVEN_BACK_FROM_A_FAILED_DEVICE)
    # queued again by the reconciler (a retry's first pause, 5 s, after the attempt
    # began; a restart takes longer), and assessed by a worker whose GPU works
    attempt_began_before(runtime, instance_id, 60)
    assert reconcile_once(runtime) == [instance_id]
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert instance_row(runtime, instance_id).attempts == 1


def test_on_a_cpu_the_same_error_is_an_ordinary_fault(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = spool_instance(runtime)
    HeartbeatThread(runtime.database_url, "worker").beat()
    _gpu_fails(monkeypatch, on_cuda=False)
    with pytest.raises(torch.AcceleratorError):
        assess_instance(runtime, instance_id)
    instance = instance_row(runtime, instance_id)
    assert (instance.state, instance.claimed_by, instance.attempts) == (
        InstanceState.PROCESSING,
        None,
        1,
    )
    assert (instance.reason or "").startswith("attempt 1 failed: AcceleratorError in")


class _Exited(BaseException):
    """What the stand-in for the worker's exit raises, for the test to see."""


def _task_raises_instead_of_exiting(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    """The assess task on ``runtime``, its GPU failing, its exit raising `_Exited`."""
    monkeypatch.setitem(tasks._state, "runtime", runtime)
    _gpu_fails(monkeypatch)

    def exit_to_be_restarted() -> None:
        raise _Exited

    monkeypatch.setattr(tasks, "_exit_to_be_restarted", exit_to_be_restarted)


def test_the_assess_task_stops_the_worker_after_a_failed_gpu(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    instance_id = spool_instance(runtime)
    _task_raises_instead_of_exiting(runtime, monkeypatch)
    with pytest.raises(_Exited):
        tasks.assess.apply(args=(instance_id,))
    assert instance_row(runtime, instance_id).state is InstanceState.RECEIVED
    stopped = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert [r.getMessage() for r in stopped] == [
        f"the GPU failed during an assessment (AcceleratorError: {ILLEGAL_ACCESS}): the "
        "images this worker holds are given back, and it takes no more work and exits "
        "with status 1, to be restarted"
    ]


def test_every_image_the_process_holds_is_given_back_when_its_gpu_fails(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A threads pool's other tasks claimed theirs (an attempt counted each) and would
    not live to give them back: the failed assessment gives back all before the worker stops."""
    failed, *others = [spool_instance(runtime) for _ in range(4)]
    for instance_id in others:  # claimed as the other task threads claim theirs
        assert isinstance(pipeline._claim(runtime, instance_id), pipeline._Claim)
    assert {instance_row(runtime, i).attempts for i in others} == {1}
    _task_raises_instead_of_exiting(runtime, monkeypatch)
    with pytest.raises(_Exited):
        tasks.assess.apply(args=(failed,))
    for instance_id in [failed, *others]:
        instance = instance_row(runtime, instance_id)
        assert (instance.state, instance.claimed_by, instance.attempts) == (
            InstanceState.RECEIVED,
            None,
            0,
        )
        assert (instance.reason or "").startswith("attempt 1 failed: DeviceFailure in models/")
        assert (instance.reason or "").endswith(GIVEN_BACK_FROM_A_FAILED_DEVICE)


def test_a_failed_gpu_ends_the_worker_process_with_status_1() -> None:
    """The exit itself, in a process of its own (the start-up failures' way out)."""
    code = (
        "import os, logging\n"
        "logging.basicConfig()\n"
        "from models.predictor import DeviceFailure\n"
        "from worker import tasks\n"
        "tasks._state['main_pid'] = os.getpid()\n"
        f"tasks._stop_if_the_device_failed(DeviceFailure('AcceleratorError: {ILLEGAL_ACCESS}'))\n"
        "print('still running')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 1, done.stderr
    assert "still running" not in done.stdout
    assert "the GPU failed during an assessment" in done.stderr
