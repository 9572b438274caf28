"""Two attempts at one instance that fail at the same moment each count.

Two attempts run at once where the reconciler queued an instance again beside a slow
attempt, or a message came again. Where each records its failure
(worker.pipeline._note_failed_attempt) it used to read the row's counts and write back
what it read, one more or one less: the later write lost the earlier's, so that the
instance kept an attempt it had given back, and counted a retried failure once for two
(it then outlived the task's retries, or gave up an attempt early). Real PostgreSQL: a
lock held by the test's own connection holds both attempts where they write, until each
has read what it read before the fix.
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

pytestmark = pytest.mark.integration

#: How long a step of the test waits for the other side at most (a failure, not a pause).
WAIT_S = 60.0


def test_two_attempts_failing_at_once_with_trouble_the_task_retries_each_count(
    postgres_url: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both attempts claimed the instance (2 attempts), both fail reading the spool (EIO,
    retried by the task): each gives its attempt back and counts a retried failure, 0 and
    2, where the attempt that wrote last left 1 and 1."""
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
    assert (row.state, row.attempts, row.transient_failures) == (InstanceState.PROCESSING, 0, 2)
    assert (row.reason or "").endswith(f"(retried: 2 of {TRANSIENT_RETRIES + 1} tries)")
    # the task's retry assesses it, and the counts start over
    assert assess_instance(rt, instance_id).state == "assessed"
    row = instance_row(rt, instance_id)
    assert (row.attempts, row.transient_failures) == (1, 0)
