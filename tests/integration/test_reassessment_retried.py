"""An assessment that a copy received under another patient opened, finished by a retry.

Only the attempt that opened it read the patient before (worker.pipeline._Claim); the
instance's row keeps it now (Instance.identity_before_sha256), so that a retry (the task
retrying a full disk, the reconciler after a fault) withdraws and names what went under
that patient exactly as the attempt that opened it would have: before, a retry left the
objects whose files retention had removed out of its count, without a word.

The failure of the first attempt is made in process, as in test_pipeline_retries.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from db.schema import DeliveryState, InstanceState, ObjectKind
from dicom_io.ko import read_rejection_note
from models.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import StoreSCP
from tests.integration import test_received_again_identity as identity_tests
from tests.integration.test_pipeline import spool_instance
from tests.integration.test_pipeline_retries import failing_once
from tests.integration.test_received_again import deliver, received_again
from tests.integration.test_received_again_identity import (
    PATIENT_A,
    PATIENT_B,
    deliveries,
    instance_row,
)
from worker import pipeline
from worker.pipeline import (
    MAX_ATTEMPTS,
    MOVED_TITLE,
    REFILED,
    WITHDRAW_BY_HAND,
    AssessOutcome,
    assess_instance,
)
from worker.reprocess import prepare_reprocess
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = identity_tests.runtime

#: What the assessment under patient A sends: its SR and SC, and a note withdrawing each
#: of the second SR and SC.
SR_SC_AND_TWO_NOTES = sorted([ObjectKind.SR, ObjectKind.SC, ObjectKind.KO, ObjectKind.KO])
#: What the assessment under patient A names to withdraw by hand: the first SR and SC,
#: delivered under B, whose files retention removed.
NAMED = (
    "our rejection notes for 2 object(s) of ours could not be made (2 whose file "
    f"retention removed): {WITHDRAW_BY_HAND}"
)


def _delivered_under_b(rt: Runtime, storescp: StoreSCP) -> tuple[int, set[str]]:
    """An image assessed and delivered under patient B twice (its sex corrected in
    between), the files of the first SR and SC removed as retention removes them, then
    received again under patient A. Its id, and the SOP Instance UIDs of the second SR
    and SC, whose files are there."""
    instance_id = spool_instance(rt, sex="F", attributes=PATIENT_B)
    deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids)
    for delivery in deliveries(rt, instance_id):
        Path(delivery.path).unlink()
    received_again(rt, instance_id, PatientSex="M")
    second = assess_instance(rt, instance_id)
    assert second.state == "assessed"
    kept = {str(dcmread(p).SOPInstanceUID) for p in deliver(rt, storescp, second.delivery_ids)}
    received_again(rt, instance_id, **PATIENT_A)
    return instance_id, kept


def _what_it_withdrew(
    rt: Runtime,
    storescp: StoreSCP,
    instance_id: int,
    outcome: AssessOutcome,
    *,
    assessment: int = 3,
) -> tuple[str | None, list[ObjectKind], set[str], set[str]]:
    """Of the ``assessment`` under A: its reason, the kinds it sends (each delivered,
    dciodvfy-clean), what its notes withdraw, and the patients they are filed under."""
    assert outcome.state == "assessed", outcome
    sent = [dcmread(p) for p in deliver(rt, storescp, outcome.delivery_ids)]
    notes = [ds for ds in sent if ds.Modality == "KO"]
    withdrawn = [read_rejection_note(note) for note in notes]
    assert all(w is not None and w.code == MOVED_TITLE for w in withdrawn)
    assert {str(note.ContentSequence[0].TextValue) for note in notes} == {REFILED}
    assert {str(ds.PatientID) for ds in sent if ds.Modality != "KO"} == {"A-0001"}
    return (
        instance_row(rt, instance_id).reason,
        sorted(d.kind for d in deliveries(rt, instance_id) if d.assessment == assessment),
        {r.sop_instance_uid for w in withdrawn if w is not None for r in w.references},
        {str(note.PatientID) for note in notes},
    )


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), ValueError("a fault, once")],
    ids=["retried by the task", "a fault, then a new message"],
)
def test_a_retry_withdraws_and_names_what_the_attempt_that_failed_would_have(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """Delivered under B: the second SR and SC, whose files are there, are withdrawn by
    notes of ours filed under B; the first, whose files retention removed, are named in
    the image's reason to withdraw by hand. The first attempt under A fails; its retry
    does all of that, as an assessment that did not fail does."""
    uninterrupted_id, uninterrupted_kept = _delivered_under_b(runtime, storescp)
    uninterrupted = _what_it_withdrew(
        runtime, storescp, uninterrupted_id, assess_instance(runtime, uninterrupted_id)
    )
    assert uninterrupted[0] is not None and NAMED in uninterrupted[0]
    assert uninterrupted[1:] == (
        SR_SC_AND_TWO_NOTES,
        uninterrupted_kept,
        {"B-0002"},
    )

    instance_id, kept = _delivered_under_b(runtime, storescp)
    before = instance_row(runtime, instance_id).identity_sha256
    calls = failing_once(monkeypatch, "build_outputs", failure)
    with pytest.raises(type(failure)):
        assess_instance(runtime, instance_id)
    row = instance_row(runtime, instance_id)
    assert (row.state, row.assessment) == (InstanceState.PROCESSING, 3)
    assert row.identity_before_sha256 == before and before != row.identity_sha256
    # nothing of it went: the retry makes it all
    assert [d.state for d in deliveries(runtime, instance_id) if d.assessment == 3] == []

    retried = _what_it_withdrew(
        runtime, storescp, instance_id, assess_instance(runtime, instance_id)
    )
    assert len(calls) == 2
    assert retried == (uninterrupted[0], uninterrupted[1], kept, {"B-0002"})
    row = instance_row(runtime, instance_id)
    assert (row.state, row.identity_before_sha256) == (InstanceState.ASSESSED, None)
    assert {d.state for d in deliveries(runtime, instance_id) if d.assessment == 3} == {
        DeliveryState.DELIVERED
    }


def test_the_patient_before_an_assessment_that_ended_in_error_is_kept_for_the_next(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every attempt under A failed and the image ended in error, having made nothing:
    its outputs under B are still out there. The next assessment (a copy under A with
    the sex corrected back) withdraws and names them as the one in error would have, not
    taking A, which that one read, for the patient they were filed under."""
    instance_id, kept = _delivered_under_b(runtime, storescp)
    before = instance_row(runtime, instance_id).identity_sha256
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "build_outputs", _failing(ValueError("a fault, each time")))
        for _ in range(MAX_ATTEMPTS):
            with pytest.raises(ValueError):
                assess_instance(runtime, instance_id)
    row = instance_row(runtime, instance_id)
    assert (row.state, row.assessment, row.identity_before_sha256) == (
        InstanceState.ERROR,
        3,
        before,
    )

    received_again(runtime, instance_id, PatientSex="F")
    reason, kinds, withdrawn, filed_under = _what_it_withdrew(
        runtime, storescp, instance_id, assess_instance(runtime, instance_id), assessment=4
    )
    assert reason is not None and NAMED in reason
    assert kinds == SR_SC_AND_TWO_NOTES
    assert (withdrawn, filed_under) == (kept, {"B-0002"})
    assert instance_row(runtime, instance_id).identity_before_sha256 is None


def test_an_assessment_that_sends_nothing_keeps_the_patient_before_for_one_that_does(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The image ended in error under A, its outputs under B still out there; a
    `reprocess` without --send then assesses it, sending nothing and so withdrawing
    nothing: the patient before is kept, and the next assessment that sends withdraws
    and names what went under B. (The column was emptied by any assessment that did not
    end in error, and B's objects whose files retention removed were never named.)"""
    instance_id, kept = _delivered_under_b(runtime, storescp)
    before = instance_row(runtime, instance_id).identity_sha256
    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "build_outputs", _failing(ValueError("a fault, each time")))
        for _ in range(MAX_ATTEMPTS):
            with pytest.raises(ValueError):
                assess_instance(runtime, instance_id)

    # a new model, reprocessed without --send (the model that assessed it under B is done)
    assert runtime.settings.model is not None
    loaded = load_checkpoint(runtime.settings.model)
    new_model = tmp_path / "new.safetensors"
    save_checkpoint(new_model, loaded.model, dataclasses.replace(loaded.meta, data="v2"))
    new = Runtime(runtime.settings.model_copy(update={"model": new_model}))
    assert prepare_reprocess(new, [instance_id], send=False) == [instance_id]
    quiet = assess_instance(new, instance_id, send=False)
    assert quiet.state == "assessed" and quiet.delivery_ids == ()
    assert instance_row(runtime, instance_id).identity_before_sha256 == before

    received_again(runtime, instance_id, PatientSex="F")
    reason, _, withdrawn, filed_under = _what_it_withdrew(
        runtime, storescp, instance_id, assess_instance(runtime, instance_id), assessment=5
    )
    assert reason is not None and NAMED in reason
    assert (withdrawn, filed_under) == (kept, {"B-0002"})
    assert instance_row(runtime, instance_id).identity_before_sha256 is None


def _failing(exc: Exception) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail
