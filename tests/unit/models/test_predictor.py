"""BoneAgePredictor: full-image CAM, de-z-scoring, clipping, intervals, device."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

import models.predictor
from dicom_io.content import TRUNK_PRECISIONS
from models.checkpoint import LoadedModel, untrained_model
from models.fused import fusion_available, is_fused
from models.gradcam import predict_with_cam
from models.phantoms import make_phantom
from models.predictor import (
    PRECISIONS,
    BoneAgePredictor,
    DeviceFailure,
    _warn_bfloat16_emulated,
    cpu_computes_bfloat16,
    intervals_for,
    is_device_failure,
    precision_name,
    resolve_device,
    resolve_precision,
    torch_threads,
)
from models.preprocess import prepare
from tests.unit.models.helpers import with_trained_batch_norms
from worker.settings import Precision


@pytest.fixture
def loaded() -> LoadedModel:
    return untrained_model(arch="resnet18", input_size=64)


@pytest.fixture
def image() -> np.ndarray:
    return make_phantom(100.0, male=True, size=150, rng=np.random.default_rng(0)).image[:, 10:]


def test_predict_returns_full_size_cam(loaded: LoadedModel, image: np.ndarray) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    result = predictor.predict(image, male=True)
    assert result.cam.shape == image.shape
    assert result.cam.dtype == np.float32
    assert 0.0 <= float(result.cam.min()) <= float(result.cam.max()) <= 1.0
    assert 0.0 <= result.bone_age_months <= 240.0
    assert result.intervals == {}


def test_predict_de_z_scores_with_meta(loaded: LoadedModel, image: np.ndarray) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    x = prepare(image, 64).tensor[None]
    z, _ = predict_with_cam(loaded.model, x, torch.ones(1))
    expected = float(z[0]) * loaded.meta.target_sd + loaded.meta.target_mean
    assert predictor.predict(image, male=True).bone_age_months == pytest.approx(
        float(np.clip(expected, 0, 240)), abs=1e-3
    )


def test_bone_age_is_clipped(loaded: LoadedModel, image: np.ndarray) -> None:
    high = dataclasses.replace(loaded.meta, target_mean=10_000.0)
    predictor = BoneAgePredictor(dataclasses.replace(loaded, meta=high), device="cpu")
    assert predictor.predict(image, male=False).bone_age_months == 240.0


@pytest.mark.parametrize(
    ("target_mean", "shown", "clipped"),
    [(-10_000.0, 0.0, True), (10_000.0, 240.0, True), (100.0, None, False)],
    ids=["below", "above", "inside"],
)
def test_a_clipped_estimate_is_flagged_with_the_model_s_own(
    loaded: LoadedModel, image: np.ndarray, target_mean: float, shown: float | None, clipped: bool
) -> None:
    """The limit an estimate was clipped to read as a bone age, with nothing to say it
    was not the model's (found in review): the prediction keeps the estimate and says so."""
    meta = dataclasses.replace(loaded.meta, target_mean=target_mean, target_sd=1.0)
    predictor = BoneAgePredictor(dataclasses.replace(loaded, meta=meta), device="cpu")
    x = prepare(image, 64).tensor[None]
    z, _ = predict_with_cam(loaded.model, x, torch.ones(1))
    raw = float(z[0]) + target_mean
    result = predictor.predict(image, male=True)
    assert result.clipped is clipped
    assert result.raw_bone_age_months == pytest.approx(raw, abs=1e-3)
    assert result.bone_age_months == (shown if shown is not None else result.raw_bone_age_months)


def test_intervals_from_quantiles(loaded: LoadedModel, image: np.ndarray) -> None:
    meta = dataclasses.replace(loaded.meta, quantiles={"0.8": 10.0, "0.9": 14.0, "0.95": 18.0})
    predictor = BoneAgePredictor(dataclasses.replace(loaded, meta=meta), device="cpu")
    result = predictor.predict(image, male=True)
    assert sorted(result.intervals) == [0.8, 0.9, 0.95]
    low, high = result.intervals[0.9]
    age = result.bone_age_months
    assert low == pytest.approx(max(0.0, age - 14.0))
    assert high == pytest.approx(min(240.0, age + 14.0))


def test_intervals_are_clipped_to_the_age_range(loaded: LoadedModel) -> None:
    meta = dataclasses.replace(loaded.meta, quantiles={"0.95": 30.0})
    assert intervals_for(10.0, meta) == {0.95: (0.0, 40.0)}
    assert intervals_for(230.0, meta) == {0.95: (200.0, 240.0)}


def test_batch_equals_single(loaded: LoadedModel, image: np.ndarray) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    other = make_phantom(30.0, male=False, size=120, rng=np.random.default_rng(1)).image
    batch = predictor.predict_batch([image, other], [True, False])
    single = predictor.predict(other, male=False)
    assert batch[1].bone_age_months == pytest.approx(single.bone_age_months, abs=1e-3)
    np.testing.assert_allclose(batch[1].cam, single.cam, atol=1e-4)


def test_properties(loaded: LoadedModel) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    assert predictor.model_id == loaded.model_id
    assert predictor.meta is loaded.meta
    assert predictor.device == "cpu"
    assert (predictor.precision, predictor.runs_on) == ("float32", "cpu")


def test_precision_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    _warn_bfloat16_emulated.cache_clear()  # said once per process: maybe already said
    assert resolve_precision("auto", cpu) is torch.float32
    assert resolve_precision("float32", cpu) is torch.float32
    with caplog.at_level("WARNING", logger="models.predictor"):
        assert resolve_precision("bfloat16", cpu) is torch.bfloat16
    # opt-in either way; a CPU without bfloat16 instructions is told it is emulated
    emulated = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(emulated) == (0 if cpu_computes_bfloat16() else 1)
    with pytest.raises(ValueError, match="float16 does not run on cpu: use bfloat16 or float32"):
        resolve_precision("float16", cpu)
    with pytest.raises(ValueError, match="must be one of auto, float32, bfloat16, float16"):
        resolve_precision("half", cpu)


def test_one_list_of_precisions_everywhere() -> None:
    # the setting, the CLI, the predictor and what an SR may say take the same values
    assert get_args(Precision) == PRECISIONS
    assert ("auto", *TRUNK_PRECISIONS) == PRECISIONS
    assert [precision_name(resolve_precision(p, torch.device("cpu"))) for p in PRECISIONS[:3]] == [
        "float32",
        "float32",
        "bfloat16",
    ]


def test_cpu_bfloat16_instructions_are_read_from_the_cpu_flags() -> None:
    flags = " ".join(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if "flags" in line
    ).split()
    native = any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
    assert cpu_computes_bfloat16() is native


def test_cpu_float32_predictor_runs_fused_convolutions_and_gives_the_model_s_result(
    loaded: LoadedModel, image: np.ndarray
) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu", precision="float32")
    assert predictor.fused_convolutions is (fusion_available() is None)
    x = prepare(image, 64).tensor[None]
    z, cam = predict_with_cam(loaded.model, x, torch.zeros(1))
    result = predictor.predict(image, male=False)
    expected = float(z[0]) * loaded.meta.target_sd + loaded.meta.target_mean
    assert result.bone_age_months == pytest.approx(float(np.clip(expected, 0, 240)), abs=1e-3)
    np.testing.assert_allclose(result.crop_cam, cam[0].numpy(), rtol=0, atol=1e-4)
    assert loaded.model.conv1.weight.dtype == torch.float32  # the caller's module untouched
    assert isinstance(loaded.model.bn1, torch.nn.BatchNorm2d)


def test_a_predictor_packed_for_other_thread_counts_runs_each_count_on_its_own_copy(
    loaded: LoadedModel, image: np.ndarray
) -> None:
    with_trained_batch_norms(loaded.model, seed=3)
    with torch_threads(1):
        predictor = BoneAgePredictor(loaded, device="cpu", precision="float32", cpu_threads=[2])
        alone = predictor.predict(image, male=True)
    if fusion_available() is not None:
        assert predictor.thread_counts == ()  # nothing is packed: nothing to choose
        return
    assert predictor.thread_counts == (1, 2)
    one, two = predictor.inference_model(1), predictor.inference_model(2)
    assert one is not two and is_fused(one) and is_fused(two)
    assert predictor.inference_model(3) is one  # a count not packed for: the first copy
    ran: list[torch.nn.Module] = []
    stems = [copy.get_submodule("stem") for copy in (one, two)]
    for stem in stems:  # the first convolution of each copy says when it runs
        stem.register_forward_hook(lambda module, *_: ran.append(module))
    with torch_threads(2):
        shared = predictor.predict(image, male=True)
    assert ran == [stems[1]]
    # the same result, up to float rounding, whichever copy gave it
    assert shared.bone_age_months == pytest.approx(alone.bone_age_months, abs=1e-3)
    np.testing.assert_allclose(shared.crop_cam, alone.crop_cam, atol=1e-4)


def test_bfloat16_predictor_runs_the_trunk_in_bfloat16_and_reports_float32(
    loaded: LoadedModel, image: np.ndarray
) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu", precision="bfloat16")
    assert (predictor.precision, predictor.runs_on) == ("bfloat16", "cpu, bfloat16")
    assert not predictor.fused_convolutions  # fused convolutions are float32 only
    seen: list[torch.dtype] = []
    hook = predictor._model.layer4.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        result = predictor.predict(image, male=True)
    finally:
        hook.remove()
    assert seen == [torch.bfloat16]
    assert isinstance(result.bone_age_months, float)
    assert result.crop_cam.dtype == np.float32 and result.crop_cam.min() >= 0.0
    assert result.crop_cam.max() <= 1.0


def test_auto_device() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_bad_device_string() -> None:
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")


def test_cam_at_a_smaller_shape_matches_the_downscaled_full_cam(
    loaded: LoadedModel, image: np.ndarray
) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    result = predictor.predict(image, male=True)
    full = torch.from_numpy(result.cam)[None, None]
    shape = (image.shape[0] // 2, image.shape[1] // 2)
    expected = torch.nn.functional.interpolate(full, size=shape, mode="area")[0, 0].numpy()
    small = result.cam_at(shape)
    assert small.shape == shape and small.dtype == np.float32
    # same map, up to where the crop edges fall on the coarser grid
    assert np.abs(small - expected).mean() < 0.02
    assert result.cam_at(image.shape) is result.cam


def test_warm_up_leaves_predictions_unchanged(loaded: LoadedModel, image: np.ndarray) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    before = predictor.predict(image, male=False).bone_age_months
    assert predictor.warm_up() > 0
    assert predictor.predict(image, male=False).bone_age_months == before
    assert all(p.grad is None for p in loaded.model.parameters())  # nothing accumulated


def test_predictor_runs_a_folded_copy_that_agrees_with_the_checkpoint_model(
    loaded: LoadedModel, image: np.ndarray
) -> None:
    # batch norms with real statistics, so folding them changes every weight
    with_trained_batch_norms(loaded.model, seed=3)
    predictor = BoneAgePredictor(loaded, device="cpu")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.model.modules())
    result = predictor.predict(image, male=True)
    prepared = prepare(image, loaded.meta.input_size)
    z, cam = predict_with_cam(loaded.model, prepared.tensor[None], torch.ones(1))
    expected = float(z[0]) * loaded.meta.target_sd + loaded.meta.target_mean
    assert result.bone_age_months == pytest.approx(float(np.clip(expected, 0, 240)), abs=1e-3)
    np.testing.assert_allclose(result.crop_cam, cam[0].numpy(), atol=1e-4)


def _clahe_model(loaded: LoadedModel) -> LoadedModel:
    return dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, clahe=True))


def test_a_clahe_checkpoint_is_prepared_with_clahe(loaded: LoadedModel, image: np.ndarray) -> None:
    predictor = BoneAgePredictor(_clahe_model(loaded), device="cpu")
    prepared = predictor.prepare(image)
    torch.testing.assert_close(prepared.tensor, prepare(image, 64, clahe=True).tensor)
    assert not torch.allclose(prepared.tensor, prepare(image, 64).tensor)
    # and a checkpoint without it, without
    plain = BoneAgePredictor(loaded, device="cpu").prepare(image)
    torch.testing.assert_close(plain.tensor, prepare(image, 64).tensor)


def test_a_clahe_checkpoint_without_opencv_fails_when_the_predictor_is_built(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # import cv2 now raises ImportError
    BoneAgePredictor(loaded, device="cpu")  # no CLAHE: no OpenCV needed
    with pytest.raises(ImportError, match=r"CLAHE needs OpenCV.*boneage-worker\[train\]"):
        BoneAgePredictor(_clahe_model(loaded), device="cpu")


def test_the_heat_map_places_a_cell_where_the_network_saw_it(image: np.ndarray) -> None:
    # 100 pixels: a 4 x 4 grid, cell j centred on input pixel 32 j (not a multiple of 32)
    predictor = BoneAgePredictor(untrained_model(arch="resnet18", input_size=100), device="cpu")
    result = predictor.predict(image, male=True)
    assert result.crop_cam.shape == (4, 4)
    hot = np.zeros((4, 4), dtype=np.float32)
    hot[1, 2] = 1.0
    result = dataclasses.replace(result, crop_cam=hot)
    top, left, bottom, right = result.crop_box
    expected = (
        top + (32 + 0.5) * (bottom - top) / 100 - 0.5,
        left + (64 + 0.5) * (right - left) / 100 - 0.5,
    )
    peak = np.unravel_index(int(np.argmax(result.cam)), result.cam.shape)
    assert np.abs(np.subtract(peak, expected)).max() <= 1
    half = result.cam_at((image.shape[0] // 2, image.shape[1] // 2))
    peak = np.unravel_index(int(np.argmax(half)), half.shape)
    assert np.abs(np.subtract(peak, np.divide(expected, 2))).max() <= 1.5


#: What torch raises when the GPU itself fails (messages as CUDA, cuBLAS and cuDNN word them).
DEVICE_ERRORS = [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: uncorrectable ECC error encountered"),
    RuntimeError(
        "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"
    ),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
]


def unusable(device: torch.device) -> None:
    """The probe of a GPU that failed: every call on it raises the sticky error again."""
    raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


def usable(device: torch.device) -> None:
    """The probe of a GPU that works: the error was the one call's."""


@pytest.mark.parametrize("exc", DEVICE_ERRORS, ids=lambda e: str(e)[:24])
def test_a_failed_gpu_is_told_from_an_image_at_fault(exc: Exception) -> None:
    assert is_device_failure(exc, torch.device("cuda", 0), probe=unusable)
    assert is_device_failure(exc, "cuda", probe=unusable)
    # the same words on a CPU are not the device's: CPU behaviour is unchanged
    assert not is_device_failure(exc, "cpu", probe=unusable)


@pytest.mark.parametrize(
    "exc",
    [
        *DEVICE_ERRORS,
        RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED. This error may appear if"),
    ],
    ids=lambda e: str(e)[:24],
)
def test_an_error_the_gpu_survives_is_not_a_failed_gpu(exc: Exception) -> None:
    """A cuBLAS or cuDNN error at one batch size passes: the device, asked again, works,
    and the batch's images are run one by one as before."""
    asked: list[torch.device] = []
    assert not is_device_failure(exc, "cuda:1", probe=asked.append)
    assert asked == [torch.device("cuda", 1)]


def test_a_cpu_is_never_probed() -> None:
    asked: list[torch.device] = []
    assert not is_device_failure(DEVICE_ERRORS[0], "cpu", probe=asked.append)
    assert asked == []


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("Expected all tensors to be on the same device"),
        ValueError("CUDA error: in a ValueError's message"),
        OSError(5, "Input/output error"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_on_a_gpu_are_not_a_failed_gpu(exc: Exception) -> None:
    assert not is_device_failure(exc, "cuda")


def test_a_gpu_failing_in_the_forward_pass_is_a_device_failure(
    loaded: LoadedModel, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No GPU here: the device error is raised where the forward pass would raise it,
    and the predictor told that it runs on CUDA where it asks (is_device_failure)."""
    predictor = BoneAgePredictor(loaded, device="cpu")

    def forward(*args: object, **kwargs: object) -> object:
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(models.predictor, "predict_with_cam", forward)
    with pytest.raises(torch.AcceleratorError):  # on a CPU, as it was
        predictor.predict(image, male=True)
    real = is_device_failure
    monkeypatch.setattr(
        models.predictor, "is_device_failure", lambda e, _: real(e, "cuda", probe=usable)
    )
    with pytest.raises(torch.AcceleratorError):  # a GPU that still works: the image's
        predictor.predict(image, male=True)
    monkeypatch.setattr(
        models.predictor, "is_device_failure", lambda e, _: real(e, "cuda", probe=unusable)
    )
    with pytest.raises(DeviceFailure, match=r"^AcceleratorError: CUDA error: an illegal"):
        predictor.predict(image, male=True)
