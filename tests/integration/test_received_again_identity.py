"""A copy received again under another patient (the PACS corrected the Patient ID), and
another image received under an image's SOP Instance UID (a modality that reuses UIDs).

The first is assessed again, so that what goes to the PACS is filed under the corrected
patient and what went under the other is withdrawn there; the second is refused, and the
first image's results stand.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from db import queries
from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from dicom_io.ko import read_rejection_note
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_instance
from tests.integration.test_received_again import (
    bytes_received_again,
    deliver,
    received_again,
    replaced,
    report_of,
    results,
    stored_pixels,
    where,
)
from worker import pipeline
from worker.delivery import send_deliveries
from worker.pipeline import (
    MOVED_TITLE,
    PATIENT_IDENTITY,
    REFILED,
    WITHDRAW_BY_HAND,
    assess_instance,
    identity_digest,
)
from worker.reprocess import prepare_reprocess, uid_clashes
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

PATIENT_B: dict[str, Any] = {"PatientID": "B-0002", "PatientName": "WRONG^PATIENT"}
PATIENT_A: dict[str, Any] = {"PatientID": "A-0001", "PatientName": "RIGHT^PATIENT"}


#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def deliveries(rt: Runtime, instance_id: int) -> list[Delivery]:
    with session_scope(rt.database_url) as session:
        rows = list(
            session.scalars(
                select(Delivery).where(Delivery.instance_id == instance_id).order_by(Delivery.id)
            )
        )
        session.expunge_all()
        return rows


def instance_row(rt: Runtime, instance_id: int) -> Instance:
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        session.expunge(instance)
        return instance


# -- the patient corrected -----------------------------------------------------------


def test_what_waited_for_the_pacs_goes_under_the_corrected_patient(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The image came under patient B and was assessed while the PACS was away; the PACS
    corrects the patient to A and forwards the image again, with the same UIDs, birth
    date and sex. When the PACS is back, no SR or SC of ours reaches it under B."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = assess_instance(runtime, instance_id)
    assert first.state == "assessed" and len(first.delivery_ids) == 2
    storescp.stop()
    outcomes = send_deliveries(runtime, list(first.delivery_ids))
    assert {o.state for o in outcomes.values()} == {"retry"}, outcomes

    received_again(runtime, instance_id, **PATIENT_A)
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2
    assert {d.state for d in deliveries(runtime, instance_id) if d.assessment == 1} == {
        DeliveryState.SUPERSEDED
    }

    storescp.start()
    outcomes = send_deliveries(runtime, [*first.delivery_ids, *second.delivery_ids])
    assert [outcomes[i].state for i in first.delivery_ids] == ["skipped", "skipped"]
    assert [outcomes[i].state for i in second.delivery_ids] == ["delivered", "delivered"]
    received = [dcmread(p) for p in storescp.wait_for_objects(2, timeout=30)]
    assert sorted(ds.Modality for ds in received) == ["OT", "SR"]
    assert {(str(ds.PatientID), str(ds.PatientName)) for ds in received} == {
        ("A-0001", "RIGHT^PATIENT")
    }
    # the PACS never had the first report: to it, this one is the first
    assert "PredecessorDocumentsSequence" not in report_of(storescp.received())
    assert results(runtime, instance_id) == [(1, False), (2, False)]
    assert instance_row(runtime, instance_id).identity_sha256 == identity_digest(
        dcmread(instance_row(runtime, instance_id).spool_path),
        instance_row(runtime, instance_id).sop_instance_uid,
    )


def test_what_the_pacs_has_under_the_wrong_patient_is_withdrawn_there(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Delivered under B before the correction: the new SR and SC go under A, and notes
    of ours (113038, Incorrect Modality Worklist Entry) withdraw the first SR and SC
    under B, where they were filed; sent once more as it is, nothing more is made."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = assess_instance(runtime, instance_id)
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    first_sr = report_of(first_objects)
    first_uids = sorted(where(dcmread(p)) for p in first_objects)

    received_again(runtime, instance_id, **PATIENT_A)
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 4
    second_paths = deliver(runtime, storescp, second.delivery_ids)  # dciodvfy: no error
    objects = [dcmread(p) for p in second_paths]
    notes = [ds for ds in objects if ds.Modality == "KO"]
    made = [ds for ds in objects if ds.Modality != "KO"]
    assert {str(ds.PatientID) for ds in made} == {"A-0001"}
    assert {str(ds.PatientID) for ds in notes} == {"B-0002"}  # where what they withdraw is
    withdrawn = [read_rejection_note(note) for note in notes]
    assert all(w is not None and w.code == MOVED_TITLE for w in withdrawn)
    assert (
        sorted(
            (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid)
            for w in withdrawn
            if w is not None
            for r in w.references
        )
        == first_uids
    )
    assert {str(note.ContentSequence[0].TextValue) for note in notes} == {REFILED}
    # the new report names the one it replaces, as for a corrected sex
    assert replaced(report_of(second_paths)) == [where(first_sr)]

    received_again(runtime, instance_id, **PATIENT_A)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert len(deliveries(runtime, instance_id)) == 6


def test_what_went_under_the_wrong_patient_with_its_file_gone_is_said_to_withdraw_by_hand(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Delivered under B, and retention removed our files of them, which say where they
    were filed: no note can be made, and the image's reason says to withdraw them at
    the PACS by hand (they were passed over without a word)."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = assess_instance(runtime, instance_id)
    deliver(runtime, storescp, first.delivery_ids)
    for delivery in deliveries(runtime, instance_id):
        Path(delivery.path).unlink()

    received_again(runtime, instance_id, **PATIENT_A)
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2  # SR and SC, no note
    reason = instance_row(runtime, instance_id).reason
    assert reason is not None
    assert "our rejection notes for 2 object(s) of ours could not be made" in reason
    assert WITHDRAW_BY_HAND in reason


def test_the_identity_digest_follows_the_patient_id(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime)
    ds = dcmread(instance_row(runtime, instance_id).spool_path)
    uid = str(ds.SOPInstanceUID)
    before = identity_digest(ds, uid)
    ds.PatientID = "OTHER-ID"
    assert PATIENT_IDENTITY == ("PatientID",)
    assert identity_digest(ds, uid) != before
    # salted: the same patient's digest differs from one image to the next
    assert identity_digest(ds, uid) != identity_digest(ds, generate_uid())


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientName", "OTHER^NAME"),
        ("IssuerOfPatientID", "HOSPITAL-B"),
        ("IssuerOfPatientIDQualifiersSequence", [Dataset()]),
        ("OtherPatientIDsSequence", [Dataset()]),
    ],
)
def test_what_a_pacs_reconciles_under_the_same_id_is_the_same_patient(
    runtime: Runtime, keyword: str, value: Any
) -> None:
    """A name's spelling corrected, an issuer or Other Patient IDs that a PACS adds when
    it forwards or moves the image: the same Patient ID is the same patient. A backfill
    from a PACS that adds them assesses nothing again and withdraws nothing."""
    instance_id = spool_instance(runtime)
    ds = dcmread(instance_row(runtime, instance_id).spool_path)
    uid = str(ds.SOPInstanceUID)
    before = identity_digest(ds, uid)
    setattr(ds, keyword, value)
    if keyword == "IssuerOfPatientIDQualifiersSequence":
        ds[keyword].value[0].UniversalEntityID = "1.2.3"
    if keyword == "OtherPatientIDsSequence":
        ds[keyword].value[0].PatientID = "OTHER-ID"
    assert identity_digest(ds, uid) == before


def test_the_identity_digest_leaves_out_how_the_same_name_is_written(runtime: Runtime) -> None:
    """Trailing empty name components and spaces, and an absent ID against an empty one
    (the SR writes both as empty), name the same patient."""
    instance_id = spool_instance(runtime, attributes={"PatientName": "DOE^JANE"})
    ds = dcmread(instance_row(runtime, instance_id).spool_path)
    uid = str(ds.SOPInstanceUID)
    before = identity_digest(ds, uid)
    ds.PatientName = "DOE^JANE^^^ "
    assert identity_digest(ds, uid) == before
    ds.PatientID = ""
    empty = identity_digest(ds, uid)
    del ds.PatientID
    assert identity_digest(ds, uid) == empty


def test_an_instance_finished_before_its_identity_was_recorded_compares_the_rest(
    runtime: Runtime,
) -> None:
    """Finished before revision 0013: nothing says which patient its assessment read, and
    a copy under another is left alone, as before; a corrected sex still counts."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        session.get_one(Instance, instance_id).identity_sha256 = None
    received_again(runtime, instance_id, **PATIENT_A)
    assert assess_instance(runtime, instance_id).state == "skipped"
    received_again(runtime, instance_id, PatientSex="M")
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert instance_row(runtime, instance_id).identity_sha256 is not None


# -- another image under the same SOP Instance UID ----------------------------------------


@pytest.mark.parametrize(
    "other",
    [
        {"StudyInstanceUID": "another study", **PATIENT_A},
        {"StudyInstanceUID": "another study"},
        PATIENT_A,
    ],
    ids=["another study and patient", "another study", "another patient"],
)
def test_another_image_under_an_images_uid_is_refused_and_its_results_stand(
    runtime: Runtime, storescp: StoreSCP, other: dict[str, Any]
) -> None:
    """Patient B's image was assessed and its SR and SC sent; a modality that reuses UIDs
    sends another image under the same SOP Instance UID, in another study or under
    another patient. Nothing is made of it: no SR, no SC, no note withdrawing B's, which
    stand; the administrator is told, by `status` too."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = assess_instance(runtime, instance_id)
    deliver(runtime, storescp, first.delivery_ids)
    before = instance_row(runtime, instance_id)

    attributes: dict[str, Any] = dict(other)
    if attributes.get("StudyInstanceUID") == "another study":
        attributes["StudyInstanceUID"] = generate_uid()
    another_hand = np.ascontiguousarray(stored_pixels(runtime, instance_id)[::-1, ::-1])
    received_again(runtime, instance_id, PixelData=another_hand.tobytes(), **attributes)
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "skipped"
    assert queries.UID_CLASH in (outcome.reason or "")

    after = instance_row(runtime, instance_id)
    assert (after.state, after.assessment, after.received_again_at) == (
        InstanceState.ASSESSED,
        1,
        None,
    )
    assert (after.inputs_sha256, after.identity_sha256, after.pixels_signature) == (
        before.inputs_sha256,
        before.identity_sha256,
        before.pixels_signature,
    )
    assert after.reason is not None and after.reason.startswith(before.reason or "")
    assert queries.UID_CLASH in after.reason
    assert [(d.kind, d.state) for d in deliveries(runtime, instance_id)] == [
        (ObjectKind.SR, DeliveryState.DELIVERED),
        (ObjectKind.SC, DeliveryState.DELIVERED),
    ]
    assert results(runtime, instance_id) == [(1, False)]
    with session_scope(runtime.database_url) as session:
        problems = queries.recent_problems(session)
    assert [p["what"] for p in problems] == [f"instance {instance_id}"]

    # sent once more: refused again, said once
    received_again(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert instance_row(runtime, instance_id).reason == after.reason
    assert len(deliveries(runtime, instance_id)) == 2


def test_reprocess_leaves_an_image_whose_uid_another_image_came_under(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """The spool holds the other image now: a reprocess with a new model would take it
    for this one, file its bone age in the other study and withdraw this one's."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    another_hand = np.ascontiguousarray(stored_pixels(runtime, instance_id)[::-1, ::-1])
    received_again(runtime, instance_id, PixelData=another_hand.tobytes(), **PATIENT_A)
    assert assess_instance(runtime, instance_id).state == "skipped"  # refused

    new = another_model(runtime, tmp_path)
    assert uid_clashes(new, [instance_id]) == [instance_id]
    assert prepare_reprocess(new, [instance_id], send=True) == []
    assert instance_row(runtime, instance_id).state is InstanceState.ASSESSED
    # an image of its own beside it is reprocessed as before
    other_id = spool_instance(runtime, attributes=PATIENT_A)
    assert assess_instance(runtime, other_id).state == "assessed"
    assert uid_clashes(new, [other_id]) == []
    assert prepare_reprocess(new, [other_id], send=True) == [other_id]


def another_model(rt: Runtime, tmp_path: Path) -> Runtime:
    """A node that runs another model than ``rt``'s, for a reprocess."""
    assert rt.settings.model is not None
    loaded = load_checkpoint(rt.settings.model)
    new_model = tmp_path / "new.safetensors"
    save_checkpoint(new_model, loaded.model, dataclasses.replace(loaded.meta, data="v2"))
    new = Runtime(rt.settings.model_copy(update={"model": new_model}))
    assert new.predictor.model_id != rt.predictor.model_id
    return new


def another_image_under_its_uid(
    rt: Runtime, storescp: StoreSCP
) -> tuple[int, Instance, bytes, np.ndarray[Any, Any]]:
    """An image assessed under patient B and its SR and SC delivered, then another image
    (its pixels flipped) received under its SOP Instance UID and patient A: the image's
    id, its row and its own bytes as assessed, and the other's pixels."""
    instance_id = spool_instance(rt, attributes=PATIENT_B)
    deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids)
    before = instance_row(rt, instance_id)
    own = Path(before.spool_path).read_bytes()
    another_hand = np.ascontiguousarray(stored_pixels(rt, instance_id)[::-1, ::-1])
    received_again(rt, instance_id, PixelData=another_hand.tobytes(), **PATIENT_A)
    return instance_id, before, own, another_hand


def assert_as_before_the_clash(rt: Runtime, instance_id: int, before: Instance, own: bytes) -> None:
    """The image assessed once, its reason as ``before``'s, no copy left to compare, its
    own bytes ``own`` in the spool, its SR and SC the only objects made, and no problem
    for `status` to list."""
    after = instance_row(rt, instance_id)
    assert (after.state, after.assessment, after.reason, after.received_again_at) == (
        InstanceState.ASSESSED,
        1,
        before.reason,
        None,
    )
    assert Path(after.spool_path).read_bytes() == own
    assert len(deliveries(rt, instance_id)) == 2
    with session_scope(rt.database_url) as session:
        assert queries.recent_problems(session) == []


def test_the_images_own_copy_received_again_takes_the_clash_back(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """Another image came under the image's SOP Instance UID and was refused; the PACS
    then sends the image itself again, and its own copy is back in the spool. Its reason
    no longer says it clashes, `status` no longer lists it, and a reprocess assesses it;
    nothing is made or withdrawn for the copy. Another image under its UID once more is
    refused again, and said once."""
    instance_id, before, own, another_hand = another_image_under_its_uid(runtime, storescp)
    assert assess_instance(runtime, instance_id).state == "skipped"  # refused
    assert queries.UID_CLASH in (instance_row(runtime, instance_id).reason or "")
    new = another_model(runtime, tmp_path)
    assert uid_clashes(new, [instance_id]) == [instance_id]

    bytes_received_again(runtime, instance_id, own)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert_as_before_the_clash(runtime, instance_id, before, own)
    assert results(runtime, instance_id) == [(1, False)]
    assert uid_clashes(new, [instance_id]) == []

    # another image under its UID again, in another study: refused, said once
    received_again(
        runtime, instance_id, PixelData=another_hand.tobytes(), StudyInstanceUID=generate_uid()
    )
    assert assess_instance(runtime, instance_id).state == "skipped"
    reason = instance_row(runtime, instance_id).reason or ""
    assert reason.count(queries.UID_CLASH) == 1
    assert "in another study" in reason and "under another patient" not in reason
    sent_once_more = assess_instance(runtime, instance_id)  # the same message again
    assert sent_once_more.state == "skipped"
    assert instance_row(runtime, instance_id).reason == reason
    assert prepare_reprocess(new, [instance_id], send=True) == []

    # the image itself once more: taken back again, and a reprocess assesses it
    bytes_received_again(runtime, instance_id, own)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert instance_row(runtime, instance_id).reason == before.reason
    assert prepare_reprocess(new, [instance_id], send=True) == [instance_id]
    assert instance_row(runtime, instance_id).state is InstanceState.QUEUED


def test_taking_the_clash_back_keeps_the_rest_of_the_reason(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """An image whose reason says to withdraw objects at the PACS by hand (refiled under
    the corrected patient, our files of what went under the other gone) keeps saying so
    after another image came under its UID and its own copy came back."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    for delivery in deliveries(runtime, instance_id):
        Path(delivery.path).unlink()
    received_again(runtime, instance_id, **PATIENT_A)
    assert assess_instance(runtime, instance_id).state == "assessed"
    kept = instance_row(runtime, instance_id).reason
    assert kept is not None and kept.endswith(WITHDRAW_BY_HAND)
    own = Path(instance_row(runtime, instance_id).spool_path).read_bytes()

    another_hand = np.ascontiguousarray(stored_pixels(runtime, instance_id)[::-1, ::-1])
    received_again(
        runtime, instance_id, PixelData=another_hand.tobytes(), StudyInstanceUID=generate_uid()
    )
    assert assess_instance(runtime, instance_id).state == "skipped"  # refused
    clashed = instance_row(runtime, instance_id).reason or ""
    assert clashed.startswith(f"{kept}; {queries.UID_CLASH}")

    bytes_received_again(runtime, instance_id, own)
    assert assess_instance(runtime, instance_id).state == "skipped"
    after = instance_row(runtime, instance_id)
    assert (after.state, after.assessment, after.reason) == (InstanceState.ASSESSED, 2, kept)
    with session_scope(runtime.database_url) as session:
        problems = queries.recent_problems(session)
    assert [p["reason"] for p in problems] == [kept]  # withdraw by hand: still listed


def test_a_clash_compared_after_the_images_own_copy_came_back_is_not_said(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another image comes under the image's SOP Instance UID, and while its message
    reads it, the image's own copy comes back and its message compares it (nothing
    changed): the first message's refusal, committed last, does not say the image
    clashes, since the spool holds the image itself (before, it did, and `reprocess`
    left the image and `status` listed it until the PACS sent it once more)."""
    instance_id, before, own, _ = another_image_under_its_uid(runtime, storescp)

    read = pipeline.picture_now
    came_back: list[str] = []

    def own_copy_back_while_the_other_is_read(rt: Runtime, ds: Dataset) -> bytes:
        picture = read(rt, ds)  # the other image's pixels, read by the first message
        if not came_back:
            came_back.append("own")
            bytes_received_again(runtime, instance_id, own)
            came_back.append(assess_instance(runtime, instance_id).state)  # its message
        return picture

    monkeypatch.setattr(pipeline, "picture_now", own_copy_back_while_the_other_is_read)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert came_back == ["own", "skipped"]
    assert_as_before_the_clash(runtime, instance_id, before, own)


# -- a copy received before the first assessment ---------------------------------------


def another_image_of(rt: Runtime, instance_id: int, path: Path, **attributes: Any) -> Path:
    """Patient B's image, its pixels the spooled image's flipped, in another study, under
    the instance's SOP Instance UID (a modality that reuses UIDs), written at ``path``;
    ``attributes`` set last."""
    ds = dcmread(instance_row(rt, instance_id).spool_path)
    ds.PixelData = np.ascontiguousarray(stored_pixels(rt, instance_id)[::-1, ::-1]).tobytes()
    for keyword, value in {**PATIENT_B, "StudyInstanceUID": generate_uid(), **attributes}.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_copy_moved_and_corrected_before_the_first_assessment_is_the_one_assessed(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The image waits to be assessed (a backlog) under patient B; the PACS merges its
    study into another and corrects the patient to A, and forwards the image again, the
    same SOP Instance UID and pixels. The copy replaces the waiting one: the first
    assessment reads it, and its SR and SC go to the new study under A, with nothing said
    of a UID clash. Before, the listener kept no such copy: the image was assessed as
    first received, its SR filed in the old study under B, and its reason said a clash."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = instance_row(runtime, instance_id)
    moved = dcmread(first.spool_path)
    study = generate_uid()
    for keyword, value in {**PATIENT_A, "StudyInstanceUID": study}.items():
        setattr(moved, keyword, value)
    moved.save_as(tmp_path / "moved.dcm", enforce_file_format=True)

    with (
        caplog.at_level(logging.WARNING, logger="worker.listener"),
        received_again_tests.listening(runtime) as port,
    ):
        received_again_tests.sent(port, tmp_path / "moved.dcm")
    assert (
        f"instance {instance_id}: a copy in another study replaced the one waiting to be "
        "assessed (moved at the PACS, or another image under its UID)"
    ) in caplog.messages
    waiting = instance_row(runtime, instance_id)
    assert (waiting.state, waiting.times_received) == (InstanceState.RECEIVED, 2)
    assert str(dcmread(waiting.spool_path).StudyInstanceUID) == study

    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome
    assert queries.UID_CLASH not in (instance_row(runtime, instance_id).reason or "")
    made = [dcmread(p) for p in deliver(runtime, storescp, outcome.delivery_ids)]
    assert sorted(ds.Modality for ds in made) == ["OT", "SR"]
    assert {(str(ds.StudyInstanceUID), str(ds.PatientID)) for ds in made} == {
        (study, PATIENT_A["PatientID"])
    }
    assert {d.study_instance_uid for d in deliveries(runtime, instance_id)} == {study}
    assert results(runtime, instance_id) == [(1, False)]


def test_a_spooled_file_of_another_image_is_not_assessed(runtime: Runtime, tmp_path: Path) -> None:
    """Should another image's file, of another SOP Instance UID, stand in the spool for an
    image still to be assessed (put there by hand), nothing is made of it: the image ends
    in error, saying so; its own copy received again is assessed."""
    instance_id = spool_instance(runtime, attributes=PATIENT_A)
    own = Path(instance_row(runtime, instance_id).spool_path).read_bytes()
    study = instance_row(runtime, instance_id).study_instance_uid
    attributes = {"SOPInstanceUID": generate_uid(), "StudyInstanceUID": study}
    path = another_image_of(runtime, instance_id, tmp_path / "other.dcm", **attributes)
    Path(instance_row(runtime, instance_id).spool_path).write_bytes(path.read_bytes())

    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "error"
    assert pipeline.SPOOLED_ANOTHER_IMAGE in (outcome.reason or "")
    assert instance_row(runtime, instance_id).state is InstanceState.ERROR
    assert deliveries(runtime, instance_id) == [] and results(runtime, instance_id) == []

    bytes_received_again(runtime, instance_id, own)
    again = assess_instance(runtime, instance_id)
    assert again.state == "assessed", again
    assert results(runtime, instance_id) == [(2, False)]
