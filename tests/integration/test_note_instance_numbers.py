"""The Instance Numbers of our rejection notes (Key Object Selection, IHE IOCM).

Our notes withdrawing an image's objects in one study under one patient share a series;
each was numbered 1, so that a viewer listed them in no order and the series held the
same number several times. They are now numbered as the objects they withdraw were
made, 1, 2 ..., the same each time the same note is made (a retry makes the same note,
with the same UIDs).
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from dicom_io.ko import read_rejection_note
from tests.conftest import StoreSCP
from tests.integration import test_received_again_identity as identity_tests
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_pipeline_retries import failing_once
from tests.integration.test_received_again import deliver, received_again
from tests.integration.test_received_again_identity import PATIENT_A, PATIENT_B, instance_row
from tests.support import pacs_rejection_note
from worker import pipeline
from worker.pipeline import KO_SERIES_NUMBER, assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = identity_tests.runtime


def withdrawn(note: Dataset) -> str:
    """The SOP Instance UID of the one object of ours ``note`` withdraws."""
    read = read_rejection_note(note)
    assert read is not None
    [reference] = read.references
    return reference.sop_instance_uid


def _ours(paths: list[Path]) -> tuple[str, str]:
    """(SR, SC) SOP Instance UIDs among the delivered ``paths``."""
    by_modality = {str(ds.Modality): str(ds.SOPInstanceUID) for ds in map(dcmread, paths)}
    return by_modality["SR"], by_modality["OT"]


def notes_built(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int, str]]:
    """From now on, each rejection note the pipeline builds, in the list returned: its
    SOP Instance UID, Series Instance UID and Instance Number, and the SOP Instance UID
    of the object it withdraws."""
    built: list[tuple[str, str, int, str]] = []
    build = pipeline.build_rejection_note

    def recorded(*args: Any, **kwargs: Any) -> Dataset:
        note = build(*args, **kwargs)
        made = (str(note.SOPInstanceUID), str(note.SeriesInstanceUID), int(note.InstanceNumber))
        built.append((*made, withdrawn(note)))
        return note

    monkeypatch.setattr(pipeline, "build_rejection_note", recorded)
    return built


def test_notes_in_one_series_are_numbered_as_their_objects_were_made(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Delivered under patient B, received again under A: notes of ours withdraw the
    first SR and SC under B, 1 and 2. The PACS then rejects the image: the notes that
    withdraw the second SR and SC, under A, are 3 and 4 in the study, in a series of
    A's (test_note_series_per_patient). Each delivered, and dciodvfy-clean."""
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = _ours(deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids))
    received_again(runtime, instance_id, **PATIENT_A)
    reassessed = deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    second = _ours([p for p in reassessed if dcmread(p).Modality != "KO"])
    notes = [ds for ds in map(dcmread, reassessed) if ds.Modality == "KO"]
    assert sorted(withdrawn(note) for note in notes) == sorted(first)

    image = dcmread(instance_row(runtime, instance_id).spool_path)
    rejected = assess_instance(runtime, spool_dataset(runtime, pacs_rejection_note(image)))
    assert len(rejected.delivery_ids) == 2  # the first SR and SC are withdrawn already
    notes += map(dcmread, deliver(runtime, storescp, rejected.delivery_ids))

    series = {(str(note.PatientID), str(note.SeriesInstanceUID)) for note in notes}
    assert len(series) == len({uid for _, uid in series}) == 2  # a series per patient
    assert {int(note.SeriesNumber) for note in notes} == {KO_SERIES_NUMBER}
    assert {withdrawn(note): int(note.InstanceNumber) for note in notes} == {
        first[0]: 1,
        first[1]: 2,
        second[0]: 3,
        second[1]: 4,
    }


def test_the_same_note_made_again_has_the_same_uids_and_number(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempt that withdraws the first SR and SC fails as it commits (a full disk):
    the retry makes the same notes again, with the same UIDs and numbers, and those go."""
    built = notes_built(monkeypatch)
    instance_id = spool_instance(runtime, attributes=PATIENT_B)
    first = _ours(deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids))
    received_again(runtime, instance_id, **PATIENT_A)
    failing_once(monkeypatch, "publish", OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        assess_instance(runtime, instance_id)
    by_the_first = sorted(built)
    assert sorted((number, withdrawn) for *_, number, withdrawn in by_the_first) == [
        (1, first[0]),
        (2, first[1]),
    ]

    built.clear()
    retried = assess_instance(runtime, instance_id)
    assert sorted(built) == by_the_first
    notes = list(map(dcmread, deliver(runtime, storescp, retried.delivery_ids)))
    assert (
        sorted(
            (str(n.SOPInstanceUID), str(n.SeriesInstanceUID), int(n.InstanceNumber), withdrawn(n))
            for n in notes
            if n.Modality == "KO"
        )
        == by_the_first
    )
