"""Two attempts at one instance that fail at the same moment: the one holding the claim
counts, the other changes nothing.

Two attempts run at once where the reconciler took an instance back from a slow attempt
and queued it again, or a message came again once its claim had ended. Where each
records its failure (worker.pipeline._note_failed_attempt) it used to read the row's
counts and write back what it read, one more or one less: the later write lost the
earlier's. Then each counted in the row, whichever claim it held: the attempt taken back
cleared the claim of the one holding it, or counted a retried failure in its counts
(found in review). Now the row is taken first and only the claim's holder writes. Real
PostgreSQL: a lock held by the test's own connection holds both attempts where they
write; and a late failure of an attempt taken back, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from db.engine import get_engine
from db.schema import Instance, InstanceState
from tests.conftest import sessions_waiting_on_a_lock
from tests.integration.test_pipeline import make_runtime, spool_instance
from tests.integration.test_received_again_identity import instance_row
from tests.support import wait_for
from worker import pipeline
from worker.pipeline import TRANSIENT_RETRIES, assess_instance
from worker.reconciler import reconcile

pytestmark = pytest.mark.integration

#: How long a step of the test waits for the other side at most (a failure, not a pause).
WAIT_S = 60.0


def test_two_attempts_failing_at_once_with_trouble_the_task_retries_count_once(
    postgres_url: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both attempts claimed the instance (2 attempts), the second's claim over the
    first's, and both fail reading the spool (EIO, retried by the task): the second gives
    its attempt back and counts a retried failure, 1 and 1; the first, whose claim is
    gone, changes nothing (counted too, it left 0 and 2)."""
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=postgres_url)
    instance_id = spool_instance(rt)
    both_claimed = threading.Barrier(3, timeout=WAIT_S)  # the two attempts and the test
    fail_now = threading.Event()

    def read_image(*args: Any, **kwargs: Any) -> Any:
        both_claimed.wait()
        assert fail_now.wait(WAIT_S)
        raise OSError(errno.EIO, "Input/output error")

    failed: list[Exception] = []

    def attempt() -> None:
        try:
            assess_instance(rt, instance_id)
        except Exception as exc:  # what the attempt raised, for the test to look at
            failed.append(exc)

    attempts = [threading.Thread(target=attempt) for _ in range(2)]
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "read_image", read_image)
        for thread in attempts:
            thread.start()
        both_claimed.wait()
        claimed = instance_row(rt, instance_id)
        assert (claimed.state, claimed.attempts) == (InstanceState.PROCESSING, 2)

        with get_engine(postgres_url).connect() as holder, holder.begin():
            holder.execute(select(Instance.id).where(Instance.id == instance_id).with_for_update())
            fail_now.set()
            # each attempt waits on the row now, where it records its failure
            wait_for(
                lambda: sessions_waiting_on_a_lock(postgres_url) == 2,
                timeout=WAIT_S,
                what="both attempts to wait on the instance's row",
            )
        for thread in attempts:
            thread.join(WAIT_S)
            assert not thread.is_alive()

    assert [type(exc) for exc in failed] == [OSError, OSError]
    row = instance_row(rt, instance_id)
    assert (row.state, row.attempts, row.transient_failures) == (InstanceState.PROCESSING, 1, 1)
    assert (row.reason or "").endswith(f"(retried: 1 of {TRANSIENT_RETRIES + 1} tries)")
    # the task's retry assesses it, and the retried failures start over
    assert assess_instance(rt, instance_id).state == "assessed"
    row = instance_row(rt, instance_id)
    assert (row.attempts, row.transient_failures) == (2, 0)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'boneage.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.EIO, "Input/output error"), RuntimeError("a fault")],
    ids=["retried by the task", "fault"],
)
def test_a_late_failure_of_an_attempt_taken_back_changes_nothing(
    database_url: str,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
) -> None:
    """The reconciler took the instance back from a slow attempt and a second attempt
    claimed it; the first then fails. Its failure is not recorded: the second's claim,
    attempts and retried failures stay as they are (the first's failure cleared the
    claim, or counted a retried failure in the second's), and the second assesses it."""
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=database_url)
    instance_id = spool_instance(rt)
    real_decide = pipeline._decide
    gates = {name: (threading.Event(), threading.Event()) for name in ("first", "second")}

    def decide(*args: Any, **kwargs: Any) -> Any:
        """Where the attempt looks at what it read: each waits there for the test."""
        name = threading.current_thread().name
        arrived, go_on = gates[name]
        arrived.set()
        assert go_on.wait(WAIT_S)
        if name == "first":
            raise failure
        return real_decide(*args, **kwargs)

    outcomes: dict[str, object] = {}

    def attempt() -> None:
        try:
            outcomes[threading.current_thread().name] = assess_instance(rt, instance_id).state
        except Exception as exc:  # what the attempt raised, for the test to look at
            outcomes[threading.current_thread().name] = exc

    first = threading.Thread(target=attempt, name="first")
    second = threading.Thread(target=attempt, name="second")
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "_decide", decide)
        first.start()
        assert gates["first"][0].wait(WAIT_S)
        # no heartbeat of the first attempt's worker: its claim has ended
        report = reconcile(rt, lambda _: None, lambda _: None, inference_queue_empty=False)
        assert instance_row(rt, instance_id).state is InstanceState.QUEUED, report
        second.start()
        assert gates["second"][0].wait(WAIT_S)
        held = instance_row(rt, instance_id)
        assert (held.state, held.attempts) == (InstanceState.PROCESSING, 2)

        gates["first"][1].set()
        first.join(WAIT_S)
        assert not first.is_alive()
        assert outcomes["first"] is failure
        after = instance_row(rt, instance_id)
        assert (
            after.state,
            after.claimed_by,
            after.started_at,
            after.attempts,
            after.transient_failures,
            after.reason,
        ) == (
            held.state,
            held.claimed_by,
            held.started_at,
            held.attempts,
            held.transient_failures,
            held.reason,
        )

        gates["second"][1].set()
        second.join(WAIT_S)
        assert not second.is_alive()
    assert outcomes["second"] == "assessed"
