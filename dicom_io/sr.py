"""Bone-age Structured Report: Comprehensive SR holding a TID 1500 Measurement Report.

The SR goes into the radiograph's study as a new series. It carries the bone age
(LOINC 85151-9), the chronological age, their difference, the SDS with its reference
population, the prediction interval bounds, the finding site (hand, with laterality),
the source image, the algorithm (TID 4019: name, version, model SHA-256) and the
device observer. Verification Flag is UNVERIFIED: a person has to review it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone, tzinfo
from importlib import metadata
from pathlib import Path
from typing import Any

from highdicom import SOPClass
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    Measurement,
    MeasurementProperties,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    MeasurementStatisticalProperties,
    NumContentItem,
    ObservationContext,
    ObserverContext,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset, dcmread
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import FileDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes as pydicom_codes
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian

from dicom_io import codes
from dicom_io.content import (
    AI_RESULT_NOTICE,
    MANUFACTURER,
    REPLACED_NOT_ASSESSED_NOTICE,
    REPLACES_NOTICE,
    UNTRAINED_WARNING,
    BoneAgeFinding,
    check_positive_int,
    check_uid,
    image_side,
)
from dicom_io.pixels import FileChangedError
from dicom_io.stored_text import lost_text
from dicom_io.uids import derived_from

logger = logging.getLogger(__name__)

__all__ = [
    "MANUFACTURER",
    "SDS_REFERENCE_AUTHORITY",
    "MeasurementReportSR",
    "build_bone_age_sr",
    "build_not_assessed_sr",
    "received_elements",
    "referenced_sop_class",
    "series_description",
    "software_version",
]

#: Manufacturer written into General Equipment of everything this node makes.
#: The publication behind the Greulich-Pyle standard deviations.
SDS_REFERENCE_AUTHORITY = (
    "Greulich WW, Pyle SI. Radiographic Atlas of Skeletal Development of the Hand "
    "and Wrist. 2nd ed. Stanford University Press; 1959"
)
_VALUE_DECIMALS = 2
# Long String (LO) limit for Series Description and the like.
_LO_MAX = 64


@functools.cache
def software_version() -> str:
    """Installed version of this package, for Software Versions (General Equipment).

    Returns
    -------
    str
        The version, or ``"unknown"`` when the package metadata is missing.
    """
    try:
        return metadata.version("boneage-worker")
    except metadata.PackageNotFoundError:
        return "unknown"


def series_description(kind: str, *, trained: bool) -> str:
    """Series Description that says plainly this is an AI result.

    Parameters
    ----------
    kind : str
        Short object kind, for example ``"SR"`` or ``"heat map"``.
    trained : bool
        False adds :data:`~dicom_io.content.UNTRAINED_WARNING`.

    Returns
    -------
    str
        At most 64 characters (LO).
    """
    text = f"AI bone age {kind}"
    text = f"{text} - {UNTRAINED_WARNING}" if not trained else f"{text} - not verified"
    return text[:_LO_MAX]


#: The Patient and General Study attributes a created object takes from its source (all
#: Type 2: written empty where the source has none).
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

#: Type 3 attributes of the same modules a created object takes from its source where the
#: source has them: who issued the Patient ID and the Accession Number (a PACS serving
#: several hospitals files an object by the ID and its issuer, and one without the issuer
#: may land with no patient, or with another hospital's patient of the same ID), and the
#: Study Description a viewer lists the study by.
PATIENT_AND_STUDY_IF_PRESENT = (
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Give ``target`` the :data:`PATIENT_AND_STUDY` attributes of ``source`` as they came,
    those of :data:`PATIENT_AND_STUDY_IF_PRESENT` that it has, and the Specific Character
    Set their text is encoded in.

    The PACS files an SR or SC with its image by these, so they are the source's values
    element for element. They are not passed through highdicom, which refuses values
    that modalities write and PACSes keep (a birth date "2015", a sex "f", a study time
    "256161", a referring physician named twice) and character sets the standard allows
    (Japanese "\\ISO 2022 IR 87": an empty first value is ISO 2022 IR 6, PS3.3
    C.12.1.1.2). Refused, such a value failed the assessment on every attempt, with no
    SR or SC for the patient.

    Text whose bytes are not valid in the character set the source declares (Latin-1
    "PID\\xd61234" under "ISO_IR 192", from a misconfigured modality) pydicom decodes with
    U+FFFD in place of each such byte; written back, that is another Patient ID or
    name, which the PACS files under another or a new patient. Such text is copied as
    the bytes the source's file holds (:func:`received_elements`), in elements nested in
    a copied sequence too; any other value is copied as decoded, which pydicom encodes
    back to the same bytes.

    Raises
    ------
    FileChangedError
        When such text is to be read again from the file :func:`dicom_io.pixels.read_image`
        read ``source`` from, and another file has taken its place (the image received
        again) or it changed: read the image again.
    """
    if "SpecificCharacterSet" in source:
        target.SpecificCharacterSet = source.SpecificCharacterSet
    for keyword in PATIENT_AND_STUDY:
        if keyword in source:
            element = _copied(source, keyword)
            target.add_new(element.tag, element.VR, element.value)
        else:
            setattr(target, keyword, "")
    for keyword in PATIENT_AND_STUDY_IF_PRESENT:
        if keyword in source:
            target.add(_copied(source, keyword))


def _copied(source: Dataset, keyword: str) -> DataElement:
    """``source``'s element ``keyword`` to copy: as received where its text lost
    characters in decoding, else a copy. Where its bytes cannot be read again (a data set
    read from neither a file nor memory, the file gone) it goes as decoded, U+FFFD and
    all, and is said at WARNING (the attribute's name only)."""
    element = source[keyword]
    if not lost_text(element):
        return copy.deepcopy(element)
    element = _as_received(element, received_elements(source).get(element.tag))
    if lost_text(element):
        logger.warning(
            "%s holds text invalid in the image's character set, and its bytes could not "
            "be read again: copied as decoded, each invalid byte as U+FFFD",
            keyword,
        )
    return element


#: The tags :func:`copy_patient_and_study` copies.
_COPIED_TAGS = tuple(
    Tag(keyword) for keyword in (*PATIENT_AND_STUDY, *PATIENT_AND_STUDY_IF_PRESENT)
)
#: Where a data set keeps its copied elements as read again (:func:`received_elements`).
_RECEIVED = "_boneage_received_elements"

_Received = dict[BaseTag, DataElement | RawDataElement]


def received_elements(source: Dataset) -> _Received:
    """The elements of ``source`` that :func:`copy_patient_and_study` copies, undecoded
    (``RawDataElement``: their bytes) as the file or memory that
    :func:`pydicom.dcmread` read ``source`` from holds them, read again there and kept
    on ``source`` for its next copy. pydicom replaces an element by its decoded value
    when it is first read (the gate and the patient identity read the Patient ID), and
    keeps no bytes. Of a data set read from neither (or where it can no longer be read,
    or holds another instance now), as ``source`` holds them: decoded, but those not
    read yet.

    Raises
    ------
    FileChangedError
        When ``source`` was read by :func:`dicom_io.pixels.read_image` and the file at its
        path is no longer the one read.
    """
    kept = getattr(source, _RECEIVED, None)
    if isinstance(kept, dict):
        return kept
    again = _read_again(source)
    if again is None:
        return _as_held(source)
    held = _as_held(again)
    setattr(source, _RECEIVED, held)
    return held


def _as_held(ds: Dataset) -> _Received:
    """The copied elements of ``ds`` as it holds them, decoded or not: a copy of a
    sequence, whose items' elements not read yet stay undecoded in the copy."""
    held: _Received = {}
    for tag in _COPIED_TAGS:
        if tag in ds:
            element = ds.get_item(tag)
            held[tag] = element if isinstance(element, RawDataElement) else copy.deepcopy(element)
    return held


def _read_again(source: Dataset) -> Dataset | None:
    """The copied elements of ``source``, and its SOP Instance UID, read again from where
    :func:`pydicom.dcmread` read it: the memory it read (``FileDataset.buffer``: our own
    object's file read back), or its file, which :func:`dicom_io.pixels.read_image`'s
    opener checks is the one read (else FileChangedError), and of another reader's file,
    its modification time. None where it was read from neither, that is gone, unread or
    changed, or holds another instance.
    """
    if not isinstance(source, FileDataset):
        return None
    try:
        if source.buffer is not None:
            buffer = source.buffer
            position = buffer.tell()
            try:
                buffer.seek(0)
                again = _copied_elements(buffer)
            finally:
                buffer.seek(position)
        elif source.filename and callable(source.fileobj_type):
            opener = source.fileobj_type
            if opener is open and os.stat(source.filename).st_mtime != source.timestamp:
                return None  # another reader's file, changed since
            with opener(source.filename, "rb") as fh:
                again = _copied_elements(fh)
        else:
            return None
    except FileChangedError:
        raise
    except Exception:  # gone, unreadable, not DICOM: pydicom raises many types
        return None
    if again.get("SOPInstanceUID") != source.get("SOPInstanceUID"):
        return None
    return again


def _copied_elements(fh: Any) -> Dataset:
    """The copied elements and SOP Instance UID of the data set in ``fh``, undecoded."""
    # force: a deflated data set read_image inflated is in memory without its file meta
    return dcmread(
        fh,
        force=True,
        stop_before_pixels=True,
        specific_tags=[*_COPIED_TAGS, Tag("SOPInstanceUID")],
    )


def _as_received(
    element: DataElement, received: DataElement | RawDataElement | None
) -> DataElement:
    """``element`` as ``received`` holds it (:func:`received_elements`): text that lost
    characters in decoding (:func:`dicom_io.stored_text.lost_text`) as the bytes
    received, a sequence item by item; anything else, or where nothing was received, a
    copy of ``element``. An item is copied whole, its elements not read yet left
    undecoded (written back as received), and only those that lost text replaced."""
    if element.VR == "SQ":
        items = _received_items(received, len(element.value or []))
        copied = DicomSequence()
        for item, received_item in zip(element.value or [], items, strict=True):
            copied_item = copy.deepcopy(item)
            for tag in sorted(item.keys()):
                held = item.get_item(tag)
                if isinstance(held, RawDataElement) or not lost_text(held):
                    continue
                inner = (
                    received_item.get_item(tag)
                    if received_item is not None and tag in received_item
                    else None
                )
                copied_item[tag] = _as_received(held, inner)
            copied.append(copied_item)
        return DataElement(element.tag, "SQ", copied)
    if (
        lost_text(element)
        and isinstance(received, RawDataElement)
        and isinstance(received.value, bytes)
    ):
        return DataElement(element.tag, element.VR, received.value)
    return copy.deepcopy(element)


def _received_items(
    received: DataElement | RawDataElement | None, count: int
) -> list[Dataset | None]:
    """The items of the sequence ``received``, undecoded; None for each of ``count``
    where it is no sequence of that many items."""
    try:
        if isinstance(received, RawDataElement):
            received = convert_raw_data_element(received)
        if received is not None and received.VR == "SQ" and len(received.value) == count:
            return list(received.value)
    except Exception:  # bytes pydicom cannot read as a sequence: copied as decoded
        pass
    return [None] * count


#: The dates and times that say when a created object was made, as (date, time) pairs.
_CREATED = (
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("ContentDate", "ContentTime"),
    ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
)
_UTC_OFFSET = re.compile(r"([+-])(\d\d)(\d\d)")


def stated_time_zone(source: Dataset) -> tzinfo | None:
    """The time zone ``source``'s dates and times are in, where its Timezone Offset From
    UTC (SOP Common) states one that can be (``"+0100"``, ``"-0500"``); else None."""
    match = _UTC_OFFSET.fullmatch(str(source.get("TimezoneOffsetFromUTC", "") or "").strip())
    if match is None:
        return None
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes > 59:
        return None
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if sign == "-" else offset)


def local_time_zone() -> str:
    """The node's local time zone, which dates an SR or SC whose source states none: for
    example ``"UTC+01:00 (CET)"``. A container's is UTC unless ``TZ`` names another; a
    ``TZ`` that names none this machine has is said so (:func:`unknown_time_zone`)."""
    here = datetime.now().astimezone()
    offset = here.strftime("%z")
    unknown = unknown_time_zone()
    name = f"TZ {unknown} is unknown here" if unknown else here.tzname()
    return f"UTC{offset[:3]}:{offset[3:]} ({name})"


def unknown_time_zone() -> str | None:
    """``TZ``, where it names a time zone that this machine has no file for (a typo, or
    an image without the zone files): the C library then keeps UTC, and says nothing.
    None where ``TZ`` is unset, names a zone here, or is a rule that needs no file
    (``"CET-1CEST,M3.5.0,M10.5.0/3"``: it has the offset's digits)."""
    setting = os.environ.get("TZ", "").strip()
    name = setting.removeprefix(":")
    if not name or any(character.isdigit() for character in name):
        return None
    if Path(name).is_absolute():
        return None if Path(name).is_file() else setting
    known = any((Path(directory) / name).is_file() for directory in zoneinfo.TZPATH)
    return None if known else setting


def date_in_sources_time_zone(source: Dataset, target: Dataset) -> None:
    """Where ``source`` states the time zone of its dates and times, give ``target``'s
    creation, content and capture dates and times (now) in that zone, and state it: the
    study's times and ours then read alike in a viewer, and both are unambiguous.

    Where it states none, ``target`` keeps the times highdicom wrote, the node's local
    time (set ``TZ`` to the hospital's), and states no zone either: an offset would claim
    one for the study's own date and time, copied from the source, that nobody stated.
    """
    zone = stated_time_zone(source)
    if zone is None:
        return
    moment = datetime.now(zone)
    for date_keyword, time_keyword in _CREATED:
        if date_keyword in target:
            setattr(target, date_keyword, moment.strftime("%Y%m%d"))
        if time_keyword in target:
            setattr(target, time_keyword, moment.strftime("%H%M%S.%f"))
    for item in target.get("ContributingEquipmentSequence", []):
        # The processing equipment (highdicom, for us) contributed now. The source's
        # acquisition equipment keeps its own time, the source's, in the zone stated.
        if "ContributionDateTime" in item and _purpose(item) == _PROCESSING_EQUIPMENT:
            item.ContributionDateTime = moment.strftime("%Y%m%d%H%M%S.%f")
    target.TimezoneOffsetFromUTC = moment.strftime("%z")


#: Purpose of Reference of the equipment that made an object (PS3.16 CID 7005).
_PROCESSING_EQUIPMENT = ("DCM", "109102")


def _purpose(item: Dataset) -> tuple[str, str] | None:
    """The (scheme, code) of a Contributing Equipment item's Purpose of Reference."""
    for code in item.get("PurposeOfReferenceCodeSequence", []):
        return str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", ""))
    return None


#: What the SR references its image and joins its study by.
_REFERENCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def referenced_sop_class(source: Dataset) -> str | None:
    """The SOP Class UID an SR references ``source`` by: its own, else its File Meta
    Information's Media Storage SOP Class UID; None where neither has one.

    The listener takes a data set without SOP Class UID (it refuses only one that has
    neither SOP Common UID) and spools it under the class of the C-STORE request, which
    it checked is the one negotiated (pynetdicom writes it into the file meta): the class
    the PACS sent and holds the instance as. Such an image is not assessed (the gate
    names no class), and the SR that says so must still reference it.
    """
    if own := source.get("SOPClassUID"):
        return str(own)
    meta = getattr(source, "file_meta", None)
    stored = meta.get("MediaStorageSOPClassUID") if meta is not None else None
    return str(stored) if stored else None


def _evidence(source: Dataset) -> Dataset:
    """The attributes of ``source`` that the SR copies or references.

    Tolerant of missing Type 2 attributes (written empty); the four UIDs are required
    because the SR must reference the image and join its study: the SOP Class UID, the
    data set's or its file meta's (:func:`referenced_sop_class`).
    """
    if not isinstance(source, Dataset):
        raise TypeError(
            f'Argument "source" must be a pydicom Dataset, not {type(source).__name__}.'
        )
    uids = {keyword: source.get(keyword) for keyword in _REFERENCE_UIDS}
    uids["SOPClassUID"] = referenced_sop_class(source)
    for keyword, uid in uids.items():
        if not uid:
            raise ValueError(f'Argument "source" has no {keyword}; the SR cannot reference it.')
    evidence = Dataset()
    for keyword, uid in uids.items():
        setattr(evidence, keyword, uid)
    copy_patient_and_study(source, evidence)
    if "TimezoneOffsetFromUTC" in source:
        evidence.TimezoneOffsetFromUTC = source.TimezoneOffsetFromUTC
    frames = number_of_frames(source)
    if frames is not None and frames > 1:
        evidence.NumberOfFrames = frames
    return evidence


def number_of_frames(source: Dataset) -> int | None:
    """The source's Number of Frames, 1 where it states none; None where it is no
    number. Of several frames, only the first is assessed (:mod:`dicom_io.pixels`), and
    a reference to the image names it (Referenced Frame Number, Type 1C: PS3.3 10.3)."""
    try:
        value = source.get("NumberOfFrames")
        return int(value) if value not in (None, "") else 1
    except (TypeError, ValueError, OverflowError):
        return None


def _observation_context(device_observer_uid: str, model_name: str) -> ObservationContext:
    """TID 1001 with a device observer (TID 1004): this node and its model."""
    return ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=CodedConcept.from_code(codes.DEVICE),
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=device_observer_uid,
                name=MANUFACTURER,
                manufacturer_name=MANUFACTURER,
                model_name=model_name[:_LO_MAX],
            ),
        )
    )


def _laterality(finding_laterality: str | None, source: Dataset) -> str | None:
    """Finding's laterality, else the side the image states
    (:func:`~dicom_io.content.image_side`: Image Laterality, then Laterality, else a
    side word of its Body Part Examined, ``RT-HAND``), as the heat map's Laterality
    states it: the SR and the SC of an image name one side."""
    if finding_laterality is not None:
        return finding_laterality
    return image_side(source)


def _tracking(sop_instance_uid: str, label: str) -> TrackingIdentifier:
    """TID 4108 with a UID derived from the SR's own UID, so a rebuild is identical: of
    an SR of the node's, the node's (:func:`~dicom_io.uids.derived_from`)."""
    return TrackingIdentifier(
        uid=derived_from(sop_instance_uid, "tracking", label),
        identifier=label,
    )


def _algorithm(finding: BoneAgeFinding) -> AlgorithmIdentification:
    """TID 4019 Algorithm Identification: model SHA-256, trained or not, and precision."""
    return AlgorithmIdentification(
        name=finding.model_name[:_LO_MAX],
        version=finding.model_version[:_LO_MAX],
        parameters=[
            f"model SHA-256: {finding.model_id}",
            f"model trained: {'yes' if finding.model_trained else 'NO'}",
            f"precision: {finding.precision}",
        ],
        manufacturer=MANUFACTURER,
    )


def _round(value: float) -> float:
    return round(float(value), _VALUE_DECIMALS)


def _sds_measurement(finding: BoneAgeFinding, sds: float) -> Measurement:
    """SDS as a TID 300 measurement with TID 311 naming its reference population."""
    values: list[NumContentItem] = []
    difference = finding.bone_age_minus_chronological_age_months
    if difference is not None and abs(sds) >= 0.01:
        # SD of the population at this age and sex, implied by the SDS definition
        values.append(
            NumContentItem(
                name=pydicom_codes.DCM.StandardDeviationOfPopulation,
                value=_round(abs(difference / sds)),
                unit=codes.UCUM_MONTH,
                relationship_type=RelationshipTypeValues.HAS_PROPERTIES,
            )
        )
    return Measurement(
        name=codes.SDS,
        value=_round(sds),
        unit=codes.UCUM_SDS,
        properties=MeasurementProperties(
            measurement_statistical_properties=MeasurementStatisticalProperties(
                values=values,
                description=finding.sds_reference,
                authority=SDS_REFERENCE_AUTHORITY,
            )
        ),
    )


def _measurements(finding: BoneAgeFinding) -> list[Measurement]:
    """TID 300 measurements: bone age, chronological age, difference, SDS, intervals."""
    month = codes.UCUM_MONTH
    items = [Measurement(name=codes.BONE_AGE, value=_round(finding.bone_age_months), unit=month)]
    if finding.chronological_age_months is not None:
        items.append(
            Measurement(
                name=codes.CHRONOLOGICAL_AGE,
                value=_round(finding.chronological_age_months),
                unit=month,
            )
        )
    difference = finding.bone_age_minus_chronological_age_months
    if difference is not None:
        items.append(
            Measurement(
                name=codes.BONE_AGE_MINUS_CHRONOLOGICAL_AGE, value=_round(difference), unit=month
            )
        )
    if finding.sds is not None:
        items.append(_sds_measurement(finding, finding.sds))
    for level, (low, high) in sorted(finding.intervals.items()):
        for bound, value in (("lower", low), ("upper", high)):
            items.append(
                Measurement(
                    name=codes.prediction_interval_bound(level, bound),
                    value=_round(value),
                    unit=month,
                )
            )
    return items


def _source_image(evidence: Dataset) -> SourceImageForMeasurementGroup:
    """IMAGE item referencing the source; built from UIDs so pixel-less images work too.
    Of a multi-frame image it names the first frame, the one assessed."""
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=evidence.SOPClassUID,
        referenced_sop_instance_uid=evidence.SOPInstanceUID,
        referenced_frame_numbers=[1] if "NumberOfFrames" in evidence else None,
    )


def _comment(text: str) -> TextContentItem:
    return TextContentItem(
        name=codes.COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS
    )


class MeasurementReportSR(SOPClass):
    """Comprehensive SR document: one TID 1500 report about one image of the study.

    It writes what :class:`highdicom.sr.ComprehensiveSR` writes for the same arguments
    (``is_complete=True``, ``is_final=False``, ``is_verified=False``, Explicit VR Little
    Endian; a test compares the two attribute by attribute), built the way highdicom
    intends a :class:`highdicom.SOPClass` subclass to be. It skips the generic
    constructor's work that a report made here does not need, which cost three times
    as much as building the report itself: a deep copy of the content tree, parsing
    that copy back into content items, and two searches of the tree for the images it
    references (here always exactly ``evidence``).

    Parameters
    ----------
    evidence : pydicom.Dataset
        Patient, study and UIDs of the one image the report references (from
        :func:`_evidence`); the document joins its study.
    content : pydicom.Dataset
        The root CONTAINER of the report (``MeasurementReport(...)[0]``), taken as is.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and of the document.
    series_number, instance_number : int
        Series and Instance Number.
    institution_name : str or None
        Institution Name (General Equipment), when known.
    predecessors : sequence of pydicom.Dataset
        The SR documents this one replaces (:func:`earlier_report`), as highdicom's
        ``previous_versions``: the Predecessor Documents Sequence.
    **kwargs : Any
        Passed to :class:`highdicom.SOPClass` (manufacturer, series description ...).
    """

    def __init__(
        self,
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
    ) -> None:
        super().__init__(
            study_instance_uid=evidence.StudyInstanceUID,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=ComprehensiveSRStorage,
            instance_number=instance_number,
            modality="SR",
            transfer_syntax_uid=ExplicitVRLittleEndian,
            **kwargs,
        )
        # Patient and General Study, and the character set, as the source has them, not
        # through highdicom's checks (see copy_patient_and_study)
        copy_patient_and_study(evidence, self)
        if institution_name is not None:
            self.InstitutionName = institution_name
        # SR Document General: machine-made, complete, unreviewed, not final
        self.CompletionFlag = "COMPLETE"
        self.VerificationFlag = "UNVERIFIED"
        self.PreliminaryFlag = "PRELIMINARY"
        for element in content:  # SR Document Content: the root container itself
            self.add(element)
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = evidence.SOPClassUID
        referenced.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
        series = Dataset()
        series.SeriesInstanceUID = evidence.SeriesInstanceUID
        series.ReferencedSOPSequence = [referenced]
        study = Dataset()
        study.StudyInstanceUID = evidence.StudyInstanceUID
        study.ReferencedSeriesSequence = [series]
        self.CurrentRequestedProcedureEvidenceSequence = [study]
        if predecessors:
            self.PredecessorDocumentsSequence = _references(predecessors)
        self.PerformedProcedureCodeSequence: list[Dataset] = []
        self.ReferencedPerformedProcedureStepSequence: list[Dataset] = []
        # SOP Common: the source's acquisition equipment and highdicom, as highdicom does
        self._add_contributing_equipment(None, evidence)
        date_in_sources_time_zone(evidence, self)


def earlier_report(
    study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
) -> Dataset:
    """An SR document of ours that a new one replaces, for ``predecessors``."""
    report = Dataset()
    report.StudyInstanceUID = study_instance_uid
    report.SeriesInstanceUID = series_instance_uid
    report.SOPClassUID = ComprehensiveSRStorage
    report.SOPInstanceUID = sop_instance_uid
    return report


def _references(documents: Sequence[Dataset]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference items of ``documents``, in the order they
    come."""
    return hierarchical_references(
        (d.StudyInstanceUID, d.SeriesInstanceUID, d.SOPClassUID, d.SOPInstanceUID)
        for d in documents
    )


def hierarchical_references(instances: Iterable[tuple[str, str, str, str]]) -> list[Dataset]:
    """Hierarchical SOP Instance Reference items (PS3.3 C.17.2: study, its series, their
    instances) of ``instances``, each given as (study, series, SOP class, SOP instance)
    UIDs: studies and series in the order first seen, the instances of each in theirs.
    """
    studies: dict[str, dict[str, list[Dataset]]] = {}
    for study_uid, series_uid, sop_class_uid, sop_instance_uid in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class_uid
        item.ReferencedSOPInstanceUID = sop_instance_uid
        studies.setdefault(str(study_uid), {}).setdefault(str(series_uid), []).append(item)
    references = []
    for study_uid, series_items in studies.items():
        study = Dataset()
        study.StudyInstanceUID = study_uid
        study.ReferencedSeriesSequence = []
        for series_uid, items in series_items.items():
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = items
            study.ReferencedSeriesSequence.append(series)
        references.append(study)
    return references


def _document(
    evidence: Dataset,
    group: MeasurementsAndQualitativeEvaluations,
    *,
    trained: bool,
    kind: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    device_observer_uid: str,
    model_name: str,
    institution_name: str | None,
    predecessors: Sequence[Dataset],
) -> MeasurementReportSR:
    """Wrap one TID 1501 group in TID 1500 and the Comprehensive SR IOD."""
    report = MeasurementReport(
        observation_context=_observation_context(device_observer_uid, model_name),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=[group],
    )
    if institution_name is not None and not isinstance(institution_name, str):
        raise TypeError('Argument "institution_name" must be a string or None.')
    return MeasurementReportSR(
        evidence,
        report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        institution_name=institution_name[:_LO_MAX] if institution_name else None,
        predecessors=predecessors,
        # General Series / General Equipment / SOP Common
        series_description=series_description(kind, trained=trained),
        manufacturer_model_name=model_name[:_LO_MAX],
        software_versions=software_version(),
        coding_schemes=codes.coding_scheme_identification(),
    )


def build_bone_age_sr(
    source: Dataset,
    finding: BoneAgeFinding,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    device_observer_uid: str,
    institution_name: str | None = None,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """Build the bone-age Comprehensive SR (TID 1500) for one radiograph.

    Parameters
    ----------
    source : pydicom.Dataset
        The assessed radiograph; the SR joins its study and references it.
    finding : BoneAgeFinding
        The result to report.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and of the SR.
    series_number : int
        Series Number of the new series (positive).
    instance_number : int
        Instance Number (positive).
    device_observer_uid : str
        Device Observer UID (TID 1004): identifies this node.
    institution_name : str or None
        Institution Name (General Equipment), when known.
    predecessors : sequence of pydicom.Dataset
        The SR documents of ours this one replaces (:func:`earlier_report`).

    Returns
    -------
    pydicom.Dataset
        A Comprehensive SR (:class:`MeasurementReportSR`) with file meta, Explicit VR
        Little Endian.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When a UID is invalid, a number is out of range, or ``source`` lacks the UIDs
        the SR must reference.
    """
    if not isinstance(finding, BoneAgeFinding):
        raise TypeError(
            f'Argument "finding" must be a BoneAgeFinding, not {type(finding).__name__}.'
        )
    evidence = _evidence(source)
    check_uid("series_instance_uid", series_instance_uid)
    check_uid("sop_instance_uid", sop_instance_uid)
    check_uid("device_observer_uid", device_observer_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)

    laterality = codes.laterality_code(_laterality(finding.laterality, source))
    # TID 1501 Measurement and Qualitative Evaluation Group
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "Bone age assessment"),
        algorithm_id=_algorithm(finding),
        finding_sites=[FindingSite(anatomic_location=codes.HAND, laterality=laterality)],
        measurements=_measurements(finding),
        source_images=[_source_image(evidence)],
    )
    comments = [*finding.notes, AI_RESULT_NOTICE]
    if not finding.model_trained:
        comments.insert(0, UNTRAINED_WARNING)
    if predecessors:
        comments.append(REPLACES_NOTICE)
    for text in comments:
        group[0].ContentSequence.append(_comment(text))

    sr = _document(
        evidence,
        group,
        trained=finding.model_trained,
        kind="SR",
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        device_observer_uid=device_observer_uid,
        model_name=finding.model_name,
        institution_name=institution_name,
        predecessors=predecessors,
    )
    logger.debug(
        "built bone-age SR with %d measurements (trained=%s)",
        len(group[0].ContentSequence),
        finding.model_trained,
    )
    return sr


def build_not_assessed_sr(
    source: Dataset,
    reason: str,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    device_observer_uid: str,
    model_name: str = MANUFACTURER,
    model_version: str | None = None,
    institution_name: str | None = None,
    predecessors: Sequence[Dataset] = (),
) -> Dataset:
    """Build an SR saying the image was not assessed, and why; it carries no number.

    Parameters
    ----------
    source : pydicom.Dataset
        The image that was not assessed.
    reason : str
        Human-readable reason, for example ``"Body Part Examined is CHEST, not HAND"``.
    series_instance_uid, sop_instance_uid : str
        UIDs of the new series and of the SR.
    series_number : int
        Series Number of the new series (positive).
    instance_number : int
        Instance Number (positive).
    device_observer_uid : str
        Device Observer UID (TID 1004): identifies this node.
    model_name : str
        Algorithm name for TID 4019.
    model_version : str or None
        Algorithm version; the package version when None.
    institution_name : str or None
        Institution Name (General Equipment), when known.
    predecessors : sequence of pydicom.Dataset
        The SR documents of ours this one replaces (:func:`earlier_report`).

    Returns
    -------
    pydicom.Dataset
        A Comprehensive SR (:class:`MeasurementReportSR`) whose bone age is coded "Not
        Evaluated".

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When ``reason`` is empty, a UID is invalid or ``source`` lacks its UIDs.
    """
    if not isinstance(reason, str):
        raise TypeError(f'Argument "reason" must be a string, not {type(reason).__name__}.')
    if not reason.strip():
        raise ValueError('Argument "reason" must not be empty.')
    if not isinstance(model_name, str) or not model_name.strip():
        raise ValueError('Argument "model_name" must be a non-empty string.')
    evidence = _evidence(source)
    check_uid("series_instance_uid", series_instance_uid)
    check_uid("sop_instance_uid", sop_instance_uid)
    check_uid("device_observer_uid", device_observer_uid)
    check_positive_int("series_number", series_number)
    check_positive_int("instance_number", instance_number)

    # TID 1501 with a qualitative evaluation in place of the measurement
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "Bone age assessment"),
        algorithm_id=AlgorithmIdentification(
            name=model_name[:_LO_MAX],
            version=(model_version or software_version())[:_LO_MAX],
            manufacturer=MANUFACTURER,
        ),
        qualitative_evaluations=[
            QualitativeEvaluation(name=codes.BONE_AGE, value=codes.NOT_EVALUATED)
        ],
        source_images=[_source_image(evidence)],
    )
    group[0].ContentSequence.append(_comment(f"Not assessed: {reason.strip()}"))
    if predecessors:
        group[0].ContentSequence.append(_comment(REPLACED_NOT_ASSESSED_NOTICE))
    sr = _document(
        evidence,
        group,
        trained=True,
        kind="SR - not assessed",
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
        series_number=series_number,
        instance_number=instance_number,
        device_observer_uid=device_observer_uid,
        model_name=model_name,
        institution_name=institution_name,
        predecessors=predecessors,
    )
    return sr
