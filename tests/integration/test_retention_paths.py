"""Retention removes only the node's own files, and none that a delivery still needs.

Three ways it lost files (found in review). The sweep unlinked the file of a rejection
note of ours made just after the mark, its delivery pending, where the worker's clock
dated the file a second before the mark. A row's path was unlinked wherever it pointed:
a database copied from another node, or a data directory moved, has rows naming files
that are not this node's. And an outbox file whose delivery spelled its path otherwise
(the data directory mounted elsewhere) was taken for one made with nothing to send it
to, though its delivery was failed or pending. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydicom import dcmread
from sqlalchemy import select, update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance
from db.schema import utcnow as now
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_retention import (
    KEEP,
    _assessed_and_delivered,
    _files,
    _finished_days_ago,
    _removed_at,
    _retention,
    _runtime,
)
from tests.support import pacs_rejection_note
from worker.cli import main as cli
from worker.delivery import deliver_one, files_gone
from worker.pipeline import assess_instance
from worker.retention import remove_expired_files
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return _runtime(tmp_path, tiny_checkpoint, storescp, url)


def _dated(paths: list[Path], at: dt.datetime) -> None:
    for path in paths:
        os.utime(path, (at.timestamp(), at.timestamp()))


def test_a_note_made_after_the_mark_is_kept_by_the_sweep_whatever_its_files_time(
    runtime: Runtime,
) -> None:
    """Retention removes an image's files; the PACS rejects the image seconds later, and
    our rejection notes are made, on a worker host a few seconds behind: their files
    are dated a second before the mark. The next runs' sweeps (the mark is in their
    day) keep them while their deliveries are pending, and once delivered too: they go
    when their own days are past. Before, the sweep unlinked every file the instance's
    rows named that was dated before the mark, and the pending notes had nothing to
    send."""
    image_id, files = _assessed_and_delivered(runtime)
    image = dcmread(files[0])
    _finished_days_ago(runtime, image_id, 40)
    assert _retention(runtime).instances == 1
    marked = _removed_at(runtime, image_id)
    assert marked is not None

    note = spool_dataset(runtime, pacs_rejection_note(image, "113038"))
    withdrawn = assess_instance(runtime, note)
    assert withdrawn.state == "not_assessed" and len(withdrawn.delivery_ids) == 2  # SR, SC
    ours = [p for p in _files(runtime, image_id) if p.exists()]
    assert len(ours) == 2
    _dated(ours, marked - dt.timedelta(seconds=1))  # a worker host a second behind

    report = _retention(runtime)  # its sweep: marked this day
    assert (report.instances, report.files) == (0, 0)
    assert all(p.exists() for p in ours)
    with session_scope(runtime.database_url) as session:
        assert files_gone(session, withdrawn.delivery_ids) == {}
        made = session.scalars(
            select(Delivery.created_at).where(Delivery.id.in_(withdrawn.delivery_ids))
        ).all()
    assert min(made) > marked

    for delivery_id in withdrawn.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    assert _retention(runtime).files == 0  # sent, but their days are not past
    assert all(p.exists() for p in ours)

    _finished_days_ago(runtime, image_id, 31)
    report = _retention(runtime)
    assert (report.instances, report.files) == (1, 2)
    assert not any(p.exists() for p in ours)


def _moved(path: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    path.rename(to)
    return to


def test_files_rows_name_outside_the_nodes_spool_and_outbox_are_kept(
    runtime: Runtime, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database copied from production, or a data directory moved: rows name files
    in another node's spool and outbox, by a path that climbs out of the spool with
    ``..``, or through a folder in the spool that is a symlink to another place. Those
    files are kept, counted, and said once at WARNING (a count, no path); the files in
    the node's own spool go as ever. Before, each was unlinked where it pointed."""
    production = tmp_path / "production"
    spool = runtime.settings.spool_dir
    climbing, other_node, through_link = [spool_instance(runtime, modality="CT") for _ in range(3)]
    kept: list[Path] = []
    for instance_id in (climbing, other_node, through_link):
        assert assess_instance(runtime, instance_id).state == "not_assessed"
        [image] = _files(runtime, instance_id)
        if instance_id == climbing:  # spool/ab/../../production/...: the data directory's
            named = image.parent / ".." / ".." / "production" / image.name
            kept.append(_moved(image, runtime.settings.data_dir / "production" / image.name))
        elif instance_id == other_node:
            named = production / "spool" / image.parent.name / image.name
            kept.append(_moved(image, named))
        else:  # spool/zz is a symlink out of the spool
            (spool / "zz").symlink_to(production / "linked", target_is_directory=True)
            named = spool / "zz" / image.name
            kept.append(_moved(image, production / "linked" / image.name))
        with session_scope(runtime.database_url) as session:
            session.get_one(Instance, instance_id).spool_path = str(named)
    delivered, [its_image, *outputs] = _assessed_and_delivered(runtime)
    its_size = its_image.stat().st_size
    with session_scope(runtime.database_url) as session:
        for row in session.scalars(select(Delivery).where(Delivery.instance_id == delivered)):
            row.path = str(production / "outbox" / Path(row.path).name)
    kept += [_moved(output, production / "outbox" / output.name) for output in outputs]
    for instance_id in (climbing, other_node, through_link, delivered):
        _finished_days_ago(runtime, instance_id, 40)
    assert len(kept) == 5 and all(p.exists() for p in kept)

    dry = _retention(runtime, dry_run=True)
    assert (dry.instances, dry.files, dry.bytes) == (4, 1, its_size)
    assert dry.kept_elsewhere == 5
    caplog.set_level(logging.WARNING, logger="worker.retention")
    caplog.clear()
    report = _retention(runtime)
    assert all(p.exists() for p in kept)
    assert (report.instances, report.files, report.bytes) == (4, 1, its_size)
    assert report.kept_elsewhere == 5
    assert not its_image.exists()  # in the node's spool: it goes
    said = [r.getMessage() for r in caplog.records if r.name == "worker.retention"]
    assert len(said) == 1 and said[0].startswith("retention: 5 file(s) that the rows")
    assert not any(p.name in said[0] or str(production) in said[0] for p in kept)
    for instance_id in (climbing, other_node, through_link, delivered):
        assert _removed_at(runtime, instance_id) is not None


def test_a_moved_data_directorys_files_are_kept_and_said(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The data directory moved, nothing left where it was: the rows name the old place,
    the files are in the node's spool and outbox under the same names. They are kept (a
    row names them there: not another node's, nor made with nothing to send them to), and
    said, by the log and by the command, with what to do. Before, only files still at the
    old place were counted: none, and nothing said why they stayed."""
    instance_id, files = _assessed_and_delivered(runtime)
    old = runtime.settings.data_dir.parent / "moved-from"
    with session_scope(runtime.database_url) as session:
        row = session.get_one(Instance, instance_id)
        row.spool_path = str(old / Path(row.spool_path).relative_to(runtime.settings.data_dir))
        for delivery in session.scalars(
            select(Delivery).where(Delivery.instance_id == instance_id)
        ):
            delivery.path = str(old / Path(delivery.path).relative_to(runtime.settings.data_dir))
    _finished_days_ago(runtime, instance_id, 40)
    for path in files:
        os.utime(path, (0, (now() - dt.timedelta(days=40)).timestamp()))
    assert not old.exists() and len(files) == 3

    caplog.set_level(logging.WARNING, logger="worker.retention")
    dry = _retention(runtime, dry_run=True)
    assert (dry.instances, dry.files, dry.kept_elsewhere) == (1, 0, 3)
    said = [r.getMessage() for r in caplog.records if r.name == "worker.retention"]
    assert len(said) == 1 and said[0].startswith("retention (dry run): 3 file(s) that the rows")
    assert "link the old place to the new" in said[0]
    assert str(old) not in said[0] and not any(p.name in said[0] for p in files)

    monkeypatch.setenv("BONEAGE_DATA_DIR", str(runtime.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DATABASE_URL", runtime.database_url)
    done = CliRunner().invoke(cli, ["retention", "--days", "30"])
    assert done.exit_code == 0, done.output
    assert all(p.exists() for p in files)
    assert "removed the files of 1 instance(s)" in done.output and ": 0 file(s)" in done.output
    assert "3 file(s) that those instances' rows name outside this node's spool and outbox" in (
        " ".join(done.output.split())
    )
    assert "where its data directory once was" in done.output
    assert "run `boneage-worker retention --all-marked`" in " ".join(done.output.split())

    # linked days later, past the hourly runs' look again at the last day's marks: the
    # command told to look at every mark removes them (before, nothing ever did)
    with session_scope(runtime.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert row.files_removed_at is not None
        row.files_removed_at -= dt.timedelta(days=3)
        for delivery in session.scalars(
            select(Delivery).where(Delivery.instance_id == instance_id)
        ):  # made before the mark, as ever
            delivery.created_at -= dt.timedelta(days=3)
    unlinked = CliRunner().invoke(cli, ["retention", "--days", "30", "--all-marked"])
    assert unlinked.exit_code == 0, unlinked.output  # not linked yet: said again
    assert "3 file(s) that those instances' rows name outside" in (
        " ".join(unlinked.output.split())
    )
    assert all(p.exists() for p in files)
    old.symlink_to(runtime.settings.data_dir, target_is_directory=True)
    hourly = CliRunner().invoke(cli, ["retention", "--days", "30"])
    assert hourly.exit_code == 0, hourly.output
    assert all(p.exists() for p in files)
    previewed = CliRunner().invoke(cli, ["retention", "--all-marked", "--dry-run"])
    assert previewed.exit_code == 2 and "has no dry run" in previewed.output
    swept = CliRunner().invoke(cli, ["retention", "--days", "30", "--all-marked"])
    assert swept.exit_code == 0, swept.output
    assert not any(p.exists() for p in files)
    assert "(and of the instances marked before)" in swept.output
    assert ": 3 file(s)" in " ".join(swept.output.split())


def test_without_the_nodes_directories_no_rows_file_is_removed(runtime: Runtime) -> None:
    """Given neither the spool nor the outbox, retention cannot tell the node's files
    from others': it marks the instances, and keeps their files. Before, it unlinked
    them wherever the rows pointed."""
    instance_id, files = _assessed_and_delivered(runtime)
    _finished_days_ago(runtime, instance_id, 40)

    report = remove_expired_files(runtime.database_url, older_than=KEEP)
    assert all(p.exists() for p in files)
    assert (report.instances, report.files, report.kept_elsewhere) == (1, 0, 3)
    assert _removed_at(runtime, instance_id) is not None


@pytest.mark.parametrize("state", [DeliveryState.FAILED, DeliveryState.PENDING])
def test_an_outbox_file_whose_delivery_names_it_where_the_outbox_was_is_kept(
    runtime: Runtime, state: DeliveryState
) -> None:
    """The data directory was moved (or is mounted at another path): the deliveries of
    an SR and SC, failed or pending, name them where the outbox was. `retry-deliveries`
    asks for the outbox to be put back where it was written, which needs the files: an
    outbox file is matched with the rows by its name, and kept. One made with nothing
    to send it to still goes. Before, no row named its path exactly, and it was removed
    as made with nothing to send it to."""
    outbox = runtime.settings.outbox_dir
    waiting_id = spool_instance(runtime)
    waiting = assess_instance(runtime, waiting_id)
    assert len(waiting.delivery_ids) == 2
    named = sorted(outbox.glob("*.dcm"))
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery).where(Delivery.id.in_(waiting.delivery_ids)).values(state=state)
        )
        for row in session.scalars(select(Delivery).where(Delivery.instance_id == waiting_id)):
            row.path = f"/srv/boneage-before-the-move/outbox/{Path(row.path).name}"
    unsent_id = spool_instance(runtime, sex="M")
    assert assess_instance(runtime, unsent_id, send=False).delivery_ids == ()
    unsent = sorted(set(outbox.glob("*.dcm")) - set(named))
    assert len(named) == len(unsent) == 2
    _dated([*named, *unsent], now() - dt.timedelta(days=40))

    dry = _retention(runtime, dry_run=True)
    assert (dry.files, dry.unsent_outputs) == (2, 2)
    report = _retention(runtime)
    assert (report.instances, report.files, report.unsent_outputs) == (0, 2, 2)
    assert all(p.exists() for p in named)
    assert not any(p.exists() for p in unsent)
