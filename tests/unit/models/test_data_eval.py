"""Data reading, split, conformal quantile, metrics, augmentation, resumable training."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import LoadedModel, load_checkpoint, untrained_model
from models.data import (
    LabelledImage,
    LabelledSet,
    calibration_size_needed,
    conformal_quantile,
    load_image,
    parse_sex,
    phantom_items,
    read_rsna,
    source_counts,
    split_groups,
    stratified_split,
)
from models.evaluate import (
    bland_altman_limits,
    evaluate,
    interval_coverage,
    regression_metrics,
    summarise,
)
from models.preprocess import prepare
from models.train import TrainConfig, augment_batch, data_fingerprint, train
from tests.support import record_evaluated_datasets


def _write_rsna(folder: Path, rows: list[tuple[str, float, str]]) -> Path:
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for key, _age, _male in rows:
        Image.fromarray((rng.random((40, 30)) * 255).astype(np.uint8)).save(images / f"{key}.png")
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "boneage", "male"])
        writer.writerows(rows)
    return csv_path


def test_read_rsna(tmp_path: Path) -> None:
    csv_path = _write_rsna(tmp_path, [("1377", 180.0, "False"), ("1378", 12.0, "True")])
    (tmp_path / "images" / "1378.png").unlink()
    with open(csv_path, "a") as handle:
        handle.write("1379,60,1\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "images" / "1379.png")

    items = read_rsna(csv_path, tmp_path / "images")

    assert [(i.key, i.age_months, i.male) for i in items] == [
        ("1377", 180.0, False),
        ("1379", 60.0, True),
    ]
    assert (items.n_listed, items.n_missing) == (3, 1)
    assert source_counts(items) == (3, 1)
    image = load_image(items[0].image)
    assert image.shape == (40, 30)
    assert image.dtype == np.float32
    assert 0.0 <= image.min() <= image.max() <= 1.0


def test_read_rsna_names_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("id,age,male\n1,3,True\n")
    with pytest.raises(ValueError, match="'boneage'"):
        read_rsna(path, tmp_path)


def test_read_rsna_names_the_line_of_a_row_cut_short(tmp_path: Path) -> None:
    """A row with fewer cells than the header (a file cut off while copied) is an error
    naming its line; it was a TypeError from deep inside."""
    path = tmp_path / "cut.csv"
    path.write_text("id,boneage,male\n1,30,True\n2,40\n")
    with pytest.raises(ValueError, match=r"cut\.csv:3: the row has fewer cells"):
        read_rsna(path, tmp_path)


def test_load_image_from_callable_and_16_bit() -> None:
    raw = np.array([[0, 65535], [1000, 4000]], dtype=np.uint16)
    image = load_image(lambda: raw)
    assert image.max() == pytest.approx(1.0)


def test_stratified_split_is_disjoint_and_balanced() -> None:
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 228, size=400).tolist()
    males = (rng.random(400) < 0.5).tolist()
    train_idx, val_idx = stratified_split(ages, males, 0.2, seed=1)
    assert set(train_idx).isdisjoint(val_idx)
    assert sorted(train_idx + val_idx) == list(range(400))
    assert 70 <= len(val_idx) <= 90
    val_ages = np.array(ages)[val_idx]
    assert abs(np.median(val_ages) - np.median(ages)) < 20
    assert stratified_split(ages, males, 0.2, seed=1) == (train_idx, val_idx)


def test_conformal_quantile_rank() -> None:
    residuals = np.arange(1.0, 20.0)  # 19 values: rank ceil(20 * 0.9) = 18
    assert conformal_quantile(residuals, 0.9) == 18.0
    # rank past n: no finite interval has the coverage (it used to be the largest residual)
    assert conformal_quantile(residuals, 0.99) == math.inf


def test_conformal_quantile_of_a_small_calibration_set_is_infinite_past_its_reach() -> None:
    residuals = np.arange(1.0, 16.0)  # 15 values
    assert conformal_quantile(residuals, 0.95) == math.inf  # rank ceil(16 * 0.95) = 16 > 15
    assert conformal_quantile(residuals, 0.9) == 15.0  # rank ceil(16 * 0.9) = 15
    assert [calibration_size_needed(level) for level in (0.8, 0.9, 0.95)] == [4, 9, 19]
    for level in (0.8, 0.9, 0.95):
        n = calibration_size_needed(level)
        assert conformal_quantile(np.ones(n), level) == 1.0
        assert conformal_quantile(np.ones(n - 1), level) == math.inf


def test_a_small_validation_split_leaves_unreachable_levels_out_of_the_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    items = phantom_items(40, size=64, seed=0)  # 15 %: 6 validation images
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    with caplog.at_level(logging.WARNING, logger="models.train"):
        result = train(items, tmp_path / "s.safetensors", config=config, progress=False)
    assert result.meta.extra["n_val"] == 6
    quantiles = load_checkpoint(result.checkpoint).meta.quantiles
    assert set(quantiles) == {"0.8"}  # 0.9 needs 9 validation images, 0.95 needs 19
    assert all(math.isfinite(q) for q in quantiles.values())
    assert "no 95 % prediction interval" in caplog.text
    assert "needs at least 19 validation images" in caplog.text
    assert "needs at least 9 validation images" in caplog.text


def test_regression_metrics_by_hand() -> None:
    metrics = regression_metrics(np.array([10.0, 20.0, 40.0]), np.array([12.0, 20.0, 30.0]))
    assert metrics["mae"] == pytest.approx(4.0)
    assert metrics["rmse"] == pytest.approx(np.sqrt(104 / 3))
    assert metrics["bias"] == pytest.approx(8 / 3)
    assert metrics["within_6"] == pytest.approx(2 / 3)
    assert metrics["within_12"] == pytest.approx(1.0)
    # ss_tot = (12-20.67)^2 + (20-20.67)^2 + (30-20.67)^2 = 162.67; ss_res = 104.
    assert metrics["r2"] == pytest.approx(1 - 104 / 162.6667, rel=1e-4)


def test_interval_coverage_uses_clipped_intervals() -> None:
    coverage = interval_coverage(np.array([5.0, 100.0]), np.array([0.0, 130.0]), {"0.9": 10.0})
    assert coverage == {"0.9": 0.5}


def test_bland_altman_limits_are_in_the_overall_metrics(tmp_path: Path) -> None:
    pred, true = np.array([10.0, 20.0, 40.0]), np.array([12.0, 20.0, 30.0])
    # differences -2, 0, 10: mean 8/3, SD sqrt(124/3)
    low, high = bland_altman_limits(pred, true)
    assert low == pytest.approx(8 / 3 - 1.96 * np.sqrt(124 / 3))
    assert high == pytest.approx(8 / 3 + 1.96 * np.sqrt(124 / 3))
    overall = summarise(pred, true, np.array([True, False, True]))["overall"]
    assert (overall["loa_low"], overall["loa_high"]) == (low, high)
    assert all(np.isnan(bland_altman_limits(np.ones(1), np.ones(1))))

    loaded = untrained_model(arch="resnet18", input_size=32)
    report = evaluate(
        loaded, phantom_items(4, size=48), tmp_path / "e", device="cpu", progress=False, plots=False
    )
    written = json.loads(report.files["metrics"].read_text())["overall"]
    assert written["loa_low"] < written["bias"] < written["loa_high"]
    assert "limits of agreement" in report.files["report"].read_text()


def test_summarise_groups() -> None:
    pred = np.array([10.0, 50.0, 130.0, 200.0])
    true = np.array([12.0, 40.0, 120.0, 230.0])
    summary = summarise(pred, true, np.array([True, False, True, False]))
    assert summary["by_sex"]["male"]["n"] == 2
    assert set(summary["by_age_band"]) == {"0-24", "24-72", "120-168", "216+"}
    assert summary["coverage"] == {}


def test_augment_batch_is_reproducible() -> None:
    x = torch.randn(4, 1, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)


def test_evaluate_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    loaded = untrained_model(arch="resnet18", input_size=64)
    items = phantom_items(12, size=80, seed=3)
    report = evaluate(loaded, items, tmp_path / "eval", device="cpu", progress=False)
    for name in ("metrics", "report", "predictions", "pred_vs_true", "bland_altman"):
        assert report.files[name].is_file(), name
    assert report.files["residual_by_age"].read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads(report.files["metrics"].read_text())
    assert metrics["overall"]["n"] == 12
    assert metrics["model"]["trained"] is False
    assert "NO (random weights)" in report.files["report"].read_text()


def test_train_rejects_unknown_loss() -> None:
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="l3")  # type: ignore[arg-type]


def test_training_resumes_from_its_state(tmp_path: Path) -> None:
    items = phantom_items(40, size=72, seed=0)
    config = TrainConfig(
        arch="resnet18",
        input_size=64,
        epochs=1,
        batch_size=16,
        device="cpu",
        loss="huber",
        val_fraction=0.5,  # 20 validation images: enough for a finite 95 % quantile
        schedule="plateau",  # not planned over the epochs: a resume may add some
    )
    state = tmp_path / "state"
    first = train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    assert len(first.history) == 1
    assert (state / "train_state.json").is_file()

    config.epochs = 2
    second = train(
        items,
        tmp_path / "b.safetensors",
        config=config,
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    loaded = load_checkpoint(tmp_path / "b.safetensors")
    assert loaded.meta.trained is True
    assert set(loaded.meta.quantiles) == {"0.8", "0.9", "0.95"}
    assert loaded.meta.extra["epochs_run"] == 2


def test_resume_refuses_a_different_architecture(tmp_path: Path) -> None:
    items = phantom_items(20, size=72, seed=0)
    config = TrainConfig(arch="resnet18", input_size=64, epochs=1, batch_size=16, device="cpu")
    state = tmp_path / "state"
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    config.arch = "resnet34"
    with pytest.raises(ValueError, match="arch"):
        train(items, tmp_path / "b.safetensors", config=config, state_dir=state, resume=True)


def test_items_with_arrays_and_paths_mix(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(np.full((20, 20), 128, np.uint8)).save(path)
    item = LabelledImage(image=path, age_months=10.0, male=True)
    assert load_image(item.image).mean() == pytest.approx(128 / 255)


def test_training_is_reproducible(tmp_path: Path) -> None:
    # Same configuration and data → the same model, whatever ran before (dropout seeded).
    items = phantom_items(24, size=64, seed=3)
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    first = train(items, tmp_path / "a.safetensors", config=config, progress=False)
    torch.rand(7)  # disturb the global generator
    second = train(items, tmp_path / "b.safetensors", config=config, progress=False)
    assert first.model_id != "" and load_checkpoint(first.checkpoint).model_id == first.model_id
    assert _weights(first.checkpoint) == _weights(second.checkpoint)


def _weights(path: Path) -> bytes:
    from safetensors.torch import load_file

    return b"".join(t.numpy().tobytes() for _, t in sorted(load_file(path).items()))


def _with_clahe(loaded: LoadedModel) -> LoadedModel:
    return dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, clahe=True))


def test_evaluate_prepares_a_clahe_checkpoint_s_images_with_clahe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = record_evaluated_datasets(monkeypatch)
    loaded = _with_clahe(untrained_model(arch="resnet18", input_size=64))
    items = phantom_items(3, size=80, seed=3)
    evaluate(loaded, items, tmp_path / "eval", device="cpu", progress=False, plots=False)
    (dataset,) = made
    for index, item in enumerate(items):
        expected = prepare(load_image(item.image), 64, clahe=True).tensor
        torch.testing.assert_close(dataset[index][0], expected)
        assert not torch.allclose(dataset[index][0], prepare(load_image(item.image), 64).tensor)


def test_evaluate_of_a_clahe_checkpoint_without_opencv_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "cv2", None)
    loaded = _with_clahe(untrained_model(arch="resnet18", input_size=64))
    with pytest.raises(ImportError, match=r"boneage-worker\[train\]"):
        evaluate(loaded, phantom_items(2, size=80), tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval").exists()


def test_training_with_clahe_writes_it_into_the_checkpoint(tmp_path: Path) -> None:
    items = phantom_items(12, size=64, seed=3)
    config = TrainConfig(
        arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu", clahe=True
    )
    result = train(items, tmp_path / "c.safetensors", config=config, progress=False)
    loaded = load_checkpoint(result.checkpoint)
    assert loaded.meta.clahe is True
    assert loaded.meta.format_version == 2


def test_stratified_split_keeps_each_patient_on_one_side() -> None:
    rng = np.random.default_rng(0)
    # 150 children with one to four images each (both hands, follow-ups a year apart)
    ages: list[float] = []
    males: list[bool] = []
    groups: list[str] = []
    for child in range(150):
        age, male = float(rng.uniform(0, 200)), bool(rng.random() < 0.5)
        for visit in range(int(rng.integers(1, 5))):
            ages.append(age + 12.0 * visit)
            males.append(male)
            groups.append(f"child-{child}")
    train_idx, val_idx = stratified_split(ages, males, 0.2, seed=1, groups=groups)

    assert set(train_idx).isdisjoint(val_idx)
    assert sorted(train_idx + val_idx) == list(range(len(ages)))
    train_groups = {groups[i] for i in train_idx}
    val_groups = {groups[i] for i in val_idx}
    assert train_groups.isdisjoint(val_groups)
    assert 25 <= len(val_groups) <= 35  # a fifth of 150 children
    val_ages = np.array(ages)[val_idx]
    assert abs(np.median(val_ages) - np.median(ages)) < 20
    val_males = np.array(males)[val_idx]
    assert abs(val_males.mean() - np.mean(males)) < 0.15
    assert stratified_split(ages, males, 0.2, seed=1, groups=groups) == (train_idx, val_idx)


def test_stratified_split_without_groups_splits_images_as_before() -> None:
    rng = np.random.default_rng(3)
    ages = rng.uniform(0, 228, size=50).tolist()
    males = (rng.random(50) < 0.5).tolist()
    alone = stratified_split(ages, males, 0.2, seed=4)
    assert stratified_split(ages, males, 0.2, seed=4, groups=list(range(50))) == alone
    items = [LabelledImage(np.zeros(1), a, m) for a, m in zip(ages, males, strict=True)]
    assert stratified_split(ages, males, 0.2, seed=4, groups=split_groups(items)) == alone


def test_stratified_split_refuses_one_patient() -> None:
    with pytest.raises(ValueError, match="12 images of 1 patient"):
        stratified_split([100.0] * 12, [True] * 12, 0.2, groups=["p"] * 12)


def test_training_splits_by_patient(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = [
        dataclasses.replace(item, group=f"g{index // 2}")  # pairs of images per patient
        for index, item in enumerate(phantom_items(24, size=64, seed=3))
    ]
    config = TrainConfig(
        arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu", val_fraction=0.25
    )
    with caplog.at_level(logging.INFO, logger="models.train"):
        result = train(items, tmp_path / "g.safetensors", config=config, progress=False)
    n_train, n_val = result.meta.extra["n_train"], result.meta.extra["n_val"]
    assert n_train + n_val == 24
    assert n_val % 2 == 0  # whole patients
    assert n_val == 6  # a quarter of the 12 patients, with their images
    assert "validation 3 of 12 patients (25.0 %), 6 of 24 images (25.0 %)" in caplog.text


@pytest.mark.parametrize(
    ("header", "rows"),
    [
        (["id", "boneage", "male"], [["1377", "180", "False"], ["1378", "12", "True"]]),
        # the RSNA validation set
        (
            ["Image ID", "male", "Bone Age (months)"],
            [["1377", "FALSE", "180"], ["1378", "TRUE", "12"]],
        ),
        # the RSNA test set, with spaces and another case around the names
        (
            ["Case ID", " Sex", "Ground truth bone age (months) "],
            [["1377", "F", "180"], ["1378", "M", "12"]],
        ),
        (["ID", "BoneAge", "MALE"], [["1377", "180", "0"], ["1378", "12", "1"]]),
    ],
)
def test_read_rsna_reads_each_rsna_header(
    tmp_path: Path, header: list[str], rows: list[list[str]]
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for key in ("1377", "1378"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / f"{key}.png")
    csv_path = tmp_path / "labels.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)

    items = read_rsna(csv_path, images)

    assert [(i.key, i.age_months, i.male) for i in items] == [
        ("1377", 180.0, False),
        ("1378", 12.0, True),
    ]


def test_read_rsna_names_the_accepted_headers_of_a_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("Case ID,Sex,Age\n1,M,3\n")
    with pytest.raises(ValueError, match=r"no 'boneage' column \(one of 'boneage', 'ground truth"):
        read_rsna(path, tmp_path)


def test_parse_sex_raises_on_what_is_not_a_sex() -> None:
    assert [parse_sex(v) for v in ("M", " female ", "True", "0", "t", "YES")] == [
        True,
        False,
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError, match="cannot read sex from 'U'"):
        parse_sex("U")


def _rsna_with_a_missing_image(folder: Path) -> LabelledSet:
    rows = [(str(k), 20.0 + 15 * k, "True" if k % 2 else "False") for k in range(12)]
    csv_path = _write_rsna(folder, rows)
    (folder / "images" / "5.png").unlink()
    return read_rsna(csv_path, folder / "images")


def test_evaluate_refuses_a_set_with_missing_images(tmp_path: Path) -> None:
    items = _rsna_with_a_missing_image(tmp_path)
    loaded = untrained_model(arch="resnet18", input_size=32)
    with pytest.raises(ValueError, match="1 of the 12 images the labels list are missing"):
        evaluate(loaded, items, tmp_path / "eval", device="cpu", progress=False)
    assert not (tmp_path / "eval").exists()


def test_evaluate_allowed_to_miss_images_says_how_many(tmp_path: Path) -> None:
    items = _rsna_with_a_missing_image(tmp_path)
    loaded = untrained_model(arch="resnet18", input_size=32)
    report = evaluate(
        loaded,
        items,
        tmp_path / "eval",
        device="cpu",
        progress=False,
        plots=False,
        allow_missing=True,
    )
    metrics = json.loads(report.files["metrics"].read_text())
    assert (metrics["n_listed"], metrics["n_missing"], metrics["overall"]["n"]) == (12, 1, 11)
    assert "11 evaluated of 12 listed, 1 missing" in report.files["report"].read_text()


def test_evaluate_of_a_complete_set_counts_no_missing_image(tmp_path: Path) -> None:
    loaded = untrained_model(arch="resnet18", input_size=32)
    report = evaluate(
        loaded, phantom_items(3, size=48), tmp_path / "e", device="cpu", progress=False, plots=False
    )
    assert (report.metrics["n_listed"], report.metrics["n_missing"]) == (3, 0)


def test_training_records_missing_images_in_the_checkpoint(tmp_path: Path) -> None:
    items = _rsna_with_a_missing_image(tmp_path)
    config = TrainConfig(arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu")
    result = train(items, tmp_path / "m.safetensors", config=config, progress=False)
    extra = load_checkpoint(result.checkpoint).meta.extra
    assert (extra["n_listed"], extra["n_missing"]) == (12, 1)


def test_data_fingerprint_covers_labels_and_patients_not_order() -> None:
    items = phantom_items(6, size=48, seed=0)
    assert data_fingerprint(items) == data_fingerprint(items[::-1])
    relabelled = [dataclasses.replace(items[0], age_months=items[0].age_months + 1), *items[1:]]
    assert data_fingerprint(relabelled) != data_fingerprint(items)
    grouped = [dataclasses.replace(items[0], group="g"), *items[1:]]
    assert data_fingerprint(grouped) != data_fingerprint(items)
    assert data_fingerprint(items[:-1]) != data_fingerprint(items)


def test_resume_refuses_other_data_or_settings(tmp_path: Path) -> None:
    items = phantom_items(20, size=48, seed=0)
    config = TrainConfig(
        arch="resnet18", input_size=32, epochs=1, batch_size=8, device="cpu", schedule="plateau"
    )
    state = tmp_path / "state"
    train(items, tmp_path / "a.safetensors", config=config, state_dir=state, progress=False)
    saved = json.loads((state / "train_state.json").read_text())
    assert saved["data_sha256"] == data_fingerprint(items)
    resumed = dataclasses.replace(config, epochs=2)

    def resume(data: list[LabelledImage], cfg: TrainConfig) -> None:
        train(data, tmp_path / "b.safetensors", config=cfg, state_dir=state, resume=True)

    relabelled = [dataclasses.replace(items[0], age_months=items[0].age_months + 6), *items[1:]]
    with pytest.raises(ValueError, match="cannot resume: the training data changed"):
        resume(relabelled, resumed)
    with pytest.raises(ValueError, match="cannot resume: the training data changed"):
        resume([*items, *phantom_items(1, size=48, seed=9)], resumed)
    for change in ({"loss": "mse"}, {"augment": False}, {"clahe": True}):
        (key,) = change
        with pytest.raises(ValueError, match=f"cannot resume: {key} was"):
            resume(items, dataclasses.replace(resumed, **change))
    assert not (tmp_path / "b.safetensors").exists()
    resume(items[::-1], resumed)  # the same data in another order: fine
    assert load_checkpoint(tmp_path / "b.safetensors").meta.extra["epochs_run"] == 2
