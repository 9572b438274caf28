"""A message RabbitMQ does not take fails its publish, and its image is tried again.

RabbitMQ confirms each publish (``confirm_publish``): a message it refuses (here a queue
at its length limit with ``overflow=reject-publish``, set by a policy) or does not confirm
in time (here a connection that a real TCP proxy stops forwarding after the message was
written) raises, where before the publish returned and the message was gone. The
listener's enqueuer and the reconciler then keep the row `received`, and publish it once
the broker takes it. A task's retry is published so too: refused or not confirmed, it
fails within about the budget, where it held the worker until the broker took it, and its
work is given back at once (an image `received` again, deliveries due), for the
reconciler to queue again once the broker takes messages.

A message may be in the queue twice (a confirm slower than its wait on a loaded disk is
published again): that is harmless, tasks are idempotent, so the tests look at which ids
were published, each once, and that none is missing.

Each test has a virtual host of its own on the real RabbitMQ (127.0.0.1:5672,
guest/guest), made and deleted with ``rabbitmqctl``: its queues and policies go with it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from amqp.exceptions import MessageNacked, NotFound
from celery import states
from celery.app.trace import build_tracer
from kombu import Connection
from kombu.exceptions import OperationalError
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.exc import OperationalError as DatabaseError

from db.engine import get_engine, session_scope, upgrade
from db.schema import Delivery, DeliveryState, Instance, InstanceState
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import make_runtime, spool_instance
from tests.proxy import TcpProxy
from tests.support import instance_state, received, timed_call, wait_for
from worker import delivery, messaging, pipeline, tasks
from worker.celery_app import (
    ASSESS_TASK,
    DELIVER_TASK,
    DELIVERY_QUEUE,
    INFERENCE_QUEUE,
    PUBLISH_BUDGET_SECONDS,
    app,
    configure,
)
from worker.delivery import Claim
from worker.heartbeat import HeartbeatThread, process_name
from worker.listener import record_instance
from worker.messaging import Enqueuer, enqueue_assess
from worker.pipeline import assess_instance
from worker.reconciler import PROCESSING_LEASE, reconcile_via_broker
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration

#: What a publish may take, all its tries together: the budget the README states. The
#: tests of a publish that is never confirmed wait it out with the service's timeouts, as
#: a broker blocked by a disk alarm would make a publish wait: about 15 s each (the
#: confirm's wait, 10 s, then a new connection's handshake's, 5 s).
BUDGET = PUBLISH_BUDGET_SECONDS

RABBITMQ_PORT = int(os.environ.get("BONEAGE_TEST_RABBITMQ_PORT", "5672"))

#: The policy that makes the inference queue refuse every message.
REFUSE = {"max-length": 0, "overflow": "reject-publish"}

#: What a timed call may take beyond the budget: the thread's start and join.
MARGIN = 1.0


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def rabbitmq(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A virtual host of its own on the real RabbitMQ, deleted afterwards."""
    if shutil.which("rabbitmqctl") is None:
        pytest.fail("rabbitmqctl is not installed (the RabbitMQ server's package)")
    vhost = f"boneage-test-{uuid.uuid4().hex[:10]}"
    try:
        _rabbitmqctl("add_vhost", vhost)
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"rabbitmqctl cannot make a virtual host (run as root?): {exc}")
    # the app's connection pools, made for an earlier test's broker, are made again
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    try:
        yield vhost
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        _rabbitmqctl("delete_vhost", vhost)


def _refuse(vhost: str, queue: str = INFERENCE_QUEUE) -> None:
    """From now on ``queue`` (the inference queue) of ``vhost`` refuses every message. Set
    before the queue is declared, the policy applies from its declaration on."""
    _rabbitmqctl(
        "set_policy", "-p", vhost, "--apply-to", "queues", "refuse",
        f"^{queue}$", json.dumps(REFUSE),
    )  # fmt: skip


def _take_again(vhost: str) -> None:
    _rabbitmqctl("clear_policy", "-p", vhost, "refuse")


def _node(tmp_path: Path, broker_url: str, **overrides: Any) -> Settings:
    settings = load_settings(data_dir=tmp_path, broker_url=broker_url, **overrides)
    upgrade(settings.effective_database_url)
    configure(settings)
    return settings


def _url(vhost: str, port: int = RABBITMQ_PORT) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/{vhost}"


def _published(vhost: str) -> list[int]:
    """The instance ids of the `assess` messages in the inference queue, oldest first,
    each once (taken off the queue, read directly)."""
    ids: list[int] = []
    with Connection(_url(vhost)) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(INFERENCE_QUEUE, no_ack=True)) is not None:
            args, _kwargs, _embed = json.loads(message.body)
            ids.extend(i for i in args if i not in ids)
    return ids


def _delivery_messages(vhost: str) -> list[list[int]]:
    """The delivery ids of each `deliver` message in the delivery queue, oldest first
    (taken off the queue, read directly)."""
    messages: list[list[int]] = []
    with Connection(_url(vhost)) as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(DELIVERY_QUEUE, no_ack=True)) is not None:
            args, _kwargs, _embed = json.loads(message.body)
            messages.append(list(args[0]))
    return messages


def _caused_by(exc: BaseException | None, kind: type[BaseException]) -> bool:
    while exc is not None:
        if isinstance(exc, kind):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def test_a_message_rabbitmq_refuses_fails_its_publish(tmp_path: Path, rabbitmq: str) -> None:
    _node(tmp_path, _url(rabbitmq))
    _refuse(rabbitmq)
    # unconfirmed, the publish returned and the message was dropped in silence
    with pytest.raises(OperationalError) as raised:
        enqueue_assess(1)
    assert _caused_by(raised.value, MessageNacked), repr(raised.value)
    assert _published(rabbitmq) == []


def test_the_enqueuer_keeps_a_refused_image_received_then_publishes_it(
    tmp_path: Path, rabbitmq: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _node(tmp_path, _url(rabbitmq)).effective_database_url
    _refuse(rabbitmq)
    enqueuer = Enqueuer(url)
    enqueuer.start()
    try:
        instance_id = record_instance(url, received("1.2.3.5.1"))
        with caplog.at_level(logging.ERROR, logger="worker.messaging"):
            enqueuer.submit(instance_id)
            wait_for(
                lambda: (
                    instance_state(url, instance_id) == InstanceState.QUEUED
                    or "broker unavailable" in caplog.text
                ),
                timeout=BUDGET + 10,
                what="the enqueuer's publish to end",
            )
        # before, the row was marked queued and its message was gone
        assert instance_state(url, instance_id) == InstanceState.RECEIVED
        assert "MessageNacked" in caplog.text
        assert enqueuer.backlog == 1

        _take_again(rabbitmq)
        wait_for(
            lambda: instance_state(url, instance_id) == InstanceState.QUEUED,
            timeout=60,
            what="the image published once the queue takes it",
        )
        assert _published(rabbitmq) == [instance_id]
    finally:
        enqueuer.stop()


def test_the_reconciler_keeps_a_refused_image_received_then_publishes_it(
    tmp_path: Path, rabbitmq: str, caplog: pytest.LogCaptureFixture
) -> None:
    # what was received and not published is the reconciler's at once
    settings = _node(tmp_path, _url(rabbitmq), requeue_after_seconds=0.001)
    url = settings.effective_database_url
    rt = Runtime(settings)
    _refuse(rabbitmq)
    instance_id = record_instance(url, received("1.2.3.5.2"))

    with caplog.at_level(logging.WARNING, logger="worker.reconciler"):
        report = reconcile_via_broker(rt)
    # before, the round reported it queued, and its message was gone
    assert report.instances == []
    assert instance_state(url, instance_id) == InstanceState.RECEIVED
    # the refusal named, not only kombu's wrapper (OperationalError) of it
    assert "refusing messages (OperationalError: MessageNacked)" in caplog.text

    _take_again(rabbitmq)
    # the policy leaves the queue a moment after it is cleared: a round may still be refused
    wait_for(
        lambda: reconcile_via_broker(rt).instances == [instance_id],
        timeout=30,
        what="a round to publish the image once the queue takes it",
    )
    assert instance_state(url, instance_id) == InstanceState.QUEUED
    assert _published(rabbitmq) == [instance_id]


def test_a_publish_rabbitmq_never_confirms_fails_within_the_budget(
    tmp_path: Path, rabbitmq: str
) -> None:
    """About 15 s: the service's confirm wait, then a new connection's handshake."""
    proxy = TcpProxy(RABBITMQ_PORT)
    try:
        _node(tmp_path, _url(rabbitmq, proxy.port))
        enqueue_assess(1)  # the pool's connection, through the proxy, is open
        proxy.black_hole()  # the next message is written, and nothing comes back

        took, error = timed_call(lambda: enqueue_assess(2), BUDGET + MARGIN)
        # unconfirmed, the publish returned at once and the message was lost
        assert isinstance(error, OperationalError), f"the publish returned: {error!r}"
        assert isinstance(error, messaging.PublishBudgetExceeded), repr(error)
        assert took < BUDGET + MARGIN

        proxy.forward()
        enqueue_assess(2)
        assert _published(rabbitmq) == [1, 2]  # none lost (a duplicate is harmless)
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        proxy.close()


# -- a task's retry ---------------------------------------------------------------------


def _worker_on(
    tmp_path: Path, tiny_checkpoint: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> Runtime:
    """This process as an inference worker on ``broker_url``: its runtime, its model
    loaded, and its heartbeat beaten (alive, as a worker in a retry is)."""
    rt = make_runtime(tmp_path, tiny_checkpoint, broker_url=broker_url)
    configure(rt.settings)
    monkeypatch.setitem(tasks._state, "runtime", rt)
    assert rt.predictor.model_id  # loaded before anything is timed
    HeartbeatThread(rt.database_url, "worker").beat()
    return rt


def _unreadable(rt: Runtime) -> int:
    """An image received whose spooled file cannot be read for now: its path is a
    directory, and reading it raises a real OSError (EISDIR), trouble the assess task
    retries (`worker.pipeline.RETRIED_BY_THE_TASK`)."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        spool = Path(
            session.scalars(select(Instance.spool_path).where(Instance.id == instance_id)).one()
        )
    spool.unlink()
    spool.mkdir()
    return instance_id


def _as_the_worker_runs(task: str, args: list[Any]) -> str:
    """Run a message of ``task`` as a worker's pool does (Celery's tracer, not eagerly: a
    retry is published to the broker); the state it ends in."""
    queue = DELIVERY_QUEUE if task == DELIVER_TASK else INFERENCE_QUEUE
    tracer = build_tracer(task, app.tasks[task], eager=False, propagate=False, app=app)
    request = {"delivery_info": {"exchange": "", "routing_key": queue}, "retries": 0}
    outcome = tracer(uuid.uuid4().hex, args, {}, request)
    return str(outcome.info.state)


def _as_the_worker_runs_it(instance_id: int) -> str:
    """Run the `assess` message of ``instance_id`` as a worker's pool does."""
    return _as_the_worker_runs(ASSESS_TASK, [instance_id])


def _given_back_then_queued_again(rt: Runtime, vhost: str, instance_id: int) -> None:
    """The instance whose retry was not published is given back at once: `received`,
    claimed by none, its attempt not spent, its reason saying that no retry came (it said
    "retried: 1 of 21 tries" alone). The reconciler's first round once the broker takes
    messages and the retry's pause (5 s after the first failure) is over queues it again,
    where it waited for the lease (30 min) of a live worker."""
    # alive as a real worker is: the reconciler takes back nothing from a live worker
    HeartbeatThread(rt.database_url, "worker").beat()
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert (row.state, row.claimed_by) == (InstanceState.RECEIVED, None)
        assert (row.attempts, row.transient_failures) == (0, 1)
        assert row.reason is not None
        assert row.reason.startswith("attempt 1 failed: IsADirectoryError")
        assert row.reason.endswith(
            "(retried: 1 of 21 tries); retry not published: given back to be queued again"
        )
    # the policy leaves the queue a moment after it is cleared: a round may still be refused
    wait_for(
        lambda: reconcile_via_broker(rt).instances == [instance_id],
        timeout=BUDGET + 10,
        what="the reconciler's round to queue the image again",
    )
    assert instance_state(rt.database_url, instance_id) == InstanceState.QUEUED
    assert _published(vhost) == [instance_id]


def test_a_tasks_retry_rabbitmq_never_confirms_fails_within_the_budget(
    tmp_path: Path,
    rabbitmq: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Celery published the retry of an `assess` that met trouble it retries (``Task.retry``)
    without a timeout: py-amqp waited for the confirm without end, and the worker with it.
    About 15 s, as a publish of ours (see BUDGET)."""
    proxy = TcpProxy(RABBITMQ_PORT)
    try:
        rt = _worker_on(tmp_path, tiny_checkpoint, _url(rabbitmq, proxy.port), monkeypatch)
        instance_id = _unreadable(rt)
        enqueue_assess(instance_id)  # on the pool's connection, through the proxy
        assert _published(rabbitmq) == [instance_id]  # the worker takes it off the queue
        # The retry is written, and no confirm comes back, as from a RabbitMQ a disk alarm
        # blocks. Published with Celery's defaults, the retry waited for it without end.
        proxy.black_hole()

        outcomes: list[str] = []
        with caplog.at_level(logging.ERROR, logger="worker.tasks"):
            took, error = timed_call(
                lambda: outcomes.append(_as_the_worker_runs_it(instance_id)), BUDGET + MARGIN
            )
        assert error is None, repr(error)
        # the message rejected, not requeued: the image waits in the database
        assert outcomes == [states.REJECTED]
        assert took < BUDGET + MARGIN
        assert "its retry was not published (PublishBudgetExceeded" in caplog.text

        proxy.forward()
        assert _published(rabbitmq) == []  # the retry never reached the broker
        _given_back_then_queued_again(rt, rabbitmq, instance_id)
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        proxy.close()


def test_a_tasks_retry_rabbitmq_refuses_leaves_its_image_to_the_reconciler(
    tmp_path: Path,
    rabbitmq: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retry RabbitMQ refuses (a nack, at once) ends the task as one never confirmed
    does, and its image is not lost either."""
    rt = _worker_on(tmp_path, tiny_checkpoint, _url(rabbitmq), monkeypatch)
    instance_id = _unreadable(rt)
    _refuse(rabbitmq)

    outcomes: list[str] = []
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        _took, error = timed_call(
            lambda: outcomes.append(_as_the_worker_runs_it(instance_id)), BUDGET + MARGIN
        )
    assert error is None, repr(error)
    assert outcomes == [states.REJECTED]
    assert "its retry was not published (OperationalError: MessageNacked)" in caplog.text
    assert _published(rabbitmq) == []
    _take_again(rabbitmq)
    _given_back_then_queued_again(rt, rabbitmq, instance_id)


def test_a_retry_not_published_whose_note_cannot_be_written_is_rejected_all_the_same(
    tmp_path: Path,
    rabbitmq: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database away as the task notes that its retry was not published: a warning,
    and the message rejected as it would be, its refusal logged; the instance waits for
    the reconciler, claimed until its lease runs out, its reason as the attempt left
    it."""
    rt = _worker_on(tmp_path, tiny_checkpoint, _url(rabbitmq), monkeypatch)
    instance_id = _unreadable(rt)
    _refuse(rabbitmq)

    def away(url: str) -> Any:
        raise DatabaseError("connect", {}, ConnectionRefusedError("database away"))

    # only the note's session: the attempt before it noted its failure as it does
    monkeypatch.setattr(tasks, "session_scope", away)
    outcomes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        _took, error = timed_call(
            lambda: outcomes.append(_as_the_worker_runs_it(instance_id)), BUDGET + MARGIN
        )
    assert error is None, repr(error)
    assert outcomes == [states.REJECTED]
    assert "its retry was not published (OperationalError: MessageNacked)" in caplog.text
    assert (
        f"instance {instance_id}: that its retry was not published is not recorded "
        "(OperationalError)"
    ) in caplog.text
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert row.state is InstanceState.PROCESSING and row.reason is not None
        assert row.reason.startswith("attempt 1 failed: IsADirectoryError")
        assert row.reason.endswith("(retried: 1 of 21 tries)")
    assert _published(rabbitmq) == []


def test_a_claim_another_attempt_took_while_the_retry_was_published_is_left_as_it_is(
    tmp_path: Path,
    rabbitmq: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the retry waits for a confirm that never comes, another attempt of this very
    process (a batching worker's other task thread, with the reconciler's message) claims
    the image, its lease run out: the retry that is not published leaves that claim, and
    the reason, as they are. Before, the task noted on it that its retry was not
    published, and its claim, the same process's, looked like its own. About 15 s (see
    BUDGET)."""
    proxy = TcpProxy(RABBITMQ_PORT)
    try:
        rt = _worker_on(tmp_path, tiny_checkpoint, _url(rabbitmq, proxy.port), monkeypatch)
        instance_id = _unreadable(rt)
        enqueue_assess(instance_id)  # on the pool's connection, through the proxy
        assert _published(rabbitmq) == [instance_id]
        proxy.black_hole()

        outcomes: list[str] = []
        task = threading.Thread(
            target=lambda: outcomes.append(_as_the_worker_runs_it(instance_id)), daemon=True
        )
        task.start()

        def failed() -> str | None:
            with session_scope(rt.database_url) as session:
                reason = session.get_one(Instance, instance_id).reason
            return reason if reason and "(retried: 1 of 21 tries)" in reason else None

        reason = wait_for(failed, timeout=BUDGET, what="the attempt to fail and be retried")
        with session_scope(rt.database_url) as session:  # no other may take it before
            held = session.get_one(Instance, instance_id)
            assert held.started_at is not None
            held.started_at -= PROCESSING_LEASE
        other = pipeline._claim(rt, instance_id)  # the next attempt, as the pipeline claims
        assert isinstance(other, pipeline._Claim)
        task.join(BUDGET + MARGIN)
        assert not task.is_alive()
        assert outcomes == [states.REJECTED]

        with session_scope(rt.database_url) as session:
            row = session.get_one(Instance, instance_id)
            assert (row.state, row.claimed_by) == (InstanceState.PROCESSING, process_name("worker"))
            assert row.started_at == other.started_at
            assert row.reason == reason
            assert (row.attempts, row.transient_failures) == (1, 1)
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        proxy.close()


def _sending_node(
    tmp_path: Path,
    rabbitmq: str,
    postgres_url: str,
    tiny_checkpoint: Path,
    storescp: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Runtime, list[int]]:
    """This process as a worker of a node on PostgreSQL sending to the storescp, and the
    delivery ids of an image it assessed; the delivery queue then refuses every
    message."""
    rt = make_runtime(
        tmp_path,
        tiny_checkpoint,
        broker_url=_url(rabbitmq),
        database_url=postgres_url,
        destinations=storescp.destination,
    )
    configure(rt.settings)
    monkeypatch.setitem(tasks._state, "runtime", rt)
    outcome = assess_instance(rt, spool_instance(rt), send=True)
    ids = list(outcome.delivery_ids)
    assert len(ids) == 2  # the SR and the SC
    _refuse(rabbitmq, DELIVERY_QUEUE)
    return rt, ids


@contextmanager
def _cutting(
    rt: Runtime, cuts: Callable[[str, list[int]], bool], then: Callable[[], None] = lambda: None
) -> Iterator[list[int]]:
    """Within it, each statement of ``rt``'s database that ``cuts`` (given the statement
    and the connections cut so far) has its connection cut before it runs
    (pg_terminate_backend, as a failover does), then ``then`` runs; the backend pids
    cut, in the list it gives."""
    killer = create_engine(rt.database_url)
    cut: list[int] = []

    def cut_it(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if cuts(statement, cut):
            cut.append(pid := cursor.connection.info.backend_pid)
            with killer.connect() as connection:
                connection.execute(text("SELECT pg_terminate_backend(:pid, 5000)"), {"pid": pid})
            then()

    engine = get_engine(rt.database_url)
    event.listen(engine, "before_cursor_execute", cut_it)
    try:
        yield cut
    finally:
        event.remove(engine, "before_cursor_execute", cut_it)
        killer.dispose()


def _deliver_timed(
    ids: list[int], caplog: pytest.LogCaptureFixture
) -> tuple[BaseException | None, list[str]]:
    """Run the `deliver` message of ``ids`` as a worker's pool does, its errors logged,
    within the budget: what it raised, and the state it ended in (none if it raised)."""
    outcomes: list[str] = []
    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        _took, error = timed_call(
            lambda: outcomes.append(_as_the_worker_runs(DELIVER_TASK, [ids])), BUDGET + MARGIN
        )
    return error, outcomes


@pytest.mark.parametrize(("backoff", "messages"), [(60.0, 1), (1200.0, 0)])
def test_a_deliver_retry_due_after_rabbitmqs_hold_is_published_by_the_reconciler(
    tmp_path: Path,
    rabbitmq: str,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    backoff: float,
    messages: int,
) -> None:
    """A destination down: the retry due in a minute gets its message (a countdown), one
    due in 20 minutes none, since RabbitMQ closes the channel of a consumer that holds a
    message past its ``consumer_timeout`` (30 min), and Celery holds a countdown's
    unacknowledged until it is due: the worker stopped every half hour of the outage.
    The reconciler publishes the retry once it is due."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: the connection is refused
        rt = make_runtime(
            tmp_path,
            tiny_checkpoint,
            broker_url=_url(rabbitmq),
            destinations=f"PACS@127.0.0.1:{closed.getsockname()[1]}",
            delivery_backoff_seconds=backoff,
            delivery_backoff_max_seconds=backoff,
        )
        configure(rt.settings)
        monkeypatch.setitem(tasks._state, "runtime", rt)
        ids = sorted(assess_instance(rt, spool_instance(rt)).delivery_ids)
        assert tasks.deliver.run(ids) == "retry"  # as a worker runs it
    try:
        published = _delivery_messages(rabbitmq)
    except NotFound:  # no message ever went to the delivery queue: it was never declared
        published = []
    assert len(published) == messages
    with session_scope(rt.database_url) as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids))).all()
        assert {(row.state, row.attempts) for row in rows} == {(DeliveryState.PENDING, 1)}
        assert reconcile_via_broker(rt).deliveries == []  # not due: nothing published
        for row in rows:  # its back-off over
            assert row.next_attempt_at is not None
            row.next_attempt_at -= dt.timedelta(seconds=backoff + 31)
    assert sorted(reconcile_via_broker(rt).deliveries) == ids
    assert _delivery_messages(rabbitmq) == [ids]


def test_a_deliver_retry_not_published_gives_its_deliveries_back(
    tmp_path: Path,
    rabbitmq: str,
    postgres_url: str,
    tiny_checkpoint: Path,
    storescp: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: the database is gone for a moment (the connection cut by
    pg_terminate_backend, as a failover does) as a `deliver` records that the destination
    stored the SR and SC, and again as it records a failed attempt instead: the task is
    retried, and its retry is refused. The deliveries are due again at once, each keeping
    its mark that its object may be at the destination, and the reconciler's next round
    sends them again once the broker takes messages. Before, they waited for their claim
    to run out: two minutes for two objects, five for a message of eight."""
    rt, ids = _sending_node(
        tmp_path, rabbitmq, postgres_url, tiny_checkpoint, storescp, monkeypatch
    )

    def as_delivered_is_recorded(statement: str, cut: list[int]) -> bool:
        # the delivered rows' UPDATE, then the first failed attempt's (each sets last_error)
        return (
            statement.startswith("UPDATE deliveries") and "last_error" in statement and len(cut) < 2
        )

    with _cutting(rt, as_delivered_is_recorded) as cut:
        error, outcomes = _deliver_timed(ids, caplog)
    assert error is None, repr(error)
    assert len(cut) == 2, "the deliveries were never recorded as delivered, then failed"
    assert outcomes == [states.REJECTED]
    assert f"{DELIVER_TASK}: its retry was not published (OperationalError: MessageNacked)" in (
        caplog.text
    )
    storescp.wait_for_objects(2, timeout=30)  # they went; their answers are not recorded

    with session_scope(rt.database_url) as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids))).all()
        assert {row.state for row in rows} == {DeliveryState.PENDING}
        assert [row.attempts for row in rows] == [0, 0]
        assert [row.next_attempt_at for row in rows] == [None, None]  # the claim given back
        assert all(row.sending_since is not None for row in rows)  # may be at the PACS

    _take_again(rabbitmq)
    wait_for(
        lambda: sorted(reconcile_via_broker(rt).deliveries) == sorted(ids),
        timeout=BUDGET + 10,
        what="the reconciler's round to send the deliveries again",
    )
    assert [sorted(message) for message in _delivery_messages(rabbitmq)] == [sorted(ids)]


def test_a_deliver_whose_claim_failed_gives_back_no_claim_another_worker_took(
    tmp_path: Path,
    rabbitmq: str,
    postgres_url: str,
    tiny_checkpoint: Path,
    storescp: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: the connection of a `deliver` is cut as it claims its SR and SC (its
    claim never commits), and another worker, with a copy of the message, claims them
    at once, to send them. The first is retried, its retry refused: it gives back
    nothing, and the other worker's claim stands, so the reconciler sends nothing while
    that one sends. Before, the task took a claim made after it began, a claim's length
    long, for its own, and ended it: the reconciler's next round had a third worker send
    the same objects while the second was sending them."""
    rt, ids = _sending_node(
        tmp_path, rabbitmq, postgres_url, tiny_checkpoint, storescp, monkeypatch
    )
    other = Claim()

    def as_it_claims(statement: str, cut: list[int]) -> bool:
        # the claim's UPDATE, before it runs: its connection cut, the other worker's
        # claim made (the first one's row locks gone with its connection)
        return statement.startswith("UPDATE deliveries SET next_attempt_at=") and not cut

    def the_other_claims() -> None:
        claimed, _ = delivery._claim(rt, ids, force=False, claim=other)
        assert len(claimed) == 2

    with _cutting(rt, as_it_claims, then=the_other_claims) as cut:
        error, outcomes = _deliver_timed(ids, caplog)
    assert error is None, repr(error)
    assert len(cut) == 1, "the deliveries were never claimed"
    assert outcomes == [states.REJECTED]
    assert f"{DELIVER_TASK}: its retry was not published (OperationalError: MessageNacked)" in (
        caplog.text
    )

    with session_scope(rt.database_url) as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids))).all()
        assert {row.state for row in rows} == {DeliveryState.PENDING}
        # the other worker's claim, as it took it
        assert {(row.sending_since, row.next_attempt_at) for row in rows} == {
            (other.claimed_at, other.until)
        }
    _take_again(rabbitmq)
    assert reconcile_via_broker(rt).deliveries == []
    assert _delivery_messages(rabbitmq) == []
