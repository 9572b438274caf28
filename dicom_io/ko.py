"""IHE IOCM rejection notes: Key Object Selection Documents that reject instances.

A PACS that follows IHE Imaging Object Change Management (IOCM) says that instances
were rejected (poor quality, patient safety, a wrong worklist entry, an expired
retention period) by storing a Key Object Selection Document (KOS) whose document
title is one of four DCM codes (:data:`REJECTION_TITLES`) and whose Current Requested
Procedure Evidence Sequence lists every rejected instance. The same note, sent by this
node, asks the PACS to hide SRs and SCs of ours that no longer stand.

:func:`read_rejection_note` reads a note as PACSes write them (dcm4chee, Orthanc
plugins): tolerant of how the title is spelt and of content it does not need, strict
where a wrong reading would reject or keep the wrong instances. :func:`build_rejection_note`
writes one that ``dciodvfy`` finds valid (Key Object Selection Document IOD, PS3.3
A.35.4; TID 2010).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset, validate_file_meta
from pydicom.uid import UID, ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage

from dicom_io.content import check_positive_int, check_uid
from dicom_io.sr import (
    MANUFACTURER,
    copy_patient_and_study,
    date_in_sources_time_zone,
    hierarchical_references,
    software_version,
)

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_OBJECT_SELECTION",
    "MAX_DESCRIPTION_LENGTH",
    "REJECTION_TITLES",
    "Reference",
    "RejectionNote",
    "build_rejection_note",
    "is_key_object_selection",
    "read_rejection_note",
]

#: SOP Class UID of the Key Object Selection Document.
KEY_OBJECT_SELECTION = KeyObjectSelectionDocumentStorage

#: The IOCM rejection note titles (PS3.16 CID 7010, scheme DCM): code value to the
#: standard's code meaning. A KOS with another title (113000 "Of Interest", a key-image
#: note) rejects nothing.
REJECTION_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "113001": "Rejected for Quality Reasons",
        "113037": "Rejected for Patient Safety Reasons",
        "113038": "Incorrect Modality Worklist Entry",
        "113039": "Data Retention Policy Expired",
    }
)

#: The longest Key Object Description a note of ours carries.
MAX_DESCRIPTION_LENGTH = 1024

_DCM = "DCM"
# Long String (LO) limit, for Manufacturer's Model Name and the like.
_LO_MAX = 64
# A UID's shape as read: digits in dot-separated components, at most 64 characters.
# Leading zeros in a component break PS3.5 9.1, but old equipment wrote them and PACSes
# keep them; a note that rejects such an instance names it by the same UID, and must
# not be refused for it.
_READ_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_REFERENCE_VALUE_TYPES = ("IMAGE", "COMPOSITE", "WAVEFORM")
_REFERENCE_FIELDS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "sop_instance_uid",
)


@dataclass(frozen=True)
class Reference:
    """One instance a rejection note rejects: where it is, and what it is.

    Parameters
    ----------
    study_instance_uid, series_instance_uid : str
        The study and series it is in.
    sop_class_uid, sop_instance_uid : str
        Its SOP Class and SOP Instance UIDs.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class RejectionNote:
    """What a rejection note says: why, and which instances.

    Parameters
    ----------
    code : str
        The title's code value, a key of :data:`REJECTION_TITLES`.
    meaning : str
        ``REJECTION_TITLES[code]``: the standard's meaning, whatever the sender spelt.
    sop_instance_uid : str
        The note's own SOP Instance UID.
    references : tuple of Reference
        Every instance it rejects, once each, in the order the note lists them.

    Raises
    ------
    ValueError
        When ``code`` is no rejection title or ``meaning`` is not its meaning.
    """

    code: str
    meaning: str
    sop_instance_uid: str
    references: tuple[Reference, ...]

    def __post_init__(self) -> None:
        if self.code not in REJECTION_TITLES:
            raise ValueError(f'Argument "code" is no rejection title: {self.code!r}.')
        if self.meaning != REJECTION_TITLES[self.code]:
            raise ValueError(f'Argument "meaning" must be {REJECTION_TITLES[self.code]!r}.')


def is_key_object_selection(ds: Dataset) -> bool:
    """Whether ``ds`` is a Key Object Selection Document, by its SOP Class UID.

    A KOS may be a rejection note (:func:`read_rejection_note`) or a key-image note; it
    is never an image to assess.
    """
    return str(ds.get("SOPClassUID", "") or "").strip(" \x00") == KEY_OBJECT_SELECTION


def read_rejection_note(ds: Dataset) -> RejectionNote | None:
    """The rejection ``ds`` says, or None where it is no rejection note.

    The title is matched by Code Value and Coding Scheme Designator ``DCM`` alone: a
    sender's Code Meaning may be spelt otherwise ("Rejected for quality reasons"), and
    the note then reads with the standard's. The rejected instances are those of the
    Current Requested Procedure Evidence Sequence, which IOCM requires to list every
    one; content items need not repeat them (IOCM receivers act on the evidence), but
    one that names an instance the evidence lacks makes the note refused, since the
    instances it means are then not known.

    Parameters
    ----------
    ds : pydicom.Dataset
        A received data set.

    Returns
    -------
    RejectionNote or None
        None where ``ds`` is no Key Object Selection Document, or one whose title is no
        rejection title (113000 "Of Interest", a title of another coding scheme):
        nothing is rejected.

    Raises
    ------
    TypeError
        When ``ds`` is not a pydicom Dataset.
    ValueError
        When ``ds`` is a KOS with a rejection title that cannot be acted on: several
        titles, no evidence, an evidence item without a valid UID, one instance listed
        with two different places or classes, a content item naming an instance the
        evidence lacks. The message names the attribute, never a value of it.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f'Argument "ds" must be a pydicom Dataset, not {type(ds).__name__}.')
    if not is_key_object_selection(ds):
        return None
    code = _rejection_title(ds)
    if code is None:
        return None
    what = f"The rejection note ({code})"
    sop_instance_uid = _read_uid(ds, "SOPInstanceUID", what)
    references = _evidence(ds, what)
    listed = {reference.sop_instance_uid for reference in references}
    for instance_uid in _content_references(ds):
        if instance_uid not in listed:
            raise ValueError(
                f"{what} references in its content an instance that its Current Requested "
                "Procedure Evidence Sequence does not list; IOCM requires the evidence to "
                "list every rejected instance."
            )
    logger.debug("read a rejection note (%s) of %d instances", code, len(references))
    return RejectionNote(
        code=code,
        meaning=REJECTION_TITLES[code],
        sop_instance_uid=sop_instance_uid,
        references=references,
    )


def _rejection_title(ds: Dataset) -> str | None:
    """The rejection code of ``ds``'s document title; None where it has no rejection title.

    A title is one item; a note with several of which one is a rejection title says
    two things, and is refused rather than read as either.
    """
    titles = list(ds.get("ConceptNameCodeSequence") or [])
    found = [code for code in map(_title_code, titles) if code is not None]
    if not found:
        return None
    if len(titles) > 1:
        raise ValueError(
            f"The rejection note ({found[0]}) has {len(titles)} document titles "
            "(Concept Name Code Sequence); a Key Object Selection Document has one."
        )
    return found[0]


def _title_code(item: Dataset) -> str | None:
    """The code value of ``item`` where it is a rejection title (DCM), else None."""
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
    value = str(item.get("CodeValue", "") or "").strip()
    return value if scheme == _DCM and value in REJECTION_TITLES else None


def _read_uid(item: Dataset, keyword: str, where: str) -> str:
    """``item``'s ``keyword`` where it has the shape of a UID (:data:`_READ_UID`), else
    raise naming ``where`` and ``keyword``, not the value."""
    value = item.get(keyword)
    text = str(value).strip(" \x00") if isinstance(value, str) else ""
    if len(text) > 64 or not _READ_UID.fullmatch(text):
        state = "no" if value is None or value == "" else "no valid"
        raise ValueError(f"{where} has {state} {keyword}.")
    return text


def _items(item: Dataset, keyword: str, where: str) -> list[Dataset]:
    """The items of ``item``'s sequence ``keyword``; raise where it has none."""
    items = item.get(keyword)
    if not items:
        raise ValueError(f"{where} has no {keyword} (or it is empty).")
    return list(items)


def _evidence(ds: Dataset, what: str) -> tuple[Reference, ...]:
    """Every instance of the Current Requested Procedure Evidence Sequence, once each,
    in order; raise where one cannot be known for sure."""
    found: dict[str, Reference] = {}
    evidence = "Current Requested Procedure Evidence Sequence"
    for s, study in enumerate(_items(ds, "CurrentRequestedProcedureEvidenceSequence", what), 1):
        in_study = f"{what}: item {s} of its {evidence}"
        study_uid = _read_uid(study, "StudyInstanceUID", in_study)
        for r, series in enumerate(_items(study, "ReferencedSeriesSequence", in_study), 1):
            in_series = f"{in_study}, item {r} of its Referenced Series Sequence,"
            series_uid = _read_uid(series, "SeriesInstanceUID", in_series)
            for i, instance in enumerate(_items(series, "ReferencedSOPSequence", in_series), 1):
                where = f"{in_series} item {i} of its Referenced SOP Sequence"
                reference = Reference(
                    study_instance_uid=study_uid,
                    series_instance_uid=series_uid,
                    sop_class_uid=_read_uid(instance, "ReferencedSOPClassUID", where),
                    sop_instance_uid=_read_uid(instance, "ReferencedSOPInstanceUID", where),
                )
                earlier = found.setdefault(reference.sop_instance_uid, reference)
                if earlier != reference:
                    raise ValueError(
                        f"{where} lists an instance listed before in another study or "
                        "series, or of another SOP class."
                    )
    return tuple(found.values())


def _content_references(ds: Dataset) -> Iterator[str]:
    """SOP Instance UIDs that IMAGE, COMPOSITE and WAVEFORM content items reference.
    An item without a readable one is passed over: the evidence is what is acted on."""
    for item in _content_items(ds):
        if str(item.get("ValueType", "") or "").strip() not in _REFERENCE_VALUE_TYPES:
            continue
        for referenced in item.get("ReferencedSOPSequence") or []:
            value = referenced.get("ReferencedSOPInstanceUID")
            if isinstance(value, str) and value.strip(" \x00"):
                yield value.strip(" \x00")


def _content_items(item: Dataset) -> Iterator[Dataset]:
    for child in item.get("ContentSequence") or []:
        yield child
        yield from _content_items(child)


def build_rejection_note(
    source: Dataset,
    code: str,
    references: Sequence[Reference],
    *,
    description: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    manufacturer_model_name: str = MANUFACTURER,
    institution_name: str | None = None,
) -> Dataset:
    """Build an IOCM rejection note (Key Object Selection Document) that rejects
    ``references``.

    The note joins the study of the instances it rejects, which must all be of one
    study (IOCM, and a PACS files the note with that study): its Study Instance UID is
    theirs, whatever ``source``'s is. Patient and study attributes are ``source``'s as
    they came (:func:`~dicom_io.sr.copy_patient_and_study`), so the PACS files the note
    with the patient's study even where a value breaks the standard. The content is
    TID 2010: the title, the Key Object Description, and one IMAGE (image storage
    classes), WAVEFORM or COMPOSITE (SR and any other class) item per instance.

    Parameters
    ----------
    source : pydicom.Dataset
        The data set whose patient and study attributes the note copies: the
        radiograph the rejected objects were made from.
    code : str
        The title, a key of :data:`REJECTION_TITLES`.
    references : sequence of Reference
        The instances rejected, all of one study; one listed twice is listed once.
    description : str
        Key Object Description: why, in words a PACS user reads, for example
        ``"Bone age withdrawn: its source image was rejected"``; at most
        :data:`MAX_DESCRIPTION_LENGTH` characters.
    series_instance_uid, sop_instance_uid : str
        UIDs of the note's series and of the note.
    series_number : int
        Series Number of the note's series (positive).
    instance_number : int
        Instance Number (positive).
    manufacturer_model_name : str
        Manufacturer's Model Name (General Equipment), at most 64 characters.
    institution_name : str or None
        Institution Name (General Equipment), when known; at most 64 characters.

    Returns
    -------
    pydicom.Dataset
        The note, with file meta (Explicit VR Little Endian), ready for
        ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When ``code`` is no rejection title, ``references`` is empty, spans several
        studies, holds an invalid UID or one instance in two places, the description is
        empty or too long, a UID argument is invalid or a number is below 1.
    """
    if not isinstance(source, Dataset):
        raise TypeError(
            f'Argument "source" must be a pydicom Dataset, not {type(source).__name__}.'
        )
    if not isinstance(code, str):
        raise TypeError(f'Argument "code" must be a string, not {type(code).__name__}.')
    if code not in REJECTION_TITLES:
        raise ValueError(
            f'Argument "code" must be one of {", ".join(REJECTION_TITLES)}, got {code!r}.'
        )
    rejected = _checked_references(references)
    text = _checked_text("description", description, MAX_DESCRIPTION_LENGTH)
    model_name = _checked_text("manufacturer_model_name", manufacturer_model_name, _LO_MAX)
    if institution_name is not None:
        institution_name = _checked_text("institution_name", institution_name, _LO_MAX)
    check_uid("series_instance_uid", series_instance_uid)
    check_uid("sop_instance_uid", sop_instance_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)

    note = Dataset()
    note.file_meta = _file_meta(sop_instance_uid)
    # Patient, General Study and the Specific Character Set of their text, as the
    # source has them; the study is the rejected instances'
    copy_patient_and_study(source, note)
    note.StudyInstanceUID = rejected[0].study_instance_uid
    # Key Object Document Series
    note.Modality = "KO"
    note.SeriesInstanceUID = series_instance_uid
    note.SeriesNumber = series_number
    note.SeriesDescription = f"Rejection note - {REJECTION_TITLES[code]}"[:_LO_MAX]
    note.ReferencedPerformedProcedureStepSequence = []
    # General Equipment
    note.Manufacturer = MANUFACTURER
    note.ManufacturerModelName = model_name
    note.SoftwareVersions = software_version()
    if institution_name is not None:
        note.InstitutionName = institution_name
    # Key Object Document
    now = datetime.now()
    note.InstanceNumber = instance_number
    note.ContentDate = now.strftime("%Y%m%d")
    note.ContentTime = now.strftime("%H%M%S.%f")
    requests = _requests_of_study(source, note.StudyInstanceUID)
    if requests:
        note.ReferencedRequestSequence = requests
    note.CurrentRequestedProcedureEvidenceSequence = hierarchical_references(
        dataclasses.astuple(reference) for reference in rejected
    )
    # SR Document Content: TID 2010 Key Object Selection
    note.ValueType = "CONTAINER"
    note.ConceptNameCodeSequence = [_code(code, REJECTION_TITLES[code])]
    note.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    note.ContentTemplateSequence = [template]
    note.ContentSequence = [_description(text), *map(_reference_item, rejected)]
    # SOP Common
    note.SOPClassUID = KEY_OBJECT_SELECTION
    note.SOPInstanceUID = sop_instance_uid
    note.InstanceCreationDate = note.ContentDate
    note.InstanceCreationTime = note.ContentTime
    date_in_sources_time_zone(source, note)
    logger.debug("built a rejection note (%s) of %d instances", code, len(rejected))
    return note


def _checked_references(references: Sequence[Reference]) -> list[Reference]:
    """``references`` once each, in order, when they are valid and of one study."""
    if isinstance(references, (str, bytes)) or not isinstance(references, Sequence):
        raise TypeError('Argument "references" must be a sequence of Reference.')
    if not references:
        raise ValueError('Argument "references" is empty; a rejection note rejects something.')
    found: dict[str, Reference] = {}
    for index, reference in enumerate(references):
        if not isinstance(reference, Reference):
            raise TypeError(
                f'Argument "references" item {index} must be a Reference, '
                f"not {type(reference).__name__}."
            )
        for name in _REFERENCE_FIELDS:
            _check_reference_uid(index, name, getattr(reference, name))
        if found.setdefault(reference.sop_instance_uid, reference) != reference:
            raise ValueError(
                f'Argument "references" item {index} is an instance listed before in '
                "another study or series, or of another SOP class."
            )
    studies = {reference.study_instance_uid for reference in found.values()}
    if len(studies) > 1:
        raise ValueError(
            f'Argument "references" spans {len(studies)} studies; a rejection note '
            "rejects instances of one study, and joins it. Build one note per study."
        )
    return list(found.values())


def _check_reference_uid(index: int, name: str, value: object) -> None:
    """That ``value`` has the shape of a UID as received (:data:`_READ_UID`), with a
    message that names the reference and not the UID.

    Not PS3.5's own rules (:func:`~dicom_io.content.check_uid`): a referenced instance
    is named by the UIDs it was received and filed under, and a study UID with a
    leading zero in a component (which some modalities write, and PACSes keep) must
    not stop a note that withdraws our objects in that study.
    """
    text = value.strip(" \x00") if isinstance(value, str) else ""
    if len(text) > 64 or not _READ_UID.fullmatch(text):
        raise ValueError(f'Argument "references" item {index} has no valid {name}.')


def _checked_text(name: str, value: object, longest: int) -> str:
    """``value`` stripped, where it is a string of 1 to ``longest`` characters."""
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a string, not {type(value).__name__}.')
    text = value.strip()
    if not text:
        raise ValueError(f'Argument "{name}" must not be empty.')
    if len(text) > longest:
        raise ValueError(f'Argument "{name}" has {len(text)} characters; at most {longest}.')
    return text


def _file_meta(sop_instance_uid: str) -> FileMetaDataset:
    """File Meta Information of the note, Explicit VR Little Endian as the SR and SC."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = KEY_OBJECT_SELECTION
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    validate_file_meta(meta, enforce_standard=True)  # adds version and implementation
    return meta


def _requests_of_study(source: Dataset, study_instance_uid: str) -> list[Dataset]:
    """Items of ``source``'s Referenced Request Sequence for the note's study.

    Referenced Request Sequence is Type 1C, required where the document pertains to
    requested procedures. An image holds its request in the Request Attributes
    Sequence, not here, and the SR and SC the note rejects name none; so a note made
    from a radiograph names none either. A source that has the sequence (an SR) gives
    the note the items of its study, as they came: a request of another study is not
    the one the rejected instances answer.
    """
    items = source.get("ReferencedRequestSequence") or []
    return [
        copy.deepcopy(item)
        for item in items
        if str(item.get("StudyInstanceUID", "") or "").strip(" \x00") == study_instance_uid
    ]


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = _DCM
    item.CodeMeaning = meaning
    return item


def _description(text: str) -> Dataset:
    """TID 2010 row: CONTAINS TEXT (113012, DCM, "Key Object Description")."""
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = [_code("113012", "Key Object Description")]
    item.TextValue = text
    return item


def _reference_item(reference: Reference) -> Dataset:
    """TID 2010 row: CONTAINS IMAGE, WAVEFORM or COMPOSITE, with no Concept Name (the
    template gives the purpose of reference none). No Referenced Frame Number: the
    whole of a multi-frame image is rejected."""
    referenced = Dataset()
    referenced.ReferencedSOPClassUID = reference.sop_class_uid
    referenced.ReferencedSOPInstanceUID = reference.sop_instance_uid
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = _value_type(reference.sop_class_uid)
    item.ReferencedSOPSequence = [referenced]
    return item


def _value_type(sop_class_uid: str) -> str:
    """IMAGE for an image storage class, WAVEFORM for a waveform, else COMPOSITE (SR,
    presentation states, encapsulated documents, and classes pydicom does not know,
    which COMPOSITE references whatever they are)."""
    keyword = UID(sop_class_uid).keyword
    if "ImageStorage" in keyword:
        return "IMAGE"
    if keyword.endswith("WaveformStorage"):
        return "WAVEFORM"
    return "COMPOSITE"
