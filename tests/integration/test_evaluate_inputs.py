"""`boneage-worker evaluate --dicom-dir`, `predict` and `train --dicom-dir` give the model
the very input the service gives it.

The service (:func:`worker.pipeline.assess_instance`) decodes a radiograph at a reduced
resolution; an evaluation that decoded it in full would report on inputs the service
never sends (about 0.01 SD apart per pixel). Both are run here on the same file, the
service's prepared tensor recorded at its predictor, evaluate's at its dataset.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

import worker.datasets
from db.engine import upgrade
from dicom_io.pixels import decode_as_assessed, decode_for_display, read_image
from dicom_io.scp import ReceivedInstance, spool_path
from dicom_io.synthetic import make_radiograph_dataset
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor
from models.preprocess import Prepared, prepare
from tests.support import record_evaluated_datasets
from worker.cli import main
from worker.listener import record_instance
from worker.pipeline import assess_instance
from worker.runtime import Runtime
from worker.settings import load_settings

pytestmark = pytest.mark.integration

ROWS, COLUMNS = 600, 440
"""A hand the 128-px tiny model and a 256-px heat-map floor let the service decode at half
size in both syntaxes (JPEG 2000: one wavelet level skipped; uncompressed: 2 x 2 blocks)."""


def _hand(syntax: UID, folder: Path) -> Path:
    phantom = make_phantom(100.0, male=False, size=ROWS, rng=np.random.default_rng(5))
    margin = (ROWS - COLUMNS) // 2
    stored = np.round(phantom.image[:, margin : margin + COLUMNS] * 4095).astype(np.uint16)
    ds = make_radiograph_dataset(
        stored, sex="F", birth_date=dt.date(2017, 1, 1), study_date=dt.date(2025, 5, 1)
    )
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, encoding_plugin="pylibjpeg")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hand.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _assessed_by_the_service(rt: Runtime, path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Spool ``path``, assess it as the worker does, and return what its predictor prepared:
    ``(shape of the decoded image, input tensor)``."""
    ds = read_image(path)
    spooled = spool_path(rt.settings.spool_dir, ds.file_meta.MediaStorageSOPInstanceUID)
    spooled.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, spooled)
    instance_id = record_instance(
        rt.database_url,
        ReceivedInstance(
            ds.file_meta.MediaStorageSOPInstanceUID,
            ds.file_meta.MediaStorageSOPClassUID,
            str(ds.StudyInstanceUID),
            str(ds.SeriesInstanceUID),
            "DX",
            str(ds.file_meta.TransferSyntaxUID),
            "PACS",
            spooled,
            spooled.stat().st_size,
        ),
    )
    predictor = rt.predictor
    prepare_for_the_model = predictor.prepare
    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def recording(image: np.ndarray) -> Prepared:
        prepared = prepare_for_the_model(image)
        seen.append((image.shape, prepared.tensor.clone()))
        return prepared

    monkeypatch.setattr(predictor, "prepare", recording)
    assert assess_instance(rt, instance_id, send=False).state == "assessed"
    [served] = seen
    return served


def _prepared_by_evaluate(
    checkpoint: Path, path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    """Run ``boneage-worker evaluate --dicom-dir`` on ``path``: the input its dataset built."""
    made = record_evaluated_datasets(monkeypatch)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerows([["file", "boneage"], [path.name, "100"]])
    args = ["evaluate", "--model", str(checkpoint), "--dicom-dir", str(path.parent)]
    args += ["--labels", str(labels), "--no-plots", "-o", str(tmp_path / "report")]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "decoded as the service does (input 128 px" in result.output
    # and the report says so: which decode its figures are of
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["data"].endswith(
        "decoded as the service does (input 128 px, BONEAGE_SC_MIN_LONG_SIDE 256)"
    )
    assert metrics["data"] in (tmp_path / "report" / "report.md").read_text()
    [dataset] = made
    return dataset[0][0]


def _prepared_by_predict(
    checkpoint: Path, path: Path, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    """Run ``boneage-worker predict`` on ``path``: the input its predictor prepared."""
    seen: list[torch.Tensor] = []
    prepare_for_the_model = BoneAgePredictor.prepare

    def recording(self: BoneAgePredictor, image: np.ndarray) -> Prepared:
        prepared = prepare_for_the_model(self, image)
        seen.append(prepared.tensor.clone())
        return prepared

    monkeypatch.setattr(BoneAgePredictor, "prepare", recording)
    result = CliRunner().invoke(
        main, ["predict", "--model", str(checkpoint), str(path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    [prepared] = seen
    return prepared


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, JPEG2000Lossless])
def test_evaluate_gives_the_model_the_input_the_service_gives_it(
    syntax: UID, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if syntax == JPEG2000Lossless:
        pytest.importorskip("openjpeg")
        features = pytest.importorskip("PIL.features")
        if not features.check("jpg_2000"):
            pytest.skip("Pillow was built without OpenJPEG")
    # the site's floor, read by the worker and by evaluate alike
    monkeypatch.setenv("BONEAGE_SC_MIN_LONG_SIDE", "256")
    settings = load_settings(data_dir=tmp_path / "data", model=tiny_checkpoint)
    upgrade(settings.effective_database_url)
    rt = Runtime(settings)
    path = _hand(syntax, tmp_path / "images")

    shape, served = _assessed_by_the_service(rt, path, monkeypatch)
    assert shape == (ROWS // 2, COLUMNS // 2)  # decoded reduced: the case that matters
    evaluated = _prepared_by_evaluate(tiny_checkpoint, path, tmp_path, monkeypatch)
    assert evaluated.dtype == served.dtype == torch.float32
    assert torch.equal(evaluated, served)
    # and predict, whose bone age is then the one the service's SR gives
    assert torch.equal(_prepared_by_predict(tiny_checkpoint, path, monkeypatch), served)

    # what evaluate and predict gave the model before: the image decoded in full, measurably other
    full = prepare(decode_for_display(read_image(path)), 128).tensor
    assert float((full - served).abs().mean()) > 1e-3


def test_train_learns_from_dicom_decoded_as_the_service_decodes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --dicom-dir` gives the model, image by image, what the service would give
    a model of its --input-size: the same decode, at the same reduction."""
    monkeypatch.setenv("BONEAGE_SC_MIN_LONG_SIDE", "256")
    folder = tmp_path / "images"
    path = _hand(ExplicitVRLittleEndian, folder)
    names = [f"hand{i:02d}.dcm" for i in range(10)]  # the fewest train takes
    hand = dcmread(path)
    path.unlink()
    for i, name in enumerate(names):  # children of their own: train splits by patient
        hand.PatientID = f"CHILD{i:02d}"
        hand.save_as(folder / name, enforce_file_format=True)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows([["file", "boneage"], *[[n, "100"] for n in names]])
    decoded: list[np.ndarray] = []
    decode = worker.datasets.decode_as_assessed

    def recording(ds: Any, **kwargs: Any) -> np.ndarray:
        image = decode(ds, **kwargs)
        decoded.append(image)
        return image

    monkeypatch.setattr(worker.datasets, "decode_as_assessed", recording)
    args = ["train", "--dicom-dir", str(folder), "--labels", str(labels), "--arch", "resnet18"]
    args += ["--input-size", "128", "--epochs", "1", "--batch-size", "4"]
    result = CliRunner().invoke(
        main, [*args, "-o", str(tmp_path / "model.safetensors")], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert decoded, "train decoded its images some other way"
    first = read_image(folder / names[0])
    service = decode_as_assessed(first, input_size=128, sc_min_long_side=256)
    assert service.shape == (ROWS // 2, COLUMNS // 2)  # reduced, as the service reduces it
    for image in decoded:
        assert np.array_equal(image, service)
