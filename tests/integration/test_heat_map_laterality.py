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
from sqlalchemy import select, update

from db.engine import session_scope
from db.schema import Delivery, Instance, ObjectKind, Result
from dicom_io.ko import read_rejection_note
from dicom_io.sc import WITHDRAWN
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_dataset, spool_instance
from tests.integration.test_received_again import (
    deliver,
    heat_map_of,
    received_again,
    report_of,
)
from tests.support import pacs_rejection_note
from tests.unit.dicom_io.test_laterality import _finding_site_side
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


def test_a_heat_map_whose_series_retention_removed_goes_by_the_side_its_result_recorded(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The first heat map's file is gone (retention): the series' side is the one the
    result of its first heat map recorded (L). The copy received again states R, in its
    body part alone: its heat map opens a series of its own R, and the first series gets
    a notice of its side L. Before, the R heat map joined the L series, and no notice
    withdrew the L one."""
    rt = runtime
    instance_id, first_heat_map = _first_heat_map(rt, storescp, ImageLaterality="L")
    _heat_map_path(rt, instance_id).unlink()
    image_uid, model = _image_uid(rt, instance_id), rt.predictor.model_id

    second, [notice] = _assessed_again(
        rt, storescp, instance_id, PatientSex="M", ImageLaterality=None, BodyPartExamined="RT-HAND"
    )

    assert first_heat_map.Laterality == "L"
    assert second.SeriesInstanceUID == node_uids(rt).derive(
        image_uid, model, "sc-series", "side", "R"
    )
    assert (second.Laterality, second.BodyPartExamined) == ("R", "HAND")
    assert (notice.SeriesInstanceUID, notice.Laterality) == (first_heat_map.SeriesInstanceUID, "L")


def test_a_heat_map_whose_series_retention_removed_joins_it_on_the_recorded_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The first heat map's file is gone and the copy states its side (L, the sex
    corrected): the second heat map joins the first series, Laterality L."""
    rt = runtime
    instance_id, first_heat_map = _first_heat_map(rt, storescp, ImageLaterality="L")
    _heat_map_path(rt, instance_id).unlink()

    second, notices = _assessed_again(rt, storescp, instance_id, PatientSex="M")

    assert notices == []
    assert (second.SeriesInstanceUID, second.Laterality) == (first_heat_map.SeriesInstanceUID, "L")


def test_a_heat_map_joins_no_series_whose_side_is_unknown(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The first heat map's file is gone and its result recorded no side (as one recorded
    before the gate read the side our objects state): the series' side is unknown, and a
    heat map of a side opens a series of its own; the first series gets a notice."""
    rt = runtime
    instance_id, first_heat_map = _first_heat_map(rt, storescp, ImageLaterality="L")
    _heat_map_path(rt, instance_id).unlink()
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Result).where(Result.instance_id == instance_id).values(laterality=None)
        )

    second, [notice] = _assessed_again(rt, storescp, instance_id, PatientSex="M")

    assert second.Laterality == "L"
    assert second.SeriesInstanceUID != first_heat_map.SeriesInstanceUID
    assert notice.SeriesInstanceUID == first_heat_map.SeriesInstanceUID


def test_a_side_corrected_in_the_body_part_alone_is_assessed_again(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """RT-HAND with no laterality, corrected by the PACS to LT-HAND, nothing else changed:
    the image is assessed again, and its heat map (in a series of its own, L) and its SR
    state L, as its result records. Before, the digest of its inputs left the body part's
    side out: the copy counted as unchanged, and the R objects stood on a left hand."""
    rt = runtime
    instance_id, first = _first_heat_map(
        rt, storescp, ImageLaterality=None, BodyPartExamined=b"RT-HAND"
    )
    image_uid, model = _image_uid(rt, instance_id), rt.predictor.model_id

    received_again(rt, instance_id, BodyPartExamined="LT-HAND")
    outcome = assess_instance(rt, instance_id)
    assert outcome.state == "assessed", outcome
    sent = deliver(rt, storescp, outcome.delivery_ids)
    [left], [notice] = _heat_maps_and_notices(sent)

    assert first.Laterality == notice.Laterality == "R"
    assert notice.SeriesInstanceUID == first.SeriesInstanceUID
    assert (left.Laterality, left.BodyPartExamined) == ("L", "HAND")
    assert left.SeriesInstanceUID == node_uids(rt).derive(
        image_uid, model, "sc-series", "side", "L"
    )
    assert _finding_site_side(report_of(sent)) == "L"
    with session_scope(rt.database_url) as session:
        recorded = session.scalars(
            select(Result.laterality).where(
                Result.instance_id == instance_id, Result.assessment == 2
            )
        ).one()
    assert recorded == "L"


def _side_series_files_removed(rt: Runtime, storescp: StoreSCP) -> tuple[int, Dataset, Dataset]:
    """L, then R in a series of its own, whose heat map's file retention then removed:
    the instance id, the first heat map and the R one."""
    instance_id, first = _first_heat_map(rt, storescp, ImageLaterality="L")
    right, _ = _assessed_again(rt, storescp, instance_id, ImageLaterality="R")
    with session_scope(rt.database_url) as session:
        right_path = session.scalars(
            select(Delivery.path)
            .where(Delivery.sop_instance_uid == str(right.SOPInstanceUID))
            .limit(1)
        ).one()
    Path(right_path).unlink()
    return instance_id, first, right


def test_a_notice_in_a_side_series_whose_files_are_gone_states_the_series_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The R series' heat map file is gone and the copy (corrected back to L) is no
    hand's: the notice withdrawing the R series states R, the side it was opened for.
    Before, it stated the copy's L."""
    rt = runtime
    instance_id, first, right = _side_series_files_removed(rt, storescp)

    received_again(rt, instance_id, BodyPartExamined="CHEST", ImageLaterality="L")
    third = assess_instance(rt, instance_id)
    assert third.state == "not_assessed", third
    _, notices = _heat_maps_and_notices(deliver(rt, storescp, third.delivery_ids))

    assert sorted((n.SeriesInstanceUID, n.Laterality) for n in notices) == sorted(
        [(first.SeriesInstanceUID, "L"), (right.SeriesInstanceUID, "R")]
    )


def test_a_heat_map_joining_a_side_series_whose_files_are_gone_states_its_side(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The R series' heat map file is gone; a copy stating no side (U) joins the series of
    the latest heat map, R, and states R. Before, its Laterality was empty."""
    rt = runtime
    instance_id, _, right = _side_series_files_removed(rt, storescp)

    third, _ = _assessed_again(rt, storescp, instance_id, ImageLaterality="U", PatientSex="M")

    assert (third.SeriesInstanceUID, third.Laterality) == (right.SeriesInstanceUID, "R")


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
