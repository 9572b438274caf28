"""Bootstrap confidence intervals and the by-age-band table of an evaluation."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from models.checkpoint import LoadedModel, save_checkpoint, untrained_model
from models.data import LabelledImage, phantom_items
from models.evaluate import (
    AGE_BANDS_MONTHS,
    MIN_BAND_IMAGES,
    band_interval_table,
    band_table,
    bootstrap_intervals,
    evaluate,
    interval_coverage,
    regression_metrics,
    summarise,
)
from models.predictor import BoneAgePredictor
from worker.cli import main


def _errors(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` reference ages and predictions off by N(2, 8) months."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(0.0, 228.0, n)
    return true + rng.normal(2.0, 8.0, n), true


def _with_quantiles(loaded: LoadedModel, quantiles: dict[str, float]) -> LoadedModel:
    return dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, quantiles=quantiles))


# -- bootstrap ---------------------------------------------------------------------


def test_bootstrap_intervals_hold_the_point_values_and_narrow_with_more_images() -> None:
    widths = {}
    for n in (25, 400):
        predicted, true = _errors(n)
        point = regression_metrics(predicted, true)
        boot = bootstrap_intervals(predicted, true)
        assert (boot["resamples"], boot["seed"], boot["level"], boot["n_units"]) == (
            2000,
            0,
            0.95,
            n,
        )
        assert boot["mae"][0] < point["mae"] < boot["mae"][1]
        assert boot["bias"][0] < point["bias"] < boot["bias"][1]
        widths[n] = boot["mae"][1] - boot["mae"][0]
    # 16 times the images: about a quarter of the width (1 / sqrt(16))
    assert 0.15 < widths[400] / widths[25] < 0.4


def test_bootstrap_mae_interval_is_near_the_normal_approximation() -> None:
    predicted, true = _errors(2000, seed=3)
    absolute = np.abs(predicted - true)
    half = 1.96 * absolute.std(ddof=1) / np.sqrt(absolute.size)
    low, high = bootstrap_intervals(predicted, true)["mae"]
    assert low == pytest.approx(absolute.mean() - half, abs=0.1 * half)
    assert high == pytest.approx(absolute.mean() + half, abs=0.1 * half)


def test_bootstrap_is_reproducible_with_its_seed() -> None:
    predicted, true = _errors(50)
    assert bootstrap_intervals(predicted, true) == bootstrap_intervals(predicted, true)
    assert bootstrap_intervals(predicted, true, seed=1) != bootstrap_intervals(predicted, true)


def test_bootstrap_resamples_patients_not_their_images() -> None:
    # Each of 30 children imaged four times, identically: by patient the intervals are
    # exactly those of one image per child; by image they would be half as wide, as if
    # there were 120 children.
    predicted, true = _errors(30)
    once = bootstrap_intervals(predicted, true)
    four = np.repeat(predicted, 4), np.repeat(true, 4)
    children = [f"child-{i}" for i in range(30) for _ in range(4)]
    by_patient = bootstrap_intervals(*four, children)
    assert by_patient["n_units"] == 30
    assert by_patient["mae"] == pytest.approx(once["mae"], rel=1e-12)
    assert by_patient["bias"] == pytest.approx(once["bias"], rel=1e-12)
    by_image = bootstrap_intervals(*four)
    assert by_image["n_units"] == 120
    width = by_image["mae"][1] - by_image["mae"][0]
    assert width < 0.7 * (once["mae"][1] - once["mae"][0])


def test_bootstrap_of_one_image_is_its_error() -> None:
    boot = bootstrap_intervals(np.array([110.0]), np.array([100.0]), resamples=10)
    assert boot["mae"] == [10.0, 10.0]
    assert boot["bias"] == [10.0, 10.0]


def test_bootstrap_refuses_what_it_cannot_resample() -> None:
    with pytest.raises(ValueError, match="one or more predictions"):
        bootstrap_intervals(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="resamples must be at least 1"):
        bootstrap_intervals(np.ones(3), np.ones(3), resamples=0)
    with pytest.raises(ValueError, match="groups has 2 entries for 3 predictions"):
        bootstrap_intervals(np.ones(3), np.ones(3), ["a", "b"])


# -- age bands ---------------------------------------------------------------------


def test_band_coverage_by_hand() -> None:
    # band 0-24: errors 2, 8, 1 -> inside ±5: 2 of 3, inside ±10: all three;
    # band 120-168: errors -4, 12 -> 1 of 2 inside ±5 and inside ±10
    true = np.array([10.0, 12.0, 20.0, 130.0, 150.0])
    predicted = np.array([12.0, 20.0, 21.0, 126.0, 162.0])
    summary = summarise(predicted, true, np.ones(5, dtype=bool), {"0.8": 5.0, "0.9": 10.0})
    bands = summary["by_age_band"]
    assert set(bands) == {"0-24", "120-168"}
    assert bands["0-24"]["coverage"] == pytest.approx({"0.8": 2 / 3, "0.9": 1.0})
    assert bands["120-168"]["coverage"] == {"0.8": 0.5, "0.9": 0.5}
    assert bands["0-24"]["mae"] == pytest.approx(11 / 3)
    assert bands["0-24"]["bias"] == pytest.approx(11 / 3)
    assert bands["120-168"]["bias"] == pytest.approx(4.0)
    assert summary["coverage"] == {"0.8": 0.6, "0.9": 0.8}
    assert bands["0-24"]["too_few"] and bands["120-168"]["too_few"]


def test_band_counts_add_up_and_small_bands_are_marked() -> None:
    rng = np.random.default_rng(5)
    true = np.concatenate([rng.uniform(0.0, 216.0, 281), np.full(19, 230.0)])
    predicted = true + rng.normal(0.0, 8.0, 300)
    # 19 adults past 18 years: one short of MIN_BAND_IMAGES
    bands = summarise(predicted, true, np.zeros(300, dtype=bool))["by_age_band"]
    assert len(bands) == len(AGE_BANDS_MONTHS)
    assert sum(band["n"] for band in bands.values()) == 300
    assert bands["216+"]["n"] == MIN_BAND_IMAGES - 1 and bands["216+"]["too_few"]
    assert [name for name, band in bands.items() if band["too_few"]] == ["216+"]


def test_band_table_rows_say_what_metrics_hold() -> None:
    true = np.array([10.0, 12.0, 20.0, 130.0, 150.0])
    predicted = np.array([12.0, 20.0, 21.0, 126.0, 162.0])
    metrics = summarise(predicted, true, np.ones(5, dtype=bool), {"0.8": 5.0, "0.9": 10.0})
    header, rows = band_table(metrics)
    assert header == ["age (months)", "n", "MAE", "bias", "80% covered", "90% covered", "note"]
    # errors 2, 8, 1, -4, 12: MAE 27 / 5, bias 19 / 5
    assert rows[0] == ["all", "5", "5.40", "3.80", "60.0%", "80.0%", ""]
    assert rows[1] == ["0-24", "3", "3.67", "3.67", "66.7%", "100.0%", rows[1][-1]]
    assert rows[1][-1] == f"too few (n < {MIN_BAND_IMAGES})"
    assert len(rows) == 3


# -- evaluate ----------------------------------------------------------------------


def test_evaluate_writes_bootstrap_intervals_and_band_coverage(tmp_path: Path) -> None:
    quantiles = {"0.8": 40.0, "0.9": 60.0}
    loaded = _with_quantiles(untrained_model(arch="resnet18", input_size=32), quantiles)
    items = phantom_items(24, size=48, seed=2)
    report = evaluate(loaded, items, tmp_path / "e", device="cpu", progress=False, plots=False)
    metrics = json.loads(report.files["metrics"].read_text())
    boot = metrics["bootstrap"]
    assert (boot["resamples"], boot["unit"], boot["n_units"]) == (2000, "image", 24)
    assert boot["mae"][0] <= metrics["overall"]["mae"] <= boot["mae"][1]
    assert boot["bias"][0] <= metrics["overall"]["bias"] <= boot["bias"][1]

    # every band's coverage, recomputed from predictions.csv
    with report.files["predictions"].open() as fh:
        rows = list(csv.DictReader(fh))
    true = np.array([float(r["reference_months"]) for r in rows])
    predicted = np.array([float(r["predicted_months"]) for r in rows])
    bands = metrics["by_age_band"]
    assert sum(band["n"] for band in bands.values()) == 24
    for name, band in bands.items():  # "24-72", "216+"
        low, _, high = name.removesuffix("+").partition("-")
        inside = (true >= float(low)) & (true < float(high or "inf"))
        expected = interval_coverage(predicted[inside], true[inside], quantiles)
        assert band["coverage"] == pytest.approx(expected, abs=0.01)  # CSV: 2 decimals
        assert band["too_few"] is (int(inside.sum()) < MIN_BAND_IMAGES)

    text = report.files["report"].read_text()
    assert "95% confidence intervals (bootstrap, 2000 resamples of the 24 images" in text
    assert "## By age band" in text
    assert "| age (months) | n | MAE | bias | 80% covered | 90% covered | note |" in text
    assert "| too few (n < 20) |" in text
    assert "too few for the band's figures to mean anything" in text


def test_each_band_with_enough_images_has_intervals_of_its_own(tmp_path: Path) -> None:
    """30 images of 100 months and 5 of 150: the band 72-120 resamples its own 15
    patients (two images each), the band 120-168 (too few) has no intervals."""
    phantoms = phantom_items(20, size=48, seed=6)
    items = [
        LabelledImage(it.image, 100.0, it.male, f"{it.key}-{side}", group=it.key)
        for it in phantoms[:15]
        for side in ("left", "right")
    ] + [dataclasses.replace(it, age_months=150.0) for it in phantoms[15:]]
    loaded = untrained_model(arch="resnet18", input_size=32)
    report = evaluate(
        loaded, items, tmp_path / "e", device="cpu", progress=False, plots=False, bootstrap=500
    )
    bands = report.metrics["by_age_band"]
    within = bands["72-120"]["bootstrap"]
    assert within["n_units"] == 15
    assert within["mae"][0] <= bands["72-120"]["mae"] <= within["mae"][1]
    assert within["bias"][0] <= bands["72-120"]["bias"] <= within["bias"][1]
    # the band's own resampling: its errors alone, so its interval is not the overall one
    errors = np.array(report.metrics["bootstrap"]["mae"])
    assert not np.allclose(errors, within["mae"])
    assert bands["120-168"]["too_few"] and "bootstrap" not in bands["120-168"]
    written = json.loads(report.files["metrics"].read_text())["by_age_band"]
    assert written["72-120"]["bootstrap"] == within
    assert "bootstrap" not in written["120-168"]

    header, rows = band_interval_table(report.metrics) or pytest.fail("no intervals")
    assert header == ["age (months)", "n", "patients", "MAE 95% CI", "bias 95% CI"]
    mae_low, mae_high = within["mae"]
    assert rows[1] == [
        "72-120",
        "30",
        "15",
        f"{mae_low:.2f} to {mae_high:.2f}",
        rows[1][4],
    ]
    assert rows[2] == ["120-168", "5", "–", "–", "–"]
    text = report.files["report"].read_text()
    assert "### Confidence intervals by age band" in text
    assert f"| 72-120 | 30 | 15 | {mae_low:.2f} to {mae_high:.2f} |" in text


def test_evaluate_resamples_patients_where_images_have_them(tmp_path: Path) -> None:
    # 20 phantoms, two images of each child
    phantoms = phantom_items(10, size=48, seed=4)
    items = [
        LabelledImage(it.image, it.age_months, it.male, f"{it.key}-{side}", group=it.key)
        for it in phantoms
        for side in ("left", "right")
    ]
    loaded = untrained_model(arch="resnet18", input_size=32)
    report = evaluate(
        loaded, items, tmp_path / "e", device="cpu", progress=False, plots=False, bootstrap=500
    )
    boot = report.metrics["bootstrap"]
    assert (boot["resamples"], boot["unit"], boot["n_units"]) == (500, "patient", 10)
    assert "500 resamples of the 10 patients" in report.files["report"].read_text()


def test_evaluate_without_bootstrap_writes_none(tmp_path: Path) -> None:
    loaded = untrained_model(arch="resnet18", input_size=32)
    items = phantom_items(3, size=48)
    report = evaluate(
        loaded, items, tmp_path / "e", device="cpu", progress=False, plots=False, bootstrap=0
    )
    assert "bootstrap" not in json.loads(report.files["metrics"].read_text())
    assert "confidence intervals" not in report.files["report"].read_text()
    assert band_interval_table(report.metrics) is None
    with pytest.raises(ValueError, match="bootstrap must be 0"):
        evaluate(loaded, items, tmp_path / "f", device="cpu", progress=False, bootstrap=-1)
    assert not (tmp_path / "f").exists()


def test_evaluate_command_prints_the_intervals_and_the_band_table(tmp_path: Path) -> None:
    loaded = untrained_model(arch="resnet18", input_size=32, seed=1)
    checkpoint = tmp_path / "model.safetensors"
    quantiles = {"0.8": 40.0, "0.9": 60.0}
    save_checkpoint(checkpoint, loaded.model, dataclasses.replace(loaded.meta, quantiles=quantiles))
    args = ["evaluate", "--model", str(checkpoint), "--phantoms", "30", "--phantom-size", "48"]
    args += ["--no-plots"]

    result = CliRunner().invoke(
        main, [*args, "--bootstrap", "500", "-o", str(tmp_path / "a")], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    boot = metrics["bootstrap"]
    assert (boot["resamples"], boot["unit"], boot["n_units"]) == (500, "image", 30)
    printed = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert f"MAE {boot['mae'][0]:.2f} to {boot['mae'][1]:.2f}" in printed
    assert f"bias {boot['bias'][0]:.2f} to {boot['bias'][1]:.2f} months" in printed
    assert "80% covered" in printed and "90% covered" in printed
    assert "confidence intervals by age band" in printed
    for name, band in metrics["by_age_band"].items():
        shares = r"\s+│ ".join(re.escape(f"{band['coverage'][q]:.1%}") for q in ("0.8", "0.9"))
        cells = rf"│ {re.escape(name)}\s+│ {band['n']}\s+│ {band['mae']:.2f}\s+│ {band['bias']:.2f}"
        assert re.search(rf"{cells}\s+│ {shares}\s+│ too few", result.output), name

    result = CliRunner().invoke(
        main, [*args, "--bootstrap", "0", "-o", str(tmp_path / "b")], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "bootstrap" not in json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "confidence intervals" not in result.output


# -- what the service computes ------------------------------------------------------


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_evaluate_reports_the_bone_ages_the_service_computes(
    tmp_path: Path, precision: str
) -> None:
    # The worker runs the trunk in bfloat16 and pooling and head in float32; evaluate ran
    # the head in bfloat16 too, and its ages fell on a 0.32-month grid near 15 years.
    loaded = untrained_model(arch="resnet18", input_size=64)
    last = loaded.model.regressor[-1]
    assert isinstance(last, torch.nn.Linear)
    with torch.no_grad():
        last.bias.fill_(1.3)  # ages near 180 months, as a trained model's
    items = phantom_items(16, size=96, seed=5)
    report = evaluate(
        loaded,
        items,
        tmp_path,
        device="cpu",
        precision=precision,
        batch_size=16,
        progress=False,
        plots=False,
        bootstrap=0,
    )
    with report.files["predictions"].open() as fh:
        evaluated = [row["predicted_months"] for row in csv.DictReader(fh)]
    service = BoneAgePredictor(loaded, device="cpu", precision=precision).predict_batch(
        [it.image for it in items if isinstance(it.image, np.ndarray)], [it.male for it in items]
    )
    assert evaluated == [f"{p.bone_age_months:.2f}" for p in service]


def test_metrics_json_is_strict_json_with_null_for_what_is_not_a_number(tmp_path: Path) -> None:
    items = phantom_items(6, size=48, seed=0)  # bands of one image: no R² there
    report = evaluate(
        untrained_model(arch="resnet18", input_size=32),
        items,
        tmp_path,
        device="cpu",
        progress=False,
        plots=False,
        bootstrap=0,
    )

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in metrics.json")

    written = json.loads(report.files["metrics"].read_text(), parse_constant=refuse)
    nan_bands = [n for n, b in report.metrics["by_age_band"].items() if np.isnan(b["r2"])]
    assert nan_bands
    assert all(written["by_age_band"][name]["r2"] is None for name in nan_bands)
    assert written["overall"]["mae"] == report.metrics["overall"]["mae"]


@pytest.mark.parametrize("below", ["a file", "a folder no file can be created in"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_image_is_read(
    tmp_path: Path, below: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if below == "a file":
        (tmp_path / "taken").write_text("")
        output, problem = tmp_path / "taken" / "report", "is not a folder"
    else:
        import models.checkpoint  # where the folder is tried

        def refused(*_args: object, **_kwargs: object) -> tuple[int, str]:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(models.checkpoint.tempfile, "mkstemp", refused)
        output, problem = tmp_path / "new" / "report", f"no file can be created in {tmp_path}"
    reads: list[int] = []

    def image() -> np.ndarray:
        reads.append(1)
        return np.zeros((48, 48), np.float32)

    items = [LabelledImage(image=image, age_months=100.0, male=True) for _ in range(3)]
    loaded = untrained_model(arch="resnet18", input_size=32)
    with pytest.raises(ValueError, match=f"cannot write the report into {output}: .*{problem}"):
        evaluate(loaded, items, output, device="cpu", progress=False, plots=False)
    assert not reads
    assert not (tmp_path / "new").exists()
