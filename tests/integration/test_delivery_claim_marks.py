"""A claim reads the marks of the rows it takes under the lock it takes them with.

A claim replaces each row's ``sending_since`` (the mark of an attempt whose answer
never came: the object may be at the destination) with its own, and a failure of its
attempt that sent nothing puts back the one it read (`worker.delivery._record_failure`).
Read outside the claim's lock, that one may be stale: another delivery worker's claim
came in between, and its mark was erased.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, insert, update
from sqlalchemy.exc import OperationalError

from db.engine import get_engine, session_scope
from db.schema import Delivery, DeliveryState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_pipeline import make_runtime, spool_instance
from worker.delivery import DeliveryOutcome, send_deliveries

pytestmark = pytest.mark.integration


def test_a_claim_on_sqlite_reads_the_marks_under_its_write_lock(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """SQLite: a delivery sent by hand (force) while another delivery worker claims it
    too. The other claim comes as this one is about to take the row, after it read the
    row's mark: it is refused, the database locked by this claim (it never waits: no
    busy timeout), and the row ends with the mark it had. Before, pysqlite began this
    claim's transaction only at its UPDATE, the read held no lock, and the other claim
    went in between: this claim took the row again and, its attempt failing without
    sending (the outbox file missing), put back the mark it had read, erasing the other
    claim's, whose C-STORE may have reached the destination."""
    rt = make_runtime(tmp_path, tiny_checkpoint, destinations="PACS@127.0.0.1:104")
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        delivery_id = session.execute(
            insert(Delivery)
            .values(
                instance_id=instance_id,
                kind=ObjectKind.SR,
                destination="PACS@127.0.0.1:104",
                sop_instance_uid="9.9.90",
                path=str(tmp_path / "9.9.90.dcm"),  # no such file, in a folder that is
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now(),
            )
            .returning(Delivery.id)
        ).scalar_one()
    other_claim = now()
    # another delivery worker's connection, which does not wait for a lock
    other = create_engine(rt.database_url, connect_args={"timeout": 0})
    tried: list[str] = []

    def another_claim_comes(
        _conn: Any, _cursor: Any, statement: str, *_args: Any, **_kwargs: Any
    ) -> None:
        if tried or not statement.startswith("UPDATE deliveries SET next_attempt_at="):
            return  # only as this claim's UPDATE takes the row
        try:
            with other.begin() as connection:
                connection.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id)
                    .values(
                        sending_since=other_claim,
                        next_attempt_at=other_claim + timedelta(minutes=2),
                    )
                )
        except OperationalError as exc:
            tried.append(str(exc.orig))
        else:
            tried.append("claimed")

    engine = get_engine(rt.database_url)
    event.listen(engine, "before_cursor_execute", another_claim_comes)
    try:
        outcome = send_deliveries(rt, [delivery_id], force=True)
    finally:
        event.remove(engine, "before_cursor_execute", another_claim_comes)
        other.dispose()

    assert outcome == {delivery_id: DeliveryOutcome("failed", error="the outbox file is missing")}
    with session_scope(rt.database_url) as session:
        row = session.get_one(Delivery, delivery_id)
    # the other claim's mark is never lost: it went in, and stays, or never went in
    assert row.sending_since == (other_claim if tried == ["claimed"] else None)
    assert tried == ["database is locked"]  # held by this claim from its read on
