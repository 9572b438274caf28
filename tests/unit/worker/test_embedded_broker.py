"""The embedded broker's SQLite file: write-ahead-log mode, queues made before use."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

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
    use_write_ahead_log("redis://127.0.0.1:6379/0")
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


#: Configure the app for the broker given on the command line and print its prefetch.
PREFETCH = """
import sys
from worker.celery_app import configure
from worker.settings import load_settings
settings = load_settings(data_dir=sys.argv[1], broker_url=sys.argv[2] or None)
print(configure(settings).conf.worker_prefetch_multiplier)
"""


def test_workers_of_the_polled_broker_hold_one_message_more(tmp_path: Path) -> None:
    # A polling consumer learns of a free slot only at its next poll: with one message
    # per process, a prefork child waited up to a poll interval after every image.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}

    def prefetch(broker_url: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", PREFETCH, str(tmp_path), broker_url],
            capture_output=True,
            env=env,
            check=True,
            timeout=120,
        )
        return int(done.stdout.decode().split()[-1])

    assert prefetch("") == 2  # the embedded SQLite broker
    assert prefetch("redis://127.0.0.1:6379/0") == 1  # pushed: hold only what runs


# -- polling: an empty queue is queried again only once something was committed ----------

#: Another process publishes one assessment message to the node's embedded broker.
PUBLISH = """
import sys
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
        assert channel.basic_get(DELIVERY_QUEUE) is None
        queried, start = len(statements), time.monotonic()

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
    assert sqlite_path("redis://127.0.0.1:6379/0") is None
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
