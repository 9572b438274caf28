"""Body Part Examined of the heat maps the pipeline makes: a Defined Term of the image's
or none (dicom_io.content.body_part_to_write), and one value for a heat-map series,
whatever a copy received again names later."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, ObjectKind
from tests.conftest import StoreSCP
from tests.integration import test_received_again as received_again_tests
from tests.integration.test_pipeline import spool_instance
from tests.integration.test_received_again import deliver, heat_map_of, received_again
from worker.pipeline import assess_instance
from worker.runtime import Runtime

pytestmark = pytest.mark.integration

#: A node sending to the storescp, on SQLite and on a real PostgreSQL.
runtime = received_again_tests.runtime


@pytest.mark.parametrize(
    ("sent", "side", "written_side", "expected"),
    [
        (b"RT-HAND", "R", "R", "HAND"),  # the side is the SC's Laterality R
        (b"RT-HAND", None, "R", "HAND"),  # the side said nowhere else: Laterality R
        (b"RT-HAND", "L", "L", None),  # the side said otherwise: neither taken as right
        (b"hand", None, "", "HAND"),
        (b"Hand ", "L", "L", "HAND"),
    ],
)
def test_a_heat_map_of_an_image_whose_body_part_is_no_code_string_passes_dciodvfy(
    runtime: Runtime,
    storescp: StoreSCP,
    sent: bytes,
    side: str | None,
    written_side: str,
    expected: str | None,
) -> None:
    """The modality wrote Body Part Examined as no Code String allows (a hyphen, lower
    case). The heat map copied it as it came, and dciodvfy failed it ("Character invalid
    for this VR"); now it carries the Defined Term, or none."""
    attributes: dict[str, object] = {"BodyPartExamined": sent, "ImageLaterality": side}
    instance_id = spool_instance(runtime, attributes=attributes)
    outcome = assess_instance(runtime, instance_id)
    assert outcome.state == "assessed", outcome

    heat_map = heat_map_of(deliver(runtime, storescp, outcome.delivery_ids))  # dciodvfy

    assert heat_map.Laterality == written_side
    assert heat_map.get("BodyPartExamined") == expected


def _heat_map_path(rt: Runtime, instance_id: int) -> Path:
    with session_scope(rt.database_url) as session:
        [path] = session.scalars(
            select(Delivery.path).where(
                Delivery.instance_id == instance_id, Delivery.kind == ObjectKind.SC
            )
        )
    return Path(path)


def _reassessed_after_the_body_part_was_corrected(
    rt: Runtime, storescp: StoreSCP, *, retention_removed_the_first: bool
) -> tuple[Dataset, Dataset]:
    """A WRIST image assessed, its heat map delivered; the PACS corrects the body part to
    HAND, and the sex, and sends the image again: the same model assesses it again, and
    its heat map joins the first's series. Both heat maps, as the storescp got them."""
    instance_id = spool_instance(rt, sex="F", attributes={"BodyPartExamined": "WRIST"})
    first = assess_instance(rt, instance_id)
    assert first.state == "assessed", first
    first_heat_map = heat_map_of(deliver(rt, storescp, first.delivery_ids))
    if retention_removed_the_first:
        _heat_map_path(rt, instance_id).unlink()

    received_again(rt, instance_id, BodyPartExamined="HAND", PatientSex="M")
    second = assess_instance(rt, instance_id)
    assert second.state == "assessed" and len(second.delivery_ids) == 2, second
    second_heat_map = heat_map_of(deliver(rt, storescp, second.delivery_ids))  # dciodvfy

    assert second_heat_map.SeriesInstanceUID == first_heat_map.SeriesInstanceUID
    assert second_heat_map.InstanceNumber == 2
    return first_heat_map, second_heat_map


def test_a_heat_map_of_an_image_assessed_again_carries_its_series_body_part(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """Body Part Examined is a General Series attribute: the second heat map of the
    series carries the first's WRIST, read from the first's file in the outbox as a
    withdrawal notice reads it. Before, it took the copy's HAND: one series, two body
    parts."""
    first, second = _reassessed_after_the_body_part_was_corrected(
        runtime, storescp, retention_removed_the_first=False
    )
    assert first.BodyPartExamined == "WRIST"
    assert second.BodyPartExamined == "WRIST"


def test_a_heat_map_whose_series_retention_removed_carries_its_images_body_part(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """The first heat map's file is gone (retention): the series' value is unknown, and
    the second heat map carries its own image's, HAND (build_heatmap_sc's docstring)."""
    first, second = _reassessed_after_the_body_part_was_corrected(
        runtime, storescp, retention_removed_the_first=True
    )
    assert first.BodyPartExamined == "WRIST"
    assert second.BodyPartExamined == "HAND"
