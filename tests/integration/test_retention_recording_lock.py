"""Retention unlinks a recorded instance's received image under the spool's recording lock.

The listener renames a new copy of an instance into the same place in the spool, and
holds the spool's recording lock shared from before that rename until the copy's row is
committed (dicom_io.scp; the commit clears the removal mark and sets
``received_again_at``). Retention looked at an expired instance's image, then unlinked
it by name, without that lock: a copy renamed in between was unlinked, perhaps a
corrected image the PACS was told Success for, while its row said it was there to be
compared. It now takes the lock exclusively once a batch and looks again under it, at
the file and at its row. Real assessments and deliveries as in test_retention.py; the
listener's side of the lock (`_RecordingHold`, as a listener holds it) and its record
(`record_instance`) driven from the test. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Instance, Result
from db.schema import utcnow as now
from dicom_io.scp import _RecordingHold
from tests.conftest import StoreSCP
from tests.integration.test_retention import (
    _assessed_and_delivered,
    _received_and_finished_days_ago,
    _removed_at,
    _retention,
    _runtime,
    new_copy,
)
from tests.support import wait_for
from worker import retention
from worker.cli import main as cli
from worker.listener import record_instance
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return _runtime(tmp_path, tiny_checkpoint, storescp, url)


def _listener_started(rt: Runtime) -> _RecordingHold:
    """The listener's side of the spool's recording lock, as a listener makes it when it
    starts."""
    rt.settings.spool_dir.mkdir(parents=True, exist_ok=True)
    hold = _RecordingHold(rt.settings.spool_dir)
    hold.open()
    return hold


@pytest.fixture
def listener_lock(runtime: Runtime) -> Iterator[_RecordingHold]:
    hold = _listener_started(runtime)
    yield hold
    hold.close()


def _row(rt: Runtime, instance_id: int) -> tuple[dt.datetime | None, dt.datetime | None]:
    """The instance's removal mark, and when a copy of it was received again."""
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        return row.files_removed_at, row.received_again_at


def _lock_tries(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The spools retention asks the recording lock of, from now on, in order."""
    tries: list[Path] = []
    real_lock = retention.recording_lock

    def counted(spool: Path) -> contextlib.AbstractContextManager[OSError | None]:
        tries.append(spool)
        return real_lock(spool)

    monkeypatch.setattr(retention, "recording_lock", counted)
    return tries


def _assessed_male(rt: Runtime, instance_id: int) -> list[bool]:
    """Whether each of the instance's assessments read a male hand, first to last."""
    with session_scope(rt.database_url) as session:
        return [
            r.male
            for r in session.scalars(
                select(Result).where(Result.instance_id == instance_id).order_by(Result.id)
            )
        ]


def test_a_copy_renamed_in_between_retentions_look_and_its_unlink_stays(
    runtime: Runtime, listener_lock: _RecordingHold, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An instance finished 40 days ago is sent again, the sex corrected, just as
    retention removes its files: the listener's rename comes after retention looked at
    the old copy and before it unlinks it by name. It waits for retention's lock, and
    the new copy it then renames in stays, to be compared (before, the new copy was
    unlinked: the correction lost, and the row saying it was there)."""
    instance_id, files = _assessed_and_delivered(runtime)
    _received_and_finished_days_ago(runtime, instance_id, 40)
    image = files[0]
    incoming, received = new_copy(runtime, instance_id, PatientSex="M")
    waiting, renamed = threading.Event(), threading.Event()
    recorded: list[int] = []

    def c_store() -> None:
        """The listener's C-STORE from its rename to its commit (dicom_io.scp)."""
        with listener_lock.shared():
            os.replace(incoming, image)
            renamed.set()
            recorded.append(record_instance(runtime.database_url, received))

    listener = threading.Thread(target=c_store)
    real_flock = fcntl.flock

    def flock(descriptor: int, operation: int) -> None:
        """Says when the C-STORE's lock would wait (for retention), then waits."""
        if operation == fcntl.LOCK_SH and threading.current_thread() is listener:
            try:
                real_flock(descriptor, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                waiting.set()
        real_flock(descriptor, operation)

    real_unlink = Path.unlink

    def unlink(path: Path, missing_ok: bool = False) -> None:
        """Retention's unlink of the image, after it looked at it: the C-STORE comes."""
        if path == image and not listener.is_alive() and not renamed.is_set():
            listener.start()
            wait_for(
                lambda: waiting.is_set() or renamed.is_set(),
                timeout=30,
                what="the C-STORE renaming its copy in, or waiting for the lock to",
            )
        real_unlink(path, missing_ok)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(Path, "unlink", unlink)
    report = _retention(runtime)
    monkeypatch.undo()
    listener.join(timeout=60)

    assert not listener.is_alive() and recorded == [instance_id]
    assert image.exists() and dcmread(image).PatientSex == "M"
    assert waiting.is_set()  # it waited for retention's lock
    assert (report.instances, report.files) == (1, 3)  # the old copy, its SR and SC
    removed_at, received_again_at = _row(runtime, instance_id)
    assert removed_at is None and received_again_at is not None
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert _assessed_male(runtime, instance_id) == [False, True]


@pytest.mark.parametrize("lock", ["free", "never_made", "none_on_nfs"])
def test_a_copy_recorded_before_the_lock_is_taken_is_kept_by_its_row_whatever_its_time(
    runtime: Runtime, lock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy sent again with the sex corrected is renamed in and recorded as retention
    starts unlinking, by a listener on a host whose clock is two hours behind: its time
    says it is older than the copy retention chose. Its row, read again under the lock,
    keeps it, and an expired image beside it goes all the same: under the lock where a
    listener has made it ("free"), without it where no lock is possible (no listener has
    made it; NFS, where the exclusive lock retention asks for fails), as before."""
    kept, kept_files = _assessed_and_delivered(runtime)
    goes, goes_files = _assessed_and_delivered(runtime)
    for instance_id in (kept, goes):
        _received_and_finished_days_ago(runtime, instance_id, 40)
    image = kept_files[0]
    incoming, received = new_copy(runtime, kept, PatientSex="M")
    behind = (now() - dt.timedelta(hours=2)).timestamp()
    os.utime(incoming, (behind, behind))
    hold = _listener_started(runtime) if lock != "never_made" else None
    recorded: list[int] = []

    def c_store() -> None:
        """The listener's C-STORE of the copy, from its rename to its commit."""
        with hold.shared() if hold is not None else contextlib.nullcontext():
            os.replace(incoming, image)
            recorded.append(record_instance(runtime.database_url, received))

    if lock == "none_on_nfs":
        real_flock = fcntl.flock

        def flock(descriptor: int, operation: int) -> None:
            if operation & fcntl.LOCK_EX:  # Linux's NFS emulation, where the server has none
                raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
            real_flock(descriptor, operation)

        monkeypatch.setattr(fcntl, "flock", flock)
    real_stat = Path.stat

    def stat(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        """Retention's first look at either image: the C-STORE has just been recorded."""
        if path in (image, goes_files[0]) and not recorded:
            c_store()
        return real_stat(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", stat)
    report = _retention(runtime)
    monkeypatch.undo()
    if hold is not None:
        hold.close()

    assert recorded == [kept]
    assert image.exists() and dcmread(image).PatientSex == "M"
    assert _row(runtime, kept)[0] is None
    assert not any(path.exists() for path in goes_files)
    # the kept one's SR and SC too: the copy is compared with what they hold, and its
    # withdrawals are made from them (before, they went, and a withdrawal was left to be
    # made by hand)
    assert all(path.exists() for path in kept_files)
    # both marked; the expired image, its SR and SC
    assert (report.instances, report.files) == (2, 3)
    assert assess_instance(runtime, kept).state == "assessed"
    assert _assessed_male(runtime, kept) == [False, True]


def test_an_image_left_while_listeners_hold_the_lock_goes_at_the_next_run(
    runtime: Runtime,
    listener_lock: _RecordingHold,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Listeners hold the recording lock all the while retention tries for it: the
    image of the instance it marks is kept, not counted as removed, and said at
    WARNING; the next run's sweep removes it (before, it was unlinked without the
    lock)."""
    instance_id, files = _assessed_and_delivered(runtime)
    _received_and_finished_days_ago(runtime, instance_id, 40)
    sizes = [path.stat().st_size for path in files]
    # the run would try for the lock 30 s: a short while says the same here
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 0.2)
    caplog.set_level(logging.WARNING, logger="worker.retention")

    with listener_lock.shared():  # a C-STORE between its rename and its commit
        report = _retention(runtime)

    # marked; its SR and SC kept with it, their row not read under the lock
    assert (report.instances, report.files) == (1, 0)
    assert all(path.exists() for path in files)
    assert _row(runtime, instance_id)[0] is not None
    assert [r.getMessage() for r in caplog.records if r.name == "worker.retention"] == [
        "retention: the files of 1 instance(s) marked removed left to a later run (the "
        "next runs', within a day of the mark; after it, `boneage-worker retention "
        "--all-marked`): listeners held the spool's recording lock for 0.2 s"
    ]

    later = _retention(runtime)
    assert (later.instances, later.files) == (0, 3)
    assert later.bytes == sum(sizes)
    assert not any(path.exists() for path in files)
    assert _removed_at(runtime, instance_id) is not None


def test_a_run_waits_for_the_lock_once_and_the_command_says_what_it_left(
    runtime: Runtime,
    listener_lock: _RecordingHold,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listeners hold the lock through a run of several batches: the run waits for it
    once, and its later batches leave their images at once (the hourly run is in the
    listener's reconcile loop, which each batch's 30 s held up before); the command says
    how many images it left, and why."""
    expired = [_assessed_and_delivered(runtime) for _ in range(3)]
    for instance_id, _ in expired:
        _received_and_finished_days_ago(runtime, instance_id, 40)
    monkeypatch.setattr(retention, "_BATCH", 1)
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 0)  # one try a wait
    tries = _lock_tries(monkeypatch)
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(runtime.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", runtime.database_url)

    with listener_lock.shared():
        done = CliRunner().invoke(cli, ["retention", "--days", "30"])

    assert done.exit_code == 0, done.output
    assert len(tries) == 1
    assert all(path.exists() for _, files in expired for path in files)
    output = " ".join(done.output.split())
    assert "removed the files of 3 instance(s)" in output and ": 0 file(s)" in output
    assert (
        "the files of 3 instance(s) marked removed (by this run, or before) were kept this "
        "time: listeners held the spool's recording lock (images being received); the next "
        "runs remove them, within a day of their mark"
    ) in output


def test_a_sweep_of_files_gone_already_takes_no_lock(
    runtime: Runtime,
    listener_lock: _RecordingHold,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The next run sweeps the instance marked an hour ago, its image, SR and SC gone:
    it asks for no lock (the SR and SC are looked at under it only where they are
    there to go), and leaves nothing while listeners hold it."""
    instance_id, files = _assessed_and_delivered(runtime)
    _received_and_finished_days_ago(runtime, instance_id, 40)
    first = _retention(runtime)
    assert (first.instances, first.files) == (1, 3)
    assert not any(path.exists() for path in files)
    tries = _lock_tries(monkeypatch)
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 0)
    caplog.set_level(logging.WARNING, logger="worker.retention")
    caplog.clear()
    with listener_lock.shared():
        swept = _retention(runtime)
    assert (swept.instances, swept.files, swept.left) == (0, 0, 0)
    assert tries == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_objects_of_an_image_outside_the_spool_go_under_the_row_check_too(
    runtime: Runtime, listener_lock: _RecordingHold, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row naming its image outside the node's spool (where the data directory once
    was) and its SR and SC in the outbox: a copy recorded as retention comes to them
    (the mark cleared) keeps them, as for an image in the spool; before, they went
    without the row being read again."""
    instance_id, [image, *objects] = _assessed_and_delivered(runtime)
    _received_and_finished_days_ago(runtime, instance_id, 40)
    elsewhere = tmp_path / "moved-from" / image.name
    elsewhere.parent.mkdir()
    image.rename(elsewhere)
    with session_scope(runtime.database_url) as session:
        session.get_one(Instance, instance_id).spool_path = str(elsewhere)
    real_stat = Path.stat
    recorded: list[bool] = []

    def stat(path: Path, *, follow_symlinks: bool = True) -> os.stat_result:
        """Retention's first look at the objects: a copy has just been recorded."""
        if path in objects and not recorded:
            recorded.append(True)
            with session_scope(runtime.database_url) as session:
                row = session.get_one(Instance, instance_id)
                row.files_removed_at, row.received_again_at = None, now()
        return real_stat(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", stat)
    report = _retention(runtime)
    monkeypatch.undo()

    assert recorded == [True]
    assert all(path.exists() for path in (elsewhere, *objects))
    assert (report.instances, report.files, report.kept_elsewhere) == (1, 0, 1)
