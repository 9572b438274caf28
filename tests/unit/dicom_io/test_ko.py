"""IOCM rejection notes: built, validated by dciodvfy and dsrdump, and read back, as we
write them and as a PACS writes them."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    EncapsulatedPDFStorage,
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
    TwelveLeadECGWaveformStorage,
    generate_uid,
)

from dicom_io.ko import (
    MAX_DESCRIPTION_LENGTH,
    REJECTION_TITLES,
    Reference,
    RejectionNote,
    build_rejection_note,
    is_key_object_selection,
    read_rejection_note,
)
from dicom_io.sr import MANUFACTURER, software_version
from tests.dicomtools import dciodvfy_errors, run_tool

DESCRIPTION = "Bone age withdrawn: its source image was rejected"
JAPANESE_NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


class _Uids(TypedDict):
    """The UIDs and number build_rejection_note takes as keyword arguments."""

    series_instance_uid: str
    sop_instance_uid: str
    series_number: int


def _uids() -> _Uids:
    return {
        "series_instance_uid": generate_uid(),
        "sop_instance_uid": generate_uid(),
        "series_number": 990,
    }


def _ours(study_instance_uid: str) -> list[Reference]:
    """An SR and an SC of ours in ``study_instance_uid``, each in a series of its own."""
    return [
        Reference(study_instance_uid, generate_uid(), ComprehensiveSRStorage, generate_uid()),
        Reference(study_instance_uid, generate_uid(), SecondaryCaptureImageStorage, generate_uid()),
    ]


def _written(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return dcmread(path)


def _dsrdump(path: Path) -> str:
    """dsrdump with the codes and the referenced SOP Instance UIDs printed."""
    return run_tool("dsrdump", "+Pl", "+Pu", "+Pc", path).stdout


# -- built notes ------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(REJECTION_TITLES))
def test_a_note_of_each_title_is_valid_and_dsrdump_shows_its_title_and_references(
    tmp_path: Path, source: Dataset, code: str
) -> None:
    sr, sc = _ours(source.StudyInstanceUID)
    path = tmp_path / "ko.dcm"
    build_rejection_note(source, code, [sr, sc], description=DESCRIPTION, **_uids()).save_as(
        path, enforce_file_format=True
    )
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert f'<CONTAINER:({code},DCM,"{REJECTION_TITLES[code]}")=SEPARATE>' in dump
    assert f'<contains TEXT:(113012,DCM,"Key Object Description")="{DESCRIPTION}">' in dump
    assert f'<contains COMPOSITE:=(ComprehensiveSRStorage,"{sr.sop_instance_uid}")>' in dump
    assert f'<contains IMAGE:=(SC image,"{sc.sop_instance_uid}")>' in dump


def test_a_note_reads_back_from_its_file_as_built(tmp_path: Path, source: Dataset) -> None:
    references = _ours(source.StudyInstanceUID)
    uids = _uids()
    note = _written(
        build_rejection_note(source, "113037", references, description=DESCRIPTION, **uids),
        tmp_path / "ko.dcm",
    )

    assert read_rejection_note(note) == RejectionNote(
        code="113037",
        meaning="Rejected for Patient Safety Reasons",
        sop_instance_uid=uids["sop_instance_uid"],
        references=tuple(references),
    )
    assert is_key_object_selection(note)
    assert note.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert note.file_meta.MediaStorageSOPClassUID == KeyObjectSelectionDocumentStorage
    assert note.Modality == "KO"
    assert note.SeriesInstanceUID == uids["series_instance_uid"]
    assert note.SeriesNumber == 990
    assert note.InstanceNumber == 1
    assert note.ReferencedPerformedProcedureStepSequence == []
    assert note.Manufacturer == MANUFACTURER
    assert note.ManufacturerModelName == "boneage-worker"
    assert note.SoftwareVersions == software_version()
    assert "ReferencedRequestSequence" not in note
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        assert note[keyword].value == source[keyword].value
    template = note.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "2010")
    (study,) = note.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID == note.StudyInstanceUID
    assert [
        [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in s.ReferencedSOPSequence]
        for s in study.ReferencedSeriesSequence
    ] == [[(r.sop_class_uid, r.sop_instance_uid)] for r in references]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # wrong on purpose
def test_a_note_is_built_for_a_study_whose_uid_has_a_leading_zero(
    tmp_path: Path, source: Dataset
) -> None:
    """Some modalities write such study UIDs (a component "0604...", against PS3.5
    9.1), the gate takes them and our SR and SC copy them: the note that withdraws
    those must be made all the same, or the bone age stays standing at the PACS."""
    study = "1.2.840.113619.2.55.3.0604688119.971.1"
    references = _ours(study)
    note = _written(
        build_rejection_note(source, "113001", references, description=DESCRIPTION, **_uids()),
        tmp_path / "ko.dcm",
    )
    assert note.StudyInstanceUID == study
    read = read_rejection_note(note)
    assert read is not None
    assert read.references == tuple(references)


def test_a_note_joins_the_study_of_what_it_rejects_not_the_sources(
    tmp_path: Path, source: Dataset
) -> None:
    """Our objects may sit in a study other than the source copy's (the image was moved
    after they were sent): the note goes where they are, with the patient's values."""
    elsewhere = generate_uid()
    references = _ours(elsewhere)
    path = tmp_path / "ko.dcm"
    note = _written(
        build_rejection_note(source, "113038", references, description=DESCRIPTION, **_uids()),
        path,
    )
    assert note.StudyInstanceUID == elsewhere != source.StudyInstanceUID
    assert note.CurrentRequestedProcedureEvidenceSequence[0].StudyInstanceUID == elsewhere
    assert note.PatientID == source.PatientID
    assert dciodvfy_errors(path) == []


def test_the_series_of_one_study_are_listed_together_and_an_instance_once(
    source: Dataset,
) -> None:
    series = generate_uid()
    first, second = (
        Reference(source.StudyInstanceUID, series, ComprehensiveSRStorage, generate_uid())
        for _ in range(2)
    )
    sc = _ours(source.StudyInstanceUID)[1]
    note = build_rejection_note(
        source, "113001", [first, sc, second, first], description=DESCRIPTION, **_uids()
    )
    assert read_rejection_note(note) == RejectionNote(
        code="113001",
        meaning="Rejected for Quality Reasons",
        sop_instance_uid=note.SOPInstanceUID,
        references=(first, second, sc),  # the evidence's order: series by series
    )
    (study,) = note.CurrentRequestedProcedureEvidenceSequence
    assert [len(s.ReferencedSOPSequence) for s in study.ReferencedSeriesSequence] == [2, 1]
    assert len(note.ContentSequence) == 1 + 3  # the description and one item each


@pytest.mark.parametrize(
    ("sop_class_uid", "value_type"),
    [
        (SecondaryCaptureImageStorage, "IMAGE"),
        (DigitalXRayImageStorageForPresentation, "IMAGE"),
        (ComprehensiveSRStorage, "COMPOSITE"),
        (EncapsulatedPDFStorage, "COMPOSITE"),
        (TwelveLeadECGWaveformStorage, "WAVEFORM"),
        ("1.2.826.0.1.3680043.9.999.1", "COMPOSITE"),  # a private class pydicom knows not
    ],
)
def test_each_instance_is_referenced_by_the_content_item_its_class_takes(
    source: Dataset, sop_class_uid: str, value_type: str
) -> None:
    reference = Reference(source.StudyInstanceUID, generate_uid(), sop_class_uid, generate_uid())
    note = build_rejection_note(source, "113001", [reference], description=DESCRIPTION, **_uids())
    description, item = note.ContentSequence
    assert (description.ValueType, description.RelationshipType) == ("TEXT", "CONTAINS")
    assert (item.ValueType, item.RelationshipType) == (value_type, "CONTAINS")
    assert "ConceptNameCodeSequence" not in item  # TID 2010: no purpose of reference
    assert item.ReferencedSOPSequence[0].ReferencedSOPClassUID == sop_class_uid
    assert item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == reference.sop_instance_uid


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # wrong on purpose
def test_patient_values_a_modality_got_wrong_are_copied_as_they_came(
    tmp_path: Path, source: Dataset
) -> None:
    """As for the SR and SC: the PACS files the note by the values it has, and dciodvfy
    finds nothing wrong but those values."""
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    source.PatientName = JAPANESE_NAME
    source.PatientBirthDate = "2015"
    source.PatientSex = "f"
    path = tmp_path / "ko.dcm"
    note = _written(
        build_rejection_note(
            source, "113001", _ours(source.StudyInstanceUID), description=DESCRIPTION, **_uids()
        ),
        path,
    )
    assert note.SpecificCharacterSet == ["", "ISO 2022 IR 87"]
    assert str(note.PatientName) == JAPANESE_NAME
    assert note.PatientBirthDate == "2015"
    assert note.PatientSex == "f"
    assert read_rejection_note(note) is not None
    errors = dciodvfy_errors(path)
    about_them = ("<PatientBirthDate>", "<PatientSex>", "<2015>", "<f>")
    for error in errors:
        assert any(mark in error for mark in about_them) or error == (
            "Error - Dicom dataset contains invalid data values for Value Representations"
        ), error


def _moment(ds: Dataset, date: str, clock: str) -> datetime.datetime:
    return datetime.datetime.strptime(
        f"{ds[date].value}{ds[clock].value}{ds.TimezoneOffsetFromUTC}", "%Y%m%d%H%M%S.%f%z"
    )


def test_the_note_is_dated_in_the_time_zone_the_source_states(source: Dataset) -> None:
    source.TimezoneOffsetFromUTC = "+0930"
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    note = build_rejection_note(
        source, "113001", _ours(source.StudyInstanceUID), description=DESCRIPTION, **_uids()
    )
    after = datetime.datetime.now(datetime.UTC)
    assert note.TimezoneOffsetFromUTC == "+0930"
    for date, clock in (
        ("ContentDate", "ContentTime"),
        ("InstanceCreationDate", "InstanceCreationTime"),
    ):
        assert before <= _moment(note, date, clock) <= after


def _request(study_instance_uid: str, accession_number: str) -> Dataset:
    request = Dataset()
    request.StudyInstanceUID = study_instance_uid
    request.ReferencedStudySequence = []
    request.AccessionNumber = accession_number
    request.PlacerOrderNumberImagingServiceRequest = ""
    request.FillerOrderNumberImagingServiceRequest = ""
    request.RequestedProcedureID = "RP1"
    request.RequestedProcedureDescription = "XR HAND BONE AGE"
    request.RequestedProcedureCodeSequence = []
    return request


def test_the_sources_requests_of_the_notes_study_are_referenced(
    tmp_path: Path, source: Dataset
) -> None:
    """Referenced Request Sequence (1C): a source that names requests (a PACS's own
    note, an SR) gives the note those of its study; a request of another study is not
    the one the rejected instances answer."""
    source.ReferencedRequestSequence = [
        _request(generate_uid(), "OTHER"),
        _request(source.StudyInstanceUID, "ACC1"),
    ]
    path = tmp_path / "ko.dcm"
    note = _written(
        build_rejection_note(
            source, "113001", _ours(source.StudyInstanceUID), description=DESCRIPTION, **_uids()
        ),
        path,
    )
    assert [item.AccessionNumber for item in note.ReferencedRequestSequence] == ["ACC1"]
    assert dciodvfy_errors(path) == []


def test_a_description_of_the_longest_length_is_written_whole(source: Dataset) -> None:
    text = "x" * MAX_DESCRIPTION_LENGTH
    note = build_rejection_note(
        source, "113039", _ours(source.StudyInstanceUID), description=text, **_uids()
    )
    assert note.ContentSequence[0].TextValue == text


def _two_studies() -> list[Reference]:
    return [_ours(generate_uid())[0], _ours(generate_uid())[1]]


def _one_instance_in_two_series() -> list[Reference]:
    reference = _ours(generate_uid())[0]
    elsewhere = Reference(
        reference.study_instance_uid,
        generate_uid(),
        reference.sop_class_uid,
        reference.sop_instance_uid,
    )
    return [reference, elsewhere]


_BAD_UID = "1.2.840.99999.abc"


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"code": "113000"}, ValueError, '"code" must be one of 113001'),
        ({"code": 113001}, TypeError, '"code" must be a string'),
        ({"references": []}, ValueError, '"references" is empty'),
        ({"references": _two_studies()}, ValueError, "spans 2 studies"),
        ({"references": _one_instance_in_two_series()}, ValueError, "item 1 is an instance"),
        ({"references": ["1.2.3"]}, TypeError, "item 0 must be a Reference"),
        ({"references": "1.2.3"}, TypeError, '"references" must be a sequence'),
        (
            {"references": [Reference("1.2.3", "1.2.4", "1.2.5", _BAD_UID)]},
            ValueError,
            "item 0 has no valid sop_instance_uid",
        ),
        ({"description": "  "}, ValueError, '"description" must not be empty'),
        ({"description": "x" * 1025}, ValueError, "1025 characters; at most 1024"),
        ({"manufacturer_model_name": "m" * 65}, ValueError, "manufacturer_model_name"),
        ({"series_instance_uid": "1..2"}, ValueError, "series_instance_uid"),
        ({"sop_instance_uid": 12}, TypeError, "sop_instance_uid"),
        ({"series_number": 0}, ValueError, "series_number"),
        ({"instance_number": 1.0}, TypeError, "instance_number"),
        ({"source": {"PatientID": "x"}}, TypeError, '"source" must be a pydicom Dataset'),
    ],
)
def test_the_builder_refuses_what_would_not_make_a_valid_note(
    source: Dataset, change: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments: dict[str, object] = {
        "source": source,
        "code": "113001",
        "references": _ours(source.StudyInstanceUID),
        "description": DESCRIPTION,
        **_uids(),
        **change,
    }
    with pytest.raises(error, match=match) as raised:
        build_rejection_note(**arguments)  # type: ignore[arg-type]
    assert _BAD_UID not in str(raised.value)


# -- notes received ---------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _pacs_note(references: Sequence[Reference], title: Dataset, *, content: bool = True) -> Dataset:
    """A rejection note as dcm4chee-arc writes one (its mkKOS): the study's patient and
    study attributes, the title as configured, the evidence with the retrieve AE title,
    and one IMAGE or COMPOSITE item per instance with no concept name and no Key Object
    Description."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = KeyObjectSelectionDocumentStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "Müller^Jürgen"
    ds.PatientID = "PAT-42"
    ds.StudyInstanceUID = references[0].study_instance_uid
    ds.Modality = "KO"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9999
    ds.InstanceNumber = 1
    ds.ContentDate = "20240701"
    ds.ContentTime = "101500.000"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = [title]
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = [template]
    studies: dict[str, dict[str, list[Dataset]]] = {}
    items = []
    for reference in references:
        instance = Dataset()
        instance.ReferencedSOPClassUID = reference.sop_class_uid
        instance.ReferencedSOPInstanceUID = reference.sop_instance_uid
        in_study = studies.setdefault(reference.study_instance_uid, {})
        in_study.setdefault(reference.series_instance_uid, []).append(instance)
        item = Dataset()
        item.RelationshipType = "CONTAINS"
        item.ValueType = "COMPOSITE" if reference.sop_class_uid.endswith(".88.33") else "IMAGE"
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = reference.sop_class_uid
        referenced.ReferencedSOPInstanceUID = reference.sop_instance_uid
        item.ReferencedSOPSequence = [referenced]
        items.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = []
    for study_uid, series_items in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, instances in series_items.items():
            series = Dataset()
            series.RetrieveAETitle = "DCM4CHEE"
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = instances
            study.ReferencedSeriesSequence.append(series)
        ds.CurrentRequestedProcedureEvidenceSequence.append(study)
    if content:
        ds.ContentSequence = items
    return ds


def _dx(study_instance_uid: str, series_instance_uid: str) -> Reference:
    return Reference(
        study_instance_uid,
        series_instance_uid,
        DigitalXRayImageStorageForPresentation,
        generate_uid(),
    )


def test_a_note_as_dcm4chee_writes_it_is_read_with_the_standards_meaning(
    tmp_path: Path,
) -> None:
    study, series = generate_uid(), generate_uid()
    references = [_dx(study, series), _dx(study, series), *_ours(study)]
    title = _code("113001", "DCM", "Rejected for quality reasons")
    ds = _pacs_note(references, title)
    path = tmp_path / "pacs-ko.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert read_rejection_note(dcmread(path, force=True)) == RejectionNote(
        code="113001",
        meaning="Rejected for Quality Reasons",
        sop_instance_uid=ds.SOPInstanceUID,
        references=tuple(references),
    )


def test_a_note_read_lists_every_instance_of_its_evidence_once() -> None:
    """A note without content items (the evidence is what IOCM requires), instances of
    two studies, one listed twice."""
    first, second = _dx(generate_uid(), generate_uid()), _dx(generate_uid(), generate_uid())
    ds = _pacs_note([first, second, first], _code("113039", "DCM", ""), content=False)
    note = read_rejection_note(ds)
    assert note is not None
    assert note.references == (first, second)
    assert note.meaning == "Data Retention Policy Expired"


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # wrong on purpose
def test_uids_with_leading_zeros_as_old_equipment_wrote_them_are_read() -> None:
    """Against PS3.5 9.1, but PACSes keep them: the note names the instance so."""
    reference = Reference(
        "1.2.040.1", "1.2.040.2", DigitalXRayImageStorageForPresentation, "1.2.040.3"
    )
    note = read_rejection_note(_pacs_note([reference], _code("113001", "DCM", "x")))
    assert note is not None
    assert note.references == (reference,)


@pytest.mark.parametrize(
    "title",
    [
        _code("113000", "DCM", "Of Interest"),
        _code("113001", "99LOCAL", "Rejected for Quality Reasons"),
        _code("REVOKE_REJECTION", "99DCM4CHEE", "Revoke Rejection"),
    ],
    ids=["key images", "a local scheme's 113001", "dcm4chee's revoke"],
)
def test_a_key_object_selection_of_another_title_is_no_rejection_note(title: Dataset) -> None:
    ds = _pacs_note([_dx(generate_uid(), generate_uid())], title)
    assert is_key_object_selection(ds)
    assert read_rejection_note(ds) is None


def test_a_key_object_selection_without_a_title_is_no_rejection_note() -> None:
    ds = _pacs_note([_dx(generate_uid(), generate_uid())], _code("113001", "DCM", "x"))
    del ds.ConceptNameCodeSequence
    assert read_rejection_note(ds) is None


def test_an_image_is_no_key_object_selection(source: Dataset) -> None:
    assert not is_key_object_selection(source)
    assert read_rejection_note(source) is None


def _parent(ds: Dataset, path: Sequence[str | int]) -> Any:
    """The data set that holds the element at the end of ``path`` (keywords and item
    indices)."""
    parent: Any = ds
    for step in path[:-1]:
        parent = parent[step] if isinstance(step, int) else getattr(parent, step)
    return parent


def _without(*path: str | int) -> Callable[[Dataset], None]:
    """Remove the element at the end of ``path``."""
    return lambda ds: delattr(_parent(ds, path), str(path[-1]))


def _set(value: object, *path: str | int) -> Callable[[Dataset], None]:
    """Set the element at the end of ``path`` to ``value``."""
    return lambda ds: setattr(_parent(ds, path), str(path[-1]), value)


_EVIDENCE = "CurrentRequestedProcedureEvidenceSequence"


def _stranger_in_content(ds: Dataset) -> None:
    ds.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID = generate_uid()


def _second_title(ds: Dataset) -> None:
    ds.ConceptNameCodeSequence.append(_code("113000", "DCM", "Of Interest"))


def _one_instance_in_two_series_of_the_evidence(ds: Dataset) -> None:
    series = ds[_EVIDENCE][0].ReferencedSeriesSequence
    again = Dataset()
    again.SeriesInstanceUID = generate_uid()
    again.ReferencedSOPSequence = [series[0].ReferencedSOPSequence[0]]
    series.append(again)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_without(_EVIDENCE), f"has no {_EVIDENCE}"),
        (_set([], _EVIDENCE), f"has no {_EVIDENCE}"),
        (_without(_EVIDENCE, 0, "StudyInstanceUID"), "item 1 of its .* has no StudyInstanceUID"),
        (_set([], _EVIDENCE, 0, "ReferencedSeriesSequence"), "has no ReferencedSeriesSequence"),
        (
            _without(_EVIDENCE, 0, "ReferencedSeriesSequence", 0, "ReferencedSOPSequence"),
            "has no ReferencedSOPSequence",
        ),
        (
            _without(
                _EVIDENCE,
                0,
                "ReferencedSeriesSequence",
                0,
                "ReferencedSOPSequence",
                1,
                "ReferencedSOPInstanceUID",
            ),
            "item 2 of its Referenced SOP Sequence has no ReferencedSOPInstanceUID",
        ),
        (
            _set(
                _BAD_UID,
                _EVIDENCE,
                0,
                "ReferencedSeriesSequence",
                0,
                "ReferencedSOPSequence",
                0,
                "ReferencedSOPClassUID",
            ),
            "has no valid ReferencedSOPClassUID",
        ),
        (_set("", _EVIDENCE, 0, "ReferencedSeriesSequence", 0, "SeriesInstanceUID"), "Series"),
        (_set("1." + "2" * 70, "SOPInstanceUID"), r"\(113001\) has no valid SOPInstanceUID"),
        (_stranger_in_content, "an instance that its Current Requested Procedure Evidence"),
        (_second_title, "has 2 document titles"),
        (_one_instance_in_two_series_of_the_evidence, "listed before in another study or series"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_a_rejection_note_that_cannot_be_acted_on_is_refused_without_its_values(
    change: Callable[[Dataset], None], match: str
) -> None:
    """A note taken for less than it says would keep rejected results; one taken for
    more would hide good ones. The message names the attribute, never a value."""
    study, series = generate_uid(), generate_uid()
    ds = _pacs_note([_dx(study, series), _dx(study, series)], _code("113001", "DCM", "x"))
    change(ds)
    with pytest.raises(ValueError, match=match) as raised:
        read_rejection_note(ds)
    message = str(raised.value)
    for value in ("Müller", "PAT-42", _BAD_UID, study, series):
        assert value not in message


def test_a_rejection_note_keeps_the_standards_meaning() -> None:
    with pytest.raises(ValueError, match="meaning"):
        RejectionNote("113001", "Rejected for quality reasons", generate_uid(), ())
