"""Deliveries to a destination taken out of the settings.

An administrator corrects a mistyped destination (another department's node): the SR
and SC still on their way there, and those that failed there, are never sent to it
again; our rejection notes still go where the objects they withdraw went.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, ObjectKind
from tests.conftest import StoreSCP
from tests.integration import test_delivery
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_rejection_notes import image_of
from tests.support import free_port, pacs_rejection_note
from worker.delivery import reset_failed, send_deliveries
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: SQLite and a real PostgreSQL.
database_url = test_delivery.database_url

#: The reason such an SR or SC fails with, as `status` shows it.
NOT_CONFIGURED = "destination no longer configured"


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
    caplog: pytest.LogCaptureFixture,
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

    # `retry-deliveries` leaves them failed, all of them or named, and says why
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="worker.delivery"):
        assert reset_failed(fixed) == []
        assert reset_failed(fixed, list(ids)) == []
    left = (
        "2 failed deliveries left failed, their destinations no longer configured "
        f"({storescp.destination}): {ids[0]}, {ids[1]}"
    )
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.delivery"]
    assert warnings == [left, left]
    assert {d.state for d in deliveries(fixed).values()} == {DeliveryState.FAILED}

    # kept, not dropped: configured again, they go
    assert reset_failed(mistyped) == sorted(ids)
    assert [o.state for o in send_deliveries(mistyped, ids).values()] == ["delivered"] * 2
    assert sorted(dcmread(p).Modality for p in storescp.wait_for_objects(2, timeout=30)) == [
        "OT",
        "SR",
    ]


def test_retry_deliveries_says_which_failed_deliveries_it_leaves(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """They failed where nothing listens (the mistyped node); the destination corrected,
    `retry-deliveries` leaves them, and says so."""
    database = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    mistyped = node(tmp_path, tiny_checkpoint, database, nowhere)
    ids = assess_instance(mistyped, spool_instance(mistyped)).delivery_ids
    for _ in range(3):
        send_deliveries(mistyped, ids, force=True)
    assert {d.state for d in deliveries(mistyped).values()} == {DeliveryState.FAILED}
    env = {
        **os.environ,
        "BONEAGE_DATA_DIR": str(tmp_path / "data"),
        "BONEAGE_DATABASE_URL": database,
        "BONEAGE_DESTINATIONS": storescp.destination,
        "BONEAGE_MODEL": str(tiny_checkpoint),
    }

    again = subprocess.run(
        [sys.executable, "-m", "worker", "retry-deliveries"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert again.returncode == 0, again.stderr
    assert "0 failed deliveries queued again" in again.stdout
    assert (
        "2 failed deliveries left failed, their destinations no longer configured "
        f"({nowhere}): {ids[0]}, {ids[1]}"
    ) in again.stderr
    assert {d.state for d in deliveries(mistyped).values()} == {DeliveryState.FAILED}


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
