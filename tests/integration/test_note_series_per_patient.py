"""The series of our rejection notes (Key Object Selection, IHE IOCM), one per patient.

Our notes withdrawing an image's objects in one study shared a series whatever patient
each was filed under. After the PACS corrected the Patient ID of the image's study (the
image received again under the new patient, our objects under the old one withdrawn
there) and then rejected the image (our objects under the new patient withdrawn), that
series held notes of two patients: a PACS refuses the second (a patient mismatch for the
series it has) or files it under the wrong patient. The series now depends on the
patient the note is filed under; a note recorded already is sent as it was made.
"""

from __future__ import annotations

import errno
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, ObjectKind
from dicom_io.uids import UUID_ROOT, UidScheme, legacy_uid
from tests.conftest import StoreSCP
from tests.dicomtools import dciodvfy_errors
from tests.integration import test_received_again_identity as identity_tests
from tests.integration.test_note_instance_numbers import notes_built, withdrawn
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_pipeline_retries import failing_once
from tests.integration.test_received_again import deliver, received_again
from tests.integration.test_received_again_identity import PATIENT_A, PATIENT_B, instance_row
from tests.integration.test_rejection_notes import sent_to_two_destinations
from tests.support import pacs_rejection_note
from worker import pipeline
from worker.delivery import send_deliveries
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = identity_tests.runtime

#: The patients, each with an issuer, as the PACS names them.
UNDER_B = {**PATIENT_B, "IssuerOfPatientID": "HOSPITAL"}
UNDER_A = {**PATIENT_A, "IssuerOfPatientID": "HOSPITAL"}

#: How a node derives the UIDs of an image's objects.
A_NODE = UidScheme(UUID_ROOT, "a node")


def _ours(paths: list[Path]) -> set[str]:
    """The SOP Instance UIDs of our SR and SC among the delivered ``paths``."""
    return {str(ds.SOPInstanceUID) for ds in map(dcmread, paths) if ds.Modality != "KO"}


def _notes(paths: list[Path]) -> list[Dataset]:
    return [ds for ds in map(dcmread, paths) if ds.Modality == "KO"]


def _patients_by_series(notes: Sequence[Dataset]) -> list[list[tuple[str, str]]]:
    """(Patient ID, Issuer of Patient ID) of the notes in each series, series by series."""
    patients: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for note in notes:
        patients[str(note.SeriesInstanceUID)].add(
            (str(note.PatientID), str(note.get("IssuerOfPatientID", "")))
        )
    return sorted(sorted(series) for series in patients.values())


#: Two series of notes, under A and under B, each of that patient only.
ONE_SERIES_EACH = [[("A-0001", "HOSPITAL")], [("B-0002", "HOSPITAL")]]


def _corrected(rt: Runtime, storescp: StoreSCP) -> tuple[int, set[str], set[str], list[Dataset]]:
    """An image delivered under patient B; the PACS corrects its study's patient to A and
    sends it again, same study: it is assessed again, our first SR and SC withdrawn under
    B. Its id, the first and second objects, and the notes under B, each delivered."""
    instance_id = spool_instance(rt, attributes=UNDER_B)
    first = _ours(deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids))
    received_again(rt, instance_id, **UNDER_A)
    reassessed = deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids)
    notes = _notes(reassessed)
    assert {withdrawn(note) for note in notes} == first
    return instance_id, first, _ours(reassessed), notes


def test_notes_before_and_after_a_patient_correction_are_in_a_series_per_patient(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Corrected from B to A in the same study, then rejected by the PACS: the notes under
    B and those under A are in two series of that study, each of one patient, numbered
    apart within it as their objects were made; each delivered, dciodvfy-clean."""
    instance_id, first, second, notes = _corrected(runtime, storescp)
    image = dcmread(instance_row(runtime, instance_id).spool_path)
    rejected = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert len(rejected.delivery_ids) == 2  # the second SR and SC
    notes += _notes(deliver(runtime, storescp, rejected.delivery_ids))

    assert len(notes) == 4
    assert {str(note.StudyInstanceUID) for note in notes} == {str(image.StudyInstanceUID)}
    assert _patients_by_series(notes) == ONE_SERIES_EACH
    numbers: dict[str, list[int]] = defaultdict(list)
    for note in notes:
        numbers[str(note.SeriesInstanceUID)].append(int(note.InstanceNumber))
    assert sorted(sorted(n) for n in numbers.values()) == [[1, 2], [3, 4]]
    assert {withdrawn(n) for n in notes if n.PatientID == "B-0002"} == first
    assert {withdrawn(n) for n in notes if n.PatientID == "A-0001"} == second


def test_the_series_follows_the_patient_id_and_its_issuer() -> None:
    """The series of the notes of one image and study is the same for the same Patient
    ID and issuer (surrounding spaces aside, absent as empty), another for another."""

    def series(**attributes: Any) -> str:
        ds = Dataset()
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        return pipeline.note_series_uid("1.2.3.4", "1.2.3.5", ds, uids=A_NODE)

    assert series(PatientID="A-0001") == series(PatientID="A-0001 ", IssuerOfPatientID="")
    assert series() == series(PatientID="")
    others = {
        series(PatientID="A-0001"),
        series(PatientID="B-0002"),
        series(PatientID="A-0001", IssuerOfPatientID="HOSPITAL"),
        series(PatientID="A-0001", IssuerOfPatientID="CLINIC"),
        series(PatientID="", IssuerOfPatientID="A-0001"),
        series(),
    }
    assert len(others) == 6
    patient = Dataset()
    patient.PatientID = "A-0001"
    assert pipeline.note_series_uid("1.2.3.4", "1.2.3.5", patient, uids=A_NODE) != (
        pipeline.note_series_uid("1.2.3.4", "1.2.3.6", patient, uids=A_NODE)
    )


def test_a_note_made_again_after_a_failed_commit_keeps_its_series_and_uid(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Corrected from B to A; the PACS's rejection is applied, and the attempt that makes
    our notes under A fails as it commits (a full disk). Applied again, it makes the same
    notes, with the same SOP Instance UIDs, series and numbers, and those go."""
    instance_id, _, second, notes_under_b = _corrected(runtime, storescp)
    built = notes_built(monkeypatch)
    image = dcmread(instance_row(runtime, instance_id).spool_path)
    note_id = spool_dataset(runtime, pacs_rejection_note(image))
    failing_once(monkeypatch, "publish", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        assess_instance(runtime, note_id)
    by_the_first = sorted(built)
    assert {withdrawn for *_, withdrawn in by_the_first} == second

    built.clear()
    retried = assess_instance(runtime, note_id)
    assert sorted(built) == by_the_first
    notes = _notes(deliver(runtime, storescp, retried.delivery_ids))
    assert (
        sorted(
            (str(n.SOPInstanceUID), str(n.SeriesInstanceUID), int(n.InstanceNumber), withdrawn(n))
            for n in notes
        )
        == by_the_first
    )
    assert {uid for uid, *_ in by_the_first} == {pipeline.withdrawal_uid(uid) for uid in second}
    assert _patients_by_series(notes + notes_under_b) == ONE_SERIES_EACH


def test_a_note_made_before_the_series_per_patient_is_sent_as_it_was_made(
    runtime: Runtime,
    storescp: StoreSCP,
    tmp_path: Path,
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two destinations: the first SR, under B, reached one, its SC both. Corrected to A
    by an older install, whose notes under B were in the image's series of the study
    whatever the patient; the first SR then reaches the other destination, and after the
    upgrade the PACS rejects the image. The SR's note goes there as it was made (its
    file, series and UID), never made again in another series under the same UID; the
    notes under A are in a series of their own. Each series holds one patient's notes."""
    two = sent_to_two_destinations(runtime, storescp, tmp_path, tiny_checkpoint, UNDER_B)
    rt, here, there, image_id, late = two.rt, two.here, two.there, two.image_id, two.sr_there
    with session_scope(rt.database_url) as session:
        first_sr = session.get_one(Delivery, late).sop_instance_uid

    def older(
        source_uid: str, study_instance_uid: str, filed_as: Dataset, *, uids: UidScheme
    ) -> str:
        # as the older install derived it: under pydicom's root, whatever the node's
        return legacy_uid(source_uid, "ko-series", "study", study_instance_uid)

    with monkeypatch.context() as older_install:
        older_install.setattr(pipeline, "note_series_uid", older)
        received_again(rt, image_id, **UNDER_A)
        reassessed = assess_instance(rt, image_id)
    with session_scope(rt.database_url) as session:
        session.get_one(Delivery, late).state = DeliveryState.DELIVERED
        made = {
            (d.destination, d.sop_instance_uid): (Path(d.path), d.sha256, d.series_instance_uid)
            for d in session.scalars(select(Delivery).where(Delivery.kind == ObjectKind.KO))
        }
    assert len(made) == 3  # the SR's note here, the SC's here and there
    sr_note = made[(here, pipeline.withdrawal_uid(first_sr))]
    outcomes = send_deliveries(rt, list(reassessed.delivery_ids))
    assert {o.state for o in outcomes.values()} == {"delivered"}, outcomes

    built: list[str] = []
    build = pipeline.build_rejection_note

    def recorded(source: Dataset, *args: Any, **kwargs: Any) -> Dataset:
        built.append(str(source.PatientID))
        return build(source, *args, **kwargs)

    monkeypatch.setattr(pipeline, "build_rejection_note", recorded)
    image = dcmread(instance_row(rt, image_id).spool_path)
    applied = assess_instance(rt, spool_dataset(rt, pacs_rejection_note(image)))
    assert built == ["A-0001", "A-0001"]  # the second SR and SC; none made again under B
    with session_scope(rt.database_url) as session:
        added = list(session.scalars(select(Delivery).where(Delivery.id.in_(applied.delivery_ids))))
        again = [d for d in added if d.sop_instance_uid == pipeline.withdrawal_uid(first_sr)]
        assert [(d.destination, Path(d.path), d.sha256, d.series_instance_uid) for d in again] == [
            (there, *sr_note)
        ]
        assert len(added) == 5  # and the notes of the second SR and SC, to both
    assert hashlib.sha256(sr_note[0].read_bytes()).hexdigest() == sr_note[1]
    outcomes = send_deliveries(rt, list(applied.delivery_ids))
    assert {o.state for o in outcomes.values()} == {"delivered"}, outcomes

    # the second SR and SC, the notes of the first two under B, of the second two under A
    received = {
        str(ds.SOPInstanceUID): path
        for path in storescp.wait_for_objects(6, timeout=30)
        if (ds := dcmread(path)).Modality == "KO"
    }
    assert len(received) == 4
    notes = [dcmread(path) for path in received.values()]
    for path in received.values():
        assert dciodvfy_errors(path) == [], path
    assert _patients_by_series(notes) == ONE_SERIES_EACH
    [kept] = [n for n in notes if n.SOPInstanceUID == pipeline.withdrawal_uid(first_sr)]
    assert str(kept.SeriesInstanceUID) == sr_note[2]
