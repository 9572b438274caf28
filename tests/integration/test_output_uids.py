"""The UIDs of our SRs, SCs and notes are the node's: two nodes that assess the same
image with the same model (a validation node beside production, two sites, a reinstall
with a new database) make other objects under other UIDs, which a PACS would otherwise
refuse as duplicates or overwrite; the same node trying again makes the same ones.

An image whose objects were made before the node's identity went into their UIDs keeps
deriving its UIDs as then (under pydicom's root): a later assessment joins its series,
a note withdraws its objects under the UIDs it had. So does an image whose objects were
made under an organisation root (BONEAGE_UID_ROOT) since changed.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select, update

from db.engine import session_scope
from db.schema import Delivery, Instance
from dicom_io.uids import LEGACY_ROOT, UUID_ROOT, UidScheme, is_valid_uid, legacy_uid
from tests.conftest import StoreSCP
from tests.dicomtools import dciodvfy_errors
from tests.integration.test_pipeline import make_runtime, spool_dataset, spool_instance
from tests.integration.test_received_again import (
    deliver,
    heat_map_of,
    received_again,
    replaced,
    report_of,
    where,
)
from tests.support import pacs_rejection_note
from worker import pipeline
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: An organisation's UID root, as an administrator sets it.
ORGANISATION = "1.2.840.99999.7"
#: The concept name of the SR's Tracking Unique Identifier (TID 4108), a UIDREF item.
TRACKING_UID = "112040"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A node's database, on SQLite and on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return str(request.getfixturevalue("postgres_url"))


def made(rt: Runtime, instance_id: int) -> dict[str, Any]:
    """The UIDs of the SR and SC of the instance's first assessment, from the outbox;
    each file checked by dciodvfy."""
    with session_scope(rt.database_url) as session:
        source = dcmread(session.get_one(Instance, instance_id).spool_path)
    found: dict[str, Any] = {}
    for path in sorted(rt.settings.outbox_dir.glob("*.dcm")):
        ds = dcmread(path)
        if not _of(ds, str(source.SOPInstanceUID)):
            continue
        assert dciodvfy_errors(path) == [], path
        kind = "sr" if ds.Modality == "SR" else "sc"
        found[f"{kind} instance"] = str(ds.SOPInstanceUID)
        found[f"{kind} series"] = str(ds.SeriesInstanceUID)
        if kind == "sr":
            found["sr tracking"] = _tracking_uid(ds)
    assert len(found) == 5, found
    return found


def _of(ds: Dataset, source_uid: str) -> bool:
    """Whether our SR or SC ``ds`` is of the image ``source_uid``."""
    return source_uid in {str(e.value) for e in _walk(ds) if e.VR == "UI"}


def _walk(ds: Dataset) -> list[Any]:
    elements = []
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                elements += _walk(item)
        else:
            elements.append(element)
    return elements


def _tracking_uid(sr: Dataset) -> str:
    [uid] = [
        str(item.UID)
        for item in _items(sr)
        if item.get("ValueType") == "UIDREF"
        and item.ConceptNameCodeSequence[0].CodeValue == TRACKING_UID
    ]
    return uid


def _items(ds: Dataset) -> list[Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items += [item, *_items(item)]
    return items


def test_two_nodes_make_the_same_image_under_other_uids_and_a_retry_under_the_same(
    database_url: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production (on SQLite or PostgreSQL) and a validation node beside it (its own
    database) get the same image and run the same model: every UID each makes is its
    own, a valid one made of a UUID (2.25). Production's first attempt fails after it
    built its SR and SC (a fault); the one after makes them under the same UIDs."""
    production = make_runtime(tmp_path / "a", tiny_checkpoint, database_url=database_url)
    validation = make_runtime(tmp_path / "b", tiny_checkpoint)
    image_id = spool_instance(production)
    with session_scope(production.database_url) as session:
        image = dcmread(session.get_one(Instance, image_id).spool_path)
    built: list[tuple[str, ...]] = []
    build = pipeline.build_outputs

    def failing_once(*args: Any, **kwargs: Any) -> tuple[Dataset, Dataset]:
        sr, sc = build(*args, **kwargs)
        uids = (sr.SOPInstanceUID, sr.SeriesInstanceUID, sc.SOPInstanceUID, sc.SeriesInstanceUID)
        built.append(tuple(map(str, uids)))
        if len(built) == 1:
            raise RuntimeError("a fault, after the SR and SC were built")
        return sr, sc

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "build_outputs", failing_once)
        with pytest.raises(RuntimeError, match="a fault"):
            assess_instance(production, image_id)
        assert assess_instance(production, image_id).state == "assessed"
    assert len(built) == 2 and built[0] == built[1]

    copy_id = spool_dataset(validation, image)
    assert assess_instance(validation, copy_id).state == "assessed"
    here, there = made(production, image_id), made(validation, copy_id)
    assert built[0] == tuple(
        here[k] for k in ("sr instance", "sr series", "sc instance", "sc series")
    )
    for what in here:
        assert here[what] != there[what], what
    for uid in [*here.values(), *there.values()]:
        assert uid.startswith(f"{UUID_ROOT}.") and is_valid_uid(uid), uid
    assert production.device_observer_uid != validation.device_observer_uid


def test_a_retry_after_a_fault_once_the_outputs_were_staged_makes_the_same_uids(
    database_url: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt staged its SR and SC (files written, rows added) and fails as
    it moves them into place, inside its commit, which is rolled back: the attempt after
    it makes them under the same UIDs, which are those in the outbox."""
    rt = make_runtime(tmp_path, tiny_checkpoint, database_url=database_url)
    image_id = spool_instance(rt)
    staged: list[tuple[str, str]] = []
    publish = pipeline.publish

    def failing_once(outputs: list[pipeline.Output]) -> list[pipeline.Output]:
        if not staged:
            for output in outputs:
                assert output.staged is not None and output.staged.is_file()
                ds = dcmread(output.staged)
                staged.append((str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
            raise OSError(errno.EIO, "a fault, after the SR and SC were staged")
        return publish(outputs)

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "publish", failing_once)
        with pytest.raises(OSError, match="a fault"):
            assess_instance(rt, image_id)
        assert len(staged) == 2
        with session_scope(rt.database_url) as session:
            assert session.scalars(select(Delivery)).all() == []  # rolled back
        assert assess_instance(rt, image_id).state == "assessed"
    here = made(rt, image_id)
    assert sorted(staged) == sorted(
        [(here["sr instance"], here["sr series"]), (here["sc instance"], here["sc series"])]
    )


@pytest.fixture
def runtime(
    database_url: str, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> Runtime:
    """A node sending to the storescp."""
    return make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, database_url=database_url
    )


def test_an_image_assessed_before_the_upgrade_keeps_its_uids(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image assessed by the release before, whose UIDs had no node in them (pydicom's
    root), received again with its sex corrected after the upgrade: the SR and SC join
    its series under the UIDs that release would have given them, and the PACS's
    rejection of the image brings our notes under the UIDs it would have given them. An
    image received after the upgrade gets the node's."""
    rt = runtime
    image_id = spool_instance(rt, sex="F")
    with monkeypatch.context() as before:  # the release before: pydicom's, for every image
        before.setattr(pipeline, "node_uids", lambda rt: UidScheme(LEGACY_ROOT, "unused"))
        first = assess_instance(rt, image_id)
    first_objects = deliver(rt, storescp, first.delivery_ids)
    first_sr, first_sc = report_of(first_objects), heat_map_of(first_objects)
    with session_scope(rt.database_url) as session:
        image_uid = session.get_one(Instance, image_id).sop_instance_uid
    model = rt.predictor.model_id
    assert str(first_sr.SOPInstanceUID) == legacy_uid(image_uid, model, "sr")
    assert str(first_sc.SeriesInstanceUID) == legacy_uid(image_uid, model, "sc-series")

    received_again(rt, image_id, PatientSex="M")
    second = assess_instance(rt, image_id)
    assert second.state == "assessed"
    objects = deliver(rt, storescp, second.delivery_ids)  # dciodvfy: no error
    second_sr, second_sc = report_of(objects), heat_map_of(objects)
    assert second_sr.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert second_sc.SeriesInstanceUID == first_sc.SeriesInstanceUID
    assert str(second_sr.SOPInstanceUID) == legacy_uid(image_uid, model, "assessment 2", "sr")
    assert str(second_sc.SOPInstanceUID) == legacy_uid(image_uid, model, "assessment 2", "sc")
    assert _tracking_uid(second_sr) == legacy_uid(
        str(second_sr.SOPInstanceUID), "tracking", "Bone age assessment"
    )

    rejected = assess_instance(rt, spool_dataset(rt, pacs_rejection_note(_image(rt, image_id))))
    notes = [dcmread(p) for p in deliver(rt, storescp, rejected.delivery_ids)]
    ours = [first_sr, first_sc, second_sr, second_sc]
    assert sorted(str(n.SOPInstanceUID) for n in notes) == sorted(
        legacy_uid(str(o.SOPInstanceUID), "withdrawn-ko") for o in ours
    )
    for note in notes:  # their series, of the image's notes under its patient
        assert str(note.SeriesInstanceUID) == _legacy_note_series(image_uid, note)

    later = deliver(rt, storescp, assess_instance(rt, spool_instance(rt)).delivery_ids)
    for ds in map(dcmread, later):
        assert str(ds.SOPInstanceUID).startswith(f"{UUID_ROOT}."), ds.Modality


def _legacy_note_series(image_uid: str, note: Dataset) -> str:
    """The Series Instance UID the release before gave our notes of the image
    ``image_uid`` filed under the study and patient ``note`` is filed under."""
    patient = [str(note.get(k, "")).strip() for k in ("PatientID", "IssuerOfPatientID")]
    study = str(note.StudyInstanceUID)
    return legacy_uid(image_uid, "ko-series", "study", study, "patient", json.dumps(patient))


def test_an_image_assessed_before_the_upgrade_and_not_assessed_since_keeps_its_uids(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image assessed by the release before, received again after the upgrade as a
    chest: the SR saying it is not assessed (withdrawing the bone age), the notice
    joining its heat maps' series, and, once the PACS rejects the image, the series of
    our notes, are under the UIDs that release would have given them."""
    rt = runtime
    image_id = spool_instance(rt)
    with monkeypatch.context() as before:  # the release before: pydicom's, for every image
        before.setattr(pipeline, "node_uids", lambda rt: UidScheme(LEGACY_ROOT, "unused"))
        first = assess_instance(rt, image_id)
    first_sc = heat_map_of(deliver(rt, storescp, first.delivery_ids))
    with session_scope(rt.database_url) as session:
        image_uid = session.get_one(Instance, image_id).sop_instance_uid
    model = rt.predictor.model_id

    received_again(rt, image_id, BodyPartExamined="CHEST", StudyDescription="CHEST PA")
    second = assess_instance(rt, image_id)
    assert second.state == "not_assessed"
    objects = deliver(rt, storescp, second.delivery_ids)  # dciodvfy: no error
    said, notice = report_of(objects), heat_map_of(objects)
    assert str(said.SOPInstanceUID) == legacy_uid(image_uid, "assessment 2", "not-assessed-sr")
    assert str(said.SeriesInstanceUID) == legacy_uid(image_uid, "not-assessed-series")
    assert str(notice.SOPInstanceUID) == legacy_uid(
        image_uid, model, "assessment 2", "withdrawn-sc"
    )
    assert notice.SeriesInstanceUID == first_sc.SeriesInstanceUID

    rejected = assess_instance(rt, spool_dataset(rt, pacs_rejection_note(_image(rt, image_id))))
    notes = [dcmread(p) for p in deliver(rt, storescp, rejected.delivery_ids)]
    assert len(notes) == 4  # of the SR and SC, and of the SR and notice saying not assessed
    for note in notes:
        assert str(note.SeriesInstanceUID) == _legacy_note_series(image_uid, note)


def test_objects_recorded_before_their_series_were_are_found_in_pydicoms_series(
    runtime: Runtime, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows from before revision 0006 record no study or series: those of an image's
    objects are derived again, as they were made, under pydicom's root, without a look
    at the database per row. The image assessed again replaces its report there and
    joins its heat map's series; the PACS rejecting it, our notes name them there."""
    rt = runtime
    calls: list[int] = []
    image_uids = pipeline.image_uids

    def counted(rt: Runtime, instance_id: int) -> UidScheme:
        calls.append(instance_id)
        return image_uids(rt, instance_id)

    monkeypatch.setattr(pipeline, "image_uids", counted)
    made_then: dict[int, tuple[Dataset, Dataset]] = {}
    for recorded in (True, False):  # its series recorded, as since 0006; or not
        image_id = spool_instance(rt, sex="F")
        with monkeypatch.context() as before:  # an image of the release before
            before.setattr(pipeline, "node_uids", lambda rt: UidScheme(LEGACY_ROOT, "unused"))
            first = assess_instance(rt, image_id)
        paths = deliver(rt, storescp, first.delivery_ids)
        made_then[image_id] = report_of(paths), heat_map_of(paths)
        if not recorded:
            with session_scope(rt.database_url) as session:
                session.execute(
                    update(Delivery)
                    .where(Delivery.instance_id == image_id)
                    .values(study_instance_uid=None, series_instance_uid=None)
                )
    looked_up: list[int] = []
    for image_id, (first_sr, first_sc) in made_then.items():
        calls.clear()
        received_again(rt, image_id, PatientSex="M")
        second = assess_instance(rt, image_id)
        looked_up.append(len(calls))
        objects = deliver(rt, storescp, second.delivery_ids)
        second_sr, second_sc = report_of(objects), heat_map_of(objects)
        assert replaced(second_sr) == [where(first_sr)]
        assert second_sr.SeriesInstanceUID == first_sr.SeriesInstanceUID
        assert second_sc.SeriesInstanceUID == first_sc.SeriesInstanceUID

        note = pacs_rejection_note(_image(rt, image_id))
        rejected = assess_instance(rt, spool_dataset(rt, note))
        notes = [dcmread(p) for p in deliver(rt, storescp, rejected.delivery_ids)]
        withdrawn = {
            (series.SeriesInstanceUID, item.ReferencedSOPInstanceUID)
            for n in notes
            for study in n.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        assert withdrawn == {
            (o.SeriesInstanceUID, o.SOPInstanceUID)
            for o in (first_sr, first_sc, second_sr, second_sc)
        }
    # as many look-ups of the image's UIDs whether the rows recorded their series or not
    assert looked_up[0] == looked_up[1], looked_up


def _image(rt: Runtime, instance_id: int) -> Dataset:
    with session_scope(rt.database_url) as session:
        return dcmread(session.get_one(Instance, instance_id).spool_path)


def test_an_image_keeps_the_organisation_root_its_objects_were_made_under(
    database_url: str, tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """A node under an organisation root makes every UID under it, valid; after the
    administrator changes the root (or unsets it), an image assessed before is assessed
    again under the root its objects are under, in their series, and a new image under
    the new one."""
    settings: dict[str, Any] = {"destinations": storescp.destination, "database_url": database_url}
    rooted = make_runtime(tmp_path, tiny_checkpoint, uid_root=ORGANISATION + ".", **settings)
    image_id = spool_instance(rooted, sex="F")
    first = deliver(rooted, storescp, assess_instance(rooted, image_id).delivery_ids)
    for ds in map(dcmread, first):
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID):
            assert str(uid).startswith(ORGANISATION + ".") and is_valid_uid(str(uid)), uid
    assert _tracking_uid(report_of(first)).startswith(ORGANISATION + ".")

    unset = make_runtime(tmp_path, tiny_checkpoint, **settings)
    received_again(unset, image_id, PatientSex="M")
    again = deliver(unset, storescp, assess_instance(unset, image_id).delivery_ids)
    assert report_of(again).SeriesInstanceUID == report_of(first).SeriesInstanceUID
    assert heat_map_of(again).SeriesInstanceUID == heat_map_of(first).SeriesInstanceUID
    for ds in map(dcmread, again):
        assert str(ds.SOPInstanceUID).startswith(ORGANISATION + ".")
    later = deliver(unset, storescp, assess_instance(unset, spool_instance(unset)).delivery_ids)
    for ds in map(dcmread, later):
        assert str(ds.SOPInstanceUID).startswith(UUID_ROOT + ".")
