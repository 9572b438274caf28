"""Coded concepts written into the bone-age SR and SC.

Standard codes come from pydicom's code dictionary (generated from DICOM PS3.16)
where it has them; codes it lacks are spelled out with :class:`pydicom.sr.coding.Code`
and the source is cited next to each. Concepts for which no standard code exists
use the private coding scheme :data:`PRIVATE_SCHEME` ("99" prefix, PS3.16 §8.2),
declared in the SR's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import logging

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

logger = logging.getLogger(__name__)

__all__ = [
    "BONE_AGE",
    "BONE_AGE_MINUS_CHRONOLOGICAL_AGE",
    "CHRONOLOGICAL_AGE",
    "COMMENT",
    "DEVICE",
    "HAND",
    "IMAGING_PROCEDURE",
    "LEFT",
    "NOT_EVALUATED",
    "PRIVATE_SCHEME",
    "RIGHT",
    "SDS",
    "UCUM_MONTH",
    "UCUM_SDS",
    "coding_scheme_identification",
    "laterality_code",
    "prediction_interval_bound",
]

#: Private coding scheme designator of this node (PS3.16 §8.2: private schemes start "99").
PRIVATE_SCHEME = "99BONEAGE"
_PRIVATE_SCHEME_NAME = "boneage-worker local codes"
_PRIVATE_SCHEME_ORGANIZATION = "boneage-worker"

# LOINC 85151-9 "Bone age" (loinc.org/85151-9, class RAD); not in pydicom's dictionary.
BONE_AGE = Code("85151-9", "LN", "Bone age")
# DCM 121033 "Subject Age" (PS3.16 Annex D; the concept TID 1007 uses for the age at the study).
CHRONOLOGICAL_AGE: Code = codes.DCM.SubjectAge
# No standard code for the bone age - chronological age difference: private code.
BONE_AGE_MINUS_CHRONOLOGICAL_AGE = Code("BA-CA", PRIVATE_SCHEME, "Bone age minus chronological age")
# DCM 121416 "Z-Score of measurement" (PS3.16 CID 227, sample statistical descriptors):
# the bone-age SDS is the z-score of the bone age within its age- and sex-matched population.
SDS: Code = codes.DCM.ZScoreOfMeasurement
# DCM 121106 "Comment" (PS3.16 Annex D), free-text remarks such as the untrained notice.
COMMENT: Code = codes.DCM.Comment
# SCT 363679005 "Imaging procedure" (PS3.16 CID 100), the procedure reported.
IMAGING_PROCEDURE: Code = codes.SCT.ImagingProcedure
# DCM 121007 "Device" (PS3.16 CID 270), observer type of the device observer context.
DEVICE: Code = codes.DCM.Device
# SCT 85562004 "Hand" (PS3.16 CID 4031), the finding site.
HAND: Code = codes.SCT.Hand
# SCT 7771000 "Left", 24028007 "Right" (PS3.16 CID 244 Laterality).
LEFT: Code = codes.SCT.Left
RIGHT: Code = codes.SCT.Right
# SCT 373121007 "Not Evaluated" (SNOMED CT qualifier, in pydicom's dictionary), for
# images we did not assess.
NOT_EVALUATED: Code = codes.SCT.NotEvaluated
# UCUM "mo" (month); UCUM "{SDS}" is an annotation of the unity unit "1" (UCUM §2.5).
UCUM_MONTH: Code = codes.UCUM.Month
UCUM_SDS = Code("{SDS}", "UCUM", "standard deviation score")


def laterality_code(laterality: str | None) -> Code | None:
    """Return the SNOMED CT laterality code for ``"L"``/``"R"``.

    Parameters
    ----------
    laterality : str or None
        ``"L"``, ``"R"`` or None.

    Returns
    -------
    pydicom.sr.coding.Code or None
        :data:`LEFT`, :data:`RIGHT` or None.

    Raises
    ------
    ValueError
        When ``laterality`` is anything else.
    """
    if laterality is None:
        return None
    if laterality == "L":
        return LEFT
    if laterality == "R":
        return RIGHT
    raise ValueError(f'Argument "laterality" must be "L", "R" or None, got {laterality!r}.')


def prediction_interval_bound(level: float, bound: str) -> Code:
    """Return the private code for one bound of a bone-age prediction interval.

    Parameters
    ----------
    level : float
        Coverage level in (0, 1), for example 0.9.
    bound : str
        ``"lower"`` or ``"upper"``.

    Returns
    -------
    pydicom.sr.coding.Code
        For example ``(PI90-LO, 99BONEAGE, "Bone age 90% prediction interval lower bound")``.

    Raises
    ------
    ValueError
        When ``level`` is outside (0, 1) or ``bound`` is not lower/upper.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f'Argument "level" must lie in (0, 1), got {level}.')
    if bound not in ("lower", "upper"):
        raise ValueError(f'Argument "bound" must be "lower" or "upper", got {bound!r}.')
    percent = f"{level * 100:.4g}"
    suffix = "LO" if bound == "lower" else "HI"
    # Code Value is SH: at most 16 characters (PS3.5 Table 6.2-1).
    value = f"PI{percent.replace('.', '_')}-{suffix}"[:16]
    return Code(value, PRIVATE_SCHEME, f"Bone age {percent}% prediction interval {bound} bound")


def coding_scheme_identification() -> list[CodingSchemeIdentificationItem]:
    """Items of the Coding Scheme Identification Sequence (SOP Common) for our private scheme.

    Returns
    -------
    list of highdicom.CodingSchemeIdentificationItem
        The declaration of :data:`PRIVATE_SCHEME`.
    """
    return [
        CodingSchemeIdentificationItem(
            designator=PRIVATE_SCHEME,
            name=_PRIVATE_SCHEME_NAME,
            responsible_organization=_PRIVATE_SCHEME_ORGANIZATION,
        )
    ]
