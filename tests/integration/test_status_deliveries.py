"""What `status` (and the metrics) say of deliveries: a latency from reception to
delivery that our rejection notes do not distort.

A node's real database (SQLite), with instances spooled and recorded as the listener
records them; the deliveries' states, times and errors are written into their rows as
the delivery worker leaves them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update

from db import queries
from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_pipeline import make_runtime, spool_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

DESTINATION = "PACS@127.0.0.1:104"  # never reached: nothing here is sent


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    # the default back-off (30 s, doubling, at most an hour) and attempts (31)
    return make_runtime(tmp_path, tiny_checkpoint, destinations=DESTINATION)


def _instance(rt: Runtime, state: InstanceState, finished: dt.datetime, **values: Any) -> int:
    """An instance recorded as received, left in ``state``."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(state=state, finished_at=finished, **values)
        )
    return instance_id


def _delivery(rt: Runtime, instance_id: int, uid: str, **values: Any) -> int:
    row = {
        "instance_id": instance_id,
        "kind": ObjectKind.SR,
        "destination": DESTINATION,
        "sop_instance_uid": uid,
        "path": f"/nonexistent/{uid}.dcm",
        **values,
    }
    with session_scope(rt.database_url) as session:
        return int(
            session.execute(insert(Delivery).values(row).returning(Delivery.id)).scalar_one()
        )


def test_our_rejection_notes_do_not_count_as_deliveries_of_their_images(
    runtime: Runtime,
) -> None:
    """The PACS rejects an image a month after it came: our note that withdraws its SR
    goes now. It is no delivery of the image's result, and a month of latency in the
    last hour's figures (status, boneage_received_to_delivered_seconds) would hide the
    seconds the images of the hour took."""
    current = now()
    month_ago = current - dt.timedelta(days=30)
    rejected = _instance(
        runtime, InstanceState.REJECTED, month_ago, received_at=month_ago - dt.timedelta(seconds=9)
    )
    _delivery(
        runtime,
        rejected,
        "9.9.40",
        state=DeliveryState.DELIVERED,
        attempts=1,
        created_at=month_ago,
        delivered_at=month_ago,
    )
    _delivery(
        runtime,
        rejected,
        "9.9.41",
        kind=ObjectKind.KO,
        withdraws="9.9.40",
        state=DeliveryState.DELIVERED,
        attempts=1,
        created_at=current - dt.timedelta(minutes=6),
        delivered_at=current - dt.timedelta(minutes=5),
    )
    for minutes in (20, 21, 22):  # three images of the hour, each delivered in 8 s
        received = current - dt.timedelta(minutes=minutes)
        image = _instance(
            runtime,
            InstanceState.ASSESSED,
            received + dt.timedelta(seconds=4),
            received_at=received,
        )
        _delivery(
            runtime,
            image,
            f"9.9.5{minutes}",
            state=DeliveryState.DELIVERED,
            attempts=1,
            created_at=received + dt.timedelta(seconds=4),
            delivered_at=received + dt.timedelta(seconds=8),
        )

    hour_ago = current - dt.timedelta(hours=1)
    with session_scope(runtime.database_url) as session:
        assert sorted(queries.latencies_since(session, hour_ago).to_delivered) == [8.0] * 3
        hour = queries.last_hour(session, current)
    assert (hour["delivered_p50_s"], hour["delivered_p95_s"]) == (8.0, 8.0)
