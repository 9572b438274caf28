"""The reconciler takes back only rows no other transaction holds, in id order.

A rejection note or a redirect holds several images' rows, taken in id order
(worker.pipeline, worker.delivery); the reconciler's UPDATE took the rows it matched in
the order its plan met them, and the two could deadlock (PostgreSQL then aborts one).
A row held is being claimed, withdrawn or redirected now: the reconciler leaves it for
its next round, and waits for nothing.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db.engine import get_engine, session_scope
from db.schema import Instance, InstanceState
from db.schema import utcnow as now
from tests.conftest import sessions_waiting_on_a_lock
from tests.integration.test_pipeline import make_runtime, reconcile_once, spool_instance
from tests.support import wait_for

pytestmark = pytest.mark.integration


def _given_up_by_a_worker_gone(database_url: str, instance_ids: list[int]) -> None:
    """As if a worker that died (no heartbeat) had claimed them an hour ago."""
    with session_scope(database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids))
            .values(
                state=InstanceState.PROCESSING,
                claimed_by="worker@gone/0:1",
                started_at=now() - dt.timedelta(hours=1),
            )
        )


def test_a_row_another_transaction_holds_is_left_for_the_next_round(
    tmp_path: Path, tiny_checkpoint: Path, postgres_url: str
) -> None:
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=postgres_url)
    first, held = spool_instance(rt), spool_instance(rt, sex="M")
    _given_up_by_a_worker_gone(rt.database_url, [first, held])

    rounds: list[list[int]] = []
    with get_engine(rt.database_url).connect() as other:
        with other.begin():
            # what a rejection note or a redirect holds while it works on the image
            other.execute(select(Instance.id).where(Instance.id == held).with_for_update())
            reconciler = threading.Thread(target=lambda: rounds.append(reconcile_once(rt)))
            reconciler.start()
            wait_for(
                lambda: not reconciler.is_alive() or sessions_waiting_on_a_lock(postgres_url),
                timeout=60,
                what="the reconciler's round to end, or to wait on the held row",
            )
            waited = reconciler.is_alive()
        reconciler.join(timeout=60)  # (the held row is free now, whatever happened)
    assert not waited, "the reconciler waited on a row another transaction held"
    assert rounds == [[first]]
    with session_scope(rt.database_url) as session:
        assert session.get_one(Instance, held).state is InstanceState.PROCESSING

    assert reconcile_once(rt) == [held]  # free now: the next round takes it back
