"""BatchingPredictor: threads share forward passes, results as one at a time, failures alone."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from models.batching import BatchingPredictor
from models.checkpoint import LoadedModel, untrained_model
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor, DeviceFailure, Prediction
from models.preprocess import Prepared


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return untrained_model(arch="resnet18", input_size=64)


def _images(count: int) -> list[np.ndarray]:
    return [
        make_phantom(
            20.0 + 15 * n, male=n % 2 == 0, size=96 + 8 * n, rng=np.random.default_rng(n)
        ).image.astype(np.float32)
        for n in range(count)
    ]


def _submit_together(
    batcher: BatchingPredictor, images: Sequence[np.ndarray], males: Sequence[bool]
) -> list[Prediction]:
    """Every image from its own thread, all released at once."""
    start = threading.Barrier(len(images))

    def one(index: int) -> Prediction:
        start.wait(timeout=30)
        return batcher.predict(images[index], male=males[index])

    with ThreadPoolExecutor(max_workers=len(images)) as pool:
        return list(pool.map(one, range(len(images))))


def test_threads_share_batches_and_get_their_own_results(loaded: LoadedModel) -> None:
    predictor = BoneAgePredictor(loaded, device="cpu")
    images = _images(8)
    males = [n % 3 == 0 for n in range(8)]
    sizes: list[int] = []
    batcher = BatchingPredictor(
        predictor, max_batch=4, max_wait_s=2.0, on_batch=lambda n, _s: sizes.append(n)
    )
    try:
        results = _submit_together(batcher, images, males)
    finally:
        batcher.close()
    assert sum(sizes) == 8
    assert max(sizes) == 4  # all eight waited together: two full batches
    assert len(sizes) == 2
    for image, male, result in zip(images, males, results, strict=True):
        alone = predictor.predict(image, male=male)
        assert result.bone_age_months == pytest.approx(alone.bone_age_months, abs=1e-3)
        assert result.crop_box == alone.crop_box
        assert result.image_shape == image.shape
        np.testing.assert_allclose(result.crop_cam, alone.crop_cam, atol=1e-4)


def test_an_image_alone_is_not_held_back(loaded: LoadedModel) -> None:
    sizes: list[int] = []
    batcher = BatchingPredictor(
        BoneAgePredictor(loaded, device="cpu"),
        max_batch=16,
        max_wait_s=0.01,
        on_batch=lambda n, _s: sizes.append(n),
    )
    try:
        result = batcher.predict(_images(1)[0], male=True)
    finally:
        batcher.close()
    assert 0.0 <= result.bone_age_months <= 240.0
    assert sizes == [1]


class _FailsOnTinyImages(BoneAgePredictor):
    """Fault injection: the real predictor, except that a batch holding a 96 x 96 image
    raises (as a device error caused by one input would)."""

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        males: Sequence[bool],
        *,
        prepared: Sequence[Prepared] | None = None,
    ) -> list[Prediction]:
        if any(image.shape == (96, 96) for image in images):
            raise RuntimeError("injected failure")
        return super().predict_batch(images, males, prepared=prepared)


def test_a_failing_image_fails_alone(loaded: LoadedModel) -> None:
    images = _images(4)  # the first is 96 x 96
    batcher = BatchingPredictor(_FailsOnTinyImages(loaded, device="cpu"), max_batch=4, max_wait_s=2)
    start = threading.Barrier(4)

    def one(index: int) -> Prediction:
        start.wait(timeout=30)
        return batcher.predict(images[index], male=True)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(one, n) for n in range(4)]
            with pytest.raises(RuntimeError, match="injected failure"):
                futures[0].result()
            others = [f.result() for f in futures[1:]]
    finally:
        batcher.close()
    assert all(0.0 <= r.bone_age_months <= 240.0 for r in others)


def test_closed_batcher_refuses_new_images(loaded: LoadedModel) -> None:
    batcher = BatchingPredictor(BoneAgePredictor(loaded, device="cpu"), max_batch=2, max_wait_s=0)
    image = _images(1)[0]
    batcher.predict(image, male=False)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.predict(image, male=False)


@pytest.mark.parametrize(
    ("max_batch", "max_wait_s", "named"), [(0, 0.01, "max_batch"), (4, -1.0, "max_wait_s")]
)
def test_rejects_bad_limits(
    loaded: LoadedModel, max_batch: int, max_wait_s: float, named: str
) -> None:
    with pytest.raises(ValueError, match=named):
        BatchingPredictor(
            BoneAgePredictor(loaded, device="cpu"), max_batch=max_batch, max_wait_s=max_wait_s
        )


class _FailedGpu(BoneAgePredictor):
    """Fault injection: a GPU that failed (models.predictor.is_device_failure); the
    batches it was asked to run, by size."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded, device="cpu")
        self.batches: list[int] = []

    def predict_batch(
        self,
        images: Sequence[np.ndarray],
        males: Sequence[bool],
        *,
        prepared: Sequence[Prepared] | None = None,
    ) -> list[Prediction]:
        self.batches.append(len(images))
        raise DeviceFailure("AcceleratorError: CUDA error: an illegal memory access")


def test_a_failed_gpu_fails_every_image_of_the_batch_at_once(loaded: LoadedModel) -> None:
    predictor = _FailedGpu(loaded)
    batcher = BatchingPredictor(predictor, max_batch=4, max_wait_s=2)
    start = threading.Barrier(4)
    images = _images(4)

    def one(index: int) -> Prediction:
        start.wait(timeout=30)
        return batcher.predict(images[index], male=True)

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(one, n) for n in range(4)]
            for future in futures:
                with pytest.raises(DeviceFailure):
                    future.result()
    finally:
        batcher.close()
    # not run again image by image: each would fail the same way
    assert sum(predictor.batches) == 4
