"""A PACS rejection note that names one of our own objects, applied while
`retry-deliveries` redirects that object to the configured destinations: PostgreSQL,
truly at once. Whatever the redirect queued is superseded by the note; the object the
PACS rejected goes nowhere."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from sqlalchemy import select, update

from db.engine import get_engine, session_scope
from db.schema import Delivery, DeliveryState, ObjectKind
from dicom_io.ko import Reference, build_rejection_note
from tests.conftest import StoreSCP, sessions_waiting_on_a_lock
from tests.dicomtools import dciodvfy_errors
from tests.integration.test_delivery_destinations import REDIRECTED, node
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_rejection_notes import QUALITY, image_of
from tests.support import free_port, wait_for
from worker import pipeline
from worker.delivery import DeliveryOutcome, Retried, retry_failed, send_deliveries
from worker.pipeline import AssessOutcome, assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


def _states(rt: Runtime, sop_instance_uid: str) -> dict[str, tuple[DeliveryState, str | None]]:
    """(state, last error) of each delivery of our object ``sop_instance_uid``, by
    destination."""
    with session_scope(rt.database_url) as session:
        return {
            d.destination: (d.state, d.last_error)
            for d in session.scalars(
                select(Delivery).where(Delivery.sop_instance_uid == sop_instance_uid)
            )
        }


@pytest.mark.parametrize("queued", ["made", "put back"])
def test_a_note_rejecting_our_sr_while_it_is_redirected_leaves_it_sent_nowhere(
    tmp_path: Path,
    tiny_checkpoint: Path,
    postgres_url: str,
    storescp: StoreSCP,
    queued: str,
) -> None:
    """The SR and SC of an image failed at a destination no longer configured; the
    administrator runs `retry-deliveries`, and, while it queues them to the node meant,
    a radiologist rejects the SR at the PACS. The redirect has superseded the failed SR
    and queued it to the node meant, a new delivery ("made") or one an earlier redirect
    had superseded put back to pending ("put back"), and is held on the SC's row, its
    transaction open. The note waits for the image's row; once the redirect commits, it
    supersedes what the redirect queued, and the SR is never sent. Before, it took no
    such lock: it waited on the failed row alone, found it superseded, and never saw the
    pending row, made (or put back) after its snapshot: the SR went to the node meant."""
    meant = storescp.destination
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    first, now = (nowhere, meant) if queued == "made" else (meant, nowhere)
    image_id = spool_instance(node(tmp_path, tiny_checkpoint, postgres_url, first))
    ids = assess_instance(node(tmp_path, tiny_checkpoint, postgres_url, first), image_id)
    delivery_ids = list(ids.delivery_ids)
    if queued == "put back":
        # sent to `nowhere` instead once (the settings changed), and failed there too:
        # the deliveries to the node meant are superseded, as redirected
        away = node(tmp_path, tiny_checkpoint, postgres_url, now)
        assert [o.state for o in send_deliveries(away, delivery_ids).values()] == ["failed"] * 2
        delivery_ids = [i for new in retry_failed(away).redirected.values() for i in new]
        first, now = now, meant
    fixed = node(tmp_path, tiny_checkpoint, postgres_url, now)
    assert [o.state for o in send_deliveries(fixed, delivery_ids).values()] == ["failed"] * 2
    with session_scope(postgres_url) as session:
        rows = {
            d.kind: d
            for d in session.scalars(select(Delivery).where(Delivery.id.in_(delivery_ids)))
        }
        sr_uid, sc_row = rows[ObjectKind.SR].sop_instance_uid, rows[ObjectKind.SC].id
    before = _states(fixed, sr_uid)
    assert before[first][0] is DeliveryState.FAILED
    if queued == "put back":
        assert before[meant] == (DeliveryState.SUPERSEDED, REDIRECTED)
    else:
        assert meant not in before
    image = image_of(fixed, image_id)
    sr = Reference(str(image.StudyInstanceUID), generate_uid(), ComprehensiveSRStorage, sr_uid)
    note_id = spool_dataset(
        fixed,
        build_rejection_note(
            image,
            QUALITY,
            [sr],
            description="Rejected at the PACS",
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=999,
        ),
    )
    retried: list[Retried] = []
    applied: list[AssessOutcome] = []

    with get_engine(postgres_url).connect() as holder:
        with holder.begin():
            # the SC's row held, so that the redirect stops after it queued the SR
            holder.execute(
                update(Delivery).where(Delivery.id == sc_row).values(attempts=Delivery.attempts)
            )
            redirect = threading.Thread(target=lambda: retried.append(retry_failed(fixed)))
            redirect.start()
            wait_for(
                lambda: not redirect.is_alive() or sessions_waiting_on_a_lock(postgres_url) >= 1,
                timeout=60,
                what="retry-deliveries to wait on the SC's row, or to end",
            )
            assert redirect.is_alive(), "the redirect did not wait on the SC's row"
            note = threading.Thread(target=lambda: applied.append(assess_instance(fixed, note_id)))
            note.start()
            wait_for(
                lambda: not note.is_alive() or sessions_waiting_on_a_lock(postgres_url) >= 2,
                timeout=60,
                what="the note to wait on the redirect, or to end",
            )
            assert note.is_alive(), "the note did not wait for the redirect"
        redirect.join(60)
        note.join(60)

    assert not redirect.is_alive() and not note.is_alive()
    [done] = retried
    assert done.destinations == [meant]  # the redirect queued the SR (and the SC) there
    [outcome] = applied
    assert outcome.state == "not_assessed" and outcome.delivery_ids == ()
    why = pipeline.rejected_by_the_pacs(QUALITY)
    after = _states(fixed, sr_uid)
    assert after[first] == (DeliveryState.SUPERSEDED, REDIRECTED)
    assert after[meant] == (DeliveryState.SUPERSEDED, why)  # what the redirect queued
    assert DeliveryState.PENDING not in {state for state, _ in after.values()}
    # everything due is sent: the SC reaches the node meant, the SR nowhere
    with session_scope(postgres_url) as session:
        due = list(
            session.scalars(select(Delivery.id).where(Delivery.state == DeliveryState.PENDING))
        )
        sr_ids = list(
            session.scalars(select(Delivery.id).where(Delivery.sop_instance_uid == sr_uid))
        )
    outcomes = send_deliveries(fixed, due)
    assert [o.state for o in outcomes.values()] == ["delivered"]
    [arrived] = storescp.wait_for_objects(1, timeout=30)
    assert dcmread(arrived).Modality == "OT" and dciodvfy_errors(arrived) == []
    assert set(send_deliveries(fixed, sr_ids).values()) == {
        DeliveryOutcome("skipped", error="already superseded")
    }
    assert [dcmread(p).Modality for p in storescp.received()] == ["OT"]
