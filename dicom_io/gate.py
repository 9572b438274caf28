"""The input gate: is this instance a hand radiograph we can assess?

Every refusal is a human-readable reason that ends up in the database and in
``boneage-worker status``; a refused image never yields a number. The reasons
name DICOM attributes and values that are not patient identifiers.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from dataclasses import dataclass, field

from pydicom import Dataset
from pydicom import uid as pyuid
from pydicom.multival import MultiValue

from dicom_io.content import MANUFACTURER

#: SOP classes that carry a projection radiograph (or a capture of one) for display.
#: DX for processing is not one: raw detector data (PS3.3 C.8.11.1.1.1), refused with
#: its own reason.
RADIOGRAPH_SOP_CLASSES: dict[str, str] = {
    pyuid.ComputedRadiographyImageStorage: "CR",
    pyuid.DigitalXRayImageStorageForPresentation: "DX for presentation",
    pyuid.SecondaryCaptureImageStorage: "Secondary Capture",
    pyuid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage: "Multi-frame Grayscale Byte SC",
    pyuid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage: "Multi-frame Grayscale Word SC",
    pyuid.MultiFrameTrueColorSecondaryCaptureImageStorage: "Multi-frame True Color SC",
}

#: Body Part Examined values of a hand, as :func:`body_part_examined` reads them.
HAND_BODY_PARTS = {"HAND", "HANDS", "WRIST", "CARPUS", "FINGER", "HANDWRIST", "HAND_WRIST"}
#: Values that name a region the hand is part of without saying that it is the hand:
#: not stated, as an empty value is, so the coded region and then the descriptions
#: decide. ARM among them: sites write it for the whole upper limb, hand included
#: (UPPER_ARM, FOREARM, HUMERUS are parts that are not the hand, and refused).
GENERIC_BODY_PARTS = {
    "EXTREMITY",
    "EXTREMITIES",
    "UPPER_EXTREMITY",
    "UPPER_EXTREMITIES",
    "UPPEREXTREMITY",
    "UPPER_LIMB",
    "UPPERLIMB",
    "LIMB",
    "ARM",
    "ARMS",
}
#: Words that say which side, around a body part (``L HAND``, ``HAND_LT``, ``RT HAND``):
#: the side is Image Laterality's to say, and the part is what is left.
_SIDE_WORDS = {"L", "R", "LT", "RT", "LFT", "RGT", "LEFT", "RIGHT", "LINKS", "RECHTS"}
#: The same regions coded, as an Anatomic Region Sequence states them (PS3.16 CID 4031
#: and Annex L, which maps Body Part Examined to them): SNOMED CT, and the SNOMED-RT
#: codes of older modalities.
HAND_REGIONS = {
    ("SCT", "85562004"),  # Hand
    ("SCT", "24097009"),  # Bone structure of hand
    ("SCT", "74670003"),  # Wrist joint
    ("SCT", "8205005"),  # Wrist region (Carpus)
    ("SCT", "7569003"),  # Finger
    ("SRT", "T-D8700"),  # Hand
    ("SRT", "T-15460"),  # Wrist joint
    ("SRT", "T-D8800"),  # Finger
}
#: Coded regions the hand is part of (PS3.16 CID 4009/4031): not stated, as
#: :data:`GENERIC_BODY_PARTS` are.
GENERIC_REGIONS = {
    ("SCT", "66019005"),  # Extremity
    ("SCT", "53120007"),  # Upper limb
    ("SCT", "371195002"),  # Bone of upper limb
    ("SRT", "T-D0300"),  # Extremity
    ("SRT", "T-D8000"),  # Upper limb
    ("SRT", "T-D0821"),  # Bone of upper limb
}
#: The smallest rows and columns an image is assessed at.
MIN_SIZE = 128
#: How far apart a pixel's height and width may be (as a fraction of the smaller) and
#: the pixel still be taken as square: rounding in a header's decimal strings, not a
#: reader that samples rows and columns differently.
SQUARE_TOLERANCE = 0.01
#: What says a pixel's shape, in the order read: the ratio itself (PS3.3 C.7.6.3.1.7,
#: required where it is not 1:1 and no spacing says so), and the spacings, each row
#: spacing first (PS3.3 10.7.1.3), at the detector, in the patient, and on a scanned film.
_PIXEL_SHAPE = (
    "PixelAspectRatio",
    "ImagerPixelSpacing",
    "PixelSpacing",
    "NominalScannedPixelSpacing",
)
_HAND_WORDS = re.compile(
    r"\b(HAND|HANDS|WRIST|CARPUS|BONE ?AGE|SKELETAL AGE|KNOCHENALTER|MAIN|POIGNET)\b"
)
_DESCRIPTIONS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
)


@dataclass(frozen=True)
class PatientFacts:
    """What the model and the report need to know about the patient."""

    male: bool | None
    birth_date: dt.date | None
    reference_date: dt.date | None  # the date the image was taken
    patient_age_months: float | None  # from PatientAge, the last resort
    laterality: str | None  # "L", "R" or None
    # PatientAge's unit: "D", "W", "M" or "Y". Out of the repr, which the digest of an
    # assessment's inputs has been made of since revision 0004 (where it counts,
    # worker.pipeline.assessment_inputs adds it): a new field there would make every
    # copy received again look changed.
    patient_age_unit: str | None = field(default=None, repr=False)

    @property
    def age_from_birth_date(self) -> bool:
        """The age at the image is known to the day: birth date, and a date of the
        image on or after it."""
        return bool(
            self.birth_date and self.reference_date and self.reference_date >= self.birth_date
        )

    @property
    def age_in_whole_years_only(self) -> bool:
        """The only age known is a Patient's Age in years (``"010Y"``): the patient is
        10 years old and up to 11 months more, too coarse to set a bone age against."""
        return not self.age_from_birth_date and self.patient_age_unit == "Y"


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str | None
    facts: PatientFacts


def parse_da(value: object) -> dt.date | None:
    """A DICOM DA value as a date, or None when absent or malformed."""
    text = str(value or "").strip()
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def parse_as(value: object) -> float | None:
    """A DICOM AS value ("010Y", "006M", "012W", "030D") in months: the whole units it
    counts (PS3.5 6.2), so ``"010Y"`` is 120 months for a child of 10 years and 11 months.

    Written as modalities write it too: one to three digits, a space before the unit
    or not, any case (``"45Y"``, ``"45 Y"``, ``"4y"``, ``"010 Y"``); anything else
    (four digits, a sign, a decimal point, a word for the unit) is None.
    """
    parsed = _age_string(value)
    if parsed is None:
        return None
    number, unit = parsed
    return {
        "D": number / 30.4375,
        "W": number * 7 / 30.4375,
        "M": float(number),
        "Y": number * 12.0,
    }[unit]


#: PS3.5 says three digits and the unit; one or two digits and a space before the unit
#: are what non-conformant modalities write, and read as meant. Read strictly, an
#: adult's "45Y" gave no age at all and, without a birth date, passed the age check.
_AGE_STRING = re.compile(r"(\d{1,3}) ?([DWMY])")


def _age_string(value: object) -> tuple[int, str] | None:
    """(number, unit) of an AS value, or None when absent or malformed."""
    match = _AGE_STRING.fullmatch(str(value or "").strip().upper())
    return (int(match.group(1)), match.group(2)) if match else None


def patient_facts(ds: Dataset) -> PatientFacts:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    reference = (
        parse_da(ds.get("StudyDate"))
        or parse_da(ds.get("AcquisitionDate"))
        or parse_da(ds.get("ContentDate"))
    )
    laterality = str(ds.get("ImageLaterality") or ds.get("Laterality") or "").strip().upper()
    age = ds.get("PatientAge")
    parsed = _age_string(age)
    return PatientFacts(
        male={"M": True, "F": False}.get(sex),
        birth_date=parse_da(ds.get("PatientBirthDate")),
        reference_date=reference,
        patient_age_months=parse_as(age),
        laterality=laterality if laterality in {"L", "R"} else None,
        patient_age_unit=parsed[1] if parsed else None,
    )


def _anatomic_region(ds: Dataset) -> tuple[str, str, str] | None:
    """(scheme, code, meaning) of the first item of the Anatomic Region Sequence, the
    scheme's version aside; None when there is no item with a code."""
    try:
        items = ds.get("AnatomicRegionSequence") or []
        for item in items:
            scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
            value = str(item.get("CodeValue", "") or "").strip().upper()
            if scheme and value:
                return scheme, value, str(item.get("CodeMeaning", "") or "").strip()[:64]
    except (TypeError, ValueError, AttributeError):  # not a sequence as it came
        return None
    return None


def _text(value: object) -> str:
    """A value as DICOM writes it: the values of a multi-valued element joined by a
    backslash (``HAND\\WRIST``), not Python's list repr."""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(item).strip() for item in value)
    return str(value if value is not None else "").strip()


class BodyPart(enum.Enum):
    """What a Body Part Examined value says of the image (:func:`body_part_examined`)."""

    HAND = "hand"
    NOT_STATED = "not stated"  # empty, or a region the hand is part of
    OTHER = "other"


def _body_part_value(value: str) -> BodyPart:
    """One value of Body Part Examined, its side words aside."""
    words = [w for w in re.split(r"[^A-Z0-9]+", value.upper()) if w and w not in _SIDE_WORDS]
    part = "_".join(w for w in words if w != "AND")  # HAND AND WRIST is HAND_WRIST
    if not part or part in GENERIC_BODY_PARTS:
        return BodyPart.NOT_STATED
    if part in HAND_BODY_PARTS or {"HAND", "WRIST"} >= set(part.split("_")):
        return BodyPart.HAND  # WRIST_HAND as HAND_WRIST
    return BodyPart.OTHER


def body_part_examined(value: object) -> tuple[BodyPart, str]:
    """What a Body Part Examined value says, and the value as a reason shows it.

    Each value is read in upper case with its side words aside (``L HAND``,
    ``HAND_LT``, ``RT-HAND`` are HAND; which hand is Image Laterality's to say). A
    region the hand is part of (``EXTREMITY``, ``UPPER EXTREMITY``, ``ARM``) says no
    more than an empty value. Of a multi-valued element (``HAND\\WRIST``), the
    values that state a part decide: all of them a hand, it is a hand; any other part
    among them, it is not.

    Parameters
    ----------
    value
        Body Part Examined as pydicom reads it: a string, a multi-value, or None.

    Returns
    -------
    tuple[BodyPart, str]
        The verdict, and the values (spaces and hyphens as ``_``) joined by a
        backslash, as DICOM writes them.
    """
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    texts = [re.sub(r"[\s-]+", "_", str(v or "").strip().upper()) for v in values]
    shown = "\\".join(texts)
    stated = [k for k in map(_body_part_value, texts) if k is not BodyPart.NOT_STATED]
    if not stated:
        return BodyPart.NOT_STATED, shown
    return (BodyPart.OTHER if BodyPart.OTHER in stated else BodyPart.HAND), shown


def may_be_a_hand(value: object) -> bool:
    """Whether a Body Part Examined value leaves the image to the gate: a hand, or not
    stated (for a backfill's choice of series to move, as the gate reads the value)."""
    return body_part_examined(value)[0] is not BodyPart.OTHER


def _pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """The two positive numbers of a row/column pair (a spacing, an aspect ratio), or
    None when absent, not two values, or not numbers: such a value says nothing of the
    pixels' shape (the pixel decoder and the SC's own checks deal with what it breaks)."""
    try:
        value = ds.get(keyword)
        if not isinstance(value, (list, tuple, MultiValue)) or len(value) != 2:
            return None
        row, column = float(value[0]), float(value[1])
    except (TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        return None
    return row, column


def _not_square(ds: Dataset) -> str | None:
    """Why the pixels are not square, or None when nothing says so.

    The model learnt from square pixels, and the heat map is drawn on the grid as
    stored: an image whose reader sampled rows and columns at different pitches (some
    CR readers, a film digitiser) would be read and shown squashed. It is refused
    rather than resampled, which would make a new image out of it that nobody has seen.
    """
    for keyword in _PIXEL_SHAPE:
        pair = _pair(ds, keyword)
        if pair is not None and max(pair) / min(pair) > 1 + SQUARE_TOLERANCE:
            row, column = pair
            what = "row\\column" if keyword == "PixelAspectRatio" else "row\\column spacing, mm"
            return (
                f"pixels are not square: {keyword} is {row:g}\\{column:g} ({what}); "
                "the model reads square pixels"
            )
    return None


def _approx_age_years(facts: PatientFacts) -> float | None:
    if facts.birth_date and facts.reference_date:
        return (facts.reference_date - facts.birth_date).days / 365.25
    if facts.patient_age_months is not None:
        return facts.patient_age_months / 12
    return None


def check(
    ds: Dataset,
    *,
    min_size: int = MIN_SIZE,
    max_age_years: float = 19.0,
    require_sex: bool = True,
) -> GateDecision:
    """Decide from the header (pixels are not read) whether to assess ``ds``.

    Parameters
    ----------
    ds
        The dataset; ``stop_before_pixels`` is fine, but PixelData presence is
        checked, so read with ``specific_tags`` excluded or pass the full header.
    min_size
        Smallest accepted rows/columns.
    max_age_years
        Older patients are outside what a bone-age model is for.
    require_sex
        The model takes sex as an input; without it there is no estimate.
    """
    facts = patient_facts(ds)

    def no(reason: str) -> GateDecision:
        return GateDecision(False, reason, facts)

    sop = str(ds.get("SOPClassUID", ""))
    name = pyuid.UID(sop).name if sop else "missing"
    intent = str(ds.get("PresentationIntentType", "") or "").strip().upper()
    if sop == pyuid.DigitalXRayImageStorageForProcessing or (
        sop in RADIOGRAPH_SOP_CLASSES and intent == "FOR PROCESSING"
    ):
        # The detector's raw data, before the modality's processing makes a radiograph
        # to read of it (PS3.3 C.8.11.1.1.1); the model learnt from radiographs to read.
        stated = "" if sop == pyuid.DigitalXRayImageStorageForProcessing else ", FOR PROCESSING,"
        return no(
            f"SOP class {name}{stated} holds raw detector data, not for display; "
            "the model reads images for presentation"
        )
    if sop not in RADIOGRAPH_SOP_CLASSES:
        return no(f"SOP class {name} is not a projection radiograph (CR, DX or Secondary Capture)")
    if str(ds.get("Manufacturer", "") or "").strip() == MANUFACTURER:
        # Our own SC is a hand image with sex and body part: assessing it again would
        # loop forever with a PACS that forwards everything it stores.
        return no("made by boneage-worker (one of our own results)")
    if not ds.get("StudyInstanceUID"):
        return no("StudyInstanceUID is missing: results could not be placed in the study")
    for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            return no(f"{keyword} is missing: results could not reference the image")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return no("the instance has no pixel data")

    body_part, shown = body_part_examined(ds.get("BodyPartExamined"))
    region = _anatomic_region(ds)
    unstated = [f"BodyPartExamined is {shown}" if shown.strip("\\") else "no BodyPartExamined"]
    if region is not None and region[:2] in GENERIC_REGIONS:
        # the upper limb: the descriptions say whether it is the hand
        unstated.append(f"Anatomic Region Sequence is {region[2]} ({region[0]} {region[1]})")
        region = None
    if body_part is BodyPart.OTHER:
        return no(f"body part examined is {shown}, not a hand")
    if body_part is BodyPart.NOT_STATED and region is not None:
        # DX must code it (Type 1, PS3.3 C.8.11.5), where Body Part Examined is Type 3;
        # it outranks the free text of the descriptions.
        scheme, value, meaning = region
        if (scheme, value) not in HAND_REGIONS:
            return no(
                f"body part (Anatomic Region Sequence) is {meaning} ({scheme} {value}), not a hand"
            )
    elif body_part is BodyPart.NOT_STATED:
        text = " ".join(str(ds.get(k, "") or "") for k in _DESCRIPTIONS).upper()
        if not _HAND_WORDS.search(text):
            unstated.append("no hand in the descriptions")
            return no(f"body part is not stated ({', '.join(unstated)})")

    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, columns) < min_size:
        return no(f"image is {columns}x{rows} pixels, smaller than {min_size}x{min_size}")
    not_square = _not_square(ds)
    if not_square is not None:
        return no(not_square)

    if facts.male is None and require_sex:
        shown = str(ds.get("PatientSex", "") or "").strip() or "empty"
        return no(f"patient sex is {shown}; the model needs M or F")

    if facts.birth_date and facts.reference_date and facts.birth_date > facts.reference_date:
        # one of the two dates is wrong, and nothing says which: no age to compare with
        # (the dates themselves stay out of the reason, which reaches SRs and logs)
        return no("patient age is unknown: the birth date is after the date of the image")
    age = _approx_age_years(facts)
    if age is not None and not 0 <= age <= max_age_years:
        return no(
            f"patient age {age:.1f} years is outside the model's range 0-{max_age_years:g} years"
        )
    return GateDecision(True, None, facts)
