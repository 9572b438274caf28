"""Deliveries to a destination taken out of the settings.

An administrator corrects a mistyped destination (another department's node): the SR
and SC still on their way there, and those that failed there, are never sent to it
again; `retry-deliveries` sends them to the configured destinations instead; our
rejection notes still go where the objects they withdraw went.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, ObjectKind
from db.schema import utcnow as now
from tests.conftest import StoreSCP
from tests.integration import test_delivery
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_rejection_notes import image_of
from tests.support import free_port, pacs_rejection_note
from worker.delivery import SETTINGS_ROLLOUT, reset_failed, send_deliveries
from worker.pipeline import assess_instance
from worker.runtime import Runtime
from worker.status import collect

pytestmark = pytest.mark.integration

#: SQLite and a real PostgreSQL.
database_url = test_delivery.database_url

#: The reason such an SR or SC fails with, as `status` shows it.
NOT_CONFIGURED = "destination no longer configured"

#: What such an SR or SC says once `retry-deliveries` sent it to the configured
#: destinations instead.
REDIRECTED = "destination no longer configured; sent to the configured destinations instead"


def node(tmp_path: Path, tiny_checkpoint: Path, database_url: str, destinations: str) -> Runtime:
    """The node, on one database, with ``destinations`` as its settings say now."""
    return make_runtime(
        tmp_path,
        tiny_checkpoint,
        database_url=database_url,
        destinations=destinations,
        delivery_max_attempts=3,
        delivery_backoff_seconds=1,
    )


def deliveries(rt: Runtime) -> dict[int, Delivery]:
    with session_scope(rt.database_url) as session:
        return {d.id: d for d in session.scalars(select(Delivery).order_by(Delivery.id))}


@pytest.fixture
def corrected(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[StoreSCP]:
    """The node the administrator meant."""
    peer = StoreSCP(tmp_path / "corrected").start()
    yield peer
    peer.stop()


def test_an_sr_and_sc_on_their_way_to_a_destination_taken_out_fail_unsent(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    storescp: StoreSCP,
    corrected: StoreSCP,
) -> None:
    mistyped = node(tmp_path, tiny_checkpoint, database_url, storescp.destination)
    ids = assess_instance(mistyped, spool_instance(mistyped)).delivery_ids
    assert len(ids) == 2
    fixed = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)

    sent = send_deliveries(fixed, ids)

    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2
    assert storescp.associations() == 0 and storescp.received() == []
    assert corrected.associations() == 0
    rows = deliveries(fixed)
    assert [(d.state, d.last_error, d.next_attempt_at) for d in rows.values()] == [
        (DeliveryState.FAILED, NOT_CONFIGURED, None)
    ] * 2

    # kept, not dropped: configured again, they go
    assert reset_failed(mistyped) == sorted(ids)
    assert [o.state for o in send_deliveries(mistyped, ids).values()] == ["delivered"] * 2
    assert sorted(dcmread(p).Modality for p in storescp.wait_for_objects(2, timeout=30)) == [
        "OT",
        "SR",
    ]


def test_a_delivery_newer_than_the_delivery_workers_settings_is_tried_again_later(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    storescp: StoreSCP,
    corrected: StoreSCP,
) -> None:
    """A rolling restart: the inference workers took up the corrected destination, the
    delivery worker not yet. What they made since is not failed for good by the older
    settings: it waits, and goes once the delivery worker has the new ones."""
    delivery_worker = node(tmp_path, tiny_checkpoint, database_url, storescp.destination)
    inference_worker = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)
    ids = assess_instance(inference_worker, spool_instance(inference_worker)).delivery_ids

    sent = send_deliveries(delivery_worker, ids)

    assert [o.state for o in sent.values()] == ["retry"] * 2
    rows = deliveries(delivery_worker)
    assert {d.state for d in rows.values()} == {DeliveryState.PENDING}
    assert all(d.last_error and "tried again for 15 minutes" in d.last_error for d in rows.values())
    assert storescp.associations() == 0 and corrected.associations() == 0

    restarted = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)
    sent = send_deliveries(restarted, ids, force=True)
    assert [o.state for o in sent.values()] == ["delivered"] * 2
    assert len(corrected.wait_for_objects(2, timeout=30)) == 2


def test_a_delivery_newer_than_the_settings_fails_once_a_rollout_would_be_over(
    tmp_path: Path, tiny_checkpoint: Path, database_url: str, storescp: StoreSCP
) -> None:
    """The other way round (the delivery worker restarted first, without the destination
    an inference worker not yet restarted still names): tried again only for
    SETTINGS_ROLLOUT, then failed as a destination no longer configured, which
    `retry-deliveries` sends to the configured destinations."""
    inference_worker = node(tmp_path, tiny_checkpoint, database_url, storescp.destination)
    ids = assess_instance(inference_worker, spool_instance(inference_worker)).delivery_ids
    delivery_worker = dataclasses.replace(
        node(tmp_path, tiny_checkpoint, database_url, f"OTHER@127.0.0.1:{free_port()}"),
        settings_since=now() - timedelta(hours=1),
    )
    with session_scope(database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(created_at=now() - SETTINGS_ROLLOUT - timedelta(minutes=1))
        )

    sent = send_deliveries(delivery_worker, ids)

    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2
    assert storescp.associations() == 0


def retry_deliveries(rt: Runtime, destinations: str) -> str:
    """Run `boneage-worker retry-deliveries` on ``rt``'s node as an administrator does,
    BONEAGE_DESTINATIONS ``destinations``; its stdout."""
    env = {
        **os.environ,
        "BONEAGE_DATA_DIR": str(rt.settings.data_dir),
        "BONEAGE_DATABASE_URL": rt.database_url,
        "BONEAGE_DESTINATIONS": destinations,
        "BONEAGE_MODEL": str(rt.settings.model),
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker", "retry-deliveries"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def body(path: Path) -> bytes:
    """A Part 10 file's bytes after its file meta information: what was sent (storescp
    writes its own file meta)."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data[132:136] == b"\x02\x00\x00\x00"
    return data[144 + int.from_bytes(data[140:144], "little") :]


def failed_problems(rt: Runtime) -> list[str]:
    return [p for p in collect(rt.settings)["problems"] if "deliveries failed" in p]


def test_retry_deliveries_sends_them_to_the_corrected_destination(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    storescp: StoreSCP,
    corrected: StoreSCP,
) -> None:
    """Assessed before the administrator corrected the mistyped node, the SR and SC
    have no row for the node meant: `retry-deliveries` makes theirs, and they go."""
    mistyped = node(tmp_path, tiny_checkpoint, database_url, storescp.destination)
    ids = assess_instance(mistyped, spool_instance(mistyped)).delivery_ids
    fixed = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)
    assert [o.state for o in send_deliveries(fixed, ids).values()] == ["failed"] * 2
    before = deliveries(fixed)
    assert failed_problems(fixed) == [
        f"2 deliveries failed to destinations no longer configured ({storescp.destination}): "
        "'boneage-worker retry-deliveries' sends them to the configured destinations "
        f"instead; latest error: {NOT_CONFIGURED}"
    ]

    printed = retry_deliveries(fixed, corrected.destination)

    assert printed.splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries to destinations no longer configured sent to the configured "
        f"destinations instead: 2 new deliveries queued to {corrected.destination}",
    ]
    rows = deliveries(fixed)
    assert [(rows[i].state, rows[i].last_error) for i in ids] == [
        (DeliveryState.SUPERSEDED, REDIRECTED)
    ] * 2
    new = sorted(set(rows) - set(ids))
    assert len(new) == 2
    old = [before[i] for i in ids]
    assert [
        (
            rows[n].state,
            rows[n].destination,
            rows[n].attempts,
            rows[n].kind,
            rows[n].instance_id,
            rows[n].result_id,
            rows[n].sop_instance_uid,
            rows[n].study_instance_uid,
            rows[n].series_instance_uid,
            rows[n].assessment,
            rows[n].path,
            rows[n].sha256,
        )
        for n in new
    ] == [
        (
            DeliveryState.PENDING,
            corrected.destination,
            0,
            o.kind,
            o.instance_id,
            o.result_id,
            o.sop_instance_uid,
            o.study_instance_uid,
            o.series_instance_uid,
            o.assessment,
            o.path,
            o.sha256,
        )
        for o in old
    ]
    # still failed to reach the PACS until they are sent; then healthy on that count
    assert failed_problems(fixed) == []
    assert collect(fixed.settings)["failed_deliveries"] == []

    # what the delivery worker does with the queued message
    assert [o.state for o in send_deliveries(fixed, new).values()] == ["delivered"] * 2

    received = corrected.wait_for_objects(2, timeout=30)
    by_uid = {dcmread(p).SOPInstanceUID: body(p) for p in received}
    assert by_uid == {o.sop_instance_uid: body(Path(o.path)) for o in old}
    assert storescp.associations() == 0 and storescp.received() == []
    rows = deliveries(fixed)
    assert [rows[i].state for i in ids] == [DeliveryState.SUPERSEDED] * 2
    assert [rows[n].state for n in new] == [DeliveryState.DELIVERED] * 2
    # a second run finds nothing to do, and sends nothing twice
    assert retry_deliveries(fixed, corrected.destination).splitlines() == [
        "0 failed deliveries queued again"
    ]
    assert len(deliveries(fixed)) == 4


def test_retry_deliveries_says_which_failed_deliveries_it_leaves(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """They failed where nothing listens (the mistyped node). With no destination
    configured, `retry-deliveries` leaves them and says so; and so it does, the node meant
    configured, once retention removed their files."""
    database = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    mistyped = node(tmp_path, tiny_checkpoint, database, nowhere)
    ids = assess_instance(mistyped, spool_instance(mistyped)).delivery_ids
    for _ in range(3):
        send_deliveries(mistyped, ids, force=True)
    assert {d.state for d in deliveries(mistyped).values()} == {DeliveryState.FAILED}
    none = node(tmp_path, tiny_checkpoint, database, "")
    [error] = {d.last_error for d in deliveries(none).values()}
    assert failed_problems(none) == [
        f"2 deliveries failed to destinations no longer configured ({nowhere}): configure "
        "BONEAGE_DESTINATIONS, then run 'boneage-worker retry-deliveries' to send them "
        f"there; latest error: {error}"
    ]

    assert retry_deliveries(none, "").splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries left failed, their destinations no longer configured: "
        "no destination is configured (BONEAGE_DESTINATIONS)",
    ]
    assert {d.state for d in deliveries(mistyped).values()} == {DeliveryState.FAILED}

    # retention removed the image's files (it removes an instance's files together)
    rows = deliveries(mistyped)
    with session_scope(database) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == rows[ids[0]].instance_id)
            .values(files_removed_at=now() + timedelta(seconds=1))
        )
    for i in ids:
        Path(rows[i].path).unlink()
    fixed = node(tmp_path, tiny_checkpoint, database, storescp.destination)

    assert retry_deliveries(fixed, storescp.destination).splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries left failed, their destinations no longer configured: "
        "retention removed their files",
    ]
    rows = deliveries(fixed)
    assert sorted(rows) == sorted(ids)  # none made
    assert {d.state for d in rows.values()} == {DeliveryState.FAILED}
    assert storescp.associations() == 0


def test_a_rejection_note_still_goes_where_its_object_went(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    storescp: StoreSCP,
    corrected: StoreSCP,
) -> None:
    """The SR and SC reached the mistyped node before it was corrected; the PACS then
    rejects the image. Our notes withdraw them there: left, they would stand."""
    mistyped = node(tmp_path, tiny_checkpoint, database_url, storescp.destination)
    image_id = spool_instance(mistyped)
    ids = assess_instance(mistyped, image_id).delivery_ids
    assert [o.state for o in send_deliveries(mistyped, ids).values()] == ["delivered"] * 2
    fixed = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)

    rejection = spool_dataset(fixed, pacs_rejection_note(image_of(fixed, image_id)))
    notes = assess_instance(fixed, rejection).delivery_ids

    rows = deliveries(fixed)
    assert [(rows[n].kind, rows[n].destination) for n in notes] == [
        (ObjectKind.KO, storescp.destination)
    ] * 2
    assert [o.state for o in send_deliveries(fixed, notes).values()] == ["delivered"] * 2
    received = [dcmread(p).Modality for p in storescp.wait_for_objects(4, timeout=30)]
    assert sorted(received) == ["KO", "KO", "OT", "SR"]
    assert corrected.associations() == 0
