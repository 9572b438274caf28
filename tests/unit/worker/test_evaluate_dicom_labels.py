"""A DICOM folder's labels for `evaluate` and `train`: Excel's byte-order mark, rows cut
short, files that are not DICOM or hold no image, listed files that are missing."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from dicom_io.synthetic import make_radiograph_dataset
from models.checkpoint import untrained_model
from models.data import LabelledSet, load_image, source_counts
from models.evaluate import evaluate
from worker.datasets import load_items, read_dicom_folder


def _write_dicom(folder: Path, name: str, *, pixels: bool = True) -> None:
    stored = np.random.default_rng(0).integers(0, 4096, size=(160, 128), dtype=np.uint16)
    ds = make_radiograph_dataset(
        stored,
        sex="F",
        birth_date=dt.date(2010, 1, 1),
        study_date=dt.date(2020, 1, 1),
        patient_id=f"P-{name}",
    )
    if not pixels:
        del ds.PixelData
    ds.save_as(folder / name, enforce_file_format=True)


def _labels(folder: Path, rows: list[list[str]], *, encoding: str = "utf-8") -> Path:
    path = folder / "labels.csv"
    with path.open("w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows([["file", "boneage"], *rows])
    return path


def test_labels_saved_by_excel_with_a_byte_order_mark_are_read(tmp_path: Path) -> None:
    _write_dicom(tmp_path, "a.dcm")
    labels = _labels(tmp_path, [["a.dcm", "100"]], encoding="utf-8-sig")
    assert labels.read_bytes().startswith(b"\xef\xbb\xbffile,")
    [item] = read_dicom_folder(tmp_path, labels, progress=False)
    assert item.age_months == 100.0


def test_a_row_cut_short_is_an_error_naming_its_line(tmp_path: Path) -> None:
    _write_dicom(tmp_path, "a.dcm")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,boneage,male\na.dcm,100,F\na.dcm\n")
    with pytest.raises(ValueError, match=r"labels\.csv:3: the row has 1 of the header's 3 cells"):
        read_dicom_folder(tmp_path, labels, progress=False)


def test_a_file_that_is_not_dicom_is_named_with_its_labels_line(tmp_path: Path) -> None:
    _write_dicom(tmp_path, "a.dcm")
    (tmp_path / "notes.dcm").write_bytes(b"hello" * 100)
    labels = _labels(tmp_path, [["a.dcm", "100"], ["notes.dcm", "90"]])
    with pytest.raises(ValueError) as refused:
        read_dicom_folder(tmp_path, labels, progress=False)
    assert str(refused.value).startswith(f"{labels}:3: {tmp_path / 'notes.dcm'} is not a DICOM")


def test_an_image_that_cannot_be_decoded_is_named_with_its_labels_line(tmp_path: Path) -> None:
    # the header reads; the pixels are decoded when evaluate (or train) first needs them
    for name in ("a.dcm", "b.dcm"):
        _write_dicom(tmp_path, name, pixels=name == "a.dcm")
    labels = _labels(tmp_path, [["a.dcm", "100"], ["b.dcm", "90"]])
    items = read_dicom_folder(tmp_path, labels, input_size=64, progress=False)
    assert load_image(items[0].image).shape == (160, 128)
    loaded = untrained_model(arch="resnet18", input_size=64)
    with pytest.raises(ValueError) as refused:
        evaluate(loaded, items, tmp_path / "report", device="cpu", progress=False, plots=False)
    message = str(refused.value)
    assert message.startswith(f"{labels}:3: cannot decode {tmp_path / 'b.dcm'}: ")
    assert "Pixel Data" in message


def test_missing_files_are_counted_as_for_rsna_data(tmp_path: Path) -> None:
    for name in ("a.dcm", "c.dcm"):
        _write_dicom(tmp_path, name)
    labels = _labels(tmp_path, [["a.dcm", "100"], ["gone.dcm", "90"], ["c.dcm", "80"]])
    items, description = load_items(
        rsna_csv=None,
        rsna_images=None,
        dicom_dir=tmp_path,
        labels=labels,
        phantoms=None,
        progress=False,
    )
    assert isinstance(items, LabelledSet)
    assert len(items) == 2
    assert source_counts(items) == (3, 1)
    assert "2 images (1 of 3 listed missing)" in description
    loaded = untrained_model(arch="resnet18", input_size=32)
    with pytest.raises(ValueError, match="1 of the 3 images the labels list are missing"):
        evaluate(loaded, items, tmp_path / "refused", device="cpu", progress=False)
    report = evaluate(
        loaded,
        items,
        tmp_path / "report",
        device="cpu",
        progress=False,
        plots=False,
        allow_missing=True,
        bootstrap=0,
    )
    assert (report.metrics["n_listed"], report.metrics["n_missing"]) == (3, 1)


def test_labels_of_which_no_file_exists_are_refused(tmp_path: Path) -> None:
    labels = _labels(tmp_path, [["gone.dcm", "90"], ["lost.dcm", "80"]])
    with pytest.raises(ValueError, match=r"none of the 2 files .*labels\.csv lists is in"):
        read_dicom_folder(tmp_path, labels, progress=False)


def test_reading_the_headers_shows_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_dicom(tmp_path, "a.dcm")
    labels = _labels(tmp_path, [["a.dcm", "100"]])
    read_dicom_folder(tmp_path, labels)
    assert "read DICOM headers" in capsys.readouterr().err
    read_dicom_folder(tmp_path, labels, progress=False)
    assert "read DICOM headers" not in capsys.readouterr().err
