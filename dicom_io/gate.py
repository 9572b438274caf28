"""The input gate: is this instance a hand radiograph we can assess?

Every refusal is a human-readable reason that ends up in the database, in
``boneage-worker status``, the logs and a not-assessed SR; a refused image never
yields a number. The reasons name DICOM attributes and values that are not patient
identifiers (body part, view, conversion type, spacing), never a date, a name or a
description's text.

What is assessed is what bone age is read on (Greulich and Pyle's atlas, and the RSNA
images the model learnt from): one whole hand and wrist, in a frontal view (PA, or
AP), a radiograph or a capture of one, with square pixels.
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

from dicom_io.content import MANUFACTURER, image_side

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

#: The Secondary Capture classes among them: a picture of anything; its Conversion Type
#: says how it was made (:func:`_not_a_radiograph`).
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        pyuid.SecondaryCaptureImageStorage,
        pyuid.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        pyuid.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        pyuid.MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
#: Conversion Type (0008,0064) defined terms (PS3.3 C.8.6.1) by which a radiograph may
#: come: a film digitised, an image taken from a modality's digital interface, a film
#: put on a scanner, a video frame of a modality's display.
RADIOGRAPH_CONVERSIONS = {
    "DF": "digitized film",
    "DI": "digital interface",
    "SI": "scanned image",
    "DV": "digitized video",
}
#: Those by which none comes: a requisition form scanned, another program's result
#: made on a workstation (another vendor's AI, our own heat map), a drawing.
OTHER_CONVERSIONS = {
    "SD": "scanned document",
    "WSD": "workstation",
    "DRW": "drawing",
    "SYN": "synthetic image",
}
#: Modalities whose images are radiographs: an SC that states no Conversion Type is
#: taken for a radiograph's capture only when its Modality is one of them.
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG"}
#: The Modality values an SC whose Conversion Type says it may be a radiograph's capture
#: (:data:`RADIOGRAPH_CONVERSIONS`) may have: the radiograph's, OT (other: a film
#: digitiser, a capture station's default) or none. Any other names what was captured,
#: and it is not a radiograph: an ultrasound frame grabbed from the video output (DV), a
#: photograph (XC), an endoscope's picture.
SECONDARY_CAPTURE_MODALITIES = RADIOGRAPH_MODALITIES | {"OT", ""}
#: What some Modality values (PS3.3 C.7.3.1.1.1) name, for a refusal's reason.
MODALITY_NAMES = {
    "US": "ultrasound",
    "XC": "external-camera photography",
    "ES": "endoscopy",
    "GM": "general microscopy",
    "SM": "slide microscopy",
    "XA": "X-ray angiography",
    "RF": "radio fluoroscopy",
    "MR": "magnetic resonance",
    "CT": "computed tomography",
    "NM": "nuclear medicine",
    "PT": "positron emission tomography",
    "MG": "mammography",
    "IO": "intra-oral radiography",
    "PX": "panoramic X-ray",
    "OP": "ophthalmic photography",
    "DOC": "document",
    "SR": "structured report",
}
#: Body Part Examined values of a hand, as :func:`body_part_examined` reads them.
HAND_BODY_PARTS = {"HAND", "HANDS", "WRIST", "CARPUS", "HANDWRIST", "HAND_WRIST"}
#: Fingers alone: bone age is read on the whole hand and wrist (Greulich-Pyle's
#: atlas, and the RSNA images the model learnt from).
FINGER_BODY_PARTS = {"FINGER", "FINGERS", "THUMB", "THUMBS"}
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
#: Words that say which side, around a body part (``L HAND``, ``HAND_LT``, ``RT HAND``),
#: and the side each says: the side is Image Laterality's to say, and the part is what
#: is left.
_SIDE_WORDS = {"L": "L", "LT": "L", "LFT": "L", "LEFT": "L", "LINKS": "L"}
_SIDE_WORDS |= {"R": "R", "RT": "R", "RGT": "R", "RIGHT": "R", "RECHTS": "R"}
#: Words that say both sides (``BOTH HANDS``, ``HANDS BILAT``).
_BOTH_WORDS = {"BOTH", "BILAT", "BILATERAL", "BEIDE"}
#: The hand and wrist coded, as an Anatomic Region Sequence states them (PS3.16 CID
#: 4031 and Annex L, which maps Body Part Examined to them): SNOMED CT, and the
#: SNOMED-RT codes of older modalities.
HAND_REGIONS = {
    ("SCT", "85562004"),  # Hand
    ("SCT", "24097009"),  # Bone structure of hand
    ("SCT", "74670003"),  # Wrist joint
    ("SCT", "8205005"),  # Wrist region (Carpus)
    ("SRT", "T-D8700"),  # Hand
    ("SRT", "T-15460"),  # Wrist joint
}
#: Fingers alone, coded (PS3.16 CID 4009/4031), refused as FINGER_BODY_PARTS are.
FINGER_REGIONS = {
    ("SCT", "7569003"),  # Finger
    ("SCT", "76505004"),  # Thumb
    ("SRT", "T-D8800"),  # Finger
    ("SRT", "T-D8810"),  # Thumb
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
#: The frontal views of PS3.16 CID 4010 "DX View", which bone age is read on: the PA
#: of the atlas and the RSNA images, and AP, the same projection the other way through.
#: SNOMED CT, and the SNOMED-RT of older modalities (R-10214, postero-anterior in the
#: editions of CID 4010 before SNOMED CT).
FRONTAL_VIEWS = {
    ("SCT", "399033003"),  # frontal
    ("SCT", "399348003"),  # antero-posterior
    ("SCT", "272479007"),  # postero-anterior
    ("SRT", "R-10202"),  # frontal
    ("SRT", "R-10206"),  # antero-posterior
    ("SRT", "R-10214"),  # postero-anterior
    ("SRT", "R-40888"),  # postero-anterior
}
#: The other views of CID 4010, each (SNOMED CT, SNOMED-RT, meaning): a lateral, an
#: oblique, or a view of another part (axial, tangential: a carpal tunnel view) is not
#: what bone age is read on. A trauma series of the hand (PA, lateral, oblique) would
#: otherwise get one bone age per view.
OTHER_VIEWS: tuple[tuple[str, str, str], ...] = (
    ("399067008", "R-102CD", "lateral"),
    ("399173006", "R-10236", "left lateral"),
    ("399198007", "R-10232", "right lateral"),
    ("399260004", "R-10224", "medial-lateral"),
    ("399352003", "R-10228", "lateral-medial"),
    ("30730003", "G-A145", "sagittal"),
    ("399182000", "R-102C1", "oblique"),
    ("399160007", "R-10204", "frontal oblique"),
    ("399312000", "R-10208", "antero-posterior oblique"),
    ("399059000", "R-10216", "postero-anterior oblique"),
    ("399038007", "R-10210", "right posterior oblique"),
    ("399006002", "R-10212", "left posterior oblique"),
    ("399356000", "R-40985", "right anterior oblique"),
    ("399135007", "R-10220", "left anterior oblique"),
    ("399236003", "R-10234", "right oblique"),
    ("399184004", "R-10238", "left oblique"),
    ("260427002", "R-40783", "lateral oblique"),
    ("260426006", "R-40782", "medial oblique"),
    ("399099002", "R-10230", "latero-medial oblique"),
    ("399368009", "R-10226", "medio-lateral oblique"),
    ("399004004", "R-10246", "oblique axial"),
    ("399288005", "R-10248", "oblique cranio-caudal"),
    ("399225005", "R-10250", "oblique caudo-cranial"),
    ("399132005", "R-10252", "frontal-oblique axial"),
    ("399325008", "R-10254", "sagittal-oblique axial"),
    ("399061009", "R-10241", "axial"),
    ("399162004", "R-10242", "cranio-caudal"),
    ("399196006", "R-10244", "caudo-cranial"),
    ("399110001", "R-102C2", "tangential"),
    ("399071006", "R-102C3", "plantodorsal"),
    ("399335002", "R-102C4", "dorsoplantar"),
    ("399272005", "R-102C5", "parietoacanthial"),
    ("399242004", "R-102C6", "acanthioparietal"),
    ("399351005", "R-102C7", "orbitoparietal"),
    ("399316002", "R-102C8", "parieto-orbital"),
    ("399255003", "R-10256", "submentovertical"),
    ("399360002", "R-10257", "verticosubmental"),
    ("260499007", "R-40810", "occlusal"),
    ("119376003", "G-8300", "tissue specimen"),
)
_OTHER_VIEW_MEANINGS = {
    (scheme, code): meaning
    for sct, srt, meaning in OTHER_VIEWS
    for scheme, code in (("SCT", sct), ("SRT", srt))
}
#: Words of a description, or of a code's meaning, that name a lateral or an oblique view.
_LATERAL_WORDS = {"LAT", "LATERAL", "SEITLICH", "PROFIL"}
_OBLIQUE_WORDS = {"OBL", "OBLIQ", "OBLIQUE", "SCHRAEG", "SCHRÄG"}
#: View Position (0018,5101) values that do: the defined terms of PS3.3's CR Series and
#: DX Positioning modules (LL, RL, LLO, RLO), the words above, and the short forms
#: sites write, which in free text could be anything.
#: RLD and LLD (decubitus) say how the patient lay, not the projection: no refusal.
_LATERAL_POSITIONS = _LATERAL_WORDS | {"LL", "RL", "ML", "LM"}
_OBLIQUE_POSITIONS = _OBLIQUE_WORDS | {"LLO", "RLO", "LO", "MO", "MLO", "LMO", "RAO", "LAO"}
#: View Position values of a frontal view: PS3.3's AP and PA, and the hand's own names
#: for them (dorso-palmar, palmo-dorsal).
_FRONTAL_POSITIONS = {"AP", "PA", "DP", "PD", "DV", "VD", "FRONTAL"}
#: How a refusal for the view ends.
_READ_ON_FRONTAL = "not frontal; bone age is read on a PA or AP view"
#: How a refusal for fingers alone ends.
_READ_ON_THE_HAND = "not a whole hand (bone age is read on the hand and wrist)"
#: How a refusal for both hands ends.
_READ_ON_ONE_HAND = "bone age is read on one hand"
#: A code string (CS) value as PS3.5 6.2 allows it: upper case letters, digits, space
#: and underscore, 16 at most.
_CS_VALUE = re.compile(r"[A-Z0-9 _]{0,16}")


def _quotable(text: str) -> bool:
    """Whether a reason may quote ``text``, a code string's values joined by a backslash:
    a few, each a CS value as PS3.5 allows one. A reason reaches the database, `status`,
    the log and the not-assessed SR sent to the PACS; other text may be whatever was
    typed into the field, a patient's name among it, and is said without its value."""
    return len(text) <= 64 and all(_CS_VALUE.fullmatch(v) for v in text.split("\\"))


#: Descriptions of the image or its series, which name its view where a modality writes
#: no View Position; the study's and the request's name every view of the exam.
_VIEW_DESCRIPTIONS = ("SeriesDescription", "AcquisitionDeviceProcessingDescription")
#: The smallest rows and columns an image is assessed at.
MIN_SIZE = 128
#: The longest side over the shortest an image may have. A hand and wrist, however
#: collimated or cropped, is about 2:1 at most (1.35 to 1.54 on the three real hands of
#: the project's data; detector and film formats run from 1:1 to 2.6:1, 18x43 cm and
#: 14x36 in for long bones); what is longer is not one hand's radiograph, and its padded
#: square crop grew without bound (128 x 16384 pixels: 1.25 GB of float32; found in
#: review).
MAX_ASPECT_RATIO = 4.0
#: The most pixels an image may have: 8192 x 8192. The largest detector, 43 x 43 cm, at
#: a 100 um pitch gives 4300 x 4300 pixels, and a hand film of 24 x 30 cm digitised at
#: 600 dpi 5670 x 7090; what is larger is no hand radiograph as a PACS forwards it, and
#: decoding it took memory without bound (65535 x 65535 pixels: 8 GB of 16-bit values
#: and 17 GB as float32, from a JPEG 2000 file of a few kilobytes).
MAX_PIXELS = 8192 * 8192
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
    laterality: str | None  # "L", "R" or None: the side image_side reads
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
    return _in_months(*parsed) if parsed is not None else None


def _in_months(number: int, unit: str) -> float:
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
_STRICT_AGE_STRING = re.compile(r"(\d{3})([DWMY])")


def _age_string(value: object, *, lenient: bool = True) -> tuple[int, str] | None:
    """(number, unit) of an AS value, or None when absent or malformed (``lenient``:
    read as non-conformant modalities write it, else only as PS3.5 does)."""
    pattern = _AGE_STRING if lenient else _STRICT_AGE_STRING
    match = pattern.fullmatch(str(value or "").strip().upper())
    return (int(match.group(1)), match.group(2)) if match else None


def patient_facts(ds: Dataset) -> PatientFacts:
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    reference = (
        parse_da(ds.get("StudyDate"))
        or parse_da(ds.get("AcquisitionDate"))
        or parse_da(ds.get("ContentDate"))
    )
    # the side our SR and heat map state (a side word of Body Part Examined where no
    # laterality states one), so that a side corrected in the body part alone changes
    # the digest of the inputs and the image is assessed again; refusals (both hands)
    # read the raw values (_both_hands)
    laterality = image_side(ds)
    birth_date = parse_da(ds.get("PatientBirthDate"))
    # Read leniently only where it is the age used (no birth date gives one): where a
    # birth date does, the facts hold what they held before the lenient reading, which
    # the digest of an assessment's inputs is made of (worker.pipeline), or every copy
    # received again of an image with a "10Y" would look changed.
    by_birth_date = bool(birth_date and reference and reference >= birth_date)
    parsed = _age_string(ds.get("PatientAge"), lenient=not by_birth_date)
    return PatientFacts(
        male={"M": True, "F": False}.get(sex),
        birth_date=birth_date,
        reference_date=reference,
        patient_age_months=_in_months(*parsed) if parsed is not None else None,
        laterality=laterality,
        patient_age_unit=parsed[1] if parsed else None,
    )


def _first_code(ds: Dataset, keyword: str) -> tuple[str, str, str] | None:
    """(scheme, code, meaning) of the first item of a code sequence (the Anatomic
    Region Sequence, the View Code Sequence), the scheme's version aside; None when
    there is no item with a code."""
    try:
        items = ds.get(keyword) or []
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
    HANDS = "hands"  # HANDS, or BOTH HAND: both on one image, unless a laterality says one
    FINGER = "finger"
    NOT_STATED = "not stated"  # empty, or a region the hand is part of
    OTHER = "other"


def _body_part_value(value: str) -> BodyPart:
    """One value of Body Part Examined, its side words aside."""
    words = [w for w in re.split(r"[^A-Z0-9]+", value.upper()) if w]
    sides = {_SIDE_WORDS[w] for w in words if w in _SIDE_WORDS}
    both = bool(_BOTH_WORDS.intersection(words)) or sides == {"L", "R"}
    rest = [w for w in words if w not in _SIDE_WORDS and w not in _BOTH_WORDS and w != "AND"]
    part = "_".join(rest)  # HAND AND WRIST is HAND_WRIST
    if not part or part in GENERIC_BODY_PARTS:
        return BodyPart.NOT_STATED
    if part in FINGER_BODY_PARTS:
        return BodyPart.FINGER
    if part in HAND_BODY_PARTS or {"HAND", "HANDS", "WRIST"}.issuperset(rest):
        # WRIST_HAND as HAND_WRIST
        return BodyPart.HANDS if both or "HANDS" in rest else BodyPart.HAND
    if FINGER_BODY_PARTS.union({"HAND", "HANDS", "WRIST"}).issuperset(rest):
        return BodyPart.HAND  # HAND_FINGERS: the hand, fingers and all
    return BodyPart.OTHER


def body_part_examined(value: object) -> tuple[BodyPart, str]:
    """What a Body Part Examined value says, and the value as a reason shows it.

    Each value is read in upper case with its side words aside (``L HAND``,
    ``HAND_LT``, ``RT-HAND`` are HAND; which hand is Image Laterality's to say), but
    both sides named (``BOTH HANDS``, ``HAND L R``), or ``HANDS``, are
    :attr:`BodyPart.HANDS`. ``FINGER`` and ``THUMB`` are fingers alone. A region the
    hand is part of (``EXTREMITY``, ``UPPER EXTREMITY``, ``ARM``) says no more than
    an empty value. Of a multi-valued element (``HAND\\WRIST``), the values that
    state a part decide: any part not of the hand among them, it is not a hand;
    else a hand where one of them is (``HAND\\FINGER`` is the hand, fingers
    included), fingers alone where all are.

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
    stated = {k for k in map(_body_part_value, texts) if k is not BodyPart.NOT_STATED}
    for verdict in (BodyPart.OTHER, BodyPart.HANDS, BodyPart.HAND, BodyPart.FINGER):
        if verdict in stated:
            return verdict, shown
    return BodyPart.NOT_STATED, shown


def may_be_a_hand(value: object) -> bool:
    """Whether a Body Part Examined value leaves the image to the gate: a hand, or not
    stated (for a backfill's choice of series to move, as the gate reads the value)."""
    return body_part_examined(value)[0] not in (BodyPart.OTHER, BodyPart.FINGER)


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


def _view_named(text: str, *, position: bool = False) -> str | None:
    """The view the words of ``text`` name: "oblique" (first: a "lateral oblique" is
    one), "lateral" or "frontal", else None. The short codes of View Position (LL, RLO,
    PA …) count only in it (``position``)."""
    words = set(re.split(r"[\W_]+", text.upper())) - {""}
    if words & (_OBLIQUE_POSITIONS if position else _OBLIQUE_WORDS):
        return "oblique"
    if words & (_LATERAL_POSITIONS if position else _LATERAL_WORDS):
        return "lateral"
    if position and words & _FRONTAL_POSITIONS:
        return "frontal"
    return None


def _not_frontal(ds: Dataset) -> str | None:
    """Why the image is not a frontal view of the hand, or None when nothing says so.

    View Position (LL, RL, LLO, RLO, and what sites write: LAT, OBL, LATERAL …) and
    the first coded item of the View Code Sequence (PS3.16 CID 4010) are read, and
    either naming another view than a frontal one refuses the image, whatever the
    other says. Where neither says which view it is, the image's and its series'
    descriptions are read for a lateral or an oblique (not the study's, which names
    every view of the exam).

    An absent, empty or unknown view is not refused: View Position is Type 2 on a CR
    and Type 3 on a DX, many modalities leave it empty or write their own words in it,
    and a bone-age exam is one frontal image of one hand. Refusing the image that says
    nothing would refuse most of them, to keep out the lateral and oblique views of a
    trauma series that do say what they are.
    """
    position = _text(ds.get("ViewPosition")).upper()[:16]  # a CS's length, at most
    said = _view_named(position, position=True)
    if said in ("lateral", "oblique"):
        by = f"ViewPosition {position}" if _quotable(position) else "by its ViewPosition"
        return f"view is {said} ({by}), {_READ_ON_FRONTAL}"
    code = _first_code(ds, "ViewCodeSequence")
    if code is not None:
        scheme, value, meaning = code
        if (scheme, value) in _OTHER_VIEW_MEANINGS:
            meaning = _OTHER_VIEW_MEANINGS[scheme, value]
            return f"view is {meaning} (ViewCodeSequence {scheme} {value}), {_READ_ON_FRONTAL}"
        coded = "frontal" if (scheme, value) in FRONTAL_VIEWS else _view_named(meaning)
        if coded in ("lateral", "oblique"):  # a code of another scheme, its meaning a view
            return f"view is {meaning} (ViewCodeSequence {scheme} {value}), {_READ_ON_FRONTAL}"
        said = said or coded
    if said is None:
        for keyword in _VIEW_DESCRIPTIONS:
            named = _view_named(_text(ds.get(keyword)))
            if named is not None:
                return (
                    f"view is {named} (named by {keyword}; no ViewPosition says which), "
                    f"{_READ_ON_FRONTAL}"
                )
    return None


def _both_hands(ds: Dataset, body_part: BodyPart, shown: str) -> str | None:
    """Why the image shows both hands, or None when nothing says so.

    Image Laterality B, or the series' Laterality B where the image's says no one
    side; and a Body Part Examined of both hands (``HANDS``, ``BOTH HANDS``) unless a
    laterality says L or R, which some sites give each image of a two-hand exam. The
    plural with no side is taken as both hands: the atlas and the model read one
    hand, and a bone age of two, or of whichever the model looked at, is not one.
    """
    image = _text(ds.get("ImageLaterality")).upper()
    series = _text(ds.get("Laterality")).upper()
    if image == "B":
        return f"body part is both hands (ImageLaterality B); {_READ_ON_ONE_HAND}"
    if image not in ("L", "R") and series == "B":
        return f"body part is both hands (Laterality B); {_READ_ON_ONE_HAND}"
    if body_part is BodyPart.HANDS and image not in ("L", "R") and series not in ("L", "R"):
        named = f"is {shown}" if _quotable(shown) else "names both hands"
        return (
            f"body part examined {named}, with no laterality L or R: taken as both "
            f"hands; {_READ_ON_ONE_HAND}"
        )
    return None


def _not_a_radiograph(ds: Dataset, name: str) -> str | None:
    """Why a Secondary Capture is not a radiograph, or None when it may be one.

    An SC is whatever was captured: in a study described "XR HAND BONE AGE" there
    may be the scanned requisition form (SD) and another vendor's AI result (WSD),
    which carry the study's body part and descriptions as the radiograph does. Its
    Conversion Type (Type 1, PS3.3 C.8.6.1) says how it was made: DF, DI, SI and DV
    may be a radiograph's capture (the body part still decides whether of a hand);
    WSD, SD, DRW and SYN are not, nor is a value not among the defined terms, which
    says nothing this gate knows.

    A Conversion Type that may be a radiograph's is not enough: a frame grabbed from an
    ultrasound scanner's video output (DV, Modality US) or a photograph put on a
    scanner (SI, XC) is made the same way. Its Modality (the modality of the image
    captured) must be a radiograph's (CR, DX, RG), OT or empty
    (:data:`SECONDARY_CAPTURE_MODALITIES`); any other (US, XC, ES, XA, MR, CT …)
    refuses it, with its own reason.

    An SC that states no Conversion Type does not conform, and nothing in it says
    how it was made. It is taken for a radiograph's capture only when its Modality
    is CR, DX or RG: a form scanned or a program's result would say OT, DOC, SD or
    nothing. Refusing every such SC would also refuse the captures of hand
    radiographs that some modalities' consoles make without it.
    """
    if str(ds.get("SOPClassUID", "")) not in SECONDARY_CAPTURE_CLASSES:
        return None
    conversion = _text(ds.get("ConversionType")).upper()
    modality = _text(ds.get("Modality")).upper()[:16]  # a CS's length, at most
    if conversion in RADIOGRAPH_CONVERSIONS:
        if modality in SECONDARY_CAPTURE_MODALITIES:
            return None
        named = f" ({MODALITY_NAMES[modality]})" if modality in MODALITY_NAMES else ""
        shown = f"modality {modality}" if _quotable(modality) else "another modality"
        return (
            f"SOP class {name}, conversion type {conversion}, {shown}{named}, "
            "is not a radiograph's capture (its modality would be CR, DX, RG, OT or empty)"
        )
    if conversion in OTHER_CONVERSIONS:
        return (
            f"SOP class {name}, conversion type {conversion} "
            f"({OTHER_CONVERSIONS[conversion]}), is not a radiograph"
        )
    if conversion:
        terms = ", ".join([*RADIOGRAPH_CONVERSIONS, *OTHER_CONVERSIONS])
        return (
            f"SOP class {name}, conversion type not one of PS3.3's ({terms}), "
            "is not known to be a radiograph"
        )
    if modality not in RADIOGRAPH_MODALITIES:
        return (
            f"SOP class {name} states no conversion type and no radiograph modality "
            "(CR, DX, RG): nothing says it is a radiograph"
        )
    return None


def _not_one_hand(ds: Dataset) -> str | None:
    """Why the image is not of one whole hand, or None when it is.

    Body Part Examined decides where it states a part (:func:`body_part_examined`);
    where it does not, the first coded item of the Anatomic Region Sequence, unless
    that codes a region the hand is part of; where neither does, the descriptions, the
    study's included (a film digitiser leaves the series' empty; the forms and other
    programs' pictures filed in a hand study are refused by their Conversion Type
    before, :func:`_not_a_radiograph`). Then both hands on one image are refused
    (:func:`_both_hands`).
    """
    body_part, shown = body_part_examined(ds.get("BodyPartExamined"))
    region = _first_code(ds, "AnatomicRegionSequence")
    quoted = _quotable(shown)
    if not shown.strip("\\"):
        unstated = ["no BodyPartExamined"]
    else:
        unstated = [f"BodyPartExamined is {shown}" if quoted else "BodyPartExamined names no part"]
    if region is not None and region[:2] in GENERIC_REGIONS:
        # the upper limb: the descriptions say whether it is the hand
        unstated.append(f"Anatomic Region Sequence is {region[2]} ({region[0]} {region[1]})")
        region = None
    if body_part is BodyPart.OTHER:
        return f"body part examined is {shown}, not a hand" if quoted else "body part is not a hand"
    if body_part is BodyPart.FINGER:
        named = shown if quoted else "a finger or thumb"
        return f"body part examined is {named}, {_READ_ON_THE_HAND}"
    if body_part is BodyPart.NOT_STATED and region is not None:
        # DX must code it (Type 1, PS3.3 C.8.11.5), where Body Part Examined is Type 3;
        # it outranks the free text of the descriptions.
        scheme, value, meaning = region
        if (scheme, value) in FINGER_REGIONS:
            return (
                f"body part (Anatomic Region Sequence) is {meaning} ({scheme} {value}), "
                f"{_READ_ON_THE_HAND}"
            )
        if (scheme, value) not in HAND_REGIONS:
            return (
                f"body part (Anatomic Region Sequence) is {meaning} ({scheme} {value}), not a hand"
            )
    elif body_part is BodyPart.NOT_STATED:
        text = " ".join(str(ds.get(k, "") or "") for k in _DESCRIPTIONS).upper()
        if not _HAND_WORDS.search(text):
            unstated.append("no hand in the descriptions")
            return f"body part is not stated ({', '.join(unstated)})"
    return _both_hands(ds, body_part, shown)


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

    Refused, in this order, each with its own reason: a SOP class that is not a
    projection radiograph for presentation; one of our own results; a UID the results
    need, or the pixel data, missing; a Secondary Capture that is not a radiograph's
    capture (:func:`_not_a_radiograph`); a body part that is not one whole hand
    (:func:`_not_one_hand`: another part, fingers alone, both hands); a view that is
    not frontal (:func:`_not_frontal`); an image too small, too large
    (:data:`MAX_PIXELS`), too elongated (:data:`MAX_ASPECT_RATIO`), or whose pixels are
    not square (:func:`_not_square`);
    no patient sex; an age outside the model's range.

    Where a value that decides is absent or not standard, the image is refused where
    the ordinary bone-age exam states it and an image that does not may well be
    something else (an SC with no Conversion Type and no radiograph modality; HANDS
    with no laterality L or R); it is not refused where the ordinary exam often leaves
    the value out, so that refusing would turn most of them away (View Position,
    Image Laterality, Body Part Examined: the coded region and the descriptions are
    read instead).

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
    refusal = _not_a_radiograph(ds, name) or _not_one_hand(ds) or _not_frontal(ds)
    if refusal is not None:
        return no(refusal)

    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if min(rows, columns) < min_size:
        return no(f"image is {columns}x{rows} pixels, smaller than {min_size}x{min_size}")
    if rows * columns > MAX_PIXELS:
        return no(
            f"image is {columns}x{rows} pixels, more than {MAX_PIXELS / 1e6:.0f} million; "
            "a hand radiograph is not"
        )
    if max(rows, columns) > MAX_ASPECT_RATIO * min(rows, columns):
        return no(
            f"image is {columns}x{rows} pixels, longer than {MAX_ASPECT_RATIO:g}:1; "
            "a hand radiograph is not"
        )
    not_square = _not_square(ds)
    if not_square is not None:
        return no(not_square)

    if facts.male is None and require_sex:
        sex = _text(ds.get("PatientSex"))
        said = "empty" if not sex else sex if _quotable(sex) else "neither M nor F"
        return no(f"patient sex is {said}; the model needs M or F")

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
