"""The listener's enqueuer: its broker connection is opened at start, not by the first image;
an instance that comes alone is published at once, a burst's in rounds."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.engine import Engine

from db.engine import session_scope, upgrade
from db.schema import Instance, InstanceState
from db.schema import utcnow as now
from tests.support import free_port, received, wait_for
from worker.celery_app import INFERENCE_QUEUE, configure, prepare_embedded_broker
from worker.listener import record_instance
from worker.messaging import CONNECT_WAIT_SECONDS, Enqueuer, mark_queued
from worker.settings import Settings, load_settings


def _node(data_dir: Path, **overrides: Any) -> Settings:
    settings = load_settings(data_dir=data_dir, **overrides)
    upgrade(settings.effective_database_url)
    prepare_embedded_broker(configure(settings))
    return settings


def _state(database_url: str, instance_id: int) -> InstanceState:
    with session_scope(database_url) as session:
        state = session.scalar(select(Instance.state).where(Instance.id == instance_id))
    assert state is not None
    return state


def _queued_at(database_url: str, instance_id: int) -> datetime | None:
    with session_scope(database_url) as session:
        return session.scalar(select(Instance.queued_at).where(Instance.id == instance_id))


@contextmanager
def broker_statements(broker_file: Path) -> Iterator[list[str]]:
    """The SQL every engine of this process runs on ``broker_file``, from now on."""
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if str(conn.engine.url.database) == str(broker_file):
            statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(Engine, "before_cursor_execute", record)


def test_the_first_instance_finds_the_broker_open(tmp_path: Path) -> None:
    settings = _node(tmp_path)
    url = settings.effective_database_url
    enqueuer = Enqueuer(url)
    with broker_statements(tmp_path / "broker.db") as statements:
        began = time.monotonic()
        enqueuer.start()
        # once connected, not at the bound (a local SQLite file opens in a fraction of it)
        assert time.monotonic() - began < CONNECT_WAIT_SECONDS
        try:
            opened = list(statements)
            assert any("kombu_queue" in s for s in opened)  # opened, its queue looked up
            first = record_instance(url, received())
            enqueuer.submit(first)
            wait_for(
                lambda: _state(url, first) == InstanceState.QUEUED,
                timeout=30,
                what="the instance queued",
            )
        finally:
            enqueuer.stop()
        published = statements[len(opened) :]
    # The first image's message cost one INSERT and nothing more: no engine, no tables,
    # no queue lookup left for it to pay.
    assert [s.split()[0] for s in published] == ["INSERT"]

    app = configure(settings)
    with app.connection_for_write() as connection:
        message = connection.default_channel.basic_get(INFERENCE_QUEUE)
    assert message is not None and json.loads(message.body)[0] == [first]


def test_a_broker_away_at_start_holds_up_neither_start_nor_the_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _node(tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    url = settings.effective_database_url
    enqueuer = Enqueuer(url)
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="worker.messaging"):
        enqueuer.start()
        assert time.monotonic() - began < CONNECT_WAIT_SECONDS + 1
        try:
            assert "broker unavailable" in caplog.text
            first = record_instance(url, received())
            enqueuer.submit(first)
            wait_for(lambda: enqueuer.backlog == 1, timeout=30, what="the id kept to retry")
            assert _state(url, first) == InstanceState.RECEIVED  # the reconciler's, or a retry's
        finally:
            enqueuer.stop()


#: A linger far longer than publishing takes here, so that a round that waited for it
#: cannot pass for one that did not.
LONG_LINGER = 20.0


def test_an_instance_that_comes_alone_is_published_without_the_linger(tmp_path: Path) -> None:
    url = _node(tmp_path).effective_database_url
    enqueuer = Enqueuer(url, linger=LONG_LINGER)
    enqueuer.start()
    try:
        first = record_instance(url, received("1.2.3.4.1"))
        enqueuer.submit(first)
        # Its study waits on this; an enqueuer that lingered would take LONG_LINGER.
        wait_for(
            lambda: _state(url, first) == InstanceState.QUEUED,
            timeout=LONG_LINGER / 2,
            what="the lone instance queued",
        )
    finally:
        enqueuer.stop()


def test_a_burst_is_gathered_into_one_round(tmp_path: Path) -> None:
    url = _node(tmp_path).effective_database_url
    linger = 3.0
    enqueuer = Enqueuer(url, linger=linger)
    enqueuer.start()
    try:
        first = record_instance(url, received("1.2.3.4.1"))
        enqueuer.submit(first)
        wait_for(lambda: _queued_at(url, first), timeout=linger / 2, what="the first queued")
        # The next ones come while the first round is recent, each a while after the one
        # before (the arrivals this test is about, not a wait for a result): the enqueuer
        # lingers for the later ones instead of publishing the second alone.
        burst = [record_instance(url, received(f"1.2.3.4.{n}")) for n in range(2, 6)]
        spacing = threading.Event()  # never set
        for instance_id in burst:
            enqueuer.submit(instance_id)
            spacing.wait(linger / 10)
        wait_for(
            lambda: all(_queued_at(url, i) for i in burst),
            timeout=30,
            what="the burst queued",
        )
    finally:
        enqueuer.stop()
    stamps = {_queued_at(url, i) for i in burst}
    assert len(stamps) == 1  # marked by one statement
    assert stamps != {_queued_at(url, first)}


def test_queued_at_is_recorded_even_when_a_worker_claimed_the_instance_first(
    tmp_path: Path,
) -> None:
    # The message is on the broker from the moment it is published, so an idle worker
    # may claim the instance before the round's commit: its Queued At is still the time
    # of publishing, and its state stays what the worker made it.
    settings = _node(tmp_path)
    url = settings.effective_database_url
    waiting, claimed, earlier = (record_instance(url, received(f"1.2.3.{i}")) for i in (1, 2, 3))
    first_round = now()
    mark_queued(url, [earlier], first_round)
    published_at = now()
    with session_scope(url) as session:  # what an inference worker's claim does
        session.execute(
            update(Instance)
            .where(Instance.id == claimed)
            .values(state=InstanceState.PROCESSING, started_at=now())
        )
    mark_queued(url, [waiting, claimed, earlier], published_at)

    assert _state(url, waiting) is InstanceState.QUEUED
    assert _queued_at(url, waiting) == published_at
    assert _state(url, claimed) is InstanceState.PROCESSING
    assert _queued_at(url, claimed) == published_at
    # published again (the same instance received twice): it has waited since the first
    assert _state(url, earlier) is InstanceState.QUEUED
    assert _queued_at(url, earlier) == first_round
