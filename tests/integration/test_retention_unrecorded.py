"""Retention of received images that no instance row names: the listener put them in
the spool and could not commit their row (the database was down), and the PACS never
sent them again.

A real listener (pynetdicom) fed by dcmtk's storescu, the node's database on SQLite and
on PostgreSQL; "received 40 days ago" is written into the files' times.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope, upgrade
from db.schema import Instance
from db.schema import utcnow as now
from dicom_io.scp import ReceivedInstance, StorageSCP, spool_path
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


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings = load_settings(data_dir=tmp_path / "data", model=tiny_checkpoint, database_url=url)
    upgrade(settings.effective_database_url)
    return Runtime(settings)


@pytest.fixture
def listener_factory(
    node: Runtime, dcmtk: dict[str, str]
) -> Iterator[Callable[[Callable[[ReceivedInstance], int]], StorageSCP]]:
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


def received_files(spool: Path) -> list[Path]:
    """The received images in the spool, by the listener's names (not .incoming)."""
    return sorted(spool.glob("[0-9a-f][0-9a-f]/*.dcm"))


def written_days_ago(path: Path, days: float) -> None:
    then = (now() - dt.timedelta(days=days)).timestamp()
    os.utime(path, (then, then))


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


def test_an_image_whose_row_was_never_committed_goes_when_it_is_old(
    node: Runtime,
    listener_factory: Callable[[Callable[[ReceivedInstance], int]], StorageSCP],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database is down as an image comes: the PACS is answered 0xA700 and the file
    stays in the spool with no row. Sent again never, it goes when it is as old as the
    retention days; a recorded image as old, not finished, and the listener's own
    partial files stay."""
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

    caplog.set_level(logging.INFO, logger="worker.retention")
    dry = remove_expired_files(
        node.database_url, older_than=KEEP, dry_run=True, spool_dir=node.settings.spool_dir
    )
    assert (dry.instances, dry.files, dry.bytes, dry.unrecorded_images) == (0, 1, size, 1)
    assert unrecorded.exists()

    done = remove_expired_files(
        node.database_url, older_than=KEEP, spool_dir=node.settings.spool_dir
    )
    assert (done.instances, done.files, done.bytes, done.unrecorded_images) == (0, 1, size, 1)
    assert not unrecorded.exists()
    assert recorded.exists() and partial.exists()
    assert remove_expired_files(node.database_url, older_than=KEEP).files == 0  # no spool given
    said = [r.getMessage() for r in caplog.records if r.name == "worker.retention"]
    assert said == [
        f"retention (dry run): 0 instance(s), 1 file(s), {size / 1e6:.1f} MB would be "
        "removed; 1 of them received image(s) that no instance recorded",
        f"retention: 0 instance(s), 1 file(s), {size / 1e6:.1f} MB removed; 1 of them "
        "received image(s) that no instance recorded",
    ]
    header = dcmread(source)
    for identifying in (header.SOPInstanceUID, header.PatientID, str(header.PatientName)):
        assert identifying not in caplog.text
    again = remove_expired_files(
        node.database_url, older_than=KEEP, spool_dir=node.settings.spool_dir
    )
    assert (again.files, again.unrecorded_images) == (0, 0)
    with session_scope(node.database_url) as session:
        assert session.get_one(Instance, recorded_id).files_removed_at is None


def test_an_unrecorded_image_is_kept_the_retention_days_and_the_recording_window(
    node: Runtime, tmp_path: Path
) -> None:
    """Kept as long as a recorded image would be (a row lost to a database restored from
    a backup leaves such files too), and never younger than an hour whatever the days."""
    spool = node.settings.spool_dir
    ten_days = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.1", tmp_path)
    written_days_ago(ten_days, 10)
    assert remove_expired_files(node.database_url, older_than=KEEP, spool_dir=spool).files == 0
    assert ten_days.exists()

    minutes = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.2", tmp_path)
    written_days_ago(minutes, 20 / (24 * 60))  # 20 minutes
    hours = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.3", tmp_path)
    written_days_ago(hours, 2 / 24)
    report = remove_expired_files(
        node.database_url, older_than=dt.timedelta(minutes=1), spool_dir=spool
    )
    assert (report.files, report.unrecorded_images) == (2, 2)  # ten days, two hours
    assert minutes.exists()
    assert not ten_days.exists() and not hours.exists()


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

    report = remove_expired_files(node.database_url, older_than=KEEP, spool_dir=spool)
    assert (report.files, report.unrecorded_images) == (0, 0)
    assert copy.exists() and all(path.exists() for path in others)


def test_a_copy_renamed_in_whose_row_is_being_committed_stays_whatever_its_time(
    node: Runtime,
    listener_factory: Callable[[Callable[[ReceivedInstance], int]], StorageSCP],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The listener has renamed a copy into the spool and its row's commit is under way
    (held up here) as retention runs; the file's time says 40 days (a clock set wrong, a
    file server's clock): it is not removed, and the row then names it."""
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
        # the run would try for the lock 30 s: a short while says the same here
        monkeypatch.setattr(retention, "_LOCK_TRIES_SECONDS", 0.5)
        caplog.set_level(logging.WARNING, logger="worker.retention")
        report = remove_expired_files(
            node.database_url, older_than=KEEP, spool_dir=node.settings.spool_dir
        )
        assert (report.files, report.unrecorded_images) == (0, 0)
        assert copy.exists()
        assert "left to the next run" in caplog.text
    finally:
        commit.set()
        output, _ = sending.communicate(timeout=60)
    assert sending.returncode == 0, output.decode(errors="replace")
    assert rows(node) == [str(copy)]

    monkeypatch.undo()
    report = remove_expired_files(
        node.database_url, older_than=KEEP, spool_dir=node.settings.spool_dir
    )
    assert (report.files, report.unrecorded_images) == (0, 0)
    assert dcmread(copy).SOPInstanceUID == dcmread(source).SOPInstanceUID


def test_the_listener_s_hourly_retention_takes_unrecorded_images(
    node: Runtime, tmp_path: Path
) -> None:
    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.5", tmp_path)
    written_days_ago(copy, 31)
    report = Listener(node.settings).apply_retention()  # what its loop runs every hour
    assert report is not None and (report.files, report.unrecorded_images) == (1, 1)
    assert not copy.exists()


def test_the_retention_command_takes_unrecorded_images_and_says_so(
    node: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from worker.cli import main as cli

    copy = unrecorded_copy(node, "1.2.826.0.1.3680043.10.1.6", tmp_path)
    written_days_ago(copy, 31)
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(node.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", node.database_url)
    runner = CliRunner()

    dry = runner.invoke(cli, ["retention", "--days", "30", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    said = " ".join(dry.output.split())  # as the console wrapped it (after the log line)
    assert "would remove the files of 0 instance(s)" in said, said
    assert said.endswith(
        "1 file(s), 0.1 MB, 1 of them received images that no instance recorded (their rows "
        "could not be committed)"
    ), said
    assert copy.exists()

    done = runner.invoke(cli, ["retention", "--days", "30"])
    assert done.exit_code == 0, done.output
    assert "1 of them received images that no instance recorded" in " ".join(done.output.split())
    assert not copy.exists()
