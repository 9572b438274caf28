"""Retention compares each time on one clock, whichever host it runs on.

The rows' times are the database's clock; retention took its start from its host's and
compared it with them (the days, its removal mark, its sweep's window), and compared the
rows' times (a reception, the mark) with the files' times, its host's. A host whose clock
was minutes off the database's marked in the database's future, so that a rejection note
made just after the mark was taken for one made before it (kept for ever, and called
removed by retention); or, behind, removed a copy put in the spool after the reception
its row records. A second host cannot run in a test: retention's clock is set off here,
and the files a process on its host writes are dated by it. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from db.engine import session_scope
from db.queries import database_now
from db.schema import Delivery, Instance
from db.schema import utcnow as true_now
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_retention import (
    _assessed_and_delivered,
    _files,
    _finished_days_ago,
    _put_in_place,
    _removed_at,
    _retention,
    _runtime,
)
from tests.support import pacs_rejection_note
from worker.delivery import deliver_one, files_gone
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=30)
#: Retention's host clock off the database's by this
SKEW = dt.timedelta(minutes=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return _runtime(tmp_path, tiny_checkpoint, storescp, url)


def _host_clock(monkeypatch: pytest.MonkeyPatch, offset: dt.timedelta) -> None:
    """Retention's host clock ``offset`` off the database's."""
    monkeypatch.setattr("worker.retention.now", lambda: true_now() + offset)


def _written_on_this_host(paths: list[Path], offset: dt.timedelta) -> None:
    """Date ``paths``, written just now, by the host's clock ``offset`` off the true one:
    written by a process on retention's host (the listener, a worker)."""
    for path in paths:
        written = path.stat().st_mtime + offset.total_seconds()
        os.utime(path, (written, written))


def _database_now(rt: Runtime) -> dt.datetime:
    with session_scope(rt.database_url) as session:
        return database_now(session)


def _received_and_finished(
    rt: Runtime, instance_id: int, ago: dt.timedelta, offset: dt.timedelta
) -> None:
    """As if the instance was received and finished ``ago`` by the database's clock, its
    received file written then by the listener on retention's host, whose clock is
    ``offset`` off the database's."""
    then = _database_now(rt) - ago
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.received_at = instance.finished_at = then
        spool = Path(instance.spool_path)
    written = (then + offset).timestamp()
    os.utime(spool, (written, written))


def test_a_host_ahead_marks_by_the_database_clock_and_a_note_made_after_goes_in_its_turn(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention, on a host 10 min ahead of the database, removes an image's files. The
    PACS then rejects the image, and our rejection notes are made and sent, seconds
    after the mark by the database's clock: they are objects made after it, not called
    removed by retention, and their files go once their days are past. Before, the mark
    was the host's clock, 10 min on: the notes were taken for objects made before it,
    called removed (`status`, `retry-deliveries`), and their files kept for ever."""
    _host_clock(monkeypatch, SKEW)
    image_id, files = _assessed_and_delivered(runtime)
    image = dcmread(files[0])
    _finished_days_ago(runtime, image_id, 40)
    before = _database_now(runtime)
    assert _retention(runtime).instances == 1
    assert not any(p.exists() for p in files)

    note = spool_dataset(runtime, pacs_rejection_note(image, "113038"))
    withdrawn = assess_instance(runtime, note)
    assert withdrawn.state == "not_assessed" and len(withdrawn.delivery_ids) == 2  # SR, SC
    for delivery_id in withdrawn.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    ours = [p for p in _files(runtime, image_id) if p.exists()]
    assert len(ours) == 2
    _written_on_this_host(ours, SKEW)  # by a worker on retention's host
    with session_scope(runtime.database_url) as session:
        assert files_gone(session, withdrawn.delivery_ids) == {}  # there: not removed
    assert _retention(runtime).instances == 0  # new
    assert all(p.exists() for p in ours)

    _finished_days_ago(runtime, image_id, 31)
    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 2)
    assert not any(p.exists() for p in ours)
    with session_scope(runtime.database_url) as session:
        assert files_gone(session, withdrawn.delivery_ids) == dict.fromkeys(
            withdrawn.delivery_ids, True
        )
        made = session.scalars(
            select(Delivery.created_at).where(Delivery.id.in_(withdrawn.delivery_ids))
        ).all()
    marked = _removed_at(runtime, image_id)
    assert marked is not None and before < min(made) <= max(made) <= marked
    assert marked <= _database_now(runtime)  # the database's clock, not 10 min on


def test_a_host_behind_keeps_a_copy_put_in_the_spool_after_the_reception_its_row_records(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener, retention in its process, runs on a host 10 min behind the
    database. The PACS rejects an image as expired under its own retention policy, so
    its files go at the next run; before it, the listener renames a copy of the image
    received again, corrected, into the spool, after the reception its row records, and
    is still to record it. The run marks the image and keeps that copy, and the
    listener's record brings the image back. Before, the copy's time (the host's) was
    compared with the reception (the database's): 10 min behind, it looked the older,
    and the copy was removed."""
    _host_clock(monkeypatch, -SKEW)
    image_id = spool_instance(runtime)
    [spool] = _files(runtime, image_id)
    note = spool_dataset(runtime, pacs_rejection_note(dcmread(spool), "113039"))
    assert assess_instance(runtime, note).state == "not_assessed"
    assert assess_instance(runtime, image_id).state == "skipped"
    record = _put_in_place(runtime, image_id, PatientSex="M")
    _written_on_this_host([spool], -SKEW)  # by the listener
    with session_scope(runtime.database_url) as session:
        received = session.get_one(Instance, image_id).received_at
    assert spool.stat().st_mtime > (received - SKEW).timestamp()  # after, by the host's clock

    report = _retention(runtime)
    assert report.instances == 1  # marked
    assert spool.exists()
    assert record() == image_id
    assert _removed_at(runtime, image_id) is None
    assert dcmread(spool).PatientSex == "M"


@pytest.mark.parametrize("offset", [-SKEW, SKEW], ids=["behind", "ahead"])
def test_the_days_are_counted_by_the_database_clock(
    runtime: Runtime, offset: dt.timedelta, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of two images finished 5 min either side of the days kept, by the database's
    clock, the older goes and the younger stays, on a host 10 min behind or ahead.
    Before, the days were counted by the host's clock: behind, it kept the older; ahead,
    it removed the younger before its time."""
    _host_clock(monkeypatch, offset)
    due, not_due = spool_instance(runtime, modality="CT"), spool_instance(runtime, modality="CT")
    for instance_id in (due, not_due):
        assert assess_instance(runtime, instance_id).state == "not_assessed"
    _received_and_finished(runtime, due, KEEP + dt.timedelta(minutes=5), offset)
    _received_and_finished(runtime, not_due, KEEP - dt.timedelta(minutes=5), offset)
    due_files, not_due_files = _files(runtime, due), _files(runtime, not_due)

    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 1)
    assert not any(p.exists() for p in due_files)
    assert all(p.exists() for p in not_due_files)
    assert _removed_at(runtime, not_due) is None


def test_a_host_behind_sweeps_the_files_of_a_mark_made_minutes_ago(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run on another host marked an image 5 min ago, by the database's clock, and
    died before it unlinked anything; a run on a host 10 min behind the database sweeps
    its files. Before, the sweep took marks made before its host's time: this one, 5
    min in its future, was left to a run an hour on."""
    _host_clock(monkeypatch, -SKEW)
    instance_id = spool_instance(runtime, modality="CT")
    assert assess_instance(runtime, instance_id).state == "not_assessed"
    _received_and_finished(runtime, instance_id, dt.timedelta(days=40), -SKEW)
    files = _files(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(files_removed_at=database_now(session) - dt.timedelta(minutes=5))
        )

    report = _retention(runtime)
    assert (report.instances, report.files) == (0, 1)
    assert not any(p.exists() for p in files)
