"""A delivery's times are the database's clock, whichever host stamps or compares them.

A delivery worker's claim, a failed attempt's next try, a row made by an inference worker
or put back by `retry-deliveries`: each is compared by another process (another delivery
worker's claim, the reconciler, `status`), maybe on another host. Each host dated them
by its own clock: a delivery worker behind the database by more than about 30 s had its
claim on a row end early, and a second worker (or the reconciler's message) sent the row
beside it; one behind dated a retry in the past, sent again at once. They are the
database's clock now. A second host cannot run in a test: the clock each side read before
is set off here, and the rows behave as with no skew. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db.engine import session_scope
from db.queries import database_now
from db.schema import Delivery, DeliveryState, ObjectKind
from db.schema import utcnow as true_now
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import make_runtime, spool_instance
from tests.support import free_port
from worker import delivery
from worker.delivery import DeliveryOutcome, claim_seconds, retry_failed, send_deliveries
from worker.pipeline import assess_instance
from worker.reconciler import reconcile
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A delivery worker's host clock off the database's by this (more than the reconciler's
#: 30 s of slack, less than a claim on one row lasts)
OFF = dt.timedelta(seconds=60)
SKEW = dt.timedelta(minutes=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> str | None:
    """The node's database: its own SQLite file (None), or the test's PostgreSQL one."""
    return request.getfixturevalue("postgres_url") if request.param == "postgresql" else None


def _host_clock(monkeypatch: pytest.MonkeyPatch, offset: dt.timedelta) -> None:
    """This host's clock ``offset`` off the database's, as the modules that stamped a
    delivery's times read it (raising=False: a module that reads it no more)."""

    def clock() -> dt.datetime:
        return true_now() + offset

    monkeypatch.setattr("worker.delivery.now", clock, raising=False)
    monkeypatch.setattr("worker.pipeline.now", clock, raising=False)


def _database_now(rt: Runtime) -> dt.datetime:
    with session_scope(rt.database_url) as session:
        return database_now(session)


def _row(rt: Runtime, delivery_id: int) -> Delivery:
    with session_scope(rt.database_url) as session:
        row = session.get_one(Delivery, delivery_id)
        session.expunge(row)
        return row


def _dated_between(
    rt: Runtime, ids: list[int], before: dt.datetime, after: dt.datetime
) -> Callable[[str], bool]:
    """Whether each of ``ids`` has its time ``column`` within [before, after]."""

    def dated(column: str) -> bool:
        return all(before <= getattr(_row(rt, i), column) <= after for i in ids)

    return dated


def _time_passes(rt: Runtime, delivery_id: int, elapsed: dt.timedelta) -> None:
    """As if ``elapsed`` passed: the row's times move back by it (no other time is
    compared with them here)."""
    row = _row(rt, delivery_id)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(
                created_at=row.created_at - elapsed,
                next_attempt_at=row.next_attempt_at - elapsed if row.next_attempt_at else None,
                sending_since=row.sending_since - elapsed if row.sending_since else None,
            )
        )


def _sr(rt: Runtime, ids: tuple[int, ...]) -> int:
    with session_scope(rt.database_url) as session:
        return session.scalars(
            select(Delivery.id).where(Delivery.id.in_(ids), Delivery.kind == ObjectKind.SR)
        ).one()


def test_a_claim_by_a_worker_whose_clock_is_behind_is_no_other_senders_to_take(
    tmp_path: Path, tiny_checkpoint: Path, database: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery worker whose host is a minute behind the database claims an SR (a claim
    of 90 s). 61 s later, its send still running, neither the reconciler queues the SR
    again nor a second delivery worker, on a host whose clock is right, claims it: the
    claim ends 90 s after it was taken, by the database's clock. Before, the claim ended
    by the first host's clock, 30 s after it was taken: the reconciler queued it again,
    and the second worker sent it beside the first."""
    rt = make_runtime(
        tmp_path,
        tiny_checkpoint,
        database_url=database,
        destinations=f"PACS@127.0.0.1:{free_port()}",
    )
    _host_clock(monkeypatch, -OFF)  # the host of the inference and delivery workers
    sr = _sr(rt, assess_instance(rt, spool_instance(rt)).delivery_ids)
    before = _database_now(rt)
    claimed, _ = delivery._claim(rt, [sr], force=False)
    after = _database_now(rt)
    assert [row.id for row in claimed] == [sr]
    claim = _row(rt, sr)

    _time_passes(rt, sr, OFF + dt.timedelta(seconds=1))
    report = reconcile(rt, lambda _: None, lambda _: None, inference_queue_empty=True)
    assert sr not in report.deliveries
    _host_clock(monkeypatch, dt.timedelta(0))  # the second worker's host
    second, skipped = delivery._claim(rt, [sr], force=False)
    assert second == []
    assert skipped == {sr: DeliveryOutcome("skipped", error="not due yet")}
    # the claim as it was taken: dated by the database, for the time a send of one takes
    # (its file at the slowest rate given time for)
    assert claim.sending_since is not None and before <= claim.sending_since <= after
    size = Path(claim.path).stat().st_size
    assert claim.next_attempt_at == claim.sending_since + dt.timedelta(
        seconds=claim_seconds(1, size)
    )


@pytest.mark.parametrize("offset", [-OFF, OFF], ids=["behind", "ahead"])
def test_a_failed_attempts_retry_is_due_by_the_database_clock(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database: str | None,
    offset: dt.timedelta,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attempt that fails (nothing listens at the destination) on a host whose clock is
    off has its next try at the database's clock plus its back-off (30 s), and the
    message for it that comes at once to a worker whose host is a minute ahead is not
    sent early. Before, a host behind dated the retry 30 s in the past, and it was sent
    again at once; a host ahead dated it a minute late."""
    rt = make_runtime(
        tmp_path,
        tiny_checkpoint,
        database_url=database,
        destinations=f"PACS@127.0.0.1:{free_port()}",
        delivery_backoff_seconds=30,
    )
    _host_clock(monkeypatch, offset)  # the host of the inference and delivery workers
    sr = _sr(rt, assess_instance(rt, spool_instance(rt)).delivery_ids)
    before = _database_now(rt)
    [outcome] = send_deliveries(rt, [sr]).values()
    after = _database_now(rt)
    assert (outcome.state, outcome.retry_in) == ("retry", 30.0)
    backoff = dt.timedelta(seconds=30)
    retry_at = _row(rt, sr).next_attempt_at
    assert retry_at is not None and before + backoff <= retry_at <= after + backoff

    _host_clock(monkeypatch, OFF)  # the next message's worker, on a host ahead
    assert delivery.deliver_one(rt, sr) == DeliveryOutcome("skipped", error="not due yet")
    assert _row(rt, sr).attempts == 1


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_deliveries_made_put_back_and_delivered_are_dated_by_the_database_clock(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database: str | None,
    storescp: StoreSCP,
    offset: dt.timedelta,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On hosts whose clocks are off, an assessment's deliveries are made and due at the
    database's time; `retry-deliveries` redirects them, failed to a destination no
    longer configured, and puts the redirected ones back, failed in their turn, at the
    database's time; and their delivery is dated by it. The reconciler, `status` and
    the claims compare these times with the database's clock: made and due ten minutes
    early, say, `status` saw them overdue at once."""
    _host_clock(monkeypatch, offset)
    old = make_runtime(
        tmp_path,
        tiny_checkpoint,
        database_url=database,
        destinations=f"OLD@127.0.0.1:{free_port()}",
    )
    before = _database_now(old)
    made = list(assess_instance(old, spool_instance(old)).delivery_ids)
    dated = _dated_between(old, made, before, _database_now(old))
    assert len(made) == 2 and dated("created_at") and dated("next_attempt_at")

    with session_scope(old.database_url) as session:
        session.execute(
            update(Delivery).where(Delivery.id.in_(made)).values(state=DeliveryState.FAILED)
        )
    new = make_runtime(
        tmp_path, tiny_checkpoint, database_url=old.database_url, destinations=storescp.destination
    )
    before = _database_now(new)
    redirected = retry_failed(new).queued
    dated = _dated_between(new, redirected, before, _database_now(new))
    assert len(redirected) == 2 and dated("created_at") and dated("next_attempt_at")

    with session_scope(new.database_url) as session:
        session.execute(
            update(Delivery).where(Delivery.id.in_(redirected)).values(state=DeliveryState.FAILED)
        )
    before = _database_now(new)
    assert retry_failed(new).reset == redirected
    dated = _dated_between(new, redirected, before, _database_now(new))
    assert dated("created_at") and dated("next_attempt_at")

    before = _database_now(new)
    outcomes = send_deliveries(new, redirected)
    assert {o.state for o in outcomes.values()} == {"delivered"}
    assert _dated_between(new, redirected, before, _database_now(new))("delivered_at")


def test_the_settings_rollout_window_counts_from_the_workers_start_by_the_databases_clock(
    tmp_path: Path, tiny_checkpoint: Path, database: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery worker whose host is 10 min ahead of the database starts, its settings
    naming one destination; an inference worker, with newer settings, then makes an SR and
    an SC for another. The delivery worker tries them again (the rollout window: it may
    be the one behind), rather than failing them for good as sent to a destination taken
    out of the settings. Before, its start, by its own clock, came 10 min after the rows'
    making, by the database's, and it failed them at once. A row made before the worker
    started is failed for good, as it was."""
    _host_clock(monkeypatch, SKEW)
    maker = make_runtime(
        tmp_path / "inference",
        tiny_checkpoint,
        database_url=database,
        destinations=f"NEW@127.0.0.1:{free_port()}",
    )
    sender = make_runtime(
        tmp_path / "delivery",
        tiny_checkpoint,
        database_url=maker.database_url,
        destinations=f"OLD@127.0.0.1:{free_port()}",
    )
    sender.settings_since = true_now() + SKEW  # its start, as its host dated it

    made = assess_instance(maker, spool_instance(maker))
    assert made.state == "assessed"
    ids = list(made.delivery_ids)
    outcomes = send_deliveries(sender, ids)
    assert {(o.state, o.error) for o in outcomes.values()} == {
        ("retry", delivery.NOT_CONFIGURED_HERE)
    }, outcomes
    assert {_row(maker, i).state for i in ids} == {DeliveryState.PENDING}

    # made five minutes before the delivery worker started: the settings it took up are
    # newer than the row's, and name no such destination
    sr = _sr(maker, made.delivery_ids)
    _time_passes(maker, sr, dt.timedelta(minutes=5))
    failed = send_deliveries(sender, [sr], force=True)[sr]
    assert (failed.state, failed.error) == ("failed", delivery.NOT_CONFIGURED)
