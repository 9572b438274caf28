"""Retention of received images that no instance row names: the listener put them in
the spool and could not commit their row (the database was down, and the PACS never
sent them again), or their rows were lost (a database restored from a backup).

Such an image is dated from when retention first found it unrecorded (a marker in
spool/.unrecorded), never by its own time. A real listener (pynetdicom) fed by dcmtk's
storescu, the node's database on SQLite and on PostgreSQL; "received 40 days ago" and
"first seen 31 days ago" are written into the files' times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import delete, select

from db.engine import session_scope, upgrade
from db.schema import Instance
from db.schema import utcnow as now
from dicom_io.scp import (
    RECORDING_LOCK_NAME,
    ReceivedInstance,
    StorageSCP,
    _RecordingHold,
    recording_lock,
    spool_path,
)
from tests.integration.test_listener import write_hand
from tests.integration.test_pipeline import spool_instance
from tests.support import free_port, storescu_command, wait_for
from worker import retention
from worker.listener import Listener, record_instance
from worker.retention import remove_expired_files
from worker.runtime import Runtime
from worker.settings import load_settings

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=30)
#: Where retention dates the received images no row names (worker.retention)
UNRECORDED_DIR = ".unrecorded"

FIRST_SEEN = (
    "received image(s) that no instance records, first seen now: removed "
    "BONEAGE_RETENTION_DAYS from now unless a row names them"
)

ListenerFactory = Callable[[Callable[[ReceivedInstance], int]], StorageSCP]


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings = load_settings(data_dir=tmp_path / "data", model=tiny_checkpoint, database_url=url)
    upgrade(settings.effective_database_url)
    return Runtime(settings)


@pytest.fixture
def listener_factory(node: Runtime, dcmtk: dict[str, str]) -> Iterator[ListenerFactory]:
    """The listener on the node's spool, recording with ``record``; stopped afterwards."""
    started: list[StorageSCP] = []

    def start(record: Callable[[ReceivedInstance], int]) -> StorageSCP:
        scp = StorageSCP(
            ae_title="BONEAGE",
            spool_dir=node.settings.spool_dir,
            record=record,
            notify=lambda _id: None,
            host="127.0.0.1",
            port=0,
        )
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


@pytest.fixture
def listener_ran(node: Runtime, listener_factory: ListenerFactory) -> StorageSCP:
    """A listener has started on the node's spool (and made its recording lock); it
    records in the node's database."""
    return listener_factory(lambda received: record_instance(node.database_url, received))


def received_files(spool: Path) -> list[Path]:
    """The received images in the spool, by the listener's names (not .incoming)."""
    return sorted(spool.glob("[0-9a-f][0-9a-f]/*.dcm"))


def written_days_ago(path: Path, days: float) -> None:
    then = (now() - dt.timedelta(days=days)).timestamp()
    os.utime(path, (then, then))


def marker_of(image: Path) -> Path:
    """Where retention dates a received image that no row names."""
    return image.parent.parent / UNRECORDED_DIR / image.parent.name / image.name


def first_seen_days_ago(image: Path, days: float) -> None:
    """As if retention had first found ``image`` unrecorded ``days`` ago."""
    marker = marker_of(image)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    written_days_ago(marker, days)


def markers(spool: Path) -> list[Path]:
    return sorted((spool / UNRECORDED_DIR).glob("*/*.dcm"))


def unrecorded_copy(rt: Runtime, uid: str, tmp_path: Path) -> Path:
    """A hand whose copy is in the spool under the listener's name for it, and no row."""
    source = write_hand(tmp_path / f"{uid}.dcm", sop_instance_uid=uid)
    path = spool_path(rt.settings.spool_dir, uid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes())
    return path


def rows(rt: Runtime) -> list[str]:
    with session_scope(rt.database_url) as session:
        return list(session.scalars(select(Instance.spool_path)))


def run(rt: Runtime, **kwargs: object) -> retention.RetentionReport:
    """One retention run over the node's spool, keeping files 30 days."""
    options: dict[str, object] = {"older_than": KEEP, "spool_dir": rt.settings.spool_dir}
    options.update(kwargs)
    return remove_expired_files(rt.database_url, **options)  # type: ignore[arg-type]


def said(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "worker.retention" and r.levelno >= level
    ]


def test_an_image_whose_row_was_never_committed_goes_once_first_seen_long_enough_ago(
    node: Runtime,
    listener_factory: ListenerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database is down as an image comes: the PACS is answered 0xA700 and the file
    stays in the spool with no row. 40 days old by its time, it is first only marked,
    and goes once retention has known it unrecorded for the retention days; a recorded
    image as old, not finished, and the listener's own partial files stay."""
    database_down = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/boneage"
    scp = listener_factory(lambda received: record_instance(database_down, received))
    source = write_hand(tmp_path / "hand.dcm")
    sent = subprocess.run(
        storescu_command(scp.port, source), capture_output=True, text=True, timeout=60
    )
    assert sent.returncode != 0  # storescu: the C-STORE failed (0xA700)
    assert (scp.counters["stored"], scp.counters["failed"]) == (0, 1)
    [unrecorded] = received_files(node.settings.spool_dir)
    assert dcmread(unrecorded).SOPInstanceUID == dcmread(source).SOPInstanceUID
    assert rows(node) == []

    recorded_id = spool_instance(node)  # received, never assessed: kept whatever its age
    [recorded] = [Path(p) for p in rows(node)]
    partial = scp.incoming_dir / "partial.dcm"  # the running listener's, not retention's
    partial.write_bytes(b"\0" * 128)
    for path in (unrecorded, recorded, partial):
        written_days_ago(path, 40)
    size = unrecorded.stat().st_size
    spool = node.settings.spool_dir

    caplog.set_level(logging.INFO, logger="worker.retention")
    dry = run(node, dry_run=True)
    assert (dry.files, dry.unrecorded_images) == (0, 0)
    assert dry.unrecorded_first_seen == 1
    assert markers(spool) == []  # a dry run marks nothing
    first = run(node)
    assert (first.files, first.unrecorded_images) == (0, 0)
    assert unrecorded.exists()
    assert first.unrecorded_first_seen == 1
    assert markers(spool) == [marker_of(unrecorded)]
    assert said(caplog, logging.WARNING) == [f"retention: 1 {FIRST_SEEN}"]
    later = run(node)  # seen before: neither removed nor said again
    assert (later.files, later.unrecorded_first_seen) == (0, 0)
    assert unrecorded.exists()

    written_days_ago(marker_of(unrecorded), 31)
    caplog.clear()
    dry = run(node, dry_run=True)
    assert (dry.instances, dry.files, dry.bytes, dry.unrecorded_images) == (0, 1, size, 1)
    assert unrecorded.exists() and marker_of(unrecorded).exists()
    done = run(node)
    assert (done.instances, done.files, done.bytes, done.unrecorded_images) == (0, 1, size, 1)
    assert not unrecorded.exists() and markers(spool) == []
    assert recorded.exists() and partial.exists()
    assert remove_expired_files(node.database_url, older_than=KEEP).files == 0  # no spool given
    assert said(caplog) == [
        f"retention (dry run): 0 instance(s), 1 file(s), {size / 1e6:.1f} MB would be "
        "removed; 1 of them received image(s) that no instance recorded",
        f"retention: 0 instance(s), 1 file(s), {size / 1e6:.1f} MB removed; 1 of them "
        "received image(s) that no instance recorded",
    ]
    header = dcmread(source)
    for identifying in (header.SOPInstanceUID, header.PatientID, str(header.PatientName)):
        assert identifying not in caplog.text
    again = run(node)
    assert (again.files, again.unrecorded_images, again.unrecorded_first_seen) == (0, 0, 0)
    with session_scope(node.database_url) as session:
        assert session.get_one(Instance, recorded_id).files_removed_at is None


def test_images_whose_rows_a_restored_database_lost_are_kept_the_days_from_first_sight(
    node: Runtime,
    listener_ran: StorageSCP,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three images received, recorded, the PACS told Success; then the database is
    restored from a backup older than the retention days, which has no rows for them,
    and their files are as old as that. The listener's retention keeps every one, says
    at WARNING how many it found, and removes them only once it has known them
    unrecorded for the retention days."""
    sources = [
        write_hand(tmp_path / f"hand{n}.dcm", sop_instance_uid=f"1.2.826.0.1.3680043.10.2.{n}")
        for n in range(3)
    ]
    sent = subprocess.run(
        storescu_command(listener_ran.port, *sources), capture_output=True, text=True, timeout=60
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    images = received_files(node.settings.spool_dir)
    assert sorted(rows(node)) == [str(p) for p in images] and len(images) == 3
    with session_scope(node.database_url) as session:  # the backup had none of them
        session.execute(delete(Instance))
    for image in images:
        written_days_ago(image, 200)

    caplog.set_level(logging.INFO, logger="worker.retention")
    listener = Listener(node.settings)  # its hourly run, the first 300 s after its start
    first = listener.apply_retention()
    assert first is not None
    assert all(image.exists() for image in images)
    assert (first.files, first.unrecorded_images, first.unrecorded_first_seen) == (0, 0, 3)
    assert [r.levelname for r in caplog.records if "first seen now" in r.getMessage()] == [
        "WARNING"
    ]
    assert said(caplog) == [f"retention: 3 {FIRST_SEEN}"]
    for source in sources:
        header = dcmread(source)
        for identifying in (header.SOPInstanceUID, header.PatientID, str(header.PatientName)):
            assert identifying not in caplog.text

    for marker in markers(node.settings.spool_dir):
        written_days_ago(marker, 29)
    kept = listener.apply_retention()
    assert kept is not None and (kept.files, kept.unrecorded_first_seen) == (0, 0)
    assert all(image.exists() for image in images)

    for marker in markers(node.settings.spool_dir):
        written_days_ago(marker, 31)
    gone = listener.apply_retention()
    assert gone is not None and (gone.files, gone.unrecorded_images) == (3, 3)
    assert received_files(node.settings.spool_dir) == []
    assert markers(node.settings.spool_dir) == []


def test_a_marker_goes_when_a_row_names_its_image_or_the_image_is_gone(
    node: Runtime, listener_ran: StorageSCP, tmp_path: Path
) -> None:
    """Two images no row names, marked; the PACS sends one again (the listener records
    it), the other is removed by hand: both markers go, the recorded image stays, and
    the image sent again is not dated from its old marker if its row is lost again."""
    spool = node.settings.spool_dir
    again, removed = (
        unrecorded_copy(node, f"1.2.826.0.1.3680043.10.3.{n}", tmp_path) for n in range(2)
    )
    for image in (again, removed):
        written_days_ago(image, 40)
    assert run(node).unrecorded_first_seen == 2
    assert markers(spool) == sorted([marker_of(again), marker_of(removed)])
    for marker in markers(spool):
        written_days_ago(marker, 20)

    source = write_hand(tmp_path / "again.dcm", sop_instance_uid="1.2.826.0.1.3680043.10.3.0")
    sent = subprocess.run(
        storescu_command(listener_ran.port, source), capture_output=True, text=True, timeout=60
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert rows(node) == [str(again)]
    removed.unlink()
    written_days_ago(again, 40)

    report = run(node)
    assert (report.files, report.unrecorded_first_seen) == (0, 0)
    assert markers(spool) == []
    assert again.exists()

    with session_scope(node.database_url) as session:  # lost again: a new first sighting
        session.execute(delete(Instance))
    assert run(node).unrecorded_first_seen == 1
    written_days_ago(marker_of(again), 10)
    assert run(node).files == 0
    assert again.exists()


def test_an_unrecorded_image_is_kept_the_retention_days_and_the_recording_window(
    node: Runtime, listener_ran: StorageSCP, tmp_path: Path
) -> None:
    """Marked only once it is older than the recording window, removed only once its
    marker is older than the retention days and that window, and not while its own time
    is newer (a copy received again since, whose row failed too)."""
    spool = node.settings.spool_dir
    minutes = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.2", tmp_path)
    written_days_ago(minutes, 20 / (24 * 60))  # 20 minutes
    hours = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.3", tmp_path)
    written_days_ago(hours, 2 / 24)
    ten_days = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.1", tmp_path)
    written_days_ago(ten_days, 10)
    one_minute = dt.timedelta(minutes=1)
    first = run(node, older_than=one_minute)
    assert (first.files, first.unrecorded_first_seen) == (0, 2)  # not the 20 minutes one
    assert markers(spool) == sorted([marker_of(hours), marker_of(ten_days)])

    written_days_ago(marker_of(hours), 20 / (24 * 60))
    written_days_ago(marker_of(ten_days), 2 / 24)
    report = run(node, older_than=one_minute)
    assert (report.files, report.unrecorded_images) == (1, 1)
    assert not ten_days.exists() and hours.exists() and minutes.exists()

    written_days_ago(marker_of(hours), 10)
    assert run(node).files == 0  # a marker of 10 days, keeping 30
    written_days_ago(marker_of(hours), 40)
    written_days_ago(hours, 2)  # received again two days ago, no row for it either
    assert run(node).files == 0
    assert hours.exists()


def test_only_the_listener_s_names_go_and_a_row_from_another_mount_keeps_its_file(
    node: Runtime, tmp_path: Path
) -> None:
    """A row written by a listener that saw the spool at another path (the data folder
    moved, a shared spool mounted elsewhere) still names its file; a file of another
    name, or elsewhere in the spool, is none of retention's."""
    spool = node.settings.spool_dir
    uid = "1.2.826.0.1.3680043.10.1.4"
    copy = unrecorded_copy(node, uid, tmp_path)
    elsewhere = Path("/mnt/old-data/spool") / copy.parent.name / copy.name
    size = copy.stat().st_size
    dx, explicit_little = "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.1.2.1"
    received = ReceivedInstance(
        uid, dx, "1.2.3", "1.2.3.1", "DX", explicit_little, "PACS", elsewhere, size
    )
    record_instance(node.database_url, received)
    others = [
        copy.parent / "notes.dcm",
        spool / "zz" / copy.name,
        spool / copy.name,
        spool / ".incoming" / "gone-1-0a0b0c0d" / copy.name,
    ]
    for path in others:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 64)
    for path in (copy, *others):
        written_days_ago(path, 400)

    report = run(node)
    assert (report.files, report.unrecorded_images, report.unrecorded_first_seen) == (0, 0, 0)
    assert copy.exists() and all(path.exists() for path in others)
    assert markers(spool) == []


def test_a_copy_renamed_in_whose_row_is_being_committed_stays_whatever_its_time(
    node: Runtime,
    listener_factory: ListenerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener has renamed a copy into the spool and its row's commit is under way
    (held up here) as retention runs; the file's time says 40 days (a clock set wrong, a
    file server's clock) and a marker of an earlier copy says 40 days too: it is not
    removed, the row then names it, and its marker goes."""
    renamed, commit = threading.Event(), threading.Event()

    def slow_record(received: ReceivedInstance) -> int:
        renamed.set()
        if not commit.wait(60):
            raise TimeoutError("the test never let the commit go")
        return record_instance(node.database_url, received)

    scp = listener_factory(slow_record)
    source = write_hand(tmp_path / "hand.dcm")
    sending = subprocess.Popen(
        storescu_command(scp.port, source), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_for(renamed.is_set, timeout=30, what="the copy renamed into the spool")
        [copy] = received_files(node.settings.spool_dir)
        assert rows(node) == []
        written_days_ago(copy, 40)
        first_seen_days_ago(copy, 40)  # an earlier copy's, whose row failed too
        # the run would try for the lock 30 s: a short while says the same here
        monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 0.5)
        caplog.set_level(logging.WARNING, logger="worker.retention")
        report = run(node)
        assert (report.files, report.unrecorded_images) == (0, 0)
        assert copy.exists()
        assert said(caplog, logging.WARNING) == [
            "retention: 1 received image(s) that no instance records, due to go, left to "
            "the next run: listeners held the spool's recording lock for 0.5 s"
        ]
    finally:
        commit.set()
        output, _ = sending.communicate(timeout=60)
    assert sending.returncode == 0, output.decode(errors="replace")
    assert rows(node) == [str(copy)]

    monkeypatch.undo()
    report = run(node)
    assert (report.files, report.unrecorded_images) == (0, 0)
    assert dcmread(copy).SOPInstanceUID == dcmread(source).SOPInstanceUID
    assert markers(node.settings.spool_dir) == []


def test_one_c_store_finishing_leaves_the_lock_held_for_another(
    node: Runtime, listener_factory: ListenerFactory, tmp_path: Path
) -> None:
    """Two C-STOREs between their rename and their commit at once, on one listener (one
    descriptor, one lock): the first committing does not free the lock while the second
    is still committing; the second does."""
    arrived: dict[str, threading.Event] = {}
    go: dict[str, threading.Event] = {}
    uids = [f"1.2.826.0.1.3680043.10.4.{n}" for n in range(2)]
    for uid in uids:
        arrived[uid], go[uid] = threading.Event(), threading.Event()

    def held_record(received: ReceivedInstance) -> int:
        arrived[received.sop_instance_uid].set()
        if not go[received.sop_instance_uid].wait(60):
            raise TimeoutError("the test never let the commit go")
        return record_instance(node.database_url, received)

    scp = listener_factory(held_record)
    spool = node.settings.spool_dir
    senders = [
        subprocess.Popen(
            storescu_command(scp.port, write_hand(tmp_path / f"{uid}.dcm", sop_instance_uid=uid)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for uid in uids
    ]
    try:
        for uid in uids:
            wait_for(arrived[uid].is_set, timeout=30, what="both copies renamed in")
        with recording_lock(spool) as refused:
            assert isinstance(refused, BlockingIOError)
        go[uids[0]].set()
        # its storescu exits on the response, sent once the C-STORE let the lock go
        wait_for(lambda: senders[0].poll() is not None, timeout=30, what="the first C-STORE")
        assert len(rows(node)) == 1
        with recording_lock(spool) as refused:
            assert isinstance(refused, BlockingIOError)  # the second is still committing
        go[uids[1]].set()
        wait_for(lambda: len(rows(node)) == 2, timeout=30, what="the second row committed")

        def free() -> bool:
            with recording_lock(spool) as refused:
                return refused is None

        wait_for(free, timeout=30, what="the lock let go by the last C-STORE")
    finally:
        for uid in uids:
            go[uid].set()
        outputs = [sender.communicate(timeout=60)[0] for sender in senders]
    assert [s.returncode for s in senders] == [0, 0], outputs


def test_the_listener_makes_the_recording_lock_when_it_starts_and_retention_never_does(
    node: Runtime,
    listener_factory: ListenerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Retention run (here as root, like ``sudo boneage-worker retention``) before any
    listener has started makes no lock file (root's, mode 0600: the listener, another
    user, could not open it) and removes no unrecorded image, without trying for the
    lock: none is possible. The listener makes the file as it starts, before any
    C-STORE, and retention then goes ahead."""
    spool = node.settings.spool_dir
    lock = spool / RECORDING_LOCK_NAME
    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.5.1", tmp_path)
    written_days_ago(copy, 40)
    first_seen_days_ago(copy, 40)
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 120.0)
    caplog.set_level(logging.WARNING, logger="worker.retention")
    caplog.clear()
    began = time.monotonic()
    report = run(node)
    assert time.monotonic() - began < 60  # it did not try 120 s for a lock no one can hold
    assert (report.files, report.unrecorded_images) == (0, 0)
    assert copy.exists() and not lock.exists()
    assert said(caplog, logging.WARNING) == [
        "retention: 1 received image(s) that no instance records, due to go, left to the "
        "next run: no listener has made the spool's recording lock yet"
    ]

    listener_factory(lambda received: record_instance(node.database_url, received))
    assert lock.is_file()
    assert (lock.stat().st_uid, lock.stat().st_mode & 0o777) == (os.geteuid(), 0o600)
    report = run(node)
    assert (report.files, report.unrecorded_images) == (1, 1)
    assert not copy.exists()


def test_a_lock_file_the_listener_cannot_use_is_said_at_start_and_keeps_every_image(
    node: Runtime,
    listener_factory: ListenerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Where the listener cannot use the recording lock it says so as it starts, and
    truly: C-STOREs go on without it (Success), and retention removes no unrecorded
    image, at once, without trying for 30 s. A lock file of another owner than the
    spool's (one a listener may not open) is none retention takes either."""
    spool = node.settings.spool_dir
    spool.mkdir(parents=True, exist_ok=True)
    (spool / RECORDING_LOCK_NAME).mkdir()  # not a file: no one can lock it as one
    caplog.set_level(logging.WARNING)
    scp = listener_factory(lambda received: record_instance(node.database_url, received))
    warned = [r.getMessage() for r in caplog.records if r.name == "dicom_io.scp"]
    assert warned == [
        f"the spool's recording lock ({spool / RECORDING_LOCK_NAME}) cannot be used (Is a "
        "directory): C-STOREs go on without it, and retention then removes no received "
        "image that no instance records"
    ]
    source = write_hand(tmp_path / "hand.dcm")
    sent = subprocess.run(
        storescu_command(scp.port, source), capture_output=True, text=True, timeout=60
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(rows(node)) == 1 and scp.counters["stored"] == 1
    assert [r.getMessage() for r in caplog.records if r.name == "dicom_io.scp"] == warned

    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.6.1", tmp_path)
    written_days_ago(copy, 40)
    first_seen_days_ago(copy, 40)
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 120.0)
    caplog.clear()
    began = time.monotonic()
    report = run(node)
    assert time.monotonic() - began < 60
    assert (report.files, report.unrecorded_images) == (0, 0) and copy.exists()
    assert said(caplog, logging.WARNING) == [
        "retention: 1 received image(s) that no instance records, due to go, left to the "
        "next run: the spool's recording lock cannot be taken (not a file)"
    ]


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a file to another user: needs root")
def test_a_lock_file_not_the_spool_owner_s_is_none_retention_takes(
    node: Runtime,
    listener_ran: StorageSCP,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A recording lock of another owner than the spool's (made by a command run as
    another user): a listener, the spool's owner, may not open it and records without
    it, so retention, even as root, takes no lock on it and removes no unrecorded image,
    at once."""
    spool = node.settings.spool_dir
    listener_ran.stop()
    (spool / RECORDING_LOCK_NAME).unlink(missing_ok=True)
    (spool / RECORDING_LOCK_NAME).touch(mode=0o600)
    os.chown(spool / RECORDING_LOCK_NAME, os.geteuid() + 1, -1)
    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.6.2", tmp_path)
    written_days_ago(copy, 40)
    first_seen_days_ago(copy, 40)
    monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 120.0)
    caplog.set_level(logging.WARNING, logger="worker.retention")
    caplog.clear()
    began = time.monotonic()
    report = run(node)
    assert time.monotonic() - began < 60
    assert (report.files, report.unrecorded_images) == (0, 0) and copy.exists()
    assert said(caplog, logging.WARNING) == [
        "retention: 1 received image(s) that no instance records, due to go, left to the "
        "next run: the spool's recording lock cannot be taken (not the spool owner's to "
        "read and write: a listener may not open it)"
    ]


def test_the_listener_s_hourly_retention_takes_unrecorded_images(
    node: Runtime, listener_ran: StorageSCP, tmp_path: Path
) -> None:
    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.5", tmp_path)
    written_days_ago(copy, 31)
    listener = Listener(node.settings)
    first = listener.apply_retention()  # what its loop runs every hour
    assert first is not None and (first.files, first.unrecorded_first_seen) == (0, 1)
    written_days_ago(marker_of(copy), 31)
    report = listener.apply_retention()
    assert report is not None and (report.files, report.unrecorded_images) == (1, 1)
    assert not copy.exists()


def test_the_retention_command_takes_unrecorded_images_and_says_so(
    node: Runtime, listener_ran: StorageSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from worker.cli import main as cli

    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.6", tmp_path)
    written_days_ago(copy, 31)
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(node.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", node.database_url)
    runner = CliRunner()

    def say(*args: str) -> str:
        result = runner.invoke(cli, ["retention", *args])
        assert result.exit_code == 0, result.output
        return " ".join(result.output.split())  # as the console wrapped it

    helped = say("--help")
    assert (
        "A received image that no instance records is removed too, BONEAGE_RETENTION_DAYS "
        "after retention first found it unrecorded." in helped
    ), helped
    assert "So does a received image" not in helped

    dry = say("--days", "7", "--dry-run")
    assert dry.endswith(
        "1 received image(s) that no instance records would be found for the first time (a "
        "row not committed, or lost to a database restore): removed 7 day(s) after that "
        "unless a row names them"
    ), dry
    assert markers(node.settings.spool_dir) == []
    first = say("--days", "30")
    assert "1 received image(s) that no instance records were found for the first time" in first
    assert copy.exists() and markers(node.settings.spool_dir) == [marker_of(copy)]

    written_days_ago(marker_of(copy), 31)
    dry = say("--days", "30", "--dry-run")
    assert "would remove the files of 0 instance(s)" in dry, dry
    assert dry.endswith(
        "1 file(s), 0.1 MB, 1 of them received images that no instance recorded for 30 "
        "day(s) since retention found them (a row not committed, or lost to a database "
        "restore)"
    ), dry
    assert copy.exists()

    done = say("--days", "30")
    assert "1 of them received images that no instance recorded for 30 day(s)" in done
    assert not copy.exists() and markers(node.settings.spool_dir) == []


# -- the spool's owner alone dates unrecorded images (a run as root made .unrecorded
# root's: the listener's hourly runs could neither read nor make markers) -------------

#: The listener's user in these tests, where root runs them (nobody)
SERVICE_UID = 65534


@contextlib.contextmanager
def as_service_user() -> Iterator[None]:
    """Run the block as :data:`SERVICE_UID` (effective ids: root gets its own back)."""
    os.setegid(SERVICE_UID)
    os.seteuid(SERVICE_UID)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def service_node(postgres_url: str, tiny_checkpoint: Path) -> Iterator[Runtime]:
    """A node whose data folder, and so spool, is the service user's (as the listener
    runs), its database PostgreSQL (which that user reaches too); outside pytest's
    temporary folders, which are root's alone."""
    base = Path(tempfile.mkdtemp(prefix="boneage-service-"))
    try:
        data = base / "data"
        (data / "spool").mkdir(parents=True)
        for folder in (base, data, data / "spool"):
            os.chown(folder, SERVICE_UID, SERVICE_UID)
        settings = load_settings(data_dir=data, model=tiny_checkpoint, database_url=postgres_url)
        upgrade(settings.effective_database_url)
        yield Runtime(settings)
    finally:
        shutil.rmtree(base)


def unrecorded_copies(rt: Runtime, tmp_path: Path, count: int) -> list[Path]:
    """``count`` received images that no row names, received 40 days ago, in folders
    of the service user's (as the listener makes them)."""
    copies = [unrecorded_copy(rt, f"1.2.826.0.1.3680043.10.7.{n}", tmp_path) for n in range(count)]
    for copy in copies:
        os.chown(copy.parent, SERVICE_UID, SERVICE_UID)
        os.chown(copy, SERVICE_UID, SERVICE_UID)
        written_days_ago(copy, 40)
    return copies


@pytest.mark.skipif(os.geteuid() != 0, reason="runs retention as two users: needs root")
def test_retention_run_as_root_dates_nothing_and_leaves_the_dating_to_the_spool_s_owner(
    service_node: Runtime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``boneage-worker retention`` run as root finds three received images no row
    names: it makes no marker (nor ``spool/.unrecorded``, which would be root's), says
    once, with the count, to run it as the spool's owner. The listener's hourly run, as
    the spool's owner, then dates all three. The command says in its output too that it
    did not date one."""
    from click.testing import CliRunner

    from worker.cli import main as cli

    spool = service_node.settings.spool_dir
    copies = unrecorded_copies(service_node, tmp_path, 3)
    caplog.set_level(logging.INFO, logger="worker.retention")
    by_root = run(service_node)
    assert not (spool / UNRECORDED_DIR).exists()
    assert all(copy.exists() for copy in copies)
    assert said(caplog, logging.WARNING) == [
        "retention: not marked, and so kept: 3 received image(s) that no instance records "
        "(markers are the spool owner's to make): run retention as the spool's owner (uid "
        f"{SERVICE_UID})"
    ]
    assert (by_root.files, by_root.unrecorded_first_seen, by_root.unrecorded_unmarked) == (0, 0, 3)
    dry = run(service_node, dry_run=True)
    assert (dry.unrecorded_first_seen, dry.unrecorded_unmarked) == (0, 3)

    listener = Listener(service_node.settings)
    caplog.clear()
    with as_service_user():
        hourly = listener.apply_retention()
    assert hourly is not None
    assert (hourly.unrecorded_first_seen, hourly.unrecorded_unmarked) == (3, 0)
    assert markers(spool) == sorted(marker_of(copy) for copy in copies)
    assert {marker.stat().st_uid for marker in markers(spool)} == {SERVICE_UID}
    assert said(caplog, logging.WARNING) == [f"retention: 3 {FIRST_SEEN}"]

    # the command, as root, says so in its output too (a copy received since)
    later = unrecorded_copy(service_node, "1.2.826.0.1.3680043.10.7.9", tmp_path)
    written_days_ago(later, 40)
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(service_node.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", service_node.database_url)
    result = CliRunner().invoke(cli, ["retention", "--days", "30"])
    assert result.exit_code == 0, result.output
    assert (
        "1 received image(s) that no instance records were not dated (markers are the "
        "spool owner's to make; see the warning): kept until a run as the spool's owner "
        "dates them" in " ".join(result.output.split())
    ), result.output
    assert markers(spool) == sorted(marker_of(copy) for copy in copies) and later.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs retention as two users: needs root")
def test_markers_the_listener_cannot_make_are_said_once_a_run_with_their_count(
    service_node: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``spool/.unrecorded`` root's, mode 0700 (as a run as root made it before): the
    listener's hourly run, as the spool's owner, can neither read nor make markers. It
    says so in one WARNING a run, with the count and what to do, not one a file, and
    counts none as first seen; every image is kept."""
    spool = service_node.settings.spool_dir
    copies = unrecorded_copies(service_node, tmp_path, 3)
    (spool / UNRECORDED_DIR).mkdir(mode=0o700)  # root's
    first_seen_days_ago(copies[0], 40)  # in it, root's too
    (spool / UNRECORDED_DIR / copies[0].parent.name).chmod(0o700)

    caplog.set_level(logging.WARNING, logger="worker.retention")
    listener = Listener(service_node.settings)
    for _ in range(2):  # each hourly run says it once
        caplog.clear()
        with as_service_user():
            hourly = listener.apply_retention()
        assert said(caplog, logging.WARNING) == [
            "retention: 3 received image(s) that no instance records could not be marked "
            "(Permission denied), and so are kept: .unrecorded in the spool and its folders "
            f"must be the spool owner's (uid {SERVICE_UID})"
        ]
        assert hourly is not None
        assert (hourly.files, hourly.unrecorded_first_seen, hourly.unrecorded_unmarked) == (
            0,
            0,
            3,
        )
    assert all(copy.exists() for copy in copies)


# -- a spool whose file system takes no flock (NFS) ------------------------------------


def nfs_flock(real: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """``flock`` as Linux emulates it on NFS, with ``fcntl`` locks: an exclusive lock
    needs a descriptor open to write (EBADF on one opened read-only)."""

    def flock(descriptor: int, operation: int) -> None:
        read_only = fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        if operation & fcntl.LOCK_EX and read_only:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        real(descriptor, operation)

    return flock


NO_LOCKS = (
    "the spool's file system does not take the locks retention needs (NFS?): received "
    "images that no instance records are kept"
)


def test_a_spool_on_nfs_keeps_unrecorded_images_and_says_why_once_a_process(
    node: Runtime,
    listener_ran: StorageSCP,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On NFS retention's exclusive lock, on its read-only descriptor, fails EBADF:
    the images stay (the safe outcome), and retention says plainly why, once in the
    process (the listener's hourly runs), not a bad file descriptor every hour."""
    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.8.1", tmp_path)
    written_days_ago(copy, 40)
    first_seen_days_ago(copy, 40)
    monkeypatch.setattr(fcntl, "flock", nfs_flock(fcntl.flock))
    monkeypatch.setattr(retention, "_no_locks_said", False, raising=False)  # not said yet
    caplog.set_level(logging.WARNING, logger="worker.retention")
    listener = Listener(node.settings)
    first = listener.apply_retention()
    assert first is not None and (first.files, first.unrecorded_images) == (0, 0)
    assert said(caplog, logging.WARNING) == [f"retention: {NO_LOCKS} (1 due to go now; said once)"]
    caplog.clear()
    later = listener.apply_retention()
    assert later is not None and (later.files, later.unrecorded_images) == (0, 0)
    assert said(caplog, logging.WARNING) == []
    assert copy.exists() and markers(node.settings.spool_dir) == [marker_of(copy)]


@pytest.mark.parametrize("cause", [errno.EBADF, errno.ENOLCK])
def test_no_lock_on_the_spool_s_file_system_is_said_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cause: int
) -> None:
    """EBADF (NFS's emulated flock on a read-only descriptor) and ENOLCK (a server
    taking no locks) both say that the file system takes none; another error is said
    as itself."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / RECORDING_LOCK_NAME).touch(mode=0o600)

    refusal = [cause]

    def refusing(descriptor: int, operation: int) -> None:
        raise OSError(refusal[0], os.strerror(refusal[0]))

    monkeypatch.setattr(fcntl, "flock", refusing)
    assert retention._remove_unrecorded("sqlite://", spool, [], now()) == NO_LOCKS
    refusal[0] = errno.EIO
    assert retention._remove_unrecorded("sqlite://", spool, [], now()) == (
        "the spool's recording lock cannot be taken (Input/output error)"
    )


# -- the listener's hold on the recording lock -----------------------------------------


def waiting_for_lock(path: Path) -> bool:
    """Whether someone waits for a ``flock`` on ``path`` (/proc/locks: ``->``)."""
    inode = f":{path.stat().st_ino} "
    with open("/proc/locks") as locks:
        return any("->" in line and inode in line for line in locks)


def descriptors_on(path: Path) -> int:
    """This process's open descriptors on ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == str(path)
    return count


def test_stopping_never_waits_for_retention_and_the_last_c_store_closes_the_file(
    tmp_path: Path,
) -> None:
    """Retention holds the lock; a C-STORE waits for it; the listener stops: stopping
    returns at once (it waited as long as retention held the lock), and the C-STORE,
    once retention lets go, stores under the lock and then closes the file."""
    hold = _RecordingHold(tmp_path)
    hold.open()
    lock = tmp_path / RECORDING_LOCK_NAME
    stored = threading.Event()

    def store() -> None:
        with hold.shared():
            with recording_lock(tmp_path) as refused:
                assert isinstance(refused, BlockingIOError)  # held by this store
            stored.set()

    storing = threading.Thread(target=store, daemon=True)
    closing = threading.Thread(target=hold.close, daemon=True)
    with recording_lock(tmp_path) as refused:
        assert refused is None
        storing.start()
        wait_for(lambda: waiting_for_lock(lock), timeout=30, what="the C-STORE waiting")
        closing.start()
        try:
            wait_for(
                lambda: not closing.is_alive(), timeout=10, what="close() while retention holds"
            )
        finally:
            assert not stored.is_set()
    storing.join(30)
    assert stored.is_set() and not storing.is_alive()
    assert descriptors_on(lock) == 0
    with recording_lock(tmp_path) as refused:
        assert refused is None


def test_a_late_c_store_that_cannot_lock_closes_the_file_it_opened_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """After the listener stopped, an association still storing opens the lock file
    again; where the lock then cannot be had (a server taking no locks: ENOLCK), the
    store goes on without it and the file is not left open."""
    hold = _RecordingHold(tmp_path)
    hold.open()
    hold.close()
    lock = tmp_path / RECORDING_LOCK_NAME
    assert descriptors_on(lock) == 0
    real = fcntl.flock

    def no_locks(descriptor: int, operation: int) -> None:
        if operation == fcntl.LOCK_SH:
            raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
        real(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="dicom_io.scp")
    ran = False
    with hold.shared():
        ran = True
    assert ran
    assert descriptors_on(lock) == 0
    assert [r.getMessage() for r in caplog.records] == [
        "the spool's recording lock could not be taken for a C-STORE (No locks available): "
        "it went on without it (said once)"
    ]


def test_a_lock_that_cannot_be_unlocked_fails_no_c_store_and_is_let_go(
    node: Runtime,
    listener_factory: ListenerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Unlocking the recording lock fails after a C-STORE's commit (EIO): the PACS is
    still told Success (a C-STORE handler never raises), the row is there, and the lock
    is let go by closing its file, which the next C-STORE opens again."""
    scp = listener_factory(lambda received: record_instance(node.database_url, received))
    spool = node.settings.spool_dir
    real = fcntl.flock
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

    def unlock_fails_once(descriptor: int, operation: int) -> None:
        if operation == fcntl.LOCK_UN and failures:
            raise failures.pop()
        real(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", unlock_fails_once)
    caplog.set_level(logging.WARNING, logger="dicom_io.scp")
    sources = [
        write_hand(tmp_path / f"hand{n}.dcm", sop_instance_uid=f"1.2.826.0.1.3680043.10.9.{n}")
        for n in range(2)
    ]
    for n, source in enumerate(sources, start=1):
        sent = subprocess.run(
            storescu_command(scp.port, source), capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert len(rows(node)) == n and scp.counters["stored"] == n
        with recording_lock(spool) as refused:
            assert refused is None  # let go: retention can take it
    assert failures == []
    assert [
        r.getMessage()
        for r in caplog.records
        if r.name == "dicom_io.scp" and r.levelno >= logging.WARNING
    ] == [
        "the spool's recording lock could not be let go (Input/output error): its file is "
        "closed instead, and opened again by the next C-STORE"
    ]
