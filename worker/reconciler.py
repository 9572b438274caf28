"""The reconciler: finds work whose broker message was lost, and queues it again.

Messages are lost when the broker restarts without persistence, when a worker
is killed while holding one (embedded broker), or when the broker was down as an
instance arrived. The database is the source of truth; the broker is only a
doorbell. Re-queueing is safe because tasks are idempotent.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, String, case, literal, or_, select, true, update

from db.engine import session_scope
from db.queries import database_now
from db.schema import FINISHED, Delivery, DeliveryState, Heartbeat, Instance, InstanceState
from worker.heartbeat import alive, claim_holders
from worker.messaging import failure_name
from worker.runtime import Runtime

logger = logging.getLogger(__name__)

#: An instance `processing` for longer than this is assumed orphaned, whatever its worker.
PROCESSING_LEASE = timedelta(minutes=30)


def claim_ended(current: datetime, live_workers: Select[str]) -> ColumnElement[bool]:
    """Whether the attempt that claimed a `processing` instance holds it no longer, by
    ``current`` (the database's clock, which dated the claim): its lease ran out, or the
    worker that claimed it is not among ``live_workers`` (the names of the processes whose
    heartbeat is fresh). The reconciler takes such an instance back, and a message for it
    may claim it (worker.pipeline); an instance whose claim has not ended is another
    attempt's, being assessed now."""
    return (Instance.started_at < current - PROCESSING_LEASE) | Instance.claimed_by.not_in(
        live_workers
    )


#: The reason of an instance taken back from a worker that died while it may have held
#: other images (:func:`reconcile`), until its next attempt ends.
DIED_HOLDING_OTHERS = (
    "its worker died while it may have held other images too: assessed alone from now "
    "on, that attempt not counted"
)
#: What the reason of an instance taken back from a worker that died holding it alone
#: says after "attempt <n>", until its next attempt ends: the error it ends in after its
#: last attempt quotes it.
DIED = " ended with its worker (killed, out of memory, or crashed)"


def worker_died(live_workers: Select[str]) -> ColumnElement[bool]:
    """Whether a `processing` instance's claim is that of a worker no longer among
    ``live_workers`` (killed, out of memory, crashed): not a live worker's claim whose
    lease ran out, which is the image's own doing."""
    return (
        (Instance.state == InstanceState.PROCESSING)
        & Instance.claimed_by.is_not(None)
        & Instance.claimed_by.not_in(live_workers)
    )


def died_reason() -> ColumnElement[str]:
    """The reason of an instance whose claim's worker died: "attempt <n>" and :data:`DIED`."""
    return literal("attempt ", String()) + Instance.attempts.cast(String) + literal(DIED, String())


#: How long past its due time a pending delivery waits for its message while the
#: delivery queue holds others (:func:`reconcile`): then it is taken for lost.
DELIVERY_LOST_AFTER = timedelta(minutes=15)

#: When this process last published each pending delivery (time.monotonic), for
#: :func:`_not_published_lately`.
_published_lately: dict[tuple[str, int], float] = {}
_published_lock = threading.Lock()  # rounds of a listener's thread and of a task


def _not_published_lately(
    database_url: str, groups: list[list[int]], queue_empty: bool
) -> list[list[int]]:
    """Of the groups of pending deliveries due long enough ago, those to publish: every
    one where the delivery queue is empty; else those this process has not published
    in the last :data:`DELIVERY_LOST_AFTER` (their message may still wait in the
    queue: a backlog longer than that had every one of them published again at each
    round). Forgets the deliveries no longer pending."""
    pending = {(database_url, i) for group in groups for i in group}
    recent = time.monotonic() - DELIVERY_LOST_AFTER.total_seconds()
    with _published_lock:
        for key in {k for k in _published_lately if k[0] == database_url} - pending:
            del _published_lately[key]
        if queue_empty:
            return groups
        return [
            group
            for group in groups
            if not all(_published_lately.get((database_url, i), -math.inf) > recent for i in group)
        ]


#: An attempt that failed for a fault gives its instance up (worker.pipeline); it is
#: queued again at the first round this long after the attempt began, so that a fault
#: that passes (a device short of memory for a moment) may pass, and one that does not
#: ends the instance in `error` within minutes, not hours.
FAULT_PAUSE = timedelta(seconds=60)

#: The back-off of the assess task's retries (worker.tasks): the first waits at most 5 s,
#: each next one at most twice as long, up to 5 minutes.
RETRY_BACKOFF_SECONDS = 5
RETRY_BACKOFF_MAX_SECONDS = 300


def retry_pause(transient_failures: int) -> timedelta:
    """The longest the assess task's retry waits after the attempt that failed for the
    ``transient_failures``-th time (Celery's exponential back-off, before its jitter)."""
    exponent = min(max(0, transient_failures - 1), 16)
    return timedelta(seconds=min(RETRY_BACKOFF_MAX_SECONDS, RETRY_BACKOFF_SECONDS * 2**exponent))


def _retry_pause_over(current: datetime) -> ColumnElement[bool]:
    """Whether the pause of `retry_pause` for an instance's ``transient_failures`` has
    passed since its last attempt began, by ``current``: one comparison per step of the
    back-off, then its cap (a portable statement: no interval arithmetic in SQL)."""
    steps: list[ColumnElement[bool]] = []
    failures = 1
    while retry_pause(failures) < timedelta(seconds=RETRY_BACKOFF_MAX_SECONDS):
        steps.append(
            (Instance.transient_failures <= failures)
            & (Instance.started_at < current - retry_pause(failures))
        )
        failures += 1
    return or_(*steps, Instance.started_at < current - retry_pause(failures))


@dataclass(frozen=True)
class ReconcileReport:
    """What a round queued, and what it found to queue and could not publish, and why
    (``failure``: the broker away or refusing; None when it took every message). What
    was not published stays for the next round."""

    instances: list[int]
    deliveries: list[int]
    instances_not_published: list[int] = field(default_factory=list)
    deliveries_not_published: list[int] = field(default_factory=list)
    failure: Exception | None = None


def reconcile(
    rt: Runtime,
    enqueue_assess: Callable[[int], None],
    enqueue_delivery: Callable[[Sequence[int]], None],
    *,
    inference_queue_empty: bool,
    delivery_queue_empty: bool = True,
    startup: bool = False,
) -> ReconcileReport:
    """Re-queue instances and deliveries that have no message in flight.

    Parameters
    ----------
    inference_queue_empty
        Whether the broker's inference queue is empty: `queued` instances are only
        re-queued then, since otherwise their message may simply be waiting.
    delivery_queue_empty
        Whether the broker's delivery queue is empty: pending deliveries due 30 s ago
        are published again then; while it holds messages, only those due
        :data:`DELIVERY_LOST_AFTER` ago, since the others' messages may be waiting in
        it. Each round published every one of a backlog again (`retry-deliveries`
        after a weekend's outage, a `reprocess --send`), some 25 000 messages for 5 000
        images drained in ten minutes, each a claim's transaction.
    startup
        At start-up of the whole node nothing can be in flight: everything unfinished
        is re-queued at once.
    """
    settings = rt.settings
    with session_scope(rt.database_url) as session:
        # The database's clock, whichever host this runs on: the instances' times
        # compared here are dated by it (by the listener, the workers, this round), and
        # hosts' clocks may differ by more than the pauses they are compared over.
        current = database_now(session)
        stale = current - timedelta(seconds=settings.requeue_after_seconds)
        # by the database's clock, or a host whose clock runs ahead takes every worker
        # for dead; and not while the database was away a moment ago (claim_holders). At
        # start-up of the whole node nothing can be in flight.
        live_workers = (
            select(Heartbeat.name).where(alive(session)) if startup else claim_holders(session)
        )
        received = Instance.state == InstanceState.RECEIVED
        begun = Instance.started_at.is_not(None)
        conditions: list[ColumnElement[bool]] = [
            # At start-up nothing can be in flight: every `received` row is re-queued.
            received
            if startup
            else received
            & or_(
                # the listener's enqueuer publishes it, and tries again while the broker
                # is away: lost only where it is still `received` after a while
                Instance.started_at.is_(None) & (Instance.received_at < stale),
                # a round of ours took it back after its attempt began, and could not
                # publish it (_not_published): at once
                begun & (Instance.queued_at > Instance.started_at),
                _given_back(current, stale),
            ),
            # Its worker died (SIGKILL, power): with Redis the message would only come
            # back after the visibility timeout, hours later. Or its attempt failed for
            # a fault and gave it up.
            (Instance.state == InstanceState.PROCESSING)
            & (
                claim_ended(current, live_workers)
                | (Instance.claimed_by.is_(None) & (Instance.started_at < current - FAULT_PAUSE))
            ),
        ]
        compared: list[int] = []
        if inference_queue_empty or startup:
            waited = current if startup else stale
            conditions.append(
                (Instance.state == InstanceState.QUEUED) & (Instance.queued_at < waited)
            )
            # a copy received again after the instance finished, never compared with
            # what its assessment read: its message was lost (worker.pipeline). Its state
            # stays as it is: the message alone makes the comparison.
            compared = list(
                session.scalars(
                    select(Instance.id).where(
                        Instance.state.in_(FINISHED), Instance.received_again_at < waited
                    )
                )
            )
        # Taken back by the statement that finds them, before any message is published:
        # a row a worker claimed meanwhile (through a message still on its way, or one
        # published below and taken at once) no longer matches, and keeps its claim.
        # Publishing first and then resetting every row found handed an image being
        # assessed back to `queued`, and the next message to a second worker.
        # The rows are taken in id order, and those another transaction holds are left
        # for the next round (PostgreSQL; SQLite serialises writers): a rejection note
        # or a redirect holds several images' rows, taken in id order, and an UPDATE
        # taking rows in the order its plan meets them deadlocked with it. A row held is
        # being claimed, withdrawn or redirected now: nothing to take back.
        # A claim whose worker died (SIGKILL, the OOM killer, a crash; not a live one's
        # lease run out, which is the image's own doing) with a process that may have held
        # other images beside it (a batching worker's task threads): at most one of them
        # killed it, and they were queued again together, and taken together again,
        # until each had spent its attempts. None is counted; each is assessed alone from
        # now on (worker.tasks), where a death is its own and counts. Told apart in the
        # statement itself, which reads each row as it was (a list of ids would bind a
        # parameter for each: a backlog of 100 000 passes PostgreSQL's bound).
        died = worker_died(live_workers)
        died_shared = died & Instance.claim_shared
        free = (
            select(Instance.id)
            .where(or_(*conditions))
            .order_by(Instance.id)
            .with_for_update(skip_locked=True)
        )
        # for the log alone: those the statement below gives back their attempt
        shared_deaths = set(
            session.scalars(select(Instance.id).where(or_(*conditions), died_shared))
        )
        queued_at = database_now(session)
        requeued = list(
            session.scalars(
                update(Instance)
                .where(Instance.id.in_(free.scalar_subquery()), or_(*conditions))
                .values(
                    state=InstanceState.QUEUED,
                    queued_at=queued_at,
                    claimed_by=None,
                    claim_shared=False,
                    attempts=case(
                        (died_shared & (Instance.attempts > 0), Instance.attempts - 1),
                        else_=Instance.attempts,
                    ),
                    alone=case((died_shared, true()), else_=Instance.alone),
                    reason=case(
                        (died_shared, literal(DIED_HOLDING_OTHERS, String())),
                        (died, died_reason()),
                        else_=Instance.reason,
                    ),
                )
                .returning(Instance.id),
                execution_options={"synchronize_session": False},
            )
        )
        if taken := sorted(shared_deaths & set(requeued)):
            logger.warning(
                "reconciler: %d instance(s) taken back from a worker that died while it "
                "may have held other images too: queued again, each to be assessed alone, "
                "that attempt not counted (ids %s)",
                len(taken),
                ", ".join(map(str, taken)),
            )
        pending = list(
            session.execute(
                select(Delivery.id, Delivery.instance_id)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    or_(
                        Delivery.next_attempt_at.is_(None),
                        Delivery.next_attempt_at
                        < current
                        - (
                            timedelta(seconds=30)
                            if delivery_queue_empty or startup
                            else DELIVERY_LOST_AFTER
                        ),
                    ),
                )
                .order_by(Delivery.instance_id, Delivery.id)
            )
        )
    # committed: a worker may now claim what is published
    # one message per instance: its SR and SC share an association again
    delivery_groups: dict[int, list[int]] = {}
    for delivery_id, instance_id in pending:
        delivery_groups.setdefault(instance_id, []).append(delivery_id)
    instance_ids = sorted(set(requeued) | set(compared))
    queued: list[int] = []
    failure: Exception | None = None
    for instance_id in instance_ids:
        try:
            enqueue_assess(instance_id)
        except Exception as exc:  # broker down: try again next round
            logger.warning(
                "reconciler: broker unavailable or refusing messages (%s); will retry",
                failure_name(exc),
            )
            _not_published(rt, sorted(set(instance_ids[len(queued) :]) & set(requeued)), queued_at)
            failure = exc
            break
        queued.append(instance_id)
    sent: list[int] = []
    groups = _not_published_lately(
        rt.database_url, list(delivery_groups.values()), delivery_queue_empty
    )
    for group in groups:
        try:
            enqueue_delivery(group)
        except Exception as exc:
            logger.warning(
                "reconciler: broker unavailable or refusing messages (%s); will retry",
                failure_name(exc),
            )
            failure = failure or exc
            break
        sent.extend(group)
        with _published_lock:
            _published_lately.update(
                dict.fromkeys(((rt.database_url, i) for i in group), time.monotonic())
            )
    if queued or sent:
        logger.info("reconciler re-queued %d instances and %d deliveries", len(queued), len(sent))
    return ReconcileReport(
        queued,
        sent,
        instances_not_published=instance_ids[len(queued) :],
        deliveries_not_published=[i for group in groups for i in group][len(sent) :],
        failure=failure,
    )


def _given_back(current: datetime, stale: datetime) -> ColumnElement[bool]:
    """An instance that the task of an attempt gave back, `received` again, because its
    retry was not published (worker.tasks.RetriedWithinBudget): begun, and not taken back
    by a round of ours since it began. No message is on its way, and it is queued again
    once two things hold.

    The pause the task's retry would have waited (`retry_pause`, by its transient
    failures, since the attempt began) is over. A message of ours starts Celery's count
    of retries again at 0: queued at once, an image whose retries a broker refused while
    the storage failed spent its 21 tries on the reconciler's rounds, a minute apart,
    where the task's back-off, 5 s doubling to 5 minutes, takes up to about 75 minutes.
    The pause keeps that back-off (its first steps rounded up to a round's interval, a
    minute by default); `FAULT_PAUSE` would not: the same minute for each try.

    No copy of the image was received since the attempt began, or the copy came long
    enough ago that the listener's message for it may be lost (as for an image never
    begun): the listener's enqueuer publishes such a copy, and moves the row to `queued`
    (worker.messaging.mark_queued). Queued by both, the image had two messages, and two
    attempts, each claiming it (worker.pipeline took any unfinished instance then; now
    the second is refused while the first runs, a message spent), assessed it twice and
    counted two attempts. This condition holds off a copy received after the give-back,
    which the enqueuer publishes. A copy received during the attempt was published while
    the row was `processing`, and its message refused (worker.pipeline.BEING_ASSESSED):
    the task gives such a row back `received` too (worker.tasks._give_back_instance),
    and this branch queues it once the copy is as old as a lost one (``stale``), the
    inference queue empty or not.
    """
    return (
        (Instance.state == InstanceState.RECEIVED)
        & Instance.started_at.is_not(None)
        & or_(Instance.queued_at.is_(None), Instance.queued_at <= Instance.started_at)
        & _retry_pause_over(current)
        & or_(
            Instance.received_again_at.is_(None),
            Instance.received_again_at <= Instance.started_at,
            Instance.received_again_at < stale,
        )
    )


def _not_published(rt: Runtime, instance_ids: list[int], queued_at: datetime) -> None:
    """Put back to `received` the rows this round took back but could not publish, as the
    listener leaves what it could not publish: the next round queues them again, whether
    or not the inference queue is empty (it queues a `queued` row only once it is)."""
    if not instance_ids:
        return
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(
                Instance.id.in_(instance_ids),
                Instance.state == InstanceState.QUEUED,
                Instance.claimed_by.is_(None),
                Instance.queued_at == queued_at,
            )
            .values(state=InstanceState.RECEIVED),
            execution_options={"synchronize_session": False},
        )


def reconcile_via_broker(rt: Runtime, *, startup: bool = False) -> ReconcileReport:
    """`reconcile` with this process's broker: the one entry point every caller uses."""
    from worker.celery_app import DELIVERY_QUEUE, INFERENCE_QUEUE, app, queue_depths
    from worker.messaging import enqueue_assess, enqueue_delivery

    try:
        depths = queue_depths(app)
    except Exception:  # broker unreachable: treat queued work as possibly in flight
        depths = {INFERENCE_QUEUE: 1, DELIVERY_QUEUE: 1}
    return reconcile(
        rt,
        enqueue_assess,
        enqueue_delivery,
        inference_queue_empty=depths.get(INFERENCE_QUEUE, 0) == 0,
        delivery_queue_empty=depths.get(DELIVERY_QUEUE, 0) == 0,
        startup=startup,
    )
