"""The Body Part Examined of a withdrawal notice: a General Series attribute, so the
notice carries that of the heat maps whose series it joins, read from the heat map in
the outbox, and not that of the copy received again that withdraws their bone age."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, ObjectKind
from dicom_io.sc import NOTICE_BODY_PART, WITHDRAWN
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_instance
from tests.integration.test_received_again import deliver, heat_map_of, received_again
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


def _first_heat_map(rt: Runtime, storescp: StoreSCP, instance_id: int) -> Dataset:
    """The image assessed, its SR and heat map delivered; the heat map as received."""
    first = assess_instance(rt, instance_id)
    assert first.state == "assessed", first
    return heat_map_of(deliver(rt, storescp, first.delivery_ids))


def _notice_of(objects: list[Path], heat_map: Dataset) -> Dataset:
    """The notice among ``objects`` that joins the series of ``heat_map``."""
    [notice] = [
        ds
        for ds in map(dcmread, objects)
        if ds.Modality == "OT" and ds.SeriesInstanceUID == heat_map.SeriesInstanceUID
    ]
    assert notice.ImageComments.startswith(WITHDRAWN)
    return notice


def _another_model(rt: Runtime, tmp_path: Path) -> Runtime:
    """The node running model B."""
    from models.checkpoint import save_checkpoint, untrained_model

    loaded = untrained_model(arch="resnet18", input_size=128, seed=5)
    path = tmp_path / "model-b.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    return Runtime(rt.settings.model_copy(update={"model": path}))


def test_a_notice_for_heat_maps_of_an_image_without_a_body_part_names_none(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The image named no body part (the gate found the hand by its descriptions,
    common), nor do its heat maps; the copy received again names CHEST and is not
    assessed. Its notice names none either. Before, it said HAND: a series of two body
    parts."""
    instance_id = spool_instance(runtime, attributes={"BodyPartExamined": None})
    heat_map = _first_heat_map(runtime, storescp, instance_id)
    assert "BodyPartExamined" not in heat_map

    received_again(runtime, instance_id, BodyPartExamined="CHEST", StudyDescription="CHEST PA")
    second = assess_instance(runtime, instance_id)
    assert second.state == "not_assessed" and len(second.delivery_ids) == 2
    notice = _notice_of(deliver(runtime, storescp, second.delivery_ids), heat_map)  # dciodvfy

    assert "BodyPartExamined" not in notice


def test_a_notice_for_wrist_heat_maps_names_the_wrist_whatever_the_copy_says(
    runtime: Runtime, storescp: StoreSCP, tmp_path: Path
) -> None:
    """The image said WRIST, and so do the heat maps of model A; a copy that says HAND,
    the sex corrected, is assessed again by model B. The notice that joins A's series
    says WRIST, as the series does. Before, it took the copy's HAND."""
    instance_id = spool_instance(runtime, sex="F", attributes={"BodyPartExamined": "WRIST"})
    heat_map = _first_heat_map(runtime, storescp, instance_id)
    assert heat_map.BodyPartExamined == "WRIST"

    model_b = _another_model(runtime, tmp_path)
    received_again(model_b, instance_id, BodyPartExamined="HAND", PatientSex="M")
    second = assess_instance(model_b, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 3
    objects = deliver(model_b, storescp, second.delivery_ids)  # dciodvfy: no error
    notice = _notice_of(objects, heat_map)

    assert notice.BodyPartExamined == "WRIST"
    [new_heat_map] = [
        ds
        for ds in map(dcmread, objects)
        if ds.Modality == "OT" and ds.SeriesInstanceUID != heat_map.SeriesInstanceUID
    ]
    assert new_heat_map.BodyPartExamined == "HAND"  # B's own series: the copy's


def test_a_notice_whose_heat_maps_retention_removed_names_the_hand(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The heat map's file is gone from the outbox (retention): the series' value is
    unknown, and the notice names the hand (NOTICE_BODY_PART), not the copy's CHEST."""
    instance_id = spool_instance(runtime, attributes={"BodyPartExamined": "WRIST"})
    heat_map = _first_heat_map(runtime, storescp, instance_id)
    with session_scope(runtime.database_url) as session:
        [path] = session.scalars(
            select(Delivery.path).where(
                Delivery.instance_id == instance_id, Delivery.kind == ObjectKind.SC
            )
        )
    Path(path).unlink()  # as retention removes it

    received_again(runtime, instance_id, BodyPartExamined="CHEST", StudyDescription="CHEST PA")
    second = assess_instance(runtime, instance_id)
    assert second.state == "not_assessed" and len(second.delivery_ids) == 2
    notice = _notice_of(deliver(runtime, storescp, second.delivery_ids), heat_map)

    assert notice.BodyPartExamined == NOTICE_BODY_PART == "HAND"
