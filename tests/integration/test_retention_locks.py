"""Retention marks only instance rows no other transaction holds, in id order.

A rejection note or a redirect holds several images' rows, taken in id order
(db.queries.take_instances); retention's UPDATE that marks the instances whose files it
removes took the rows it matched in the order its plan met them, and the two could
deadlock (PostgreSQL then aborts one). A row held is being withdrawn, redirected or
sent now: retention leaves it, and its files, to its next run, and waits for nothing.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from db.engine import get_engine, session_scope
from db.queries import take_instances
from db.schema import Instance, InstanceState
from db.schema import utcnow as now
from tests.conftest import sessions_waiting_on_a_lock
from tests.integration.test_pipeline import make_runtime, spool_instance
from tests.support import wait_for
from worker.retention import RetentionReport, remove_expired_files
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=30)


def _finished_long_ago(database_url: str, instance_ids: list[int]) -> list[Path]:
    """As if they were found not to be assessed 40 days ago (no delivery holds their
    files back); their received files."""
    with session_scope(database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids))
            .values(state=InstanceState.NOT_ASSESSED, finished_at=now() - dt.timedelta(days=40))
        )
        return [Path(session.get_one(Instance, i).spool_path) for i in instance_ids]


def _run(rt: Runtime) -> RetentionReport:
    """A retention run given the node's spool and outbox, as the listener's is."""
    return remove_expired_files(
        rt.database_url,
        older_than=KEEP,
        spool_dir=rt.settings.spool_dir,
        outbox_dir=rt.settings.outbox_dir,
    )


def _removed_at(database_url: str, instance_id: int) -> dt.datetime | None:
    with session_scope(database_url) as session:
        return session.get_one(Instance, instance_id).files_removed_at


def test_a_row_another_transaction_holds_is_left_for_the_next_run(
    tmp_path: Path, tiny_checkpoint: Path, postgres_url: str
) -> None:
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=postgres_url)
    first, held, last = spool_instance(rt), spool_instance(rt, sex="M"), spool_instance(rt)
    first_file, held_file, last_file = _finished_long_ago(rt.database_url, [first, held, last])

    runs: list[RetentionReport] = []
    with Session(get_engine(rt.database_url)) as other, other.begin():
        # what a rejection note or a redirect holds while it works on the image
        take_instances(other, [held])
        retention = threading.Thread(target=lambda: runs.append(_run(rt)))
        retention.start()
        wait_for(
            lambda: not retention.is_alive() or sessions_waiting_on_a_lock(postgres_url),
            timeout=60,
            what="retention's run to end, or to wait on the held row",
        )
        waited = retention.is_alive()
    retention.join(timeout=60)  # (the held row is free now, whatever happened)
    assert not waited, "retention waited on a row another transaction held"
    assert [(r.instances, r.files) for r in runs] == [(2, 2)]
    assert not first_file.exists() and not last_file.exists() and held_file.exists()
    assert _removed_at(rt.database_url, first) is not None
    assert _removed_at(rt.database_url, last) is not None
    assert _removed_at(rt.database_url, held) is None  # still has its file

    again = _run(rt)  # free now: its turn
    assert (again.instances, again.files) == (1, 1)
    assert not held_file.exists() and _removed_at(rt.database_url, held) is not None
