"""IHE IOCM rejection notes from the PACS: an image it rejected is never assessed, or
has the bone age it was given withdrawn by a rejection note of ours that names our SR
and SC, sent where they went; nothing of it not yet sent is sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select, update

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind, Result
from dicom_io.ko import Reference, build_rejection_note, read_rejection_note
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_received_again import deliver, received_again
from worker import pipeline
from worker.pipeline import assess_instance
from worker.reprocess import prepare_reprocess, rejected_by_the_pacs
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

QUALITY = "113001"
WRONG_PATIENT = "113038"


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    """A node sending to the storescp, on SQLite and on a real PostgreSQL."""
    database: dict[str, Any] = {}
    if request.param == "postgresql":
        database["database_url"] = request.getfixturevalue("postgres_url")
    return make_runtime(tmp_path, tiny_checkpoint, destinations=storescp.destination, **database)


def image_of(rt: Runtime, instance_id: int) -> Dataset:
    with session_scope(rt.database_url) as session:
        return dcmread(session.get_one(Instance, instance_id).spool_path)


def another_image(image: Dataset) -> Dataset:
    """``image`` under a SOP Instance UID of its own (not spooled)."""
    other = dcmread(image.filename)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return other


def rejection_note(
    image: Dataset, code: str = WRONG_PATIENT, *, also: tuple[Reference, ...] = ()
) -> Dataset:
    """The PACS's rejection note for ``image`` (and ``also``), as it would send it."""
    rejected = Reference(
        str(image.StudyInstanceUID),
        str(image.SeriesInstanceUID),
        str(image.SOPClassUID),
        str(image.SOPInstanceUID),
    )
    return build_rejection_note(
        image,
        code,
        [rejected, *also],
        description="Rejected at the PACS",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=999,
        manufacturer_model_name="PACS",
    )


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

    note_id = spool_dataset(runtime, rejection_note(image))
    applied = assess_instance(runtime, note_id)

    assert applied.state == "not_assessed"
    assert applied.reason is not None
    assert applied.reason.startswith("a key object selection, rejection note")
    assert state_of(runtime, image_id) == (
        InstanceState.REJECTED,
        "rejected by the PACS: Incorrect Modality Worklist Entry",
    )
    assert len(applied.delivery_ids) == 1  # one study, one destination
    [received] = deliver(runtime, storescp, applied.delivery_ids)  # dciodvfy-clean
    ours_note = dcmread(received)
    withdrawn = read_rejection_note(ours_note)
    assert withdrawn is not None
    assert withdrawn.code == WRONG_PATIENT  # the PACS's reason, for what we derived
    assert {
        (r.study_instance_uid, r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
        for r in withdrawn.references
    } == {
        (str(o.StudyInstanceUID), str(o.SeriesInstanceUID), str(o.SOPClassUID), uid)
        for uid, o in ours.items()
    }
    assert {r.sop_class_uid for r in withdrawn.references} == {
        ComprehensiveSRStorage,
        SecondaryCaptureImageStorage,
    }
    # filed with the image: its patient and study
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
        assert ours_note.get(keyword) == image.get(keyword), keyword
    assert ours_note.Manufacturer == "boneage-worker"
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
    assess_instance(runtime, spool_dataset(runtime, rejection_note(image_of(runtime, image_id))))

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
        runtime, spool_dataset(runtime, rejection_note(image_of(runtime, image_id)))
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
            update(Delivery).where(Delivery.id == sr_id).values(sending_since=pipeline.now())
        )
    applied = assess_instance(
        runtime, spool_dataset(runtime, rejection_note(image_of(runtime, other_id), QUALITY))
    )
    assert len(applied.delivery_ids) == 1
    with session_scope(runtime.database_url) as session:
        ko = session.get_one(Delivery, applied.delivery_ids[0])
        sr = session.get_one(Delivery, sr_id)
        note = read_rejection_note(dcmread(ko.path))
    assert note is not None
    assert note.code == QUALITY
    assert [r.sop_instance_uid for r in note.references] == [sr.sop_instance_uid]


def test_an_image_rejected_before_it_is_assessed_never_is(runtime: Runtime) -> None:
    """Rejected while queued, or before it arrived: no result, nothing to send."""
    queued_id = spool_instance(runtime)
    assess_instance(runtime, spool_dataset(runtime, rejection_note(image_of(runtime, queued_id))))
    assert state_of(runtime, queued_id)[0] is InstanceState.REJECTED
    assert assess_instance(runtime, queued_id).state == "skipped"

    # the note first, the image after it
    image = another_image(image_of(runtime, queued_id))
    assess_instance(runtime, spool_dataset(runtime, rejection_note(image, QUALITY)))
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


def test_a_note_applied_while_the_image_is_assessed_wins(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The note is applied after the attempt at the image began and before it commits:
    the commit finds it, records nothing and removes what it staged."""
    image_id = spool_instance(runtime)
    note = rejection_note(image_of(runtime, image_id))
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
    first = assess_instance(runtime, spool_dataset(runtime, rejection_note(image)))
    assert len(first.delivery_ids) == 1
    second = assess_instance(runtime, spool_dataset(runtime, rejection_note(image, QUALITY)))
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
    note = rejection_note(image_of(runtime, image_id))
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
    note = rejection_note(image_of(runtime, image_id))
    del note.CurrentRequestedProcedureEvidenceSequence
    outcome = assess_instance(runtime, spool_dataset(runtime, note))
    assert outcome.state == "not_assessed"
    assert outcome.reason is not None
    assert outcome.reason.startswith(
        "a key object selection that cannot be read as a rejection note: "
    )
    assert state_of(runtime, image_id)[0] is InstanceState.ASSESSED


def test_our_note_passes_dciodvfy_in_a_study_the_image_left(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The image was moved to another study, assessed there again, then rejected: our
    note for the first study's objects carries only the patient's attributes of the
    note, not the other study's date or accession number (each note delivered passes
    dciodvfy)."""
    image_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)
    first_study = str(image_of(runtime, image_id).StudyInstanceUID)
    received_again(runtime, image_id, StudyInstanceUID=generate_uid(), AccessionNumber="A2")
    deliver(runtime, storescp, assess_instance(runtime, image_id).delivery_ids)

    applied = assess_instance(
        runtime, spool_dataset(runtime, rejection_note(image_of(runtime, image_id)))
    )
    assert len(applied.delivery_ids) == 2  # one per study
    notes = [dcmread(p) for p in deliver(runtime, storescp, applied.delivery_ids)]
    in_first = [n for n in notes if n.StudyInstanceUID == first_study]
    assert len(in_first) == 1
    assert in_first[0].AccessionNumber == ""
    assert in_first[0].PatientID == image_of(runtime, image_id).PatientID
