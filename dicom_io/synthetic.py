"""Synthetic but standard-conformant radiograph datasets for the demo and the tests.

:func:`make_radiograph_dataset` wraps a pixel array in a DX (Digital X-Ray Image Storage -
For Presentation), CR (Computed Radiography Image Storage) or CT (CT Image Storage,
for "not a hand" tests) dataset with file meta and Explicit VR Little Endian, that
``dciodvfy`` accepts without errors.
"""

from __future__ import annotations

import datetime
import logging

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

logger = logging.getLogger(__name__)

__all__ = ["make_radiograph_dataset"]

_SOP_CLASSES = {
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
    "CT": CTImageStorage,
}
_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")
_SEXES = ("M", "F", "O")
_LATERALITIES = ("L", "R")
# Body Part Examined values of paired parts (PS3.16 Annex L): General Series Laterality
# is Type 2C for these and must be absent for the others.
_PAIRED_PARTS = frozenset(
    {
        "HAND",
        "WRIST",
        "FINGER",
        "THUMB",
        "FOREARM",
        "ELBOW",
        "ARM",
        "UPRARM",
        "SHOULDER",
        "CLAVICLE",
        "SCAPULA",
        "HIP",
        "THIGH",
        "FEMUR",
        "KNEE",
        "LEG",
        "LOWERLEG",
        "ANKLE",
        "FOOT",
        "TOE",
        "HEEL",
        "BREAST",
        "EAR",
        "EYE",
        "KIDNEY",
        "LUNG",
    }
)


def _stored_pixels(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    """Validate ``pixels`` and return them as stored values (uint8 or uint16)."""
    if not isinstance(pixels, np.ndarray):
        raise TypeError(f'Argument "pixels" must be a numpy array, not {type(pixels).__name__}.')
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise ValueError(f'Argument "pixels" must be a non-empty (H, W) array, got {pixels.shape}.')
    max_value = (1 << bits_stored) - 1
    if np.issubdtype(pixels.dtype, np.floating):
        if not np.all(np.isfinite(pixels)) or pixels.min() < 0.0 or pixels.max() > 1.0:
            raise ValueError('Argument "pixels" of floating type must lie in [0, 1].')
        stored = np.rint(pixels.astype(np.float64) * max_value)
    elif np.issubdtype(pixels.dtype, np.unsignedinteger) or np.issubdtype(pixels.dtype, np.integer):
        if pixels.min() < 0 or pixels.max() > max_value:
            raise ValueError(
                f'Argument "pixels" has values outside [0, {max_value}] '
                f"for bits_stored={bits_stored}."
            )
        stored = pixels
    else:
        raise TypeError(f'Argument "pixels" must be unsigned integer or float, not {pixels.dtype}.')
    dtype = np.uint8 if bits_stored <= 8 else np.uint16
    return np.ascontiguousarray(stored, dtype=dtype)


def _age_string(birth_date: datetime.date, study_date: datetime.date) -> str:
    """Patient's Age (AS) at the study, in months below 2 years and years above."""
    months = (study_date.year - birth_date.year) * 12 + study_date.month - birth_date.month
    if study_date.day < birth_date.day:
        months -= 1
    months = max(months, 0)
    if months < 24:
        return f"{months:03d}M"
    return f"{months // 12:03d}Y"


def make_radiograph_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "DX",
    sex: str | None = "M",
    birth_date: datetime.date | None,
    study_date: datetime.date,
    body_part: str = "HAND",
    laterality: str | None = "L",
    photometric: str = "MONOCHROME2",
    patient_name: str = "PHANTOM^HAND",
    patient_id: str = "PHANTOM001",
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    bits_stored: int = 12,
    pixel_spacing_mm: float = 0.1,
) -> Dataset:
    """Build a conformant DX, CR or CT image dataset around ``pixels``.

    Parameters
    ----------
    pixels : numpy.ndarray
        (H, W) image: unsigned integers already within ``bits_stored`` bits, or
        floats in [0, 1] scaled to the full stored range. Values follow
        ``photometric`` (for MONOCHROME1, bone is dark).
    modality : str
        ``"DX"``, ``"CR"`` or ``"CT"``.
    sex : str or None
        Patient's Sex ``"M"``, ``"F"``, ``"O"``; None leaves it empty (Type 2).
    birth_date : datetime.date or None
        Patient's Birth Date; None leaves it empty.
    study_date : datetime.date
        Study, series, acquisition and content date.
    body_part : str
        Body Part Examined (CS), for example ``"HAND"``.
    laterality : str or None
        Image Laterality ``"L"``/``"R"``; None writes ``"U"`` (unpaired/unknown) for DX.
    photometric : str
        ``"MONOCHROME2"`` or ``"MONOCHROME1"``.
    patient_name, patient_id : str
        Patient identification.
    study_instance_uid, sop_instance_uid : str or None
        UIDs to use; new ones are generated when None.
    bits_stored : int
        Bits Stored, 8 to 16; Bits Allocated is 8 up to 8 bits stored, else 16.
    pixel_spacing_mm : float
        Imager Pixel Spacing (DX/CR) or Pixel Spacing (CT) in mm.

    Returns
    -------
    pydicom.Dataset
        A dataset with file meta (Explicit VR Little Endian), ready for
        ``save_as(path, enforce_file_format=True)``.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When an argument has an impossible value.
    """
    modality = modality.upper() if isinstance(modality, str) else modality
    if modality not in _SOP_CLASSES:
        raise ValueError(f'Argument "modality" must be one of DX, CR, CT, got {modality!r}.')
    if photometric not in _PHOTOMETRICS:
        raise ValueError(
            f'Argument "photometric" must be MONOCHROME1 or MONOCHROME2, got {photometric!r}.'
        )
    if sex is not None and sex not in _SEXES:
        raise ValueError(f'Argument "sex" must be "M", "F", "O" or None, got {sex!r}.')
    if laterality is not None and laterality not in _LATERALITIES:
        raise ValueError(f'Argument "laterality" must be "L", "R" or None, got {laterality!r}.')
    if not isinstance(study_date, datetime.date):
        raise TypeError('Argument "study_date" must be a datetime.date.')
    if birth_date is not None and not isinstance(birth_date, datetime.date):
        raise TypeError('Argument "birth_date" must be a datetime.date or None.')
    if birth_date is not None and birth_date > study_date:
        raise ValueError('Argument "birth_date" must not be after "study_date".')
    if isinstance(bits_stored, bool) or not isinstance(bits_stored, int):
        raise TypeError('Argument "bits_stored" must be an int.')
    if not 8 <= bits_stored <= 16:
        raise ValueError(f'Argument "bits_stored" must be 8 to 16, got {bits_stored}.')
    if modality == "CT" and bits_stored <= 8:
        raise ValueError('Argument "bits_stored" must be above 8 for CT (Bits Allocated 16).')
    if not pixel_spacing_mm > 0:
        raise ValueError('Argument "pixel_spacing_mm" must be positive.')
    stored = _stored_pixels(pixels, bits_stored)
    bits_allocated = 8 if bits_stored <= 8 else 16

    sop_class_uid = _SOP_CLASSES[modality]
    sop_instance_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    study_instance_uid = UID(study_instance_uid) if study_instance_uid else generate_uid()
    date = study_date.strftime("%Y%m%d")
    time = "101500"

    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date.strftime("%Y%m%d") if birth_date else ""
    ds.PatientSex = sex or ""
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "XR HAND FOR BONE AGE" if modality != "CT" else "CT"
    # Patient Study
    if birth_date is not None:
        ds.PatientAge = _age_string(birth_date, study_date)
    # General Series (+ DX / CR Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.BodyPartExamined = body_part
    # General Equipment
    ds.Manufacturer = "boneage-worker synthetic"
    ds.InstitutionName = "PHANTOM HOSPITAL"
    # General Image / General Acquisition
    ds.InstanceNumber = 1
    ds.ContentDate = date
    ds.ContentTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.AcquisitionNumber = 1
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(n) for n in stored.shape)
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.tobytes()

    if modality == "DX":
        _fill_dx(ds, stored, laterality, pixel_spacing_mm)
    elif modality == "CR":
        _fill_cr(ds, laterality, pixel_spacing_mm)
    else:
        _fill_ct(ds, laterality, pixel_spacing_mm)

    # File Meta Information (PS3.10)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    logger.debug("built synthetic %s dataset %dx%d", modality, ds.Rows, ds.Columns)
    return ds


def _window_from_pixels(stored: np.ndarray) -> tuple[float, float]:
    """A window that spans the 1st to 99th percentile of the stored values."""
    low, high = np.percentile(stored[:: max(1, stored.shape[0] // 256)], [1.0, 99.0])
    width = max(float(high - low), 2.0)
    return float(low + high) / 2.0, width


def _fill_dx(ds: Dataset, stored: np.ndarray, laterality: str | None, spacing: float) -> None:
    """DX Series, DX Anatomy Imaged, DX Image, DX Detector, VOI LUT, Acquisition Context."""
    # DX Series
    ds.PresentationIntentType = "FOR PRESENTATION"
    # DX Anatomy Imaged
    ds.ImageLaterality = laterality or "U"
    region = Dataset()
    # SCT 85562004 "Hand" (PS3.16 CID 4009 DX Anatomy Imaged)
    region.CodeValue = "85562004"
    region.CodingSchemeDesignator = "SCT"
    region.CodeMeaning = "Hand"
    ds.AnatomicRegionSequence = [region]
    # General Image (DX: Patient Orientation Type 1C when no Image Orientation)
    ds.PatientOrientation = ["A", "F"] if laterality != "R" else ["P", "F"]
    # DX Positioning
    ds.PositionerType = "COLUMN"
    ds.ViewPosition = "PA"
    view = Dataset()
    # SCT 272479007 "postero-anterior" (PS3.16 CID 4010 DX View)
    view.CodeValue = "272479007"
    view.CodingSchemeDesignator = "SCT"
    view.CodeMeaning = "postero-anterior"
    ds.ViewCodeSequence = [view]
    # DX Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.PresentationLUTShape = (
        "IDENTITY" if ds.PhotometricInterpretation == "MONOCHROME2" else ("INVERSE")
    )
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    # VOI LUT (Type 1C for FOR PRESENTATION)
    center, width = _window_from_pixels(stored)
    ds.WindowCenter = f"{center:.1f}"
    ds.WindowWidth = f"{width:.1f}"
    # DX Detector
    ds.DetectorType = "SCINTILLATOR"
    ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    # Acquisition Context
    ds.AcquisitionContextSequence = []


def _series_laterality(ds: Dataset, laterality: str | None) -> None:
    """General Series: Laterality is Type 2C, present (maybe empty) only for paired parts."""
    if str(ds.get("BodyPartExamined", "")).upper() in _PAIRED_PARTS:
        ds.Laterality = laterality or ""


def _fill_cr(ds: Dataset, laterality: str | None, spacing: float) -> None:
    """CR Series, CR Image and the laterality of General Series."""
    _series_laterality(ds, laterality)
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["A", "F"] if laterality != "R" else ["P", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ImagerPixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"


def _fill_ct(ds: Dataset, laterality: str | None, spacing: float) -> None:
    """Frame of Reference, Image Plane, CT Image and General Series for CT."""
    # General Series: Patient Position Type 2C for CT, Laterality 2C for paired parts
    ds.PatientPosition = "HFS"
    _series_laterality(ds, laterality)
    # Frame of Reference
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    # Image Plane
    ds.PixelSpacing = [f"{spacing:g}", f"{spacing:g}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SliceThickness = "1"
    # CT Image
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.KVP = "120"
