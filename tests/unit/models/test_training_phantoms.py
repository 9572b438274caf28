"""A short CPU training run on phantoms: it learns, reads age where the phantom shows it,
its Grad-CAM maps depend on what it learned, and its prediction intervals cover about as
often as they claim.

One model is trained for the whole module (resnet18, 96 px, 300 phantoms, 8 epochs:
about a minute on two cores) and then checked on phantoms it has never seen.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from models.checkpoint import LoadedModel, load_checkpoint
from models.data import phantom_items
from models.evaluate import EvaluationReport, evaluate
from models.gradcam import predict_with_cam
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor
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


def _phantoms_with_masks(count: int, seed: int) -> list[tuple[torch.Tensor, bool, torch.Tensor]]:
    """Network inputs of unseen phantoms, each with its informative mask on the input grid."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        age = float(rng.uniform(40.0, 228.0))
        male = bool(rng.random() < 0.5)
        phantom = make_phantom(age, male=male, size=120, rng=rng)
        prepared = prepare(phantom.image, SIZE)
        top, left, bottom, right = prepared.crop_box
        crop = phantom.informative_mask[top:bottom, left:right].astype(np.float32)
        mask = F.interpolate(torch.from_numpy(crop)[None, None], size=(SIZE, SIZE))[0, 0] > 0.5
        out.append((prepared.tensor[None], male, mask))
    return out


def test_the_model_reads_age_where_the_phantom_shows_it(
    trained: tuple[TrainResult, LoadedModel],
) -> None:
    # Age is drawn only inside the informative mask (carpus, distal radius and ulna, about
    # 4 % of the input). Greying that region out must move the estimate far more than
    # greying out the same shape a quarter of the input nearer the fingers (palm and
    # metacarpals: bone too, but drawn independently of age). Measured on the machine this
    # was written on: 4.0 times more, on average over 60 phantoms.
    _, loaded = trained
    model = loaded.model.eval()
    informative: list[float] = []
    control: list[float] = []
    with torch.no_grad():
        for x, male, mask in _phantoms_with_masks(60, seed=2024):
            sex = torch.tensor([float(male)])
            estimate = float(model(x, sex))
            shifted = torch.roll(mask, shifts=-SIZE // 4, dims=0) & ~mask
            for region, changes in ((mask, informative), (shifted, control)):
                greyed = x.clone()
                greyed[0, 0][region] = x.mean()
                changes.append(abs(float(model(greyed, sex)) - estimate))
    assert np.mean(informative) >= 2.0 * np.mean(control), (
        np.mean(informative),
        np.mean(control),
    )


def test_gradcam_maps_depend_on_what_the_model_learned(
    trained: tuple[TrainResult, LoadedModel],
) -> None:
    # The model-randomisation check for saliency maps (Adebayo et al., "Sanity checks for
    # saliency maps", NeurIPS 2018): maps of the trained model and of the same model with
    # its head re-initialised must differ. A map that ignored the head's gradient (the
    # layer4 activations alone, as an edge detector would) is the same for both.
    # Measured when written: mean rank correlation -0.10 to -0.23 for three seeds.
    #
    # (Whether the map of this small model falls on the informative region is not tested:
    # at 96 px layer4 is a 3 x 3 grid whose every cell sees the whole input, and a short
    # CPU training run differs in rounding from one processor to the next. Two such tests
    # held on the machine they were written on and failed on the next: peaks in the region
    # 41 % of the time against 33 % by chance; peaks where occlusion lowers the estimate
    # most 4 of 60 times against 1 in 9 by chance. Where a real model looks on real
    # radiographs is a matter for its validation, not for a unit test.)
    _, loaded = trained
    model = loaded.model.eval()
    randomised = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for module in [*randomised.regressor.modules(), *randomised.sex_embed.modules()]:
            if isinstance(module, torch.nn.Linear):
                module.reset_parameters()
    correlations = []
    for x, male, _ in _phantoms_with_masks(60, seed=2024):
        ours = predict_with_cam(model, x, float(male))[1][0].flatten().numpy()
        other = predict_with_cam(randomised, x, float(male))[1][0].flatten().numpy()
        if ours.max() > 0 and other.max() > 0:
            correlations.append(float(spearmanr(ours, other).statistic))
    assert len(correlations) >= 20, len(correlations)
    assert np.nanmean(correlations) < 0.5, correlations


def test_bfloat16_changes_bone_ages_by_a_month_or_two(
    trained: tuple[TrainResult, LoadedModel],
    report: EvaluationReport,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # BONEAGE_PRECISION=bfloat16 on a CPU runs the trunk with 8 bits of mantissa; the
    # pooling, the head and the reported numbers stay float32, in the worker and in
    # `evaluate --precision bfloat16` alike. What a site sees when it validates it:
    # nearly the same metrics, each image within a month of float32 (on an AMD EPYC
    # without bfloat16 instructions, where oneDNN emulates it: mean 0.13, max 0.69 months;
    # MAE 20.99 against 21.00. The 0.20 and 0.75 first measured here, on an EPYC with
    # AVX-512 BF16, were of an evaluate that ran the head in bfloat16 too, as the worker
    # does not: 0.17 and 0.71 on the EPYC without). A real model at 512 px on real
    # radiographs needs its own such comparison before a site turns it on.
    _, loaded = trained
    test_items = phantom_items(150, size=120, seed=12345)
    lower = evaluate(
        loaded,
        test_items,
        tmp_path_factory.mktemp("eval-bf16"),
        device="cpu",
        precision="bfloat16",
        progress=False,
        plots=False,
    )
    assert (report.metrics["precision"], lower.metrics["precision"]) == ("float32", "bfloat16")
    assert "precision of the trunk: bfloat16" in lower.files["report"].read_text()

    def predicted(r: EvaluationReport) -> np.ndarray:
        rows = r.files["predictions"].read_text().splitlines()[1:]
        return np.array([float(row.split(",")[3]) for row in rows])

    change = np.abs(predicted(lower) - predicted(report))
    print(f"bfloat16 - float32: mean {change.mean():.3f}, max {change.max():.3f} months")
    assert change.max() > 0  # it did run in bfloat16
    assert change.mean() < 1.0 and change.max() < 4.0, (change.mean(), change.max())
    overall, lower_overall = report.metrics["overall"], lower.metrics["overall"]
    print(f"MAE float32 {overall['mae']:.2f}, bfloat16 {lower_overall['mae']:.2f} months")
    assert abs(lower_overall["mae"] - overall["mae"]) < 0.5

    # The service's predictor reports what the evaluation showed: evaluate runs the same
    # folded, channels-last copy with the same split of precisions (the trunk alone in
    # bfloat16), so one image at a time gives what batches of 16 gave, up to
    # predictions.csv's rounding to 0.01 months (the same numbers on the EPYC without
    # bfloat16 instructions). While evaluate ran the head in bfloat16 too they were 0.29
    # months apart at most (0.39 on the EPYC without), put down then to the batch size.
    # Its heat map barely moves.
    single = BoneAgePredictor(loaded, device="cpu")
    half = BoneAgePredictor(loaded, device="cpu", precision="bfloat16")
    assert (single.runs_on, half.runs_on) == ("cpu", "cpu, bfloat16")
    evaluated = predicted(lower)
    gaps = []
    for index, item in enumerate(test_items[:10]):
        assert isinstance(item.image, np.ndarray)
        a = single.predict(item.image, male=item.male)
        b = half.predict(item.image, male=item.male)
        gaps.append(abs(b.bone_age_months - evaluated[index]))
        assert abs(a.bone_age_months - b.bone_age_months) < 4.0
        assert np.abs(a.crop_cam - b.crop_cam).max() < 0.1
    print(f"service vs evaluate in bfloat16: max {max(gaps):.3f} months")
    assert max(gaps) < 0.1, gaps
