"""Laterality (0020,0060) of the heat map and the withdrawal notice.

A source that states its side only in Body Part Examined (``RT-HAND``, no Image
Laterality or Laterality) gave a heat map that stated it nowhere: the body part, no
Defined Term, was left out, and Laterality was empty. Its heat map now carries Laterality
R and Body Part Examined HAND; a side that another attribute contradicts is still not
taken. Laterality is a General Series attribute: a later heat map of a series, and a
notice joining it, carry the series' value, that of its first heat map still as written,
as they carry its Body Part Examined. The SR's finding site states the side the heat map
does (dicom_io.content.image_side): before, of a ``RT-HAND`` it stated none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_io import codes
from dicom_io.content import BoneAgeFinding, side_in_body_part
from dicom_io.gate import patient_facts
from dicom_io.sc import (
    build_withdrawal_sc,
    image_side,
    notice_body_part,
    series_laterality,
)
from dicom_io.sr import build_bone_age_sr
from tests.unit.dicom_io.test_body_part import _checked, _heat_map

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # RT-HAND, as sent


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("RT-HAND", "R"),
        ("HAND_LT", "L"),
        ("left hand", "L"),
        ("RIGHT WRIST", "R"),
        ("L HAND", "L"),  # L and R alone: beside a hand or wrist only
        ("WRIST R", "R"),
        ("L SPINE", None),  # the lumbar spine
        ("R FOOT", None),
        ("HAND", None),  # no side word
        ("HANDS", None),
        ("RT-HAND-LT", None),  # two sides: neither is taken
        ("RT LT", None),
        ("LT-FOO", None),  # no Defined Term beside it
        ("", None),
        (None, None),
        (b"RT-HAND", None),
    ],
)
def test_the_side_a_body_part_names(value: object, expected: str | None) -> None:
    assert side_in_body_part(value) == expected


def _image(image_laterality: str | None, laterality: str | None, body_part: str | None) -> Dataset:
    ds = Dataset()
    for keyword, value in (
        ("ImageLaterality", image_laterality),
        ("Laterality", laterality),
        ("BodyPartExamined", body_part),
    ):
        if value is not None:
            setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("image_laterality", "laterality", "body_part", "expected"),
    [
        ("L", None, "HAND", "L"),  # stated: as before
        (None, "R", "HAND", "R"),
        ("U", "L", "HAND", "L"),  # U states no side: the series' L
        (None, None, "RT-HAND", "R"),  # stated only in the body part
        ("U", None, "RT-HAND", "R"),  # U: as DX modalities write an unknown side
        ("", "", "HAND_LT", "L"),
        (" ", None, "left hand", "L"),
        ("L", None, "RT-HAND", "L"),  # contradicted: the attribute's, never the word's
        (None, "L", "RT-HAND", "L"),
        ("B", None, "RT-HAND", None),  # both hands and a right one: no side taken
        ("B", "L", "HAND", None),  # Image Laterality decides alone: not the series' L
        ("X", "R", "HAND", None),
        ("", "B", "RT-HAND", None),
        ("X", None, "RT-HAND", None),  # a value no standard has: no side taken
        (None, None, "HAND", None),  # no side anywhere
        (None, None, "RT-HAND-LT", None),
        (None, None, None, None),
    ],
)
def test_the_side_an_image_states(
    image_laterality: str | None, laterality: str | None, body_part: str | None, expected: str
) -> None:
    assert image_side(_image(image_laterality, laterality, body_part)) == expected


def _notice(source: Dataset, series_heat_map: Dataset | None) -> Dataset:
    return build_withdrawal_sc(
        source,
        "the image was received again and is not assessed: patient sex is O",
        model_name="BoneAgeNet resnet50",
        model_trained=True,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9902,
        instance_number=2,
        body_part_examined=notice_body_part(series_heat_map),
        series_heat_map=series_heat_map,
    )


def _stating(source: Dataset, finding: BoneAgeFinding, **attributes: str | None) -> BoneAgeFinding:
    """``source`` with ``attributes`` set (None: removed), and ``finding`` with the side
    the gate reads of it (Image Laterality, else Laterality, L or R)."""
    for keyword, value in attributes.items():
        if value is None:
            if keyword in source:
                delattr(source, keyword)
        else:
            setattr(source, keyword, value)
    stated = str(source.get("ImageLaterality") or source.get("Laterality") or "").upper()
    return dataclasses.replace(finding, laterality=stated if stated in ("L", "R") else None)


@pytest.mark.parametrize(
    ("image_laterality", "body_part", "side", "written"),
    [
        (None, "RT-HAND", "R", "HAND"),  # before: Laterality empty, no Body Part Examined
        ("U", "RT-HAND", "R", "HAND"),
        (None, "HAND_LT", "L", "HAND"),
        (None, "L WRIST", "L", "WRIST"),
        ("L", "RT-HAND", "L", None),  # contradicted: as before, the side stated, no part
        ("B", "RT-HAND", "", None),  # neither side taken
        (None, "L SPINE", "", None),  # no side word beside it
    ],
)
def test_a_heat_map_states_the_side_its_image_names_only_in_its_body_part(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    image_laterality: str | None,
    body_part: str,
    side: str,
    written: str | None,
) -> None:
    """The side a radiologist reads from the image's body part (``RT-HAND``) is the heat
    map's Laterality, and the body part its Defined Term: the side is not lost."""
    finding = _stating(
        source,
        finding,
        ImageLaterality=image_laterality,
        Laterality=None,
        BodyPartExamined=body_part,
    )

    back = _checked(tmp_path, _heat_map(source, finding), "heat-map")

    assert back.Laterality == side
    assert back.get("BodyPartExamined") == written


@pytest.mark.parametrize(
    ("series_side", "copy_side", "copy_body_part"),
    [
        ("L", "U", "HAND"),  # the copy received again states no side: the series' L
        ("R", "U", "HAND_LT"),  # the copy names another side in its body part only
        ("L", "R", "HAND"),  # the copy states another side: one series, one value
        ("", "L", "HAND"),  # the series' heat maps state none: neither does this one
        ("R", "U", "RT-HAND"),  # the series opened by a heat map of a RT-HAND image
    ],
)
def test_a_later_heat_map_and_a_notice_carry_their_series_laterality(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    series_side: str,
    copy_side: str,
    copy_body_part: str,
) -> None:
    """Laterality is a General Series attribute: a heat map joining a series, and a notice
    withdrawing its bone age, carry the value of the series' first heat map as written,
    as they carry its Body Part Examined. Before, each took its own copy's side: one
    series, two sides."""
    first = _checked(tmp_path, _heat_map(source, finding), "first")
    first.Laterality = series_side  # as the series' first heat map was written
    finding = _stating(source, finding, ImageLaterality=copy_side, BodyPartExamined=copy_body_part)

    later = _checked(tmp_path, _heat_map(source, finding, series_heat_map=first), "later")
    notice = _checked(tmp_path, _notice(source, first), "notice")

    assert series_laterality(first) == (series_side or None)
    for written in (later, notice):
        assert written.Laterality == series_side
        assert written.BodyPartExamined == "HAND"  # the series' too


def test_a_later_heat_map_whose_series_cannot_be_read_states_its_images_side(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    """No earlier heat map readable (retention removed their files): the series' side is
    unknown, and a later heat map and a notice state the side their copy does, in its
    body part alone too, as a series' first heat map does."""
    finding = _stating(source, finding, ImageLaterality=None, BodyPartExamined="RT-HAND")

    later = _checked(tmp_path, _heat_map(source, finding, series_heat_map=None), "later")
    notice = _checked(tmp_path, _notice(source, None), "notice")

    assert later.Laterality == notice.Laterality == "R"
    assert later.BodyPartExamined == notice.BodyPartExamined == "HAND"


def _finding_site_side(sr: Dataset) -> str | None:
    """The side the SR's finding site (hand) states, ``L`` or ``R``; None where it states
    none."""
    by_code = {codes.LEFT.value: "L", codes.RIGHT.value: "R"}
    found: list[str] = []

    def walk(items: list[Dataset]) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeMeaning == "Laterality":
                found.append(by_code[item.ConceptCodeSequence[0].CodeValue])
            walk(list(item.get("ContentSequence", [])))

    walk(list(sr.ContentSequence))
    assert len(found) <= 1, found
    return found[0] if found else None


@pytest.mark.parametrize(
    ("image_laterality", "body_part", "side"),
    [
        (None, "RT-HAND", "R"),  # before: the heat map said R, the SR no side
        ("U", "HAND_LT", "L"),
        ("L", "RT-HAND", "L"),  # contradicted: the attribute's, in both
        ("R", "HAND", "R"),
        ("B", "RT-HAND", None),  # neither takes a side
        (None, "HAND", None),
    ],
)
def test_the_sr_and_the_heat_map_of_an_image_state_one_side(
    tmp_path: Path,
    source: Dataset,
    finding: BoneAgeFinding,
    image_laterality: str | None,
    body_part: str,
    side: str | None,
) -> None:
    """The SR's finding site states the side the heat map's Laterality does
    (dicom_io.content.image_side), a side named only in Body Part Examined too."""
    finding = _stating(
        source,
        finding,
        ImageLaterality=image_laterality,
        Laterality=None,
        BodyPartExamined=body_part,
    )
    sr = build_bone_age_sr(
        source,
        finding,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=9901,
        device_observer_uid=generate_uid(),
    )

    report = _checked(tmp_path, sr, "sr")
    heat_map = _checked(tmp_path, _heat_map(source, finding), "heat-map")

    assert _finding_site_side(report) == side
    assert heat_map.Laterality == (side or "")


@pytest.mark.parametrize(
    ("image_laterality", "laterality", "body_part", "expected"),
    [
        (None, None, "RT-HAND", "R"),  # before: None, and a LT-HAND copy looked unchanged
        ("U", "L", "HAND", "L"),  # before: None (U read as the side)
        ("L", None, "RT-HAND", "L"),
        ("B", "L", "HAND", None),
    ],
)
def test_the_gate_reads_the_side_our_objects_state(
    image_laterality: str | None, laterality: str | None, body_part: str, expected: str | None
) -> None:
    """The patient's facts, which the digest of an assessment's inputs is made of, hold
    the side the SR and the heat map state (image_side)."""
    facts = patient_facts(_image(image_laterality, laterality, body_part))

    assert facts.laterality == expected
