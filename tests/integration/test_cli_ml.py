"""`boneage-worker train`, `evaluate` and `predict` from the command line, on DICOM phantoms."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from dicom_io.synthetic import make_radiograph_dataset
from models.checkpoint import load_checkpoint
from models.phantoms import make_phantom
from worker.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dicom_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(11)
    rows = []
    for i in range(36):
        age = float(rng.uniform(24, 216))
        sex = "M" if i % 2 else "F"
        phantom = make_phantom(age, male=sex == "M", size=128, rng=rng)
        ds = make_radiograph_dataset(
            np.round(phantom.image * 4095).astype(np.uint16),
            sex=sex,
            birth_date=dt.date(2010, 1, 1),
            study_date=dt.date(2020, 1, 1),
            patient_id=f"PHANTOM{i:03d}",  # 36 children: the split keeps a patient together
        )
        name = f"case{i:02d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        rows.append({"file": name, "boneage": f"{age:.1f}"})
    labels = folder / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "boneage"])
        writer.writeheader()
        writer.writerows(rows)
    return folder, labels


def run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_resume_evaluate_predict_on_a_dicom_folder(
    dicom_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, labels = dicom_folder
    checkpoint, state = tmp_path / "model.safetensors", tmp_path / "state"
    common = [
        "--dicom-dir",
        str(folder),
        "--labels",
        str(labels),
        "--arch",
        "resnet18",
        "--input-size",
        "64",
        "--batch-size",
        "8",
        "--state-dir",
        str(state),
        # its learning rate is not planned over the epochs: a resume may add some
        "--schedule",
        "plateau",
    ]
    run("train", *common, "--epochs", "1", "--version", "test-1", "-o", str(checkpoint))
    first = load_checkpoint(checkpoint)
    assert first.meta.trained and first.meta.extra["version"] == "test-1"
    assert "DICOM folder" in first.meta.data and "36 images" in first.meta.data
    # 36 images, 15 % held out: 4 to 6 validation images, enough for a finite 80 %
    # conformal quantile (4) but not a 90 % (9) or 95 % one (19), which are left out
    assert set(first.meta.quantiles) == {"0.8"}

    output = run(
        "train", *common, "--epochs", "2", "--resume", "--version", "test-1", "-o", str(checkpoint)
    )
    assert "wrote" in output
    assert load_checkpoint(checkpoint).model_id != first.model_id  # trained on from epoch 1

    def evaluate(report: Path, *options: str) -> None:
        data = ["--dicom-dir", str(folder), "--labels", str(labels)]
        run("evaluate", "--model", str(checkpoint), *data, *options, "-o", str(report))

    report_dir = tmp_path / "report"
    evaluate(report_dir)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert {"mae", "rmse", "r2"} <= set(metrics["overall"])
    for plot in ("pred_vs_true.png", "bland_altman.png", "residual_by_age.png"):
        assert (report_dir / plot).stat().st_size > 0
    assert "MAE" in (report_dir / "report.md").read_text()
    assert metrics["precision"] == "float32"  # a CPU's default

    # What a site runs before BONEAGE_PRECISION=bfloat16: the same report in bfloat16.
    lower_dir = tmp_path / "report-bf16"
    evaluate(lower_dir, "--precision", "bfloat16", "--no-plots")
    assert json.loads((lower_dir / "metrics.json").read_text())["precision"] == "bfloat16"

    def ages(report: Path) -> np.ndarray:
        with (report / "predictions.csv").open() as fh:
            return np.array([float(row["predicted_months"]) for row in csv.DictReader(fh)])

    assert np.abs(ages(lower_dir) - ages(report_dir)).max() < 4.0

    predicted = run(
        "predict",
        "--model",
        str(checkpoint),
        str(folder / "case00.dcm"),
        "--heatmap-dir",
        str(tmp_path / "maps"),
    )
    assert "case00.dcm" in predicted and " y " in predicted
    assert (tmp_path / "maps" / "case00-heatmap.png").stat().st_size > 0


def test_train_refuses_in_one_line_what_would_lose_a_run_or_misstate_it(
    dicom_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    """Each before any image is read, as an error message, not a traceback: a checkpoint
    folder that does not exist (the write failed after the whole run), a state folder
    that holds a saved run (overwritten after one epoch), a resume with other settings
    (the checkpoint then misstated how it was trained). --restart replaces the run."""
    folder, labels = dicom_folder
    state = tmp_path / "state"
    common = [
        *("--dicom-dir", str(folder), "--labels", str(labels), "--arch", "resnet18"),
        *("--input-size", "64", "--batch-size", "8", "--state-dir", str(state)),
    ]

    def refused(*args: str) -> str:
        result = CliRunner().invoke(main, ["train", *common, *args])
        assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        return " ".join(result.output.split())

    nowhere = tmp_path / "no-such-folder" / "model.safetensors"
    assert "no-such-folder" in refused("--epochs", "1", "-o", str(nowhere))
    assert not state.exists() or not any(state.iterdir())

    checkpoint = tmp_path / "model.safetensors"
    run("train", *common, "--epochs", "1", "-o", str(checkpoint))
    said = refused("--epochs", "1", "-o", str(checkpoint))
    assert "--resume" in said and "--restart" in said
    said = refused("--epochs", "2", "--resume", "--lr", "0.01", "-o", str(checkpoint))
    assert "lr was 0.0003, now 0.01" in said
    # the cosine schedule was planned over one epoch: two would move it
    assert "epochs was 1, now 2 (the cosine schedule of the saved run" in said
    assert "exclude each other" in refused("--resume", "--restart", "-o", str(checkpoint))

    first = load_checkpoint(checkpoint).model_id
    assert "wrote" in run("train", *common, "--epochs", "1", "--restart", "-o", str(checkpoint))
    assert load_checkpoint(checkpoint).model_id != first


def test_evaluate_refuses_a_precision_the_device_cannot_run(
    dicom_folder: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, labels = dicom_folder
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",
            str(labels),  # never read: the precision is checked first
            "--dicom-dir",
            str(folder),
            "--labels",
            str(labels),
            "--device",
            "cpu",
            "--precision",
            "float16",
            "-o",
            str(tmp_path / "report"),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "float16 does not run on cpu: use bfloat16 or float32" in result.output
    assert not (tmp_path / "report").exists()


def test_train_needs_exactly_one_data_source(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 1
    assert "give exactly one data source" in result.output


def test_labels_without_boneage_column_are_named(
    dicom_folder: tuple[Path, Path], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    folder, _ = dicom_folder
    bad = tmp_path / "bad.csv"
    bad.write_text("file,age\ncase00.dcm,100\n")
    result = CliRunner().invoke(
        main,
        [
            "evaluate",
            "--model",  # a real one: evaluate reads it first (it says how to decode)
            str(tiny_checkpoint),
            "--dicom-dir",
            str(folder),
            "--labels",
            str(bad),
            "-o",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 1
    assert "has no 'boneage' column" in result.output


def test_predict_refuses_what_the_service_would_and_exits_1(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A 10 x 10 PNG gets no bone age (the gate wants 128 px a side), a file that is not
    an image says why; the hand beside them is still assessed, and the status is 1."""
    from PIL import Image

    phantom = make_phantom(100.0, male=False, size=256, rng=np.random.default_rng(0))
    hand = tmp_path / "hand.png"
    Image.fromarray(np.round(phantom.image * 255).astype(np.uint8)).save(hand)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tiny)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")

    def predict(*files: Path) -> tuple[int, str]:
        args = ["predict", "--model", str(tiny_checkpoint), "--sex", "F", *map(str, files)]
        result = CliRunner().invoke(main, args, env={"COLUMNS": "200"})
        return result.exit_code, result.output

    code, output = predict(hand, tiny, broken)
    assert code == 1, output
    assert "image is 10x10 pixels, smaller than 128x128" in output
    assert "cannot identify image file" in output
    assert "2 of 3 files not assessed" in output
    assert " y " in output  # the hand's bone age
    code, output = predict(hand)
    assert code == 0, output


@pytest.mark.parametrize(
    ("birth_date", "sds_given", "note"),
    [
        (dt.date(2015, 5, 1), True, None),
        (
            dt.date(2006, 7, 1),  # 18 years 10 months: past the girls' SD table
            False,
            "No SDS: the Greulich-Pyle reference has standard deviations from 3 months to "
            "16 years for girls",
        ),
    ],
)
def test_predict_reports_a_dicom_image_as_the_service_would(
    tmp_path: Path, tiny_checkpoint: Path, birth_date: dt.date, sds_given: bool, note: str | None
) -> None:
    """The chronological age, the SDS and why there is none, as the SR would say them."""
    phantom = make_phantom(100.0, male=False, size=256, rng=np.random.default_rng(0))
    path = tmp_path / "hand.dcm"
    make_radiograph_dataset(
        np.round(phantom.image * 4095).astype(np.uint16),
        sex="F",
        birth_date=birth_date,
        study_date=dt.date(2025, 5, 1),
    ).save_as(path, enforce_file_format=True)
    result = CliRunner().invoke(
        main, ["predict", "--model", str(tiny_checkpoint), str(path)], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.output.splitlines() if "hand.dcm" in line]
    cells = [cell.strip() for cell in row.split("│")]
    assert cells[4] == ("10 y 0 mo" if sds_given else "18 y 10 mo")  # chronological
    assert (cells[5] != "-") is sds_given  # SDS
    if note is not None:
        assert note in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("missing_sex", "given", "shown"),
    [("female", None, "F"), ("male", None, "M"), ("female", "M", "M"), ("reject", None, None)],
)
def test_predict_gives_a_dicom_image_with_no_sex_the_sex_the_service_gives_it(
    tmp_path: Path,
    tiny_checkpoint: Path,
    missing_sex: str,
    given: str | None,
    shown: str | None,
) -> None:
    """PatientSex not recorded: the site's BONEAGE_MISSING_SEX, with the SR's note, as the
    service assesses it (before, predict refused it whatever the site said), unless
    --sex says otherwise; refused where the site refuses it."""
    phantom = make_phantom(100.0, male=False, size=256, rng=np.random.default_rng(0))
    path = tmp_path / "hand.dcm"
    make_radiograph_dataset(
        np.round(phantom.image * 4095).astype(np.uint16),
        sex=None,
        birth_date=dt.date(2015, 5, 1),
        study_date=dt.date(2025, 5, 1),
    ).save_as(path, enforce_file_format=True)
    args = ["predict", "--model", str(tiny_checkpoint), str(path)]
    args += ["--sex", given] if given else []
    env = {"COLUMNS": "400", "BONEAGE_MISSING_SEX": missing_sex}
    result = CliRunner().invoke(main, args, env=env)
    said = " ".join(result.output.split())
    if shown is None:
        assert result.exit_code == 1, said
        assert "patient sex is empty; the model needs M or F (--sex gives it one)" in said
        return
    assert result.exit_code == 0, said
    [row] = [line for line in result.output.splitlines() if "hand.dcm" in line]
    assert [cell.strip() for cell in row.split("│")][2] == shown
    note = "Patient sex not recorded as M or F: assessed as"
    assert (note in said) is (given is None), said


def test_evaluate_refuses_missing_rsna_images_unless_allowed(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for key in range(4):
        phantom = make_phantom(50.0 + 30 * key, male=key % 2 == 0, size=160, rng=rng)
        if key != 2:  # listed, but its PNG is missing
            Image.fromarray(np.round(phantom.image * 255).astype(np.uint8)).save(
                images / f"{key}.png"
            )
        rows.append(f"{key},{'M' if key % 2 == 0 else 'F'},{50 + 30 * key}")
    labels = tmp_path / "test.csv"
    labels.write_text("Case ID,Sex,Ground truth bone age (months)\n" + "\n".join(rows) + "\n")
    args = ["evaluate", "--model", str(tiny_checkpoint), "--rsna-csv", str(labels)]
    args += ["--rsna-images", str(images), "--device", "cpu", "--no-plots"]

    refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 1, refused.output
    assert "1 of the 4 images the labels list are missing" in refused.output
    assert "--allow-missing" in refused.output
    assert not (tmp_path / "refused").exists()

    run(*args, "--allow-missing", "-o", str(tmp_path / "report"))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert (metrics["n_listed"], metrics["n_missing"], metrics["overall"]["n"]) == (4, 1, 3)


def test_evaluate_counts_missing_dicom_files_and_names_a_file_that_is_not_dicom(
    dicom_folder: tuple[Path, Path], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    folder, _ = dicom_folder
    (tmp_path / "notes.dcm").write_bytes(b"not DICOM" * 20)
    labels = tmp_path / "labels.csv"
    # Excel's "CSV UTF-8" starts with a byte-order mark
    labels.write_text("file,boneage\ncase00.dcm,100\ngone.dcm,90\ncase01.dcm,80\n", "utf-8-sig")
    args = ["evaluate", "--model", str(tiny_checkpoint), "--dicom-dir", str(folder)]
    args += ["--labels", str(labels), "--device", "cpu", "--no-plots", "--bootstrap", "0"]

    refused = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "refused")])
    assert refused.exit_code == 1, refused.output
    assert "1 of the 3 images the labels list are missing" in refused.output

    run(*args, "--allow-missing", "-o", str(tmp_path / "report"))
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert (metrics["n_listed"], metrics["n_missing"], metrics["overall"]["n"]) == (3, 1, 2)
    assert "(1 of 3 listed missing)" in metrics["data"]

    notes = tmp_path / "notes.dcm"  # an absolute path in the labels: outside the folder
    labels.write_text(f"file,boneage\ncase00.dcm,100\n{notes},90\n")
    broken = CliRunner().invoke(
        main, [*args, "-o", str(tmp_path / "broken")], env={"COLUMNS": "400"}
    )
    assert broken.exit_code == 1, broken.output
    said = " ".join(broken.output.split())
    assert f"{labels}:3: {notes} is not a DICOM file" in said


def test_evaluate_phantoms_are_not_train_s_phantoms(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from models.data import phantom_items

    run(
        "evaluate",
        "--model",
        str(tiny_checkpoint),
        "--phantoms",
        "4",
        "--device",
        "cpu",
        "--no-plots",
        "-o",
        str(tmp_path / "report"),
    )
    with (tmp_path / "report" / "predictions.csv").open() as fh:
        evaluated = [float(row["reference_months"]) for row in csv.DictReader(fh)]
    trained = [round(item.age_months, 2) for item in phantom_items(4, size=128, seed=0)]
    assert len(evaluated) == 4
    assert set(evaluated).isdisjoint(trained)  # train --phantoms 4 (default seed) drew these


def test_evaluate_leaves_out_what_the_service_s_gate_refuses_and_says_why(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Figures of images the service never assesses (a foot, a patient of 30) are of
    nothing it reports: left out and counted by reason, unless --all-images."""
    from tests.dicomtools import dciodvfy_errors

    rng = np.random.default_rng(3)
    cases: list[dict[str, Any]] = (
        [{}] * 4
        + [{"body_part": "FOOT"}] * 2
        + [{"birth_date": dt.date(1990, 1, 1)}, {"birth_date": dt.date(1995, 1, 1)}]
    )
    rows = []
    for i, overrides in enumerate(cases):
        phantom = make_phantom(60.0 + 10 * i, male=i % 2 == 0, size=160, rng=rng)
        options: dict[str, Any] = {
            "sex": "M" if i % 2 == 0 else "F",
            "birth_date": dt.date(2012, 1, 1),
            "study_date": dt.date(2020, 1, 1),
            "patient_id": f"GATE{i:02d}",
            **overrides,
        }
        path = tmp_path / f"image{i}.dcm"
        make_radiograph_dataset(
            np.round(phantom.image * 4095).astype(np.uint16), **options
        ).save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == []
        rows.append(f"{path.name},{60 + 10 * i}")
    labels = tmp_path / "labels.csv"
    labels.write_text("file,boneage\n" + "\n".join(rows) + "\n")

    def evaluate(listed: Path, *options: str) -> list[str]:
        args = ["evaluate", "--model", str(tiny_checkpoint), "--dicom-dir", str(tmp_path)]
        args += ["--labels", str(listed), "--device", "cpu", "--no-plots", "--bootstrap", "0"]
        return [*args, *options]

    output = " ".join(run(*evaluate(labels, "-o", str(tmp_path / "gated"))).split())
    metrics = json.loads((tmp_path / "gated" / "metrics.json").read_text())
    foot = "body part examined is FOOT, not a hand"
    old = "patient age 25.0 years is outside the model's range 0-19 years"
    assert metrics["overall"]["n"] == 4
    assert (metrics["n_listed"], metrics["n_missing"]) == (8, 0)
    # by kind of reason: the two ages, each its own text, are one count
    assert metrics["gate"] == {
        "applied": True,
        "left_out": 4,
        "reasons": {"age": 2, "body_part": 2},
        "examples": {"age": old, "body_part": foot},
    }
    with (tmp_path / "gated" / "predictions.csv").open() as fh:
        assert sorted(float(r["reference_months"]) for r in csv.DictReader(fh)) == [60, 70, 80, 90]
    said = (
        "the service's gate left out 4 image(s) it would refuse, not in the figures: "
        f"2 × age (e.g. {old}); 2 × body_part (e.g. {foot})"
    )
    assert said in output
    assert said in " ".join((tmp_path / "gated" / "report.md").read_text().split())

    run(*evaluate(labels, "--all-images", "-o", str(tmp_path / "all")))
    metrics = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 8
    assert metrics["gate"] == {"applied": False, "left_out": 0, "reasons": {}, "examples": {}}
    assert "gate was not applied" in (tmp_path / "all" / "report.md").read_text()

    refused_only = tmp_path / "refused.csv"
    refused_only.write_text("file,boneage\n" + "\n".join(rows[4:]) + "\n")
    nothing = CliRunner().invoke(
        main, evaluate(refused_only, "-o", str(tmp_path / "none")), env={"COLUMNS": "400"}
    )
    assert nothing.exit_code == 1, nothing.output
    assert "nothing is left to evaluate (--all-images to score them anyway)" in nothing.output
    assert not (tmp_path / "none").exists()


def _rsna_set(folder: Path, n: int = 12, *, size: int = 160) -> tuple[Path, Path]:
    """An RSNA-layout set of phantoms: ``labels.csv`` and a folder of ``<id>.png``."""
    from PIL import Image

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    rows = ["id,boneage,male"]
    for key in range(n):
        age = 24.0 + 15 * key
        phantom = make_phantom(age, male=key % 2 == 0, size=size, rng=rng)
        Image.fromarray(np.round(phantom.image * 255).astype(np.uint8)).save(images / f"{key}.png")
        rows.append(f"{key},{age:.1f},{key % 2 == 0}")
    labels = folder / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return labels, images


def _failed(args: list[str], exit_code: int) -> str:
    """The output of a command that failed as a CLI error, not a traceback."""
    result = CliRunner().invoke(main, args, env={"COLUMNS": "400"})
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return " ".join(result.output.split())


def test_train_and_evaluate_name_a_png_that_cannot_be_read(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A truncated PNG stopped train with "Error: image file is truncated" (no file named)
    and evaluate with a traceback (an OSError it did not catch)."""
    labels, images = _rsna_set(tmp_path)
    broken = images / "5.png"
    broken.write_bytes(broken.read_bytes()[:300])
    data = ["--rsna-csv", str(labels), "--rsna-images", str(images)]

    said = _failed(
        [
            *("evaluate", "--model", str(tiny_checkpoint), *data, "--device", "cpu"),
            *("--no-plots", "--bootstrap", "0", "-o", str(tmp_path / "report")),
        ],
        1,
    )
    assert f"cannot read {broken}" in said

    said = _failed(
        [
            *("train", *data, "--arch", "resnet18", "--input-size", "32", "--epochs", "1"),
            *("--batch-size", "4", "--device", "cpu", "-o", str(tmp_path / "m.safetensors")),
        ],
        1,
    )
    assert f"cannot read {broken}" in said
    assert not (tmp_path / "m.safetensors").exists()


def test_evaluate_refuses_a_bone_age_that_is_not_months(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """A NaN label gave an MAE of null, silently."""
    labels, images = _rsna_set(tmp_path, 4)
    rows = labels.read_text().splitlines()
    rows[2] = "1,nan,False"
    labels.write_text("\n".join(rows) + "\n")
    said = _failed(
        [
            *("evaluate", "--model", str(tiny_checkpoint), "--rsna-csv", str(labels)),
            *("--rsna-images", str(images), "--device", "cpu", "-o", str(tmp_path / "report")),
        ],
        1,
    )
    assert f"{labels}:3: boneage 'nan' is not a bone age in months" in said
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--epochs", "0"), ("--batch-size", "0"), ("--patience", "0"), ("--val-fraction", "0.7")],
)
def test_train_refuses_a_setting_out_of_range_before_reading_the_data(
    tmp_path: Path, option: str, value: str
) -> None:
    """Each was a traceback (--epochs/--batch-size/--patience 0), or refused only after
    every image had been read (--val-fraction): a usage error now, before the labels are
    read (one of them is not a number: reading them would say so)."""
    labels, images = _rsna_set(tmp_path, 2, size=16)
    labels.write_text(labels.read_text().replace("24.0", "nan"))
    said = _failed(
        [
            *("train", "--rsna-csv", str(labels), "--rsna-images", str(images)),
            *(option, value, "-o", str(tmp_path / "m.safetensors")),
        ],
        2,
    )
    assert option in said and "nan" not in said
