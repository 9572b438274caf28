"""Body Part Examined of our objects: a Defined Term of the source's, or none.

Modalities send values that are no Code String (``RT-HAND``, ``hand``), which a heat map
copied as they came and dciodvfy then failed ("Character invalid for this VR"), and
values that are no Defined Term (``L HAND``, ``HANDS``), which say nothing a hanging
protocol can match. A heat map carries a Defined Term or nothing (Type 3 in the General
Series module); an SR and a rejection note carry none (no module of theirs has it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from highdicom._standard_utils import get_anatomic_region_map
from pydicom import Dataset, dcmread
from pydicom.multival import MultiValue
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from dicom_io.content import (
    BODY_PART_DEFINED_TERMS,
    CODE_STRING,
    BoneAgeFinding,
    body_part_to_write,
    side_in_body_part,
)
from dicom_io.ko import Reference, build_rejection_note
from dicom_io.pixels import decode_for_display
from dicom_io.sc import (
    NOTICE_BODY_PART,
    build_heatmap_sc,
    build_withdrawal_sc,
    notice_body_part,
    render_overlay,
)
from dicom_io.sr import build_bone_age_sr
from tests.dicomtools import dciodvfy_errors


@pytest.mark.parametrize(
    ("value", "laterality", "expected"),
    [
        ("HAND", None, "HAND"),  # a Defined Term: as it is
        ("WRIST", "L", "WRIST"),
        ("EXTREMITY", None, "EXTREMITY"),
        ("hand", None, "HAND"),  # lower case: no Code String, upper-cased
        ("Hand ", "R", "HAND"),
        ("  wrist", None, "WRIST"),
        ("RT-HAND", "R", "HAND"),  # the side said again, by the SC's Laterality
        ("LT_HAND", "L", "HAND"),
        ("HAND-LT", "L", "HAND"),
        ("left hand", "L", "HAND"),
        ("RT-HAND", None, None),  # the side said nowhere else: dropped, it would be lost
        ("RT-HAND", "L", None),  # the side said otherwise: neither is known to be right
        ("LT-FOO", "L", None),  # no Defined Term once the side is aside
        ("RT LT", "R", None),
        ("L HAND", "L", "HAND"),  # L and R alone: side words beside a hand or wrist only
        ("HAND R", "R", "HAND"),
        ("r wrist", "R", "WRIST"),
        ("L HAND", "R", None),
        ("L HAND", None, None),
        ("R HAND", "L", None),
        ("L SPINE", "L", None),  # not beside another part: L SPINE is the lumbar spine
        ("R FOOT", "R", None),
        ("L ELBOW", "L", None),
        ("RT-HAND-X", "R", None),
        ("HANDS", None, None),  # Code Strings, but no Defined Terms: nothing is invented
        ("CARPUS", "L", None),
        ("HAND_WRIST", None, None),
        ("UPPER_EXTREMITY", None, None),
        ("BONE AGE", None, None),
        ("HAND" + " " * 13, None, "HAND"),
        ("A" * 17, None, None),
        ("", None, None),
        ("   ", None, None),
        (None, None, None),
        (MultiValue(str, ["HAND", "WRIST"]), None, None),  # VM 1
        (b"HAND", None, None),
        (3, None, None),
    ],
)
def test_the_body_part_an_object_of_ours_carries(
    value: object, laterality: str | None, expected: str | None
) -> None:
    assert body_part_to_write(value, laterality=laterality) == expected


def test_the_defined_terms_are_those_of_the_standards_table() -> None:
    """PS3.16 Annex L Table L-1, as highdicom ships it, and each a Code String."""
    assert set(get_anatomic_region_map()) == BODY_PART_DEFINED_TERMS
    assert all(CODE_STRING.fullmatch(term) for term in BODY_PART_DEFINED_TERMS)
    assert {"HAND", "WRIST", "EXTREMITY", "UPPERLIMB", "FINGER"} <= BODY_PART_DEFINED_TERMS


def _cam() -> np.ndarray:
    yy, xx = np.mgrid[0:96, 0:64]
    return np.exp(-(((yy - 60) / 15.0) ** 2 + ((xx - 32) / 12.0) ** 2))


def _heat_map(
    source: Dataset, finding: BoneAgeFinding, series_heat_map: Dataset | None = None
) -> Dataset:
    rgb = render_overlay(decode_for_display(source), _cam(), finding)
    return build_heatmap_sc(
        source,
        rgb,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=1 if series_heat_map is None else 2,
        series_heat_map=series_heat_map,
    )


def _checked(tmp_path: Path, ds: Dataset, name: str) -> Dataset:
    """``ds`` written, dciodvfy reporting no error, read back."""
    path = tmp_path / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == [], name
    return dcmread(path)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # RT-HAND, hand: as sent
@pytest.mark.parametrize(
    ("examined", "side", "expected"),
    [
        ("RT-HAND", "R", "HAND"),
        ("RT-HAND", None, "HAND"),  # the side said only here: Laterality R (test_laterality)
        ("RT-HAND", "L", None),
        ("hand", None, "HAND"),
        ("Hand ", "L", "HAND"),
        ("HAND", "L", "HAND"),
        ("L HAND", "L", "HAND"),
        ("L HAND", "R", None),
    ],
)
def test_a_heat_map_carries_a_defined_term_or_none_and_passes_dciodvfy(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    examined: str,
    side: str | None,
    expected: str | None,
) -> None:
    """Before, the heat map copied the value as it came: dciodvfy failed ``RT-HAND``
    and ``hand`` ("Character invalid for this VR")."""
    source.BodyPartExamined = examined
    source.ImageLaterality = side or "U"
    finding = dataclasses.replace(finding, laterality=side)

    back = _checked(tmp_path, _heat_map(source, finding), "heat-map")

    assert back.Laterality == (side or side_in_body_part(examined) or "")
    if expected is None:
        assert "BodyPartExamined" not in back
    else:
        assert back.BodyPartExamined == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize(
    ("series_value", "expected"),
    [
        ("WRIST", "WRIST"),  # the series' value, whatever the source now says
        (None, None),  # the series' heat maps name none: neither does this one
        ("RT-HAND", NOTICE_BODY_PART),  # written before the fix: as its notices say
    ],
)
def test_a_later_heat_map_carries_its_series_body_part(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    series_value: str | None,
    expected: str | None,
) -> None:
    """Body Part Examined is one value for a series: a heat map joining a series carries
    that of the series' first heat map still readable, as a withdrawal notice does."""
    earlier = Dataset()
    if series_value is not None:
        earlier.BodyPartExamined = series_value
    source.BodyPartExamined = "HAND"  # the PACS corrected it since

    back = _checked(tmp_path, _heat_map(source, finding, series_heat_map=earlier), "later")

    assert notice_body_part(earlier) == expected
    assert back.get("BodyPartExamined") == expected


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize(
    ("series_value", "side", "expected"),
    [
        ("HAND_LT", "R", None),  # a right hand's heat map named a left hand's before
        ("LEFT HAND", "R", None),
        ("L HAND", "R", None),
        ("HAND_LT", "L", "HAND"),  # the side stated by Laterality: the term alone
        ("L HAND", "L", "HAND"),
        ("HAND_LT", None, None),  # the side stated nowhere else: it would be lost
        ("CARPUS", "L", None),  # a Code String, but no Defined Term
        ("WRIST", "R", "WRIST"),
    ],
)
def test_a_later_heat_map_carries_its_series_body_part_only_as_a_defined_term(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    series_value: str,
    side: str | None,
    expected: str | None,
) -> None:
    """A heat map written before heat maps carried Defined Terms only (``HAND_LT``, ``L
    HAND``) gave the series a value that a later heat map copied unchecked: a right
    hand's heat map carried Laterality R and ``HAND_LT``. It carries the series' value
    as a first heat map carries its source's (`body_part_to_write`), and so does a
    withdrawal notice, with the series' Laterality ``side``."""
    earlier = Dataset()
    earlier.BodyPartExamined = series_value
    earlier.Laterality = side or ""  # the series' too (test_laterality)
    source.BodyPartExamined = "HAND"
    source.ImageLaterality = side or "U"
    finding = dataclasses.replace(finding, laterality=side)

    later = _checked(tmp_path, _heat_map(source, finding, series_heat_map=earlier), "later")
    notice = _checked(
        tmp_path,
        build_withdrawal_sc(
            source,
            "the image was received again and is not assessed: patient sex is O",
            model_name="m",
            model_trained=True,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=9902,
            instance_number=2,
            body_part_examined=notice_body_part(earlier),
            series_heat_map=earlier,
        ),
        "notice",
    )

    for written in (later, notice):
        assert written.Laterality == (side or "")
        assert written.get("BodyPartExamined") == expected


def test_a_later_heat_map_whose_series_cannot_be_read_carries_its_sources(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """No earlier heat map readable (retention removed their files): the source's value,
    the series' being unknown (not the HAND a notice names then)."""
    source.BodyPartExamined = "WRIST"
    back = _checked(tmp_path, _heat_map(source, finding, series_heat_map=None), "later")
    assert back.BodyPartExamined == "WRIST"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
def test_an_sr_and_a_rejection_note_carry_no_body_part(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """Their IODs (Comprehensive SR, Key Object Selection Document) have no module with
    Body Part Examined: nothing of the source's is copied into them."""
    source.BodyPartExamined = "RT-HAND"
    sr = build_bone_age_sr(
        source,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        device_observer_uid=generate_uid(),
    )
    study = str(source.StudyInstanceUID)
    note = build_rejection_note(
        source,
        "113001",
        [
            Reference(study, generate_uid(), ComprehensiveSRStorage, generate_uid()),
            Reference(study, generate_uid(), SecondaryCaptureImageStorage, generate_uid()),
        ],
        description="Rejected",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=990,
    )
    for name, ds in (("sr", sr), ("ko", note)):
        assert "BodyPartExamined" not in _checked(tmp_path, ds, name)
