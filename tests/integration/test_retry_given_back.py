"""What a task whose retry was not published gives back, and what it leaves.

`worker.tasks.RetriedWithinBudget` gives an image, or a message's deliveries, back to the
reconciler only where the row still shows the claim of the attempt that failed: a claim
another attempt took meanwhile, a back-off a failed send recorded, a delivered object,
are left as they are. On SQLite and PostgreSQL (the times compared are the database's
columns). test_broker_confirms.py runs the tasks themselves against a RabbitMQ that
refuses their retry.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_pipeline import make_runtime, reconcile_once, spool_instance
from worker import pipeline, tasks
from worker.delivery import _claim, _record_failure, claim_seconds
from worker.heartbeat import HeartbeatThread, process_name
from worker.pipeline import Attempt
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

DESTINATION = "PACS@127.0.0.1:104"


@pytest.fixture(params=["sqlite", "postgresql"])
def rt(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    runtime = make_runtime(tmp_path, tiny_checkpoint, database_url=url, destinations=DESTINATION)
    monkeypatch.setitem(tasks._state, "runtime", runtime)
    HeartbeatThread(runtime.database_url, "worker").beat()  # alive: nothing taken back
    return runtime


def _claimed(rt: Runtime, instance_id: int) -> pipeline._Claim:
    claim = pipeline._claim(rt, instance_id)  # as an attempt of this process claims it
    assert isinstance(claim, pipeline._Claim)
    return claim


def test_an_image_is_given_back_only_under_the_claim_of_the_attempt(rt: Runtime) -> None:
    instance_id = spool_instance(rt)
    first = _claimed(rt, instance_id)
    second = _claimed(rt, instance_id)  # another attempt of this process, meanwhile
    with session_scope(rt.database_url) as session:
        session.get_one(Instance, instance_id).reason = "attempt 1 failed: OSError"

    # the first attempt's claim is no longer the row's: left as it is
    tasks._give_back_instance(instance_id, Attempt(first.assessment, first.started_at))
    # nor is another assessment's
    tasks._give_back_instance(instance_id, Attempt(second.assessment + 1, second.started_at))
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by) == (InstanceState.PROCESSING, process_name("worker"))
        assert row.reason == "attempt 1 failed: OSError"
    assert reconcile_once(rt, inference_queue_empty=True) == []

    # another worker's claim, as a worker claims it
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance).where(Instance.id == instance_id).values(claimed_by="worker@other")
        )
    tasks._give_back_instance(instance_id, Attempt(second.assessment, second.started_at))
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by) == (InstanceState.PROCESSING, "worker@other")

    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(claimed_by=process_name("worker"))
        )
    tasks._give_back_instance(instance_id, Attempt(second.assessment, second.started_at))
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by, row.attempts) == (InstanceState.RECEIVED, None, 2)
        assert row.reason == (
            "attempt 1 failed: OSError; retry not published: the reconciler queues it again "
            "once the broker takes messages"
        )
    # at once, the inference queue empty or not: no message is on its way
    assert reconcile_once(rt, inference_queue_empty=False) == [instance_id]


def _deliveries(rt: Runtime, count: int) -> list[int]:
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        return [
            session.execute(
                insert(Delivery)
                .values(
                    instance_id=instance_id,
                    kind=ObjectKind.SR,
                    destination=DESTINATION,
                    sop_instance_uid=f"9.9.{index}",
                    path=f"/nonexistent/9.9.{index}.dcm",
                    state=DeliveryState.PENDING,
                    attempts=0,
                    next_attempt_at=now() - timedelta(minutes=5),
                )
                .returning(Delivery.id)
            ).scalar_one()
            for index in range(count)
        ]


def _marks(
    rt: Runtime, ids: list[int]
) -> list[tuple[DeliveryState, datetime | None, datetime | None]]:
    with session_scope(rt.database_url) as session:
        return [
            (row.state, row.sending_since, row.next_attempt_at)
            for row in (session.get_one(Delivery, i) for i in ids)
        ]


def test_deliveries_are_given_back_only_under_the_claim_of_the_attempt(rt: Runtime) -> None:
    """Of a message's four deliveries, claimed by its attempt: one still under the claim
    is due again, keeping its mark; one whose unanswered send the attempt recorded keeps
    its back-off; one delivered stays so; one another worker claimed after this claim ran
    out keeps that claim."""
    ids = _deliveries(rt, 4)
    under_claim, backed_off, delivered, taken = ids
    began = now()
    claimed, skipped = _claim(rt, ids, force=False)  # the attempt's claim, as it takes it
    assert len(claimed) == 4 and not skipped
    [claimed_at] = {mark for _, mark, _ in _marks(rt, ids)}
    assert claimed_at is not None
    held = timedelta(seconds=claim_seconds(len(ids)))

    _record_failure(rt, backed_off, "no answer", may_have_arrived=True)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivered)
            .values(state=DeliveryState.DELIVERED, next_attempt_at=None, sending_since=None)
        )
        other = claimed_at + held + timedelta(seconds=1)  # after this claim ran out
        session.execute(
            update(Delivery)
            .where(Delivery.id == taken)
            .values(sending_since=other, next_attempt_at=other + held)
        )
    before = _marks(rt, ids)

    tasks._give_back_deliveries(ids, began)

    after = _marks(rt, ids)
    assert after[0] == (DeliveryState.PENDING, claimed_at, None)  # due, its mark kept
    assert after[1:] == before[1:]
    assert after[1][1] == claimed_at and after[1][2] is not None  # its back-off
    with session_scope(rt.database_url) as session:
        assert session.get_one(Delivery, under_claim).attempts == 0
