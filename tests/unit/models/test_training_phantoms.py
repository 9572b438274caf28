"""A short CPU training run on phantoms: it learns, looks at the right place, and its
prediction intervals cover about as often as they claim.

One model is trained for the whole module (resnet18, 96 px, 300 phantoms, 8 epochs:
about a minute on two cores) and then checked on phantoms it has never seen.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import LoadedModel, load_checkpoint
from models.data import phantom_items
from models.evaluate import EvaluationReport, evaluate
from models.gradcam import predict_with_cam
from models.phantoms import make_phantom
from models.preprocess import prepare
from models.train import TrainConfig, TrainResult, train

pytestmark = pytest.mark.slow

SIZE = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, LoadedModel]:
    folder = tmp_path_factory.mktemp("train")
    items = phantom_items(300, size=120, seed=0)
    config = TrainConfig(
        arch="resnet18",
        input_size=SIZE,
        epochs=8,
        batch_size=32,
        lr=1e-3,
        warmup_steps=10,
        patience=8,
        val_fraction=0.2,
        device="cpu",
        data_description="300 phantoms",
    )
    with torch.random.fork_rng(devices=[]):
        result = train(items, folder / "phantom.safetensors", config=config, progress=False)
    return result, load_checkpoint(result.checkpoint)


@pytest.fixture(scope="module")
def report(
    trained: tuple[TrainResult, LoadedModel], tmp_path_factory: pytest.TempPathFactory
) -> EvaluationReport:
    _, loaded = trained
    test_items = phantom_items(150, size=120, seed=12345)
    return evaluate(
        loaded, test_items, tmp_path_factory.mktemp("eval"), device="cpu", progress=False
    )


def test_checkpoint_records_training(trained: tuple[TrainResult, LoadedModel]) -> None:
    result, loaded = trained
    assert loaded.model_id == result.model_id
    assert loaded.meta.trained is True
    assert loaded.meta.data == "300 phantoms"
    assert set(loaded.meta.quantiles) == {"0.8", "0.9", "0.95"}
    q = loaded.meta.quantiles
    assert 0 < q["0.8"] <= q["0.9"] <= q["0.95"]
    assert 50 <= loaded.meta.metrics["n"] <= 70


def test_learns_far_better_than_predicting_the_mean(
    trained: tuple[TrainResult, LoadedModel], report: EvaluationReport
) -> None:
    _, loaded = trained
    true = np.array([it.age_months for it in phantom_items(150, size=16, seed=12345)])
    baseline_mae = float(np.mean(np.abs(true - loaded.meta.target_mean)))
    mae = report.metrics["overall"]["mae"]
    assert baseline_mae > 45.0
    assert mae < 0.6 * baseline_mae, (mae, baseline_mae)
    assert report.metrics["overall"]["r2"] > 0.6


def test_interval_coverage_is_near_nominal(report: EvaluationReport) -> None:
    coverage = report.metrics["coverage"]
    # 60 calibration and 150 test images: allow for sampling error (SE ≈ 0.03-0.05).
    assert coverage["0.8"] >= 0.65
    assert coverage["0.9"] >= 0.77
    assert coverage["0.95"] >= 0.84


def _mask_share_per_cell(
    mask: np.ndarray, crop_box: tuple[int, int, int, int], grid: tuple[int, int]
) -> np.ndarray:
    """Share of each CAM cell (over the square crop) that lies in the informative mask."""
    top, left, bottom, right = crop_box
    height, width = mask.shape
    crop = np.zeros((bottom - top, right - left), dtype=bool)
    y0, y1, x0, x1 = max(top, 0), min(bottom, height), max(left, 0), min(right, width)
    crop[y0 - top : y1 - top, x0 - left : x1 - left] = mask[y0:y1, x0:x1]
    gh, gw = grid
    rows = np.array_split(np.arange(crop.shape[0]), gh)
    cols = np.array_split(np.arange(crop.shape[1]), gw)
    return np.array([[crop[np.ix_(r, c)].mean() for c in cols] for r in rows])


def test_gradcam_peak_falls_in_the_informative_region(
    trained: tuple[TrainResult, LoadedModel],
) -> None:
    # Grad-CAM keeps positive evidence (ReLU): evidence for an OLDER age. Phantoms well
    # above the training mean have it, and it can only come from the carpus and distal
    # radius/ulna. At 96 px the map is 3x3, so a hit is the peak cell overlapping the
    # region; chance is the share of cells that overlap it (about a third).
    _, loaded = trained
    rng = np.random.default_rng(2024)
    hits, chance = [], []
    for _ in range(30):
        age = float(rng.uniform(160.0, 228.0))
        male = bool(rng.random() < 0.5)
        phantom = make_phantom(age, male=male, size=120, rng=rng)
        prepared = prepare(phantom.image, SIZE)
        _, cam = predict_with_cam(loaded.model, prepared.tensor[None], float(male))
        grid = cam[0].numpy()
        if grid.max() <= 0:
            hits.append(False)
            continue
        share = _mask_share_per_cell(phantom.informative_mask, prepared.crop_box, grid.shape)
        peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
        hits.append(bool(share[peak] > 0))
        chance.append(float((share > 0).mean()))
    assert np.mean(hits) >= 0.7, np.mean(hits)
    assert np.mean(hits) > np.mean(chance) + 0.25
