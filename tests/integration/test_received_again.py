"""An instance received again: assessed again when the copy changes what its result
depends on (a corrected sex or birth date, the body part), with an SR that replaces the
earlier report and the earlier objects not yet sent superseded; left alone when it does
not (transcoded, routed, the name or accession number reconciled)."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import shutil
import subprocess
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from sqlalchemy import select

from db import queries
from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind, Result
from db.schema import utcnow as now
from dicom_io import gate
from dicom_io.content import REPLACED_NOT_ASSESSED_NOTICE, REPLACES_NOTICE
from dicom_io.ko import read_rejection_note
from dicom_io.sc import REPLACES_HEAT_MAP, WITHDRAWN
from dicom_io.scp import ReceivedInstance, spool_path
from dicom_io.uids import LEGACY_ROOT, UidScheme
from tests.conftest import StoreSCP
from tests.dicomtools import dciodvfy_errors, dsrdump
from tests.integration.test_pipeline import (
    another_model,
    attempt_began_before,
    make_runtime,
    reconcile_once,
    spool_instance,
)
from tests.support import free_port, storescu_command
from worker import delivery, pipeline
from worker.delivery import reset_failed, send_deliveries
from worker.listener import Listener, record_instance
from worker.pipeline import IMAGE_INPUTS, assess_instance, assessment_inputs
from worker.reconciler import FAULT_PAUSE
from worker.runtime import Runtime

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def runtime(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    """A node sending to the storescp, on SQLite and on a real PostgreSQL."""
    database: dict[str, Any] = {}
    if request.param == "postgresql":
        database["database_url"] = request.getfixturevalue("postgres_url")
    return make_runtime(tmp_path, tiny_checkpoint, destinations=storescp.destination, **database)


@pytest.fixture
def spooled(tmp_path: Path, tiny_checkpoint: Path) -> Dataset:
    """The phantom hand as spooled, read back."""
    rt = make_runtime(tmp_path, tiny_checkpoint)
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        return dcmread(session.get_one(Instance, instance_id).spool_path)


def received_again(
    rt: Runtime,
    instance_id: int,
    *,
    transfer_syntax: UID | None = None,
    routed_by: str | None = None,
    **attributes: Any,
) -> None:
    """The PACS sends the instance again: its copy in the spool, with ``attributes`` set
    (None removes one), takes the old one's place, and the listener records it.
    ``transfer_syntax``: transcoded; ``routed_by``: a router's private block and
    Source AE Title added."""
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        path = Path(instance.spool_path)
    ds = dcmread(path)
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if transfer_syntax is not None:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    if routed_by is not None:
        ds.file_meta.SourceApplicationEntityTitle = routed_by
        ds.private_block(0x0009, routed_by, create=True).add_new(0x01, "LO", "forwarded")
    copy = path.with_suffix(".again")
    ds.save_as(copy, enforce_file_format=True, implicit_vr=None, little_endian=None)
    bytes_received_again(rt, instance_id, copy.read_bytes())
    copy.unlink()


def bytes_received_again(rt: Runtime, instance_id: int, data: bytes) -> None:
    """``data`` takes the spooled copy's place, as the listener puts a copy received
    again there, and the listener records it as it does (dicom_io.scp)."""
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        path = Path(instance.spool_path)
        received = ReceivedInstance(
            instance.sop_instance_uid,
            instance.sop_class_uid,
            instance.study_instance_uid,
            instance.series_instance_uid,
            instance.modality,
            instance.transfer_syntax_uid,
            instance.calling_ae_title,
            path,
            len(data),
        )
    incoming = path.with_suffix(".incoming")
    incoming.write_bytes(data)
    incoming.replace(path)
    record_instance(rt.database_url, received)


def deliver(rt: Runtime, storescp: StoreSCP, delivery_ids: tuple[int, ...]) -> list[Path]:
    """Send ``delivery_ids`` to the storescp; the files of the objects it received,
    each checked by dciodvfy."""
    before = set(storescp.received())
    outcomes = send_deliveries(rt, list(delivery_ids))
    assert {o.state for o in outcomes.values()} == {"delivered"}, outcomes
    paths = storescp.wait_for_objects(len(before) + len(delivery_ids), timeout=30)
    received = [p for p in paths if p not in before]
    for path in received:
        assert dciodvfy_errors(path) == [], path
    return received


def report_of(paths: list[Path]) -> Dataset:
    [sr] = [ds for ds in map(dcmread, paths) if ds.Modality == "SR"]
    return sr


def heat_map_of(paths: list[Path]) -> Dataset:
    [sc] = [ds for ds in map(dcmread, paths) if ds.Modality == "OT"]
    return sc


def replaced(sr: Dataset) -> list[tuple[str, str, str]]:
    """(study, series, SOP instance) of each report ``sr`` says it replaces."""
    return [
        (study.StudyInstanceUID, series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
        for study in sr.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]


def where(sr: Dataset) -> tuple[str, str, str]:
    return sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPInstanceUID


def results(rt: Runtime, instance_id: int, of: Any = Result.male) -> list[tuple[int, Any]]:
    """(assessment, male) of each result of the instance, in order; another column of
    the result than male where ``of`` names it (``Result.model_id``)."""
    with session_scope(rt.database_url) as session:
        rows = session.execute(
            select(Result.assessment, of)
            .where(Result.instance_id == instance_id)
            .order_by(Result.id)
        )
        return [(assessment, value) for assessment, value in rows]


def test_a_copy_with_the_sex_corrected_is_assessed_again_and_its_sr_replaces_the_first(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_id = spool_instance(runtime, sex="F")
    first = assess_instance(runtime, instance_id)
    assert first.state == "assessed"
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)
    assert "PredecessorDocumentsSequence" not in first_sr

    received_again(runtime, instance_id, PatientSex="M")
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2
    objects = deliver(runtime, storescp, second.delivery_ids)  # dciodvfy: no error
    second_sr = report_of(objects)
    # a new report in the first's series, instance 2, that replaces the first
    assert second_sr.SOPInstanceUID != first_sr.SOPInstanceUID
    assert second_sr.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert [dcmread(p).InstanceNumber for p in objects] == [2, 2]
    assert replaced(second_sr) == [where(first_sr)]
    assert second_sr.PatientSex == "M" and first_sr.PatientSex == "F"
    text = dsrdump(next(p for p in objects if dcmread(p).Modality == "SR"))
    assert REPLACES_NOTICE in text and 'NUM:(,,"Bone age")' in text
    # the new heat map, in the first's series, says it replaces it; the first did not
    second_sc = heat_map_of(objects)
    assert second_sc.SeriesInstanceUID == first_sc.SeriesInstanceUID
    assert second_sc.ImageComments.startswith(REPLACES_HEAT_MAP)
    assert REPLACES_HEAT_MAP not in first_sc.ImageComments
    # both results are kept, the first one's sex as it was assessed
    assert results(runtime, instance_id) == [(1, False), (2, True)]
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.assessment, instance.times_received) == (
            InstanceState.ASSESSED,
            2,
            2,
        )
    # the message delivered again, or the same copy once more: nothing new; a message
    # with no copy received since reads nothing
    reads: list[Path] = []
    read_image = pipeline.read_image

    def reading(path: Path) -> Dataset:
        reads.append(path)
        return read_image(path)

    monkeypatch.setattr(pipeline, "read_image", reading)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert reads == []
    received_again(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False), (2, True)]


def test_the_latency_of_an_assessment_again_counts_from_the_copy_it_answers(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """An image assessed three days ago and corrected today: its second assessment's
    latency, in the metrics and in `boneage-worker status`, is the seconds since the
    corrected copy came, not three days; the first assessment's counts from the first."""
    instance_id = spool_instance(runtime, sex="F")
    first = assess_instance(runtime, instance_id)
    deliver(runtime, storescp, first.delivery_ids)
    days_ago = dt.timedelta(days=3)
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.received_at -= days_ago
        assert instance.finished_at is not None
        instance.finished_at -= days_ago
        for sent in session.scalars(select(Delivery)):
            assert sent.delivered_at is not None
            sent.delivered_at -= days_ago
        first_took = (instance.finished_at - instance.received_at).total_seconds()
        last_sent = max(d.delivered_at for d in session.scalars(select(Delivery)) if d.delivered_at)
        first_delivered = (last_sent - instance.received_at).total_seconds()
    with session_scope(runtime.database_url) as session:
        assert queries.latencies_since(session, now() - 2 * days_ago).to_assessed == [
            pytest.approx(first_took)
        ]

    before = now()
    received_again(runtime, instance_id, PatientSex="M")
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed"
    deliver(runtime, storescp, second.delivery_ids)
    took = (now() - before).total_seconds()
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.assessment_received_at is not None
        assert before <= instance.assessment_received_at <= now()
        hour = queries.latencies_since(session, now() - dt.timedelta(hours=1))
        status = queries.last_hour(session, now())
        days = queries.latencies_since(session, now() - 2 * days_ago)
    [to_assessed], [to_delivered] = hour.to_assessed, hour.to_delivered
    assert 0 <= to_assessed <= to_delivered <= took
    assert (status["processing_p95_s"], status["delivered_p95_s"]) == (to_assessed, to_delivered)
    # over the three days, the first assessment's deliveries too, from the first reception
    assert sorted(days.to_delivered) == sorted([to_delivered, first_delivered])


def test_a_reprocess_counts_its_own_latency_and_leaves_the_first_models_as_it_was(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """A reprocess with another model, within the hour of the first assessment's
    delivery: the first model's deliveries keep their latency from the image's
    reception (they were counted 0 s, from the reprocess, which came after them), and
    the new result's counts from the reprocess."""
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime, sex="F")
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.received_at -= dt.timedelta(minutes=10)  # came ten minutes ago
        first_delivered = (
            max(d.delivered_at for d in session.scalars(select(Delivery)) if d.delivered_at)
            - instance.received_at
        ).total_seconds()
    new = another_model(runtime, tmp_path, 21)
    before = now()
    assert prepare_reprocess(new, [instance_id], send=True) == [instance_id]
    deliver(new, storescp, assess_instance(new, instance_id).delivery_ids)
    took = (now() - before).total_seconds()
    with session_scope(runtime.database_url) as session:
        hour = queries.latencies_since(session, now() - dt.timedelta(hours=1))
    first, second = sorted(hour.to_delivered, reverse=True)
    assert first == pytest.approx(first_delivered) and first >= 600
    assert 0 < second <= took


def test_a_copy_received_while_a_reprocess_not_asked_to_send_waits_is_sent(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """`reprocess` without --send queued the image; the PACS then sends it corrected. The
    reprocess's assessment reads the corrected copy, and what it gives goes to the
    PACS: it is the PACS's correction, not only the reprocess. It was kept unsent."""
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime, sex="F")
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    new = another_model(runtime, tmp_path, 22)
    assert prepare_reprocess(new, [instance_id], send=False) == [instance_id]
    received_again(runtime, instance_id, PatientSex="M")
    outcome = assess_instance(new, instance_id, send=False)  # the reprocess's message
    assert outcome.state == "assessed" and len(outcome.delivery_ids) == 2
    assert report_of(deliver(new, storescp, outcome.delivery_ids)).PatientSex == "M"


def test_a_copy_that_changes_nothing_the_result_depends_on_is_not_assessed_again(
    runtime: Runtime,
) -> None:
    """The PACS forwards the study again, transcoded, with its own attributes added and
    the accession number reconciled with the RIS: one result, no new objects (a PACS
    that corrects that corrects its copies of our SR and SC). A corrected name or ID is
    another patient: test_received_again_identity.py."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        received_again(
            runtime,
            instance_id,
            transfer_syntax=syntax,
            routed_by="ROUTER",
            InstitutionName="Elsewhere",
            PatientSex="F ",  # as padded
            PatientName="PHANTOM^HAND^^ ",  # as padded
            AccessionNumber="ACC-7",
            StudyDescription="XR HAND LEFT",
        )
        assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False)]
    with session_scope(runtime.database_url) as session:
        assert len(list(session.scalars(select(Delivery)))) == 2
        assert session.get_one(Instance, instance_id).times_received == 3


def test_another_models_heat_map_is_withdrawn_when_the_image_is_assessed_again(
    runtime: Runtime, tmp_path: Path, storescp: StoreSCP
) -> None:
    """The image was assessed by model A, sent; the node now runs model B, and a copy with
    the sex corrected comes: B's SR replaces A's, and A's heat-map series gets a notice
    that its bone age no longer stands (B's own heat map replaces nothing of B's)."""
    from models.checkpoint import save_checkpoint, untrained_model

    instance_id = spool_instance(runtime, sex="F")
    first = assess_instance(runtime, instance_id)
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)

    loaded = untrained_model(arch="resnet18", input_size=128, seed=5)
    path = tmp_path / "model-b.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    model_b = Runtime(runtime.settings.model_copy(update={"model": path}))
    received_again(model_b, instance_id, PatientSex="M")
    second = assess_instance(model_b, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 3
    objects = deliver(model_b, storescp, second.delivery_ids)  # dciodvfy: no error
    assert replaced(report_of(objects)) == [where(first_sr)]
    pictures = [ds for ds in map(dcmread, objects) if ds.Modality == "OT"]
    [notice] = [ds for ds in pictures if ds.SeriesInstanceUID == first_sc.SeriesInstanceUID]
    [heat_map] = [ds for ds in pictures if ds is not notice]
    assert notice.InstanceNumber == 2 and notice.ImageComments == (
        f"{WITHDRAWN}: {pipeline.ASSESSED_AGAIN}"
    )
    assert notice.ManufacturerModelName == first_sc.ManufacturerModelName
    assert REPLACES_HEAT_MAP not in heat_map.ImageComments
    assert heat_map.SeriesInstanceUID != first_sc.SeriesInstanceUID


def test_a_reprocess_with_another_model_withdraws_no_heat_map_that_stands(
    runtime: Runtime, tmp_path: Path, storescp: StoreSCP
) -> None:
    """Assessed by model A, assessed again by A after a correction, then reprocessed with
    model B: A's second heat map stands, and B's objects come alone, no notice."""
    from models.checkpoint import save_checkpoint, untrained_model
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime, sex="F")
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    received_again(runtime, instance_id, PatientSex="M")
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)

    loaded = untrained_model(arch="resnet18", input_size=128, seed=6)
    path = tmp_path / "model-b.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    model_b = Runtime(runtime.settings.model_copy(update={"model": path}))
    assert prepare_reprocess(model_b, [instance_id]) == [instance_id]
    third = assess_instance(model_b, instance_id, send=True)
    assert third.state == "assessed"
    objects = deliver(model_b, storescp, third.delivery_ids)
    assert sorted(dcmread(p).Modality for p in objects) == ["OT", "SR"]
    assert WITHDRAWN not in heat_map_of(objects).ImageComments


def test_a_copy_in_another_study_gets_series_of_its_own_there(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS merged or split studies and sent the image again, in study B: the new SR
    and SC go into B in series of their own (a series belongs to one study), the SR names
    the first report in study A, where it is, the first SR and SC are withdrawn in A by
    rejection notes of ours (113038, Incorrect Modality Worklist Entry), and a third
    copy's SR names both reports, with no second note in A."""
    from pydicom.uid import generate_uid

    instance_id = spool_instance(runtime, sex="F")
    with monkeypatch.context() as before:  # made by a release of before revision 0006
        before.setattr(pipeline, "node_uids", lambda rt: UidScheme(LEGACY_ROOT, "unused"))
        first = assess_instance(runtime, instance_id)
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)
    with session_scope(runtime.database_url) as session:
        rows = list(session.scalars(select(Delivery)))
        assert {(d.study_instance_uid, d.series_instance_uid) for d in rows} == {
            (first_sr.StudyInstanceUID, first_sr.SeriesInstanceUID),
            (first_sc.StudyInstanceUID, first_sc.SeriesInstanceUID),
        }
        # as rows from before revision 0006 were: where they went is derived
        for row in rows:
            row.study_instance_uid = row.series_instance_uid = None

    study_b = generate_uid()
    received_again(runtime, instance_id, StudyInstanceUID=study_b)
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 4  # 2 notes in A
    second_objects = deliver(runtime, storescp, second.delivery_ids)  # dciodvfy: no error
    second_sr, second_sc = report_of(second_objects), heat_map_of(second_objects)
    notes = [ds for ds in map(dcmread, second_objects) if ds.Modality == "KO"]
    withdrawn = [read_rejection_note(note) for note in notes]
    assert {note.StudyInstanceUID for note in notes} == {first_sr.StudyInstanceUID}
    assert all(w is not None and w.code == "113038" for w in withdrawn)
    assert sorted(
        (r.study_instance_uid, r.series_instance_uid, r.sop_instance_uid)
        for w in withdrawn
        if w is not None
        for r in w.references
    ) == sorted([where(first_sr), where(first_sc)])
    for new, old in ((second_sr, first_sr), (second_sc, first_sc)):
        assert new.StudyInstanceUID == study_b != old.StudyInstanceUID
        assert new.SeriesInstanceUID != old.SeriesInstanceUID
    assert replaced(second_sr) == [where(first_sr)]  # in study A, where it is
    assert REPLACES_HEAT_MAP not in second_sc.ImageComments  # B held no heat map

    received_again(runtime, instance_id, PatientSex="M")  # still in study B
    third = assess_instance(runtime, instance_id)
    assert len(third.delivery_ids) == 2  # A's objects are withdrawn already; B is its study
    third_objects = deliver(runtime, storescp, third.delivery_ids)
    third_sr, third_sc = report_of(third_objects), heat_map_of(third_objects)
    assert (third_sr.SeriesInstanceUID, third_sr.InstanceNumber) == (
        second_sr.SeriesInstanceUID,
        3,
    )
    assert sorted(replaced(third_sr)) == sorted([where(first_sr), where(second_sr)])
    assert third_sc.SeriesInstanceUID == second_sc.SeriesInstanceUID
    assert third_sc.ImageComments.startswith(REPLACES_HEAT_MAP)

    # `reprocess --study` finds the image by the study it is in now, and by the first
    # (it found it by the first only)
    from worker.reprocess import select_instances

    assert select_instances(runtime, study_uids=[study_b]) == [instance_id]
    assert select_instances(runtime, study_uids=[first_sr.StudyInstanceUID]) == [instance_id]


def test_a_copy_that_cannot_be_assessed_sends_an_sr_withdrawing_the_bone_age(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The site does not send SRs that say an image was not assessed; but a bone age we
    reported no longer stands, so one is sent, replacing the report that gave it."""
    assert not runtime.settings.send_not_assessed
    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    first_objects = deliver(runtime, storescp, first.delivery_ids)
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)

    received_again(runtime, instance_id, BodyPartExamined="CHEST", StudyDescription="CHEST PA")
    second = assess_instance(runtime, instance_id)
    # the SR that withdraws the bone age, and a notice after the heat map that showed it
    assert second.state == "not_assessed" and len(second.delivery_ids) == 2
    paths = deliver(runtime, storescp, second.delivery_ids)  # dciodvfy: no error
    path = next(p for p in paths if dcmread(p).Modality == "SR")
    withdrawal = dcmread(path)
    assert replaced(withdrawal) == [where(first_sr)]
    assert withdrawal.InstanceNumber == 2
    text = dsrdump(path)
    assert "Not assessed: body part examined is CHEST, not a hand" in text, text
    # A viewer shows images, not Predecessor Documents: the notice is instance 2 of the
    # heat map's series, with the series' own attributes, and says why
    notice = heat_map_of(paths)
    assert (notice.SeriesInstanceUID, notice.InstanceNumber) == (first_sc.SeriesInstanceUID, 2)
    for keyword in (
        "SeriesNumber",
        "SeriesDescription",
        "Modality",
        "Manufacturer",
        "ManufacturerModelName",
        "StudyInstanceUID",
        "PatientID",
        "BodyPartExamined",  # the hand's, as the heat map's: the copy says CHEST
    ):
        assert notice[keyword].value == first_sc[keyword].value, keyword
    assert notice.ImageComments == (
        f"{WITHDRAWN}: the image was received again and is not assessed: "
        "body part examined is CHEST, not a hand"
    )
    assert (
        notice.SourceImageSequence[0].ReferencedSOPInstanceUID
        == first_sc.SourceImageSequence[0].ReferencedSOPInstanceUID
    )
    assert notice.LossyImageCompression == "00"
    # its picture is the text, the first line in red, on black: no radiograph
    pixels = notice.pixel_array
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100)
    assert red.any() and (pixels.max(axis=-1) == 0).mean() > 0.8
    with session_scope(runtime.database_url) as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(second.delivery_ids)))
        assert {(d.kind, d.result_id) for d in rows} == {
            (ObjectKind.SR, None),
            (ObjectKind.SC, None),
        }
    # not "… and assessed again", which the SR of an assessment says (found in review)
    assert REPLACED_NOT_ASSESSED_NOTICE in text
    assert REPLACES_NOTICE not in text
    assert 'NUM:(,,"Bone age")' not in text
    assert results(runtime, instance_id) == [(1, False)]  # the first result is kept


def test_a_copy_with_the_missing_sex_recorded_is_assessed(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """Not assessed for want of the sex, with no SR sent: the copy sent once the sex is
    recorded is assessed, and its SR replaces nothing."""
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, missing_sex="reject"
    )
    instance_id = spool_instance(rt, attributes={"PatientSex": ""})
    assert assess_instance(rt, instance_id).state == "not_assessed"
    received_again(rt, instance_id, PatientSex="F")
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "assessed"
    sr = report_of(deliver(rt, storescp, outcome.delivery_ids))
    assert "PredecessorDocumentsSequence" not in sr and sr.InstanceNumber == 2
    assert results(rt, instance_id) == [(2, False)]


def test_corrected_and_corrected_back_each_time_a_new_report_replacing_all_before(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """F, then M, then F again: the third assessment reads what the first did, and is a
    third report all the same (the first one's UIDs are taken)."""
    instance_id = spool_instance(runtime, sex="F")
    reports: list[Dataset] = []
    for sex in ("F", "M", "F"):
        if reports:
            received_again(runtime, instance_id, PatientSex=sex)
        outcome = assess_instance(runtime, instance_id)
        assert outcome.state == "assessed"
        reports.append(report_of(deliver(runtime, storescp, outcome.delivery_ids)))
    assert len({sr.SOPInstanceUID for sr in reports}) == 3
    assert replaced(reports[2]) == [where(reports[0]), where(reports[1])]
    assert results(runtime, instance_id) == [(1, False), (2, True), (3, False)]


def test_an_instance_finished_before_its_inputs_were_recorded_is_left_alone(
    runtime: Runtime,
) -> None:
    """Finished before revision 0004: nothing says what its assessment read."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        session.get_one(Instance, instance_id).inputs_sha256 = None
    received_again(runtime, instance_id, PatientSex="M")
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False)]


#: A value of each VR that needs a particular form (else "X").
_SOME_VALUE: dict[str, Any] = {
    "US": 7,
    "SS": 7,
    "IS": "7",
    "DS": "7",
    "DA": "20000101",
    "TM": "120000",
    "AS": "010Y",
    "UI": "1.2.3",
}


def _inputs(ds: Dataset) -> str:
    return assessment_inputs(ds, gate.check(ds, require_sex=True))


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientSex", "M"),
        ("PatientSex", ""),
        ("PatientBirthDate", "20160101"),
        ("StudyDate", "20250601"),
        ("AcquisitionDate", "20250601"),  # where the study date is missing
        ("PatientAge", "009Y"),  # where the birth date is missing
        ("ImageLaterality", "R"),
        ("BodyPartExamined", "CHEST"),
        ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"),  # CT Image Storage
        ("Manufacturer", "boneage-worker"),
    ],
)
def test_the_inputs_digest_follows_the_patients_facts_and_the_gates_decision(
    spooled: Dataset, keyword: str, value: str
) -> None:
    before = _inputs(spooled)
    if keyword in {"AcquisitionDate", "PatientAge"}:
        del spooled[{"AcquisitionDate": "StudyDate", "PatientAge": "PatientBirthDate"}[keyword]]
        before = _inputs(spooled)
    setattr(spooled, keyword, value)
    assert _inputs(spooled) != before


def test_the_inputs_digest_tells_an_age_in_whole_years_from_the_same_months(
    spooled: Dataset,
) -> None:
    """No birth date: "010Y" gives no SDS, "120M" does, though both are 120 months."""
    del spooled.PatientBirthDate
    spooled.PatientAge = "010Y"
    in_years = _inputs(spooled)
    spooled.PatientAge = "120M"
    assert _inputs(spooled) != in_years


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientName", "OTHER^NAME"),
        ("PatientID", "OTHER-ID"),
        ("AccessionNumber", "A-1"),
        ("StudyID", "9"),
        ("StudyTime", "235959"),
        ("ReferringPhysicianName", "DOE^JANE"),
        ("StudyDescription", "XR HAND 2 VIEWS"),
        ("IssuerOfPatientID", "HOSPITAL-B"),
        ("InstitutionName", "Elsewhere"),
        ("SpecificCharacterSet", "ISO_IR 100"),
    ],
)
def test_the_inputs_digest_leaves_out_what_a_pacs_reconciles(
    spooled: Dataset, keyword: str, value: str
) -> None:
    before = _inputs(spooled)
    setattr(spooled, keyword, value)
    assert _inputs(spooled) == before


@pytest.mark.parametrize("keyword", IMAGE_INPUTS)
def test_the_inputs_digest_changes_with_each_image_attribute_it_covers(
    spooled: Dataset, keyword: str
) -> None:
    """Each attribute counts, and one removed differs from one left empty."""
    ds = spooled
    decision = gate.check(ds, require_sex=True)  # the same, to see the attribute's own part
    if keyword in ds:
        del ds[keyword]
    digests = [assessment_inputs(ds, decision)]
    if "Sequence" in keyword:
        setattr(ds, keyword, [])
        digests.append(assessment_inputs(ds, decision))
        ds[keyword].value = [Dataset()]
        ds[keyword].value[0].LUTExplanation = "X"
    else:
        vr = dictionary_VR(keyword)
        setattr(ds, keyword, None if vr in {"US", "SS"} else "")
        digests.append(assessment_inputs(ds, decision))
        ds[keyword].value = _SOME_VALUE.get(vr, "X")
    digests.append(assessment_inputs(ds, decision))
    assert len(set(digests)) == 3, keyword


def test_the_digest_is_what_the_instance_keeps_and_not_the_values(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime)
    assess_instance(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.inputs_sha256 == _inputs(dcmread(instance.spool_path))


def test_an_instance_that_ended_in_error_is_assessed_again_when_a_corrected_copy_comes(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three attempts failed on something in the header; the same copy sent again is
    left in error, a corrected one is assessed."""
    build = pipeline.build_outputs

    def refusing_sex_f(source: Dataset, *args: Any, **kwargs: Any) -> Any:
        if source.PatientSex == "F":
            raise ValueError("a fault this header brings out")
        return build(source, *args, **kwargs)

    monkeypatch.setattr(pipeline, "build_outputs", refusing_sex_f)
    instance_id = spool_instance(runtime, sex="F")
    for _ in range(pipeline.MAX_ATTEMPTS):
        with pytest.raises(ValueError):
            assess_instance(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.ERROR
    received_again(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "skipped"
    received_again(runtime, instance_id, PatientSex="M")
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert results(runtime, instance_id) == [(2, True)]


def test_an_instance_whose_file_could_not_be_read_is_assessed_when_it_comes_again(
    runtime: Runtime,
) -> None:
    instance_id = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        path = Path(session.get_one(Instance, instance_id).spool_path)
    kept = path.read_bytes()
    path.write_bytes(b"not DICOM at all")
    assert assess_instance(runtime, instance_id).state == "not_assessed"
    bytes_received_again(runtime, instance_id, b"not DICOM at all")  # still nothing to read
    assert assess_instance(runtime, instance_id).state == "skipped"
    bytes_received_again(runtime, instance_id, kept)  # whole
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert results(runtime, instance_id) == [(2, False)]


def test_objects_of_an_earlier_assessment_not_yet_sent_never_go_out(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PACS was away while the first report waited (its SR pending, its SC failed):
    corrected meanwhile, only the second assessment's objects reach it, and
    `retry-deliveries` does not bring the first back. They are superseded once the
    corrected copy is claimed, before its assessment: if that fails, they stay so."""
    instance_id = spool_instance(runtime, sex="F")
    first = assess_instance(runtime, instance_id)
    first_sr, first_sc = first.delivery_ids
    with session_scope(runtime.database_url) as session:
        session.get_one(Delivery, first_sc).state = DeliveryState.FAILED
    received_again(runtime, instance_id, PatientSex="M")

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the device is short of memory")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "build_outputs", failing)
        with pytest.raises(RuntimeError):
            assess_instance(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        superseded = [session.get_one(Delivery, i) for i in first.delivery_ids]
        assert {d.state for d in superseded} == {DeliveryState.SUPERSEDED}
        assert {d.last_error for d in superseded} == {"replaced by assessment 2 before it was sent"}
    assert reset_failed(runtime) == []

    attempt_began_before(runtime, instance_id, FAULT_PAUSE.total_seconds() + 1)
    [again] = reconcile_once(runtime)
    second = assess_instance(runtime, again)
    assert second.state == "assessed"
    outcomes = send_deliveries(runtime, [first_sr, first_sc, *second.delivery_ids])
    assert outcomes[first_sr].state == outcomes[first_sc].state == "skipped"
    received = storescp.wait_for_objects(2, timeout=30)
    assert {dcmread(p).PatientSex for p in received} == {"M"}
    # the PACS never had the first report: to it, this one is the first
    [sr] = [p for p in received if dcmread(p).Modality == "SR"]
    assert "PredecessorDocumentsSequence" not in dcmread(sr)
    assert REPLACES_NOTICE not in dsrdump(sr)
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).assessment == 2


def _staged_report(rt: Runtime, delivery_ids: tuple[int, ...]) -> Dataset:
    """The SR among ``delivery_ids``, as written to the outbox."""
    with session_scope(rt.database_url) as session:
        rows = [session.get_one(Delivery, delivery_id) for delivery_id in delivery_ids]
        [path] = [row.path for row in rows if row.kind is ObjectKind.SR]
    return dcmread(path)


def test_an_earlier_report_on_its_way_when_the_image_is_assessed_again_is_named(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first SR is on its way to the PACS when the corrected copy is assessed: it
    may arrive, so the new SR names it among those it replaces and says so. It does
    arrive, and the PACS holds both, the second naming the first."""
    instance_id = spool_instance(runtime, sex="F")
    first = assess_instance(runtime, instance_id)
    first_sr = first.delivery_ids[0]
    on_its_way, assessed = threading.Event(), threading.Event()
    send = delivery.send_datasets

    def held_until_assessed(*args: Any, **kwargs: Any) -> Any:
        on_its_way.set()
        assert assessed.wait(timeout=60)
        return send(*args, **kwargs)

    outcomes: dict[int, Any] = {}
    with monkeypatch.context() as patch:
        patch.setattr(delivery, "send_datasets", held_until_assessed)
        sender = threading.Thread(
            target=lambda: outcomes.update(send_deliveries(runtime, [first_sr]))
        )
        sender.start()
        try:
            assert on_its_way.wait(timeout=30)
            received_again(runtime, instance_id, PatientSex="M")
            second = assess_instance(runtime, instance_id)
        finally:
            assessed.set()
            sender.join(timeout=60)
    assert second.state == "assessed"
    assert outcomes[first_sr].state == "delivered"  # superseded on its way, and arrived
    [arrived] = storescp.wait_for_objects(1, timeout=30)
    [sr_path] = [
        path
        for path in deliver(runtime, storescp, second.delivery_ids)
        if dcmread(path).Modality == "SR"
    ]
    assert replaced(dcmread(sr_path)) == [where(dcmread(arrived))]
    assert REPLACES_NOTICE in dsrdump(sr_path)


def test_a_send_that_fails_after_its_object_was_superseded_leaves_it_so(
    runtime: Runtime,
) -> None:
    """Superseded while it was being sent, and the send failed: not tried again, and a
    later report does not name it (the PACS never had it)."""
    instance_id = spool_instance(runtime, sex="F")
    [first_sr, _] = assess_instance(runtime, instance_id).delivery_ids
    claimed, _ = delivery._claim(runtime, [first_sr], force=False)  # on its way
    assert [row.id for row in claimed] == [first_sr]
    received_again(runtime, instance_id, PatientSex="M")
    second = assess_instance(runtime, instance_id)
    # made while the first was on its way, the second names it: it might arrive
    assert len(replaced(_staged_report(runtime, second.delivery_ids))) == 1
    outcome = delivery._record_failure(runtime, first_sr, "association aborted")
    assert outcome.state == "skipped"
    with session_scope(runtime.database_url) as session:
        row = session.get_one(Delivery, first_sr)
        assert (row.state, row.next_attempt_at, row.sending_since) == (
            DeliveryState.SUPERSEDED,
            None,
            None,
        )
    received_again(runtime, instance_id, PatientSex="F")
    third = assess_instance(runtime, instance_id)
    assert third.state == "assessed"
    # neither earlier report reached the PACS: to it, the third is the first
    assert replaced(_staged_report(runtime, third.delivery_ids)) == []


def _received_again_at(rt: Runtime, instance_id: int) -> dt.datetime | None:
    with session_scope(rt.database_url) as session:
        return session.get_one(Instance, instance_id).received_again_at


def test_a_corrected_copy_whose_message_was_lost_is_taken_up_by_the_reconciler(
    runtime: Runtime,
) -> None:
    """The listener recorded the copy, and its message was lost (the broker away across
    a restart): once the inference queue is empty and the copy has waited as long as a
    lost message does, the reconciler queues it, and it is compared and assessed."""
    instance_id = spool_instance(runtime, sex="F")
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert _received_again_at(runtime, instance_id) is None
    received_again(runtime, instance_id, PatientSex="M")  # ... and no assess message
    assert _received_again_at(runtime, instance_id) is not None
    assert reconcile_once(runtime, inference_queue_empty=True) == []  # it may be on its way
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        waited = dt.timedelta(seconds=runtime.settings.requeue_after_seconds + 1)
        instance.received_again_at = now() - waited
    assert reconcile_once(runtime) == []  # the queue is not empty: it may be in it
    assert reconcile_once(runtime, inference_queue_empty=True) == [instance_id]
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert results(runtime, instance_id) == [(1, False), (2, True)]
    assert _received_again_at(runtime, instance_id) is None
    assert reconcile_once(runtime, inference_queue_empty=True) == []


def test_a_copy_compared_and_left_alone_is_not_queued_again(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    received_again(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert _received_again_at(runtime, instance_id) is None


def test_a_copy_received_before_the_assessment_began_is_the_one_it_read(
    runtime: Runtime,
) -> None:
    """Received twice before any worker took it up: its assessment reads the newest
    copy, and nothing is left to compare."""
    instance_id = spool_instance(runtime)
    received_again(runtime, instance_id, PatientSex="M")
    assert _received_again_at(runtime, instance_id) is not None
    assert assess_instance(runtime, instance_id).state == "assessed"
    assert results(runtime, instance_id) == [(1, True)]
    assert _received_again_at(runtime, instance_id) is None


@contextlib.contextmanager
def listening(rt: Runtime) -> Iterator[int]:
    """The listener of ``rt``'s node as `listen` wires it (worker.listener.Listener), its
    SCP alone started, on a free loopback port; its port."""
    settings = rt.settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    listener = Listener(settings)
    listener.scp.start()
    try:
        yield listener.scp.port
    finally:
        listener.scp.stop()


def sent(port: int, *files: Path) -> None:
    """``files`` sent to the listener on ``port`` by dcmtk's storescu, each answered."""
    done = subprocess.run(
        storescu_command(port, *files), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_copy_received_after_the_data_directory_moved_is_the_one_compared(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The data directory was moved (BONEAGE_DATA_DIR changed, nothing left at its old
    place) after the image was assessed; the PACS sends a copy with the sex corrected.
    The row names the copy where the listener put it, and it is assessed again (the row
    named the old place: the copy was taken for a file retention removed)."""
    instance_id = spool_instance(runtime, sex="F")
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        corrected = dcmread(session.get_one(Instance, instance_id).spool_path)
    corrected.PatientSex = "M"
    corrected.save_as(tmp_path / "corrected.dcm", enforce_file_format=True)
    (tmp_path / "moved").mkdir()
    shutil.move(runtime.settings.data_dir, tmp_path / "moved" / "data")
    database = (
        {} if runtime.settings.database_url is None else {"database_url": runtime.database_url}
    )
    moved = make_runtime(
        tmp_path / "moved", tiny_checkpoint, destinations=storescp.destination, **database
    )

    with listening(moved) as port:
        sent(port, tmp_path / "corrected.dcm")
    with session_scope(moved.database_url) as session:
        row = session.get_one(Instance, instance_id)
        assert row.spool_path == str(spool_path(moved.settings.spool_dir, row.sop_instance_uid))
    outcome = assess_instance(moved, instance_id)
    assert outcome.state == "assessed", outcome
    assert results(moved, instance_id) == [(1, False), (2, True)]


# -- other pixels under the same UIDs ----------------------------------------------------


def stored_pixels(rt: Runtime, instance_id: int) -> np.ndarray:
    """The stored values of the instance's copy in the spool."""
    with session_scope(rt.database_url) as session:
        return dcmread(session.get_one(Instance, instance_id).spool_path).pixel_array


def transcoded_again(rt: Runtime, instance_id: int, syntax: UID, **options: Any) -> None:
    """The PACS sends the instance again compressed in ``syntax`` (``options``: the
    encoder's, a lossy ratio say), as the listener receives it."""
    with session_scope(rt.database_url) as session:
        path = Path(session.get_one(Instance, instance_id).spool_path)
    ds = dcmread(path)
    plugin = "pydicom" if syntax == RLELossless else "pylibjpeg"
    ds.compress(syntax, encoding_plugin=plugin, **options)
    if syntax == JPEG2000:
        ds.LossyImageCompression = "01"
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    bytes_received_again(rt, instance_id, buffer.getvalue())


def test_a_copy_with_other_pixels_under_the_same_uids_is_assessed_again(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """A modality that processes an image again, or sends another one, under the UIDs
    it gave the first, breaks the standard: the report on the pixels no longer in the
    PACS is replaced all the same, though the header changed nothing."""
    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    first_sr = report_of(deliver(runtime, storescp, first.delivery_ids))

    stored = stored_pixels(runtime, instance_id)
    received_again(runtime, instance_id, PixelData=np.ascontiguousarray(stored[:, ::-1]).tobytes())
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed"
    second_sr = report_of(deliver(runtime, storescp, second.delivery_ids))
    assert replaced(second_sr) == [where(first_sr)]
    assert results(runtime, instance_id) == [(1, False), (2, False)]

    # sent once more as it is now: nothing more
    received_again(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False), (2, False)]


@pytest.mark.parametrize(
    ("syntax", "options"),
    [(RLELossless, {}), (JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [20]})],
    ids=["rle", "jpeg2000-lossless", "jpeg2000-lossy-20-to-1"],
)
def test_a_copy_transcoded_is_not_assessed_again(
    runtime: Runtime, syntax: UID, options: dict[str, Any]
) -> None:
    """Transcoded by the PACS, losslessly or not, the image is the one assessed: its
    pixels are compared as a picture, not as bytes."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    before = stored_pixels(runtime, instance_id)
    transcoded_again(runtime, instance_id, syntax, **options)
    after = stored_pixels(runtime, instance_id)
    # lossy indeed where it says so: the stored values differ
    assert np.array_equal(after, before) == (syntax != JPEG2000)
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False)]
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).received_again_at is None  # compared


def test_a_copy_whose_pixels_cannot_be_decoded_withdraws_the_bone_age(runtime: Runtime) -> None:
    """The PACS now holds an image no one can assess: the bone age given for the one
    before no longer stands."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    stored = stored_pixels(runtime, instance_id)
    received_again(runtime, instance_id, PixelData=stored.tobytes()[: stored.nbytes // 2])
    second = assess_instance(runtime, instance_id)
    assert second.state == "not_assessed"
    assert "pixel data cannot be decoded" in (second.reason or "")
    assert results(runtime, instance_id) == [(1, False)]


def test_an_instance_assessed_before_its_pixels_were_pictured_is_compared_by_its_header(
    runtime: Runtime,
) -> None:
    """Assessed before revision 0007: nothing says what pixels its assessment read, and
    a copy with the same header is left alone, as before."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.pixels_signature is not None
        assert len(instance.pixels_signature) == pipeline.SIGNATURE_CELLS**2
        instance.pixels_signature = None
    stored = stored_pixels(runtime, instance_id)
    received_again(runtime, instance_id, PixelData=np.ascontiguousarray(stored[::-1]).tobytes())
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False)]


def test_a_large_image_with_no_window_transcoded_back_and_forth_is_assessed_once(
    runtime: Runtime,
) -> None:
    """With no window in the header the display image is windowed on its own
    percentiles, which move when JPEG 2000 is decoded at a reduced level (smoother than
    averaged blocks): a PACS alternating the syntaxes of the same pixels sent a new SR
    each time, when pictures were compared in grey levels."""
    instance_id = spool_instance(
        runtime, size=2048, attributes={"WindowCenter": None, "WindowWidth": None}
    )
    with session_scope(runtime.database_url) as session:
        original = Path(session.get_one(Instance, instance_id).spool_path).read_bytes()
    assert assess_instance(runtime, instance_id).state == "assessed"
    before = stored_pixels(runtime, instance_id)
    for _ in range(2):
        transcoded_again(runtime, instance_id, JPEG2000Lossless)
        assert np.array_equal(stored_pixels(runtime, instance_id), before)  # lossless
        assert assess_instance(runtime, instance_id).state == "skipped"
        bytes_received_again(runtime, instance_id, original)
        assert assess_instance(runtime, instance_id).state == "skipped"
    assert results(runtime, instance_id) == [(1, False)]


def test_a_good_copy_after_one_that_could_not_be_decoded_brings_the_bone_age_back(
    runtime: Runtime,
) -> None:
    instance_id = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        original = Path(session.get_one(Instance, instance_id).spool_path).read_bytes()
    assert assess_instance(runtime, instance_id).state == "assessed"
    stored = stored_pixels(runtime, instance_id)
    broken = stored.tobytes()[: stored.nbytes // 2]
    received_again(runtime, instance_id, PixelData=broken)
    assert assess_instance(runtime, instance_id).state == "not_assessed"
    received_again(runtime, instance_id, PixelData=broken)  # the same broken copy: nothing new
    assert assess_instance(runtime, instance_id).state == "skipped"

    bytes_received_again(runtime, instance_id, original)  # the PACS sends the good one
    third = assess_instance(runtime, instance_id)
    assert third.state == "assessed"
    assert results(runtime, instance_id) == [(1, False), (3, False)]


def test_a_read_error_while_comparing_leaves_the_copy_to_be_compared(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error reading the copy's pixels (EIO, a stale NFS handle) is trouble the
    task retries, not a copy found unchanged and forgotten."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    stored = stored_pixels(runtime, instance_id)
    received_again(runtime, instance_id, PixelData=np.ascontiguousarray(stored[:, ::-1]).tobytes())
    decode = pipeline._decode

    def failing(rt: Runtime, ds: Dataset) -> np.ndarray:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pipeline, "_decode", failing)
    with pytest.raises(OSError):
        assess_instance(runtime, instance_id)
    assert _received_again_at(runtime, instance_id) is not None  # still to be compared
    monkeypatch.setattr(pipeline, "_decode", decode)
    assert assess_instance(runtime, instance_id).state == "assessed"  # the task's retry
    assert results(runtime, instance_id) == [(1, False), (2, False)]


def test_a_copy_whose_assessment_failed_is_not_taken_up_again_when_sent_once_more(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its pixels are recorded with the claim, as its header's digest is: the same copy
    sent again opens no third assessment (`reprocess` tries it again)."""
    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    flipped = _failed_after_a_corrected_copy(runtime, runtime, instance_id, monkeypatch)

    received_again(runtime, instance_id, PixelData=flipped)
    assert assess_instance(runtime, instance_id).state == "skipped"
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.assessment) == (InstanceState.ERROR, 2)


def _failed_after_a_corrected_copy(
    runtime: Runtime, model: Runtime, instance_id: int, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    """The PACS sends the image again with other pixels, which opens assessment 2, and
    each of its attempts by ``model`` fails: the instance ends in `error`. Returns the
    copy's pixel data."""
    flipped = np.ascontiguousarray(stored_pixels(runtime, instance_id)[:, ::-1]).tobytes()
    received_again(runtime, instance_id, PixelData=flipped)

    def fault(*_: Any, **__: Any) -> Any:
        raise RuntimeError("the model failed")

    with monkeypatch.context() as patched:
        patched.setattr(Runtime, "predict", fault)
        for _ in range(pipeline.MAX_ATTEMPTS):
            with pytest.raises(RuntimeError):
                assess_instance(model, instance_id)
            attempt_began_before(runtime, instance_id, FAULT_PAUSE.total_seconds() + 1)
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.assessment) == (InstanceState.ERROR, 2)
        assert instance.received_again_at is None  # compared: nothing waits
    return flipped


def test_an_assessment_again_that_ended_in_error_is_reprocessed_by_the_model_of_the_first(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Assessed and sent; a copy with other pixels opened assessment 2, whose three
    attempts failed. `reprocess --instance ID --send`, the remedy `status` gives for an
    image in error, assesses it again and sends a report that replaces the first. It
    used to take the first assessment's result of the same model for this one's and queue
    nothing: the PACS kept the report on pixels it no longer holds."""
    from worker.reprocess import files_removed, kept_unsent, prepare_reprocess

    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    first_sr = report_of(deliver(runtime, storescp, first.delivery_ids))
    _failed_after_a_corrected_copy(runtime, runtime, instance_id, monkeypatch)

    assert kept_unsent(runtime, [instance_id]) == []  # the first result went
    assert prepare_reprocess(runtime, [instance_id], send=True) == [instance_id]
    assert files_removed(runtime, [instance_id], send=True) == []
    again = assess_instance(runtime, instance_id)
    assert again.state == "assessed" and len(again.delivery_ids) == 2
    second_sr = report_of(deliver(runtime, storescp, again.delivery_ids))
    assert replaced(second_sr) == [where(first_sr)]
    model = runtime.predictor.model_id
    assert results(runtime, instance_id, Result.model_id) == [(1, model), (2, model)]
    # done now: the same command again queues nothing
    assert prepare_reprocess(runtime, [instance_id], send=True) == []


def test_rolling_back_to_the_first_model_assesses_what_the_next_assessed_again(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """Model A assessed the image; the workers then ran model B (a reprocess sent its
    result too), and B assessed a corrected copy. Rolled back to A, `reprocess --send`
    assesses that copy with A: A's result stands for the image as it was, not as it is.
    It used to be skipped as already assessed by A."""
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime, sex="F")
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    model_b = another_model(runtime, tmp_path, 23)
    assert prepare_reprocess(model_b, [instance_id], send=True) == [instance_id]
    deliver(model_b, storescp, assess_instance(model_b, instance_id).delivery_ids)
    received_again(runtime, instance_id, PatientSex="M")
    corrected = assess_instance(model_b, instance_id)
    assert corrected.state == "assessed"
    deliver(model_b, storescp, corrected.delivery_ids)

    assert prepare_reprocess(runtime, [instance_id], send=True) == [instance_id]
    back = assess_instance(runtime, instance_id)
    assert back.state == "assessed" and len(back.delivery_ids) == 2
    sr = report_of(deliver(runtime, storescp, back.delivery_ids))
    assert sr.PatientSex == "M"
    a, b = runtime.predictor.model_id, model_b.predictor.model_id
    assert results(runtime, instance_id, Result.model_id) == [(1, a), (1, b), (2, b), (2, a)]


def test_an_assessment_again_in_error_whose_image_retention_removed_is_said_to_be_so(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and retention then removed the received image: `reprocess` cannot
    assess it, and names it among those whose images are gone (send it again from the
    PACS), not among those its model assessed already, which the first result used to
    make it."""
    from worker.reprocess import files_removed, prepare_reprocess

    instance_id = spool_instance(runtime)
    deliver(runtime, storescp, assess_instance(runtime, instance_id).delivery_ids)
    _failed_after_a_corrected_copy(runtime, runtime, instance_id, monkeypatch)
    with session_scope(runtime.database_url) as session:
        session.get_one(Instance, instance_id).files_removed_at = now()

    assert prepare_reprocess(runtime, [instance_id], send=True) == []
    assert files_removed(runtime, [instance_id]) == [instance_id]
