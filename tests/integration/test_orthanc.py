"""Orthanc as the hospital PACS: auto-forward by the shipped Lua script, results back.

One real Orthanc (``deploy/orthanc/orthanc.json`` and ``autoforward.lua`` on free
ports) and one ``boneage-worker serve`` on the embedded defaults, shared by the
tests of this module:

    upload to Orthanc (REST) ─▶ Lua filter ─▶ C-STORE to BONEAGE ─▶ assess
        ─▶ SR + SC C-STORE back to ORTHANC ─▶ Lua filter skips them (no loop)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.coding import Code
from pydicom.uid import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForProcessing,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Instance, InstanceState
from dicom_io.ko import read_rejection_note
from dicom_io.synthetic import make_radiograph_dataset
from models.phantoms import make_phantom
from tests.integration.test_end_to_end import PATIENT_VALUES, Node, cli
from tests.orthanc import OrthancServer, require_orthanc
from tests.support import free_port, pacs_rejection_note, wait_for, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")

BONEAGE_AE = "BONEAGE"
ORTHANC_AE = "ORTHANC"
RESULT_TIMEOUT_S = 240


@dataclass
class Stack:
    orthanc: OrthancServer
    node: Node
    port: int
    database_url: str
    folder: Path

    def diagnostics(self) -> str:
        return (
            f"{self.orthanc.log_tail()}\n--- boneage-worker logs (tail) ---\n"
            + (self.node.log_text()[-6000:])
        )

    def wait(self, condition: Callable[[], T | None], *, what: str, timeout: float = 60) -> T:
        """`wait_for`, with both logs in the message when it times out."""
        try:
            value = wait_for(condition, timeout=timeout, what=what, interval=0.25)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnostics()}") from None
        assert value is not None  # wait_for returns only a truthy value
        return value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Stack]:
    require_orthanc()
    folder = tmp_path_factory.mktemp("orthanc-stack")
    port = free_port()
    orthanc = OrthancServer(
        folder / "orthanc", boneage=(BONEAGE_AE, "127.0.0.1", port), ae_title=ORTHANC_AE
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(folder / "data"),
        BONEAGE_AE_TITLE=BONEAGE_AE,
        BONEAGE_PORT=str(port),
        BONEAGE_DESTINATIONS=orthanc.destination,
        BONEAGE_ALLOWED_AETS=f"{ORTHANC_AE}@127.0.0.1",
        BONEAGE_MODEL=str(tiny_checkpoint),
        BONEAGE_LOG_LEVEL="DEBUG",
    )
    node = Node(folder, env)
    try:
        orthanc.start()
        serve = node.start("serve", "serve")
        try:
            wait_for_port(port, timeout=120, process=serve)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{node.log_text()[-6000:]}") from None
        yield Stack(orthanc, node, port, f"sqlite:///{folder / 'data' / 'boneage.db'}", folder)
    finally:
        node.stop()
        orthanc.stop()


def write_radiograph(
    path: Path,
    *,
    body_part: str = "HAND",
    modality: str = "DX",
    description: str | None = None,
    seed: int = 0,
    region: Code | None = None,
    for_processing: bool = False,
) -> Dataset:
    """A phantom radiograph as a Part 10 file (a phantom, not a patient).

    A DX's coded region (Anatomic Region Sequence) agrees with ``body_part``; without a
    body part it has none unless ``region`` names one.
    """
    phantom = make_phantom(110.0, male=False, size=256, rng=np.random.default_rng(seed))
    study = dt.date.today()
    ds = make_radiograph_dataset(
        np.round(phantom.image * 4095).astype(np.uint16),
        modality=modality,
        sex="F",
        birth_date=study - dt.timedelta(days=round(110 * 30.4375)),
        study_date=study,
        body_part=body_part,
    )
    if description is not None:
        ds.StudyDescription = description
    if body_part == "CHEST" and region is None:
        # SCT 51185008 "Chest" (PS3.16 CID 4009), so the header agrees with itself
        region = Code("51185008", "SCT", "Chest")
    if "AnatomicRegionSequence" in ds:
        if region is not None:
            ds.AnatomicRegionSequence[0].CodeValue = region.value
            ds.AnatomicRegionSequence[0].CodingSchemeDesignator = region.scheme_designator
            ds.AnatomicRegionSequence[0].CodeMeaning = region.meaning
        elif not body_part:
            del ds.AnatomicRegionSequence
    if for_processing:
        ds.SOPClassUID = DigitalXRayImageStorageForProcessing
        ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForProcessing
        ds.PresentationIntentType = "FOR PROCESSING"
    ds.save_as(path, enforce_file_format=True)
    return ds


def instance_rows(database_url: str, **where: Any) -> list[Instance]:
    with session_scope(database_url) as session:
        query = select(Instance).filter_by(**where)
        rows = list(session.scalars(query))
        session.expunge_all()
        return rows


def drained(stack: Stack) -> dict[str, Any] | None:
    """boneage-worker's status once nothing is queued, in progress or waiting to be sent."""
    result = cli("status", "--json", env=stack.node.env)
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    instances, deliveries = report.get("instances", {}), report.get("deliveries", {})
    busy = (
        any(report.get("queues", {"?": 1}).values())
        or any(instances.get(state, 0) for state in ("received", "queued", "processing"))
        or deliveries.get("pending", 0)
    )
    return None if busy else report


def results_in(orthanc: OrthancServer, study_id: str) -> dict[str, dict[str, Any]] | None:
    """Our SR and SC in the study at Orthanc, by SOP class, once both are there."""
    found = {}
    for item in orthanc.study_instances(study_id):
        tags = orthanc.tags(item["ID"])
        if tags.get("SOPClassUID") in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
            found[tags["SOPClassUID"]] = {"ID": item["ID"], **tags}
    return found if len(found) == 2 else None


def orthanc_jobs_settled(stack: Stack) -> bool:
    return all(job["State"] not in ("Pending", "Running") for job in stack.orthanc.jobs())


def test_hand_radiograph_round_trip_without_loop(stack: Stack, tmp_path: Path) -> None:
    orthanc = stack.orthanc
    # Orthanc reaches the listener as the BONEAGE modality (C-ECHO over the association
    # policy that C-STORE uses: calling AE allow-list with host pin, called AE check).
    orthanc.post("/modalities/BONEAGE/echo", {})

    source = write_radiograph(tmp_path / "hand.dcm")
    uploaded = orthanc.upload(tmp_path / "hand.dcm")
    study_id, hand_id = uploaded["ParentStudy"], uploaded["ID"]

    results = stack.wait(
        lambda: results_in(orthanc, study_id),
        what="our SR and SC in the study at Orthanc",
        timeout=RESULT_TIMEOUT_S,
    )
    sr, sc = results[ComprehensiveSRStorage], results[SecondaryCaptureImageStorage]
    for obj in (sr, sc):
        assert obj["StudyInstanceUID"] == source.StudyInstanceUID
        assert obj["PatientID"] == source.PatientID
        assert obj["Manufacturer"] == "boneage-worker"
        assert obj["SeriesDescription"].startswith("AI bone age"), obj["SeriesDescription"]
        assert obj["SeriesInstanceUID"] != source.SeriesInstanceUID
    assert sr["Modality"] == "SR"
    assert sc["BurnedInAnnotation"] == "YES"

    # The Lua script says what it did with each of them.
    assert (orthanc.routing(hand_id) or "").startswith("forwarded: body part HAND")
    for obj in (sr, sc):
        assert orthanc.routing(obj["ID"]) == f"skipped: received from {BONEAGE_AE}"

    # No loop: once Orthanc has no job left and boneage-worker is idle, the study holds
    # exactly the radiograph and our two results, and boneage-worker saw only the radiograph.
    stack.wait(lambda: orthanc_jobs_settled(stack), what="Orthanc jobs finished")
    report = stack.wait(lambda: drained(stack), what="boneage-worker idle", timeout=120)
    assert report["deliveries"]["failed"] == 0
    ids = sorted(item["ID"] for item in orthanc.study_instances(study_id))
    assert ids == sorted([hand_id, sr["ID"], sc["ID"]]), stack.diagnostics()
    [row] = instance_rows(stack.database_url, study_instance_uid=source.StudyInstanceUID)
    assert row.sop_instance_uid == source.SOPInstanceUID
    assert row.state is InstanceState.ASSESSED
    assert row.calling_ae_title == ORTHANC_AE
    assert row.times_received == 1
    for sop_class in (ComprehensiveSRStorage, SecondaryCaptureImageStorage):
        assert instance_rows(stack.database_url, sop_class_uid=sop_class) == []
    forwarded = [
        job
        for job in orthanc.jobs()
        if job["Type"] == "DicomModalityStore" and job["Content"]["RemoteAet"] == BONEAGE_AE
    ]
    sent = [job["Content"]["ParentResources"] for job in forwarded]
    assert sent.count([hand_id]) == 1
    assert not any(sr["ID"] in ids or sc["ID"] in ids for ids in sent)


@pytest.mark.parametrize(
    ("body_part", "modality", "description", "extra", "reason"),
    [
        ("CHEST", "DX", "XR CHEST PA", {}, "skipped: body part CHEST, not a hand"),
        ("HAND", "CT", None, {}, "skipped: modality CT, not CR or DX"),
        ("", "DX", "XR CHEST PA", {}, "skipped: no body part and no hand in the descriptions"),
        (
            "",
            "DX",
            "XR HAND",
            {"region": Code("51185008", "SCT", "Chest")},
            "skipped: anatomic region SCT 51185008 (Chest), not a hand",
        ),
        (
            "HAND",
            "DX",
            None,
            {"for_processing": True},
            "skipped: DX for processing (raw detector data)",
        ),
        ("FINGER", "DX", None, {}, "skipped: body part FINGER, fingers alone, not a whole hand"),
    ],
    ids=[
        "chest-dx",
        "hand-ct",
        "dx-no-body-part",
        "dx-chest-region",
        "dx-for-processing",
        "dx-finger",
    ],
)
def test_other_images_are_not_forwarded(
    stack: Stack,
    tmp_path: Path,
    body_part: str,
    modality: str,
    description: str | None,
    extra: dict[str, Any],
    reason: str,
) -> None:
    orthanc = stack.orthanc
    source = write_radiograph(
        tmp_path / "other.dcm",
        body_part=body_part,
        modality=modality,
        description=description,
        **extra,
    )
    uploaded = orthanc.upload(tmp_path / "other.dcm")
    # Positive condition first: the Lua script has decided about this instance.
    decision = stack.wait(lambda: orthanc.routing(uploaded["ID"]), what="the routing decision")
    assert decision == reason
    stack.wait(lambda: orthanc_jobs_settled(stack), what="Orthanc jobs finished")
    stack.wait(lambda: drained(stack), what="boneage-worker idle", timeout=120)
    assert not any(
        uploaded["ID"] in job["Content"].get("ParentResources", []) for job in orthanc.jobs()
    )
    assert instance_rows(stack.database_url, sop_instance_uid=source.SOPInstanceUID) == []
    assert [i["ID"] for i in orthanc.study_instances(uploaded["ParentStudy"])] == [uploaded["ID"]]


def finished(stack: Stack, source: Dataset, *, what: str) -> Instance:
    """The row of ``source`` once boneage-worker has finished with it."""

    def done() -> Instance | None:
        rows = instance_rows(stack.database_url, sop_instance_uid=source.SOPInstanceUID)
        return next((r for r in rows if r.finished_at is not None), None)

    return stack.wait(done, what=f"boneage-worker finished {what}", timeout=120)


@pytest.mark.parametrize(
    ("body_part", "decision"),
    [
        ("L HAND", "forwarded: body part L_HAND"),
        ("HAND\\WRIST", "forwarded: body part HAND\\WRIST"),
        # the upper limb says no more than nothing: the coded region a DX must have decides
        ("UPPER EXTREMITY", "forwarded: anatomic region SCT 85562004 (Hand)"),
    ],
)
def test_a_hand_written_as_sites_write_it_is_forwarded_and_assessed(
    stack: Stack, tmp_path: Path, body_part: str, decision: str
) -> None:
    """Orthanc's script reads Body Part Examined as our gate does: a side written in, a
    second value, or a region the hand is part of (the script skipped all three, and
    the gate refused them)."""
    orthanc = stack.orthanc
    source = write_radiograph(tmp_path / "hand.dcm", body_part=body_part)
    uploaded = orthanc.upload(tmp_path / "hand.dcm")
    routed = stack.wait(lambda: orthanc.routing(uploaded["ID"]), what="the routing decision")
    assert routed.startswith(decision), routed
    row = finished(stack, source, what="the hand")
    assert row.state is InstanceState.ASSESSED, row.reason


def test_hand_named_only_in_the_description_is_forwarded(stack: Stack, tmp_path: Path) -> None:
    orthanc = stack.orthanc
    source = write_radiograph(tmp_path / "hand.dcm", body_part="", description="XR BONE AGE")
    uploaded = orthanc.upload(tmp_path / "hand.dcm")
    decision = stack.wait(lambda: orthanc.routing(uploaded["ID"]), what="the routing decision")
    assert decision.startswith("forwarded: description mentions the hand or bone age")
    stack.wait(
        lambda: instance_rows(stack.database_url, sop_instance_uid=source.SOPInstanceUID),
        what="boneage-worker received the forwarded image",
    )


def test_a_dx_with_only_its_coded_region_is_forwarded_and_assessed(
    stack: Stack, tmp_path: Path
) -> None:
    """No Body Part Examined (Type 3 in a DX) and no word of a hand in the descriptions:
    the Anatomic Region Sequence a DX must have says Hand, and both Orthanc's script and
    our gate go by it."""
    orthanc = stack.orthanc
    source = write_radiograph(
        tmp_path / "coded.dcm",
        body_part="",
        description="XR",
        region=Code("85562004", "SCT", "Hand"),
    )
    uploaded = orthanc.upload(tmp_path / "coded.dcm")
    decision = stack.wait(lambda: orthanc.routing(uploaded["ID"]), what="the routing decision")
    assert decision.startswith("forwarded: anatomic region SCT 85562004 (Hand)"), decision
    row = finished(stack, source, what="the coded hand")
    assert row.state is InstanceState.ASSESSED, row.reason


def test_chest_sent_directly_is_not_assessed(stack: Stack, tmp_path: Path) -> None:
    # A PACS that forwards everything still gets no result for a chest: the listener
    # accepts it (so the PACS does not retry) and records why it was not assessed.
    source = write_radiograph(tmp_path / "chest.dcm", body_part="CHEST", description="XR CHEST")
    sent = subprocess.run(
        [
            "storescu",
            "-aet",
            ORTHANC_AE,
            "-aec",
            BONEAGE_AE,
            "127.0.0.1",
            str(stack.port),
            str(tmp_path / "chest.dcm"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr

    def finished() -> Instance | None:
        rows = instance_rows(stack.database_url, sop_instance_uid=source.SOPInstanceUID)
        done = [r for r in rows if r.finished_at is not None]
        return done[0] if done else None

    row = stack.wait(finished, what="the chest recorded as finished", timeout=120)
    assert row.state is InstanceState.NOT_ASSESSED
    assert row.reason == "body part examined is CHEST, not a hand"
    stack.wait(lambda: drained(stack), what="boneage-worker idle", timeout=120)
    found = stack.orthanc.post(
        "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": source.StudyInstanceUID}}
    )
    assert found == [], "a result was sent for an image that was not assessed"


def test_a_rejection_note_at_the_pacs_withdraws_our_results_there(
    stack: Stack, tmp_path: Path
) -> None:
    """A user rejects the hand at the PACS (IHE IOCM: a rejection note stored in the
    study): the shipped Lua script forwards the note, the image is marked rejected, and
    our own notes naming our SR and SC come back into the study (Orthanc keeps them as
    KO; a PACS that applies IOCM hides the SR and SC by it)."""
    orthanc = stack.orthanc
    source = write_radiograph(tmp_path / "hand.dcm", seed=7)
    uploaded = orthanc.upload(tmp_path / "hand.dcm")
    study_id = uploaded["ParentStudy"]
    results = stack.wait(
        lambda: results_in(orthanc, study_id),
        what="our SR and SC in the study at Orthanc",
        timeout=RESULT_TIMEOUT_S,
    )

    note = pacs_rejection_note(source)
    note.save_as(tmp_path / "note.dcm", enforce_file_format=True)
    sent_note = orthanc.upload(tmp_path / "note.dcm")
    decision = stack.wait(lambda: orthanc.routing(sent_note["ID"]), what="the note's routing")
    assert decision.startswith(
        "forwarded: rejection note 113038 (Incorrect Modality Worklist Entry)"
    ), decision

    def ours() -> list[dict[str, Any]] | None:
        found = []
        for item in orthanc.study_instances(study_id):
            tags = orthanc.tags(item["ID"])
            if tags.get("SOPClassUID") == KeyObjectSelectionDocumentStorage and (
                tags.get("Manufacturer") == "boneage-worker"
            ):
                found.append({"ID": item["ID"], **tags})
        return found if len(found) == 2 else None

    # one note of ours per object it withdraws
    notes = stack.wait(ours, what="our rejection notes in the study at Orthanc", timeout=120)
    withdrawn = [
        read_rejection_note(dcmread(BytesIO(orthanc.request("GET", f"/instances/{ko['ID']}/file"))))
        for ko in notes
    ]
    assert all(w is not None and w.code == "113038" for w in withdrawn)
    assert {r.sop_instance_uid for w in withdrawn if w is not None for r in w.references} == {
        results[ComprehensiveSRStorage]["SOPInstanceUID"],
        results[SecondaryCaptureImageStorage]["SOPInstanceUID"],
    }
    for ko in notes:
        assert ko["PatientID"] == source.PatientID
        assert orthanc.routing(ko["ID"]) == f"skipped: received from {BONEAGE_AE}"
    [row] = instance_rows(stack.database_url, sop_instance_uid=source.SOPInstanceUID)
    assert row.state is InstanceState.REJECTED
    assert row.reason == "rejected by the PACS: Incorrect Modality Worklist Entry"


def test_an_expired_retention_note_is_not_forwarded(stack: Stack, tmp_path: Path) -> None:
    """113039: the PACS removes the whole study, our objects with it; forwarded, every
    study it ever expired would come to us."""
    source = write_radiograph(tmp_path / "old.dcm", seed=8)
    note = pacs_rejection_note(source, "113039")
    note.save_as(tmp_path / "note.dcm", enforce_file_format=True)
    uploaded = stack.orthanc.upload(tmp_path / "note.dcm")
    decision = stack.wait(lambda: stack.orthanc.routing(uploaded["ID"]), what="its routing")
    assert decision == (
        "skipped: rejection note 113039 (Data Retention Policy Expired): its study is removed whole"
    )
    stack.wait(lambda: orthanc_jobs_settled(stack), what="Orthanc jobs finished")
    assert instance_rows(stack.database_url, sop_instance_uid=note.SOPInstanceUID) == []


def test_no_patient_values_in_logs(stack: Stack) -> None:
    # Runs last in this module: by now every kind of image has passed both nodes.
    worker_logs = stack.node.log_text()
    orthanc_log = stack.orthanc.log_path.read_text(errors="replace")
    assert "boneage autoforward: instance" in orthanc_log
    for value in PATIENT_VALUES:
        assert value not in worker_logs, f"patient value {value!r} in boneage-worker's logs"
        assert value not in orthanc_log, f"patient value {value!r} in Orthanc's log"
