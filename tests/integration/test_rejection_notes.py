"""IHE IOCM rejection notes from the PACS: an image it rejected is never assessed, or
has the bone age it was given withdrawn by a rejection note of ours that names our SR
and SC, sent where they went; nothing of it not yet sent is sent."""

from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from sqlalchemy import func, select, update

from db import queries
from db.engine import get_engine, session_scope
from db.schema import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    ObjectKind,
    Rejection,
    Result,
)
from dicom_io import gate
from dicom_io.ko import Reference, build_rejection_note, read_rejection_note
from tests.conftest import StoreSCP, sessions_waiting_on_a_lock
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_delivery import PynetdicomPACS
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_received_again import deliver, received_again
from tests.support import pacs_rejection_note, reference_of, wait_for
from worker import delivery, pipeline
from worker.delivery import reset_failed, send_deliveries
from worker.pipeline import assess_instance
from worker.reprocess import not_finished, prepare_reprocess, rejected_by_the_pacs
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

QUALITY = "113001"
WRONG_PATIENT = "113038"
#: What files a note with a patient and a study: a note of ours repeats them.
FILED_BY = ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber", "StudyDate")


#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def image_of(rt: Runtime, instance_id: int) -> Dataset:
    with session_scope(rt.database_url) as session:
        return dcmread(session.get_one(Instance, instance_id).spool_path)


def another_image(image: Dataset) -> Dataset:
    """``image`` under a SOP Instance UID of its own (not spooled)."""
    other = dcmread(image.filename)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return other


def state_of(rt: Runtime, instance_id: int) -> tuple[InstanceState, str | None]:
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        return instance.state, instance.reason


def deliveries_of(rt: Runtime, instance_id: int) -> list[tuple[ObjectKind, DeliveryState, str]]:
    with session_scope(rt.database_url) as session:
        return [
            (d.kind, d.state, d.sop_instance_uid)
            for d in session.scalars(
                select(Delivery).where(Delivery.instance_id == instance_id).order_by(Delivery.id)
            )
        ]


def test_a_rejected_image_has_its_bone_age_withdrawn_where_it_went(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    image_id = spool_instance(runtime)
    assessed = assess_instance(runtime, image_id)
    assert assessed.state == "assessed"
    sent = deliver(runtime, storescp, assessed.delivery_ids)
    ours = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in sent}
    image = image_of(runtime, image_id)

    note_id = spool_dataset(runtime, pacs_rejection_note(image))
    applied = assess_instance(runtime, note_id)

    assert applied.state == "not_assessed"
    assert applied.reason is not None
    assert applied.reason.startswith("a key object selection, rejection note")
    assert state_of(runtime, image_id) == (
        InstanceState.REJECTED,
        "rejected by the PACS: Incorrect Modality Worklist Entry",
    )
    # one note per object of ours (a PACS that lacks one refuses only its note), each
    # to the one destination; dciodvfy-clean
    assert len(applied.delivery_ids) == 2
    our_notes = [dcmread(p) for p in deliver(runtime, storescp, applied.delivery_ids)]
    withdrawn = [read_rejection_note(n) for n in our_notes]
    assert all(w is not None and w.code == WRONG_PATIENT for w in withdrawn)  # the PACS's
    assert {
        (r.study_instance_uid, r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
        for w in withdrawn
        if w is not None
        for r in w.references
    } == {
        (str(o.StudyInstanceUID), str(o.SeriesInstanceUID), str(o.SOPClassUID), uid)
        for uid, o in ours.items()
    }
    assert {r.sop_class_uid for w in withdrawn if w is not None for r in w.references} == {
        ComprehensiveSRStorage,
        SecondaryCaptureImageStorage,
    }
    # filed with the image: its patient and study
    for note in our_notes:
        for keyword in FILED_BY:
            assert note.get(keyword) == image.get(keyword), keyword
        assert note.Manufacturer == "boneage-worker"
    # the result stays in the database; the image is never assessed again
    with session_scope(runtime.database_url) as session:
        assert len(session.scalars(select(Result)).all()) == 1
    assert assess_instance(runtime, image_id).state == "skipped"
    assert prepare_reprocess(runtime, [image_id]) == []
    assert rejected_by_the_pacs(runtime, [image_id, note_id]) == [image_id]


def test_a_copy_received_again_after_the_rejection_is_not_assessed_again(
    runtime: Runtime,
) -> None:
    """Not even with another sex: a rejected image stays rejected."""
    image_id = spool_instance(runtime)
    assert assess_instance(runtime, image_id).state == "assessed"
    assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, image_id)))
    )

    received_again(runtime, image_id, PatientSex="M")
    assert assess_instance(runtime, image_id).state == "skipped"
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, image_id).assessment == 1
        assert session.get_one(Instance, image_id).received_again_at is None


def test_what_was_not_sent_of_a_rejected_image_is_never_sent(runtime: Runtime) -> None:
    """The SR and SC still pending are superseded, with no note of ours (the PACS has
    nothing of ours to hide); one on its way is named by our note all the same."""
    image_id = spool_instance(runtime)
    assessed = assess_instance(runtime, image_id)
    assert len(assessed.delivery_ids) == 2
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, image_id)))
    )
    assert applied.delivery_ids == ()
    assert [(kind, state) for kind, state, _ in deliveries_of(runtime, image_id)] == [
        (ObjectKind.SR, DeliveryState.SUPERSEDED),
        (ObjectKind.SC, DeliveryState.SUPERSEDED),
    ]
    with session_scope(runtime.database_url) as session:
        errors = session.scalars(select(Delivery.last_error)).all()
    assert (
        errors
        == ["rejected by the PACS: Incorrect Modality Worklist Entry, before it was sent"] * 2
    )

    # another image, whose SR a delivery worker is sending as the note arrives
    other_id = spool_dataset(runtime, another_image(image_of(runtime, image_id)))
    sr_id, _ = assess_instance(runtime, other_id).delivery_ids
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == sr_id)
            .values(sending_since=queries.database_now(session))
        )
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, other_id), QUALITY))
    )
    assert len(applied.delivery_ids) == 1
    with session_scope(runtime.database_url) as session:
        ko = session.get_one(Delivery, applied.delivery_ids[0])
        sr = session.get_one(Delivery, sr_id)
        note = read_rejection_note(dcmread(ko.path))
    assert note is not None
    assert note.code == QUALITY
    assert [r.sop_instance_uid for r in note.references] == [sr.sop_instance_uid]


def _sending(rt: Runtime, delivery_id: int) -> list[delivery._Claimed]:
    """A delivery worker claims ``delivery_id`` and starts sending it (the send itself is
    :func:`delivery._send_to`, called by the test when it wants the send to end)."""
    claimed, skipped = delivery._claim(rt, [delivery_id], force=False)
    assert skipped == {}
    return claimed


class _SentAsRejected(NamedTuple):
    """An image whose SR a delivery worker is sending (:func:`_sending`) as the PACS's
    rejection note comes, and our note naming that SR."""

    sr_id: int
    on_its_way: list[delivery._Claimed]
    note_id: int


def _rejected_while_its_sr_is_sent(rt: Runtime) -> _SentAsRejected:
    image_id = spool_instance(rt)
    sr_id, _ = assess_instance(rt, image_id).delivery_ids
    on_its_way = _sending(rt, sr_id)
    [note_id] = assess_instance(
        rt, spool_dataset(rt, pacs_rejection_note(image_of(rt, image_id)))
    ).delivery_ids
    return _SentAsRejected(sr_id, on_its_way, note_id)


def test_a_note_waits_while_its_object_is_on_its_way_and_goes_once_it_arrived(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The note comes while our SR is being sent: our note naming the SR is held, no
    attempt counted, until that send ends (a PACS that applies IOCM refuses a note
    naming an instance it does not have); the SR arrives, then the note goes."""
    sr_id, on_its_way, note_id = _rejected_while_its_sr_is_sent(runtime)

    held = send_deliveries(runtime, [note_id])[note_id]
    assert held.state == "waiting"  # not a retry: no attempt was made
    assert held.retry_in is not None
    size = sum(row.path.stat().st_size for row in on_its_way)  # the claim carries it
    assert 0 < held.retry_in <= delivery.claim_seconds(1, size) + delivery.NOTE_WAIT_SLACK
    with session_scope(runtime.database_url) as session:
        note = session.get_one(Delivery, note_id)
        assert (note.state, note.attempts, note.sending_since) == (DeliveryState.PENDING, 0, None)
    assert storescp.received() == []

    sent: dict[int, delivery.DeliveryOutcome] = {}
    delivery._send_to(runtime, storescp.destination, on_its_way, sent)
    assert sent[sr_id].state == "delivered"
    assert send_deliveries(runtime, [note_id], force=True)[note_id].state == "delivered"
    arrived = [dcmread(p) for p in storescp.wait_for_objects(2, timeout=30)]
    assert sorted(str(ds.Modality) for ds in arrived) == ["KO", "SR"]


def test_a_note_whose_object_never_arrived_is_not_sent(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The SR being sent as the note comes fails (the PACS is down): our note naming it
    is superseded, never sent, where before it was refused by the PACS for a day of
    retries and ended failed in `status`."""
    sr_id, on_its_way, note_id = _rejected_while_its_sr_is_sent(runtime)

    storescp.stop()
    sent: dict[int, delivery.DeliveryOutcome] = {}
    delivery._send_to(runtime, storescp.destination, on_its_way, sent)
    assert sent[sr_id] == delivery.DeliveryOutcome(
        "skipped", error="superseded while it was being sent"
    )
    storescp.start()
    outcome = send_deliveries(runtime, [note_id])[note_id]
    assert outcome.state == "skipped"
    with session_scope(runtime.database_url) as session:
        note = session.get_one(Delivery, note_id)
        assert (note.state, note.attempts, note.next_attempt_at, note.sending_since) == (
            DeliveryState.SUPERSEDED,
            0,
            None,
            None,
        )
        assert note.last_error == (
            "the object it withdraws never arrived there: nothing to withdraw"
        )
    assert storescp.received() == []
    assert reset_failed(runtime) == []


def test_each_note_follows_its_objects_fate_at_its_own_destination(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The SR on its way to two destinations as the note comes: it reaches one, and the
    other is down. The note goes to the one, and is superseded for the other."""
    here, there = storescp.destination, storescp.destination.replace("127.0.0.1", "localhost")
    rt = make_runtime(
        tmp_path / "two",
        tiny_checkpoint,
        destinations=f"{here},{there}",
        database_url=runtime.database_url,
    )
    image_id = spool_instance(rt)
    outcome = assess_instance(rt, image_id)
    with session_scope(rt.database_url) as session:
        srs = {
            d.destination: d.id
            for d in session.scalars(
                select(Delivery).where(
                    Delivery.id.in_(outcome.delivery_ids), Delivery.kind == ObjectKind.SR
                )
            )
        }
    on_its_way = {destination: _sending(rt, sr_id) for destination, sr_id in srs.items()}
    notes = assess_instance(
        rt, spool_dataset(rt, pacs_rejection_note(image_of(rt, image_id)))
    ).delivery_ids
    with session_scope(rt.database_url) as session:
        note_to = {session.get_one(Delivery, n).destination: n for n in notes}
    assert sorted(note_to) == sorted([here, there])

    sent: dict[int, delivery.DeliveryOutcome] = {}
    delivery._send_to(rt, here, on_its_way[here], sent)
    storescp.stop()
    delivery._send_to(rt, there, on_its_way[there], sent)
    storescp.start()
    assert [sent[srs[here]].state, sent[srs[there]].state] == ["delivered", "skipped"]
    outcomes = send_deliveries(rt, [note_to[here], note_to[there]])
    assert [outcomes[note_to[here]].state, outcomes[note_to[there]].state] == [
        "delivered",
        "skipped",
    ]


def test_a_note_whose_object_went_unanswered_goes(
    runtime: Runtime, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS took our SR being sent as the note came and never answered: it may have
    stored it, so the note goes (found in review: superseded as never arrived, it left
    a bone age standing at the PACS)."""
    pacs = PynetdicomPACS(
        [ComprehensiveSRStorage, SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage],
        silent=1,
    )
    monkeypatch.setattr(delivery, "SEND_TIMEOUT", 2.0)  # the wait on its answer
    try:
        rt = make_runtime(
            tmp_path / "silent",
            tiny_checkpoint,
            destinations=pacs.destination,
            database_url=runtime.database_url,
        )
        sr_id, on_its_way, note_id = _rejected_while_its_sr_is_sent(rt)
        sent: dict[int, delivery.DeliveryOutcome] = {}
        delivery._send_to(rt, pacs.destination, on_its_way, sent)
        assert sent[sr_id].state == "skipped"
        assert sent[sr_id].error == "superseded while it was being sent"
        assert send_deliveries(rt, [note_id])[note_id].state == "delivered"
    finally:
        pacs.stop()
    assert pacs.received == [ComprehensiveSRStorage, KeyObjectSelectionDocumentStorage]


def test_a_note_whose_objects_sender_died_goes(runtime: Runtime, storescp: StoreSCP) -> None:
    """The worker sending the SR died (its claim ran out): whether the SR arrived is not
    known, so the note goes, and the PACS decides."""
    sr_id, _, note_id = _rejected_while_its_sr_is_sent(runtime)
    with session_scope(runtime.database_url) as session:
        session.get_one(Delivery, sr_id).next_attempt_at = queries.database_now(session)
    assert send_deliveries(runtime, [note_id])[note_id].state == "delivered"
    [arrived] = storescp.wait_for_objects(1, timeout=30)
    assert dcmread(arrived).Modality == "KO"


def test_an_image_rejected_before_it_is_assessed_never_is(runtime: Runtime) -> None:
    """Rejected while queued, or before it arrived: no result, nothing to send."""
    queued_id = spool_instance(runtime)
    assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, queued_id)))
    )
    assert state_of(runtime, queued_id)[0] is InstanceState.REJECTED
    assert assess_instance(runtime, queued_id).state == "skipped"

    # the note first, the image after it
    image = another_image(image_of(runtime, queued_id))
    assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image, QUALITY)))
    later = spool_dataset(runtime, image)
    outcome = assess_instance(runtime, later)
    assert outcome.state == "rejected"
    assert state_of(runtime, later) == (
        InstanceState.REJECTED,
        "rejected by the PACS: Rejected for Quality Reasons",
    )
    with session_scope(runtime.database_url) as session:
        assert session.scalars(select(Result)).all() == []
        assert session.scalars(select(Delivery)).all() == []


def under_its_uid_elsewhere(image: Dataset) -> Dataset:
    """Another patient's image under ``image``'s SOP Instance UID, in another study (a
    modality that reuses UIDs), as the PACS holds it."""
    other = copy.deepcopy(image)
    other.PatientID, other.PatientName = "B-999", "OTHER^PATIENT"
    other.StudyInstanceUID, other.SeriesInstanceUID = generate_uid(), generate_uid()
    return other


def test_a_note_rejecting_another_image_under_the_uid_leaves_this_one(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The PACS rejects another patient's image that has our image's SOP Instance UID, in
    another study: the note is recorded, our image's results stand, no note of ours
    withdraws them, and the administrator is told (found in review: the image was
    marked rejected and its SR and SC withdrawn, filed under its patient). The note
    naming it in its own study still rejects it."""
    image_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    image = image_of(runtime, image_id)
    other = under_its_uid_elsewhere(image)

    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(other)))

    assert applied.delivery_ids == ()
    assert applied.reason is not None
    assert "1 instance(s) rejected, 0 of them received here; 1 received here in another study" in (
        applied.reason
    )
    state, reason = state_of(runtime, image_id)
    assert state is InstanceState.ASSESSED
    assert reason is not None and queries.REJECTED_IN_ANOTHER_STUDY in reason
    assert [(kind, state) for kind, state, _ in deliveries_of(runtime, image_id)] == [
        (ObjectKind.SR, DeliveryState.DELIVERED),
        (ObjectKind.SC, DeliveryState.DELIVERED),
    ]
    with session_scope(runtime.database_url) as session:
        assert f"instance {image_id}" in [p["what"] for p in queries.recent_problems(session)]
        assert session.scalars(select(Rejection.study_instance_uid)).all() == [
            other.StudyInstanceUID
        ]

    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert len(applied.delivery_ids) == 2  # notes of ours withdrawing the SR and SC
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED


def moved_by_the_pacs(image: Dataset, *, series_instance_uid: str | None = None) -> Dataset:
    """``image`` in a study of its own, as the PACS holds it once it moved the image there
    (its series and SOP Instance UIDs kept), without sending it to us again; in
    ``series_instance_uid`` where given."""
    moved = copy.deepcopy(image)
    moved.StudyInstanceUID = generate_uid()
    if series_instance_uid is not None:
        moved.SeriesInstanceUID = series_instance_uid
    return moved


def test_a_note_naming_the_image_in_its_series_in_another_study_rejects_it(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The PACS moves the study, our SR and SC with it, and a radiologist rejects the
    image there: the note names its series and SOP Instance UIDs in a study our image was
    never received in, and none of our objects went to. The image is rejected and notes
    of ours withdraw its SR and SC (found in review: they stood, the reason saying
    another image under its UID was rejected)."""
    image_id = spool_instance(runtime)
    sent = deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    ours = {str(dcmread(p).SOPInstanceUID) for p in sent}
    moved = moved_by_the_pacs(image_of(runtime, image_id))

    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(moved)))

    assert applied.reason is not None
    assert "1 instance(s) rejected, 1 of them received here; 2 rejection note(s)" in (
        applied.reason
    )
    assert state_of(runtime, image_id) == (
        InstanceState.REJECTED,
        "rejected by the PACS: Incorrect Modality Worklist Entry",
    )
    withdrawn = [
        read_rejection_note(dcmread(p)) for p in deliver(runtime, storescp, applied.delivery_ids)
    ]
    assert {r.sop_instance_uid for w in withdrawn if w is not None for r in w.references} == ours


def test_a_note_naming_the_uid_in_another_study_and_series_leaves_the_image(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The same patient and SOP Instance UID, in another study and another series:
    another image under the UID (a modality that reuses UIDs); our image's results
    stand."""
    image_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    other = moved_by_the_pacs(image_of(runtime, image_id), series_instance_uid=generate_uid())

    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(other)))

    assert applied.delivery_ids == ()
    state, reason = state_of(runtime, image_id)
    assert state is InstanceState.ASSESSED
    assert reason is not None and queries.REJECTED_IN_ANOTHER_STUDY in reason
    assert [(kind, state) for kind, state, _ in deliveries_of(runtime, image_id)] == [
        (ObjectKind.SR, DeliveryState.DELIVERED),
        (ObjectKind.SC, DeliveryState.DELIVERED),
    ]


def test_an_image_received_after_a_note_of_another_study_is_assessed(runtime: Runtime) -> None:
    """The note first, rejecting another image under the UID in another study; our
    image, received after it, is assessed, and the administrator told (found in review:
    it was never assessed). A note naming it in its own study still rejects it."""
    image_id = spool_instance(runtime)
    image = another_image(image_of(runtime, image_id))
    assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(under_its_uid_elsewhere(image)))
    )

    later = spool_dataset(runtime, image)
    outcome = assess_instance(runtime, later)

    assert outcome.state == "assessed"
    state, reason = state_of(runtime, later)
    assert state is InstanceState.ASSESSED
    assert reason is not None and queries.REJECTED_IN_ANOTHER_STUDY in reason
    with session_scope(runtime.database_url) as session:
        assert f"instance {later}" in [p["what"] for p in queries.recent_problems(session)]

    assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert state_of(runtime, later)[0] is InstanceState.REJECTED


def test_a_note_of_another_study_is_said_once_and_before_a_uid_clash() -> None:
    """The clash stays last, where taking it back cuts it (``_without_uid_clash``), and
    what the note said stays; said twice, it is said once."""
    clash = f"{queries.UID_CLASH} (other pixels, in another study): its results stand"
    said = pipeline.said_rejected_elsewhere(f"a note; {clash}")
    assert said.startswith(f"a note; {queries.REJECTED_IN_ANOTHER_STUDY}")
    assert said.endswith(clash)
    assert pipeline.said_rejected_elsewhere(said) == said
    kept = pipeline._without_uid_clash(said)
    assert kept is not None and queries.REJECTED_IN_ANOTHER_STUDY in kept
    assert pipeline.said_rejected_elsewhere(None).startswith(queries.REJECTED_IN_ANOTHER_STUDY)


def test_a_note_applied_while_the_image_is_assessed_wins(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The note is applied after the attempt at the image began and before it commits:
    the commit finds it, records nothing and removes what it staged."""
    image_id = spool_instance(runtime)
    note = pacs_rejection_note(image_of(runtime, image_id))
    build = pipeline.build_outputs

    def note_arrives(*args: Any, **kwargs: Any) -> Any:
        assess_instance(runtime, spool_dataset(runtime, note))
        return build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_outputs", note_arrives)
    outcome = assess_instance(runtime, image_id)

    assert outcome.state == "rejected"
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED
    with session_scope(runtime.database_url) as session:
        assert session.scalars(select(Result)).all() == []
        assert session.scalars(select(Delivery)).all() == []
    assert list(runtime.settings.outbox_dir.glob("*")) == []


def test_a_note_that_rejects_our_own_objects_stops_their_sending(runtime: Runtime) -> None:
    """A radiologist who rejects our SR at the PACS: where it has not gone yet, it
    does not go; the image and its result stand."""
    image_id = spool_instance(runtime)
    assess_instance(runtime, image_id)
    [(_, _, sr_uid), (_, _, sc_uid)] = deliveries_of(runtime, image_id)
    image = image_of(runtime, image_id)
    sr = Reference(str(image.StudyInstanceUID), generate_uid(), ComprehensiveSRStorage, sr_uid)
    note = build_rejection_note(
        image,
        QUALITY,
        [sr],
        description="Rejected at the PACS",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=999,
    )
    applied = assess_instance(runtime, spool_dataset(runtime, note))
    assert applied.delivery_ids == ()
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED
    assert deliveries_of(runtime, image_id) == [
        (ObjectKind.SR, DeliveryState.SUPERSEDED, sr_uid),
        (ObjectKind.SC, DeliveryState.PENDING, sc_uid),
    ]


def test_the_same_rejection_again_changes_nothing(runtime: Runtime, storescp: StoreSCP) -> None:
    """A second note naming the same image (the PACS sends it again, or another
    system does) makes no second note of ours."""
    image_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    image = image_of(runtime, image_id)
    first = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert len(first.delivery_ids) == 2  # SR and SC
    second = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image, QUALITY)))
    assert second.delivery_ids == ()
    assert state_of(runtime, image_id)[1] == (
        "rejected by the PACS: Incorrect Modality Worklist Entry"
    )


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        (("113000", "DCM", "Of Interest"), "a key object selection, not a rejection note"),
        (("113001", "99LOCAL", "Rejected"), "a key object selection, not a rejection note"),
    ],
    ids=["of-interest", "local-scheme"],
)
def test_other_key_object_selections_change_nothing(
    runtime: Runtime, title: tuple[str, str, str], reason: str
) -> None:
    image_id = spool_instance(runtime)
    assessed = assess_instance(runtime, image_id)
    note = pacs_rejection_note(image_of(runtime, image_id))
    code = note.ConceptNameCodeSequence[0]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = title
    outcome = assess_instance(runtime, spool_dataset(runtime, note))
    assert (outcome.state, outcome.reason) == ("not_assessed", reason)
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED
    assert [state for _, state, _ in deliveries_of(runtime, image_id)] == [
        DeliveryState.PENDING
    ] * len(assessed.delivery_ids)


def test_a_rejection_note_that_cannot_be_read_changes_nothing(runtime: Runtime) -> None:
    image_id = spool_instance(runtime)
    assess_instance(runtime, image_id)
    note = pacs_rejection_note(image_of(runtime, image_id))
    del note.CurrentRequestedProcedureEvidenceSequence
    outcome = assess_instance(runtime, spool_dataset(runtime, note))
    assert outcome.state == "not_assessed"
    assert outcome.reason is not None
    assert outcome.reason.startswith(
        "a key object selection that cannot be read as a rejection note: "
    )
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED


def _assessed_and_delivered(runtime: Runtime, storescp: StoreSCP) -> tuple[int, list[Dataset]]:
    """A hand assessed, its SR and SC delivered to the storescp: its id, and what the
    storescp received."""
    image_id = spool_instance(runtime)
    delivered = deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    return image_id, [dcmread(p) for p in delivered]


def test_an_image_moved_to_another_patient_then_rejected_is_withdrawn_in_both(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The image was filed under another patient, in another study, and assessed there
    again: our SR and SC in the first study are withdrawn there by notes of ours
    (113038) filed as they were, under the first patient and study, not the copy's
    (found in review: they carried the new patient's ID into the old study); rejected
    after that, it has its objects in the second study withdrawn, with that study's
    values (each note delivered passes dciodvfy)."""
    image_id, first = _assessed_and_delivered(runtime, storescp)
    received_again(
        runtime,
        image_id,
        StudyInstanceUID=generate_uid(),
        AccessionNumber="A2",
        PatientID="OTHER-9",
        PatientName="OTHER^PATIENT",
    )
    moved = deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    in_first = [n for n in map(dcmread, moved) if n.Modality == "KO"]
    assert len(in_first) == 2  # the first SR and SC
    for note in in_first:
        for keyword in FILED_BY:
            assert note.get(keyword) == first[0].get(keyword), keyword
        assert note.ContentSequence[0].TextValue == pipeline.MOVED_AWAY

    image = image_of(runtime, image_id)
    applied = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert len(applied.delivery_ids) == 2  # the second SR and SC; the first are withdrawn
    in_second = [dcmread(p) for p in deliver(runtime, storescp, applied.delivery_ids)]
    for note in in_second:
        assert note.StudyInstanceUID == image.StudyInstanceUID
        assert (note.PatientID, note.AccessionNumber) == ("OTHER-9", "A2")


def test_a_moved_image_rejected_before_its_copy_is_assessed_is_withdrawn_where_it_was(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Moved at the PACS to another study and series, under another patient, and sent
    again; rejected there before its copy was compared. The note names a study where
    nothing of ours is, and a series the image was never in here: it may be another
    image's under the UID, and is left. The copy's attempt then reads the copy, in that
    study, and finds it rejected: it ended the image rejected and withdrew nothing, and
    the bone age stayed in the first study. Notes of ours withdraw it there, filed as
    the SR and SC were."""
    image_id, first = _assessed_and_delivered(runtime, storescp)
    received_again(
        runtime,
        image_id,
        StudyInstanceUID=generate_uid(),
        SeriesInstanceUID=generate_uid(),
        PatientID="OTHER-9",
        PatientName="OTHER^PATIENT",
    )
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, image_id)))
    )
    assert applied.delivery_ids == ()
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED  # not known yet

    again = assess_instance(runtime, image_id)  # the copy's message
    assert again.state == "rejected", again
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED
    notes = [dcmread(p) for p in deliver(runtime, storescp, again.delivery_ids)]
    assert sorted(n.Modality for n in notes) == ["KO", "KO"]  # the first SR and SC
    withdrawn = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for note in notes
        for item in note.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    assert withdrawn == {str(ds.SOPInstanceUID) for ds in first}
    for note in notes:
        for keyword in FILED_BY:
            assert note.get(keyword) == first[0].get(keyword), keyword
    assert assess_instance(runtime, image_id).delivery_ids == ()  # once


def test_an_image_moved_and_no_longer_assessable_is_withdrawn_where_it_was(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Moved to another study with a body part we do not assess: the SR saying so goes
    to the new study, and notes of ours withdraw the first SR and SC in the old one."""
    image_id = spool_instance(runtime)
    first = deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    first_study = str(image_of(runtime, image_id).StudyInstanceUID)
    received_again(
        runtime,
        image_id,
        StudyInstanceUID=generate_uid(),
        BodyPartExamined="CHEST",
        StudyDescription="CHEST PA",
    )
    outcome = assess_instance(runtime, image_id)
    assert outcome.state == "not_assessed"
    sent = [dcmread(p) for p in deliver(runtime, storescp, outcome.delivery_ids)]
    assert sorted((ds.Modality, ds.StudyInstanceUID == first_study) for ds in sent) == [
        ("KO", True),
        ("KO", True),
        ("SR", False),
    ]
    named = {
        r.sop_instance_uid
        for ds in sent
        if ds.Modality == "KO"
        for r in (read_rejection_note(ds) or pytest.fail("not a rejection note")).references
    }
    assert named == {str(dcmread(p).SOPInstanceUID) for p in first}


def test_a_moved_image_whose_report_never_went_has_its_heat_map_withdrawn(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Only the SC went (the PACS refused the SR), then the image came in another study
    with a body part we do not assess, and the site sends no not-assessed SRs: no SR
    goes, but the heat map left in the first study is withdrawn (found in review: it
    stayed, its bone age on it)."""
    assert not runtime.settings.send_not_assessed
    image_id = spool_instance(runtime)
    sr_id, sc_id = assess_instance(runtime, image_id).delivery_ids
    [sc] = deliver(runtime, storescp, (sc_id,))
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery).where(Delivery.id == sr_id).values(state=DeliveryState.FAILED)
        )
    received_again(runtime, image_id, StudyInstanceUID=generate_uid(), BodyPartExamined="CHEST")
    outcome = assess_instance(runtime, image_id)
    assert outcome.state == "not_assessed"
    [note] = [dcmread(p) for p in deliver(runtime, storescp, outcome.delivery_ids)]
    withdrawn = read_rejection_note(note)
    assert withdrawn is not None
    assert [r.sop_instance_uid for r in withdrawn.references] == [dcmread(sc).SOPInstanceUID]


@dataclass(frozen=True)
class TwoDestinations:
    """A node sending to the same storescp under two names, ``here`` and ``there``, and
    an image it assessed whose SC reached both and whose SR reached ``here`` only (its
    delivery to ``there``, ``sr_there``, failed)."""

    rt: Runtime
    here: str
    there: str
    image_id: int
    sr_there: int


def sent_to_two_destinations(
    runtime: Runtime,
    storescp: StoreSCP,
    tmp_path: Path,
    tiny_checkpoint: Path,
    attributes: dict[str, Any] | None = None,
) -> TwoDestinations:
    """A node on the database of ``runtime``, and an image it assessed (``attributes`` set
    on it as `spool_instance` sets them), whose SC reached both destinations and whose SR
    reached ``here`` only."""
    here, there = storescp.destination, storescp.destination.replace("127.0.0.1", "localhost")
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=f"{here},{there}", database_url=runtime.database_url
    )
    image_id = spool_instance(rt, attributes=attributes)
    assessed = assess_instance(rt, image_id)
    with session_scope(rt.database_url) as session:
        rows = list(session.scalars(select(Delivery).where(Delivery.id.in_(assessed.delivery_ids))))
        for row in rows:
            reached = row.kind is ObjectKind.SC or row.destination == here
            row.state = DeliveryState.DELIVERED if reached else DeliveryState.FAILED
        sr_there = next(row.id for row in rows if row.state is DeliveryState.FAILED)
    return TwoDestinations(rt, here, there, image_id, sr_there)


@pytest.fixture
def two_destinations(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path, tiny_checkpoint: Path
) -> TwoDestinations:
    return sent_to_two_destinations(runtime, storescp, tmp_path, tiny_checkpoint)


def test_notes_for_a_moved_image_go_where_each_object_went(
    two_destinations: TwoDestinations, storescp: StoreSCP, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Two destinations: the SR went to one, the SC to both; then the site renamed the
    first. Each note goes where its object went, under the name it went by (found in
    review: to the destinations configured now only, so a renamed one got none)."""
    here, there, image_id = two_destinations.here, two_destinations.there, two_destinations.image_id
    renamed = make_runtime(
        tmp_path,
        tiny_checkpoint,
        destinations=storescp.destination.replace("127.0.0.1", "127.0.0.2"),
        database_url=two_destinations.rt.database_url,
    )
    received_again(renamed, image_id, StudyInstanceUID=generate_uid())
    outcome = assess_instance(renamed, image_id)
    with session_scope(renamed.database_url) as session:
        notes = {
            (d.destination, d.sop_instance_uid)
            for d in session.scalars(
                select(Delivery).where(
                    Delivery.id.in_(outcome.delivery_ids), Delivery.kind == ObjectKind.KO
                )
            )
        }
        sr, sc = (
            session.scalar(
                select(Delivery.sop_instance_uid).where(
                    Delivery.instance_id == image_id, Delivery.kind == kind
                )
            )
            for kind in (ObjectKind.SR, ObjectKind.SC)
        )
    assert sr is not None and sc is not None
    assert notes == {
        (here, pipeline.withdrawal_uid(sr)),
        (here, pipeline.withdrawal_uid(sc)),
        (there, pipeline.withdrawal_uid(sc)),
    }


def test_a_note_made_already_is_sent_as_it_is_to_a_destination_it_had_not_gone_to(
    two_destinations: TwoDestinations,
) -> None:
    """Our note for the SR, made when the image moved, went to the one destination the
    SR had reached; the SR reached the other later (retry-deliveries); then the PACS
    rejects the image. The note goes to the other too, the same file: made again, it
    would have replaced the file the first delivery still has to send (its SHA-256)."""
    both, here, there = two_destinations.rt, two_destinations.here, two_destinations.there
    image_id, late = two_destinations.image_id, two_destinations.sr_there
    received_again(both, image_id, StudyInstanceUID=generate_uid())
    moved = assess_instance(both, image_id)
    with session_scope(both.database_url) as session:
        session.get_one(Delivery, late).state = DeliveryState.DELIVERED
        sr_note = session.scalars(
            select(Delivery).where(
                Delivery.id.in_(moved.delivery_ids),
                Delivery.kind == ObjectKind.KO,
                Delivery.destination == here,
                Delivery.sop_instance_uid
                == pipeline.withdrawal_uid(session.get_one(Delivery, late).sop_instance_uid),
            )
        ).one()
        path, digest = Path(sr_note.path), sr_note.sha256

    applied = assess_instance(
        both, spool_dataset(both, pacs_rejection_note(image_of(both, image_id)))
    )
    with session_scope(both.database_url) as session:
        added = session.scalars(select(Delivery).where(Delivery.id.in_(applied.delivery_ids)))
        assert [(d.kind, d.destination, Path(d.path), d.sha256) for d in added] == [
            (ObjectKind.KO, there, path, digest)
        ]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    with session_scope(both.database_url) as session:
        notes = list(session.scalars(select(Delivery.id).where(Delivery.kind == ObjectKind.KO)))
    assert len(notes) == 4  # the SR's to both, the SC's to both
    assert {o.state for o in send_deliveries(both, notes).values()} == {"delivered"}


def test_a_moved_image_whose_objects_retention_removed_says_they_stand(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """A note repeats the patient and study its object was filed under, read from the
    object's own file: where retention removed the SR's, no note can say them, and the
    instance's reason says what to withdraw by hand; the SC's note goes."""
    image_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    with session_scope(runtime.database_url) as session:
        sr = session.scalars(select(Delivery).where(Delivery.kind == ObjectKind.SR)).one()
        Path(sr.path).unlink()
    received_again(runtime, image_id, StudyInstanceUID=generate_uid())
    outcome = assess_instance(runtime, image_id)
    assert outcome.state == "assessed"
    state, reason = state_of(runtime, image_id)
    assert state is InstanceState.ASSESSED
    assert reason is not None
    assert reason.endswith(
        "our rejection notes for 1 object(s) of ours could not be made (1 whose file "
        "retention removed): withdraw them at the PACS by hand"
    )
    with session_scope(runtime.database_url) as session:  # `status` lists it
        assert [p["what"] for p in queries.recent_problems(session)] == [f"instance {image_id}"]
    notes = [
        read_rejection_note(dcmread(p))
        for p in deliver(runtime, storescp, outcome.delivery_ids)
        if dcmread(p).Modality == "KO"
    ]
    assert len(notes) == 1


def test_reprocess_leaves_an_image_whose_copy_is_still_to_be_compared(
    runtime: Runtime,
) -> None:
    """The copy in another study waits for its own message, which opens the next
    assessment and withdraws what is left in the first study (found in review: a
    reprocess assessed the copy as the first assessment again and forgot it)."""
    image_id = spool_instance(runtime)
    assess_instance(runtime, image_id)
    received_again(runtime, image_id, StudyInstanceUID=generate_uid())
    assert prepare_reprocess(runtime, [image_id]) == []
    assert not_finished(runtime, [image_id]) == [image_id]
    assert assess_instance(runtime, image_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, image_id).assessment == 2


def test_a_second_attempt_at_a_rejected_image_leaves_its_withdrawal_to_the_note(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two attempts at one image (the study sent twice): the first commits its SR and
    SC, the note's rejections are committed, then the second reaches its commit before
    the note withdraws the image. The second records nothing and leaves the image to
    the note, which supersedes the first attempt's objects (found in review: the second
    marked the image rejected, and the note, taking it for withdrawn, let them go)."""
    image_id = spool_instance(runtime)
    image = image_of(runtime, image_id)
    note_ds = pacs_rejection_note(image)
    build = pipeline.build_outputs
    first: list[pipeline.AssessOutcome] = []

    def first_attempt_then_the_notes_rejections(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(pipeline, "build_outputs", build)
        first.append(assess_instance(runtime, image_id))
        with session_scope(runtime.database_url) as session:
            session.add(
                Rejection(
                    sop_instance_uid=str(image.SOPInstanceUID),
                    code=WRONG_PATIENT,
                    note_sop_instance_uid=str(note_ds.SOPInstanceUID),
                )
            )
        return build(*args, **kwargs)

    # the attempt claimed first is still at its outputs when the other claims and commits
    monkeypatch.setattr(pipeline, "build_outputs", first_attempt_then_the_notes_rejections)
    monkeypatch.setattr(pipeline, "_assessed_by_this_model", lambda rt, claim: None)
    second = assess_instance(runtime, image_id)

    assert [o.state for o in first] == ["assessed"]
    assert second.state == "rejected"
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED  # for the note to take
    assess_instance(runtime, spool_dataset(runtime, note_ds))
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED
    assert [(kind, state) for kind, state, _ in deliveries_of(runtime, image_id)] == [
        (ObjectKind.SR, DeliveryState.SUPERSEDED),
        (ObjectKind.SC, DeliveryState.SUPERSEDED),
    ]


def test_retry_deliveries_beside_a_rejection_leaves_the_superseded_unsent(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP, postgres_url: str
) -> None:
    """PostgreSQL, truly at once: the note has superseded the failed SR and SC of the
    image, its transaction still open, when `retry-deliveries` runs. Once it commits,
    they stay superseded (found in review: a read then a write set them back to
    pending, and they went)."""
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, database_url=postgres_url
    )
    image_id = spool_instance(rt)
    assess_instance(rt, image_id)
    with session_scope(rt.database_url) as session:
        session.execute(update(Delivery).values(state=DeliveryState.FAILED))
    reset: list[list[int]] = []
    with get_engine(rt.database_url).connect() as note:
        with note.begin():
            note.execute(update(Delivery).values(state=DeliveryState.SUPERSEDED))
            retry = threading.Thread(target=lambda: reset.append(reset_failed(rt)))
            retry.start()
            wait_for(
                lambda: sessions_waiting_on_a_lock(postgres_url) >= 1,
                timeout=60,
                what="retry-deliveries waiting on the note's rows",
            )
        retry.join(60)
    assert reset == [[]]
    assert {state for _, state, _ in deliveries_of(rt, image_id)} == {DeliveryState.SUPERSEDED}


def test_a_note_that_cannot_be_made_still_rejects_the_image(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our note refused for a value of the image's (the same on every try): the image
    is rejected all the same, what was not sent of it superseded, and its reason says
    that what was sent must be withdrawn at the PACS by hand; the next image of the
    note is withdrawn as usual."""
    image_id = spool_instance(runtime)
    sr_id, _ = assess_instance(runtime, image_id).delivery_ids
    deliver(runtime, storescp, (sr_id,))
    image = image_of(runtime, image_id)
    other = another_image(image)
    other_id = spool_dataset(runtime, other)
    deliver(runtime, storescp, assess_instance(runtime, other_id).delivery_ids)
    build = pipeline.build_rejection_note

    def refusing_the_first(*args: Any, **kwargs: Any) -> Any:
        if not refused:  # the image's SR: the images are withdrawn in the order of their ids
            refused.append(1)
            raise ValueError("a value the note refuses")
        return build(*args, **kwargs)

    refused: list[int] = []
    monkeypatch.setattr(pipeline, "build_rejection_note", refusing_the_first)
    also = reference_of(other)
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image, also=(also,)))
    )

    state, reason = state_of(runtime, image_id)
    assert state is InstanceState.REJECTED
    assert reason is not None
    assert reason.startswith(
        "rejected by the PACS: Incorrect Modality Worklist Entry; our rejection notes for 1 "
        "object(s) of ours could not be made (one that failed (ValueError in "
    )
    assert reason.endswith("): withdraw them at the PACS by hand")
    assert [(kind, state) for kind, state, _ in deliveries_of(runtime, image_id)] == [
        (ObjectKind.SR, DeliveryState.DELIVERED),
        (ObjectKind.SC, DeliveryState.SUPERSEDED),
    ]
    assert state_of(runtime, other_id)[0] is InstanceState.REJECTED
    assert len(applied.delivery_ids) == 2  # the other image's SR and SC


def test_an_expired_retention_rejects_but_sends_no_note_of_ours(runtime: Runtime) -> None:
    """113039: the PACS removes the whole study, ours with it; a note of ours would
    only be refused by a PACS that allows it for expired studies alone."""
    image_id = spool_instance(runtime)
    assess_instance(runtime, image_id)
    with session_scope(runtime.database_url) as session:
        session.execute(update(Delivery).values(state=DeliveryState.DELIVERED))
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image_of(runtime, image_id), "113039"))
    )
    assert applied.delivery_ids == ()
    assert state_of(runtime, image_id) == (
        InstanceState.REJECTED,
        "rejected by the PACS: Data Retention Policy Expired",
    )


def test_a_note_received_again_naming_more_is_applied_again(runtime: Runtime) -> None:
    """The same note (its UIDs) received again, naming one more image: that one is
    rejected too; what the first application did stays as it was."""
    image_id = spool_instance(runtime)
    image = image_of(runtime, image_id)
    note = pacs_rejection_note(image)
    note_id = spool_dataset(runtime, note)
    assess_instance(runtime, note_id)
    other_id = spool_dataset(runtime, another_image(image))

    other = image_of(runtime, other_id)
    grown = pacs_rejection_note(
        image,
        also=(reference_of(other),),
    )
    # the same note, as sent again: its own UIDs, and nothing else of its header changed
    grown.SOPInstanceUID = grown.file_meta.MediaStorageSOPInstanceUID = note.SOPInstanceUID
    grown.SeriesInstanceUID = note.SeriesInstanceUID
    assert pipeline.assessment_inputs(grown, gate.check(grown)) == pipeline.assessment_inputs(
        note, gate.check(note)
    )
    assert spool_dataset(runtime, grown) == note_id  # recorded as received again
    assert assess_instance(runtime, note_id).state == "not_assessed"
    assert state_of(runtime, other_id)[0] is InstanceState.REJECTED
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED


def test_a_note_naming_twenty_thousand_instances_is_applied(runtime: Runtime) -> None:
    """A whole CT study rejected: more UIDs than one PostgreSQL statement may bind
    (found in review: the note failed on every try, and nothing was rejected)."""
    image_id = spool_instance(runtime)
    image = image_of(runtime, image_id)
    series = generate_uid()
    others = tuple(
        Reference(str(image.StudyInstanceUID), series, CTImageStorage, f"2.25.{n}")
        for n in range(1, 20_000)
    )
    applied = assess_instance(
        runtime, spool_dataset(runtime, pacs_rejection_note(image, also=others))
    )
    assert applied.reason is not None
    assert "20000 instance(s) rejected, 1 of them received here" in applied.reason
    assert state_of(runtime, image_id)[0] is InstanceState.REJECTED
    with session_scope(runtime.database_url) as session:
        assert session.scalar(select(func.count()).select_from(Rejection)) == 20_000
