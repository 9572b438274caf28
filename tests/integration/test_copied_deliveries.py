"""A database copied from another node never sends, sends again or withdraws that node's
objects, once `boneage-worker db new-identity` gave it an identity of its own.

Production assessed four images: the SRs and SCs of two delivered to its PACS, those of
the third pending, those of the fourth failed. A validation node is set up from a copy of
its database (SQLite's backup, PostgreSQL's CREATE DATABASE … TEMPLATE) and sends to
the same PACS (a real storescp): the worst case, where whatever the copy sends of
production's lands beside production's results. The command supersedes the unsent
deliveries as it gives the identity; neither the delivery code, the reconciler nor
`retry-deliveries` sends them; and an image production assessed, rejected by the PACS
or received again in another study at the copy, gets no note of the copy's withdrawing
production's SR and SC, nor an SR saying it replaces production's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from db import queries
from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, Node, ObjectKind
from db.schema import utcnow as now
from dicom_io.uids import LEGACY_ROOT, UUID_ROOT, UidScheme, legacy_uid
from tests.conftest import StoreSCP
from tests.integration.test_node_identity import copy_of, database_url  # noqa: F401
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_received_again import deliver, received_again, replaced
from tests.support import pacs_rejection_note
from worker import pipeline
from worker.cli import main as cli
from worker.delivery import MADE_BEFORE_THE_COPY, not_failed, retry_failed, send_deliveries
from worker.pipeline import LEFT_TO_THE_COPIED_NODE, WITHDRAW_BY_HAND, assess_instance
from worker.reconciler import reconcile
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


@dataclasses.dataclass(frozen=True)
class Production:
    """Production's node, and what it made of its four images."""

    rt: Runtime
    delivered: int  # an image whose SR and SC its PACS has
    moved: int  # another, which the PACS then moves to another study
    pending: int  # the image whose SR and SC are still to be sent
    failed: int  # the image whose SR and SC failed, for `retry-deliveries`
    sent: frozenset[str]  # the SOP Instance UIDs of what its PACS has


def ids_of(url: str, instance_id: int) -> list[int]:
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(Delivery.id).where(Delivery.instance_id == instance_id).order_by(Delivery.id)
            )
        )


def rows_of(url: str, instance_id: int) -> list[tuple[ObjectKind, DeliveryState, str | None]]:
    with session_scope(url) as session:
        return [
            (d.kind, d.state, d.last_error)
            for d in session.scalars(
                select(Delivery).where(Delivery.instance_id == instance_id).order_by(Delivery.id)
            )
        ]


def production_node(tmp_path: Path, tiny_checkpoint: Path, url: str, pacs: StoreSCP) -> Production:
    rt = make_runtime(
        tmp_path / "production", tiny_checkpoint, database_url=url, destinations=pacs.destination
    )
    delivered = spool_instance(rt, attributes={"PatientID": "P-1"})
    moved = spool_instance(rt, attributes={"PatientID": "P-4"})
    sent: set[str] = set()
    for instance_id in (delivered, moved):
        outcome = assess_instance(rt, instance_id)
        assert outcome.state == "assessed"
        sent |= {str(dcmread(p).SOPInstanceUID) for p in deliver(rt, pacs, outcome.delivery_ids)}
    pending = spool_instance(rt, attributes={"PatientID": "P-2"})
    failed = spool_instance(rt, attributes={"PatientID": "P-3"})
    assert assess_instance(rt, pending).state == "assessed"
    assert assess_instance(rt, failed).state == "assessed"
    with session_scope(url) as session:
        # the pending ones due long ago: a reconciler's round sends them again
        session.execute(
            update(Delivery)
            .where(Delivery.instance_id == pending)
            .values(next_attempt_at=now() - dt.timedelta(minutes=5))
        )
        # the failed ones as production's delivery workers left them, attempts spent
        session.execute(
            update(Delivery)
            .where(Delivery.instance_id == failed)
            .values(state=DeliveryState.FAILED, attempts=5, last_error="association rejected")
        )
    return Production(rt, delivered, moved, pending, failed, frozenset(sent))


def new_identity(url: str, pacs: StoreSCP) -> Result:
    """`boneage-worker db new-identity --yes` on the validation node, which sends to
    ``pacs``."""
    return CliRunner().invoke(
        cli,
        ["--database-url", url, "db", "new-identity", "--yes"],
        env={"BONEAGE_DESTINATIONS": pacs.destination},
    )


def validation_node(
    tmp_path: Path,
    tiny_checkpoint: Path,
    production: Production,
    copy_of: Callable[[str], str],  # noqa: F811
    pacs: StoreSCP,
) -> Runtime:
    """The validation node set up from a copy of production's database, given an
    identity of its own, sending to ``pacs``; checks what the command said and did."""
    copy = copy_of(production.rt.database_url)
    given = new_identity(copy, pacs)
    assert given.exit_code == 0, given.output
    said = " ".join(given.output.split())
    assert (
        "2 pending and 2 failed deliveries are recorded (of the node this database was "
        "copied from, if it is a copy): they will be superseded, never sent from here, nor "
        "again by retry-deliveries; and no note of ours will withdraw the objects of the 4 "
        "delivered ones"
    ) in said
    assert (
        "4 pending or failed deliveries superseded: made by the node this database was "
        "copied from, they are not this node's to send"
    ) in said
    with session_scope(copy) as session:
        node = session.get_one(Node, 1)
        highest = session.scalar(select(Delivery.id).order_by(Delivery.id.desc()).limit(1))
        assert node.copied_deliveries_up_to == highest
    return make_runtime(
        tmp_path / "validation", tiny_checkpoint, database_url=copy, destinations=pacs.destination
    )


def test_a_copy_given_a_new_identity_never_sends_or_sends_again_productions_objects(
    database_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    copy_of: Callable[[str], str],  # noqa: F811
    storescp: StoreSCP,
) -> None:
    """Production's pending and failed SRs and SCs are superseded in the copy, saying
    why; the copy's delivery code, its reconciler and `retry-deliveries` (all, or by
    id) send none of them to the PACS, which gets only what the copy makes itself.
    Production's own rows are as they were."""
    production = production_node(tmp_path, tiny_checkpoint, database_url, storescp)
    validation = validation_node(tmp_path, tiny_checkpoint, production, copy_of, storescp)
    copy = validation.database_url
    for instance_id in (production.pending, production.failed):
        assert rows_of(copy, instance_id) == [
            (ObjectKind.SR, DeliveryState.SUPERSEDED, MADE_BEFORE_THE_COPY),
            (ObjectKind.SC, DeliveryState.SUPERSEDED, MADE_BEFORE_THE_COPY),
        ]
    for instance_id in (production.delivered, production.moved):
        assert {state for _, state, _ in rows_of(copy, instance_id)} == {DeliveryState.DELIVERED}
    assert {state for _, state, _ in rows_of(database_url, production.pending)} == {
        DeliveryState.PENDING
    }
    unsent = ids_of(copy, production.pending) + ids_of(copy, production.failed)
    received = len(storescp.received())

    queued: list[int] = []
    reconcile(
        validation, lambda _: None, lambda ids: queued.extend(ids), inference_queue_empty=True
    )
    assert queued == []
    outcomes = send_deliveries(validation, unsent, force=True)
    assert {o.state for o in outcomes.values()} == {"skipped"}, outcomes
    assert retry_failed(validation).queued == []
    assert retry_failed(validation, unsent).queued == []
    assert set(not_failed(copy, unsent).values()) == {f"was superseded: {MADE_BEFORE_THE_COPY}"}
    retried = CliRunner().invoke(
        cli,
        ["--database-url", copy, "retry-deliveries", *map(str, unsent)],
        env={"BONEAGE_DESTINATIONS": storescp.destination},
    )
    assert "0 failed deliveries queued again" in retried.output, retried.output
    for instance_id in (production.pending, production.failed):
        assert {state for _, state, _ in rows_of(copy, instance_id)} == {DeliveryState.SUPERSEDED}

    # the copy's own objects go: a new image, assessed and delivered
    image_id = spool_instance(validation, attributes={"PatientID": "V-1"})
    ours = deliver(validation, storescp, assess_instance(validation, image_id).delivery_ids)
    assert len(ours) == 2
    assert len(storescp.received()) == received + 2  # nothing of production's


def test_a_copy_withdraws_none_of_productions_objects(
    database_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    copy_of: Callable[[str], str],  # noqa: F811
    storescp: StoreSCP,
) -> None:
    """At the copy, the PACS rejects an image whose SR and SC production delivered, and
    moves another such image to another study, where it is assessed again: no note of
    the copy's withdraws production's SRs and SCs (the PACS has them: a note would hide
    production's results), the copy's new SR replaces none of production's, and each
    image's reason says why. Production, never given a new identity, withdraws its own
    as before."""
    production = production_node(tmp_path, tiny_checkpoint, database_url, storescp)
    validation = validation_node(tmp_path, tiny_checkpoint, production, copy_of, storescp)
    copy = validation.database_url
    left = LEFT_TO_THE_COPIED_NODE.format(count=2)

    with session_scope(copy) as session:
        image = dcmread(session.get_one(Instance, production.delivered).spool_path)
    note_id = spool_dataset(validation, pacs_rejection_note(image))
    applied = assess_instance(validation, note_id)
    assert applied.delivery_ids == ()
    with session_scope(copy) as session:
        rejected = session.get_one(Instance, production.delivered)
        assert rejected.state is InstanceState.REJECTED
        assert rejected.reason == (
            f"rejected by the PACS: Incorrect Modality Worklist Entry; {left}"
        )
    assert ObjectKind.KO not in {kind for kind, _, _ in rows_of(copy, production.delivered)}

    received_again(validation, production.moved, StudyInstanceUID=generate_uid())
    again = assess_instance(validation, production.moved)
    assert again.state == "assessed"
    ours = [dcmread(p) for p in deliver(validation, storescp, again.delivery_ids)]
    assert sorted(o.Modality for o in ours) == ["OT", "SR"]  # no note
    [sr] = [o for o in ours if o.Modality == "SR"]
    assert replaced(sr) == []
    assert production.sent.isdisjoint(str(o.SOPInstanceUID) for o in ours)
    with session_scope(copy) as session:
        reason = session.get_one(Instance, production.moved).reason
    assert reason is not None and left in reason

    # production, never given a new identity, withdraws its own as before
    note = assess_instance(production.rt, spool_dataset(production.rt, pacs_rejection_note(image)))
    assert len(note.delivery_ids) == 2


def test_a_copy_derives_its_own_uids_for_an_image_production_assessed_under_pydicoms_root(
    database_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    copy_of: Callable[[str], str],  # noqa: F811
    storescp: StoreSCP,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image production assessed before the node's identity went into UIDs (pydicom's
    root, no node in them), assessed again at the copy: the copy's SR and SC get UIDs of
    its own, not the ones that derivation gives production's own next assessment of the
    image, which would be two objects under one UID at a PACS that gets both."""
    rt = make_runtime(
        tmp_path / "production",
        tiny_checkpoint,
        database_url=database_url,
        destinations=storescp.destination,
    )
    image_id = spool_instance(rt, sex="F")
    with monkeypatch.context() as before:  # the release before: pydicom's, for every image
        before.setattr(pipeline, "node_uids", lambda rt: UidScheme(LEGACY_ROOT, "unused"))
        first = assess_instance(rt, image_id)
    deliver(rt, storescp, first.delivery_ids)
    with session_scope(database_url) as session:
        image_uid = session.get_one(Instance, image_id).sop_instance_uid
    model = rt.predictor.model_id

    copy = copy_of(database_url)
    given = new_identity(copy, storescp)
    assert given.exit_code == 0, given.output
    said = " ".join(given.output.split())
    assert "1 image(s) have objects of ours recorded (of the node this database" in said
    validation = make_runtime(
        tmp_path / "validation",
        tiny_checkpoint,
        database_url=copy,
        destinations=storescp.destination,
    )
    received_again(validation, image_id, PatientSex="M")
    again = assess_instance(validation, image_id)
    assert again.state == "assessed"
    ours = [dcmread(p) for p in deliver(validation, storescp, again.delivery_ids)]
    assert sorted(o.Modality for o in ours) == ["OT", "SR"]
    legacy = {legacy_uid(image_uid, model, "assessment 2", kind) for kind in ("sr", "sc")} | {
        legacy_uid(image_uid, model, series) for series in ("sr-series", "sc-series")
    }
    for ds in ours:
        assert str(ds.SOPInstanceUID).startswith(f"{UUID_ROOT}."), ds.Modality
        assert str(ds.SOPInstanceUID) not in legacy
        assert str(ds.SeriesInstanceUID) not in legacy


def test_a_copys_own_objects_to_withdraw_by_hand_stay_among_the_problems(
    database_url: str,  # noqa: F811
    tmp_path: Path,
    tiny_checkpoint: Path,
    copy_of: Callable[[str], str],  # noqa: F811
    storescp: StoreSCP,
) -> None:
    """At the copy, an image production assessed is assessed again (its sex corrected)
    and the copy's SR and SC delivered; retention removes their files; then the PACS
    refiles the image under another patient. No note can be made of the copy's own
    objects (their files said where they were filed), and none is made of production's:
    the reason says both, ending with what to withdraw by hand, so that `status` lists
    it among the problems."""
    production = production_node(tmp_path, tiny_checkpoint, database_url, storescp)
    validation = validation_node(tmp_path, tiny_checkpoint, production, copy_of, storescp)
    copy = validation.database_url
    image_id = production.delivered
    with session_scope(copy) as session:
        sex = dcmread(session.get_one(Instance, image_id).spool_path).PatientSex
        mark = session.get_one(Node, 1).copied_deliveries_up_to
    received_again(validation, image_id, PatientSex="M" if sex == "F" else "F")
    again = assess_instance(validation, image_id)
    assert again.state == "assessed"
    deliver(validation, storescp, again.delivery_ids)
    with session_scope(copy) as session:
        ours = session.scalars(
            select(Delivery).where(Delivery.instance_id == image_id, Delivery.id > mark)
        ).all()
    assert sorted(d.kind for d in ours) == sorted([ObjectKind.SR, ObjectKind.SC])
    for delivery in ours:  # as retention removes them
        Path(delivery.path).unlink()

    received_again(validation, image_id, PatientID="P-1-CORRECTED")
    assert assess_instance(validation, image_id).state == "assessed"
    with session_scope(copy) as session:
        reason = session.get_one(Instance, image_id).reason or ""
        problems = queries.recent_problems(session)
    assert LEFT_TO_THE_COPIED_NODE.format(count=2) in reason
    assert "our rejection notes for 2 object(s) of ours could not be made" in reason
    assert reason.endswith(WITHDRAW_BY_HAND)
    assert [p["what"] for p in problems] == [f"instance {image_id}"]
