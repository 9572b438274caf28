"""Bone-age Comprehensive SR: content, round trip, dciodvfy and dsrdump."""

from __future__ import annotations

import datetime
import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict

import pytest
from highdicom.sr import ComprehensiveSR
from pydicom import Dataset, dcmread
from pydicom.tag import Tag
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io import codes
from dicom_io import sr as sr_module
from dicom_io.content import AI_RESULT_NOTICE, UNTRAINED_WARNING, BoneAgeFinding
from dicom_io.sr import build_bone_age_sr, build_not_assessed_sr, earlier_report
from tests.dicomtools import dciodvfy_errors, dsrdump

from .conftest import MODEL_ID


class _Uids(TypedDict):
    """The UIDs both builders take as keyword arguments."""

    series_instance_uid: str
    sop_instance_uid: str
    device_observer_uid: str


def _uids() -> _Uids:
    return {
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
        "device_observer_uid": generate_uid(),
    }


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue()))


def _items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _nums(ds: Dataset) -> dict[tuple[str, str], tuple[float, str]]:
    """(code value, scheme) -> (value, unit code) of every NUM item."""
    found = {}
    for item in _items(ds):
        if item.ValueType == "NUM":
            name = item.ConceptNameCodeSequence[0]
            measured = item.MeasuredValueSequence[0]
            found[(name.CodeValue, name.CodingSchemeDesignator)] = (
                float(measured.NumericValue),
                measured.MeasurementUnitsCodeSequence[0].CodeValue,
            )
    return found


def _texts(ds: Dataset, meaning: str) -> list[str]:
    return [
        item.TextValue
        for item in _items(ds)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _key(code: object) -> tuple[str, str]:
    return (code.value, code.scheme_designator)  # type: ignore[attr-defined]


def test_sr_round_trip_holds_every_measurement(source: Dataset, finding: BoneAgeFinding) -> None:
    uids = _uids()
    sr = _round_trip(build_bone_age_sr(source, finding, series_number=901, **uids))

    assert sr.SOPClassUID == ComprehensiveSRStorage
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID == uids["series_instance_uid"] != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == uids["sop_instance_uid"]
    assert sr.PatientID == source.PatientID
    assert sr.SeriesNumber == 901
    assert sr.InstanceNumber == 1
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert "AI" in sr.SeriesDescription
    assert UNTRAINED_WARNING not in sr.SeriesDescription
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    nums = _nums(sr)
    assert nums[_key(codes.BONE_AGE)] == (pytest.approx(124.3), "mo")
    assert nums[_key(codes.CHRONOLOGICAL_AGE)] == (pytest.approx(123.0), "mo")
    assert nums[_key(codes.BONE_AGE_MINUS_CHRONOLOGICAL_AGE)] == (pytest.approx(1.3), "mo")
    assert nums[_key(codes.SDS)] == (pytest.approx(0.14), "{SDS}")
    for level, (low, high) in finding.intervals.items():
        assert nums[_key(codes.prediction_interval_bound(level, "lower"))][0] == pytest.approx(low)
        assert nums[_key(codes.prediction_interval_bound(level, "upper"))][0] == pytest.approx(high)
    assert _texts(sr, "Population Description") == [finding.sds_reference]
    assert _texts(sr, "Algorithm Name") == [finding.model_name]
    assert _texts(sr, "Algorithm Version") == [finding.model_version]
    assert f"model SHA-256: {MODEL_ID}" in _texts(sr, "Algorithm Parameters")
    assert "precision: float32" in _texts(sr, "Algorithm Parameters")
    assert AI_RESULT_NOTICE in _texts(sr, "Comment")

    uidrefs = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.UID
        for item in _items(sr)
        if item.ValueType == "UIDREF"
    }
    assert uidrefs["Device Observer UID"] == uids["device_observer_uid"]
    (image,) = [item for item in _items(sr) if item.ValueType == "IMAGE"]
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    sites = [item for item in _items(sr) if item.ValueType == "CODE"]
    site_codes = {item.ConceptCodeSequence[0].CodeValue for item in sites}
    assert {codes.HAND.value, codes.LEFT.value} <= site_codes
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID


def test_untrained_sr_says_so(source: Dataset, untrained_finding: BoneAgeFinding) -> None:
    sr = _round_trip(build_bone_age_sr(source, untrained_finding, series_number=5, **_uids()))
    assert UNTRAINED_WARNING in sr.SeriesDescription
    assert UNTRAINED_WARNING in _texts(sr, "Comment")
    nums = _nums(sr)
    assert _key(codes.CHRONOLOGICAL_AGE) not in nums
    assert _key(codes.SDS) not in nums
    assert _key(codes.BONE_AGE) in nums


def test_laterality_falls_back_to_source(
    source: Dataset, untrained_finding: BoneAgeFinding
) -> None:
    source.ImageLaterality = "R"
    sr = build_bone_age_sr(source, untrained_finding, series_number=5, **_uids())
    laterality = [
        item.ConceptCodeSequence[0].CodeValue
        for item in _items(sr)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Laterality"
    ]
    assert laterality == [codes.RIGHT.value]


def test_rebuild_is_identical(source: Dataset, finding: BoneAgeFinding) -> None:
    uids = _uids()
    first = build_bone_age_sr(source, finding, series_number=9, **uids)
    second = build_bone_age_sr(source, finding, series_number=9, **uids)
    assert first.ContentSequence == second.ContentSequence


def test_sr_passes_dciodvfy_and_dsrdump_shows_values(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    path = tmp_path / "sr.dcm"
    sr = build_bone_age_sr(
        source, finding, series_number=901, institution_name="Phantom Hospital", **_uids()
    )
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Bone age")="124.3" (mo,UCUM' in dump
    assert '"Z-Score of measurement")="0.14"' in dump
    assert "Greulich-Pyle atlas (Brush Foundation)" in dump
    assert "UNVERIFIED" in dump


def test_untrained_sr_passes_dciodvfy(
    tmp_path: Path, source: Dataset, untrained_finding: BoneAgeFinding
) -> None:
    path = tmp_path / "sr.dcm"
    build_bone_age_sr(source, untrained_finding, series_number=2, **_uids()).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []
    assert UNTRAINED_WARNING in dsrdump(path)


def test_not_assessed_sr(tmp_path: Path, source: Dataset) -> None:
    path = tmp_path / "na.dcm"
    sr = build_not_assessed_sr(
        source, "Body Part Examined is CHEST, not HAND", series_number=3, **_uids()
    )
    sr.save_as(path, enforce_file_format=True)
    back = dcmread(path)
    assert _nums(back) == {}
    assert _texts(back, "Comment") == ["Not assessed: Body Part Examined is CHEST, not HAND"]
    assert "not assessed" in back.SeriesDescription
    assert dciodvfy_errors(path) == []
    dump = dsrdump(path)
    assert '"Bone age")=(373121007,SCT,"Not Evaluated")' in dump


def test_the_issuers_and_study_description_are_copied_where_the_source_has_them(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding
) -> None:
    for keyword in sr_module.PATIENT_AND_STUDY_IF_PRESENT:
        if keyword in source:
            delattr(source, keyword)
    plain = _round_trip(build_bone_age_sr(source, finding, series_number=3, **_uids()))
    for keyword in sr_module.PATIENT_AND_STUDY_IF_PRESENT:
        assert keyword not in plain  # Type 3: not written empty

    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    source.IssuerOfAccessionNumberSequence = [issuer]
    source.IssuerOfPatientID = "HOSPITAL-A"
    source.StudyDescription = "XR HAND BONE AGE"
    path = tmp_path / "na.dcm"
    build_not_assessed_sr(source, "no sex", series_number=3, **_uids()).save_as(
        path, enforce_file_format=True
    )
    issuer.LocalNamespaceEntityID = "changed in the source after the SR was built"
    back = dcmread(path)
    assert back.IssuerOfPatientID == "HOSPITAL-A"
    assert back.StudyDescription == "XR HAND BONE AGE"
    assert back.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID == "RIS-A"
    assert dciodvfy_errors(path) == []


def _when(ds: Dataset, date: str, clock: str) -> datetime.datetime:
    """``ds``'s date and time as the moment they mean, in its Timezone Offset From UTC."""
    return datetime.datetime.strptime(
        f"{ds[date].value}{ds[clock].value}{ds.TimezoneOffsetFromUTC}", "%Y%m%d%H%M%S.%f%z"
    )


@pytest.mark.parametrize("offset", ["+0930", "-0500", "+0000"])
def test_times_are_written_in_the_time_zone_the_source_states(
    tmp_path: Path, source: Dataset, finding: BoneAgeFinding, offset: str
) -> None:
    """A source that states its time zone: the SR's creation and content times are the
    moment it was made, in that zone, and say so."""
    source.TimezoneOffsetFromUTC = offset
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    sr = build_bone_age_sr(source, finding, series_number=3, **_uids())
    after = datetime.datetime.now(datetime.UTC)
    assert sr.TimezoneOffsetFromUTC == offset
    for date, clock in (
        ("ContentDate", "ContentTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
    ):
        assert before <= _when(sr, date, clock) <= after
    [equipment] = sr.ContributingEquipmentSequence
    assert equipment.ContributionDateTime == f"{sr.ContentDate}{sr.ContentTime}"
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize("offset", [None, "", "UTC", "+2500", "+0160", "0100"])
def test_no_time_zone_is_claimed_where_the_source_states_none_that_can_be(
    source: Dataset, finding: BoneAgeFinding, offset: str | None
) -> None:
    """The node's local time, as before, and no offset: one would claim a zone for the
    study date and time copied from the source."""
    if offset is not None:
        source.TimezoneOffsetFromUTC = offset
    assert sr_module.stated_time_zone(source) is None
    before = datetime.datetime.now().replace(microsecond=0)
    sr = build_not_assessed_sr(source, "no sex", series_number=3, **_uids())
    assert "TimezoneOffsetFromUTC" not in sr
    written = datetime.datetime.strptime(f"{sr.ContentDate}{sr.ContentTime}", "%Y%m%d%H%M%S.%f")
    assert before <= written <= datetime.datetime.now()


@pytest.mark.parametrize(
    ("setting", "unknown", "shown"),
    [
        ("Asia/Kolkata", None, "UTC+05:30 (IST)"),
        (":Asia/Kolkata", None, "UTC+05:30 (IST)"),
        ("IST-5:30", None, "UTC+05:30 (IST)"),  # a rule: no file needed
        ("Asia/Kolkatta", "Asia/Kolkatta", "UTC+00:00 (TZ Asia/Kolkatta is unknown here)"),
        ("/no/such/zone", "/no/such/zone", "UTC+00:00 (TZ /no/such/zone is unknown here)"),
    ],
)
def test_the_local_time_zone_says_when_tz_names_none_known_here(
    monkeypatch: pytest.MonkeyPatch, setting: str, unknown: str | None, shown: str
) -> None:
    """A misspelt TZ leaves the C library in UTC without a word: the zone the worker
    reports (`status`) says so."""
    monkeypatch.setenv("TZ", setting)
    time.tzset()
    try:
        assert sr_module.unknown_time_zone() == unknown
        assert sr_module.local_time_zone() == shown
    finally:
        monkeypatch.undo()
        time.tzset()


def test_not_assessed_sr_without_pixels(source: Dataset) -> None:
    del source.PixelData
    sr = build_not_assessed_sr(source, "no pixel data", series_number=3, **_uids())
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def test_source_without_type2_attributes_is_tolerated(
    source: Dataset, finding: BoneAgeFinding
) -> None:
    for keyword in ("PatientName", "PatientBirthDate", "AccessionNumber", "StudyID"):
        delattr(source, keyword)
    sr = _round_trip(build_bone_age_sr(source, finding, series_number=1, **_uids()))
    assert sr.PatientName == ""


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"series_instance_uid": "not a uid"}, ValueError, "series_instance_uid"),
        ({"sop_instance_uid": 12}, TypeError, "sop_instance_uid"),
        ({"device_observer_uid": "1..2"}, ValueError, "device_observer_uid"),
        ({"series_number": 0}, ValueError, "series_number"),
        ({"instance_number": 1.0}, TypeError, "instance_number"),
    ],
)
def test_sr_rejects_bad_arguments(
    source: Dataset,
    finding: BoneAgeFinding,
    change: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    arguments: dict[str, object] = {"series_number": 1, **_uids(), **change}
    with pytest.raises(error, match=match):
        build_bone_age_sr(source, finding, **arguments)  # type: ignore[arg-type]


def test_sr_rejects_source_without_uid(source: Dataset, finding: BoneAgeFinding) -> None:
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_bone_age_sr(source, finding, series_number=1, **_uids())


def test_sr_rejects_wrong_finding_type(source: Dataset) -> None:
    with pytest.raises(TypeError, match="finding"):
        build_bone_age_sr(source, {"bone_age_months": 3}, series_number=1, **_uids())  # type: ignore[arg-type]


def test_not_assessed_rejects_empty_reason(source: Dataset) -> None:
    with pytest.raises(ValueError, match="reason"):
        build_not_assessed_sr(source, "  ", series_number=1, **_uids())


def _highdicom_document(
    evidence: Dataset,
    content: Dataset,
    *,
    series_instance_uid: str,
    series_number: int,
    sop_instance_uid: str,
    instance_number: int,
    institution_name: str | None = None,
    predecessors: Sequence[Dataset] = (),
    **kwargs: Any,
) -> Dataset:
    """The same document made by highdicom's generic ComprehensiveSR constructor."""
    return ComprehensiveSR(
        evidence=[evidence],
        previous_versions=list(predecessors) or None,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        is_complete=True,
        is_final=False,
        is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        institution_name=institution_name,
        **kwargs,
    )


def _comparable(ds: Dataset) -> tuple[dict[str, object], dict[str, object]]:
    """Every attribute and the file meta, less the moment of creation."""
    data = ds.to_json_dict()
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        data.pop(f"{Tag(keyword):08X}")
    for equipment in data[f"{Tag('ContributingEquipmentSequence'):08X}"]["Value"]:
        equipment.pop(f"{Tag('ContributionDateTime'):08X}")
    return data, ds.file_meta.to_json_dict()


@pytest.mark.parametrize("replaces", [0, 1, 3], ids=["first", "replaces one", "replaces 3"])
@pytest.mark.parametrize("kind", ["trained", "untrained", "not assessed"])
def test_sr_document_equals_highdicoms_comprehensive_sr(
    monkeypatch: pytest.MonkeyPatch,
    source: Dataset,
    finding: BoneAgeFinding,
    untrained_finding: BoneAgeFinding,
    kind: str,
    replaces: int,
) -> None:
    """The lean document class writes exactly what highdicom's constructor writes,
    the reports it replaces included (highdicom's ``previous_versions``: two series of
    one study, in the order given)."""
    uids = _uids()
    series = [generate_uid(), generate_uid()]
    predecessors = [
        earlier_report(source.StudyInstanceUID, series[n % 2], generate_uid())
        for n in range(replaces)
    ]

    def build() -> Dataset:
        if kind == "not assessed":
            return build_not_assessed_sr(
                source, "no hand", series_number=3, predecessors=predecessors, **uids
            )
        chosen = finding if kind == "trained" else untrained_finding
        return build_bone_age_sr(
            source,
            chosen,
            series_number=901,
            institution_name="Phantom Hospital",
            predecessors=predecessors,
            **uids,
        )

    ours = build()
    with monkeypatch.context() as patch:
        patch.setattr(sr_module, "MeasurementReportSR", _highdicom_document)
        reference = build()
    assert isinstance(ours, sr_module.MeasurementReportSR)
    assert isinstance(reference, ComprehensiveSR)
    assert _comparable(ours) == _comparable(reference)
    assert _round_trip(ours).ContentSequence == _round_trip(reference).ContentSequence
    assert ("PredecessorDocumentsSequence" in ours) == bool(replaces)
