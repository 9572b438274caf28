"""Heartbeats are written and judged by the database's clock, not by each host's.

A node on several hosts whose clocks differ by more than `STALE_AFTER` (30 s) must not
see its live processes as gone: the writing host's clock, or the clock of the host that
runs `status` or `reprocess`, is set ten minutes off here, and the worker is still alive.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from db.engine import session_scope, upgrade
from db.queries import database_now
from db.schema import Heartbeat, Instance, InstanceState
from db.schema import utcnow as true_now
from tests.support import a_listener_writing_for_a_while, received
from worker.heartbeat import STALE_AFTER, HeartbeatThread, process_name
from worker.listener import record_instance
from worker.reconciler import reconcile
from worker.reprocess import models_of_live_workers
from worker.runtime import Runtime
from worker.settings import Settings, load_settings
from worker.status import collect

pytestmark = pytest.mark.integration

SKEW = dt.timedelta(minutes=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    database_url = (
        request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    )
    loaded = load_settings(data_dir=tmp_path / "data", database_url=database_url)
    upgrade(loaded.effective_database_url)
    return loaded


def _clock(offset: dt.timedelta) -> Callable[[], dt.datetime]:
    return lambda: true_now() + offset


def _worker_alive(settings: Settings) -> bool:
    [worker] = [p for p in collect(settings)["processes"] if p["role"] == "worker"]
    return bool(worker["alive"])


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_a_worker_whose_clock_is_off_is_alive_to_status_and_reprocess(
    settings: Settings, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the host that writes the heartbeat reads a clock ten minutes off (the clock the
    # heartbeat read before it asked the database: `raising=False`, it is gone now)
    monkeypatch.setattr("worker.heartbeat.now", _clock(offset), raising=False)
    HeartbeatThread(settings.effective_database_url, "worker", lambda: {"model_id": "m1"}).beat()
    monkeypatch.undo()

    assert _worker_alive(settings)
    assert models_of_live_workers(Runtime(settings)) == {"m1"}
    with session_scope(settings.effective_database_url) as session:
        beat = session.scalars(select(Heartbeat)).one()
        assert abs(beat.seen_at - database_now(session)) < dt.timedelta(seconds=5)
        assert beat.started_at == beat.seen_at  # its first beat


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_status_and_reprocess_on_a_host_whose_clock_is_off_see_the_worker_alive(
    settings: Settings, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    HeartbeatThread(settings.effective_database_url, "worker", lambda: {"model_id": "m1"}).beat()
    monkeypatch.setattr("worker.status.now", _clock(offset))
    monkeypatch.setattr("worker.reprocess.now", _clock(offset), raising=False)

    assert _worker_alive(settings)
    assert models_of_live_workers(Runtime(settings)) == {"m1"}


def test_a_heartbeat_older_than_stale_after_by_the_database_clock_is_dead(
    settings: Settings,
) -> None:
    """The other side: judged by the database's clock, a silent process is still gone."""
    HeartbeatThread(settings.effective_database_url, "worker", lambda: {"model_id": "m1"}).beat()
    with session_scope(settings.effective_database_url) as session:
        beat = session.scalars(select(Heartbeat)).one()
        beat.seen_at = database_now(session) - dt.timedelta(seconds=31)
    assert not _worker_alive(settings)
    assert models_of_live_workers(Runtime(settings)) == set()


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_the_reconciler_on_a_host_whose_clock_is_off_leaves_a_live_workers_image(
    settings: Settings, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's reconciler gives an image being assessed to another worker when
    the one that claimed it is gone: not because its own host's clock runs ahead."""
    url = settings.effective_database_url
    HeartbeatThread(url, "worker", lambda: {"model_id": "m1"}).beat()
    instance_id = record_instance(url, received())
    with session_scope(url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.state = InstanceState.PROCESSING
        instance.claimed_by = process_name("worker")  # this process's heartbeat
        instance.started_at = true_now()
        instance.attempts = 1
    # the clock the reconciler read before it asked the database (`raising=False`: gone)
    monkeypatch.setattr("worker.reconciler.now", _clock(offset), raising=False)
    queued: list[int] = []

    def reconcile_once() -> list[int]:
        queued.clear()
        reconcile(Runtime(settings), queued.append, lambda _: None, inference_queue_empty=True)
        return queued

    assert reconcile_once() == []
    # the worker goes silent: by the database's clock, its heartbeat is stale, while the
    # listener's goes on
    with session_scope(url) as session:
        beat = session.scalars(select(Heartbeat)).one()
        beat.seen_at = database_now(session) - 2 * STALE_AFTER
    a_listener_writing_for_a_while(url)
    assert reconcile_once() == [instance_id]
