"""A process that dies holding several images counts none of their attempts, and each is
assessed alone from then on (worker.reconciler, worker.tasks, worker.isolation).

A batching worker's task threads hold several images at once; where the process died,
each image's attempt counted, although at most one of them killed it, and an image that
kills its process each time ended every image held beside it in `error`. The claims here
are real (worker.pipeline), the deaths the heartbeat of this process going stale, as a
dead worker's does; on SQLite and PostgreSQL. A real batching worker killed each time it
holds one image: tests/integration/test_reliability.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from db.engine import session_scope
from db.queries import database_now
from db.schema import Heartbeat, Instance, InstanceState, Result
from dicom_io.pixels import PixelDataError
from tests.integration import test_live_claims
from tests.integration.test_live_claims import REFUSED, _heartbeat_stops, _row
from tests.integration.test_pipeline import another_model, reconcile_once, spool_instance
from tests.support import a_listener_writing_for_a_while
from worker import heartbeat as heartbeat_module
from worker import pipeline, tasks
from worker.heartbeat import STALE_AFTER, HeartbeatThread, process_name
from worker.pipeline import CLAIM_ENDED, MAX_ATTEMPTS, assess_instance
from worker.reconciler import DIED, DIED_HOLDING_OTHERS, PROCESSING_LEASE
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node on the tiny model, this process a live worker; on SQLite and PostgreSQL
rt = test_live_claims.rt


def _claimed(
    rt: Runtime, instance_id: int, *, shared: bool, held: dt.datetime | None = None
) -> pipeline._Claim:
    claim = pipeline._claim(rt, instance_id, held, shared=shared)
    assert isinstance(claim, pipeline._Claim), claim
    return claim


def _lives_again(rt: Runtime) -> None:
    HeartbeatThread(rt.database_url, "worker").beat()


def test_a_process_that_dies_holding_others_counts_none_of_their_attempts(rt: Runtime) -> None:
    together = [spool_instance(rt), spool_instance(rt)]
    solo = spool_instance(rt)
    for instance_id in together:
        _claimed(rt, instance_id, shared=True)  # a batching worker's task threads
    _claimed(rt, solo, shared=False)  # a process of one image at a time
    assert [_row(rt, i).claim_shared for i in (*together, solo)] == [True, True, False]

    _heartbeat_stops(rt)
    assert sorted(reconcile_once(rt)) == sorted([*together, solo])
    for instance_id in together:
        row = _row(rt, instance_id)
        assert (row.state, row.attempts, row.alone) == (InstanceState.QUEUED, 0, True)
        assert (row.claim_shared, row.claimed_by) == (False, None)
        assert row.reason == DIED_HOLDING_OTHERS
    row = _row(rt, solo)  # its death is its own: counted, as before, and now said
    assert (row.state, row.attempts, row.alone) == (InstanceState.QUEUED, 1, False)
    assert row.reason == "attempt 1" + DIED

    _lives_again(rt)
    for instance_id in (*together, solo):
        assert assess_instance(rt, instance_id).state == "assessed"
    assert [_row(rt, i).attempts for i in (*together, solo)] == [1, 1, 2]
    # the reason said what happened until an attempt ended it
    assert _row(rt, together[0]).reason == _row(rt, solo).reason != DIED_HOLDING_OTHERS


def test_a_message_leaves_a_shared_claim_that_died_to_the_reconciler(rt: Runtime) -> None:
    """Even with its attempts spent: the image is not given up by a message (it used to end
    in `error`), and the reconciler gives the attempt back."""
    instance_id, solo = spool_instance(rt), spool_instance(rt)
    _claimed(rt, instance_id, shared=True)
    _claimed(rt, solo, shared=False)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id.in_([instance_id, solo]))
            .values(attempts=MAX_ATTEMPTS)
        )
    _heartbeat_stops(rt)

    assert assess_instance(rt, instance_id) == REFUSED
    assert (_row(rt, instance_id).state, _row(rt, instance_id).attempts) == (
        InstanceState.PROCESSING,
        MAX_ATTEMPTS,
    )
    assert assess_instance(rt, solo).state == "error"  # its own death, its third: as before

    assert reconcile_once(rt) == [instance_id]
    row = _row(rt, instance_id)
    assert (row.state, row.attempts, row.alone) == (InstanceState.QUEUED, MAX_ATTEMPTS - 1, True)
    _lives_again(rt)
    assert assess_instance(rt, instance_id).state == "assessed"


def test_a_death_in_a_retrys_back_off_gives_back_no_attempt_twice(rt: Runtime) -> None:
    """A shared claim's attempt failed for trouble the task retries (its attempt given
    back), and the process died in the back-off, before the retry: the reconciler gives
    back nothing more (before, it gave the attempt back again, forgiving a real one)."""
    instance_id = spool_instance(rt)
    claim = _claimed(rt, instance_id, shared=True)
    with session_scope(rt.database_url) as session:  # and an attempt spent before it
        session.get_one(Instance, instance_id).attempts = 2
    try:
        raise OSError("the spool's mount stalled")
    except OSError as exc:
        pipeline._note_failed_attempt(rt, claim, exc)
    row = _row(rt, instance_id)
    assert (row.state, row.attempts, row.transient_failures) == (InstanceState.PROCESSING, 1, 1)

    # the task's retry takes it again, its claim shared as its process holds others
    retry = _claimed(rt, instance_id, shared=True, held=claim.started_at)
    assert (_row(rt, instance_id).attempts, _row(rt, instance_id).claim_shared) == (2, True)
    try:
        raise OSError("the spool's mount stalled again")
    except OSError as exc:
        pipeline._note_failed_attempt(rt, retry, exc)
    assert _row(rt, instance_id).transient_failures == 2

    _heartbeat_stops(rt)
    assert reconcile_once(rt) == [instance_id]
    row = _row(rt, instance_id)
    assert (row.state, row.attempts, row.alone) == (InstanceState.QUEUED, 1, False)


def test_a_database_away_longer_than_a_heartbeat_is_no_workers_death(rt: Runtime) -> None:
    """A failover of a minute: every heartbeat stale, the living's too, and the listener's
    written again first. Its round took back every image in hand, said each worker had
    died, and marked a batching worker's images alone for good; a message for one of
    them took it over from its live worker. Nobody has written for a heartbeat's
    span since the database came back: nothing is taken until somebody has."""
    together, solo = spool_instance(rt), spool_instance(rt)
    _claimed(rt, together, shared=True)
    _claimed(rt, solo, shared=False)
    before = [(_row(rt, i).started_at, _row(rt, i).attempts) for i in (together, solo)]
    with session_scope(rt.database_url) as session:  # the database away for a minute
        current = database_now(session)
        for beat in session.scalars(select(Heartbeat)):
            beat.seen_at = current - 2 * STALE_AFTER
    listener = HeartbeatThread(rt.database_url, "listener")
    listener.beat()  # back: the listener writes again first

    assert reconcile_once(rt) == []
    assert assess_instance(rt, together) == REFUSED
    for instance_id, (started_at, attempts) in zip((together, solo), before, strict=True):
        row = _row(rt, instance_id)
        assert (row.state, row.claimed_by, row.reason) == (
            InstanceState.PROCESSING,
            process_name("worker"),
            None,
        )
        assert (row.started_at, row.attempts, row.alone) == (started_at, attempts, False)

    # the worker writes again; once a process has written for a heartbeat's span, a
    # worker silent all that time is dead: this one is not
    _lives_again(rt)
    a_listener_writing_for_a_while(rt.database_url)
    assert reconcile_once(rt) == []
    _heartbeat_stops(rt)  # and now it dies
    assert sorted(reconcile_once(rt)) == sorted([together, solo])
    assert _row(rt, together).reason == DIED_HOLDING_OTHERS


def test_a_heartbeat_says_since_when_its_writes_have_gone_on(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run of writes a heartbeat vouches with starts again after a write that failed."""
    beat = HeartbeatThread(rt.database_url, "listener")

    def since() -> tuple[dt.datetime | None, dt.datetime]:
        with session_scope(rt.database_url) as session:
            row = session.get_one(Heartbeat, beat.name)
            return row.writing_since, row.seen_at

    beat.beat()
    first, seen = since()
    assert first == seen
    beat.beat()
    assert since()[0] == first and since()[1] > first

    def away(_url: str) -> Any:
        raise OperationalError("SELECT 1", {}, Exception("the database is away"))

    with monkeypatch.context() as patched:
        patched.setattr(heartbeat_module, "session_scope", away)
        beat.beat()  # not written
    beat.beat()
    again, seen = since()
    assert again == seen and again is not None and first is not None and again > first


@pytest.mark.parametrize("after", ["finished", "holding"])
@pytest.mark.parametrize("ends", ["assessed", "not assessed"])
def test_an_attempt_whose_claim_ended_leaves_the_image_to_the_attempt_after_it(
    rt: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: str, after: str
) -> None:
    """An attempt held past its lease (a stalled mount): the reconciler takes the image
    back, and a worker of another model (a rollout) assesses it, or is assessing it.
    The first then ended: its result went beside the other model's, and both SRs would
    have gone to the PACS, two bone ages for one image; or its "not assessed" closed the
    image over the other's. It leaves the image as the attempt after it left it, or
    holds it, and stages nothing."""
    instance_id = spool_instance(rt)
    other = another_model(rt, tmp_path, 14)
    meanwhile: list[str] = []
    stalls = [True]  # the first attempt's alone
    started: list[dt.datetime | None] = []

    def stalled(*args: Any, **kwargs: Any) -> Any:
        if stalls and stalls.pop():
            with session_scope(rt.database_url) as session:
                row = session.get_one(Instance, instance_id)
                assert row.started_at is not None
                row.started_at -= PROCESSING_LEASE + dt.timedelta(seconds=1)
            assert reconcile_once(rt) == [instance_id]
            if after == "finished":
                with monkeypatch.context() as unpatched:  # the other model's worker, as it is
                    unpatched.setattr(pipeline, "_decode", real_decode)
                    meanwhile.append(assess_instance(other, instance_id, send=False).state)
            else:
                meanwhile.append(type(pipeline._claim(other, instance_id)).__name__)
            started.append(_row(rt, instance_id).started_at)
        return real(*args, **kwargs)

    real_decode = pipeline._decode
    real: Callable[..., Any]

    if ends == "assessed":
        real = pipeline.stage_outputs
        monkeypatch.setattr(pipeline, "stage_outputs", stalled)
    else:  # the first finds the image not assessable: a gate it did not pass
        real = pipeline._finish
        monkeypatch.setattr(pipeline, "_finish", stalled)
        monkeypatch.setattr(
            pipeline, "_decode", lambda *_: (_ for _ in ()).throw(PixelDataError("stalled"))
        )
    outcome = assess_instance(rt, instance_id, send=False)
    monkeypatch.undo()

    row = _row(rt, instance_id)  # as the other model's worker left it, or holds it
    assert row.started_at == started[-1]
    with session_scope(rt.database_url) as session:
        models = [r.model_id for r in session.scalars(select(Result))]
    if after == "finished":
        assert meanwhile == ["assessed"]
        # (what the first found, as before: the row is the other's)
        assert outcome.state == ("duplicate" if ends == "assessed" else "not_assessed"), outcome
        assert row.state is InstanceState.ASSESSED
        assert models == [other.predictor.model_id]
    else:
        assert meanwhile == ["_Claim"]
        assert (outcome.state, outcome.reason) == ("skipped", CLAIM_ENDED)
        assert (row.state, row.reason) == (InstanceState.PROCESSING, None)
        assert models == []
    staged = [p for p in rt.settings.outbox_dir.rglob("*") if p.is_file()]
    assert all(".staged" not in p.name for p in staged), staged


def test_a_retry_after_a_failure_the_database_kept_unrecorded_counts_no_new_attempt(
    rt: Runtime,
) -> None:
    """An attempt fails for trouble the task retries, and the database is away as it
    would give its attempt back: the retry counted a new attempt all the same, and on
    the image's third ended it in error, "did not complete in 3 attempts", for a blip.
    The retry goes on with the attempt the try before counted, recorded or not."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:  # two attempts spent before
        session.get_one(Instance, instance_id).attempts = MAX_ATTEMPTS - 1
    claim = _claimed(rt, instance_id, shared=False)
    assert claim.attempts == MAX_ATTEMPTS == _row(rt, instance_id).attempts
    # it fails; the give-back is not recorded (the database away)
    retry = pipeline._claim(rt, instance_id, claim.started_at, held_attempts=claim.attempts)
    assert isinstance(retry, pipeline._Claim), retry  # before: given up, in error
    row = _row(rt, instance_id)
    assert (row.state, row.attempts) == (InstanceState.PROCESSING, MAX_ATTEMPTS)
    # it fails again, the give-back recorded this time: the next retry counts the same
    try:
        raise OSError("the spool's mount stalled")
    except OSError as exc:
        pipeline._note_failed_attempt(rt, retry, exc)
    assert _row(rt, instance_id).attempts == MAX_ATTEMPTS - 1
    outcome = assess_instance(rt, instance_id, held=retry.started_at, held_attempts=retry.attempts)
    assert outcome.state == "assessed", outcome
    assert _row(rt, instance_id).attempts == MAX_ATTEMPTS


def test_a_shared_claim_whose_lease_ran_out_in_a_live_worker_counts(rt: Runtime) -> None:
    """Nothing died: the images beside it finished, and the one that hung is at fault."""
    instance_id = spool_instance(rt)
    _claimed(rt, instance_id, shared=True)
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert row.started_at is not None
        row.started_at -= PROCESSING_LEASE + dt.timedelta(seconds=1)
    assert reconcile_once(rt) == [instance_id]
    row = _row(rt, instance_id)
    assert (row.state, row.attempts, row.alone, row.reason) == (
        InstanceState.QUEUED,
        1,
        False,
        None,
    )


def test_an_image_marked_alone_is_never_claimed_shared(rt: Runtime) -> None:
    """The task read the row before the reconciler marked it, and took it beside others:
    its claim is not shared all the same, and a death then counts against it."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.get_one(Instance, instance_id).alone = True
    _claimed(rt, instance_id, shared=True)
    assert _row(rt, instance_id).claim_shared is False
    _heartbeat_stops(rt)
    reconcile_once(rt)
    row = _row(rt, instance_id)
    assert (row.attempts, row.reason) == (1, "attempt 1" + DIED)


def test_a_death_while_assessed_alone_counts(rt: Runtime) -> None:
    """The image alone in its process: its claim is not shared, and its death is its own."""
    instance_id = spool_instance(rt)
    _claimed(rt, instance_id, shared=True)
    _heartbeat_stops(rt)
    reconcile_once(rt)
    _lives_again(rt)
    _claimed(rt, instance_id, shared=False)  # as the task claims an image to be alone
    _heartbeat_stops(rt)
    reconcile_once(rt)
    row = _row(rt, instance_id)
    assert (row.attempts, row.alone, row.claim_shared) == (1, True, False)
    assert row.reason == "attempt 1" + DIED  # no longer that the death was not counted


@pytest.mark.parametrize("rt", ["sqlite"], indirect=True)
@pytest.mark.parametrize("alone", [False, True])
def test_the_task_in_a_batching_worker_holds_an_image_together_or_alone(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch, alone: bool
) -> None:
    """Run as a batching worker's threads pool runs it: an image to be assessed alone is
    held alone in the process, its claim not shared; any other is held beside others,
    its claim shared. Seen from inside the attempt, as it writes its outputs."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.get_one(Instance, instance_id).alone = alone
    monkeypatch.setitem(tasks._state, "pool", "threads")
    monkeypatch.setitem(tasks._state, "concurrency", 4)
    monkeypatch.setattr(tasks, "_ISOLATION", tasks.Isolation())
    seen: list[tuple[bool, int, bool]] = []
    real = pipeline.stage_outputs

    def staging(*args: Any, **kwargs: Any) -> Any:
        isolation = tasks._ISOLATION
        seen.append((isolation._alone, isolation._together, _row(rt, instance_id).claim_shared))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_outputs", staging)
    assert tasks.assess.run(instance_id) == "assessed"
    assert seen == [(True, 0, False)] if alone else [(False, 1, True)]
    assert tasks._ISOLATION.held == 0


@pytest.mark.parametrize("rt", ["sqlite"], indirect=True)
def test_the_task_of_a_process_of_one_image_takes_no_part(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The solo and prefork pools: a claim never shared, whatever the row says."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.get_one(Instance, instance_id).alone = True
    monkeypatch.setitem(tasks._state, "pool", "solo")
    monkeypatch.setitem(tasks._state, "concurrency", 1)
    assert tasks.assess.run(instance_id) == "assessed"
    row = _row(rt, instance_id)
    assert (row.claim_shared, row.attempts) == (False, 1)


def test_a_message_taking_over_from_a_dead_worker_says_so_and_the_error_quotes_it(
    rt: Runtime,
) -> None:
    """A solo worker killed (a deploy's SIGKILL, the OOM killer), its message delivered
    again (RabbitMQ): the claim that takes over says how the last attempt ended, as the
    reconciler does, and so does the error after the third."""
    instance_id = spool_instance(rt)
    _claimed(rt, instance_id, shared=False)
    _heartbeat_stops(rt)
    _claimed(rt, instance_id, shared=False)  # the message again, in the next worker
    assert _row(rt, instance_id).reason == "attempt 1" + DIED
    _heartbeat_stops(rt)
    _claimed(rt, instance_id, shared=False)
    _heartbeat_stops(rt)
    outcome = assess_instance(rt, instance_id)
    assert (outcome.state, outcome.reason) == (
        "error",
        "processing did not complete in 3 attempts; the last: attempt 3" + DIED,
    )
