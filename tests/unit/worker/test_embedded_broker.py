"""The embedded broker's SQLite file: write-ahead-log mode, queues made before use."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from worker.celery_app import use_write_ahead_log

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
