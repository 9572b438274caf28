"""What an assessment's SR and SC say where they give no SDS or no chronological age.

A real model (resnet18, random weights) predicts on a phantom radiograph; its estimate
is pushed out of the reported range through the checkpoint's target mean, as a model
would put out a negative age for an infant. The SR and SC are built as the pipeline
builds them, written to bytes, read back and checked with dcmtk and dciodvfy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dicom_io import gate
from dicom_io.content import BoneAgeFinding
from dicom_io.pixels import decode_for_display
from dicom_io.synthetic import make_radiograph_dataset
from dicom_io.uids import UUID_ROOT, UidScheme
from models.checkpoint import LoadedModel, untrained_model
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor
from tests.dicomtools import dciodvfy_errors, dsrdump
from worker import pipeline

STUDY_DATE = dt.date(2025, 5, 1)
INFANT = dt.date(2025, 1, 1)  # 4 months old at the study: the SD table has him


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return untrained_model(arch="resnet18", input_size=64, seed=1)


def _predictor(loaded: LoadedModel, target_mean: float, target_sd: float) -> BoneAgePredictor:
    meta = dataclasses.replace(loaded.meta, target_mean=target_mean, target_sd=target_sd)
    return BoneAgePredictor(dataclasses.replace(loaded, meta=meta), device="cpu")


def _source(**attributes: object) -> Dataset:
    phantom = make_phantom(6.0, male=True, size=160, rng=np.random.default_rng(2))
    ds = make_radiograph_dataset(
        np.round(phantom.image * 4095).astype(np.uint16),
        sex="M",
        birth_date=INFANT,
        study_date=STUDY_DATE,
    )
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _assessed(
    predictor: BoneAgePredictor, source: Dataset, tmp_path: Path
) -> tuple[BoneAgeFinding, Path, Path]:
    """Assess ``source`` as the pipeline does; the finding and the SR and SC files."""
    decision = gate.check(source)
    assert decision.accepted, decision.reason
    facts = decision.facts
    image = decode_for_display(source)
    prediction = predictor.predict(image, male=True)
    notes = pipeline.age_notes(facts, male=True)
    finding = pipeline.assessment_finding(predictor, prediction, facts, male=True, notes=notes)
    sr, sc = pipeline.build_outputs(
        source,
        image,
        prediction,
        finding,
        source_uid=source.SOPInstanceUID,
        uids=UidScheme(UUID_ROOT, "a node"),
        device_observer_uid=generate_uid(),
    )
    sr_path, sc_path = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    return finding, sr_path, sc_path


@pytest.mark.parametrize(
    ("target_mean", "shown"), [(-10_000.0, 0.0), (10_000.0, 240.0)], ids=["below", "above"]
)
def test_an_estimate_outside_the_reported_range_is_shown_at_its_limit_without_sds(
    loaded: LoadedModel, tmp_path: Path, target_mean: float, shown: float
) -> None:
    """An infant's estimate below 0 read as a bone age of 0 months with an SDS of about
    -4.4, and one above 240 months as "20 y 0 mo", with nothing to say so (found in
    review): the SR and SC say the estimate was out of range, and give no SDS."""
    predictor = _predictor(loaded, target_mean, 1.0)
    finding, sr_path, sc_path = _assessed(predictor, _source(), tmp_path)

    assert finding.bone_age_months == shown
    assert finding.chronological_age_months == pytest.approx(4.0, abs=0.1)
    assert finding.sds is None
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE in finding.notes
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE in finding.summary_lines()  # the SC's panel

    text = dsrdump(sr_path)
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE in text
    assert 'NUM:(,,"Bone age")=' in text and 'NUM:(,,"Subject Age")=' in text
    assert 'NUM:(,,"Z-Score of measurement")=' not in text
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE in str(dcmread(sc_path).ImageComments)
    for path in (sr_path, sc_path):
        assert dciodvfy_errors(path) == [], path


def test_an_estimate_inside_the_range_keeps_its_sds_and_no_note(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    predictor = _predictor(loaded, 5.0, 0.01)  # about 5 months, whatever the weights say
    finding, sr_path, sc_path = _assessed(predictor, _source(), tmp_path)

    assert 4.0 < finding.bone_age_months < 6.0
    assert finding.sds is not None
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE not in finding.notes
    text = dsrdump(sr_path)
    assert 'NUM:(,,"Z-Score of measurement")=' in text
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE not in text
    assert pipeline.OUTSIDE_THE_REPORTED_RANGE not in str(dcmread(sc_path).ImageComments)


@pytest.mark.parametrize(
    "attributes",
    [
        {"PatientBirthDate": "", "PatientAge": ""},
        {
            "StudyDate": "",
            "AcquisitionDate": "",
            "ContentDate": "",
            "SeriesDate": "",
            "PatientAge": "",
        },
    ],
    ids=["no birth date or age", "no date of the image or age"],
)
def test_an_image_that_gives_no_age_says_so(
    loaded: LoadedModel, tmp_path: Path, attributes: dict[str, str]
) -> None:
    """Where nothing gives the patient's age, the gate cannot hold it to the model's
    0-19 years, and the SR and SC said nothing of it (found in review)."""
    predictor = _predictor(loaded, 5.0, 0.01)
    finding, sr_path, sc_path = _assessed(predictor, _source(**attributes), tmp_path)

    assert finding.chronological_age_months is None and finding.sds is None
    assert pipeline.AGE_NOT_KNOWN in finding.notes
    assert pipeline.AGE_NOT_KNOWN in finding.summary_lines()  # the SC's panel
    text = dsrdump(sr_path)
    assert pipeline.AGE_NOT_KNOWN in text and 'NUM:(,,"Subject Age")=' not in text
    assert pipeline.AGE_NOT_KNOWN in str(dcmread(sc_path).ImageComments)
    for path in (sr_path, sc_path):
        assert dciodvfy_errors(path) == [], path


@pytest.mark.parametrize(
    "attributes",
    [{}, {"PatientBirthDate": "", "PatientAge": "016W"}],
    ids=["birth date", "age in weeks"],
)
def test_an_image_that_gives_an_age_has_no_such_note(attributes: dict[str, str]) -> None:
    facts = gate.check(_source(**attributes)).facts
    assert pipeline.AGE_NOT_KNOWN not in pipeline.age_notes(facts, male=True)
    assert pipeline.chronological_age_months(facts) is not None
