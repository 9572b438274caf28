"""Deliveries to a destination taken out of the settings.

An administrator corrects a mistyped destination (another department's node): the SR
and SC still on their way there, and those that failed there, are never sent to it
again; `retry-deliveries` sends them to the configured destinations instead; our
rejection notes still go where the objects they withdraw went.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.engine import get_engine, session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.conftest import StoreSCP, sessions_waiting_on_a_lock
from tests.integration import test_delivery
from tests.integration.test_delivery import PynetdicomPACS
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_rejection_notes import image_of
from tests.support import free_port, pacs_rejection_note, wait_for
from worker import delivery, pipeline
from worker.celery_app import DELIVERY_QUEUE, configure
from worker.delivery import (
    NOT_CONFIGURED_HERE,
    SETTINGS_ROLLOUT,
    Retried,
    reset_failed,
    retry_failed,
    send_deliveries,
)
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
        f"destinations instead: 2 deliveries queued to {corrected.destination}",
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
    assert failed_problems(fixed) == [
        f"2 deliveries failed to destinations no longer configured ({nowhere}): their files "
        "are gone (retention removed them): nothing can send them, and 'boneage-worker "
        "retry-deliveries' leaves them failed; their results are in the database only, and "
        f"'boneage-worker abandon-deliveries' closes them; latest error: {error}"
    ]

    assert retry_deliveries(fixed, storescp.destination).splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries left failed, their destinations no longer configured: "
        "their files are gone (retention removed them): nothing can send them; close them "
        f"with 'boneage-worker abandon-deliveries --reason TEXT {ids[0]} {ids[1]}'",
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


def test_destinations_changed_and_changed_back_still_get_the_results(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    storescp: StoreSCP,
    corrected: StoreSCP,
) -> None:
    """The settings name A, then B (retry-deliveries sends the SR and SC failed to A
    there), then A again before they went to B (retry-deliveries once more): A gets them.
    Before, the delivery to A that the first redirect superseded counted as A having
    them: nothing was queued, every row was superseded, and `status` was healthy with
    the results nowhere."""
    a, b = storescp, corrected
    node_a = node(tmp_path, tiny_checkpoint, database_url, a.destination)
    ids = assess_instance(node_a, spool_instance(node_a)).delivery_ids
    node_b = node(tmp_path, tiny_checkpoint, database_url, b.destination)
    assert [o.state for o in send_deliveries(node_b, ids).values()] == ["failed"] * 2
    retry_deliveries(node_b, b.destination)
    to_b = sorted(set(deliveries(node_b)) - set(ids))
    assert len(to_b) == 2
    node_a = node(tmp_path, tiny_checkpoint, database_url, a.destination)  # changed back
    sent = send_deliveries(node_a, to_b)
    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2

    printed = retry_deliveries(node_a, a.destination).splitlines()

    assert printed[0] == "0 failed deliveries queued again"
    assert printed[1].startswith(
        "2 failed deliveries to destinations no longer configured sent to the configured "
        "destinations instead: 2 "
    )
    assert printed[1].endswith(f"queued to {a.destination}")
    rows = deliveries(node_a)
    assert len(rows) == 4  # the deliveries to A put back: the unique key allows one each
    assert [(rows[i].state, rows[i].attempts, rows[i].destination) for i in ids] == [
        (DeliveryState.PENDING, 0, a.destination)
    ] * 2
    assert [(rows[i].state, rows[i].last_error) for i in to_b] == [
        (DeliveryState.SUPERSEDED, REDIRECTED)
    ] * 2
    assert [o.state for o in send_deliveries(node_a, ids).values()] == ["delivered"] * 2
    received = a.wait_for_objects(2, timeout=30)
    assert {dcmread(p).SOPInstanceUID: body(p) for p in received} == {
        rows[i].sop_instance_uid: body(Path(rows[i].path)) for i in ids
    }
    assert b.associations() == 0
    assert failed_problems(node_a) == []
    # a third run finds nothing to do
    assert retry_deliveries(node_a, a.destination).splitlines() == [
        "0 failed deliveries queued again"
    ]


def test_a_destination_taken_out_keeps_the_mark_of_a_send_never_answered(
    tmp_path: Path,
    tiny_checkpoint: Path,
    database_url: str,
    corrected: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mistyped node took our SR and never answered (it may have stored it); then the
    administrator corrected the destination. The SR fails, not configured, with the mark
    of that send kept, as a failure after an unanswered C-STORE keeps it: redirected, and
    then rejected by the PACS, our note withdraws it at the mistyped node. Before, the
    claim's mark was cleared: the SR counted as never arrived, and no note went there."""
    pacs = PynetdicomPACS(
        [ComprehensiveSRStorage, SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage],
        silent=1,
    )
    monkeypatch.setattr(delivery, "SEND_TIMEOUT", 2.0)  # the wait on its answer
    try:
        mistyped = node(tmp_path, tiny_checkpoint, database_url, pacs.destination)
        image_id = spool_instance(mistyped)
        sr_id, sc_id = assess_instance(mistyped, image_id).delivery_ids
        sent = send_deliveries(mistyped, [sr_id, sc_id])
        assert [o.state for o in sent.values()] == ["retry"] * 2
        before = deliveries(mistyped)
        unanswered = before[sr_id].sending_since
        assert unanswered is not None and before[sc_id].sending_since is None
        fixed = node(tmp_path, tiny_checkpoint, database_url, corrected.destination)

        sent = send_deliveries(fixed, [sr_id, sc_id], force=True)

        assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2
        rows = deliveries(fixed)
        assert [(rows[i].state, rows[i].sending_since) for i in (sr_id, sc_id)] == [
            (DeliveryState.FAILED, unanswered),
            (DeliveryState.FAILED, None),  # it never went
        ]
        # redirected, the superseded SR keeps it; then the PACS rejects the image
        assert len(reset_failed(fixed)) == 2
        assert deliveries(fixed)[sr_id].sending_since == unanswered
        rejection = spool_dataset(fixed, pacs_rejection_note(image_of(fixed, image_id)))
        notes = assess_instance(fixed, rejection).delivery_ids
        rows = deliveries(fixed)
        assert [(rows[n].kind, rows[n].withdraws, rows[n].destination) for n in notes] == [
            (ObjectKind.KO, rows[sr_id].sop_instance_uid, pacs.destination)
        ]
        assert [o.state for o in send_deliveries(fixed, notes).values()] == ["delivered"]
    finally:
        pacs.stop()
    assert pacs.received == [ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage]
    # the SR and SC redirected to the node meant went no further: the image is rejected
    assert corrected.associations() == 0
    assert {d.state for d in deliveries(fixed).values() if d.kind is not ObjectKind.KO} == {
        DeliveryState.SUPERSEDED
    }


def test_a_redirect_waits_for_a_withdrawal_of_the_image_and_sends_nothing_of_it(
    tmp_path: Path, tiny_checkpoint: Path, postgres_url: str, corrected: StoreSCP
) -> None:
    """PostgreSQL, truly at once: the PACS's rejection of the image is being applied (its
    row taken, as `worker.pipeline` takes it first) when `retry-deliveries` redirects the
    image's SR and SC failed to the mistyped node. The redirect waits on the image's row;
    once the withdrawal commits, it finds them superseded and makes nothing. Before, it
    took no such lock: the new deliveries it made were not seen by the withdrawal's
    supersede, and a withdrawn bone age went to the node meant."""
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    mistyped = node(tmp_path, tiny_checkpoint, postgres_url, nowhere)
    image_id = spool_instance(mistyped)
    ids = assess_instance(mistyped, image_id).delivery_ids
    fixed = node(tmp_path, tiny_checkpoint, postgres_url, corrected.destination)
    assert [o.state for o in send_deliveries(fixed, ids).values()] == ["failed"] * 2
    why = pipeline.rejected_by_the_pacs("113001")
    retried: list[Retried] = []

    with get_engine(postgres_url).connect() as withdrawal:
        with withdrawal.begin():
            withdrawal.execute(  # the withdrawal's first step (pipeline._withdraw)
                update(Instance)
                .where(Instance.id == image_id)
                .values(claimed_by=Instance.claimed_by)
            )
            redirect = threading.Thread(target=lambda: retried.append(retry_failed(fixed)))
            redirect.start()
            wait_for(
                lambda: not redirect.is_alive() or sessions_waiting_on_a_lock(postgres_url) >= 1,
                timeout=60,
                what="retry-deliveries to wait on the image's row, or to end",
            )
            assert redirect.is_alive(), "the redirect did not wait for the withdrawal"
            withdrawal.execute(
                update(Instance)
                .where(Instance.id == image_id)
                .values(state=InstanceState.REJECTED, reason=why)
            )
            with Session(bind=withdrawal) as session:
                pipeline._supersede_unsent(session, image_id, 2, f"{why}, before it was sent")
                session.flush()
        redirect.join(60)

    assert not redirect.is_alive()
    assert [(r.reset, r.redirected, r.no_file, r.no_destination) for r in retried] == [
        ([], {}, [], [])
    ]
    rows = deliveries(fixed)
    assert sorted(rows) == sorted(ids)  # none made
    assert [(rows[i].state, rows[i].last_error) for i in ids] == [
        (DeliveryState.SUPERSEDED, f"{why}, before it was sent")
    ] * 2
    assert send_deliveries(fixed, ids) == {
        i: delivery.DeliveryOutcome("skipped", error="already superseded") for i in ids
    }
    assert corrected.associations() == 0


def test_deliveries_put_back_are_tried_again_by_a_delivery_worker_not_restarted_yet(
    tmp_path: Path, tiny_checkpoint: Path, database_url: str, storescp: StoreSCP
) -> None:
    """The settings name A, then B, then A again. `retry-deliveries`, run with A's
    settings before the delivery worker took them up, puts the SR and SC to A back (the
    first redirect sent them to B, where they failed): the worker, still with B's
    settings, tries them again for SETTINGS_ROLLOUT, as it does a delivery made after
    its settings, and once restarted sends them to A. So it does with a delivery put
    back to a destination A's settings name. Before, a delivery put back kept the time
    it was first made, before the worker's settings: it failed at once, and for good. A
    worker whose settings came after the put-back still fails them at once."""
    a = storescp.destination
    b = f"PACS@127.0.0.1:{free_port()}"  # nothing listens there
    node_a = node(tmp_path, tiny_checkpoint, database_url, a)
    ids = assess_instance(node_a, spool_instance(node_a)).delivery_ids
    worker = node(tmp_path, tiny_checkpoint, database_url, b)  # the delivery worker: B
    sent = send_deliveries(worker, ids)
    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2
    to_b = [i for new in retry_failed(worker).redirected.values() for i in new]
    assert len(to_b) == 2
    for _ in range(3):  # its attempts spent on B, which never answers
        send_deliveries(worker, to_b, force=True)
    assert {deliveries(worker)[i].state for i in to_b} == {DeliveryState.FAILED}

    # the settings name A again; retry-deliveries runs with them, the worker as it was
    retried = retry_failed(node(tmp_path, tiny_checkpoint, database_url, a))

    assert (retried.reset, retried.queued) == ([], sorted(ids))  # the deliveries to A, back
    sent = send_deliveries(worker, ids)
    assert [(o.state, o.error) for o in sent.values()] == [("retry", NOT_CONFIGURED_HERE)] * 2
    assert storescp.associations() == 0
    # a worker that took up B's settings after the put-back fails them for good
    late = dataclasses.replace(worker, settings_since=now())
    sent = send_deliveries(late, ids, force=True)
    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 2
    # put back again, A configured: the worker not restarted tries them again too
    assert reset_failed(node(tmp_path, tiny_checkpoint, database_url, a)) == sorted(ids)
    sent = send_deliveries(worker, ids)
    assert [(o.state, o.error) for o in sent.values()] == [("retry", NOT_CONFIGURED_HERE)] * 2

    restarted = node(tmp_path, tiny_checkpoint, database_url, a)
    assert [o.state for o in send_deliveries(restarted, ids, force=True).values()] == [
        "delivered"
    ] * 2
    rows = deliveries(restarted)
    received = storescp.wait_for_objects(2, timeout=30)
    assert {dcmread(p).SOPInstanceUID: body(p) for p in received} == {
        rows[i].sop_instance_uid: body(Path(rows[i].path)) for i in ids
    }
    assert failed_problems(restarted) == []


def test_a_redirect_holds_the_images_of_one_batch_at_a_time(
    tmp_path: Path,
    tiny_checkpoint: Path,
    postgres_url: str,
    corrected: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: a backlog failed to the mistyped node is redirected REDIRECT_BATCH
    at a time (here one image's SR and SC), each batch committed before the next takes
    its images' rows. The second image's row is held (as a withdrawal of it holds it):
    the first image's SR and SC are redirected and committed, and its row is free (the
    listener's record of a copy of it received again would not wait), while the
    redirect waits for the second. Before, it took every image's row first and held
    them all until the last was done."""
    monkeypatch.setattr(delivery, "REDIRECT_BATCH", 2)
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    mistyped = node(tmp_path, tiny_checkpoint, postgres_url, nowhere)
    first, second = spool_instance(mistyped), spool_instance(mistyped)
    first_ids = list(assess_instance(mistyped, first).delivery_ids)
    second_ids = list(assess_instance(mistyped, second).delivery_ids)
    fixed = node(tmp_path, tiny_checkpoint, postgres_url, corrected.destination)
    sent = send_deliveries(fixed, first_ids + second_ids)
    assert [o.state for o in sent.values()] == ["failed"] * 4
    retried: list[Retried] = []

    with get_engine(postgres_url).connect() as withdrawal:
        with withdrawal.begin():
            withdrawal.execute(  # the second image's row, taken as a withdrawal takes it
                update(Instance).where(Instance.id == second).values(claimed_by=Instance.claimed_by)
            )
            redirect = threading.Thread(target=lambda: retried.append(retry_failed(fixed)))
            redirect.start()
            wait_for(
                lambda: not redirect.is_alive() or sessions_waiting_on_a_lock(postgres_url) >= 1,
                timeout=60,
                what="retry-deliveries to wait on the second image's row, or to end",
            )
            assert redirect.is_alive(), "the redirect did not wait for the second image"
            rows = deliveries(fixed)
            assert [rows[i].state for i in first_ids + second_ids] == [
                DeliveryState.SUPERSEDED
            ] * 2 + [DeliveryState.FAILED] * 2
            with get_engine(postgres_url).connect() as listener, listener.begin():
                free = listener.execute(
                    select(Instance.id).where(Instance.id == first).with_for_update(nowait=True)
                ).scalar_one()  # raises where the redirect holds it
            assert free == first
        redirect.join(60)

    assert not redirect.is_alive()
    [done] = retried
    assert sorted(done.redirected) == sorted(first_ids + second_ids)
    rows = deliveries(fixed)
    queued = sorted(i for new in done.redirected.values() for i in new)
    assert [(rows[i].state, rows[i].destination) for i in queued] == [
        (DeliveryState.PENDING, corrected.destination)
    ] * 4
    assert [o.state for o in send_deliveries(fixed, queued).values()] == ["delivered"] * 4
    assert len(corrected.wait_for_objects(4, timeout=30)) == 4


def test_deliveries_whose_outbox_is_not_there_are_sent_once_it_is_back(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP, corrected: StoreSCP
) -> None:
    """The SR and SC failed to the mistyped node; then their outbox is not where it was
    written (its volume not mounted after a move, say). `status` and `retry-deliveries`
    say to put it back, then run `retry-deliveries`; done so, it sends them to the node
    meant, byte for byte. Before, both said nothing could send them (`status`: "their
    results are in the database only"), and an operator told so left them unsent."""
    database = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    mistyped = node(tmp_path, tiny_checkpoint, database, storescp.destination)
    ids = assess_instance(mistyped, spool_instance(mistyped)).delivery_ids
    fixed = node(tmp_path, tiny_checkpoint, database, corrected.destination)
    assert [o.state for o in send_deliveries(fixed, ids).values()] == ["failed"] * 2
    outbox = fixed.settings.outbox_dir
    before = deliveries(fixed)
    assert all(Path(before[i].path).is_relative_to(outbox) for i in ids)
    away = tmp_path / "not-mounted"
    outbox.rename(away)
    retry = "'boneage-worker retry-deliveries'"
    put_back = f"put the outbox back where it was written (BONEAGE_DATA_DIR), then run {retry}"

    assert failed_problems(fixed) == [
        f"2 deliveries failed to destinations no longer configured ({storescp.destination}): "
        f"their files are not found where they were written: {put_back}; latest error: "
        f"{NOT_CONFIGURED}"
    ]
    assert retry_deliveries(fixed, corrected.destination).splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries left failed, their destinations no longer configured: their "
        f"files are not found where they were written: {put_back} again",
    ]
    rows = deliveries(fixed)
    assert sorted(rows) == sorted(ids)  # none made, none superseded
    assert {d.state for d in rows.values()} == {DeliveryState.FAILED}

    # as it says: the outbox back where it was written, then retry-deliveries
    away.rename(outbox)
    assert retry_deliveries(fixed, corrected.destination).splitlines() == [
        "0 failed deliveries queued again",
        "2 failed deliveries to destinations no longer configured sent to the configured "
        f"destinations instead: 2 deliveries queued to {corrected.destination}",
    ]
    rows = deliveries(fixed)
    new = sorted(set(rows) - set(ids))
    assert [(rows[i].state, rows[i].last_error) for i in ids] == [
        (DeliveryState.SUPERSEDED, REDIRECTED)
    ] * 2
    assert [o.state for o in send_deliveries(fixed, new).values()] == ["delivered"] * 2
    received = corrected.wait_for_objects(2, timeout=30)
    assert {dcmread(p).SOPInstanceUID: body(p) for p in received} == {
        before[i].sop_instance_uid: body(Path(before[i].path)) for i in ids
    }
    assert storescp.associations() == 0
    assert failed_problems(fixed) == []


#: `boneage-worker retry-deliveries` with REDIRECT_BATCH ``argv[1]``, whose ``argv[2]``-th
#: delivery queued to a configured destination fails as SQLite's write lock held by
#: another process fails it ("database is locked"): in the second batch, after the batch
#: superseded its first row.
_STOPPED_AT_A_BATCH = """
import sqlite3
import sys

from sqlalchemy.exc import OperationalError

from worker import delivery
from worker.cli import main

delivery.REDIRECT_BATCH = int(sys.argv[1])
queue_to, calls = delivery._queue_to, []


def locked(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        error = sqlite3.OperationalError("database is locked")
        raise OperationalError("INSERT INTO deliveries", {}, error)
    return queue_to(*args, **kwargs)


delivery._queue_to = locked
main(["retry-deliveries"], prog_name="boneage-worker")
"""


def _published_deliveries(rt: Runtime) -> list[int]:
    """The delivery ids of the `deliver` messages on ``rt``'s (embedded) broker, in the
    order published, each once (taken off the queue)."""
    ids: list[int] = []
    with configure(rt.settings).connection_for_write() as connection:
        channel = connection.default_channel
        while (message := channel.basic_get(DELIVERY_QUEUE, no_ack=True)) is not None:
            [chunk], _kwargs, _embed = json.loads(message.body)
            ids.extend(i for i in chunk if i not in ids)
    return ids


def test_retry_deliveries_stopped_by_a_database_error_sends_and_says_what_it_did(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Three images' SRs and SCs failed to the mistyped node; a fourth's failed to the
    node meant, down then. `retry-deliveries` puts the fourth's back, redirects the first
    image's (REDIRECT_BATCH 2), and the second batch fails ("database is locked"). What
    committed is published and said, then the error; what the failed batch did is rolled
    back and not said; a run again redirects the rest, and all reach the node meant.
    Before, the command ended in the traceback alone: nothing said, nothing published
    (the reconciler would have sent them, some time later)."""
    database = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    nowhere = f"PACS@127.0.0.1:{free_port()}"
    meant = StoreSCP(tmp_path / "meant")  # down at first
    mistyped = node(tmp_path, tiny_checkpoint, database, nowhere)
    images = [assess_instance(mistyped, spool_instance(mistyped)).delivery_ids for _ in range(3)]
    fixed = node(tmp_path, tiny_checkpoint, database, meant.destination)
    down = assess_instance(fixed, spool_instance(fixed)).delivery_ids
    stranded = [i for ids in images for i in ids]
    sent = send_deliveries(fixed, stranded)
    assert [(o.state, o.error) for o in sent.values()] == [("failed", NOT_CONFIGURED)] * 6
    for _ in range(3):  # its attempts spent on the node meant, down
        send_deliveries(fixed, down, force=True)
    rows = deliveries(fixed)
    assert {rows[i].state for i in [*stranded, *down]} == {DeliveryState.FAILED}
    meant.start()
    try:
        env = {
            **os.environ,
            "BONEAGE_DATA_DIR": str(fixed.settings.data_dir),
            "BONEAGE_DATABASE_URL": database,
            "BONEAGE_DESTINATIONS": meant.destination,
            "BONEAGE_MODEL": str(fixed.settings.model),
        }
        done = subprocess.run(
            [sys.executable, "-c", _STOPPED_AT_A_BATCH, "2", "3"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

        assert done.returncode == 1, done.stderr
        first, second, third = images
        rows = deliveries(fixed)
        redirected = sorted(set(rows) - {*stranded, *down})
        assert [(rows[i].state, rows[i].destination) for i in redirected] == [
            (DeliveryState.PENDING, meant.destination)
        ] * 2
        assert sorted(rows[i].sop_instance_uid for i in redirected) == sorted(
            rows[i].sop_instance_uid for i in first
        )
        assert [rows[i].state for i in first] == [DeliveryState.SUPERSEDED] * 2
        # the failed batch's supersede rolled back with it; the third's never begun
        assert [rows[i].state for i in [*second, *third]] == [DeliveryState.FAILED] * 4
        assert [rows[i].state for i in down] == [DeliveryState.PENDING] * 2
        assert done.stdout.splitlines() == [
            "2 failed deliveries queued again",
            "2 failed deliveries to destinations no longer configured sent to the configured "
            f"destinations instead: 2 deliveries queued to {meant.destination}",
        ]
        assert (
            "retry-deliveries stopped (OperationalError): 4 failed deliveries to destinations "
            "no longer configured not redirected, left failed: run it again"
        ) in done.stderr
        # logged as a run that ends logs it, with what was left
        named = ", ".join(str(i) for i in first)
        assert (
            "2 failed deliveries to destinations no longer configured sent to the configured "
            f"destinations instead ({meant.destination}): {named}"
        ) in done.stderr
        left = ", ".join(str(i) for i in [*second, *third])
        assert (
            "retry-deliveries stopped (OperationalError) after 4 deliveries were queued: 4 "
            "failed deliveries to destinations no longer configured not redirected, left "
            f"failed for a run again: {left}"
        ) in done.stderr
        assert "database is locked" in done.stderr  # the error itself goes on
        published = _published_deliveries(fixed)
        assert sorted(published) == sorted([*down, *redirected])

        # the messages' work: sent to the node meant
        assert [o.state for o in send_deliveries(fixed, published).values()] == ["delivered"] * 4
        # and a run again redirects the rest
        assert retry_deliveries(fixed, meant.destination).splitlines() == [
            "0 failed deliveries queued again",
            "4 failed deliveries to destinations no longer configured sent to the configured "
            f"destinations instead: 4 deliveries queued to {meant.destination}",
        ]
        rest = _published_deliveries(fixed)
        assert len(rest) == 4
        assert [o.state for o in send_deliveries(fixed, rest).values()] == ["delivered"] * 4
        received = meant.wait_for_objects(8, timeout=30)
        rows = deliveries(fixed)
        assert sorted(dcmread(p).SOPInstanceUID for p in received) == sorted(
            rows[i].sop_instance_uid for i in [*stranded, *down]
        )
        assert failed_problems(fixed) == []
    finally:
        meant.stop()
