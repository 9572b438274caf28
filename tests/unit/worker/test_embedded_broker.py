"""The embedded broker's SQLite file runs in write-ahead-log mode."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from worker.celery_app import use_write_ahead_log


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
