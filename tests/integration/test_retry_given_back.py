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
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy import insert, update

from db.engine import session_scope
from db.queries import database_now
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_pipeline import (
    attempt_began_before,
    make_runtime,
    reconcile_once,
    spool_instance,
)
from tests.integration.test_received_again import received_again
from worker import pipeline, tasks
from worker.delivery import Claim, _claim, _record_failure, claim_seconds
from worker.heartbeat import HeartbeatThread, process_name
from worker.messaging import mark_queued
from worker.pipeline import Attempt
from worker.reconciler import reconcile, retry_pause
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


def _claimed(rt: Runtime, instance_id: int, held: datetime | None = None) -> pipeline._Claim:
    # as an attempt of this process claims it (``held``: the task's retry of the try that
    # took that claim; no other attempt may take it over while this process lives)
    claim = pipeline._claim(rt, instance_id, held)
    assert isinstance(claim, pipeline._Claim)
    return claim


def _published_at(rt: Runtime) -> datetime:
    """The time the listener's enqueuer stamps a round with: the database's clock, as a
    claim's (worker.messaging.Enqueuer)."""
    with session_scope(rt.database_url) as session:
        return database_now(session)


def test_an_image_is_given_back_only_under_the_claim_of_the_attempt(rt: Runtime) -> None:
    instance_id = spool_instance(rt)
    first = _claimed(rt, instance_id)
    second = _claimed(rt, instance_id, first.started_at)  # another attempt, meanwhile
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
        assert (
            row.reason
            == "attempt 1 failed: OSError; retry not published: given back to be queued again"
        )
    # once the retry's pause is over, the inference queue empty or not: no message is on
    # its way
    assert reconcile_once(rt, inference_queue_empty=False) == []
    attempt_began_before(rt, instance_id, retry_pause(0).total_seconds() + 1)
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
    claim = Claim()
    claimed, skipped = _claim(rt, ids, force=False, claim=claim)  # the attempt's, as taken
    assert len(claimed) == 4 and not skipped
    [(claimed_at, until)] = {(mark, end) for _, mark, end in _marks(rt, ids)}
    assert (claim.claimed_at, claim.until) == (claimed_at, until)  # as committed
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

    tasks._give_back_deliveries(ids, claim)

    after = _marks(rt, ids)
    assert after[0] == (DeliveryState.PENDING, claimed_at, None)  # due, its mark kept
    assert after[1:] == before[1:]
    assert after[1][1] == claimed_at and after[1][2] is not None  # its back-off
    with session_scope(rt.database_url) as session:
        assert session.get_one(Delivery, under_claim).attempts == 0


def test_no_claim_is_given_back_by_an_attempt_whose_own_never_committed(rt: Runtime) -> None:
    """The database away as a `deliver` claims its rows (its claim's statement failed),
    another worker, with a copy of the message, claims them a moment later and sends
    them. The first one's retry, not published, gives back nothing: it took no claim
    (its `Claim` is empty). It used to take any claim made after it began, a claim's
    length long, for its own, and ended the second's: the reconciler's next round had a
    third worker send the same SR and SC while the second was sending them
    (test_broker_confirms.py runs it with a real claim cut short)."""
    ids = _deliveries(rt, 2)
    never = Claim()  # the first attempt's: nothing committed
    other = Claim()
    claimed, _ = _claim(rt, ids, force=False, claim=other)  # the second's, after it
    assert len(claimed) == 2 and other.claimed_at is not None
    before = _marks(rt, ids)

    tasks._give_back_deliveries(ids, never)

    assert _marks(rt, ids) == before
    sent: list[int] = []
    reconcile(rt, lambda _: None, sent.extend, inference_queue_empty=True)
    assert sent == []  # not due: the second worker is sending them

    tasks._give_back_deliveries(ids, other)  # the second's own claim, given back
    assert _marks(rt, ids) == [(DeliveryState.PENDING, other.claimed_at, None)] * 2


def _as_if_ago(rt: Runtime, instance_id: int, seconds: float) -> None:
    """As if all that the instance's row dates (its reception, a copy received again,
    its queueing, its last attempt) had happened ``seconds`` earlier."""
    shift = timedelta(seconds=seconds)
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        row.received_at -= shift
        for column in ("received_again_at", "queued_at", "started_at"):
            if (value := getattr(row, column)) is not None:
                setattr(row, column, value - shift)


def _given_back(rt: Runtime, instance_id: int, transient_failures: int = 1) -> None:
    """An attempt claims the instance, fails for the ``transient_failures``-th time for
    trouble the task retries (as worker.pipeline counts it), and its task, whose retry
    was not published, gives the instance back."""
    claim = _claimed(rt, instance_id)
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        row.attempts -= 1
        row.transient_failures = transient_failures
        row.reason = f"attempt 1 failed: OSError (retried: {transient_failures} of 21 tries)"
    tasks._give_back_instance(instance_id, Attempt(claim.assessment, claim.started_at))
    with session_scope(rt.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.RECEIVED


def test_an_image_given_back_before_its_round_is_marked_stays_received(rt: Runtime) -> None:
    """The listener's enqueuer publishes an image and goes on with its round; a worker
    takes the message at once, its attempt fails for trouble the task retries, its retry
    is refused, and it gives the image back, `received`; then the round marks what it
    published `queued`. The attempt began after the publish: it took that message, and
    the image stays `received`, which the reconciler queues again once the retry's pause
    is over, the inference queue empty or not. Marked `queued`, it had no message, and
    waited for an empty inference queue (hours, in a backlog). An image given back before
    the publish (a copy of it received since) is the round's: `queued`."""
    instance_id, earlier = spool_instance(rt), spool_instance(rt, sex="M")
    _given_back(rt, earlier)
    published_at = _published_at(rt)  # the round's, taken before its first message
    _given_back(rt, instance_id)
    mark_queued(rt.database_url, [instance_id, earlier], published_at)

    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by) == (InstanceState.RECEIVED, None)
        assert row.queued_at == published_at  # its timeline still shows the publish
        assert session.get_one(Instance, earlier).state is InstanceState.QUEUED
    assert reconcile_once(rt, inference_queue_empty=False) == []  # its pause not over
    _as_if_ago(rt, instance_id, retry_pause(1).total_seconds() + 1)
    assert reconcile_once(rt, inference_queue_empty=False) == [instance_id]


def test_an_image_given_back_then_received_again_is_queued_once(rt: Runtime) -> None:
    """A copy of an image received while the image is given back: the listener's enqueuer
    publishes it, and marks it `queued`. The reconciler leaves it to the enqueuer, as it
    leaves a new image, where both published it: two messages, two attempts each
    claiming the image (worker.pipeline takes any unfinished one), the image assessed
    twice and its attempts counted twice. Where the copy's message is lost (the listener
    restarted before the broker took it), the reconciler queues the image once the copy
    has waited as long as a new image would (BONEAGE_REQUEUE_AFTER_SECONDS)."""
    published, lost = spool_instance(rt), spool_instance(rt, sex="M")
    for instance_id in (published, lost):
        _given_back(rt, instance_id)
        _as_if_ago(rt, instance_id, retry_pause(1).total_seconds() + 1)  # its pause over
        received_again(rt, instance_id)
    assert reconcile_once(rt, inference_queue_empty=False) == []

    mark_queued(rt.database_url, [published], _published_at(rt))  # the enqueuer's round
    with session_scope(rt.database_url) as session:
        assert session.get_one(Instance, published).state is InstanceState.QUEUED
    assert reconcile_once(rt, inference_queue_empty=False) == []

    _as_if_ago(rt, lost, rt.settings.requeue_after_seconds + 1)
    assert reconcile_once(rt, inference_queue_empty=False) == [lost]


def test_an_image_received_again_during_the_attempt_is_given_back_received(
    rt: Runtime,
) -> None:
    """A copy of the image comes while an attempt assesses it: the listener's enqueuer
    publishes it while the row is `processing` (its ``queued_at`` kept), and that message
    is refused (another attempt holds the image) and acknowledged. The attempt fails, its
    retry is refused, and its task gives the image back `received`: the reconciler
    queues it once the copy is as old as a lost one, however long a backlog keeps the
    inference queue from emptying. Given back `queued`, for the refused message to take,
    it waited for an empty inference queue (found in review)."""
    instance_id = spool_instance(rt)
    mark_queued(rt.database_url, [instance_id], _published_at(rt))  # the listener's first
    claim = _claimed(rt, instance_id)  # its attempt took it
    received_again(rt, instance_id)  # a copy, while it is assessed
    mark_queued(rt.database_url, [instance_id], _published_at(rt))  # the copy's message
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        queued_at = row.queued_at
        row.transient_failures = 1

    tasks._give_back_instance(instance_id, Attempt(claim.assessment, claim.started_at))

    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by) == (InstanceState.RECEIVED, None)
        assert row.queued_at == queued_at
        assert (row.reason or "").endswith(tasks.RETRY_NOT_PUBLISHED.removeprefix("; "))
    assert reconcile_once(rt, inference_queue_empty=False) == []  # the copy is recent
    # later: a backlog keeps the inference queue busy, and the image is queued again
    _as_if_ago(rt, instance_id, rt.settings.requeue_after_seconds + 1)
    assert reconcile_once(rt, inference_queue_empty=False) == [instance_id]


@pytest.mark.parametrize("transient_failures", [1, 3, 7, 20])
def test_an_image_given_back_waits_the_back_off_of_the_retry_not_published(
    rt: Runtime, transient_failures: int
) -> None:
    """The reconciler queues an image given back once the pause that the task's retry
    would have waited after that many transient failures is over (since the attempt
    began), where it queued it at its next round: its message starts Celery's count of
    retries again at 0, and a broker refusing the retries while the storage failed spent
    the 21 tries on rounds a minute apart, where the back-off (5 s doubling to 5 min)
    takes up to about 75 minutes. The pause is the task's own back-off."""
    pause = retry_pause(transient_failures)
    assert pause == timedelta(
        seconds=get_exponential_backoff_interval(
            factor=tasks.assess.retry_backoff,
            retries=transient_failures - 1,  # the retries before this one's
            maximum=tasks.assess.retry_backoff_max,
            full_jitter=False,
        )
    )
    instance_id = spool_instance(rt)
    _given_back(rt, instance_id, transient_failures)
    assert reconcile_once(rt, inference_queue_empty=True) == []
    _as_if_ago(rt, instance_id, pause.total_seconds() - 3)
    assert reconcile_once(rt, inference_queue_empty=True) == []
    _as_if_ago(rt, instance_id, 4)
    assert reconcile_once(rt, inference_queue_empty=True) == [instance_id]
