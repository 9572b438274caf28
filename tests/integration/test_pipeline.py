"""The assess and deliver functions, called directly, against real files, db and storescp."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import (
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)
from sqlalchemy import select, update

from db import queries
from db.engine import session_scope, upgrade
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind, Result
from db.schema import utcnow as now
from dicom_io import pixels
from dicom_io.scp import ReceivedInstance, spool_path
from dicom_io.synthetic import make_radiograph_dataset
from models.phantoms import make_phantom
from tests.conftest import StoreSCP, sessions_waiting_on_a_lock
from tests.dicomtools import dciodvfy_errors, dsr2html, dsrdump
from tests.support import free_port, wait_for
from worker import pipeline, tasks
from worker.delivery import deliver_one, reset_failed, send_deliveries
from worker.heartbeat import HeartbeatThread, process_name
from worker.listener import record_instance
from worker.pipeline import RETRIED_BY_THE_TASK, assess_instance, warm_up
from worker.reconciler import FAULT_PAUSE, reconcile
from worker.runtime import Runtime
from worker.settings import load_settings

pytestmark = pytest.mark.integration


def spool_instance(
    rt: Runtime,
    *,
    modality: str = "DX",
    sex: str = "F",
    size: int = 256,
    frames: int = 1,
    attributes: dict[str, Any] | None = None,
) -> int:
    """Spool a phantom hand and record it as received; its instance id.

    With ``frames`` > 1 it is the first frame of a multi-frame grey SC, whose other
    frames are the same hand inverted. ``attributes`` are set on the dataset last (None:
    removed; bytes: written as they are, a value pydicom would refuse to write).
    """
    phantom = make_phantom(100.0, male=sex == "M", size=size, rng=np.random.default_rng(3))
    stored = np.round(phantom.image * 4095).astype(np.uint16)
    ds = make_radiograph_dataset(
        stored,
        modality=modality,
        sex=sex,
        birth_date=dt.date(2017, 1, 1),
        study_date=dt.date(2025, 5, 1),
    )
    if frames > 1:
        ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.NumberOfFrames = frames
        ds.PixelData = stored.tobytes() + (4095 - stored).tobytes() * (frames - 1)
    for keyword, value in (attributes or {}).items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        elif isinstance(value, bytes):
            tag = Tag(keyword)
            value += b" " * (len(value) % 2)
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(value), value, 0, False, True)
        else:
            setattr(ds, keyword, value)
    return spool_dataset(rt, ds, modality=modality)


def spool_dataset(rt: Runtime, ds: Dataset, *, modality: str | None = None) -> int:
    """Spool ``ds`` as the listener does and record it as received; its instance id."""
    path = spool_path(rt.settings.spool_dir, ds.file_meta.MediaStorageSOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return record_instance(  # what the listener records of it (dicom_io.scp)
        rt.database_url,
        ReceivedInstance(
            ds.file_meta.MediaStorageSOPInstanceUID,
            ds.file_meta.MediaStorageSOPClassUID,
            str(ds.get("StudyInstanceUID") or ""),
            str(ds.get("SeriesInstanceUID") or ""),
            modality,
            str(ds.file_meta.TransferSyntaxUID),
            "PACS",
            path,
            path.stat().st_size,
        ),
    )


def state_and_reason(rt: Runtime, instance_id: int) -> tuple[InstanceState, str | None]:
    """What the instance's row says now: its state and its reason."""
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        return instance.state, instance.reason


def make_runtime(tmp_path: Path, tiny_checkpoint: Path, **settings: Any) -> Runtime:
    """A node's runtime on the tiny model, its database migrated; ``settings`` override."""
    loaded = load_settings(data_dir=tmp_path / "data", model=tiny_checkpoint, **settings)
    upgrade(loaded.effective_database_url)
    return Runtime(loaded)


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP) -> Runtime:
    return make_runtime(
        tmp_path,
        tiny_checkpoint,
        destinations=storescp.destination,
        delivery_max_attempts=2,
        delivery_backoff_seconds=1,
    )


def _device_observer_uid(sr: Dataset) -> str:
    """The Device Observer UID of an SR of ours (TID 1004, in its observer context)."""
    [uid] = [
        str(item.UID)
        for item in sr.ContentSequence
        if item.ValueType == "UIDREF" and item.ConceptNameCodeSequence[0].CodeValue == "121012"
    ]
    return uid


def test_every_process_of_a_node_names_the_same_device(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two worker processes of one node (one database) on two hosts, or in two
    containers, name one device in their SRs (found in review: derived from the host
    name, each container, and each redeployment, made a device of its own); another
    node names another."""
    here = make_runtime(tmp_path / "a", tiny_checkpoint)
    there = make_runtime(tmp_path / "b", tiny_checkpoint, database_url=here.database_url)
    elsewhere = make_runtime(tmp_path / "c", tiny_checkpoint)
    devices = []
    for host, rt in (("gpu-host-1", here), ("gpu-host-2", there), ("gpu-host-1", elsewhere)):
        monkeypatch.setattr("socket.gethostname", lambda host=host: host)
        assert assess_instance(rt, spool_instance(rt)).state == "assessed"
        [made] = rt.settings.outbox_dir.glob("*sr*.dcm")  # no destination: made, not sent
        devices.append(_device_observer_uid(dcmread(made)))
    assert devices[0] == devices[1] == here.device_observer_uid
    assert devices[2] != devices[0]


def test_assess_then_deliver_sr_and_sc(runtime: Runtime, storescp: StoreSCP) -> None:
    instance_id = spool_instance(runtime)
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed"
    assert len(outcome.delivery_ids) == 2

    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.state is InstanceState.ASSESSED
        [result] = session.scalars(select(Result))
        assert result.model_id == runtime.predictor.model_id
        assert 0 <= result.bone_age_months <= 240
        assert result.chronological_age_months == pytest.approx(100.0, abs=0.01)
        assert result.sds is not None
        deliveries = list(session.scalars(select(Delivery)))
    for d in deliveries:
        assert dciodvfy_errors(Path(d.path)) == []
        assert deliver_one(runtime, d.id).state == "delivered"

    received = storescp.wait_for_objects(2, timeout=30)
    by_modality = {dcmread(p).Modality: p for p in received}
    source = dcmread(spool_path(runtime.settings.spool_dir, instance.sop_instance_uid))
    for path in received:
        assert dcmread(path).StudyInstanceUID == source.StudyInstanceUID
        assert dcmread(path).SeriesInstanceUID != source.SeriesInstanceUID
    text = dsrdump(by_modality["SR"])
    assert "Bone age" in text
    shown = re.search(r'NUM:\(,,"Bone age"\)="([0-9.]+)" \(mo,UCUM', text)
    assert shown is not None and float(shown.group(1)) == pytest.approx(
        result.bone_age_months, abs=0.01
    )
    assert "UNTRAINED" in text  # the tiny checkpoint is random weights and says so
    html = dsr2html(by_modality["SR"])
    assert "Bone age" in html and "UNTRAINED MODEL - NOT FOR CLINICAL USE" in html
    assert (
        dcmread(by_modality["OT"] if "OT" in by_modality else received[1]).BurnedInAnnotation
        == "YES"
    )


def test_the_source_gives_up_its_pixels_once_decoded(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batching worker holds as many studies at once as it has task threads: each keeps
    # its source for the SR and SC, but not the stored pixels (dicom_io.pixels tests that
    # pydicom's decoded copy goes with them).
    seen: list[bool] = []
    stage_outputs = pipeline.stage_outputs

    def staging(source: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append("PixelData" in source)
        return stage_outputs(source, *args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_outputs", staging)
    outcome = assess_instance(runtime, spool_instance(runtime))
    assert outcome.state == "assessed"
    assert seen == [False]


def test_an_instance_of_several_frames_is_assessed_on_its_first_read_alone(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same hand as a single frame and as the first of four: the same bone age, and
    # of the four only the first was read from the file (dicom_io.pixels tests that the
    # memory this takes does not grow with the frames).
    monkeypatch.setattr(pixels, "DEFERRED_BYTES", 1024)  # these small frames stay there too
    left_in_file: list[bool] = []
    decode = pixels.decode_for_display  # what pixels.decode_as_assessed calls

    def decoding(source: Any, **kwargs: Any) -> Any:
        image = decode(source, **kwargs)
        left_in_file.append(source.get_item(0x7FE00010, keep_deferred=True).value is None)
        return image

    monkeypatch.setattr(pixels, "decode_for_display", decoding)
    single = spool_instance(runtime)
    several = spool_instance(runtime, frames=4)
    assert assess_instance(runtime, single).state == "assessed"
    assert assess_instance(runtime, several).state == "assessed"
    assert left_in_file == [False, True]
    with session_scope(runtime.database_url) as session:
        ages = {r.instance_id: r.bone_age_months for r in session.scalars(select(Result))}
        outputs = {(d.instance_id, d.kind): Path(d.path) for d in session.scalars(select(Delivery))}
    assert ages[several] == ages[single]
    assert len(outputs) == 4
    for path in outputs.values():
        assert dciodvfy_errors(path) == []
    # The SR's image and the SC's source name the frame assessed (Type 1C), only where
    # the image has several
    for instance_id, frames in ((single, None), (several, [1])):
        sr = dcmread(outputs[instance_id, ObjectKind.SR])
        [image] = [
            item
            for group in sr.ContentSequence
            if group.ValueType == "CONTAINER"
            for finding in group.get("ContentSequence", [])
            for item in finding.get("ContentSequence", [])
            if item.ValueType == "IMAGE"
        ]
        [referenced] = image.ReferencedSOPSequence
        sc = dcmread(outputs[instance_id, ObjectKind.SC])
        [derived_from] = sc.SourceImageSequence
        for reference in (referenced, derived_from):
            shown = reference.get("ReferencedFrameNumber")
            assert (None if shown is None else [int(shown)]) == frames


def test_an_instance_received_again_while_read_is_read_again_not_mixed(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener puts the same instance received again where the first copy was. If
    # that happens between reading the header and reading the pixels, the pixels must not
    # be read behind the first copy's header: the attempt raises an OSError (which the
    # task retries), and the next attempt reads the new file throughout.
    monkeypatch.setattr(pixels, "DEFERRED_BYTES", 1024)
    instance_id = spool_instance(runtime, frames=2)
    with session_scope(runtime.database_url) as session:
        spool = Path(session.get_one(Instance, instance_id).spool_path)
    reduction = pixels.decode_reduction  # called after the header, before the pixels

    def received_again_meanwhile(source: Any, **kwargs: Any) -> Any:
        again = spool.with_name("incoming.dcm")
        shutil.copyfile(spool, again)
        os.replace(again, spool)
        monkeypatch.setattr(pixels, "decode_reduction", reduction)  # once
        return reduction(source, **kwargs)

    monkeypatch.setattr(pixels, "decode_reduction", received_again_meanwhile)
    with pytest.raises(pixels.FileChangedError):
        assess_instance(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "assessed"


@pytest.mark.parametrize(("floor", "columns"), [(None, 1200), (600, 600)])
def test_heat_map_picture_keeps_the_site_floor_on_large_images(
    runtime: Runtime, floor: int | None, columns: int
) -> None:
    # A 1200-px radiograph: at the default floor (1000 px) the heat-map picture keeps
    # every column; at BONEAGE_SC_MIN_LONG_SIDE=600 the image is decoded at half size
    # (the 128-px network still gets enough pixels), and the picture is half as wide.
    rt = runtime
    if floor is not None:
        rt = Runtime(runtime.settings.model_copy(update={"sc_min_long_side": floor}))
    assert rt.settings.sc_min_long_side == (floor or 1000)
    instance_id = spool_instance(rt, size=1200)
    assert assess_instance(rt, instance_id).state == "assessed"
    with session_scope(rt.database_url) as session:
        [sc] = session.scalars(select(Delivery).where(Delivery.kind == ObjectKind.SC))
    picture = dcmread(sc.path)
    assert picture.Columns == columns
    assert picture.Rows > columns  # the radiograph, with the text panel above it
    assert dciodvfy_errors(Path(sc.path)) == []


def test_bfloat16_on_the_cpu_is_recorded_with_each_result(runtime: Runtime) -> None:
    rt = Runtime(runtime.settings.model_copy(update={"precision": "bfloat16"}))
    instance_id = spool_instance(rt)
    assert assess_instance(rt, instance_id).state == "assessed"
    with session_scope(rt.database_url) as session:
        [result] = session.scalars(select(Result))
        paths = [d.path for d in session.scalars(select(Delivery))]
    assert result.device == "cpu, bfloat16"
    assert 0 <= result.bone_age_months <= 240
    assert len(paths) == 2 and all(dciodvfy_errors(Path(path)) == [] for path in paths)
    [sr] = [path for path in paths if dcmread(path).Modality == "SR"]
    assert "precision: bfloat16" in dsrdump(Path(sr))  # the report itself says so


def test_warm_up_loads_what_the_first_study_needs_and_leaves_no_trace(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    # highdicom parses its tables of the standard (22 MB of JSON) on the first SR or SC
    # a process builds; the warm-up is there so that a real study never pays for it.
    from highdicom import _standard_utils

    _standard_utils.get_module_attribute_map.cache_clear()
    assert warm_up(runtime) > 0
    assert _standard_utils.get_module_attribute_map.cache_info().currsize == 1

    outbox = runtime.settings.outbox_dir
    assert not outbox.exists() or not any(outbox.iterdir())
    with session_scope(runtime.database_url) as session:
        for table in (Instance, Result, Delivery):
            assert list(session.scalars(select(table))) == []
    assert storescp.received() == []


def test_assess_is_idempotent(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    assert first.state == "assessed"
    assert assess_instance(runtime, instance_id).state == "skipped"
    # The message comes again while the row says `processing` (a state only a claim
    # beside the committed one, or a reprocess, leaves): this model's result is there,
    # so the attempt makes nothing (it used to assess, then clash with the unique key).
    with session_scope(runtime.database_url) as session:
        session.execute(update(Instance).values(state=InstanceState.PROCESSING))
    again = assess_instance(runtime, instance_id)
    assert (again.state, again.reason) == ("skipped", "already assessed by this worker's model")
    with session_scope(runtime.database_url) as session:
        assert len(list(session.scalars(select(Result)))) == 1
        assert len(list(session.scalars(select(Delivery)))) == 2
        assert session.get_one(Instance, instance_id).state is InstanceState.ASSESSED
    # It left the committed files alone, or their deliveries would fail as damaged.
    assert_outbox_is_what_was_recorded(runtime)


def assert_outbox_is_what_was_recorded(runtime: Runtime) -> None:
    """Every delivery's file has the SHA-256 it recorded; nothing else is left behind."""
    with session_scope(runtime.database_url) as session:
        recorded = {Path(d.path): d.sha256 for d in session.scalars(select(Delivery))}
    assert recorded
    for path, sha256 in recorded.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, path.name
    assert sorted(runtime.settings.outbox_dir.iterdir()) == sorted(recorded)


def test_attempt_beaten_while_it_ran_leaves_the_winners_files(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same instance assessed twice at once (the same study sent twice, a message
    # delivered again while the first attempt runs): the second attempt here is
    # overtaken just before it writes its SR and SC by an attempt that runs to its
    # commit. Its objects have the same UIDs and file names, other bytes.
    instance_id = spool_instance(runtime)
    real_stage = pipeline.stage_outputs
    overtaken: list[pipeline.AssessOutcome] = []

    def overtake_once(*args: Any, **kwargs: Any) -> list[pipeline.Output]:
        if not overtaken:
            monkeypatch.setattr(pipeline, "stage_outputs", real_stage)  # the other runs as is
            overtaken.append(assess_instance(runtime, instance_id))
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(pipeline, "stage_outputs", overtake_once)
    assert assess_instance(runtime, instance_id).state == "duplicate"
    assert [o.state for o in overtaken] == ["assessed"]
    assert_outbox_is_what_was_recorded(runtime)  # the winner's, and no staged file left
    send_deliveries(runtime, list(overtaken[0].delivery_ids))
    with session_scope(runtime.database_url) as session:
        states = [d.state for d in session.scalars(select(Delivery))]
    assert states == [DeliveryState.DELIVERED] * 2


def test_ct_is_accepted_but_not_assessed(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime, modality="CT")
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "not_assessed"
    assert state_and_reason(runtime, instance_id) == (
        InstanceState.NOT_ASSESSED,
        "SOP class CT Image Storage is not a projection radiograph (CR, DX or Secondary Capture)",
    )
    with session_scope(runtime.database_url) as session:
        assert list(session.scalars(select(Result))) == []


def test_a_dx_for_processing_is_accepted_but_not_assessed(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """Raw detector data: recorded with the reason, counted under ``sop_class``, and no
    number; with BONEAGE_SEND_NOT_ASSESSED the SR that says so passes dciodvfy."""
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, send_not_assessed=True
    )
    instance_id = spool_instance(
        rt,
        attributes={
            "SOPClassUID": DigitalXRayImageStorageForProcessing,
            "PresentationIntentType": "FOR PROCESSING",
        },
    )
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "not_assessed"
    state, reason = state_and_reason(rt, instance_id)
    assert state is InstanceState.NOT_ASSESSED
    assert reason is not None and "raw detector data, not for display" in reason
    with session_scope(rt.database_url) as session:
        assert list(session.scalars(select(Result))) == []
        assert queries.not_assessed_by_reason(session)["sop_class"] == 1
    [delivery_id] = outcome.delivery_ids
    assert deliver_one(rt, delivery_id).state == "delivered"
    [received] = storescp.wait_for_objects(1, timeout=30)
    assert "raw detector data" in dsrdump(received)
    assert dciodvfy_errors(received) == []


@pytest.mark.parametrize(
    ("attributes", "category", "quoted"),
    [
        ({"PatientBirthDate": "19900101"}, "age", "35.3 years"),
        ({"PatientSex": "O"}, "sex", "sex is O"),
        ({"BodyPartExamined": "CHEST"}, "body_part", "CHEST"),
    ],
)
def test_the_log_names_a_refusal_by_its_category_and_the_database_keeps_the_reason(
    runtime: Runtime,
    caplog: pytest.LogCaptureFixture,
    attributes: dict[str, Any],
    category: str,
    quoted: str,
) -> None:
    instance_id = spool_instance(runtime, attributes=attributes)
    with caplog.at_level("INFO", logger="worker.pipeline"):
        assert assess_instance(runtime, instance_id).state == "not_assessed"
    state, reason = state_and_reason(runtime, instance_id)
    assert state is InstanceState.NOT_ASSESSED and reason is not None and quoted in reason
    assert f"instance {instance_id} not assessed ({category})" in caplog.text
    assert quoted not in caplog.text


def test_a_file_that_cannot_be_parsed_is_logged_by_its_category(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    instance_id = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        spool = Path(session.get_one(Instance, instance_id).spool_path)
    spool.write_bytes(b"a text file in the spool, not a DICOM one\n")
    with caplog.at_level("INFO", logger="worker.pipeline"):
        assert assess_instance(runtime, instance_id).state == "not_assessed"
    assert state_and_reason(runtime, instance_id)[1] == (
        "the file cannot be parsed as DICOM (InvalidDicomError)"
    )
    assert f"instance {instance_id} not assessed (parse)" in caplog.text


def test_unreachable_destination_retries_then_fails_then_retry_deliveries(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    closed = free_port()
    rt = make_runtime(
        tmp_path,
        tiny_checkpoint,
        destinations=f"PACS@127.0.0.1:{closed}",
        delivery_max_attempts=2,
        delivery_backoff_seconds=0.01,
    )
    delivery_id = assess_instance(rt, spool_instance(rt)).delivery_ids[0]
    first = deliver_one(rt, delivery_id)
    assert first.state == "retry" and first.retry_in == pytest.approx(0.01)
    second = deliver_one(rt, delivery_id, force=True)
    assert second.state == "failed"
    with session_scope(rt.database_url) as session:
        row = session.get_one(Delivery, delivery_id)
        assert row.state is DeliveryState.FAILED and row.attempts == 2
        assert "association" in (row.last_error or "")
        # The PACS is back (at another address, as after a fix of the settings).
        row.destination = storescp.destination
    # the settings fixed too: a destination they no longer name gets none of our SR and SC
    fixed = make_runtime(
        tmp_path,
        tiny_checkpoint,
        destinations=storescp.destination,
        delivery_max_attempts=2,
        delivery_backoff_seconds=0.01,
    )
    assert reset_failed(fixed) == [delivery_id]
    assert deliver_one(fixed, delivery_id).state == "delivered"
    assert len(storescp.received()) == 1


@pytest.mark.parametrize(
    ("character_set", "name"),
    [
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 144", "Иванов^Иван"),
        ("ISO_IR 192", "山田^太郎"),
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    ],
    ids=["Latin-1", "Cyrillic", "UTF-8", "Japanese, ISO 2022", "Korean, ISO 2022"],
)
def test_the_sr_and_sc_keep_the_patients_name_in_the_sources_character_set(
    runtime: Runtime, storescp: StoreSCP, character_set: str | list[str], name: str
) -> None:
    """docs/conformance.md 4: created objects copy the source's Specific Character Set
    and its patient and study text as received; what a viewer shows is the same name.
    (highdicom refuses an empty first value, which Japanese and Korean sites send, and
    the SR and SC were never made for their patients.)"""
    instance_id = spool_instance(
        runtime,
        attributes={
            "SpecificCharacterSet": character_set,
            "PatientName": name,
            "ReferringPhysicianName": name,
        },
    )
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed"
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    received = storescp.wait_for_objects(2, timeout=30)
    for path in received:
        assert dciodvfy_errors(path) == [], path
        written = dcmread(path)
        assert written.SpecificCharacterSet == character_set
        assert str(written.PatientName) == name
        assert str(written.ReferringPhysicianName) == name


def _issuer(**attributes: str) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_the_sr_and_sc_carry_the_issuers_of_the_ids_and_the_study_description(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """docs/conformance.md 4: a PACS serving several hospitals files an object by its
    Patient ID and who issued it; the SR and SC carry the source's issuers, its other
    IDs and its Study Description, and dciodvfy finds nothing wrong with them."""
    other_id = _issuer(PatientID="998877", IssuerOfPatientID="HOSPITAL-B")
    other_id.TypeOfPatientID = "TEXT"
    attributes: dict[str, Any] = {
        "IssuerOfPatientID": "HOSPITAL-A",
        "IssuerOfPatientIDQualifiersSequence": [
            _issuer(UniversalEntityID="1.2.40.0.13.1.1", UniversalEntityIDType="ISO")
        ],
        "OtherPatientIDsSequence": [other_id],
        "IssuerOfAccessionNumberSequence": [_issuer(LocalNamespaceEntityID="RIS-A")],
        "StudyDescription": "XR HAND LEFT BONE AGE",
    }
    instance_id = spool_instance(runtime, attributes=attributes)
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome.reason
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    received = storescp.wait_for_objects(2, timeout=30)
    assert {dcmread(path).Modality for path in received} == {"SR", "OT"}
    for path in received:
        assert dciodvfy_errors(path) == [], path
        written = dcmread(path)
        for keyword, value in attributes.items():
            assert written[keyword].value == value, (path, keyword)


@pytest.mark.parametrize(
    "attributes",
    [
        {"PatientBirthDate": "2015"},
        {"PatientBirthDate": "garbage!", "PatientAge": "010Y"},
        {"PatientSex": "f"},
        {"StudyDate": "20251399"},
        {"StudyTime": "256161"},
        {"ReferringPhysicianName": "Smith^John\\Jones^Ann"},
    ],
    ids=lambda attributes: next(iter(attributes)) + " " + str(next(iter(attributes.values()))),
)
def test_patient_and_study_values_a_modality_got_wrong_are_copied_as_they_came(
    runtime: Runtime, storescp: StoreSCP, attributes: dict[str, str]
) -> None:
    """Values the PACS took from a modality, though the standard forbids them (highdicom
    refused each, and the assessment failed on every attempt, with no SR or SC): the
    image is assessed, and the SR and SC carry the source's value as it came, which is
    all that dciodvfy finds wrong in them."""
    instance_id = spool_instance(runtime, attributes=attributes)
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome.reason
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    with session_scope(runtime.database_url) as session:
        source = dcmread(session.get_one(Instance, instance_id).spool_path)
    keyword = next(iter(attributes))
    for path in storescp.wait_for_objects(2, timeout=30):
        written = dcmread(path)
        assert written[keyword].value == source[keyword].value
        for other in ("PatientID", "PatientName", "StudyInstanceUID", "AccessionNumber"):
            assert written[other].value == source[other].value
        tag = written[keyword].tag
        about_it = (
            f"(0x{tag.group:04x},0x{tag.element:04x})",
            f"<{source[keyword].value}>",
            f"Element=<{keyword}>",
        )
        for error in dciodvfy_errors(path):
            assert any(mark in error for mark in about_it) or error == (
                "Error - Dicom dataset contains invalid data values for Value Representations"
            ), error


@pytest.mark.parametrize("size", [256, 2200], ids=["decoded whole", "decoded reduced"])
def test_pixels_pydicom_cannot_decode_are_not_assessed_with_its_reason(
    runtime: Runtime, size: int
) -> None:
    """Bits Stored over Bits Allocated: at once not assessed, with the reason, whether
    the image is decoded whole or reduced a strip at a time as it is read (where the
    error once escaped, and the task failed, to be tried again until it gave up)."""
    instance_id = spool_instance(runtime, size=size, attributes={"BitsStored": 17})
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "not_assessed"
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.state is InstanceState.NOT_ASSESSED
        assert "pixel data cannot be decoded" in (instance.reason or "")
        assert "'Bits Stored' value of '17' is invalid" in (instance.reason or "")


def test_an_attempt_that_fails_says_where_and_the_error_after_the_last_says_so_too(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault the pipeline does not expect (here in building the outputs) leaves the
    instance `processing` with where the attempt failed, but not the exception's
    message, which may quote the patient; the last of MAX_ATTEMPTS ends the instance in
    error at once, and its reason still says where."""

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("'Müller^Jürgen' is not a valid name")  # as pydicom's may read

    monkeypatch.setattr(pipeline, "build_outputs", failing)
    place = f"tests/integration/test_pipeline.py:{failing.__code__.co_firstlineno + 1} (failing)"
    instance_id = spool_instance(runtime)
    for attempt in range(1, pipeline.MAX_ATTEMPTS):
        with pytest.raises(ValueError):
            assess_instance(runtime, instance_id)
        with session_scope(runtime.database_url) as session:
            instance = session.get_one(Instance, instance_id)
            assert instance.state is InstanceState.PROCESSING
            assert instance.reason == f"attempt {attempt} failed: ValueError in {place}"
            # `status` lists it among the recent problems while it waits
            [problem] = queries.recent_problems(session)
            assert problem["what"] == f"instance {instance_id}"
            assert (problem["state"], problem["reason"]) == ("processing", instance.reason)
    with pytest.raises(ValueError):
        assess_instance(runtime, instance_id)  # the last
    state, reason = state_and_reason(runtime, instance_id)
    assert state is InstanceState.ERROR
    assert reason == (
        f"processing did not complete in {pipeline.MAX_ATTEMPTS} attempts; the last: "
        f"attempt {pipeline.MAX_ATTEMPTS} failed: ValueError in {place}"
    )
    assert "Müller" not in reason
    with session_scope(runtime.database_url) as session:
        [problem] = queries.recent_problems(session)
        assert (problem["state"], problem["reason"]) == ("error", reason)
    # a message delivered again finds it finished
    assert assess_instance(runtime, instance_id).state == "skipped"
    assert state_and_reason(runtime, instance_id) == (InstanceState.ERROR, reason)


def test_an_attempt_that_fails_then_one_that_succeeds_leaves_its_own_reason(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The note of a failed attempt goes when a later one finishes the instance."""
    build = pipeline.build_outputs
    calls: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("SOPInstanceUID")
        return build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_outputs", failing_once)
    instance_id = spool_instance(runtime)
    with pytest.raises(KeyError):
        assess_instance(runtime, instance_id)
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.reason == "assessed by an UNTRAINED model"


def attempt_began_before(rt: Runtime, instance_id: int, seconds: float) -> None:
    """As if the instance's last attempt had begun ``seconds`` ago."""
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        instance.started_at = now() - dt.timedelta(seconds=seconds)


def reconcile_once(rt: Runtime, *, inference_queue_empty: bool = False) -> list[int]:
    """One round of the reconciler; the ids it queued to be assessed again."""
    queued: list[int] = []
    reconcile(rt, queued.append, lambda _: None, inference_queue_empty=inference_queue_empty)
    return queued


def test_an_attempt_that_fails_for_a_fault_gives_the_instance_up_for_a_retry_soon(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault costs its attempt and a pause of a minute, not the half-hour lease of a
    worker that died: the reconciler queues the instance again at its first round once
    FAULT_PAUSE has passed since the attempt began, and the next attempt finishes it."""
    build = pipeline.build_outputs
    calls: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")  # a fault that passes
        return build(*args, **kwargs)

    monkeypatch.setattr(pipeline, "build_outputs", failing_once)
    instance_id = spool_instance(runtime)
    # the worker that made the attempt is alive and well
    HeartbeatThread(runtime.database_url, "worker").beat()
    with pytest.raises(RuntimeError):
        assess_instance(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.claimed_by) == (InstanceState.PROCESSING, None)
    assert reconcile_once(runtime) == []  # the pause is not over
    pause = FAULT_PAUSE.total_seconds()
    attempt_began_before(runtime, instance_id, pause - 5)
    assert reconcile_once(runtime) == []
    attempt_began_before(runtime, instance_id, pause + 1)
    assert reconcile_once(runtime) == [instance_id]
    assert state_and_reason(runtime, instance_id)[0] is InstanceState.QUEUED
    assert assess_instance(runtime, instance_id).state == "assessed"
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).attempts == 2


def test_trouble_the_task_retries_itself_keeps_the_claim(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError (or the database away) is retried by the task with its own back-off;
    the reconciler queueing it too would spend a second attempt of MAX_ATTEMPTS."""

    def disk_trouble(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "build_outputs", disk_trouble)
    instance_id = spool_instance(runtime)
    HeartbeatThread(runtime.database_url, "worker").beat()
    with pytest.raises(OSError):
        assess_instance(runtime, instance_id)
    attempt_began_before(runtime, instance_id, FAULT_PAUSE.total_seconds() + 1)
    assert reconcile_once(runtime) == []
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.claimed_by == process_name("worker")
        assert (instance.reason or "").startswith("attempt 1 failed: OSError in")
    assert set(RETRIED_BY_THE_TASK) == set(tasks.assess.autoretry_for)


def test_missing_spool_file_is_an_error_not_a_crash(runtime: Runtime) -> None:
    instance_id = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        Path(session.get_one(Instance, instance_id).spool_path).unlink()
    assert assess_instance(runtime, instance_id).state == "error"


def test_outbox_has_no_uid_in_file_names(runtime: Runtime) -> None:
    assess_instance(runtime, spool_instance(runtime))
    names = [p.name for p in runtime.settings.outbox_dir.iterdir()]
    assert len(names) == 2 and all(not n.startswith("1.") and "2.25" not in n for n in names)
    shutil.rmtree(runtime.settings.outbox_dir)


def test_not_assessed_sr_is_sent_when_configured(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, send_not_assessed=True
    )
    outcome = assess_instance(rt, spool_instance(rt, modality="CT"))
    assert outcome.state == "not_assessed" and len(outcome.delivery_ids) == 1
    assert deliver_one(rt, outcome.delivery_ids[0]).state == "delivered"
    [received] = storescp.wait_for_objects(1, timeout=30)
    assert dciodvfy_errors(received) == []
    text = dsrdump(received)
    assert "Not assessed: SOP class CT Image Storage is not a projection radiograph" in text
    assert 'NUM:(,,"Bone age")' not in text  # a refused image never yields a number
    assert 'CODE:(,,"Bone age")=(373121007,SCT,"Not Evaluated")' in text
    with session_scope(rt.database_url) as session:
        assert list(session.scalars(select(Result))) == []


def test_the_sr_saying_why_is_made_for_a_header_pydicom_cannot_read(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """Number of Frames "abc": the pixels cannot be decoded, and the SR that says so
    leaves the number out (it raised, and the image was tried again and again)."""
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, send_not_assessed=True
    )
    outcome = assess_instance(rt, spool_instance(rt, attributes={"NumberOfFrames": b"abc"}))
    assert outcome.state == "not_assessed" and len(outcome.delivery_ids) == 1
    assert outcome.reason is not None and "cannot be decoded" in outcome.reason
    assert deliver_one(rt, outcome.delivery_ids[0]).state == "delivered"
    [received] = storescp.wait_for_objects(1, timeout=30)
    assert dciodvfy_errors(received) == []


def test_missing_sex_follows_the_site_setting(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    refuse = load_settings(
        data_dir=tmp_path / "a", model=tiny_checkpoint, destinations=storescp.destination
    )
    upgrade(refuse.effective_database_url)
    rt = Runtime(refuse)
    outcome = assess_instance(rt, spool_instance(rt, sex="O"))
    assert (
        outcome.state == "not_assessed"
        and outcome.reason == "patient sex is O; the model needs M or F"
    )

    assume = load_settings(
        data_dir=tmp_path / "b",
        model=tiny_checkpoint,
        destinations=storescp.destination,
        missing_sex="female",
    )
    upgrade(assume.effective_database_url)
    rt = Runtime(assume)
    instance_id = spool_instance(rt, sex="O")
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "assessed"
    with session_scope(rt.database_url) as session:
        reason = session.get_one(Instance, instance_id).reason
        assert reason is not None
        # recorded as O, or not at all: not "not recorded" (found in review)
        assert reason.startswith("Patient sex not recorded as M or F: assessed as female")
        [result] = session.scalars(select(Result))
        assert result.male is False
        sr_path = next(
            Path(d.path) for d in session.scalars(select(Delivery)) if d.kind.value == "sr"
        )
    assert "Patient sex not recorded as M or F: assessed as female" in dsrdump(sr_path)


@pytest.mark.parametrize(
    ("age", "chronological", "coarse"),
    [
        ("010Y", None, pipeline.AGE_IN_WHOLE_YEARS),
        ("120M", 120.0, None),
        ("520W", 520 * 7 / 30.4375, None),
        ("003M", None, pipeline.AGE_IN_WHOLE_MONTHS),
        ("030M", 30.0, None),
        ("016W", 16 * 7 / 30.4375, None),
    ],
)
def test_an_age_known_in_whole_years_only_gives_no_chronological_age_or_sds(
    runtime: Runtime, storescp: StoreSCP, age: str, chronological: float | None, coarse: str | None
) -> None:
    """No birth date: Patient's Age is the last resort. "010Y" is 10 years and up to 11
    months more, too coarse for an SDS (Greulich-Pyle's SD is 11.7 months for a girl of 10),
    so the SR and SC give the bone age without one, and say why; so is "003M", up to a
    month more against an SD of 0.7 month at 3 months (found in review: read as 3.0); months
    from 2 years, or weeks, are fine enough."""
    instance_id = spool_instance(runtime, attributes={"PatientBirthDate": None, "PatientAge": age})
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome.reason
    with session_scope(runtime.database_url) as session:
        [result] = session.scalars(select(Result))
        reason = session.get_one(Instance, instance_id).reason or ""
    if chronological is None:
        assert result.chronological_age_months is None and result.sds is None
        assert coarse is not None and coarse in reason
    else:
        assert result.chronological_age_months == pytest.approx(chronological)
        assert result.sds is not None
        assert "No chronological age" not in reason
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    received = {dcmread(path).Modality: path for path in storescp.wait_for_objects(2, timeout=30)}
    text = dsrdump(received["SR"])
    assert 'NUM:(,,"Bone age")=' in text
    for name in ("Subject Age", "Bone age minus chronological age", "Z-Score of measurement"):
        assert (f'NUM:(,,"{name}")=' in text) is (chronological is not None), name
    assert ("No chronological age or SDS" in text) is (chronological is None)
    if coarse is not None:
        assert coarse in text
    for path in received.values():
        assert dciodvfy_errors(path) == [], path


@pytest.mark.parametrize(
    ("sex", "birth_date", "sds_given"),
    [
        ("F", "20060701", False),  # 18 years 10 months: past the girls' table (16 years)
        ("M", "20060701", False),  # past the boys' (17 years)
        ("F", "20090701", True),  # 15 years 10 months
        ("M", "20250301", False),  # 2 months: before the table's first age (3 months)
        ("M", "20250101", True),  # 4 months
    ],
)
def test_an_age_outside_the_sd_table_gives_no_sds(
    runtime: Runtime, storescp: StoreSCP, sex: str, birth_date: str, sds_given: bool
) -> None:
    """The Greulich-Pyle SDs run from 3 months to 16 (girls) or 17 (boys) years, where
    the gate admits 19: past them the skeleton may be mature, its bone age no longer
    rising with age, and an SDS held at the last SD called a normal 18-year-old girl's
    hand -1.5 (found in review). The bone age and the chronological age are given; the
    SDS is not, and the SR and SC say why."""
    instance_id = spool_instance(runtime, sex=sex, attributes={"PatientBirthDate": birth_date})
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome.reason
    with session_scope(runtime.database_url) as session:
        [result] = session.scalars(select(Result))
        reason = session.get_one(Instance, instance_id).reason or ""
    assert result.chronological_age_months is not None
    assert (result.sds is not None) is sds_given
    last, whom = (16, "girls") if sex == "F" else (17, "boys")
    why = (
        "No SDS: the Greulich-Pyle reference has standard deviations from 3 months to "
        f"{last} years for {whom}"
    )
    assert (why in reason) is not sds_given
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    received = {dcmread(path).Modality: path for path in storescp.wait_for_objects(2, timeout=30)}
    text = dsrdump(received["SR"])
    assert 'NUM:(,,"Subject Age")=' in text
    assert ('NUM:(,,"Z-Score of measurement")=' in text) is sds_given
    assert (why in text) is not sds_given
    assert dciodvfy_errors(received["SR"]) == []
    assert (why in str(dcmread(received["OT"]).get("ImageComments", ""))) is not sds_given


def test_an_image_dated_after_today_gives_no_chronological_age_or_sds(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """A modality whose clock runs a year ahead would make the child a year older at the
    image: the bone age stands, the age and SDS are left out, and the SR says why."""
    ahead = dt.date.today() + dt.timedelta(days=40)
    instance_id = spool_instance(runtime, attributes={"StudyDate": f"{ahead:%Y%m%d}"})
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome.reason
    with session_scope(runtime.database_url) as session:
        [result] = session.scalars(select(Result))
        assert result.chronological_age_months is None and result.sds is None
        assert pipeline.DATED_IN_THE_FUTURE in (session.get_one(Instance, instance_id).reason or "")
    for delivery_id in outcome.delivery_ids:
        assert deliver_one(runtime, delivery_id).state == "delivered"
    received = {dcmread(path).Modality: path for path in storescp.wait_for_objects(2, timeout=30)}
    text = dsrdump(received["SR"])
    assert pipeline.DATED_IN_THE_FUTURE in text and 'NUM:(,,"Subject Age")=' not in text
    for path in received.values():
        assert dciodvfy_errors(path) == [], path


@pytest.mark.parametrize(
    ("days_ahead", "future"), [(-400, False), (0, False), (1, False), (2, True), (365, True)]
)
def test_dated_in_the_future_allows_a_day_for_a_zone_ahead(days_ahead: int, future: bool) -> None:
    today = dt.date(2026, 3, 1)
    facts = pipeline.gate.PatientFacts(
        male=False,
        birth_date=dt.date(2016, 1, 1),
        reference_date=today + dt.timedelta(days=days_ahead),
        patient_age_months=None,
        laterality=None,
    )
    assert pipeline.dated_in_the_future(facts, today=today) is future
    assert (pipeline.chronological_age_months(facts, today=today) is None) is future


def test_our_own_outputs_are_never_assessed_again(runtime: Runtime) -> None:
    outcome = assess_instance(runtime, spool_instance(runtime))
    with session_scope(runtime.database_url) as session:
        sc_path = next(
            Path(d.path) for d in session.scalars(select(Delivery)) if d.kind.value == "sc"
        )
    sc = dcmread(sc_path)
    assert sc.BodyPartExamined == "HAND" and sc.PatientSex in {"M", "F"}  # it would pass otherwise
    from dicom_io import gate

    assert gate.check(sc).reason == "made by boneage-worker (one of our own results)"
    assert outcome.state == "assessed"


def test_reprocess_with_a_new_model_sends_only_when_asked(
    runtime: Runtime, tmp_path: Path, storescp: StoreSCP
) -> None:
    from models.checkpoint import save_checkpoint, untrained_model
    from worker.reprocess import prepare_reprocess, select_instances

    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    # The same model again: nothing to do, nothing duplicated.
    assert prepare_reprocess(runtime, [instance_id]) == []

    def runtime_with(seed: int) -> Runtime:
        loaded = untrained_model(arch="resnet18", input_size=128, seed=seed)
        path = tmp_path / f"model-{seed}.safetensors"
        save_checkpoint(path, loaded.model, loaded.meta)
        return Runtime(runtime.settings.model_copy(update={"model": path}))

    quiet = runtime_with(2)
    with session_scope(runtime.database_url) as session:
        study = session.get_one(Instance, instance_id).study_instance_uid
    assert select_instances(quiet, study_uids=[study]) == [instance_id]
    assert prepare_reprocess(quiet, [instance_id], send=False) == [instance_id]
    assert assess_instance(quiet, instance_id, send=False).delivery_ids == ()
    # already assessed by this model (asked to send, it would assess it again to send:
    # tests/integration/test_reprocess_kept_unsent.py)
    assert prepare_reprocess(quiet, [instance_id], send=False) == []

    loud = runtime_with(3)
    assert prepare_reprocess(loud, [instance_id]) == [instance_id]
    sent = assess_instance(loud, instance_id, send=True)
    assert len(sent.delivery_ids) == 2
    with session_scope(runtime.database_url) as session:
        assert len(list(session.scalars(select(Result)))) == 3  # one per model
        assert len(list(session.scalars(select(Delivery)))) == 4  # first model's 2 + last one's 2
        assert session.get_one(Instance, instance_id).state is InstanceState.ASSESSED


def another_model(runtime: Runtime, tmp_path: Path, seed: int) -> Runtime:
    """``runtime`` with another untrained model, as `reprocess --model` would run it."""
    from models.checkpoint import save_checkpoint, untrained_model

    loaded = untrained_model(arch="resnet18", input_size=128, seed=seed)
    path = tmp_path / f"model-{seed}.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    return Runtime(runtime.settings.model_copy(update={"model": path}))


def test_reprocess_with_a_new_model_of_an_image_not_assessed_makes_its_sr_once(
    runtime: Runtime, tmp_path: Path
) -> None:
    """An image not assessed, its SR sent (BONEAGE_SEND_NOT_ASSESSED), reprocessed with
    another model and sent: the gate decides as before, and the SR saying so, whose UID
    names no model, was made already. It used to be made again, clash with its own row
    and end the instance in error, the reason it was not assessed overwritten."""
    from worker.reprocess import prepare_reprocess

    loud = Runtime(runtime.settings.model_copy(update={"send_not_assessed": True}))
    instance_id = spool_instance(loud, attributes={"PatientSex": None})
    first = assess_instance(loud, instance_id)
    assert first.state == "not_assessed" and len(first.delivery_ids) == 1

    new = Runtime(
        another_model(runtime, tmp_path, 11).settings.model_copy(update={"send_not_assessed": True})
    )
    assert prepare_reprocess(new, [instance_id]) == [instance_id]
    again = assess_instance(new, instance_id, send=True)
    assert (again.state, again.delivery_ids) == ("not_assessed", ())
    assert again.reason == first.reason
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.reason) == (InstanceState.NOT_ASSESSED, first.reason)
        assert [d.id for d in session.scalars(select(Delivery))] == list(first.delivery_ids)


@pytest.mark.parametrize("first_sr", ["delivered", "not sent yet"])
def test_a_reprocess_that_assesses_an_image_not_assessed_replaces_the_sr_that_said_so(
    runtime: Runtime, storescp: StoreSCP, first_sr: str
) -> None:
    """Refused for its missing sex, the SR saying so made (BONEAGE_SEND_NOT_ASSESSED); the
    site then gives a sex where none is, and `reprocess --send` assesses it. The new SR,
    of the same assessment, named no predecessor, and one not sent yet went after it:
    the PACS showed "not assessed" beside the bone age. The new SR names the one that
    went, and one not sent yet never goes."""
    from tests.integration.test_received_again import deliver, report_of
    from worker.reprocess import prepare_reprocess

    loud = Runtime(runtime.settings.model_copy(update={"send_not_assessed": True}))
    instance_id = spool_instance(loud, attributes={"PatientSex": None})
    first = assess_instance(loud, instance_id)
    assert first.state == "not_assessed"
    [refused_id] = first.delivery_ids
    refused = (
        report_of(deliver(loud, storescp, first.delivery_ids)) if first_sr == "delivered" else None
    )

    site = Runtime(loud.settings.model_copy(update={"missing_sex": "female"}))
    assert prepare_reprocess(site, [instance_id]) == [instance_id]
    again = assess_instance(site, instance_id, send=True)
    assert again.state == "assessed", again
    with session_scope(runtime.database_url) as session:
        left = session.get_one(Delivery, refused_id)
        assert left.state is (
            DeliveryState.DELIVERED if refused is not None else DeliveryState.SUPERSEDED
        )
    report = report_of(deliver(site, storescp, again.delivery_ids))
    if refused is None:
        assert "PredecessorDocumentsSequence" not in report  # it never went
        assert send_deliveries(site, [refused_id])[refused_id].state == "skipped"
        return
    [study] = report.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [named] = series.ReferencedSOPSequence
    assert named.ReferencedSOPInstanceUID == refused.SOPInstanceUID
    assert series.SeriesInstanceUID == refused.SeriesInstanceUID


def test_a_reprocess_not_asked_to_send_sends_nothing_when_the_reconciler_queues_it_again(
    runtime: Runtime, tmp_path: Path, storescp: StoreSCP
) -> None:
    """`reprocess` without --send queued the instance; its first attempt failed, or its
    worker was killed, and the reconciler queued it again with a message that says
    nothing of sending. The results stay unsent, as the command asked: the choice is kept
    on the row. They used to go to every destination. Its latency counts from the
    reprocess, not from when the image came."""
    from worker.reconciler import reconcile
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    quiet = another_model(runtime, tmp_path, 12)
    asked = dt.datetime.now(dt.UTC)
    assert prepare_reprocess(quiet, [instance_id], send=False) == [instance_id]
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.assessment_received_at is not None
        assert instance.assessment_received_at >= asked - dt.timedelta(seconds=1)
        # the command's message was lost: the reconciler's round finds it queued long ago
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(queued_at=asked - dt.timedelta(hours=1))
        )
    published: list[int] = []
    delivered: list[Sequence[int]] = []
    reconcile(quiet, published.append, delivered.append, inference_queue_empty=True)
    assert published == [instance_id]  # a message that says nothing of sending

    outcome = assess_instance(quiet, instance_id)  # as the worker runs that message
    assert (outcome.state, outcome.delivery_ids) == ("assessed", ())
    with session_scope(runtime.database_url) as session:
        assert len(session.scalars(select(Result)).all()) == 2
        new_result = session.scalars(
            select(Result).where(Result.model_id == quiet.predictor.model_id)
        ).one()
        assert (
            session.scalars(select(Delivery).where(Delivery.result_id == new_result.id)).all() == []
        )

    # Asked to send, another model's results go, whichever message runs.
    loud = another_model(runtime, tmp_path, 13)
    assert prepare_reprocess(loud, [instance_id], send=True) == [instance_id]
    assert len(assess_instance(loud, instance_id).delivery_ids) == 2


def test_reprocess_names_the_instances_whose_other_bone_age_stands_at_the_pacs(
    runtime: Runtime, tmp_path: Path
) -> None:
    """`reprocess --send` with a new model: its SR and SC join the first model's at the
    PACS, in series of their own, and do not replace them. The command names the
    instances where that happens: those whose other model's SR was delivered."""
    from worker.reprocess import sent_by_other_models

    delivered, kept, not_assessed = (
        spool_instance(runtime),
        spool_instance(runtime),
        spool_instance(runtime, attributes={"PatientSex": None}),
    )
    for instance_id in (delivered, kept, not_assessed):
        assess_instance(runtime, instance_id)
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.instance_id == delivered)
            .values(state=DeliveryState.DELIVERED)
        )
    new = another_model(runtime, tmp_path, 14)
    assert sent_by_other_models(new, [delivered, kept, not_assessed]) == [delivered]
    assert sent_by_other_models(runtime, [delivered, kept, not_assessed]) == []


def test_a_reprocess_message_taken_by_a_worker_of_the_old_model_leaves_the_instance_as_it_was(
    runtime: Runtime, tmp_path: Path
) -> None:
    """`reprocess --model NEW` queued the instance, but a worker still running the model
    that assessed it took the message: it ends the claim as it was, with nothing made,
    where it used to leave the instance `processing` until the reconciler's three tries
    ended it in error."""
    from models.checkpoint import save_checkpoint, untrained_model
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime)
    first = assess_instance(runtime, instance_id)
    assert first.state == "assessed"
    loaded = untrained_model(arch="resnet18", input_size=128, seed=5)
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    new = Runtime(runtime.settings.model_copy(update={"model": path}))
    assert prepare_reprocess(new, [instance_id]) == [instance_id]

    outcome = assess_instance(runtime, instance_id)  # the old model's worker
    assert outcome.state == "skipped"
    assert outcome.reason == "already assessed by this worker's model"
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.state is InstanceState.ASSESSED and instance.reason is None
        assert instance.finished_at is not None
        assert len(session.scalars(select(Result)).all()) == 1
        assert len(session.scalars(select(Delivery)).all()) == len(first.delivery_ids)
    # Queued again, the new model's worker assesses it beside the first result.
    assert prepare_reprocess(new, [instance_id]) == [instance_id]
    assert assess_instance(new, instance_id, send=False).state == "assessed"
    with session_scope(runtime.database_url) as session:
        assert len(session.scalars(select(Result)).all()) == 2


def test_a_copy_received_while_a_reprocess_waits_is_compared_after_the_old_models_worker(
    runtime: Runtime, tmp_path: Path
) -> None:
    """The PACS sends a corrected copy (the sex) while `reprocess --model NEW` waits, and
    a worker of the old model takes the message. It reads no file, but it marked the copy
    compared: the correction was lost, the result read with the wrong sex stood. The
    copy is left to be compared, and the comparison assesses it again."""
    from models.checkpoint import save_checkpoint, untrained_model
    from tests.integration.test_received_again import received_again
    from worker.reprocess import prepare_reprocess

    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id, send=False).state == "assessed"
    loaded = untrained_model(arch="resnet18", input_size=128, seed=5)
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    new = Runtime(runtime.settings.model_copy(update={"model": path}))
    assert prepare_reprocess(new, [instance_id]) == [instance_id]
    with session_scope(runtime.database_url) as session:
        spooled = dcmread(session.get_one(Instance, instance_id).spool_path)
    received_again(runtime, instance_id, PatientSex="F" if spooled.PatientSex == "M" else "M")

    outcome = assess_instance(runtime, instance_id, send=False)  # the old model's worker
    assert outcome.reason == "already assessed by this worker's model"
    assert outcome.copy_to_compare
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).received_again_at is not None

    compared = assess_instance(runtime, instance_id, send=False)  # the copy's message
    assert compared.state == "assessed", compared
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.assessment == 2 and instance.received_again_at is None
        assert [r.assessment for r in session.scalars(select(Result))] == [1, 2]


def test_the_reprocess_command_refuses_while_workers_run_another_model(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers assess with the model they run: `reprocess --model NEW` while they
    run the old one would queue work that changes nothing, so it says what to do."""
    from click.testing import CliRunner

    from models.checkpoint import save_checkpoint, untrained_model
    from worker.cli import main as cli

    instance_id = spool_instance(runtime)
    assert assess_instance(runtime, instance_id).state == "assessed"
    loaded = untrained_model(arch="resnet18", input_size=128, seed=7)
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    new_id = Runtime(runtime.settings.model_copy(update={"model": path})).predictor.model_id
    old_id = runtime.predictor.model_id
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(runtime.settings.data_dir))
    args = ["reprocess", "--model", str(path), "--instance", str(instance_id)]

    def worker_running(model_id: str) -> HeartbeatThread:
        # the row an inference worker writes every few seconds
        beat = HeartbeatThread(runtime.database_url, "worker", lambda: {"model_id": model_id})
        beat.start()
        return beat

    beat = worker_running(old_id)
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 1
    said = " ".join(refused.output.split())
    assert f"inference workers run model(s) {old_id[:12]}, not {new_id[:12]}" in said
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.ASSESSED

    beat.stop()  # restarted with the new model
    beat = worker_running(new_id)
    queued = CliRunner().invoke(cli, args)
    assert queued.exit_code == 0, queued.output
    said = " ".join(queued.output.split())
    assert f"1 instances chosen; 1 queued for model {new_id[:12]}" in said
    assert "0 already assessed by it; 0 not finished yet" in said
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, instance_id).state is InstanceState.QUEUED

    beat.stop()  # no worker alive: queued for one to come, and said so
    again = CliRunner().invoke(cli, [*args[:3], "--instance", str(spool_instance(runtime))])
    assert again.exit_code == 0, again.output
    said = " ".join(again.output.split())
    assert "No inference worker is running" in said
    assert "0 queued for model" in said and "1 not finished yet (left as they are)" in said


def test_reprocess_leaves_instances_not_finished_alone(runtime: Runtime, tmp_path: Path) -> None:
    """An instance still on its way (received, or claimed by an attempt now) keeps its
    state and its claim: its message is already queued."""
    from models.checkpoint import save_checkpoint, untrained_model
    from worker.reprocess import prepare_reprocess

    loaded = untrained_model(arch="resnet18", input_size=128, seed=6)
    path = tmp_path / "new.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    new = Runtime(runtime.settings.model_copy(update={"model": path}))
    waiting, claimed = spool_instance(runtime), spool_instance(runtime, sex="M")
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == claimed)
            .values(state=InstanceState.PROCESSING, claimed_by="worker@elsewhere:1", attempts=1)
        )
    assert prepare_reprocess(new, [waiting, claimed]) == []
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Instance, waiting).state is InstanceState.RECEIVED
        busy = session.get_one(Instance, claimed)
        assert (busy.state, busy.claimed_by, busy.attempts) == (
            InstanceState.PROCESSING,
            "worker@elsewhere:1",
            1,
        )


@pytest.mark.parametrize("sex", ["F", None], ids=["assessed", "not assessed"])
def test_outputs_that_clash_with_rows_no_attempt_made_end_the_instance_in_error(
    runtime: Runtime, storescp: StoreSCP, sex: str | None
) -> None:
    """A clash at the commit that no competing attempt explains (here a destination
    listed twice, which settings now refuse) ends the instance in error at once, with
    the reason, and leaves no file in the outbox. The outcome says error too, for an
    image not assessed as for one assessed (it used to say not_assessed)."""
    twice = [*runtime.settings.destinations, *runtime.settings.destinations]
    clashing = Runtime(
        runtime.settings.model_copy(update={"destinations": twice, "send_not_assessed": True})
    )
    instance_id = spool_instance(clashing, attributes={"PatientSex": sex})
    outcome = assess_instance(clashing, instance_id)
    assert outcome.state == "error"
    expected = (
        "its outputs could not be recorded: they clash with a delivery of the same object "
        "to the same destination"
    )
    assert outcome.reason == expected
    with session_scope(runtime.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert instance.state is InstanceState.ERROR and instance.reason == expected
        assert session.scalars(select(Result)).all() == []
        assert session.scalars(select(Delivery)).all() == []
    outbox = runtime.settings.outbox_dir
    assert not outbox.exists() or list(outbox.iterdir()) == []


def test_outputs_staged_by_attempts_that_died_are_swept(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    two_hours_ago = dt.datetime.now().timestamp() - 2 * 3600
    died = outbox / ".a1b2-sr.dcm.x8f3k2.tmp"  # staged, its attempt gone
    died_before = outbox / "a1b2-sc.4242.tmp"  # the naming of earlier versions
    running = outbox / ".c3d4-sc.dcm.q9w8e7.tmp"  # another worker is about to publish it
    published = outbox / "a1b2-sr.dcm"
    for path in (died, died_before, running, published):
        path.write_bytes(b"DICM")
    for path in (died, died_before, published):
        os.utime(path, (two_hours_ago, two_hours_ago))
    assert pipeline.sweep_staged(outbox) == 2
    assert sorted(p.name for p in outbox.iterdir()) == sorted([running.name, published.name])


def test_attempt_that_waited_on_anothers_commit_finds_it_finished(
    tmp_path: Path,
    tiny_checkpoint: Path,
    storescp: StoreSCP,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PostgreSQL, two attempts truly at once: attempt A holds its commit open (rows in,
    # files being published) when attempt B claims the instance. B's claim waits on A's
    # row lock; once A commits, B must find the instance assessed and leave it so. (A
    # claim that read the row first and wrote it after would set it back to
    # `processing`, run the model again and leave an assessed image looking unfinished.)
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, database_url=postgres_url
    )
    instance_id = spool_instance(rt)
    real_publish = pipeline.publish
    holding, release = threading.Event(), threading.Event()
    publishers: list[str] = []

    def held_publish(outputs: list[pipeline.Output]) -> list[pipeline.Output]:
        publishers.append(threading.current_thread().name)
        if threading.current_thread().name == "attempt-a":
            holding.set()
            assert release.wait(120)
        return real_publish(outputs)

    monkeypatch.setattr(pipeline, "publish", held_publish)
    outcomes: dict[str, str] = {}

    def attempt() -> None:
        outcomes[threading.current_thread().name] = assess_instance(rt, instance_id).state

    a = threading.Thread(target=attempt, name="attempt-a")
    a.start()
    assert holding.wait(120), "attempt A never reached its commit"
    b = threading.Thread(target=attempt, name="attempt-b")
    b.start()
    wait_for(
        lambda: sessions_waiting_on_a_lock(postgres_url) >= 1,
        timeout=60,
        what="attempt B waiting on attempt A's row",
    )
    release.set()
    a.join(120)
    b.join(120)
    assert outcomes == {"attempt-a": "assessed", "attempt-b": "skipped"}
    assert publishers == ["attempt-a"]
    with session_scope(rt.database_url) as session:
        instance = session.get_one(Instance, instance_id)
        assert (instance.state, instance.attempts) == (InstanceState.ASSESSED, 1)
        assert len(list(session.scalars(select(Result)))) == 1
    assert_outbox_is_what_was_recorded(rt)
