"""Publishing task messages, and the listener's background enqueuer.

The listener answers the PACS as soon as an instance is durable; publishing to
the broker happens afterwards, on a thread of its own, so a slow or absent
broker never holds up a C-STORE. What cannot be published stays `received` in
the database, where the reconciler finds it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import create_engine, inspect, text, update

from db.engine import session_scope
from db.schema import Instance, InstanceState
from db.schema import utcnow as now
from worker.celery_app import ASSESS_TASK, DELIVER_TASK, DELIVERY_QUEUE, INFERENCE_QUEUE, app

logger = logging.getLogger(__name__)


def enqueue_assess(instance_id: int, *, send: bool = True) -> None:
    kwargs = {} if send else {"send": False}
    app.send_task(ASSESS_TASK, args=[instance_id], kwargs=kwargs, queue=INFERENCE_QUEUE)


#: Most deliveries one `deliver` message carries (an SR and an SC each for a few images):
#: a message's deliveries to one destination share an association.
DELIVERIES_PER_MESSAGE = 8


def enqueue_delivery(delivery_ids: Sequence[int], *, countdown: float | None = None) -> None:
    """Publish `deliver` messages for ``delivery_ids``, in order, a few per message."""
    ids = list(delivery_ids)
    for start in range(0, len(ids), DELIVERIES_PER_MESSAGE):
        chunk = ids[start : start + DELIVERIES_PER_MESSAGE]
        app.send_task(DELIVER_TASK, args=[chunk], queue=DELIVERY_QUEUE, countdown=countdown)


def mark_queued(database_url: str, instance_ids: list[int]) -> None:
    """`received` → `queued` for instances whose message was published (one commit)."""
    with session_scope(database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id.in_(instance_ids), Instance.state == InstanceState.RECEIVED)
            .values(state=InstanceState.QUEUED, queued_at=now())
        )


#: How long the enqueuer gathers ids before publishing them (adds at most this latency).
LINGER_SECONDS = 0.1
#: Most ids published and marked `queued` in one round.
MAX_BATCH = 100


class Enqueuer:
    """A thread that publishes `assess` messages for ids handed to `submit`."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="enqueuer", daemon=True)
        self._broker_ok = True

    def start(self) -> None:
        self._thread.start()

    def submit(self, instance_id: int) -> None:
        self._queue.put_nowait(instance_id)

    def stop(self, timeout: float = 10) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # What arrives within LINGER_SECONDS goes in the same round: one commit marks
            # them all, and a burst of C-STOREs is not slowed by a commit per instance.
            deadline = time.monotonic() + LINGER_SECONDS
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
            stop = None in batch
            published = [i for i in batch if i is not None and self._publish(i)]
            if published:
                try:
                    mark_queued(self._database_url, published)
                except Exception:
                    logger.exception("%d instances published but not marked queued", len(published))
            if stop:
                return

    def _publish(self, instance_id: int) -> bool:
        try:
            enqueue_assess(instance_id)
        except Exception as exc:  # broker down: the row stays `received`
            if self._broker_ok:
                logger.error(
                    "broker unavailable (%s): instances stay received until it is back",
                    type(exc).__name__,
                )
            self._broker_ok = False
            return False
        if not self._broker_ok:
            logger.info("broker reachable again")
        self._broker_ok = True
        return True


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
