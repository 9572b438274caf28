"""Laterality of the heat maps the pipeline makes (dicom_io.content.image_side,
dicom_io.sc.series_laterality, worker.pipeline.heat_map_series): the side an image states
only in its Body Part Examined is not lost, a heat-map series has one Laterality, and a
heat map of an image whose side the PACS corrected goes into a series of its side, never
into one that labels it with the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, Instance, ObjectKind
from dicom_io.ko import read_rejection_note
from dicom_io.sc import WITHDRAWN
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_received_again import deliver, heat_map_of, received_again
from tests.support import pacs_rejection_note
from worker.pipeline import SC_SERIES_NUMBER, assess_instance, node_uids
from worker.runtime import Runtime

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Invalid value for VR CS"),  # RT-HAND, as sent
]

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def test_a_heat_map_states_the_side_its_image_names_only_in_its_body_part(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """A DX with Body Part Examined ``RT-HAND`` and no Image Laterality: its heat map had
    Laterality empty and no Body Part Examined, the side stated nowhere; it has
    Laterality R and Body Part Examined HAND, and passes dciodvfy."""
    attributes = {"BodyPartExamined": b"RT-HAND", "ImageLaterality": None}
    outcome = assess_instance(runtime, spool_instance(runtime, attributes=attributes))
    assert outcome.state == "assessed", outcome

    heat_map = heat_map_of(deliver(runtime, storescp, outcome.delivery_ids))  # dciodvfy

    assert heat_map.Laterality == "R"
    assert heat_map.BodyPartExamined == "HAND"


def _first_heat_map(rt: Runtime, storescp: StoreSCP, **attributes: Any) -> tuple[int, Dataset]:
    """An image with ``attributes`` assessed and its heat map delivered: its instance id
    and the heat map as the storescp got it."""
    instance_id = spool_instance(rt, sex="F", attributes=attributes)
    first = assess_instance(rt, instance_id)
    assert first.state == "assessed", first
    return instance_id, heat_map_of(deliver(rt, storescp, first.delivery_ids))


@pytest.mark.parametrize(
    ("first", "again", "side"),
    [
        # the copy received again states no side: before, the second heat map's was empty
        ({"ImageLaterality": "L"}, {"ImageLaterality": None}, "L"),
        # the series opened with the side of a RT-HAND; the PACS corrected the body part
        (
            {"ImageLaterality": None, "BodyPartExamined": b"RT-HAND"},
            {"BodyPartExamined": "HAND"},
            "R",
        ),
    ],
)
def test_a_heat_map_of_an_image_assessed_again_carries_its_series_laterality(
    runtime: Runtime,
    storescp: StoreSCP,
    first: dict[str, Any],
    again: dict[str, Any],
    side: str,
) -> None:
    """Laterality is a General Series attribute: the second heat map of the series carries
    the first's, read from the first's file in the outbox, as it carries its Body Part
    Examined. Before, it took the side of the copy received again."""
    instance_id, first_heat_map = _first_heat_map(runtime, storescp, **first)

    received_again(runtime, instance_id, PatientSex="M", **again)
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2, second
    second_heat_map = heat_map_of(deliver(runtime, storescp, second.delivery_ids))  # dciodvfy

    assert second_heat_map.SeriesInstanceUID == first_heat_map.SeriesInstanceUID
    assert second_heat_map.InstanceNumber == 2
    assert first_heat_map.Laterality == second_heat_map.Laterality == side
    assert first_heat_map.BodyPartExamined == second_heat_map.BodyPartExamined == "HAND"


def test_a_withdrawal_notice_carries_its_series_laterality(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The copy received again is no hand's (CHEST) and states no side: the notice that
    withdraws the heat map's bone age joins its series with the series' Laterality L,
    not the copy's empty one."""
    instance_id, first_heat_map = _first_heat_map(runtime, storescp, ImageLaterality="L")

    received_again(runtime, instance_id, BodyPartExamined="CHEST", ImageLaterality=None)
    second = assess_instance(runtime, instance_id)
    assert second.state == "not_assessed" and len(second.delivery_ids) == 2, second
    notice = heat_map_of(deliver(runtime, storescp, second.delivery_ids))  # dciodvfy

    assert notice.SeriesInstanceUID == first_heat_map.SeriesInstanceUID
    assert notice.Laterality == first_heat_map.Laterality == "L"


def _heat_map_path(rt: Runtime, instance_id: int) -> Path:
    with session_scope(rt.database_url) as session:
        [path] = session.scalars(
            select(Delivery.path).where(
                Delivery.instance_id == instance_id, Delivery.kind == ObjectKind.SC
            )
        )
    return Path(path)


def test_a_heat_map_whose_series_retention_removed_states_its_images_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The first heat map's file is gone (retention): the series' side is unknown, and the
    second heat map states the side its own image does, here in its body part alone, as
    it carries its image's body part (build_heatmap_sc's docstring)."""
    instance_id, first_heat_map = _first_heat_map(runtime, storescp, ImageLaterality="L")
    _heat_map_path(runtime, instance_id).unlink()

    received_again(
        runtime, instance_id, PatientSex="M", ImageLaterality=None, BodyPartExamined="RT-HAND"
    )
    second = assess_instance(runtime, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2, second
    second_heat_map = heat_map_of(deliver(runtime, storescp, second.delivery_ids))  # dciodvfy

    assert first_heat_map.Laterality == "L"
    assert second_heat_map.SeriesInstanceUID == first_heat_map.SeriesInstanceUID
    assert (second_heat_map.Laterality, second_heat_map.BodyPartExamined) == ("R", "HAND")


def _heat_maps_and_notices(paths: list[Path]) -> tuple[list[Dataset], list[Dataset]]:
    """The heat maps and the withdrawal notices among the objects of ``paths``."""
    scs: list[Dataset] = [ds for ds in map(dcmread, paths) if ds.Modality == "OT"]
    notices = [ds for ds in scs if str(ds.ImageComments).startswith(WITHDRAWN)]
    return [ds for ds in scs if ds not in notices], notices


def _assessed_again(rt: Runtime, storescp: StoreSCP, instance_id: int, **attributes: Any) -> Any:
    """The image received again with ``attributes``, assessed and its objects delivered:
    its one heat map and its notices (``(heat_map, notices)``)."""
    received_again(rt, instance_id, **attributes)
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "assessed", outcome
    [heat_map], notices = _heat_maps_and_notices(deliver(rt, storescp, outcome.delivery_ids))
    return heat_map, notices


def _image_uid(rt: Runtime, instance_id: int) -> str:
    with session_scope(rt.database_url) as session:
        return session.get_one(Instance, instance_id).sop_instance_uid


def test_a_heat_map_of_an_image_whose_side_was_corrected_goes_into_a_series_of_its_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The PACS corrected the side (L sent again as R): the heat map of the right hand
    opens a series of its own, Laterality R, whose UID the side is part of; the first
    series keeps its heat map as written and gets a notice withdrawing its bone age, of
    its side L. Before, the heat map joined the first series, labelled L. A copy then
    stating no side joins the series of the latest heat map (R); one corrected back to L
    joins the first series again, and the R series gets a notice. In each series, one
    object per assessment, numbered as the assessment."""
    rt = runtime
    instance_id, first = _first_heat_map(rt, storescp, ImageLaterality="L")
    as_written = _heat_map_path(rt, instance_id).read_bytes()
    image_uid, model = _image_uid(rt, instance_id), rt.predictor.model_id

    right, [notice] = _assessed_again(rt, storescp, instance_id, ImageLaterality="R")

    assert right.Laterality == "R" and right.BodyPartExamined == "HAND"
    assert right.SeriesInstanceUID != first.SeriesInstanceUID
    assert right.SeriesInstanceUID == node_uids(rt).derive(
        image_uid, model, "sc-series", "side", "R"
    )
    assert (right.SeriesNumber, right.InstanceNumber) == (SC_SERIES_NUMBER, 2)
    # the first series: its heat map as it was written, and a notice of its side
    assert first.Laterality == notice.Laterality == "L"
    assert (notice.SeriesInstanceUID, notice.InstanceNumber) == (first.SeriesInstanceUID, 2)
    assert first.SeriesInstanceUID == node_uids(rt).derive(image_uid, model, "sc-series")
    with session_scope(rt.database_url) as session:
        first_path = session.scalars(
            select(Delivery.path)
            .where(Delivery.sop_instance_uid == str(first.SOPInstanceUID))
            .limit(1)
        ).one()
    assert Path(first_path).read_bytes() == as_written

    # no side stated: nothing contradicts the R series, where the latest heat map went
    unstated, [notice] = _assessed_again(rt, storescp, instance_id, ImageLaterality="U")
    assert (unstated.SeriesInstanceUID, unstated.Laterality) == (right.SeriesInstanceUID, "R")
    assert unstated.InstanceNumber == 3
    assert (notice.SeriesInstanceUID, notice.Laterality) == (first.SeriesInstanceUID, "L")

    # corrected back: the first series again; the R series' bone age withdrawn there
    left, [notice] = _assessed_again(rt, storescp, instance_id, ImageLaterality="L")
    assert (left.SeriesInstanceUID, left.Laterality) == (first.SeriesInstanceUID, "L")
    assert (notice.SeriesInstanceUID, notice.Laterality) == (right.SeriesInstanceUID, "R")
    assert left.InstanceNumber == notice.InstanceNumber == 4


def test_a_heat_map_of_an_image_assessed_again_on_its_side_keeps_its_series_and_uids(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The side unchanged (the sex corrected): the heat map joins the first series, under
    the UIDs it had before series of a side were opened (no side in them)."""
    rt = runtime
    instance_id, first = _first_heat_map(rt, storescp, ImageLaterality="L")
    image_uid, model = _image_uid(rt, instance_id), rt.predictor.model_id

    second, notices = _assessed_again(rt, storescp, instance_id, PatientSex="M")

    uids = node_uids(rt)
    assert notices == []
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert second.SeriesInstanceUID == uids.derive(image_uid, model, "sc-series")
    assert first.SOPInstanceUID == uids.derive(image_uid, model, "sc")
    assert second.SOPInstanceUID == uids.derive(image_uid, model, "assessment 2", "sc")
    assert second.Laterality == "L"


def test_a_copy_not_assessed_after_a_side_correction_withdraws_both_series(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """L, then R (a series of its own), then a copy that is no hand's: each series gets a
    notice of its own side, under a UID of its own (the two share model and assessment)."""
    rt = runtime
    instance_id, first = _first_heat_map(rt, storescp, ImageLaterality="L")
    right, _ = _assessed_again(rt, storescp, instance_id, ImageLaterality="R")

    received_again(rt, instance_id, BodyPartExamined="CHEST", ImageLaterality="R")
    third = assess_instance(rt, instance_id)
    assert third.state == "not_assessed", third
    heat_maps, notices = _heat_maps_and_notices(deliver(rt, storescp, third.delivery_ids))

    assert heat_maps == []
    assert sorted((n.SeriesInstanceUID, n.Laterality, n.InstanceNumber) for n in notices) == sorted(
        [(first.SeriesInstanceUID, "L", 3), (right.SeriesInstanceUID, "R", 3)]
    )
    assert len({n.SOPInstanceUID for n in notices}) == 2


def test_the_pacs_rejecting_an_image_after_a_side_correction_withdraws_every_heat_map(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The image whose side was corrected is rejected at the PACS: a rejection note of
    ours withdraws each of our objects, the heat map of either series, the notice and
    both SRs, each named in its own series."""
    rt = runtime
    instance_id = spool_instance(rt, sex="F", attributes={"ImageLaterality": "L"})
    sent = deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids)
    received_again(rt, instance_id, ImageLaterality="R")
    sent += deliver(rt, storescp, assess_instance(rt, instance_id).delivery_ids)
    ours = list(map(dcmread, sent))
    heat_maps, notices = _heat_maps_and_notices(sent)
    assert len({h.SeriesInstanceUID for h in heat_maps}) == 2 and len(notices) == 1
    with session_scope(rt.database_url) as session:
        image = dcmread(session.get_one(Instance, instance_id).spool_path)

    rejected = assess_instance(rt, spool_dataset(rt, pacs_rejection_note(image)))

    notes = [read_rejection_note(dcmread(p)) for p in deliver(rt, storescp, rejected.delivery_ids)]
    assert {
        (r.series_instance_uid, r.sop_instance_uid)
        for note in notes
        if note is not None
        for r in note.references
    } == {(str(o.SeriesInstanceUID), str(o.SOPInstanceUID)) for o in ours}


def test_a_heat_map_whose_first_series_retention_removed_joins_the_series_of_its_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """L, then R in a series of its own; retention removes the first heat map's file, and
    the first series' side is no longer known: a third heat map of the right hand joins
    the R series, whose side its UID tells, not the first."""
    rt = runtime
    instance_id, first = _first_heat_map(rt, storescp, ImageLaterality="L")
    right, _ = _assessed_again(rt, storescp, instance_id, ImageLaterality="R")
    with session_scope(rt.database_url) as session:
        first_path = session.scalars(
            select(Delivery.path)
            .where(Delivery.sop_instance_uid == str(first.SOPInstanceUID))
            .limit(1)
        ).one()
    Path(first_path).unlink()

    third, _ = _assessed_again(rt, storescp, instance_id, PatientSex="M")

    assert (third.SeriesInstanceUID, third.Laterality) == (right.SeriesInstanceUID, "R")
    assert third.InstanceNumber == 3
