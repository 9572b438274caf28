"""The embedded broker's SQLite file: write-ahead-log mode, queues made before use."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from tests.conftest import REDIS_URL
from tests.support import wait_for
from worker import embedded_broker
from worker.celery_app import (
    ASSESS_TASK,
    DELIVERY_QUEUE,
    INFERENCE_QUEUE,
    configure,
    prepare_embedded_broker,
    use_write_ahead_log,
)
from worker.embedded_broker import FULL_POLL_SECONDS, Channel, sqlite_path
from worker.settings import load_settings

#: One process of a node starting up: configure the app, prepare the embedded broker.
PREPARE = """
import sys
import threading
from worker.celery_app import configure, prepare_embedded_broker
from worker.settings import load_settings
settings = load_settings(data_dir=sys.argv[1])
print("ready", flush=True)
sys.stdin.read()  # all go on together
prepare_embedded_broker(configure(settings))
"""


def _journal_mode(path: Path) -> str:
    with closing(sqlite3.connect(path)) as connection:
        return str(connection.execute("PRAGMA journal_mode").fetchone()[0])


def test_broker_file_is_switched_to_wal_and_it_sticks(tmp_path: Path) -> None:
    path = tmp_path / "data" / "broker.db"
    use_write_ahead_log(f"sqla+sqlite:///{path}")
    assert _journal_mode(path) == "wal"  # stored in the file: every later opener gets it
    use_write_ahead_log(f"sqla+sqlite:///{path}")  # idempotent
    assert _journal_mode(path) == "wal"


def test_other_brokers_are_left_alone(tmp_path: Path) -> None:
    use_write_ahead_log(REDIS_URL)
    use_write_ahead_log("sqla+sqlite:///:memory:")
    assert list(tmp_path.iterdir()) == []


def test_processes_starting_together_create_each_queue_once(tmp_path: Path) -> None:
    # kombu creates tables and queue rows on first use; processes that start at once
    # used to race there (an IntegrityError lost an instance's message for minutes).
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(4)
    ]
    for proc in procs:  # every interpreter has imported everything and waits
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    for proc in procs:  # released together
        assert proc.stdin is not None
        proc.stdin.close()
    for proc in procs:
        assert proc.wait(timeout=120) == 0
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "not created" not in err and "Error" not in err, err
    with closing(sqlite3.connect(tmp_path / "broker.db")) as connection:
        names = sorted(row[0] for row in connection.execute("SELECT name FROM kombu_queue"))
    assert names == ["delivery", "inference"]


#: Configure the app for the broker given on the command line and print its prefetch;
#: with a third argument, as where inotify cannot be had.
PREFETCH = """
import sys
from worker import embedded_broker
from worker.celery_app import configure
from worker.settings import load_settings
if len(sys.argv) > 3:
    embedded_broker._inotify_watch = lambda folder: None
settings = load_settings(data_dir=sys.argv[1], broker_url=sys.argv[2] or None)
print(configure(settings).conf.worker_prefetch_multiplier)
"""


def test_workers_hold_one_message_more_only_where_they_poll(tmp_path: Path) -> None:
    # A polling consumer learns of a free slot only at its next poll: with one message
    # per process, a prefork child waited up to a poll interval after every image.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}

    def prefetch(broker_url: str, *without_inotify: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", PREFETCH, str(tmp_path), broker_url, *without_inotify],
            capture_output=True,
            env=env,
            check=True,
            timeout=120,
        )
        return int(done.stdout.decode().split()[-1])

    assert prefetch("") == 1  # the embedded SQLite broker: woken by an acknowledgement
    assert prefetch("", "without inotify") == 2
    assert prefetch("sqla+postgresql://boneage@127.0.0.1/broker") == 2  # polled as kombu does
    assert prefetch(REDIS_URL) == 1  # pushed: hold only what runs


# -- polling: an empty queue is queried again only once something was committed ----------

#: Another process publishes one assessment message to the node's embedded broker.
PUBLISH = """
import sys
import threading
from worker.celery_app import ASSESS_TASK, configure
from worker.settings import load_settings
configure(load_settings(data_dir=sys.argv[1])).send_task(ASSESS_TASK, args=[int(sys.argv[2])])
"""


@contextmanager
def consumer_channel(data_dir: Path) -> Iterator[tuple[Channel, list[str]]]:
    """A channel of the node's configured connection, and the SQL it runs on the messages."""
    app = configure(load_settings(data_dir=data_dir))
    prepare_embedded_broker(app)
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "kombu_message" in statement:
            statements.append(statement)

    with app.connection_for_write() as connection:
        assert isinstance(connection.transport, embedded_broker.Transport)
        channel = connection.channel()
        engine = channel.session.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        try:
            yield channel, statements
        finally:
            event.remove(engine, "before_cursor_execute", record)
            channel.close()


def publish_from_another_process(data_dir: Path, instance_id: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    subprocess.run(
        [sys.executable, "-c", PUBLISH, str(data_dir), str(instance_id)],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )


def test_an_empty_queue_is_queried_again_once_another_process_commits(tmp_path: Path) -> None:
    with consumer_channel(tmp_path) as (channel, statements):
        assert channel.basic_get(INFERENCE_QUEUE) is None  # found empty: queried
        queried = len(statements)
        assert queried > 0
        for _ in range(5):  # nothing committed since: no query, the same answer
            assert channel.basic_get(INFERENCE_QUEUE) is None
        assert len(statements) == queried

        publish_from_another_process(tmp_path, 41)
        message = channel.basic_get(INFERENCE_QUEUE)  # the first poll after the commit
        assert message is not None and len(statements) > queried
        assert message.headers["task"] == ASSESS_TASK
        assert json.loads(message.body)[0] == [41]
        message.ack()  # a commit too: the next poll looks again, and finds nothing
        queried = len(statements)
        assert channel.basic_get(INFERENCE_QUEUE) is None and len(statements) > queried


def test_a_queue_of_the_polled_broker_is_queried_again_after_a_bound(tmp_path: Path) -> None:
    # Should SQLite's counter ever miss a commit, a message waits at most this long.
    with consumer_channel(tmp_path) as (channel, statements):
        # the channel times the bound from just before its query, so the clock starts
        # here: a first query that itself took long (0.29 s once, under load) must not
        # make the next one look early
        start = time.monotonic()
        assert channel.basic_get(DELIVERY_QUEUE) is None
        queried = len(statements)

        def queried_again() -> bool:
            assert channel.basic_get(DELIVERY_QUEUE) is None
            return len(statements) > queried

        wait_for(queried_again, timeout=10 * FULL_POLL_SECONDS, what="a query of the queue")
        assert time.monotonic() - start >= FULL_POLL_SECONDS


def test_only_sqlite_files_are_watched() -> None:
    assert sqlite_path("sqla+sqlite:////var/lib/boneage/broker.db") == "/var/lib/boneage/broker.db"
    assert sqlite_path("sqlite:///relative/broker.db") == "relative/broker.db"
    assert sqlite_path("sqla+sqlite:///:memory:") is None
    assert sqlite_path("sqla+postgresql://boneage@db/broker") is None  # polled as kombu does
    assert sqlite_path(REDIS_URL) is None
    # the file SQLAlchemy (hence kombu) opens: escapes decoded, query left out
    assert sqlite_path("sqla+sqlite:////tmp/a%20b/broker.db?timeout=5") == "/tmp/a b/broker.db"


# -- publishing: one INSERT, the row kombu's ORM writes ------------------------------------


def _message_rows(data_dir: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(data_dir / "broker.db")) as connection:
        return connection.execute(
            "SELECT id, queue_id, visible, timestamp, version, payload FROM kombu_message "
            "ORDER BY id"
        ).fetchall()


def test_a_published_message_is_the_row_kombu_writes(tmp_path: Path) -> None:
    with consumer_channel(tmp_path) as (channel, _):
        payload = {"body": "e30=", "headers": {"task": ASSESS_TASK}, "properties": {}}
        super(Channel, channel)._put(INFERENCE_QUEUE, payload)  # kombu's own, through the ORM
        channel._put(INFERENCE_QUEUE, payload)  # ours (looks the queue up the first time)
        statements: list[str] = []

        def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        engine = channel.session.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        channel._put(INFERENCE_QUEUE, payload)
        event.remove(engine, "before_cursor_execute", record)
        assert [s.split()[0] for s in statements] == ["INSERT"]  # no lookup of the queue
        kombus, *ours = _message_rows(tmp_path)
        for row in ours:
            assert row[1:] == kombus[1:]  # queue, visible, no timestamp, version 1, payload

        # consumed in the order written, as kombu consumes its own
        for position in range(3):
            assert channel._get(INFERENCE_QUEUE) == payload
            visible = [row[2] for row in _message_rows(tmp_path)]
            assert visible == [0] * (position + 1) + [1] * (2 - position)
        with pytest.raises(Empty):
            channel._get(INFERENCE_QUEUE)


def test_a_failed_publish_leaves_the_channel_usable(tmp_path: Path) -> None:
    with consumer_channel(tmp_path) as (channel, _):
        payload = {"body": "e30=", "headers": {}, "properties": {}}
        channel._put(DELIVERY_QUEUE, payload)
        with closing(sqlite3.connect(tmp_path / "broker.db")) as other:
            other.execute("ALTER TABLE kombu_message RENAME TO kombu_message_away")
            with pytest.raises(OperationalError):
                channel._put(DELIVERY_QUEUE, payload)  # raises: the publish is tried again
            other.execute("ALTER TABLE kombu_message_away RENAME TO kombu_message")
        channel._put(DELIVERY_QUEUE, payload)
        assert len(_message_rows(tmp_path)) == 2


# -- waiting between polls: woken by a publish or an acknowledgement ------------------------

#: Another process publishes one assessment message once told to, on its stdin.
PUBLISH_WHEN_TOLD = """
import sys
import threading
from worker.celery_app import ASSESS_TASK, configure
from worker.settings import load_settings
app = configure(load_settings(data_dir=sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
app.send_task(ASSESS_TASK, args=[int(sys.argv[2])])
print("published", flush=True)
"""

#: Long enough that a message fetched sooner was fetched because the consumer was woken.
LONG_PAUSE = 30.0


@contextmanager
def consuming(data_dir: Path, *, prefetch: int = 0) -> Iterator[tuple[Any, list[Any], list[str]]]:
    """A consumer of the inference queue on the node's configured connection: the
    connection, the messages delivered to it, the SQL it runs on the messages."""
    from kombu import Consumer, Queue

    delivered: list[Any] = []
    with consumer_channel(data_dir) as (channel, statements):
        consumer = Consumer(
            channel,
            [Queue(INFERENCE_QUEUE)],
            callbacks=[lambda body, message: delivered.append(message)],
            accept=["json"],
        )
        if prefetch:
            consumer.qos(prefetch_count=prefetch)
        consumer.consume()
        yield channel.connection.client, delivered, statements


def waits_counted(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """How long each :meth:`Waker.wait` was to last at most, as it began: the consumer
    found nothing it could take."""
    began: list[float] = []
    wait = embedded_broker.Waker.wait

    def counted(self: embedded_broker.Waker, seconds: float) -> bool:
        began.append(seconds)
        return wait(self, seconds)

    monkeypatch.setattr(embedded_broker.Waker, "wait", counted)
    return began


def drain_in_thread(connection: Any, timeout: float) -> tuple[threading.Thread, list[Any]]:
    """``connection.drain_events`` in a thread; what it raised, if anything, in the list."""
    raised: list[Any] = []

    def drain() -> None:
        try:
            connection.drain_events(timeout=timeout)
        except BaseException as exc:  # reported by the test
            raised.append(exc)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread, raised


def test_a_waiting_consumer_is_woken_by_another_process_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_broker, "WOKEN_POLL_SECONDS", LONG_PAUSE)
    waits = waits_counted(monkeypatch)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    publisher = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_WHEN_TOLD, str(tmp_path), "43"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert publisher.stdout is not None and publisher.stdout.readline() == b"ready\n"
        with consuming(tmp_path) as (connection, delivered, statements):
            thread, raised = drain_in_thread(connection, timeout=LONG_PAUSE)
            # the queue was found empty: the consumer waits out its pause
            wait_for(lambda: waits, timeout=30, what="the consumer waiting")
            assert statements  # it looked first
            assert publisher.stdin is not None
            publisher.stdin.write(b"go\n")
            publisher.stdin.flush()
            assert publisher.stdout.readline() == b"published\n"
            published = time.monotonic()
            thread.join(timeout=LONG_PAUSE + 10)
            assert not raised, raised  # TimeoutError: nothing woke it
            assert json.loads(delivered[0].body)[0] == [43]
            assert time.monotonic() - published < LONG_PAUSE / 2
    finally:
        publisher.kill()
        publisher.wait(timeout=30)


def test_a_waiting_consumer_is_woken_by_its_own_acknowledgement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prefork worker's acknowledgement frees a slot and commits nothing: without a
    # wake-up the next message waited for the consumer's next poll.
    monkeypatch.setattr(embedded_broker, "WOKEN_POLL_SECONDS", LONG_PAUSE)
    waits = waits_counted(monkeypatch)
    publish_from_another_process(tmp_path, 1)
    publish_from_another_process(tmp_path, 2)
    with consuming(tmp_path, prefetch=1) as (connection, delivered, statements):
        connection.drain_events(timeout=LONG_PAUSE)  # the first, without waiting
        assert json.loads(delivered[0].body)[0] == [1]
        polled = len(statements)
        thread, raised = drain_in_thread(connection, timeout=LONG_PAUSE)
        # holding all it may, it waits without querying; the ack ends that
        wait_for(lambda: waits, timeout=30, what="the consumer waiting")
        assert len(statements) == polled
        acknowledged = time.monotonic()
        delivered[0].ack()
        thread.join(timeout=LONG_PAUSE + 10)
        assert not raised, raised
        assert json.loads(delivered[1].body)[0] == [2]
        assert time.monotonic() - acknowledged < LONG_PAUSE / 2


def test_a_consumer_without_inotify_polls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not Linux, or inotify refused (its per-user limits): the pause is a sleep again.
    monkeypatch.setattr(embedded_broker, "_inotify_watch", lambda folder: None)
    with consuming(tmp_path) as (connection, delivered, statements):
        thread, raised = drain_in_thread(connection, timeout=60)
        wait_for(lambda: statements, timeout=30, what="the consumer's first poll")
        publish_from_another_process(tmp_path, 44)
        thread.join(timeout=70)
        assert not raised, raised
        assert json.loads(delivered[0].body)[0] == [44]
        assert connection.transport._waker is None


def test_an_announcement_made_while_nobody_waits_is_kept(tmp_path: Path) -> None:
    broker = tmp_path / "broker.db"
    use_write_ahead_log(f"sqla+sqlite:///{broker}")
    waker = embedded_broker.Waker.create(str(broker))
    assert waker is not None
    try:
        embedded_broker.announce(embedded_broker.wakeup_file(str(broker)))
        assert waker.wait(LONG_PAUSE)  # at once
        waker.wake()  # an acknowledgement's, from this process
        assert waker.wait(LONG_PAUSE)
        # other files closed in the folder (the node's database, say) do not end the wait
        started = time.monotonic()
        (tmp_path / "boneage.db").write_bytes(b"")
        assert not waker.wait(0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        waker.close()


def test_the_announcement_file_takes_the_broker_files_permissions(tmp_path: Path) -> None:
    broker = tmp_path / "broker.db"
    use_write_ahead_log(f"sqla+sqlite:///{broker}")
    broker.chmod(0o660)
    with consumer_channel(tmp_path) as (channel, _):
        channel._put(INFERENCE_QUEUE, {"body": "e30=", "headers": {}, "properties": {}})
    wakeup = embedded_broker.wakeup_file(str(broker))
    assert wakeup.stat().st_size == 0  # opened and closed, never written
    assert wakeup.stat().st_mode & 0o777 == 0o660 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_consumer_whose_watch_is_gone_polls_at_the_short_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()
    waker = embedded_broker.Waker.create(str(folder / "broker.db"))
    assert waker is not None
    try:
        assert waker.watching
        folder.rmdir()  # the watch goes with it: no publisher can wake this consumer now
        assert waker.wait(LONG_PAUSE)  # at once
        assert not waker.watching
    finally:
        waker.close()

    # and a consumer so placed waits no longer than it did before it could be woken
    waits = waits_counted(monkeypatch)
    with consuming(tmp_path) as (connection, _, _):
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=1.5)
        # woken: the poll is only a bound, and never past the caller's timeout
        assert waits[0] == embedded_broker.WOKEN_POLL_SECONDS
        assert sum(waits) <= 1.5
        connection.transport._waker.watching = False  # as the loss of the watch leaves it
        polled = len(waits)
        with pytest.raises(TimeoutError):
            connection.drain_events(timeout=0.5)
        assert waits[polled] == embedded_broker.POLL_SECONDS
        assert max(waits[polled:]) == embedded_broker.POLL_SECONDS
