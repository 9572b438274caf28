"""Publishing task messages, and the listener's background enqueuer.

The listener answers the PACS as soon as an instance is durable; publishing to
the broker happens afterwards, on a thread of its own, so a slow or absent
broker never holds up a C-STORE. What cannot be published stays `received` in
the database; the enqueuer tries it again after a pause (doubling, up to
`RETRY_MAX_SECONDS`), so that a broker back after an outage gets the backlog in
seconds, and the reconciler finds whatever a restart of the listener lost.

A publish either reaches the broker or raises, within about `PUBLISH_BUDGET_SECONDS`
(`PublishDeadline`): RabbitMQ confirms each message (``confirm_publish``,
`worker.celery_app.broker_transport_options`), and one it refuses raises as one that
could not be sent does. A task's retry is published so too (`worker.tasks`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

from kombu.exceptions import OperationalError
from sqlalchemy import create_engine, inspect, or_, text, update

from db.engine import session_scope
from db.queries import database_now
from db.schema import Instance, InstanceState
from worker.celery_app import (
    ASSESS_TASK,
    DELIVER_TASK,
    DELIVERY_QUEUE,
    INFERENCE_QUEUE,
    PUBLISH_BUDGET_SECONDS,
    PUBLISH_RETRY_POLICY,
    app,
    broker_wait_seconds,
    publish_try_seconds,
)

logger = logging.getLogger(__name__)


class PublishBudgetExceeded(OperationalError):
    """A publish gave up: another try could not have ended within its budget."""


class PublishDeadline:
    """The end of one publish's budget, kept by kombu's retry policy.

    kombu calls the policy's errback after each try that failed (to send, or to connect
    again), with the pause it is about to take before the next. The next try waits about
    `publish_try_seconds` (connecting anew, then one wait for the broker's reply); where
    that and the pause would go past the end, `check` raises instead of letting it start.
    Each wait is bounded by the broker's socket, connect and confirm timeouts, so the
    whole publish ends within about the budget: a try is not cut short, and one that
    waits on the broker more often than that (every frame of a handshake late, or
    py-amqp's channel.open and confirm_select, which have no timeout) ends after it.
    kombu's own retry policy counts tries only: three on a half-open Redis connection,
    each waiting 30 s for a reply and as long again to connect anew, took about 3 min.
    """

    def __init__(self, budget: float = PUBLISH_BUDGET_SECONDS) -> None:
        self.budget = budget
        self.ends = time.monotonic() + budget

    def check(self, exc: BaseException, interval: float) -> None:
        """Raise `PublishBudgetExceeded` unless a pause of ``interval`` and another try
        fit in what is left."""
        if time.monotonic() + interval + publish_try_seconds() > self.ends:
            raise PublishBudgetExceeded(
                f"publish given up within its {self.budget:g} s ({type(exc).__name__})"
            ) from exc

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Make this the deadline that `keep_to_deadline` keeps, in this thread."""
        token = _current_deadline.set(self)
        try:
            yield
        finally:
            _current_deadline.reset(token)


#: The deadline of the publish this thread (or task) is making, if any.
_current_deadline: contextvars.ContextVar[PublishDeadline | None] = contextvars.ContextVar(
    "publish_deadline", default=None
)


def keep_to_deadline(exc: BaseException, interval: float) -> None:
    """The retry policy's errback: `PublishDeadline.check` of the current publish.

    Found through a context variable, not bound to the deadline, because kombu copies the
    retry policy into the connection's transport options (`kombu.Producer.publish`),
    which a pool's connections share and consult when one of them reconnects: a deadline
    bound there would end another thread's publish, or a later one's, too soon.
    """
    deadline = _current_deadline.get()
    if deadline is not None:
        deadline.check(exc, interval)


#: `PUBLISH_RETRY_POLICY`, stopped where the current publish's deadline would be passed.
BOUNDED_RETRY_POLICY: dict[str, Any] = {**PUBLISH_RETRY_POLICY, "errback": keep_to_deadline}


def bounded_publish_options() -> dict[str, Any]:
    """The options of a publish (``send_task``'s, or ``apply_async``'s) that bound it:
    `BOUNDED_RETRY_POLICY`, which keeps the current `PublishDeadline`, and ``timeout``
    and ``confirm_timeout``, which bound an AMQP message's write and the wait for its
    confirm (`broker_wait_seconds`; the other transports ignore them, their socket
    timeouts bound them). Without the last two, py-amqp waits for a confirm without end:
    a RabbitMQ blocked by a disk alarm held the publisher until the alarm cleared.
    """
    wait = broker_wait_seconds()
    return {
        "retry": True,
        "retry_policy": BOUNDED_RETRY_POLICY,
        "timeout": wait,
        "confirm_timeout": wait,
    }


def send_within(deadline: PublishDeadline, name: str, **options: Any) -> None:
    """``app.send_task`` that ends within about ``deadline``: raises if the broker did not
    take the message by then (unreachable, refusing it: a RabbitMQ nack, or not confirming
    it)."""
    with deadline.applied():
        app.send_task(name, **bounded_publish_options(), **options)


def enqueue_assess(
    instance_id: int,
    *,
    send: bool = True,
    producer: Any = None,
    deadline: PublishDeadline | None = None,
) -> None:
    """Publish an `assess` message (with ``producer``: on its connection, not the pool's).

    Raises if the broker did not take it within about ``deadline`` (by default a budget of
    its own from now).
    """
    kwargs = {} if send else {"send": False}
    send_within(
        deadline or PublishDeadline(),
        ASSESS_TASK,
        args=[instance_id],
        kwargs=kwargs,
        queue=INFERENCE_QUEUE,
        producer=producer,
    )


#: Most deliveries one `deliver` message carries (an SR and an SC each for a few images):
#: a message's deliveries to one destination share an association.
DELIVERIES_PER_MESSAGE = 8


def enqueue_delivery(delivery_ids: Sequence[int], *, countdown: float | None = None) -> None:
    """Publish `deliver` messages for ``delivery_ids``, in order, a few per message.

    Raises at the first message the broker did not take within about its budget
    (`PublishDeadline`); the deliveries' rows stay pending for the reconciler.
    """
    ids = list(delivery_ids)
    for start in range(0, len(ids), DELIVERIES_PER_MESSAGE):
        chunk = ids[start : start + DELIVERIES_PER_MESSAGE]
        send_within(
            PublishDeadline(), DELIVER_TASK, args=[chunk], queue=DELIVERY_QUEUE, countdown=countdown
        )


def mark_queued(database_url: str, instance_ids: list[int], published_at: datetime) -> None:
    """Record that the messages of ``instance_ids`` were published at ``published_at``
    (the database's clock, read before the first of them: the claims and the copies
    received again it is compared with are dated by it too, whatever host stamps them).

    `received` rows become `queued`. A worker may have claimed an instance before this
    commit (its message is on the broker from the moment it is published): its state
    is left as the worker set it, but its Queued At is still recorded, so that every
    assessed instance's timeline reads received → queued → started → finished.

    A row `received` again although an attempt began after ``published_at`` (taken
    before the first message) is left `received`: that attempt consumed the message, and
    its task gave the instance back, its retry not published
    (worker.tasks.RetriedWithinBudget). Marked `queued`, it had no message, and the
    reconciler queues a `queued` row only once the inference queue is empty, which a
    backlog may keep from happening for hours; `received`, the reconciler queues it
    again (worker.reconciler). An attempt that began before the publish (a row given
    back, then received again) is not the message's: the row is `queued`.
    """
    with session_scope(database_url) as session:
        session.execute(
            update(Instance)
            .where(
                Instance.id.in_(instance_ids),
                Instance.state == InstanceState.RECEIVED,
                or_(Instance.started_at.is_(None), Instance.started_at < published_at),
            )
            .values(state=InstanceState.QUEUED, queued_at=published_at)
        )
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids), Instance.queued_at.is_(None))
            .values(queued_at=published_at)
        )


#: How long the enqueuer gathers ids before publishing them while they keep coming (a
#: burst): the round's ids are then marked `queued` in one commit. An id that comes
#: alone (none published for this long) is published at once, without the wait.
LINGER_SECONDS = 0.1
#: Most ids published and marked `queued` in one round.
MAX_BATCH = 100
#: Pause before the enqueuer tries again what it could not publish; it doubles with each
#: failed round up to the cap, and starts again at the first once a publish succeeds.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 30.0
#: Most unpublished ids the enqueuer keeps to retry itself; beyond, a long outage's
#: instances are left to the reconciler (their rows stay `received`).
MAX_UNPUBLISHED = 10_000
#: How long `Enqueuer.start` waits for the broker connection to be opened. Opening it
#: (for the embedded broker: SQLAlchemy's engine and kombu's table classes) took
#: 0.1–0.2 s of the CPU, which the first instances after a start used to share.
CONNECT_WAIT_SECONDS = 5.0


class Enqueuer:
    """A thread that publishes `assess` messages for ids handed to `submit`.

    It publishes on a broker connection of its own, opened at start: a connection that
    failed (a broker restart, or the embedded broker's SQLite session left in an error)
    is dropped and a new one made for the next try, while other threads' publishing
    through the app's pool is not touched.
    """

    def __init__(self, database_url: str, *, linger: float = LINGER_SECONDS) -> None:
        self._database_url = database_url
        self._linger = linger
        self._last_round = -math.inf  # time.monotonic() at the end of the last round
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="enqueuer", daemon=True)
        self._started = threading.Event()  # the first connection was tried
        self._broker_ok = True
        self._connection: Any = None
        self._producer: Any = None
        self._unpublished: list[int] = []  # in the order they came, tried again first
        self._failed_rounds = 0
        self._retry_at = 0.0

    def start(self) -> None:
        """Start the thread; returns once it has tried to connect (or after a bound)."""
        self._thread.start()
        self._started.wait(CONNECT_WAIT_SECONDS)

    def submit(self, instance_id: int) -> None:
        self._queue.put_nowait(instance_id)

    def stop(self, timeout: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def backlog(self) -> int:
        """Ids waiting to be published: handed over, or to be tried again."""
        return self._queue.qsize() + len(self._unpublished)

    def _run(self) -> None:
        try:
            self._connect()  # a broker that is away is tried again with the first ids
            self._started.set()
            while True:
                batch = self._gather()
                stop = None in batch
                ids = [i for i in batch if i is not None]
                if self._unpublished and time.monotonic() >= self._retry_at:
                    ids, self._unpublished = self._unpublished + ids, []
                if ids:
                    self._publish_round(ids)
                    self._last_round = time.monotonic()
                if stop:
                    return
        finally:
            self._started.set()
            self._drop_connection()

    def _gather(self) -> list[int | None]:
        """The next round's ids: wait for one (or until a retry is due), then, in a burst,
        linger."""
        try:
            if self._unpublished:
                first = self._queue.get(timeout=max(0.0, self._retry_at - time.monotonic()))
            else:
                first = self._queue.get()
        except queue.Empty:
            return []
        batch = [first]
        # In a burst (the last round ended less than the linger ago), what arrives within
        # the linger goes in the same round: one commit marks them all, and the C-STOREs
        # are not slowed by a commit per instance. An id that comes alone, as most do,
        # takes what is already waiting and goes at once: its study is not held up.
        now = time.monotonic()
        deadline = now + self._linger if now - self._last_round < self._linger else now
        while len(batch) < MAX_BATCH and batch[-1] is not None:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _publish_round(self, ids: list[int]) -> None:
        # before the first message, which a worker may take at once
        published_at = self._database_now()
        published: list[int] = []
        for position, instance_id in enumerate(ids):
            if not self._publish(instance_id):
                # The broker is away: the rest waits for the next try too, instead of
                # each costing its own connection timeout now.
                self._keep_for_retry(ids[position:])
                break
            published.append(instance_id)
        else:
            self._failed_rounds = 0
        if published and published_at is not None:
            try:
                mark_queued(self._database_url, published, published_at)
            except Exception:
                logger.exception("%d instances published but not marked queued", len(published))

    def _database_now(self) -> datetime | None:
        """The database's clock, which `mark_queued` compares with the time a worker's
        claim took (dated by it too: hosts' clocks may differ by more than the time from a
        publish to its claim); None where it cannot be read, and the round's instances,
        published, stay `received` for the reconciler (a message more, which the worker
        that takes it finds claimed or done)."""
        try:
            with session_scope(self._database_url) as session:
                return database_now(session)
        except Exception as exc:
            logger.warning(
                "database clock not read (%s): instances stay received", type(exc).__name__
            )
            return None

    def _keep_for_retry(self, ids: list[int]) -> None:
        self._unpublished.extend(ids)
        if len(self._unpublished) > MAX_UNPUBLISHED:
            del self._unpublished[: len(self._unpublished) - MAX_UNPUBLISHED]  # to the reconciler
        self._failed_rounds += 1
        wait = min(RETRY_MAX_SECONDS, RETRY_FIRST_SECONDS * 2 ** (self._failed_rounds - 1))
        self._retry_at = time.monotonic() + wait

    def _connect(self, deadline: PublishDeadline | None = None) -> bool:
        """Open the connection and its channel, if not open yet; False if the broker is away.

        With ``deadline``, connecting is part of a publish and spends its budget.
        """
        if self._producer is not None:
            return True
        try:
            with deadline.applied() if deadline is not None else contextlib.nullcontext():
                self._connection = app.connection_for_write()
                self._connection.ensure_connection(
                    **BOUNDED_RETRY_POLICY, timeout=CONNECT_WAIT_SECONDS
                )
                self._producer = app.amqp.Producer(self._connection)
                # Declared now rather than by the first publish (for the embedded broker
                # this opens its file and looks the queue's row up); the connection
                # remembers it.
                self._producer.maybe_declare(app.amqp.queues[INFERENCE_QUEUE])
        except Exception as exc:  # broker down: rows stay `received`
            self._broker_away(exc)
            return False
        return True

    def _publish(self, instance_id: int) -> bool:
        deadline = PublishDeadline()  # connecting and sending, all tries together
        if not self._connect(deadline):
            return False
        try:
            enqueue_assess(instance_id, producer=self._producer, deadline=deadline)
        except Exception as exc:  # broker down or refusing: the row stays `received`
            self._broker_away(exc)
            return False
        if not self._broker_ok:
            logger.info("broker reachable again")
        self._broker_ok = True
        return True

    def _broker_away(self, exc: Exception) -> None:
        self._drop_connection()
        if self._broker_ok:
            logger.error(
                "broker unavailable or refusing messages (%s): instances stay received "
                "and are tried again",
                failure_name(exc),
            )
        self._broker_ok = False

    def _drop_connection(self) -> None:
        connection, self._connection, self._producer = self._connection, None, None
        if connection is not None:
            try:
                connection.release()
            except Exception as exc:  # it failed already; nothing more to lose
                logger.debug("broker connection not closed cleanly (%s)", type(exc).__name__)


def failure_name(exc: BaseException) -> str:
    """What made a publish fail, by type: kombu's wrapper names the error it wraps
    (``OperationalError: MessageNacked`` for a message RabbitMQ refused)."""
    name = type(exc).__name__
    cause = exc.__cause__
    if isinstance(exc, OperationalError) and cause is not None:
        return f"{name}: {type(cause).__name__}"
    return name


def prune_embedded_broker(broker_url: str, older_than: timedelta = timedelta(hours=1)) -> int:
    """Delete consumed messages from the embedded (SQLite) broker; returns how many.

    kombu's SQLAlchemy transport marks a consumed message invisible but never deletes
    it, so a long-running embedded install would grow its broker file without end.
    A message consumed an hour ago is done or lost; the reconciler covers the lost.
    """
    if not broker_url.startswith("sqla+"):
        return 0
    engine = create_engine(broker_url.removeprefix("sqla+"), connect_args={"timeout": 30})
    try:
        with engine.begin() as connection:
            if not inspect(connection).has_table("kombu_message"):
                return 0
            # kombu stores local naive times (datetime.now).
            cutoff = datetime.now() - older_than
            result = connection.execute(
                text("DELETE FROM kombu_message WHERE visible = 0 AND timestamp < :cutoff"),
                {"cutoff": cutoff},
            )
            return int(result.rowcount or 0)
    finally:
        engine.dispose()
