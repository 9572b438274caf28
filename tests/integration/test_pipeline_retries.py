"""Trouble a retry may cure (an I/O error reading the spool, a full disk) is retried by
the assess task with its back-off, and spends none of the instance's attempts; a fault
that comes back on the same image still ends it in error after a few.

A real EIO cannot be had on demand: the reader or a builder is made to raise it in
process, as the kernel would raise it to them.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import InstanceState, Result
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import (
    attempt_began_before,
    reconcile_once,
    spool_instance,
)
from tests.integration.test_received_again import received_again
from tests.integration.test_received_again_identity import instance_row
from worker import pipeline, tasks
from worker.heartbeat import HeartbeatThread, process_name
from worker.pipeline import MAX_ATTEMPTS, TRANSIENT_RETRIES, Attempt, assess_instance
from worker.reconciler import FAULT_PAUSE
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def assessments(rt: Runtime, instance_id: int) -> list[int]:
    with session_scope(rt.database_url) as session:
        return list(
            session.scalars(
                select(Result.assessment)
                .where(Result.instance_id == instance_id)
                .order_by(Result.id)
            )
        )


def failing_once(monkeypatch: pytest.MonkeyPatch, name: str, exc: Exception) -> list[Any]:
    """Make ``pipeline.<name>`` raise ``exc`` on its first call; its calls' arguments."""
    real = getattr(pipeline, name)
    calls: list[Any] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, name, once)
    return calls


# -- an I/O error reading the spool ---------------------------------------------------


def test_an_io_error_reading_the_spool_file_is_retried_not_taken_for_bad_dicom(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO while the header is read is not "the file cannot be parsed as DICOM", which
    no retry would look at again: the task retries it, and the retry assesses it."""
    instance_id = spool_instance(runtime)
    calls = failing_once(monkeypatch, "read_image", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(OSError, match="Input/output"):
        assess_instance(runtime, instance_id)
    instance = instance_row(runtime, instance_id)
    assert (instance.state, instance.claimed_by) == (
        InstanceState.PROCESSING,
        process_name("worker"),
    )
    assert (instance.reason or "").startswith("attempt 1 failed: OSError in")
    assert assess_instance(runtime, instance_id).state == "assessed"  # the task's retry
    assert len(calls) == 2
    assert assessments(runtime, instance_id) == [1]


def _as_pydicom_wraps(error: BaseException) -> OSError:
    """``error`` as pydicom raises it from a sequence item it could not read: a bare
    OSError, no errno, ``error`` only in its context."""
    try:
        try:
            raise error
        except BaseException:
            raise OSError("No tag to read at file position 2A4") from None
    except OSError as wrapped:
        wrapped.__context__ = error
        return wrapped


@pytest.mark.parametrize(
    "error",
    [_as_pydicom_wraps(OSError(errno.EIO, "Input/output error")), MemoryError()],
    ids=["EIO in a sequence item", "memory exhausted"],
)
def test_machine_trouble_the_listener_tells_is_not_taken_for_bad_dicom(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    """The listener answers these 0xA700 (dicom_io.scp.local_fault); reading the spool
    file, the worker took them for a file it cannot parse, for good."""
    instance_id = spool_instance(runtime)
    failing_once(monkeypatch, "read_image", error)  # type: ignore[arg-type]
    with pytest.raises(type(error)):
        assess_instance(runtime, instance_id)
    assert instance_row(runtime, instance_id).state is InstanceState.PROCESSING
    assert assess_instance(runtime, instance_id).state == "assessed"


def test_a_file_pydicom_cannot_parse_is_still_not_assessed(runtime: Runtime) -> None:
    """pydicom raises OSError with no errno for a sequence cut short ("No tag to read"):
    that is the file, not the disk, and no retry changes it."""
    instance_id = spool_instance(runtime)
    path = Path(instance_row(runtime, instance_id).spool_path)
    ds = dcmread(path)
    ds.ReferencedStudySequence = [Dataset(), Dataset()]
    ds["ReferencedStudySequence"].is_undefined_length = True
    for item in ds.ReferencedStudySequence:
        item.is_undefined_length_sequence_item = True
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    # in the sequence of undefined length, cut the second item's tag in half
    tag = b"\xfe\xff\x00\xe0"
    second = data.index(tag, data.index(tag) + 4)
    path.write_bytes(data[: second + 2])
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "not_assessed"
    assert (outcome.reason or "").startswith("the file cannot be parsed as DICOM (OSError)")


def test_an_io_error_reading_a_copy_received_again_leaves_it_to_be_compared(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrected copy whose header could not be read (EIO, a stale NFS handle) is not
    taken for one that changes nothing: the task retries, and the retry assesses it
    again."""
    instance_id = spool_instance(runtime, sex="F")
    assert assess_instance(runtime, instance_id).state == "assessed"
    received_again(runtime, instance_id, PatientSex="M")
    failing_once(monkeypatch, "read_image", OSError(errno.ESTALE, "Stale file handle"))
    with pytest.raises(OSError, match="Stale"):
        assess_instance(runtime, instance_id)
    instance = instance_row(runtime, instance_id)
    assert (instance.state, instance.assessment) == (InstanceState.ASSESSED, 1)
    assert instance.received_again_at is not None  # still to be compared
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert assessments(runtime, instance_id) == [1, 2]


# -- retried, not spent ------------------------------------------------------------------


def test_trouble_the_task_retries_spends_no_attempt_until_its_back_off_is_spent(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full for a while: more failures than MAX_ATTEMPTS in a row leave the
    instance to the task's next retry, and the one after the disk is freed assesses it;
    only when every retry the task makes has failed does it end in error."""
    failures = {"left": MAX_ATTEMPTS + 2}
    build = pipeline.build_outputs

    def disk_full_for_a_while(*args: Any, **kwargs: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_outputs", disk_full_for_a_while)
    instance_id = spool_instance(runtime)
    for tried in range(1, MAX_ATTEMPTS + 3):
        with pytest.raises(OSError, match="No space"):
            assess_instance(runtime, instance_id)
        instance = instance_row(runtime, instance_id)
        assert (instance.state, instance.attempts, instance.transient_failures) == (
            InstanceState.PROCESSING,
            0,
            tried,
        )
    assert assess_instance(runtime, instance_id).state == "assessed"
    instance = instance_row(runtime, instance_id)
    assert (instance.attempts, instance.transient_failures) == (1, 0)

    # the disk stays full: the task's last retry ends it
    failures["left"] = TRANSIENT_RETRIES + 1
    other = spool_instance(runtime, sex="M")
    for _ in range(TRANSIENT_RETRIES):
        with pytest.raises(OSError):
            assess_instance(runtime, other)
    assert instance_row(runtime, other).state is InstanceState.PROCESSING
    with pytest.raises(OSError):
        assess_instance(runtime, other)
    instance = instance_row(runtime, other)
    assert instance.state is InstanceState.ERROR
    assert (instance.reason or "").startswith(
        f"processing did not complete in the task's {TRANSIENT_RETRIES + 1} tries, each "
        "failing for trouble a retry may cure, its back-off spent; the last: attempt 1 "
        "failed: OSError in"
    )
    assert instance.transient_failures == 0
    assert assess_instance(runtime, other).state == "skipped"


def test_the_pipeline_gives_up_when_the_task_does(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task's last retry fails while the instance has counted fewer (a database
    failover spent some of the task's retries and none of the instance's): it ends in
    error with the task, not half an hour later when its lease runs out."""
    assert set(tasks.assess.autoretry_for) == set(pipeline.RETRIED_BY_THE_TASK)
    instance_id = spool_instance(runtime)
    monkeypatch.setitem(tasks._state, "runtime", runtime)
    failing_once(monkeypatch, "read_image", OSError(errno.EIO, "Input/output error"))

    done = tasks.assess.apply(args=(instance_id,), retries=TRANSIENT_RETRIES)

    assert done.failed()
    instance = instance_row(runtime, instance_id)
    assert instance.transient_failures == 0 and instance.state is InstanceState.ERROR
    assert (instance.reason or "").startswith(
        f"processing did not complete in the task's {TRANSIENT_RETRIES + 1} tries"
    )


def test_a_fault_after_trouble_that_passed_still_ends_in_error_after_max_attempts(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retried trouble leaves the attempts as they were; a fault that comes back on the
    same image spends them, and ends it in error on the last."""
    calls: list[int] = []

    def disk_then_fault(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) <= 2:
            raise OSError(errno.EIO, "Input/output error")
        raise ValueError("a fault this image brings out")

    monkeypatch.setattr(pipeline, "build_outputs", disk_then_fault)
    instance_id = spool_instance(runtime)
    HeartbeatThread(runtime.database_url, "worker").beat()
    # each try after trouble the task retries is its retry, which takes over the claim
    # the try before took (worker.tasks: held_since); this process, alive, holds it
    tried = Attempt()
    for _ in range(2):
        with pytest.raises(OSError):
            assess_instance(runtime, instance_id, attempt=tried, held=tried.started_at)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        with pytest.raises(ValueError):
            assess_instance(runtime, instance_id, attempt=tried, held=tried.started_at)
        instance = instance_row(runtime, instance_id)
        assert instance.attempts == attempt
        if attempt < MAX_ATTEMPTS:
            assert instance.state is InstanceState.PROCESSING
            attempt_began_before(runtime, instance_id, FAULT_PAUSE.total_seconds() + 1)
            assert reconcile_once(runtime) == [instance_id]
    instance = instance_row(runtime, instance_id)
    assert instance.state is InstanceState.ERROR
    assert (instance.reason or "").startswith(
        f"processing did not complete in {MAX_ATTEMPTS} attempts; the last: "
        f"attempt {MAX_ATTEMPTS} failed: ValueError in"
    )
