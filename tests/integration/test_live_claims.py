"""An image being assessed is no other attempt's to take; the times compared across hosts
are the database's.

A second message for an image (a copy of it received while it is assessed, published by
the listener) used to claim it beside the attempt assessing it: two assessments at once,
the commit kept one, and the copy could be forgotten. A claim now refuses an image whose
claim has not ended (worker.reconciler.claim_ended: its worker alive, its lease not run
out); the copy that came is compared once the holder ends, and taken up by the reconciler
where the holder dies.

The listener's and the workers' hosts stamped the times that worker.messaging.mark_queued,
the reconciler and the claims compare with each other, each by its own clock: a skew
larger than the time from a publish to its claim left an image `queued` with no message,
or gave it two, or forgot a copy. They are the database's clock now. A second host cannot
run in a test: the clock each side read before is set ten minutes off here, and the rows
behave as with no skew. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import states
from celery.app.trace import build_tracer
from pydicom import dcmread
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.queries import database_now
from db.schema import Heartbeat, Instance, InstanceState, Rejection
from db.schema import utcnow as true_now
from tests.integration.test_pipeline import (
    make_runtime,
    reconcile_once,
    spool_dataset,
    spool_instance,
)
from tests.integration.test_received_again import received_again, results
from tests.support import a_listener_writing_for_a_while, pacs_rejection_note, wait_for
from worker import pipeline, tasks
from worker.celery_app import ASSESS_TASK, INFERENCE_QUEUE, app, configure, prepare_embedded_broker
from worker.heartbeat import STALE_AFTER, HeartbeatThread, process_name
from worker.messaging import Enqueuer
from worker.metrics import WORKER_REGISTRY
from worker.pipeline import AssessOutcome, Attempt, assess_instance
from worker.reconciler import PROCESSING_LEASE
from worker.reprocess import prepare_reprocess
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

SKEW = dt.timedelta(minutes=10)

#: What a message for an image another attempt assesses comes to (pipeline.BEING_ASSESSED)
REFUSED = AssessOutcome("skipped", reason="being assessed by another attempt")


@pytest.fixture(params=["sqlite", "postgresql"])
def rt(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Runtime:
    """A node on the tiny model (no destinations), this process a live worker."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    runtime = make_runtime(tmp_path, tiny_checkpoint, database_url=url)
    monkeypatch.setitem(tasks._state, "runtime", runtime)
    HeartbeatThread(runtime.database_url, "worker").beat()
    return runtime


@pytest.fixture
def embedded_broker(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The app on the node's embedded broker (a SQLite file in its data folder)."""
    # the app's connection pools, made for an earlier test's broker, are made again
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    prepare_embedded_broker(configure(rt.settings))
    try:
        yield
    finally:
        if app._pool is not None:
            app._pool.force_close_all()


def _row(rt: Runtime, instance_id: int) -> Instance:
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        session.expunge(row)
        return row


def _claim(rt: Runtime, instance_id: int, held: dt.datetime | None = None) -> pipeline._Claim:
    claim = (
        pipeline._claim(rt, instance_id) if held is None else pipeline._claim(rt, instance_id, held)
    )
    assert isinstance(claim, pipeline._Claim), claim
    return claim


def _during_the_attempt(monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], None]) -> None:
    """Run ``meanwhile`` once in the middle of the next attempt: after it has read the
    file and assessed the image, before it writes its SR and SC."""
    real = pipeline.stage_outputs

    def staging(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pipeline, "stage_outputs", real)
        meanwhile()
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_outputs", staging)


def _heartbeat_stops(rt: Runtime) -> None:
    """This process's heartbeat goes stale, by the database's clock, while the listener's
    goes on: it died."""
    with session_scope(rt.database_url) as session:
        beat = session.get_one(Heartbeat, process_name("worker"))
        beat.seen_at = database_now(session) - 2 * STALE_AFTER
    a_listener_writing_for_a_while(rt.database_url)


# -- a claim refuses an image being assessed ----------------------------------------------


def test_a_message_for_an_image_being_assessed_is_refused_and_its_copy_compared_after(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real attempts: while the first assesses the image, the PACS sends it again with
    the sex corrected, and the copy's message reaches a second worker. It assesses
    nothing and counts no attempt; the first ends, says that a copy waits, and the message
    its task queues for it assesses the copy (assessment 2). Before, the second claimed
    the image and assessed it beside the first, which lost its commit."""
    instance_id = spool_instance(rt, sex="F")
    second: list[AssessOutcome] = []

    def copy_and_its_message() -> None:
        received_again(rt, instance_id, PatientSex="M")
        second.append(assess_instance(rt, instance_id))

    _during_the_attempt(monkeypatch, copy_and_its_message)
    first = assess_instance(rt, instance_id)

    assert second == [REFUSED]
    assert (first.state, first.copy_to_compare) == ("assessed", True)
    row = _row(rt, instance_id)
    assert (row.state, row.attempts) == (InstanceState.ASSESSED, 1)
    assert row.received_again_at is not None  # the copy, read by no assessment
    assert results(rt, instance_id) == [(1, False)]

    compared = assess_instance(rt, instance_id)  # the task's message for the copy
    assert (compared.state, compared.copy_to_compare) == ("assessed", False)
    assert results(rt, instance_id) == [(1, False), (2, True)]
    assert _row(rt, instance_id).received_again_at is None


def test_a_claim_ends_where_the_reconciler_would_take_the_image_back(rt: Runtime) -> None:
    """Refused: a live worker's claim in its lease. Taken: the retry of the try that holds
    it; a claim whose lease ran out; a claim of a worker whose heartbeat stopped."""
    instance_id = spool_instance(rt)
    held = _claim(rt, instance_id)
    assert pipeline._claim(rt, instance_id) == REFUSED
    assert _row(rt, instance_id).attempts == 1  # the refusal spent none

    retry = _claim(rt, instance_id, held.started_at)  # the task's retry takes it over
    assert _row(rt, instance_id).attempts == 2
    # a claim it no longer holds: the retry's own is the row's now
    assert pipeline._claim(rt, instance_id, held.started_at) == REFUSED

    assert retry.started_at is not None
    with session_scope(rt.database_url) as session:  # its lease runs out
        session.get_one(Instance, instance_id).started_at = (
            retry.started_at - PROCESSING_LEASE - dt.timedelta(seconds=1)
        )
    expired = _claim(rt, instance_id)
    assert expired.started_at is not None and expired.started_at > retry.started_at

    with session_scope(rt.database_url) as session:  # the test counts claims, not attempts
        session.execute(update(Instance).where(Instance.id == instance_id).values(attempts=0))
    _heartbeat_stops(rt)
    assert _row(rt, instance_id).claimed_by == process_name("worker")
    _claim(rt, instance_id)  # its worker gone: taken


def _another_connection_writes(rt: Runtime, instance_id: int, **values: Any) -> Callable[[], None]:
    """Start writing ``values`` to the instance's row from another connection, and
    return once that commit is done or waits on the row (PostgreSQL); the function
    returned waits for it to end."""
    backend: list[int] = []

    def write() -> None:
        with session_scope(rt.database_url) as other:
            backend.append(other.scalar(text("SELECT pg_backend_pid()")))
            other.execute(update(Instance).where(Instance.id == instance_id).values(**values))

    def waits_on_a_row() -> bool:
        if not backend:
            return False
        with session_scope(rt.database_url) as session:
            return bool(
                session.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE pid = :pid AND wait_event_type = 'Lock'"
                    ),
                    {"pid": backend[0]},
                )
            )

    writer = threading.Thread(target=write)
    writer.start()
    wait_for(
        lambda: not writer.is_alive() or waits_on_a_row(),
        timeout=30,
        what="the other connection's commit, or its wait on the row",
    )

    def ended() -> None:
        writer.join(timeout=30)
        assert not writer.is_alive()

    return ended


def _around_the_next_read(
    monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], None], *, after: bool
) -> None:
    """Run ``meanwhile`` once, just before (or ``after``) the next Session.get."""
    real_get = Session.get

    def get(self: Session, *args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(Session, "get", real_get)
        if not after:
            meanwhile()
        row = real_get(self, *args, **kwargs)
        if after:
            meanwhile()
        return row

    monkeypatch.setattr(Session, "get", get)


@pytest.mark.parametrize("rt", ["postgresql"], indirect=True)
def test_a_refusal_does_not_give_up_an_image_its_holder_finishes_meanwhile(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder commits its result just as a claim is refused, once the refusal has read
    the row. Before, the refusal read it `processing`, then found it free (finished) in a
    second read, and gave the assessed image up in error ("did not complete in 3
    attempts", after one). The row is held now from the claim to the refusal's end: the
    holder's commit waits for it, and the image is assessed. (PostgreSQL: on SQLite the
    claim's write holds the database, and no commit comes between.)"""
    instance_id = spool_instance(rt)
    _claim(rt, instance_id)  # the holder
    ended: list[Callable[[], None]] = []
    _around_the_next_read(
        monkeypatch,
        lambda: ended.append(
            _another_connection_writes(
                rt,
                instance_id,
                state=InstanceState.ASSESSED,
                finished_at=true_now(),
                reason=None,
            )
        ),
        after=True,
    )
    refused = pipeline._claim(rt, instance_id)
    [holder_ended] = ended
    holder_ended()

    assert refused == REFUSED
    row = _row(rt, instance_id)
    assert (row.state, row.reason, row.attempts) == (InstanceState.ASSESSED, None, 1)


@pytest.mark.parametrize("rt", ["postgresql"], indirect=True)
def test_a_copy_received_as_an_attempt_ends_is_not_erased(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy the attempt read (received before its claim), then another received as the
    attempt closes the image: the close read the row before the second was recorded, and
    wrote that no copy waits, erasing it (its message refused while the image was held:
    the copy was never compared). The row is read under its lock now: the second copy
    is recorded after the close, and waits to be compared."""
    instance_id = spool_instance(rt)
    received_again(rt, instance_id)  # the copy the attempt reads
    claim = _claim(rt, instance_id)
    with session_scope(rt.database_url) as session:
        newer = database_now(session)
    ended: list[Callable[[], None]] = []
    _around_the_next_read(
        monkeypatch,
        lambda: ended.append(_another_connection_writes(rt, instance_id, received_again_at=newer)),
        after=True,
    )
    pipeline._finish(rt, claim, InstanceState.NOT_ASSESSED, "not a hand")
    [copy_recorded] = ended
    copy_recorded()

    row = _row(rt, instance_id)
    assert row.state is InstanceState.NOT_ASSESSED
    assert row.received_again_at == newer


@pytest.mark.parametrize("rt", ["sqlite", "postgresql"], indirect=True)
def test_the_database_clock_tells_times_a_millisecond_apart(rt: Runtime) -> None:
    """A claim and a copy received within one millisecond are dated apart, and the
    dates keep their order stored: SQLite's clock read to the millisecond dated them
    alike, and the copy was taken for one the claim had read (forgotten)."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        stamps = [database_now(session) for _ in range(20)]
        assert any(stamp.microsecond % 1000 for stamp in stamps)
        session.execute(
            update(Instance).where(Instance.id == instance_id).values(started_at=stamps[-1])
        )
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert row.started_at == stamps[-1]
        later = stamps[-1] + dt.timedelta(microseconds=1)
        row_of = Instance.id == instance_id
        assert session.scalar(select(Instance.started_at < later).where(row_of)) is True
        assert session.scalar(select(Instance.started_at < stamps[-1]).where(row_of)) is False


def test_a_refused_message_is_not_lost_when_the_attempt_holding_the_image_dies(
    rt: Runtime,
) -> None:
    """The refused message is acknowledged; the image is not lost with it: once the
    worker holding it is gone (its heartbeat stops), the reconciler queues it, and the
    next attempt assesses the copy that came."""
    instance_id = spool_instance(rt, sex="F")
    _claim(rt, instance_id)  # an attempt, which then dies (SIGKILL, power)
    received_again(rt, instance_id, PatientSex="M")
    assert assess_instance(rt, instance_id).state == "skipped"  # the copy's message
    assert reconcile_once(rt, inference_queue_empty=True) == []  # its worker is alive

    _heartbeat_stops(rt)
    assert reconcile_once(rt) == [instance_id]
    assert assess_instance(rt, instance_id).state == "assessed"
    assert results(rt, instance_id) == [(1, True)]
    assert _row(rt, instance_id).received_again_at is None


# -- the task: its retry keeps its claim, and it queues the copy -------------------------------


def _as_the_worker_runs(
    instance_id: int, kwargs: dict[str, Any] | None = None, retries: int = 0
) -> str:
    """Run an `assess` message as a worker's pool does (Celery's tracer, not eagerly: a
    retry is published to the broker); the state it ends in."""
    tracer = build_tracer(
        ASSESS_TASK, app.tasks[ASSESS_TASK], eager=False, propagate=False, app=app
    )
    request = {
        "delivery_info": {"exchange": "", "routing_key": INFERENCE_QUEUE},
        "retries": retries,
    }
    traced = tracer(uuid.uuid4().hex, [instance_id], kwargs or {}, request)
    return states.SUCCESS if traced.info is None else str(traced.info.state)


def _counted(outcome: str) -> float:
    """This process's boneage_worker_tasks_total of `assess` tasks that ended so."""
    counted = WORKER_REGISTRY.get_sample_value(
        "boneage_worker_tasks_total", {"task": ASSESS_TASK, "outcome": outcome}
    )
    return counted or 0.0


def _messages() -> list[tuple[list[Any], dict[str, Any]]]:
    """The (args, kwargs) of each message in the inference queue, oldest first (taken)."""
    found = []
    with app.connection_for_write() as connection:
        while (
            message := connection.default_channel.basic_get(INFERENCE_QUEUE, no_ack=True)
        ) is not None:
            args, kwargs, _embed = json.loads(message.body)
            found.append((args, kwargs))
    return found


@pytest.mark.parametrize("rt", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("embedded_broker")
def test_the_tasks_retry_takes_over_the_claim_its_try_holds(rt: Runtime) -> None:
    """Trouble the task retries (the spooled file unreadable for now): its retry message
    carries the claim the try took, and takes the image over while this worker lives,
    as no other message may."""
    instance_id = spool_instance(rt)
    spool = Path(_row(rt, instance_id).spool_path)
    data = spool.read_bytes()
    spool.unlink()
    spool.mkdir()  # reading it raises a real OSError (EISDIR)

    assert _as_the_worker_runs(instance_id) == states.RETRY
    [(args, kwargs)] = _messages()
    row = _row(rt, instance_id)
    assert row.state is InstanceState.PROCESSING and row.started_at is not None
    assert args == [instance_id]
    # and the count it left, which the retry keeps (its give-back recorded or not)
    assert kwargs == {"held_since": row.started_at.isoformat(), "held_attempts": 1}

    refusals = _counted("refused")
    assert _as_the_worker_runs(instance_id) == states.SUCCESS  # another message: refused
    assert _row(rt, instance_id).state is InstanceState.PROCESSING
    # counted apart from a message for an image already finished (`skipped`)
    assert _counted("refused") == refusals + 1
    spool.rmdir()
    spool.write_bytes(data)  # the trouble passed
    assert _as_the_worker_runs(instance_id, kwargs, retries=1) == states.SUCCESS
    assert _row(rt, instance_id).state is InstanceState.ASSESSED
    assert results(rt, instance_id) == [(1, False)]


@pytest.mark.parametrize("rt", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("embedded_broker")
def test_the_task_queues_a_copy_received_while_it_held_the_image(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = spool_instance(rt, sex="F")
    _during_the_attempt(monkeypatch, lambda: received_again(rt, instance_id, PatientSex="M"))
    assert _as_the_worker_runs(instance_id) == states.SUCCESS
    assert _messages() == [([instance_id], {})]
    assert _as_the_worker_runs(instance_id) == states.SUCCESS
    assert results(rt, instance_id) == [(1, False), (2, True)]
    assert _messages() == []


# -- hosts whose clocks differ ---------------------------------------------------------------


def _clock(offset: dt.timedelta) -> Callable[[], dt.datetime]:
    return lambda: true_now() + offset


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
@pytest.mark.usefixtures("embedded_broker")
def test_a_listener_whose_clock_is_off_marks_its_round_as_with_none(
    rt: Runtime, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener's enqueuer publishes two images. A worker takes the first's message at
    once; its attempt fails, its retry is not published, and its task gives the image
    back, `received`, before the round marks it: the image stays `received`, for the
    reconciler (marked `queued`, it had no message: a listener's clock ahead did this).
    The other was given back before the round (a copy of it came, which the round
    publishes): `queued` (left `received`, the reconciler queued it too: a listener's
    clock behind did this)."""
    # the clock the listener's host read before it asked the database (gone: raising=False)
    monkeypatch.setattr("worker.messaging.now", _clock(offset), raising=False)
    monkeypatch.setattr("worker.listener.now", _clock(offset), raising=False)
    taken, earlier = spool_instance(rt), spool_instance(rt, sex="M")

    def give_back(instance_id: int) -> None:
        claim = _claim(rt, instance_id)
        tasks._give_back_instance(instance_id, Attempt(claim.assessment, claim.started_at))

    give_back(earlier)
    received_again(rt, earlier)  # its copy, which the round publishes
    enqueuer = Enqueuer(rt.database_url)
    publish = enqueuer._publish

    def published_and_taken(instance_id: int) -> bool:
        sent = publish(instance_id)
        if instance_id == taken:  # a worker takes it at once
            give_back(taken)
        return sent

    monkeypatch.setattr(enqueuer, "_publish", published_and_taken)
    try:
        enqueuer._publish_round([earlier, taken])
    finally:
        enqueuer._drop_connection()

    assert _row(rt, taken).state is InstanceState.RECEIVED
    assert _row(rt, earlier).state is InstanceState.QUEUED
    assert sorted(args[0] for args, _ in _messages()) == [taken, earlier]


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_a_worker_whose_clock_is_off_compares_each_copy_once(
    rt: Runtime, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy received while the image is assessed, after the attempt read the file, is
    compared once the attempt ends (a worker's clock ahead dated the claim after it, and
    it was taken for read and forgotten). A copy that changes nothing, compared, is done
    with (a worker's clock behind dated the comparison before it, and the reconciler
    queued it again at each round, for ever)."""
    monkeypatch.setattr("worker.pipeline.now", _clock(offset), raising=False)
    instance_id = spool_instance(rt, sex="F")
    _during_the_attempt(monkeypatch, lambda: received_again(rt, instance_id, PatientSex="M"))
    assert assess_instance(rt, instance_id).state == "assessed"
    assert _row(rt, instance_id).received_again_at is not None  # the copy, to compare
    assert assess_instance(rt, instance_id).state == "assessed"
    assert results(rt, instance_id) == [(1, False), (2, True)]

    received_again(rt, instance_id)  # sent again, unchanged
    assert assess_instance(rt, instance_id).state == "skipped"
    assert _row(rt, instance_id).received_again_at is None
    assert reconcile_once(rt, inference_queue_empty=True) == []


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_a_reprocess_on_a_host_whose_clock_is_off_queues_by_the_database_clock(
    rt: Runtime, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`reprocess` dates the images it queues again by the database's clock: the
    reconciler compares that date with its own round's, and the claims with theirs (its
    host's clock ahead, the image's copies received since were taken for read)."""
    # the clock the CLI's host read before it asked the database (gone: raising=False)
    monkeypatch.setattr("worker.reprocess.now", _clock(offset), raising=False)
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.get_one(Instance, instance_id).state = InstanceState.NOT_ASSESSED
    assert prepare_reprocess(rt, [instance_id]) == [instance_id]
    row = _row(rt, instance_id)
    with session_scope(rt.database_url) as session:
        current = database_now(session)
    assert row.queued_at is not None
    assert current - dt.timedelta(seconds=60) < row.queued_at <= current
    assert row.assessment_received_at == row.queued_at


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_a_worker_whose_clock_is_off_dates_an_images_end_by_the_database_clock(
    rt: Runtime, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image's end (``finished_at``: assessed, then rejected by the PACS) and the
    rejection's receipt are dated by the database's clock on a worker whose host is 10 min
    off: `status`'s window and the latency from reception to SR compare them with times
    other hosts stamped by that clock (before, the worker's host dated them, and a skew
    showed as that much latency, or put an image out of the last hour)."""
    monkeypatch.setattr("worker.pipeline.now", _clock(offset), raising=False)
    instance_id = spool_instance(rt)

    def now() -> dt.datetime:
        with session_scope(rt.database_url) as session:
            return database_now(session)

    before = now()
    assert assess_instance(rt, instance_id).state == "assessed"
    finished = _row(rt, instance_id).finished_at
    assert finished is not None and before <= finished <= now()

    image = dcmread(_row(rt, instance_id).spool_path)
    before = now()
    assess_instance(rt, spool_dataset(rt, pacs_rejection_note(image)))
    rejected = _row(rt, instance_id)
    assert rejected.state is InstanceState.REJECTED
    assert rejected.finished_at is not None and before <= rejected.finished_at <= now()
    with session_scope(rt.database_url) as session:
        received = session.scalars(select(Rejection.received_at)).one()
    assert before <= received <= now()
