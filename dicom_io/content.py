"""Plain values that the SR and SC builders turn into DICOM objects.

The builders take a :class:`BoneAgeFinding` (numbers and strings only) so that
``dicom_io`` never sees model or database objects.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "AI_RESULT_NOTICE",
    "BODY_PART_DEFINED_TERMS",
    "CODE_STRING",
    "DEFAULT_SDS_REFERENCE",
    "MANUFACTURER",
    "UNTRAINED_WARNING",
    "BoneAgeFinding",
    "body_part_to_write",
    "check_positive_int",
    "check_uid",
    "format_age",
    "format_sds",
    "image_side",
    "side_in_body_part",
]

#: Reference population named next to every SDS value.
DEFAULT_SDS_REFERENCE = "Greulich-Pyle atlas (Brush Foundation) standard deviations"
#: Said on every output made by a model that was never trained.
#: Manufacturer written into every object we create; the gate refuses such objects.
MANUFACTURER = "boneage-worker"
UNTRAINED_WARNING = "UNTRAINED MODEL - NOT FOR CLINICAL USE"
#: Said on every output: the result is machine-made and unreviewed.
AI_RESULT_NOTICE = "AI result - requires review"
#: Said in an SR that replaces earlier ones (its Predecessor Documents): why it does.
REPLACES_NOTICE = (
    "Replaces the earlier report on this image: the image was received again with other "
    "patient, study or image values, and assessed again"
)
#: Said in an SR reporting an image received again as not assessed, which replaces the
#: earlier reports of a bone age.
REPLACED_NOT_ASSESSED_NOTICE = (
    "Replaces the earlier report on this image: the image was received again and is not "
    "assessed this time; the earlier bone age no longer stands"
)

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# PS3.5 §9.1: dot-separated numeric components without leading zeros, at most 64 chars
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LATERALITIES = ("L", "R")
#: What a finding may say the network's trunk computed in (BONEAGE_PRECISION, less "auto").
TRUNK_PRECISIONS = ("float32", "bfloat16", "float16")


def _check_finite(name: str, value: object, *, optional: bool) -> None:
    if value is None:
        if optional:
            return
        raise TypeError(f'Argument "{name}" must be a number, not None.')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'Argument "{name}" must be a number, not {type(value).__name__}.')
    if not math.isfinite(value):
        raise ValueError(f'Argument "{name}" must be finite, got {value!r}.')


@dataclass(frozen=True, kw_only=True)
class BoneAgeFinding:
    """One bone-age assessment of one radiograph, as plain values (keyword-only).

    Parameters
    ----------
    bone_age_months : float
        Estimated bone age in months (non-negative).
    chronological_age_months : float or None
        Chronological age at the study in months, or None when unknown.
    sds : float or None
        Bone-age standard deviation score,
        (bone age - chronological age) / SD(chronological age, sex).
    intervals : Mapping[float, tuple[float, float]]
        Prediction intervals: coverage level in (0, 1) (for example 0.9) to
        ``(low, high)`` bone age in months. May be empty.
    model_id : str
        SHA-256 of the checkpoint file, 64 hex digits (stored lower-case).
    model_name : str
        Human-readable model (algorithm) name.
    model_version : str
        Model version.
    model_trained : bool
        False for a model that was never trained; every output then says
        :data:`UNTRAINED_WARNING`.
    laterality : str or None
        ``"L"``, ``"R"`` or None (unknown) for the hand imaged.
    notes : tuple of str
        Caveats the reader must see (for example an assumed patient sex); shown in
        the SR as comments and burned into the SC.
    sds_reference : str
        Reference population of the SDS, named next to it.
    precision : str
        What the network's trunk computed in (``"float32"``, ``"bfloat16"``,
        ``"float16"``); written into the SR's algorithm parameters.

    Raises
    ------
    TypeError
        When a field has the wrong type.
    ValueError
        When a field has an impossible value.
    """

    bone_age_months: float
    chronological_age_months: float | None
    sds: float | None
    model_id: str
    model_name: str
    model_version: str
    model_trained: bool
    intervals: Mapping[float, tuple[float, float]] = field(default_factory=dict)
    laterality: str | None = None
    notes: tuple[str, ...] = ()
    sds_reference: str = DEFAULT_SDS_REFERENCE
    precision: str = "float32"

    def __post_init__(self) -> None:
        _check_finite("bone_age_months", self.bone_age_months, optional=False)
        if self.bone_age_months < 0:
            raise ValueError(
                f'Argument "bone_age_months" must not be negative, got {self.bone_age_months}.'
            )
        _check_finite("chronological_age_months", self.chronological_age_months, optional=True)
        if self.chronological_age_months is not None and self.chronological_age_months < 0:
            raise ValueError(
                'Argument "chronological_age_months" must not be negative, '
                f"got {self.chronological_age_months}."
            )
        _check_finite("sds", self.sds, optional=True)
        if not isinstance(self.intervals, Mapping):
            raise TypeError('Argument "intervals" must be a mapping of level to (low, high).')
        frozen: dict[float, tuple[float, float]] = {}
        for level, bounds in sorted(self.intervals.items()):
            _check_finite("intervals level", level, optional=False)
            if not 0.0 < float(level) < 1.0:
                raise ValueError(
                    f'Argument "intervals" has level {level}; levels must lie in (0, 1).'
                )
            if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
                raise TypeError(
                    f'Argument "intervals" at level {level} must be a (low, high) pair.'
                )
            low, high = bounds
            _check_finite("intervals low bound", low, optional=False)
            _check_finite("intervals high bound", high, optional=False)
            if low > high:
                raise ValueError(
                    f'Argument "intervals" at level {level} has low {low} above high {high}.'
                )
            frozen[float(level)] = (float(low), float(high))
        object.__setattr__(self, "intervals", MappingProxyType(frozen))
        if isinstance(self.model_id, str):
            object.__setattr__(self, "model_id", self.model_id.lower())
        if not isinstance(self.model_id, str) or not _SHA256_RE.match(self.model_id):
            raise ValueError('Argument "model_id" must be a SHA-256 hex digest (64 hex digits).')
        if self.precision not in TRUNK_PRECISIONS:
            raise ValueError(
                f'Argument "precision" must be one of {", ".join(TRUNK_PRECISIONS)}, '
                f"got {self.precision!r}."
            )
        for name in ("model_name", "model_version", "sds_reference"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f'Argument "{name}" must be a non-empty string.')
        if not isinstance(self.model_trained, bool):
            raise TypeError('Argument "model_trained" must be a bool.')
        if self.laterality is not None and self.laterality not in _LATERALITIES:
            raise ValueError(
                f'Argument "laterality" must be "L", "R" or None, got {self.laterality!r}.'
            )

    @property
    def bone_age_minus_chronological_age_months(self) -> float | None:
        """float or None: bone age minus chronological age, None when age unknown."""
        if self.chronological_age_months is None:
            return None
        return self.bone_age_months - self.chronological_age_months

    def summary_lines(self) -> list[str]:
        """Human-readable lines of the result, as burned into the SC and the SR comment.

        Returns
        -------
        list of str
            Result lines, most important first; untrained and review notices included.
        """
        lines = [f"Bone age: {format_age(self.bone_age_months)}"]
        if self.chronological_age_months is not None:
            lines.append(f"Chronological age: {format_age(self.chronological_age_months)}")
        if self.sds is not None:
            lines.append(f"SDS: {format_sds(self.sds)} (Greulich-Pyle)")
        if self.intervals:
            level = 0.9 if 0.9 in self.intervals else max(self.intervals)
            low, high = self.intervals[level]
            lines.append(
                f"{round(level * 100):d}% interval: {format_age(low)} - {format_age(high)}"
            )
        lines.extend(self.notes)
        lines.append(f"Model: {self.model_name} {self.model_version} ({self.model_id[:12]})")
        lines.append(AI_RESULT_NOTICE)
        if not self.model_trained:
            lines.append(UNTRAINED_WARNING)
        return lines


def format_age(months: float) -> str:
    """Format an age in months as years and months, e.g. ``"10 y 4 mo"``.

    Parameters
    ----------
    months : float
        Age in months; rounded to the nearest whole month.

    Returns
    -------
    str
        ``"<years> y <months> mo"``; a leading minus sign for negative values.

    Raises
    ------
    TypeError
        When ``months`` is not a number.
    ValueError
        When ``months`` is not finite.
    """
    _check_finite("months", months, optional=False)
    total = round(abs(float(months)))
    years, rest = divmod(total, 12)
    sign = "-" if months < 0 and total else ""
    return f"{sign}{years} y {rest} mo"


def format_sds(sds: float) -> str:
    """Format a standard deviation score with sign and two decimals, e.g. ``"+1.25"``.

    Parameters
    ----------
    sds : float
        Standard deviation score.

    Returns
    -------
    str
        The signed value.
    """
    _check_finite("sds", sds, optional=False)
    return f"{sds:+.2f}"


def check_uid(name: str, value: object) -> str:
    """Return ``value`` when it is a valid UID string, else raise naming ``name``.

    Parameters
    ----------
    name : str
        Argument name used in the error message.
    value : object
        The value to check.

    Returns
    -------
    str
        ``value`` unchanged.

    Raises
    ------
    TypeError
        When ``value`` is not a string.
    ValueError
        When ``value`` is not a valid UID (PS3.5 §9.1).
    """
    if not isinstance(value, str):
        raise TypeError(f'Argument "{name}" must be a UID string, not {type(value).__name__}.')
    if len(value) > 64 or not _UID_RE.match(value):
        raise ValueError(f'Argument "{name}" is not a valid UID: {value!r}.')
    return value


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` when it is a positive int, else raise naming ``name``.

    Parameters
    ----------
    name : str
        Argument name used in the error message.
    value : object
        The value to check.

    Returns
    -------
    int
        ``value`` unchanged.

    Raises
    ------
    TypeError
        When ``value`` is not an int (bool is refused).
    ValueError
        When ``value`` is below 1.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'Argument "{name}" must be an int, not {type(value).__name__}.')
    if value < 1:
        raise ValueError(f'Argument "{name}" must be positive, got {value}.')
    return value


# The Defined Terms of Body Part Examined (0018,0015): PS3.16 Annex L, Table L-1
# "Correspondence of Anatomic Region Codes and Body Part Examined Defined Terms" (to which
# PS3.3 C.7.3.1 points), as highdicom 0.28 ships the table (anatomic_regions.json). The
# dciodvfy of dicom3tools 2022 knows an older list: a term added since (ABDOMINALAORTA,
# UPPERLIMB ...) gets its warning "Unrecognized defined term", never an error.
_BODY_PART_TABLE = """
3RDVENTRICLE 4THVENTRICLE ABDOMEN ABDOMENPELVIS ABDOMINALAORTA ACA ACJOINT ADRENAL
AMNIOTICFLUID ANKLE ANTCARDIACV ANTCOMMA ANTECUBITALV ANTSPINALA ANTTIBIALA
ANUSRECTUMSIGMD AORTA AORTICARCH APPENDIX ARTERY ASCAORTA ASCENDINGCOLON AXILLA
AXILLARYA AXILLARYV AZYGOSVEIN BACK BASILARA BILEDUCT BILIARYTRACT BLADDER
BLADDERURETHRA BRACHIALA BRACHIALV BRAIN BREAST BRONCHUS BULB BUTTOCK CALCANEUS CALF
CARDIOVASCSYS CAROTID CCA CELIACA CEPHALICV CEREBELLUM CEREBHEMISPHERE CEREBRALA CERVIX
CFA CFV CHEEK CHEST CHESTABDOMEN CHESTABDPELVIS CHOROIDPLEXUS CIRCLEOFWILLIS CLAVICLE
COCCYX COLON COMILIACA COMILIACV COMMONBILEDUCT CORNEA CORONARYARTERY CORONARYSINUS
CSPINE CTSPINE CULDESAC DESCAORTA DESCENDINGCOLON DUODENUM EAC EAR ECA ELBOW
ENDOARTERIAL ENDOCARDIAC ENDOESOPHAGEAL ENDOMETRIUM ENDONASAL ENDONASOPHARYNYX
ENDORECTAL ENDORENAL ENDOURETERIC ENDOURETHRAL ENDOVAGINAL ENDOVASCULAR ENDOVENOUS
ENDOVESICAL EPIDIDYMIS EPIGASTRIC ESOPHAGUS EXTILIACA EXTILIACV EXTJUGV EXTREMITY EYE
EYELID FACE FACIALA FEMORALA FEMORALV FEMUR FIBULA FINGER FLANK FONTANEL FOOT FOREARM
GALLBLADDER GASTRICV GENICULARA GESTSAC GLUTEAL GSV HAND HEAD HEADNECK HEART HEPATICA
HEPATICV HIP HUMERUS HYPOGASTRIC HYPOPHARYNX IAC ICA ILEUM ILIACA ILIACV ILIUM INFMESA
INFVENACAVA INGUINAL INNOMINATEA INNOMINATEV INTILIACA INTJUGULARV INTMAMMARYA
INTRACRANIAL JAW JEJUNUM JOINT KIDNEY KNEE LACRIMALA LARGEINTESTINE LARYNX LATRIUM
LATVENTRICLE LFEMORALA LHEPATICV LHYPOCHONDRIAC LINGUALA LINGUINAL LIVER LLQ LLUMBAR
LOWERLEG LOWERLIMB LOWERTRUNK LPORTALV LPULMONARYA LSPINE LSSPINE LSUPPULMONARYV LUMBAR
LUMBARA LUMEN LUNG LUQ LVENTRICLE MANDIBLE MASTOID MAXILLA MCA MEDIASTINUM MESENTRICA
MESENTRICV MIDHEPATICV MORISONSPOUCH MOUTH NASOPHARYNX NECK NECKCHEST NECKCHESTABDOMEN
NECKCHESTABDPELV NOSE OCCIPTALV OCCPITALA OPHTHALMICA OPTICCANAL ORBIT OVARY
PANCBILEDUCT PANCREAS PANCREATICDUCT PARASTERNAL PARATHYROID PAROTID PATELLA PCA PELVIS
PELVISLOWEXTREMT PENILEA PENIS PERINEUM PERONEALA PHANTOM PHARYNX PHARYNXLARYNX PLACENTA
POPLITEALA POPLITEALFOSSA POPLITEALV PORTALV POSCOMMA POSTIBIALA PROFFEMA PROFFEMV
PROSTATE PULMONARYA PULMONARYV RADIALA RADIUS RADIUSULNA RATRIUM RECTUM RENALA RENALV
RETROPERITONEUM RFEMORALA RHEPATICV RHYPOCHONDRIAC RIB RINGUINAL RLQ RLUMBAR RPORTALV
RPULMONARYA RSUPPULMONARYV RUQ RVENTRICLE SAPHENOUSV SCALP SCAPULA SCJOINT SCLERA
SCROTUM SELLA SEMVESICLE SESAMOID SFA SFJ SFV SHOULDER SIGMOID SIJOINT SKULL SMA
SMALLINTESTINE SPINALCORD SPINE SPLEEN SPLENICA SPLENICV SSPINE STERNUM STOMACH
SUBCLAVIANA SUBCLAVIANV SUBCOSTAL SUBMANDIBULAR SUPRACLAVICULAR SUPRAPUBIC SUPTHYROIDA
SVC TESTIS THALAMUS THIGH THORACICAORTA THORAX THUMB THYMUS THYROID TIBIA TIBIAFIBULA
TLSPINE TMJ TOE TONGUE TRACHEA TRACHEABRONCHUS TRANSVERSECOLON TRUNK TSPINE ULNA ULNARA
UMBILICAL UMBILICALA UMBILICALV UPPERARM UPPERLIMB UPPERTRUNK UPRURINARYTRACT URETER
URETHRA UTERUS VAGINA VEIN VERTEBRALA VULVA WHOLEBODY WRIST ZYGOMA
"""
#: The Defined Terms of Body Part Examined (PS3.16 Annex L, Table L-1).
BODY_PART_DEFINED_TERMS = frozenset(_BODY_PART_TABLE.split())
#: A Code String value (PS3.5 6.2): upper case letters, digits, space and underscore,
#: 16 at most.
CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")
#: Words that name a side beside a body part, as some modalities write it (``RT-HAND``,
#: ``HAND_LT``), and the side each names.
_SIDE_WORDS = {"LT": "L", "LEFT": "L", "RT": "R", "RIGHT": "R"}
#: ``L`` and ``R`` alone name a side only beside these parts (``L HAND``, ``WRIST R``):
#: the hand's Defined Terms among the values the gate admits (`dicom_io.gate`), which
#: admits hands only. Beside another part a letter may be part of its name: ``L SPINE``
#: is the lumbar spine.
_SIDE_LETTERS = {"L": "L", "R": "R"}
_LETTERED_PARTS = frozenset({"HAND", "WRIST"})


def body_part_to_write(value: object, *, laterality: str | None) -> str | None:
    """The Body Part Examined (0018,0015) an object of ours carries for an image whose
    value is ``value``: a Defined Term (:data:`BODY_PART_DEFINED_TERMS`) or nothing.

    Body Part Examined is Type 3 in the General Series module of the Secondary Capture
    Image IOD (PS3.3 C.7.3.1), and no module of the Comprehensive SR or Key Object
    Selection Document IODs has it (their series modules are SR Document Series and Key
    Object Document Series): only a heat map and a withdrawal notice carry it, and they
    may leave it out. A value copied as a modality sent it fails dciodvfy where it is no
    Code String (``RT-HAND``: "Character invalid for this VR"; ``hand``), and says
    nothing a hanging protocol can match where it is no Defined Term.

    Parameters
    ----------
    value
        Body Part Examined as pydicom reads it from the image: a string, a multi-value
        (VM is 1: none is written), None, or anything else (none is written).
    laterality : str or None
        The side the object states elsewhere (the SC's Laterality, the SR's finding
        site): ``"L"``, ``"R"``, or None where it states none.

    Returns
    -------
    str or None
        A Defined Term as it is (``HAND``); one written in lower case or with spaces
        around it, upper-cased and stripped (``hand``, ``Hand `` -> ``HAND``); a Defined
        Term with a side word before or after it (``RT-HAND``, ``LEFT HAND``,
        ``HAND_LT``; the letter ``L`` or ``R`` only beside ``HAND`` or ``WRIST``: ``L
        HAND``, ``HAND R``) as the term alone, but only where ``laterality`` names that
        same side, so that the side is not lost; else None, nothing written: no other
        value is mapped to a term (``HANDS``, ``CARPUS``, ``L SPINE``, ``RT-HAND`` or
        ``R HAND`` of an image whose side is unknown or is L).
    """
    if not isinstance(value, str):
        return None
    if value in BODY_PART_DEFINED_TERMS:
        return value
    text = value.strip().upper()
    if text in BODY_PART_DEFINED_TERMS:
        return text
    if laterality not in _LATERALITIES:
        return None  # a side dropped would be a side lost
    parsed = _term_and_side(text)
    return parsed[0] if parsed is not None and parsed[1] == laterality else None


def side_in_body_part(value: object) -> str | None:
    """The side a Body Part Examined value names beside a Defined Term: ``"R"`` of
    ``RT-HAND``, ``RIGHT HAND``, ``HAND R``; ``"L"`` of ``HAND_LT``, ``L WRIST``.

    The same values as :func:`body_part_to_write` writes as the term alone where the
    object's Laterality states that side: a side word before or after a Defined Term, the
    letter ``L`` or ``R`` only beside ``HAND`` or ``WRIST``.

    Parameters
    ----------
    value
        Body Part Examined as pydicom reads it from the image.

    Returns
    -------
    str or None
        ``"L"`` or ``"R"``; None where the value names no side so (``HAND``, ``HANDS``,
        ``L SPINE``, ``RT-HAND-LT``, ``LT-FOO``), or is no string.
    """
    if not isinstance(value, str):
        return None
    parsed = _term_and_side(value.strip().upper())
    return parsed[1] if parsed is not None else None


#: Image Laterality (Laterality) values that state no side of a hand: absent, empty, or
#: ``U`` (unpaired), which DX modalities write where Image Laterality, Type 1 there, is
#: not known.
_NO_SIDE_STATED = frozenset(("", "U"))


def image_side(source: Dataset) -> str | None:
    """The side of the hand ``source`` shows, as our SC's Laterality and our SR's finding
    site state it where the finding names none (the SR and the SC of an image agree).

    Its Image Laterality, else its Laterality, where one says ``L`` or ``R``; where
    neither states a side (each absent, empty or ``U``), the side its Body Part Examined
    names beside a Defined Term (``RT-HAND``: ``R``, and the heat map's Body Part
    Examined is then ``HAND``: :func:`side_in_body_part`), which would else be stated
    nowhere in the heat map. None where the image states no side, or another value
    (``B``, both hands; a value no standard has): no side is taken from a body part that
    another attribute contradicts. ``L`` with ``RT-HAND`` is ``L``, and the heat map
    carries no Body Part Examined (:func:`body_part_to_write`). An Image Laterality that
    states anything (not absent, empty or ``U``) decides alone: ``B`` with a Laterality
    ``L`` is no side, not the series' side for an image of both hands.

    The side the gate reads too (``dicom_io.gate.PatientFacts.laterality``), which the
    digest of an assessment's inputs is made of: a side corrected in the body part alone
    (``RT-HAND`` sent again as ``LT-HAND``) changes the side our objects state, and the
    image is assessed again.
    """
    for keyword in ("ImageLaterality", "Laterality"):
        stated = str(source.get(keyword) or "").strip().upper()
        if stated in _LATERALITIES:
            return stated
        if stated not in _NO_SIDE_STATED:
            return None
    return side_in_body_part(source.get("BodyPartExamined"))


def _term_and_side(text: str) -> tuple[str, str] | None:
    """(Defined Term, side) of an upper-case value of two words, a side word and a
    Defined Term in either order (``RT-HAND``: ``("HAND", "R")``); else None. No side
    word is a Defined Term, so at most one order matches."""
    words = [w for w in re.split(r"[\s_-]+", text) if w]
    if len(words) != 2:
        return None
    first, second = words
    for side, part in ((first, second), (second, first)):
        named = _SIDE_WORDS.get(side)
        if named is None and part in _LETTERED_PARTS:
            named = _SIDE_LETTERS.get(side)
        if named is not None and part in BODY_PART_DEFINED_TERMS:
            return part, named
    return None
