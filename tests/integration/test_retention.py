"""Retention: the files of finished, fully delivered instances go; rows and results stay.

Real assessments on the tiny checkpoint, real deliveries to dcmtk's storescp, the
node's database on SQLite and on PostgreSQL; "finished 40 days ago" is written into
the rows.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import bindparam, insert, select, text, update

from db.engine import get_engine, head_revision, session_scope, upgrade
from db.schema import Delivery, DeliveryState, Instance, InstanceState, Result, UTCDateTime
from db.schema import utcnow as now
from dicom_io.scp import ReceivedInstance
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_received_again import bytes_received_again, received_again
from tests.support import pacs_rejection_note
from worker import retention
from worker.cli import main as cli
from worker.delivery import deliver_one
from worker.listener import record_instance
from worker.pipeline import assess_instance
from worker.reprocess import files_removed, prepare_reprocess
from worker.retention import RetentionReport, remove_expired_files
from worker.runtime import Runtime
from worker.settings import load_settings

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=30)


def _runtime(
    tmp_path: Path, checkpoint: Path, storescp: StoreSCP, database_url: str | None
) -> Runtime:
    settings = load_settings(
        data_dir=tmp_path / "data",
        model=checkpoint,
        destinations=storescp.destination,
        database_url=database_url,
    )
    upgrade(settings.effective_database_url)
    return Runtime(settings)


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return _runtime(tmp_path, tiny_checkpoint, storescp, url)


def _assessed_and_delivered(rt: Runtime) -> tuple[int, list[Path]]:
    """An assessed instance whose SR and SC were delivered; its spool and output files."""
    instance_id = spool_instance(rt)
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "assessed"
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(rt, delivery_id).state == "delivered"
    return instance_id, _files(rt, instance_id)


def _files(rt: Runtime, instance_id: int) -> list[Path]:
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        outputs = session.scalars(select(Delivery.path).where(Delivery.instance_id == instance_id))
        return [Path(instance.spool_path), *map(Path, outputs)]


def _finished_days_ago(rt: Runtime, instance_id: int, days: float) -> None:
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(finished_at=now() - dt.timedelta(days=days))
        )


def _received_and_finished_days_ago(rt: Runtime, instance_id: int, days: float) -> None:
    """As if the instance was received (its last copy too) and finished ``days`` ago:
    its row and its received file say so."""
    then = now() - dt.timedelta(days=days)
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.received_at = instance.finished_at = then
        if instance.last_received_again_at is not None:
            instance.last_received_again_at = then
        spool = Path(instance.spool_path)
    os.utime(spool, (then.timestamp(), then.timestamp()))


def _retention(rt: Runtime, *, dry_run: bool = False) -> RetentionReport:
    """A run as the listener's and `boneage-worker retention` are: given the node's spool
    and outbox, the only places a row's file is removed from."""
    return remove_expired_files(
        rt.database_url,
        older_than=KEEP,
        dry_run=dry_run,
        spool_dir=rt.settings.spool_dir,
        outbox_dir=rt.settings.outbox_dir,
    )


def _removed_at(rt: Runtime, instance_id: int) -> dt.datetime | None:
    with session_scope(rt.database_url) as session:
        return session.get_one(Instance, instance_id).files_removed_at


def test_files_of_old_fully_delivered_instances_go_rows_and_results_stay(runtime: Runtime) -> None:
    old, old_files = _assessed_and_delivered(runtime)
    recent, recent_files = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, old, 40)
    _finished_days_ago(runtime, recent, 10)
    assert len(old_files) == 3 and all(p.exists() for p in old_files)  # spool, SR, SC
    size = sum(p.stat().st_size for p in old_files)

    dry = _retention(runtime, dry_run=True)
    assert (dry.instances, dry.files, dry.bytes, dry.dry_run) == (1, 3, size, True)
    assert all(p.exists() for p in old_files) and _removed_at(runtime, old) is None

    done = _retention(runtime)
    assert (done.instances, done.files, done.bytes) == (1, 3, size)
    assert not any(p.exists() for p in old_files)
    assert all(p.exists() for p in recent_files)
    assert _removed_at(runtime, old) is not None and _removed_at(runtime, recent) is None
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, old).state is InstanceState.ASSESSED
        assert session.scalar(select(Result.id).where(Result.instance_id == old)) is not None

    again = _retention(runtime)
    assert (again.instances, again.files) == (0, 0)  # nothing twice


def test_undelivered_or_unfinished_instances_keep_their_files(runtime: Runtime) -> None:
    unsent = spool_instance(runtime)
    assert assess_instance(runtime, unsent).state == "assessed"  # deliveries pending
    failed, _ = _assessed_and_delivered(runtime)
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.instance_id == failed)
            .values(state=DeliveryState.FAILED)
        )
    queued = spool_instance(runtime)  # received, never assessed
    for instance_id in (unsent, failed, queued):
        _finished_days_ago(runtime, instance_id, 400)
    kept = [p for i in (unsent, failed, queued) for p in _files(runtime, i)]

    report = _retention(runtime)
    assert (report.instances, report.files) == (0, 0)
    assert all(p.exists() for p in kept)


def test_objects_superseded_by_a_later_assessment_hold_nothing_back(runtime: Runtime) -> None:
    """The first assessment's SR and SC were never sent, and never will be: once the
    second's are delivered, the files go when their time comes."""
    instance_id = spool_instance(runtime, sex="F")
    assert assess_instance(runtime, instance_id).state == "assessed"  # not sent
    received_again(runtime, instance_id, PatientSex="M")
    second = assess_instance(runtime, instance_id)
    for delivery_id in second.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    with session_scope(runtime.database_url) as session:
        states = [d.state for d in session.scalars(select(Delivery).order_by(Delivery.id))]
    assert states == [DeliveryState.SUPERSEDED] * 2 + [DeliveryState.DELIVERED] * 2
    files = _files(runtime, instance_id)
    assert len(files) == 5 and all(p.exists() for p in files)  # spool, two SRs, two SCs
    _received_and_finished_days_ago(runtime, instance_id, 40)
    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 5)
    assert not any(p.exists() for p in files)


def test_not_assessed_instance_without_deliveries_is_removed(runtime: Runtime) -> None:
    ct = spool_instance(runtime, modality="CT")
    assert assess_instance(runtime, ct).state == "not_assessed"
    _finished_days_ago(runtime, ct, 31)
    [spool] = _files(runtime, ct)
    assert _retention(runtime).instances == 1
    assert not spool.exists()


def test_an_image_the_pacs_expired_goes_at_the_next_run(runtime: Runtime) -> None:
    """A "Data Retention Policy Expired" rejection note (IHE IOCM): the hospital no
    longer keeps the image, so our copy and our objects of it go at once, not 30 days
    after; an image rejected for another reason waits out our retention as before."""
    expired, expired_files = _assessed_and_delivered(runtime)
    wrong_patient, wrong_patient_files = _assessed_and_delivered(runtime)
    queued = spool_instance(runtime)  # rejected before it is assessed: never is
    for image_id, code in ((expired, "113039"), (wrong_patient, "113038"), (queued, "113039")):
        with session_scope(runtime.database_url) as session:
            image = dcmread(session.get_one(Instance, image_id).spool_path)
        note = spool_dataset(runtime, pacs_rejection_note(image, code))
        assert assess_instance(runtime, note).state == "not_assessed"
    assert assess_instance(runtime, queued).state == "skipped"
    [queued_spool] = _files(runtime, queued)

    done = _retention(runtime)
    assert done.instances == 2
    assert not any(p.exists() for p in [*expired_files, queued_spool])
    assert all(p.exists() for p in wrong_patient_files)
    assert _removed_at(runtime, wrong_patient) is None
    with session_scope(runtime.database_url) as session:
        for image_id in (expired, queued):
            assert session.get_one(Instance, image_id).state is InstanceState.REJECTED
        assert session.scalar(select(Result.id).where(Result.instance_id == expired)) is not None


def test_an_expiry_at_the_pacs_of_another_image_under_the_uid_removes_nothing(
    runtime: Runtime,
) -> None:
    """The image, rejected in its study (113038) and its notes of ours delivered, waits
    out our retention; a "Data Retention Policy Expired" note naming its SOP Instance UID
    in another study expires another image under that UID, not this one (found in
    review: its files went at the next run)."""
    image_id, files = _assessed_and_delivered(runtime)
    with session_scope(runtime.database_url) as session:
        image = dcmread(session.get_one(Instance, image_id).spool_path)
    ours = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image, "113038")))
    for delivery_id in ours.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    files = _files(runtime, image_id)
    other = copy.deepcopy(image)
    other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(other, "113039")))

    assert _retention(runtime).instances == 0
    assert all(p.exists() for p in files)
    assert _removed_at(runtime, image_id) is None
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, image_id).state is InstanceState.REJECTED


def test_an_expiry_at_the_pacs_of_the_image_moved_to_another_study_removes_it(
    runtime: Runtime,
) -> None:
    """As above, but the note names the image's own series in another study: the PACS
    moved the study (series and SOP Instance UIDs kept) and then expired it there. The
    image's files go at the next run."""
    image_id, _ = _assessed_and_delivered(runtime)
    with session_scope(runtime.database_url) as session:
        image = dcmread(session.get_one(Instance, image_id).spool_path)
    ours = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image, "113038")))
    for delivery_id in ours.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    files = _files(runtime, image_id)
    moved = copy.deepcopy(image)
    moved.StudyInstanceUID = generate_uid()
    assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(moved, "113039")))

    assert _retention(runtime).instances == 1
    assert not any(p.exists() for p in files)
    assert _removed_at(runtime, image_id) is not None


def test_reprocess_leaves_removed_instances_alone(
    runtime: Runtime, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    instance_id, _ = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, instance_id, 40)
    _retention(runtime)
    # a new model: it would assess the instance again, but there is nothing to read
    other = load_settings(
        data_dir=runtime.settings.data_dir,
        database_url=runtime.settings.database_url,
        destinations=storescp.destination,
        arch="resnet18",
    )
    fresh = Runtime(other)
    assert fresh.predictor.model_id != runtime.predictor.model_id
    assert prepare_reprocess(fresh, [instance_id]) == []
    assert files_removed(fresh, [instance_id]) == [instance_id]
    assert files_removed(runtime, [instance_id]) == []  # this model assessed it already
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.ASSESSED


def test_receiving_again_restarts_retention_and_keeps_the_new_copy(runtime: Runtime) -> None:
    instance_id, files = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, instance_id, 40)
    spool = files[0]
    content = spool.read_bytes()
    _retention(runtime)
    assert not spool.exists()

    # The PACS sends it again: a new copy, and the mark is cleared.
    spool.write_bytes(content)
    with session_scope(runtime.database_url) as session:
        row = session.get_one(Instance, instance_id)
        received = ReceivedInstance(
            row.sop_instance_uid,
            row.sop_class_uid,
            row.study_instance_uid,
            row.series_instance_uid,
            row.modality,
            row.transfer_syntax_uid,
            "PACS",
            spool,
            len(content),
        )
    assert record_instance(runtime.database_url, received) == instance_id
    assert _removed_at(runtime, instance_id) is None
    # A run in the same hour as the mark (its sweep) leaves the newer file alone too.
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(files_removed_at=now() - dt.timedelta(hours=1))
        )
    os.utime(spool)  # written now, after the mark
    _retention(runtime)
    assert spool.exists()


def test_a_copy_received_again_stays_until_the_worker_has_compared_it(runtime: Runtime) -> None:
    """Finished 40 days ago, then sent again with the sex corrected: a retention run
    before the worker reads its message must not take the new copy, or the correction
    is lost and the old report stands."""
    instance_id, files = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, instance_id, 40)
    received_again(runtime, instance_id, PatientSex="M")
    spool = files[0]
    os.utime(spool, (0, (now() - dt.timedelta(days=40)).timestamp()))  # no help from mtime

    report = _retention(runtime)
    assert report.instances == 0
    assert spool.exists()
    assert _removed_at(runtime, instance_id) is None

    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed"
    with session_scope(runtime.database_url) as session:
        results = session.scalars(
            select(Result).where(Result.instance_id == instance_id).order_by(Result.id)
        ).all()
        assert [r.male for r in results] == [False, True]
        assert session.get_one(Instance, instance_id).received_again_at is None


def new_copy(rt: Runtime, instance_id: int, **attributes: object) -> tuple[Path, ReceivedInstance]:
    """A copy of the instance received again, ``attributes`` set, written where the
    listener writes a transfer before it renames it into place; what it records of it."""
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        image = Path(row.spool_path)
        uids = (row.sop_instance_uid, row.sop_class_uid, row.study_instance_uid)
        series, modality, syntax = row.series_instance_uid, row.modality, row.transfer_syntax_uid
    ds = dcmread(image)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    incoming = rt.settings.spool_dir / ".incoming" / "transfer.dcm"
    incoming.parent.mkdir(exist_ok=True)
    ds.save_as(incoming, enforce_file_format=True)
    size = incoming.stat().st_size
    return incoming, ReceivedInstance(*uids, series, modality, syntax, "PACS", image, size)


def _put_in_place(rt: Runtime, instance_id: int, **attributes: object) -> Callable[[], int]:
    """A copy of the instance received again, ``attributes`` set, renamed into the spool
    as the listener does (dicom_io.scp); the listener's record of it, still to come."""
    incoming, received = new_copy(rt, instance_id, **attributes)
    incoming.replace(received.path)
    return lambda: record_instance(rt.database_url, received)


@pytest.mark.parametrize("recorded", ["while_the_run_removes", "after_the_run"])
def test_a_copy_put_in_place_before_a_run_and_recorded_after_its_mark_stays(
    runtime: Runtime, recorded: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener renames a copy received again, the sex corrected, into the spool a
    second before a run starts, and commits its row only after the run marked the
    instance: while retention unlinks the instance's files, or once the run is over.
    The copy is not removed (the run's mark does not cover a file written before it),
    and the worker assesses it: the correction is not lost."""
    instance_id, files = _assessed_and_delivered(runtime)
    _received_and_finished_days_ago(runtime, instance_id, 40)
    spool = files[0]
    record = _put_in_place(runtime, instance_id, PatientSex="M")
    a_second_ago = (now() - dt.timedelta(seconds=1)).timestamp()
    os.utime(spool, (a_second_ago, a_second_ago))
    records: list[int] = []
    if recorded == "while_the_run_removes":
        unlink = Path.unlink

        def listener_commits_first(path: Path, missing_ok: bool = False) -> None:
            if not records:  # the run's first unlink: after its mark
                records.append(record())
            unlink(path, missing_ok)

        monkeypatch.setattr(Path, "unlink", listener_commits_first)

    report = _retention(runtime)
    monkeypatch.undo()
    if recorded == "after_the_run":
        records.append(record())
    assert records == [instance_id]
    # marked; its SR and SC went: with no recording lock made (no listener), the rows
    # were read before the copy was recorded (test_retention_recording_lock.py has the
    # listener's lock, under which a copy recorded first keeps them)
    assert (report.instances, report.files) == (1, 2)
    assert spool.exists()
    assert _removed_at(runtime, instance_id) is None

    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        results = session.scalars(
            select(Result).where(Result.instance_id == instance_id).order_by(Result.id)
        ).all()
        assert [r.male for r in results] == [False, True]


def test_a_copy_sent_again_once_the_files_went_is_kept_the_days_from_its_coming(
    runtime: Runtime,
) -> None:
    """An image whose files retention removed is sent again (a backfill, to reprocess
    it): unchanged, the worker's comparison leaves finished_at as it was, and the days
    count from the copy's coming, not from then."""
    instance_id, files = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, instance_id, 40)
    spool = files[0]
    content = spool.read_bytes()
    assert _retention(runtime).instances == 1
    assert not spool.exists()

    bytes_received_again(runtime, instance_id, content)
    assert assess_instance(runtime, instance_id).state == "skipped"  # compared: unchanged
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).received_again_at is None
    assert _retention(runtime).instances == 0
    assert spool.exists()
    assert _removed_at(runtime, instance_id) is None

    # 31 days on, it goes
    then = now() - dt.timedelta(days=31)
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance).where(Instance.id == instance_id).values(last_received_again_at=then)
        )
    os.utime(spool, (then.timestamp(), then.timestamp()))
    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 1)
    assert not spool.exists()


def test_our_rejection_notes_made_once_the_files_went_go_in_their_turn(
    runtime: Runtime,
) -> None:
    """The PACS rejects an image (the wrong patient) after retention removed our copy:
    our rejection notes, which name the patient, are made then. Sent, and the days past
    since the rejection, they go too; only once."""
    image_id, files = _assessed_and_delivered(runtime)
    image = dcmread(files[0])
    _finished_days_ago(runtime, image_id, 40)
    assert _retention(runtime).instances == 1

    note = spool_dataset(runtime, pacs_rejection_note(image, "113038"))
    withdrawn = assess_instance(runtime, note)
    assert withdrawn.state == "not_assessed" and len(withdrawn.delivery_ids) == 2  # SR, SC
    for delivery_id in withdrawn.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    ours = [p for p in _files(runtime, image_id) if p.exists()]
    assert len(ours) == 2  # our notes: the image, its SR and SC went
    assert _retention(runtime).instances == 0
    assert all(p.exists() for p in ours)  # rejected just now

    _finished_days_ago(runtime, image_id, 31)
    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 2)
    assert not any(p.exists() for p in ours)
    assert _retention(runtime).instances == 0
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, image_id).state is InstanceState.REJECTED


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_revision_0011_keeps_the_time_of_a_copy_waiting_to_be_compared(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A copy received again before revision 0011 and not yet compared gives the time
    retention counts from once it is; one compared already left none."""
    url = (
        str(request.getfixturevalue("postgres_url"))
        if backend == "postgresql"
        else f"sqlite:///{tmp_path / 'boneage.db'}"
    )
    upgrade(url, "0010")
    came = now() - dt.timedelta(days=2)
    insert = text(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, transfer_syntax_uid, calling_ae_title, spool_path, size_bytes, "
        "state, times_received, attempts, received_at, received_again_at) VALUES (:uid, "
        "'1.2.3', '1.2.3.1', '1.2.3.2', '1.2.840.10008.1.2.1', 'PACS', '/nonexistent', 10, "
        "'assessed', 2, 1, :first, :again)"
    ).bindparams(bindparam("first", type_=UTCDateTime()), bindparam("again", type_=UTCDateTime()))
    with get_engine(url).begin() as connection:
        for uid, again in (("1.2.3.4", came), ("1.2.3.5", None)):
            connection.execute(
                insert, {"uid": uid, "first": now() - dt.timedelta(days=40), "again": again}
            )
    assert upgrade(url) == head_revision()
    with session_scope(url) as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.last_received_again_at))
        kept = {uid: at for uid, at in rows}
    assert kept == {"1.2.3.4": came, "1.2.3.5": None}


def test_outputs_made_with_nothing_to_send_them_to_go_when_they_are_old(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SR and SC made without a delivery (a reprocess not asked to send, or no
    destination configured) are patient images no row leads to: they go by age."""
    unsent_id = spool_instance(runtime)
    assert assess_instance(runtime, unsent_id, send=False).delivery_ids == ()
    outbox = runtime.settings.outbox_dir
    unsent = sorted(outbox.glob("*.dcm"))
    assert len(unsent) == 2  # its SR and SC, and no row names them
    waiting_id = spool_instance(runtime, sex="M")
    waiting = assess_instance(runtime, waiting_id)  # not delivered yet: a pending row each
    named = sorted(set(outbox.glob("*.dcm")) - set(unsent))
    assert len(named) == len(waiting.delivery_ids) == 2
    forty_days_ago = (now() - dt.timedelta(days=40)).timestamp()
    for path in [*unsent, *named]:
        os.utime(path, (forty_days_ago, forty_days_ago))

    dry = remove_expired_files(
        runtime.database_url, older_than=KEEP, dry_run=True, outbox_dir=outbox
    )
    assert (dry.files, dry.unsent_outputs, dry.dry_run) == (2, 2, True)
    assert all(p.exists() for p in unsent)
    assert remove_expired_files(runtime.database_url, older_than=KEEP).files == 0  # no outbox

    # `retention` passes the outbox.
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(runtime.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", runtime.database_url)
    dry_command = CliRunner().invoke(cli, ["retention", "--days", "30", "--dry-run"])
    assert dry_command.exit_code == 0, dry_command.output
    said = " ".join(dry_command.output.split())  # as the console wrapped it
    assert (
        "instance(s) finished and last received more than 30 day(s) ago and fully "
        "delivered: 2 file(s)," in said
    )
    assert said.endswith("MB, 2 of them SR or SC files made with nothing to send them to")

    report = remove_expired_files(runtime.database_url, older_than=KEEP, outbox_dir=outbox)
    assert report.files == 2 and report.bytes == dry.bytes
    assert not any(p.exists() for p in unsent)
    assert all(p.exists() for p in named)  # pending deliveries keep theirs

    # One made a moment ago stays until it is as old.
    again = spool_instance(runtime, sex="M", size=300)
    assess_instance(runtime, again, send=False)
    fresh = set(outbox.glob("*.dcm")) - set(named)
    assert len(fresh) == 2
    remove_expired_files(runtime.database_url, older_than=KEEP, outbox_dir=outbox)
    assert all(p.exists() for p in fresh)


def _left_by_a_crash(rt: Runtime, marked: dt.datetime) -> tuple[int, list[Path]]:
    """An instance finished 40 days ago, marked removed at ``marked`` by a run that died
    before unlinking anything; its files, written well before the mark."""
    instance_id, files = _assessed_and_delivered(rt)
    for path in files:
        os.utime(path, (0, (now() - dt.timedelta(days=40)).timestamp()))
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.instance_id == instance_id)
            .values(created_at=now() - dt.timedelta(days=40))
        )
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(finished_at=now() - dt.timedelta(days=40), files_removed_at=marked)
        )
    return instance_id, files


def test_files_left_by_a_crash_after_the_mark_are_swept(runtime: Runtime) -> None:
    _, files = _left_by_a_crash(runtime, now() - dt.timedelta(hours=1))
    report = _retention(runtime)
    assert (report.instances, report.files) == (0, 3)
    assert not any(p.exists() for p in files)


def test_the_sweep_reads_every_page_of_marks(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read a batch of marks at a time, by id: the files a crash left of an instance on
    the second page go too."""
    monkeypatch.setattr(retention, "_BATCH", 1)
    marked = now() - dt.timedelta(hours=1)
    left = [_left_by_a_crash(runtime, marked)[1] for _ in range(2)]
    report = _retention(runtime)
    assert (report.instances, report.files) == (0, 6)
    assert not any(p.exists() for files in left for p in files)


def test_a_sweep_of_more_instances_than_one_statement_binds_removes_what_a_crash_left(
    runtime: Runtime,
) -> None:
    """A first clean-up marks, in one day, as many instances as the node ever kept. The
    sweep listed them all in one statement, more values than PostgreSQL binds (65,535):
    every run then failed for a day, at its sweep, before the outbox and the spool's
    unrecorded images were looked at, and the files a crash left stayed (SQLite, built
    here to bind more, ran it)."""
    marked = now() - dt.timedelta(hours=1)
    instance_id, files = _left_by_a_crash(runtime, marked)
    with session_scope(runtime.database_url) as session:
        template = session.get_one(Instance, instance_id)
        spool = Path(template.spool_path).parent
        # the files of the others went with their marks
        session.execute(
            insert(Instance),
            [
                {
                    "sop_instance_uid": f"2.25.{n}",
                    "sop_class_uid": template.sop_class_uid,
                    "study_instance_uid": template.study_instance_uid,
                    "series_instance_uid": template.series_instance_uid,
                    "transfer_syntax_uid": template.transfer_syntax_uid,
                    "calling_ae_title": template.calling_ae_title,
                    "spool_path": str(spool / f"{n:032x}.dcm"),
                    "size_bytes": 1,
                    "state": InstanceState.ASSESSED,
                    "received_at": marked,
                    "finished_at": marked,
                    "files_removed_at": marked,
                }
                for n in range(70_000)
            ],
        )
    report = _retention(runtime)
    assert (report.instances, report.files) == (0, 3)
    assert not any(p.exists() for p in files)


def test_retention_command(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt = _runtime(tmp_path, tiny_checkpoint, storescp, None)
    instance_id, files = _assessed_and_delivered(rt)
    _finished_days_ago(rt, instance_id, 8)
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(rt.settings.data_dir))
    monkeypatch.setenv("BONEAGE_RETENTION_DAYS", "0")
    runner = CliRunner()

    refused = runner.invoke(cli, ["retention"])
    assert refused.exit_code == 2 and "kept for ever" in refused.output

    dry = runner.invoke(cli, ["retention", "--days", "7", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would remove the files of 1 instance(s)" in dry.output and "3 file(s)" in dry.output
    assert all(p.exists() for p in files)

    monkeypatch.setenv("BONEAGE_RETENTION_DAYS", "7")
    done = runner.invoke(cli, ["retention"])
    assert done.exit_code == 0, done.output
    assert "removed the files of 1 instance(s)" in done.output
    assert not any(p.exists() for p in files)


def test_retention_days_is_a_documented_setting(tmp_path: Path) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "worker", "retention", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BONEAGE_DATA_DIR": str(tmp_path)},
    )
    assert "BONEAGE_RETENTION_DAYS" in shown.stdout
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "`BONEAGE_RETENTION_DAYS`" in readme
    assert load_settings(data_dir=tmp_path).retention_days == 30


def test_the_listener_applies_the_setting(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    from worker.listener import Listener

    rt = _runtime(tmp_path, tiny_checkpoint, storescp, None)
    instance_id, files = _assessed_and_delivered(rt)
    _finished_days_ago(rt, instance_id, 31)
    forever = Listener(rt.settings.model_copy(update={"retention_days": 0}))
    assert forever.apply_retention() is None
    assert all(p.exists() for p in files)
    report = Listener(rt.settings).apply_retention()  # what its loop runs every hour
    assert report is not None and (report.instances, report.files) == (1, 3)
    assert not any(p.exists() for p in files)
