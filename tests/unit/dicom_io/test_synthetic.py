"""Synthetic DX/CR/CT datasets: valid, round-trippable, strict about arguments."""

from __future__ import annotations

import datetime
import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import dciodvfy_errors

from .conftest import BIRTH_DATE, STUDY_DATE, hand_like

SOP_CLASSES = {
    "DX": DigitalXRayImageStorageForPresentation,
    "CR": ComputedRadiographyImageStorage,
    "CT": CTImageStorage,
}


@pytest.mark.parametrize(
    ("modality", "bits"),
    # CT Image Storage requires 16 bits allocated, so there is no 8-bit CT case.
    [(m, b) for m in ("DX", "CR", "CT") for b in (8, 12, 16) if not (m == "CT" and b == 8)],
)
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_valid_for_dciodvfy(tmp_path: Path, modality: str, photometric: str, bits: int) -> None:
    ds = make_radiograph_dataset(
        hand_like(),
        modality=modality,
        photometric=photometric,
        bits_stored=bits,
        birth_date=BIRTH_DATE,
        study_date=STUDY_DATE,
        body_part="HAND" if modality != "CT" else "CHEST",
        laterality="L" if modality != "CT" else None,
    )
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_round_trip_values() -> None:
    stored = np.arange(96 * 64, dtype=np.uint16).reshape(96, 64) % 4096
    ds = make_radiograph_dataset(
        stored,
        sex="F",
        birth_date=datetime.date(2016, 5, 20),
        study_date=datetime.date(2024, 5, 19),
        laterality="R",
        patient_name="DOE^JANE",
        patient_id="ID7",
        study_instance_uid="1.2.3.4",
        sop_instance_uid="1.2.3.4.5",
    )
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    back = dcmread(io.BytesIO(buffer.getvalue()))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPClassUID == SOP_CLASSES["DX"]
    assert back.SOPInstanceUID == back.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4.5"
    assert back.StudyInstanceUID == "1.2.3.4"
    assert (back.PatientSex, back.PatientID, str(back.PatientName)) == ("F", "ID7", "DOE^JANE")
    assert back.PatientBirthDate == "20160520"
    assert back.PatientAge == "007Y"  # one day short of 8 years
    assert back.ImageLaterality == "R"
    assert back.BodyPartExamined == "HAND"
    assert back.PresentationIntentType == "FOR PRESENTATION"
    np.testing.assert_array_equal(back.pixel_array, stored)


def test_float_pixels_fill_the_stored_range() -> None:
    image = np.linspace(0, 1, 96 * 64).reshape(96, 64)
    ds = make_radiograph_dataset(image, bits_stored=10, birth_date=None, study_date=STUDY_DATE)
    assert ds.pixel_array.min() == 0 and ds.pixel_array.max() == 1023
    assert ds.PatientBirthDate == ""
    assert "PatientAge" not in ds


def test_infant_age_in_months() -> None:
    ds = make_radiograph_dataset(
        hand_like(),
        birth_date=datetime.date(2024, 1, 15),
        study_date=datetime.date(2024, 11, 20),
    )
    assert ds.PatientAge == "010M"


def test_missing_sex_is_empty() -> None:
    ds = make_radiograph_dataset(hand_like(), sex=None, birth_date=None, study_date=STUDY_DATE)
    assert ds.PatientSex == ""


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"modality": "MR"}, ValueError, "modality"),
        ({"photometric": "RGB"}, ValueError, "photometric"),
        ({"sex": "male"}, ValueError, "sex"),
        ({"laterality": "B"}, ValueError, "laterality"),
        ({"bits_stored": 7}, ValueError, "bits_stored"),
        ({"bits_stored": 12.0}, TypeError, "bits_stored"),
        ({"birth_date": datetime.date(2030, 1, 1)}, ValueError, "birth_date"),
        ({"study_date": "20240101"}, TypeError, "study_date"),
        ({"pixels": np.zeros((4, 4, 3))}, ValueError, "pixels"),
        ({"pixels": np.full((4, 4), 1.5)}, ValueError, "pixels"),
        ({"pixels": np.full((4, 4), 5000, np.uint16)}, ValueError, "pixels"),
        ({"pixels": [[0, 1]]}, TypeError, "pixels"),
    ],
)
def test_rejects(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    arguments: dict[str, object] = {
        "pixels": hand_like(),
        "birth_date": BIRTH_DATE,
        "study_date": STUDY_DATE,
        **kwargs,
    }
    pixels = arguments.pop("pixels")
    with pytest.raises(error, match=match):
        make_radiograph_dataset(pixels, **arguments)  # type: ignore[arg-type]
