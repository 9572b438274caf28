"""`status` counts the received images that no instance row names, and says when the
first goes: retention dates them by a marker in spool/.unrecorded (worker.retention),
and no row shows them.

A node's real database, received images put in its spool under the listener's names
with no row (as a row the listener could not commit leaves them), dated by a real
retention run; "received 40 days ago" and "first seen 10 days ago" are written into
the files' times.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from rich.console import Console

from db.engine import upgrade
from db.schema import utcnow as now
from dicom_io.scp import ReceivedInstance
from tests.integration.test_pipeline import spool_instance
from tests.integration.test_retention_unrecorded import (
    SERVICE_UID,
    as_service_user,
    marker_of,
    unrecorded_copies,
    unrecorded_copy,
    written_days_ago,
)
from worker.listener import record_instance
from worker.retention import UnrecordedImages, remove_expired_files, unrecorded_images
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.status import collect, render

pytestmark = pytest.mark.integration

KEEP = dt.timedelta(days=30)


def _node(tmp_path: Path, checkpoint: Path, **settings: Any) -> Runtime:
    loaded = load_settings(data_dir=tmp_path / "data", model=checkpoint, **settings)
    upgrade(loaded.effective_database_url)
    return Runtime(loaded)


@pytest.fixture
def service_node(postgres_url: str, tiny_checkpoint: Path) -> Iterator[Runtime]:
    """A node whose spool is the service user's (as the listener runs), its database
    PostgreSQL (which that user reaches too); outside pytest's temporary folders, which
    are root's alone."""
    base = Path(tempfile.mkdtemp(prefix="boneage-service-"))
    try:
        data = base / "data"
        (data / "spool").mkdir(parents=True)
        for folder in (base, data, data / "spool"):
            os.chown(folder, SERVICE_UID, SERVICE_UID)
        yield _node(base, tiny_checkpoint, database_url=postgres_url)
    finally:
        shutil.rmtree(base)


def _shown(report: dict[str, Any]) -> str:
    console = Console(record=True, width=400, color_system=None)
    render(report, console)
    return " ".join(console.export_text().split())


def _unrecorded(rt: Runtime) -> tuple[dict[str, Any] | None, str]:
    """What `status` says of them: in its JSON, and on its screen."""
    report = json.loads(json.dumps(collect(rt.settings), default=str))  # as --json prints
    return report["storage"]["unrecorded_images"], _shown(report)


def _said_not_known(said: dict[str, Any] | None, shown: str) -> None:
    """What `status` said (`_unrecorded`) is that it does not know of them, and where and
    as whom to run it to know."""
    assert said is None
    assert (
        "received images that no instance records: not known (spool/.unrecorded cannot be "
        "read, or there is no spool): run status as the spool's owner, with the listener's "
        "BONEAGE_DATA_DIR" in shown
    ), shown


def _recorded_now(rt: Runtime, image: Path) -> None:
    """The PACS sent the image again: the listener recorded it, with its row."""
    ds = dcmread(image)
    record_instance(
        rt.database_url,
        ReceivedInstance(
            ds.SOPInstanceUID,
            ds.SOPClassUID,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            None,
            str(ds.file_meta.TransferSyntaxUID),
            "PACS",
            image,
            image.stat().st_size,
        ),
    )


def test_status_counts_the_images_retention_dated_and_says_when_the_first_goes(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    rt = _node(tmp_path, tiny_checkpoint)
    spool = rt.settings.spool_dir
    spool_instance(rt)  # one image a row names: not one of them
    said, shown = _unrecorded(rt)
    assert said == {"images": 0, "bytes": 0, "first_goes_after": None}
    assert "no instance records" not in shown

    copies = [unrecorded_copy(rt, f"1.2.826.0.1.3680043.10.8.{n}", tmp_path) for n in range(3)]
    for copy in copies:
        written_days_ago(copy, 40)
    said, shown = _unrecorded(rt)
    assert said is not None and said["images"] == 0  # not dated yet: status sees none

    before = now()
    remove_expired_files(rt.database_url, older_than=KEEP, spool_dir=spool)  # dates them
    after = now()
    assert all(marker_of(copy).exists() for copy in copies)
    said, shown = _unrecorded(rt)
    assert said is not None
    assert (said["images"], said["bytes"]) == (3, sum(c.stat().st_size for c in copies))
    first = dt.datetime.fromisoformat(said["first_goes_after"])
    assert before + KEEP - dt.timedelta(seconds=1) <= first <= after + KEEP
    assert (
        f"3 received image(s) that no instance records ({said['bytes'] / 1e3:.1f} kB, a row "
        "not committed or lost to a database restore): the first goes after "
        f"{said['first_goes_after']} unless a row names it" in shown
    ), shown

    # first seen 10 days ago: it goes 20 days from now, and the others with it
    written_days_ago(marker_of(copies[1]), 10)
    said, shown = _unrecorded(rt)
    assert said is not None and said["images"] == 3
    first = dt.datetime.fromisoformat(said["first_goes_after"])
    expected = dt.datetime.fromtimestamp(marker_of(copies[1]).stat().st_mtime, dt.UTC) + KEEP
    assert abs(first - expected) <= dt.timedelta(seconds=1)

    # one sent again (a row names it now), one gone: neither is counted
    _recorded_now(rt, copies[0])
    copies[2].unlink()
    said, shown = _unrecorded(rt)
    assert said is not None
    assert (said["images"], said["bytes"]) == (1, copies[1].stat().st_size)
    assert "1 received image(s) that no instance records" in shown

    # retention keeps files for ever: they are counted, and said to be kept
    forever = _node(tmp_path, tiny_checkpoint, retention_days=0)
    said, shown = _unrecorded(forever)
    assert said is not None and (said["images"], said["first_goes_after"]) == (1, None)
    assert "kept for ever (BONEAGE_RETENTION_DAYS is 0)" in shown


def test_the_count_reads_the_markers_not_the_spool(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """An image dated first seen long ago, and whose file is newer (a copy received
    since), goes by the later of the two, as retention removes it; and what is in the
    spool without a marker is not counted (nothing walks it)."""
    rt = _node(tmp_path, tiny_checkpoint)
    spool = rt.settings.spool_dir
    [image] = [unrecorded_copy(rt, "1.2.826.0.1.3680043.10.8.9", tmp_path)]
    marker = marker_of(image)
    marker.parent.mkdir(parents=True)
    marker.touch()
    written_days_ago(marker, 50)
    written_days_ago(image, 5)
    unmarked = unrecorded_copy(rt, "1.2.826.0.1.3680043.10.8.10", tmp_path)
    written_days_ago(unmarked, 40)
    counted = unrecorded_images(rt.database_url, spool, KEEP)
    assert counted is not None and counted.images == 1
    assert counted.first_goes_after is not None
    expected = dt.datetime.fromtimestamp(image.stat().st_mtime, dt.UTC) + KEEP
    assert abs(counted.first_goes_after - expected) <= dt.timedelta(seconds=1)


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the markers as another user: needs root")
def test_markers_another_user_cannot_read_are_said_not_known(
    service_node: Runtime, tmp_path: Path
) -> None:
    """`status` run as a user that is not the spool's owner cannot read its markers
    (spool/.unrecorded is 0700): it says it does not know, and as whom to run it."""
    spool = service_node.settings.spool_dir
    unrecorded_copies(service_node, tmp_path, 2)
    with as_service_user():
        remove_expired_files(service_node.database_url, older_than=KEEP, spool_dir=spool)
    assert unrecorded_images(service_node.database_url, spool, KEEP) is not None  # root
    os.setegid(SERVICE_UID - 1)
    os.seteuid(SERVICE_UID - 1)  # another user
    try:
        said, shown = _unrecorded(service_node)
    finally:
        os.seteuid(0)
        os.setegid(0)
    _said_not_known(said, shown)


def test_no_spool_is_said_not_known_not_none(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """`status` run with another data directory than the listener's (its database named
    by BONEAGE_DATABASE_URL, as the workers' is) finds no spool there: it does not know
    of the received images no row names, and says so, and where to run it. It used to
    count none, as in a spool with no markers yet, and hid the listener's. A spool with
    no markers yet has none."""
    rt = _node(tmp_path, tiny_checkpoint)
    spool = rt.settings.spool_dir
    spool_instance(rt)  # one image a row names: not one of them
    assert unrecorded_images(rt.database_url, spool, KEEP) == UnrecordedImages()
    said, shown = _unrecorded(rt)
    assert said == {"images": 0, "bytes": 0, "first_goes_after": None}
    assert "no instance records" not in shown

    elsewhere = _node(tmp_path / "elsewhere", tiny_checkpoint, database_url=rt.database_url)
    assert not elsewhere.settings.spool_dir.exists()
    assert unrecorded_images(rt.database_url, elsewhere.settings.spool_dir, KEEP) is None
    said, shown = _unrecorded(elsewhere)
    _said_not_known(said, shown)
