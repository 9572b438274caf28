from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from pydicom import Dataset, uid
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from db.queries import reason_category
from dicom_io import gate
from dicom_io.synthetic import make_radiograph_dataset

STUDY = dt.date(2026, 3, 15)


def hand(**kwargs: object) -> Dataset:
    defaults: dict[str, object] = {
        "sex": "F",
        "birth_date": dt.date(2016, 1, 10),
        "study_date": STUDY,
    }
    defaults.update(kwargs)
    return make_radiograph_dataset(np.full((256, 200), 0.5, dtype=np.float32), **defaults)  # type: ignore[arg-type]


def decided(ds: Dataset, reason: str | None, category: str | None = None) -> gate.GateDecision:
    """The gate refuses ``ds`` for ``reason`` (in ``category``), or accepts it (None)."""
    decision = gate.check(ds)
    assert decision.reason == reason
    assert decision.accepted is (reason is None)
    if reason is not None and category is not None:
        assert reason_category(reason) == category
    return decision


def test_hand_dx_is_accepted_with_facts() -> None:
    decision = gate.check(hand())
    assert decision.accepted, decision.reason
    assert decision.facts.male is False
    assert decision.facts.birth_date == dt.date(2016, 1, 10)
    assert decision.facts.reference_date == STUDY
    assert decision.facts.laterality == "L"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "CT"}, "CT Image Storage is not a projection radiograph"),
        ({"body_part": "CHEST"}, "body part examined is CHEST, not a hand"),
        ({"sex": "O"}, "patient sex is O; the model needs M or F"),
        ({"sex": None}, "patient sex is empty"),
        ({"birth_date": dt.date(1990, 1, 1)}, "outside the model's range"),
    ],
)
def test_refusals_are_human_readable(change: dict[str, object], reason: str) -> None:
    decision = gate.check(hand(**change))
    assert not decision.accepted
    assert decision.reason is not None and reason in decision.reason


@pytest.mark.parametrize(
    ("sop_class", "intent", "reason"),
    [
        (
            uid.DigitalXRayImageStorageForProcessing,
            "FOR PROCESSING",
            "SOP class Digital X-Ray Image Storage - For Processing holds raw detector data, "
            "not for display; the model reads images for presentation",
        ),
        (
            uid.DigitalXRayImageStorageForPresentation,
            "FOR PROCESSING",  # not what the SOP class allows, and raw all the same
            "SOP class Digital X-Ray Image Storage - For Presentation, FOR PROCESSING, holds "
            "raw detector data, not for display; the model reads images for presentation",
        ),
        (uid.DigitalXRayImageStorageForPresentation, "FOR PRESENTATION", None),
        (uid.ComputedRadiographyImageStorage, None, None),
    ],
)
def test_raw_detector_data_is_refused(sop_class: str, intent: str | None, reason: str) -> None:
    """A DX for processing is what the detector gave, before the modality made a
    radiograph of it to read (PS3.3 C.8.11.1.1.1): nothing like what the model learnt
    from, and a site that forwards both would get two bone ages for one hand."""
    ds = hand()
    ds.SOPClassUID = sop_class
    if intent is None:
        del ds.PresentationIntentType
    else:
        ds.PresentationIntentType = intent
    decided(ds, reason, "sop_class")


@pytest.mark.parametrize(
    ("region", "description", "reason"),
    [
        (("85562004", "SCT", "Hand"), "XR", None),
        (("74670003", "SCT", "Wrist joint"), None, None),
        (("T-D8700", "SRT", "Hand"), None, None),  # older modalities' SNOMED-RT
        (
            ("51185008", "SCT", "Chest"),
            "XR HAND",  # the coded region outranks the free text
            "body part (Anatomic Region Sequence) is Chest (SCT 51185008), not a hand",
        ),
        (None, "XR HAND", None),
        (None, "XR", "body part is not stated (no BodyPartExamined, no hand in the descriptions)"),
    ],
)
def test_a_dx_without_body_part_examined_is_judged_by_its_coded_anatomic_region(
    region: tuple[str, str, str] | None, description: str | None, reason: str | None
) -> None:
    """DX must code the region imaged (Anatomic Region Sequence, Type 1, PS3.3 C.8.11.5);
    Body Part Examined is Type 3, and many DX leave it out."""
    ds = hand()
    del ds.BodyPartExamined
    del ds.AnatomicRegionSequence
    if region is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = region
        ds.AnatomicRegionSequence = [item]
    if description is not None:
        ds.StudyDescription = description
    decided(ds, reason, "body_part")


def test_body_part_examined_outranks_the_coded_region() -> None:
    ds = hand(body_part="CHEST")  # its Anatomic Region Sequence still says Hand
    assert ds.AnatomicRegionSequence[0].CodeMeaning == "Hand"
    assert gate.check(ds).reason == "body part examined is CHEST, not a hand"


@pytest.mark.parametrize(
    ("keyword", "reason"),
    [
        ("StudyInstanceUID", "StudyInstanceUID is missing: results could not be placed"),
        ("SeriesInstanceUID", "SeriesInstanceUID is missing: results could not reference"),
        ("SOPInstanceUID", "SOPInstanceUID is missing: results could not reference"),
    ],
)
def test_an_image_its_results_could_not_reference_is_refused(keyword: str, reason: str) -> None:
    """The SR and SC join the image's study and reference the image by these (the SR
    raised without them, and the image was tried again until it ended in error)."""
    ds = hand()
    delattr(ds, keyword)
    decision = gate.check(ds)
    assert not decision.accepted
    assert decision.reason is not None and decision.reason.startswith(reason)


def test_missing_body_part_needs_a_hand_description() -> None:
    ds = hand()
    del ds.BodyPartExamined
    del ds.AnatomicRegionSequence  # as a CR has none, or a DX that codes no region
    ds.StudyDescription = "XR CHEST PA"
    assert (
        gate.check(ds).reason
        == "body part is not stated (no BodyPartExamined, no hand in the descriptions)"
    )
    ds.StudyDescription = "XR Bone age, left hand"
    assert gate.check(ds).accepted


def test_a_multi_valued_patient_sex_is_shown_as_dicom_writes_it() -> None:
    ds = hand()
    ds.PatientSex = ["M", "F"]
    assert gate.check(ds).reason == "patient sex is M\\F; the model needs M or F"


def test_tiny_image_is_refused() -> None:
    ds = make_radiograph_dataset(
        np.zeros((1, 1), np.float32), sex="M", birth_date=None, study_date=STUDY
    )
    assert gate.check(ds).reason == "image is 1x1 pixels, smaller than 128x128"


@pytest.mark.parametrize(
    ("rows", "columns", "reason"),
    [
        (16384, 128, "image is 128x16384 pixels, longer than 4:1; a hand radiograph is not"),
        (128, 16384, "image is 16384x128 pixels, longer than 4:1; a hand radiograph is not"),
        (513, 128, "image is 128x513 pixels, longer than 4:1; a hand radiograph is not"),
        (512, 128, None),  # 4:1 at most
        (430, 180, None),  # 18x43 cm, a long-bone cassette's format
        (430, 350, None),  # 35x43 cm
        (300, 240, None),  # 24x30 cm
    ],
)
def test_an_elongated_image_is_refused(rows: int, columns: int, reason: str | None) -> None:
    """A 128 x 16384 "HAND" was assessed, its padded square crop 1.25 GB of float32
    (found in review): no hand radiograph is longer than 4:1."""
    ds = make_radiograph_dataset(
        np.full((rows, columns), 0.5, np.float32), sex="M", birth_date=None, study_date=STUDY
    )
    decided(ds, reason, "size")


@pytest.mark.parametrize(
    ("rows", "columns", "reason"),
    [
        (8192, 8192, None),  # gate.MAX_PIXELS
        (7090, 5670, None),  # a 24 x 30 cm film digitised at 600 dpi
        (8193, 8192, "image is 8192x8193 pixels, more than 67 million; a hand radiograph is not"),
        (
            65535,
            65535,
            "image is 65535x65535 pixels, more than 67 million; a hand radiograph is not",
        ),
    ],
)
def test_an_image_of_more_pixels_than_any_hand_radiograph_is_refused(
    rows: int, columns: int, reason: str | None
) -> None:
    """Judged from Rows and Columns, before a decoder allocates what they say: a JPEG 2000
    file of a few kilobytes can say 65535 x 65535, 17 GB as float32."""
    ds = hand()
    ds.Rows, ds.Columns = rows, columns
    decided(ds, reason, "size")


def test_no_pixel_data_is_refused() -> None:
    ds = hand()
    del ds.PixelData
    assert gate.check(ds).reason == "the instance has no pixel data"


@pytest.mark.parametrize(
    ("value", "months"),
    [("010Y", 120.0), ("006M", 6.0), ("004W", 28 / 30.4375), ("bad", None), (None, None)],
)
def test_patient_age_string(value: str | None, months: float | None) -> None:
    assert (
        gate.parse_as(value) == pytest.approx(months)
        if months is not None
        else gate.parse_as(value) is None
    )


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # wrong on purpose
@pytest.mark.parametrize(
    ("value", "months", "unit"),
    [
        ("45Y", 540.0, "Y"),
        ("45 Y", 540.0, "Y"),
        ("4Y", 48.0, "Y"),
        ("010 Y", 120.0, "Y"),
        ("6m", 6.0, "M"),
        (" 12 W ", 12 * 7 / 30.4375, "W"),
        ("0045Y", None, None),  # four digits
        ("45  Y", None, None),  # two spaces
        ("-5Y", None, None),
        ("4.5Y", None, None),
        ("45", None, None),  # no unit
        ("45YEARS", None, None),
        ("Y", None, None),
    ],
)
def test_a_patient_age_written_non_conformantly_is_read_as_meant(
    value: str, months: float | None, unit: str | None
) -> None:
    """One to three digits and a space before the unit are what some modalities write;
    other forms stay unread. The unit is read as it is, so an age in years still counts
    as whole years only."""
    ds = hand(birth_date=None)
    ds.PatientAge = value
    facts = gate.patient_facts(ds)
    assert facts.patient_age_months == (pytest.approx(months) if months is not None else None)
    assert facts.patient_age_unit == unit
    assert facts.age_in_whole_years_only is (unit == "Y")


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # wrong on purpose
def test_where_the_birth_date_gives_the_age_patient_age_is_read_as_before() -> None:
    """Strictly, as before the lenient reading: the facts are part of the digest of an
    assessment's inputs, and a "10Y" beside a birth date read as 120 months made every
    copy received again of such an image look changed, and assessed again (found in
    review). The birth date gives the age all the same."""
    ds = hand()
    ds.PatientAge = "10Y"
    facts = gate.patient_facts(ds)
    assert facts.age_from_birth_date
    assert (facts.patient_age_months, facts.patient_age_unit) == (None, None)
    ds.PatientAge = "010Y"  # conformant: read as it always was
    assert gate.patient_facts(ds).patient_age_months == 120.0


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")  # wrong on purpose
def test_an_adult_whose_age_is_written_non_conformantly_is_refused() -> None:
    """With no birth date, a Patient's Age of "45Y" is an adult's, outside the model's
    range: read strictly it gave no age, and the image was assessed."""
    ds = hand(birth_date=None)
    ds.PatientAge = "45Y"
    decision = gate.check(ds)
    assert decision.reason == "patient age 45.0 years is outside the model's range 0-19 years"


def test_patient_age_is_the_last_resort() -> None:
    ds = hand(birth_date=None)
    ds.PatientAge = "011Y"
    facts = gate.patient_facts(ds)
    assert facts.birth_date is None and facts.patient_age_months == 132.0
    assert facts.patient_age_unit == "Y" and facts.age_in_whole_years_only


@pytest.mark.parametrize(
    ("birth_date", "age", "whole_years_only"),
    [
        (None, "011Y", True),
        (None, "132M", False),
        (None, "050W", False),
        (None, None, False),
        (dt.date(2016, 1, 10), "011Y", False),  # the birth date gives the age to the day
        (dt.date(2030, 1, 10), "011Y", True),  # a birth date after the image gives none
    ],
)
def test_an_age_in_whole_years_only_is_told_apart(
    birth_date: dt.date | None, age: str | None, whole_years_only: bool
) -> None:
    ds = hand(birth_date=None)
    if birth_date is not None:
        ds.PatientBirthDate = birth_date.strftime("%Y%m%d")
    ds.PatientAge = age
    facts = gate.patient_facts(ds)
    assert facts.age_in_whole_years_only is whole_years_only
    assert facts.age_from_birth_date is (birth_date is not None and birth_date <= STUDY)


def test_a_birth_date_after_the_image_is_refused_as_an_unknown_age() -> None:
    """One of the dates is wrong: no age is made of them, not even from Patient's Age,
    and the reason counts with the other age refusals (the metric's label)."""
    ds = hand()
    ds.PatientBirthDate = (STUDY + dt.timedelta(days=30)).strftime("%Y%m%d")
    ds.PatientAge = "009Y"
    decision = gate.check(ds)
    assert not decision.accepted
    assert decision.reason == (
        "patient age is unknown: the birth date is after the date of the image"
    )
    assert reason_category(decision.reason) == "age"
    assert str(STUDY.year) not in (decision.reason or "")


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        (
            "ImagerPixelSpacing",
            ["0.2", "0.1"],
            "pixels are not square: ImagerPixelSpacing is 0.2\\0.1 (row\\column spacing, mm); "
            "the model reads square pixels",
        ),
        (
            "PixelSpacing",
            ["0.1", "0.105"],
            "pixels are not square: PixelSpacing is 0.1\\0.105 (row\\column spacing, mm); "
            "the model reads square pixels",
        ),
        (
            "NominalScannedPixelSpacing",
            ["0.15", "0.1"],
            "pixels are not square: NominalScannedPixelSpacing is 0.15\\0.1 "
            "(row\\column spacing, mm); the model reads square pixels",
        ),
        (
            "PixelAspectRatio",
            [2, 1],
            "pixels are not square: PixelAspectRatio is 2\\1 (row\\column); "
            "the model reads square pixels",
        ),
        ("ImagerPixelSpacing", ["0.1", "0.1009"], None),  # rounding, within 1 %
        ("PixelSpacing", ["0.143", "0.143"], None),
        ("PixelAspectRatio", [1, 1], None),
        ("PixelAspectRatio", [100, 100], None),
    ],
)
def test_an_image_whose_pixels_are_not_square_is_refused(
    keyword: str, value: list[object], reason: str | None
) -> None:
    """Some CR readers and film digitisers sample rows and columns at different pitches:
    fed to the model and drawn in the heat map as stored, such an image is squashed."""
    ds = hand()
    setattr(ds, keyword, value)
    decided(ds, reason, "pixel_shape")


@pytest.mark.parametrize("value", [b"abc", b"0\\0", b"-1\\-2", b"0.1", b"1e309\\1", b"x\\y\\z"])
def test_a_pixel_spacing_that_says_nothing_of_the_shape_refuses_nothing(value: bytes) -> None:
    """A malformed spacing is not evidence of non-square pixels (nor does it raise)."""
    ds = hand()
    tag = Tag("PixelSpacing")
    ds[tag] = RawDataElement(tag, "DS", len(value), value, 0, False, True)
    assert gate.check(ds).accepted


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # wrong on purpose
@pytest.mark.parametrize(
    "body_part",
    ["L HAND", "HAND LT", "HAND_L", "RT HAND", "Right-Hand", "LEFT HAND", "HAND (R)", "hand rt"],
)
def test_a_body_part_with_its_side_written_in_is_a_hand(body_part: str) -> None:
    """The side belongs in Image Laterality; written into Body Part Examined as well, it
    refused real bone-age exams as "body part examined is L_HAND, not a hand"."""
    decision = gate.check(hand(body_part=body_part))
    assert decision.accepted, decision.reason


@pytest.mark.parametrize(
    ("body_part", "description", "reason"),
    [
        ("EXTREMITY", "XR BONE AGE", None),
        ("UPPER EXTREMITY", "XR BONE AGE", None),
        ("UPPER_EXTREMITY", "XR BONE AGE", None),
        ("ARM", "XR HAND LEFT", None),
        ("L EXTREMITY", "XR BONE AGE", None),
        (
            "EXTREMITY",
            "XR KNEE",
            "body part is not stated (BodyPartExamined is EXTREMITY, no hand in the descriptions)",
        ),
        (
            "UPPER EXTREMITY",
            "XR ELBOW",
            "body part is not stated (BodyPartExamined is UPPER_EXTREMITY, "
            "no hand in the descriptions)",
        ),
        ("UPPER ARM", "XR HAND", "body part examined is UPPER_ARM, not a hand"),
        ("FOREARM", "XR HAND", "body part examined is FOREARM, not a hand"),
    ],
)
def test_a_generic_body_part_is_not_stated(
    body_part: str, description: str, reason: str | None
) -> None:
    """EXTREMITY, UPPER EXTREMITY, ARM name a region the hand is part of, without saying it
    is the hand: as an empty value, the descriptions decide (a CR codes no region)."""
    ds = hand(modality="CR", body_part=body_part)
    ds.StudyDescription = description
    decided(ds, reason, "body_part")


@pytest.mark.parametrize(
    ("region", "description", "reason"),
    [
        (("66019005", "SCT", "Extremity"), "XR BONE AGE", None),
        (("T-D8000", "SRT", "Upper limb"), "XR HAND", None),
        (
            ("53120007", "SCT", "Upper limb"),
            "XR",
            "body part is not stated (no BodyPartExamined, Anatomic Region Sequence is "
            "Upper limb (SCT 53120007), no hand in the descriptions)",
        ),
    ],
)
def test_a_generic_coded_region_is_not_stated(
    region: tuple[str, str, str], description: str, reason: str | None
) -> None:
    ds = hand(body_part="EXTREMITY")
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = region
    ds.AnatomicRegionSequence = [item]
    del ds.BodyPartExamined
    ds.StudyDescription = description
    decided(ds, reason)


@pytest.mark.parametrize(
    ("body_part", "reason"),
    [
        (["HAND", "WRIST"], None),
        (["WRIST", "HAND"], None),
        (["HAND", "EXTREMITY"], None),
        (["HAND", "CHEST"], "body part examined is HAND\\CHEST, not a hand"),
        (["L HAND", "FOOT"], "body part examined is L_HAND\\FOOT, not a hand"),
    ],
)
def test_a_multi_valued_body_part_is_read_value_by_value(
    body_part: list[str], reason: str | None
) -> None:
    """A hand and its wrist is a hand; the reason shows the values as DICOM writes them
    (``HAND\\CHEST``), not as a Python list (``['HAND', 'CHEST']``)."""
    ds = hand()
    ds.BodyPartExamined = body_part
    decided(ds, reason)


@pytest.mark.parametrize(
    ("value", "may_be"),
    [
        ("HAND", True),
        ("L HAND", True),
        ("", True),
        (None, True),
        ("EXTREMITY", True),
        ("CHEST", False),
        (["HAND", "CHEST"], False),
    ],
)
def test_may_be_a_hand_reads_body_part_examined_as_the_gate_does(
    value: object, may_be: bool
) -> None:
    """What a backfill may use to choose the series to move."""
    assert gate.may_be_a_hand(value) is may_be


def view_code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@pytest.mark.parametrize(
    ("position", "reason"),
    [
        (
            "LL",
            "view is lateral (ViewPosition LL), not frontal; bone age is read on a PA or AP view",
        ),
        (
            "RL",
            "view is lateral (ViewPosition RL), not frontal; bone age is read on a PA or AP view",
        ),
        (
            "LLO",
            "view is oblique (ViewPosition LLO), not frontal; bone age is read on a PA or AP view",
        ),
        (
            "RLO",
            "view is oblique (ViewPosition RLO), not frontal; bone age is read on a PA or AP view",
        ),
        (
            "LAT",
            "view is lateral (ViewPosition LAT), not frontal; bone age is read on a PA or AP view",
        ),
        (
            "PA OBL",
            "view is oblique (ViewPosition PA OBL), not frontal; bone age is read on a PA or AP "
            "view",
        ),
        ("PA", None),
        ("AP", None),
        ("", None),  # Type 2 on a CR: nothing said, nothing refused
        ("HAND", None),  # a site's own word, saying no view
        ("LLD", None),  # decubitus: how the patient lay, not the projection
    ],
)
def test_a_lateral_or_oblique_view_position_is_refused(position: str, reason: str | None) -> None:
    """Bone age is read on one frontal (PA, or AP) hand; a hand trauma series (PA,
    lateral, oblique) got one bone age per view."""
    for modality in ("CR", "DX"):
        ds = hand(modality=modality)
        ds.ViewPosition = position
        if modality == "DX":
            del ds.ViewCodeSequence  # the View Position alone
        decision = gate.check(ds)
        assert decision.reason == reason, modality
        assert decision.accepted is (reason is None)
        if reason is not None:  # status and metrics count them apart
            assert reason_category(reason) == "view"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (
            ("399173006", "SCT", "left lateral"),
            "view is left lateral (ViewCodeSequence SCT 399173006), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("399067008", "SCT", "lateral"),
            "view is lateral (ViewCodeSequence SCT 399067008), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("399059000", "SCT", "postero-anterior oblique"),
            "view is postero-anterior oblique (ViewCodeSequence SCT 399059000), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("260427002", "SCT", "lateral oblique"),
            "view is lateral oblique (ViewCodeSequence SCT 260427002), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("R-10232", "SRT", "right lateral"),  # older modalities' SNOMED-RT
            "view is right lateral (ViewCodeSequence SRT R-10232), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("399110001", "SCT", "tangential"),  # the carpal tunnel view
            "view is tangential (ViewCodeSequence SCT 399110001), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (
            ("LAT1", "99LOCAL", "Hand lateral"),  # a local code whose meaning is a lateral
            "view is Hand lateral (ViewCodeSequence 99LOCAL LAT1), not frontal; "
            "bone age is read on a PA or AP view",
        ),
        (("272479007", "SCT", "postero-anterior"), None),
        (("399348003", "SCT", "antero-posterior"), None),
        (("R-10214", "SRT", "postero-anterior"), None),  # CID 4010 before SNOMED CT
        (("PA1", "99LOCAL", "Hand PA"), None),
    ],
)
def test_a_view_coded_as_not_frontal_is_refused(
    code: tuple[str, str, str], reason: str | None
) -> None:
    """The View Code Sequence codes the view (PS3.16 CID 4010 "DX View"): any of its
    views but frontal, PA and AP refuses the image, whatever View Position says."""
    ds = hand()
    ds.ViewCodeSequence = [view_code(*code)]
    ds.ViewPosition = "PA"  # either naming another view refuses the image
    decided(ds, reason)


def test_a_lateral_view_position_is_refused_whatever_the_code_says() -> None:
    ds = hand()
    ds.ViewPosition = "LL"
    ds.ViewCodeSequence = [view_code("272479007", "SCT", "postero-anterior")]
    assert gate.check(ds).reason == (
        "view is lateral (ViewPosition LL), not frontal; bone age is read on a PA or AP view"
    )


@pytest.mark.parametrize(
    ("keyword", "description", "position", "reason"),
    [
        (
            "SeriesDescription",
            "L HAND LAT",
            "",
            "view is lateral (named by SeriesDescription; no ViewPosition says which), "
            "not frontal; bone age is read on a PA or AP view",
        ),
        (
            "AcquisitionDeviceProcessingDescription",
            "Hand oblique",
            "",
            "view is oblique (named by AcquisitionDeviceProcessingDescription; no "
            "ViewPosition says which), not frontal; bone age is read on a PA or AP view",
        ),
        ("SeriesDescription", "L HAND LAT", "PA", None),  # the View Position says which
        ("SeriesDescription", "L HAND PA", "", None),
        ("StudyDescription", "XR HAND PA LAT OBL", "", None),  # the exam's every view
    ],
)
def test_a_view_named_only_by_the_series_description_is_refused_when_lateral(
    keyword: str, description: str, position: str, reason: str | None
) -> None:
    ds = hand(modality="CR")
    ds.ViewPosition = position
    setattr(ds, keyword, description)
    decision = decided(ds, reason)
    assert description not in (decision.reason or "")  # free text stays out of reasons


def test_a_view_coded_frontal_is_not_judged_by_the_series_description() -> None:
    """A DX coded postero-anterior, no View Position, in a series described "HAND PA
    LAT": the code says which view the image is; the description names the series'."""
    ds = hand(modality="DX")
    del ds.ViewPosition
    ds.ViewCodeSequence[0].CodeValue = "272479007"
    ds.ViewCodeSequence[0].CodeMeaning = "postero-anterior"
    ds.SeriesDescription = "HAND PA LAT"
    assert gate.check(ds).accepted
    del ds.ViewCodeSequence  # nothing else says: the description does
    assert gate.check(ds).reason == (
        "view is lateral (named by SeriesDescription; no ViewPosition says which), "
        "not frontal; bone age is read on a PA or AP view"
    )


WHOLE_HAND = "not a whole hand (bone age is read on the hand and wrist)"


@pytest.mark.parametrize(
    ("body_part", "reason"),
    [
        ("FINGER", f"body part examined is FINGER, {WHOLE_HAND}"),
        ("THUMB", f"body part examined is THUMB, {WHOLE_HAND}"),
        ("L FINGER", f"body part examined is L_FINGER, {WHOLE_HAND}"),
        (["HAND", "FINGER"], None),  # the hand, fingers included
    ],
)
def test_fingers_alone_are_refused(body_part: object, reason: str | None) -> None:
    ds = hand()
    ds.BodyPartExamined = body_part
    decided(ds, reason, "body_part")


@pytest.mark.parametrize(
    "region",
    [("7569003", "SCT", "Finger"), ("76505004", "SCT", "Thumb"), ("T-D8800", "SRT", "Finger")],
)
def test_a_finger_coded_as_the_region_is_refused(region: tuple[str, str, str]) -> None:
    ds = hand()
    del ds.BodyPartExamined
    ds.AnatomicRegionSequence = [view_code(*region)]
    value, scheme, meaning = region
    assert gate.check(ds).reason == (
        f"body part (Anatomic Region Sequence) is {meaning} ({scheme} {value}), {WHOLE_HAND}"
    )


@pytest.mark.parametrize(
    ("body_part", "image_laterality", "laterality", "reason"),
    [
        (
            "HAND",
            "B",
            None,
            "body part is both hands (ImageLaterality B); bone age is read on one hand",
        ),
        (
            "HANDS",
            "B",
            None,
            "body part is both hands (ImageLaterality B); bone age is read on one hand",
        ),
        (
            "HAND",
            "U",
            "B",
            "body part is both hands (Laterality B); bone age is read on one hand",
        ),
        (
            "HANDS",
            "U",
            None,
            "body part examined is HANDS, with no laterality L or R: taken as both hands; "
            "bone age is read on one hand",
        ),
        (
            "BOTH HANDS",
            None,
            None,
            "body part examined is BOTH_HANDS, with no laterality L or R: taken as both "
            "hands; bone age is read on one hand",
        ),
        ("HANDS", "L", None, None),  # each image of a two-hand exam, one hand
        ("HANDS", None, "R", None),
        ("HAND", "L", "B", None),  # the image's own laterality says which
        ("HAND", "U", None, None),  # one hand, which one unknown
    ],
)
def test_both_hands_on_one_image_are_refused(
    body_part: str, image_laterality: str | None, laterality: str | None, reason: str | None
) -> None:
    ds = hand(body_part=body_part)
    for keyword, value in (("ImageLaterality", image_laterality), ("Laterality", laterality)):
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    decided(ds, reason, "body_part")


def secondary_capture(conversion_type: str | None, *, modality: str = "OT") -> Dataset:
    """The phantom hand as a Secondary Capture: its body part HAND, the study "XR HAND
    FOR BONE AGE", as a form scanned into the study or another program's result has."""
    ds = hand()
    ds.SOPClassUID = uid.SecondaryCaptureImageStorage
    ds.Modality = modality
    if conversion_type is not None:
        ds.ConversionType = conversion_type
    return ds


SC = "SOP class Secondary Capture Image Storage"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # "df", wrong on purpose
@pytest.mark.parametrize(
    ("conversion_type", "modality", "reason"),
    [
        ("DF", "OT", None),  # a film digitised
        ("DI", "DX", None),  # taken from the modality's digital interface
        ("SI", "OT", None),  # a film on a scanner
        ("DV", "CR", None),  # a video frame of the modality's display
        ("df", "OT", None),
        ("SD", "OT", f"{SC}, conversion type SD (scanned document), is not a radiograph"),
        ("WSD", "DX", f"{SC}, conversion type WSD (workstation), is not a radiograph"),
        ("DRW", "OT", f"{SC}, conversion type DRW (drawing), is not a radiograph"),
        ("SYN", "OT", f"{SC}, conversion type SYN (synthetic image), is not a radiograph"),
        (
            "SCAN",
            "OT",
            f"{SC}, conversion type not one of PS3.3's (DF, DI, SI, DV, SD, WSD, DRW, SYN), "
            "is not known to be a radiograph",
        ),
        # absent (Type 1): the modality of the image captured decides
        (None, "DX", None),
        (None, "CR", None),
        (
            None,
            "OT",
            f"{SC} states no conversion type and no radiograph modality (CR, DX, RG): "
            "nothing says it is a radiograph",
        ),
        (
            "",
            "",
            f"{SC} states no conversion type and no radiograph modality (CR, DX, RG): "
            "nothing says it is a radiograph",
        ),
    ],
)
def test_a_secondary_capture_is_a_radiograph_only_by_its_conversion_type(
    conversion_type: str | None, modality: str, reason: str | None
) -> None:
    """A requisition form scanned (SD) into a study described "XR HAND BONE AGE", or
    another vendor's AI result (WSD), carried the study's hand and was assessed."""
    decision = gate.check(secondary_capture(conversion_type, modality=modality))
    assert decision.reason == reason
    assert decision.accepted is (reason is None)
    if reason is not None:
        assert reason_category(reason) == "sop_class"


@pytest.mark.parametrize(
    ("conversion_type", "modality", "named"),
    [
        ("DV", "US", "ultrasound"),  # a frame grabbed from the scanner's video output
        ("SI", "XC", "external-camera photography"),  # a photograph put on a scanner
        ("DI", "ES", "endoscopy"),
        ("DI", "GM", "general microscopy"),
        ("DI", "SM", "slide microscopy"),
        ("DV", "XA", "X-ray angiography"),
        ("DV", "RF", "radio fluoroscopy"),
        ("DI", "MR", "magnetic resonance"),
        ("DF", "CT", "computed tomography"),
        ("DI", "ZZ", None),  # not a defined term: nothing says it is a radiograph
    ],
)
def test_a_capture_of_another_modality_is_not_taken_for_a_radiograph(
    conversion_type: str, modality: str, named: str | None
) -> None:
    """A Conversion Type that may be a radiograph's (DF, DI, SI, DV) returned "may be a
    radiograph" before the Modality was read: an ultrasound frame or a photograph in a
    hand study was assessed as a radiograph (found in review)."""
    shown = f"{modality} ({named})" if named else modality
    decided(
        secondary_capture(conversion_type, modality=modality),
        f"{SC}, conversion type {conversion_type}, modality {shown}, is not a radiograph's "
        "capture (its modality would be CR, DX, RG, OT or empty)",
        "sop_class",
    )


@pytest.mark.parametrize("modality", ["CR", "DX", "RG", "OT", ""])
@pytest.mark.parametrize("conversion_type", ["DF", "DI", "SI", "DV"])
def test_a_capture_of_a_radiograph_other_or_no_modality_is_still_assessed(
    conversion_type: str, modality: str
) -> None:
    decided(secondary_capture(conversion_type, modality=modality), None)


def test_a_multi_frame_secondary_capture_is_judged_by_its_conversion_type_too() -> None:
    ds = secondary_capture("SD")
    ds.SOPClassUID = uid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    assert gate.check(ds).reason == (
        "SOP class Multi-frame Grayscale Word Secondary Capture Image Storage, conversion "
        "type SD (scanned document), is not a radiograph"
    )


@pytest.mark.parametrize(
    ("conversion", "reason"),
    [
        ("DF", None),
        ("SI", None),
        ("DI", None),
        (
            "SD",
            "SOP class Secondary Capture Image Storage, conversion type SD (scanned "
            "document), is not a radiograph",
        ),
        (
            "WSD",
            "SOP class Secondary Capture Image Storage, conversion type WSD (workstation), "
            "is not a radiograph",
        ),
    ],
)
def test_a_secondary_capture_without_a_body_part_is_judged_by_the_studys_description(
    conversion: str, reason: str | None
) -> None:
    """A film digitised into "XR HAND BONE AGE", its series described by nothing (as a
    digitiser leaves it), is a hand (found in review: judged by its series' descriptions
    alone, it was refused); a form scanned into that study is no radiograph, which its
    Conversion Type says."""
    ds = secondary_capture(conversion)
    del ds.BodyPartExamined
    del ds.AnatomicRegionSequence
    ds.StudyDescription = "XR HAND BONE AGE"
    ds.RequestedProcedureDescription = "XR HAND BONE AGE"
    ds.pop("SeriesDescription", None)
    decided(ds, reason)


#: A patient's name, typed into a field that holds a code string.
TYPED = "DOE^JANE"


def _typed_in(keyword: str, value: str) -> Dataset:
    ds = secondary_capture("DV") if keyword == "Modality" else hand()
    if keyword == "BodyPartExamined":
        for side in ("ImageLaterality", "Laterality"):  # HANDS taken as both
            if side in ds:
                delattr(ds, side)
        del ds.AnatomicRegionSequence  # the descriptions decide an unstated part
        ds.StudyDescription = ds.SeriesDescription = "XR CHEST"
    setattr(ds, keyword, value)
    return ds


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # wrong on purpose
@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.parametrize(
    ("keyword", "value", "reason", "category"),
    [
        ("PatientSex", TYPED, "patient sex is neither M nor F; the model needs M or F", "sex"),
        ("PatientSex", "X" * 17, "patient sex is neither M nor F; the model needs M or F", "sex"),
        ("PatientSex", "U", "patient sex is U; the model needs M or F", "sex"),
        ("BodyPartExamined", TYPED, "body part is not a hand", "body_part"),
        ("BodyPartExamined", "A" * 17, "body part is not a hand", "body_part"),
        (
            "BodyPartExamined",
            "RIGHT^THUMB",
            f"body part examined is a finger or thumb, {WHOLE_HAND}",
            "body_part",
        ),
        (
            "BodyPartExamined",
            "LEFT AND RIGHT HANDS",  # 20 characters
            "body part examined names both hands, with no laterality L or R: taken as both "
            "hands; bone age is read on one hand",
            "body_part",
        ),
        (
            "BodyPartExamined",
            "UPPER^EXTREMITY",
            "body part is not stated (BodyPartExamined names no part, no hand in the descriptions)",
            "body_part",
        ),
        (
            "ViewPosition",
            "LATERAL^DOE",
            "view is lateral (by its ViewPosition), not frontal; bone age is read on a PA or "
            "AP view",
            "view",
        ),
        (
            "Modality",
            "US^DOE",
            f"{SC}, conversion type DV, another modality, is not a radiograph's capture (its "
            "modality would be CR, DX, RG, OT or empty)",
            "sop_class",
        ),
    ],
)
def test_a_reason_quotes_only_a_value_written_as_a_code_string(
    keyword: str, value: str, reason: str, category: str
) -> None:
    """A reason reaches the database, `status` and the not-assessed SR sent to the PACS:
    it quotes a value only as a code string may be written (16 characters at most of
    A-Z, 0-9, space and underscore). Found in review: "patient sex is LEAKSEXVAL" quoted
    whatever the field held, a patient's name as well."""
    decided(_typed_in(keyword, value), reason, category)
