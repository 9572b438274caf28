"""Dynamic batching: images assessed by many threads share one forward pass.

A GPU runs a ResNet-50 forward pass on 16 images in little more time than on one, but
an inference worker receives images one at a time, each in its own task. With
:class:`BatchingPredictor` every task thread does its own CPU work (reading, decoding,
preprocessing, and after the model the SR and SC) and hands only the prepared tensor
to one model thread, which runs whatever has gathered as one batch:

    task threads:  read → decode → prepare ─┐                 ┌─▶ SR + SC → commit
                   read → decode → prepare ─┼─▶ model thread ─┼─▶ SR + SC → commit
                   read → decode → prepare ─┘  (one batch)    └─▶ SR + SC → commit

The model thread takes the first image waiting, then every image that arrives within
``max_wait_s`` of it, up to ``max_batch``. While a batch is on the device the next
one gathers, so under load batches fill without waiting and decoding overlaps the
forward pass; an image that arrives alone waits at most ``max_wait_s``.

Results are those of :meth:`BoneAgePredictor.predict_batch`: the same as one image at
a time up to float rounding. If a batch fails, its images are run again one by one,
so that one bad image fails alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from models.predictor import BoneAgePredictor, DeviceFailure, Prediction
from models.preprocess import Prepared

logger = logging.getLogger(__name__)

__all__ = ["BatchingPredictor"]

#: Called after every batch with its size and the seconds the model took.
BatchObserver = Callable[[int, float], None]


@dataclass
class _Request:
    image: np.ndarray
    male: bool
    prepared: Prepared
    result: Future[Prediction] = field(default_factory=Future)


class BatchingPredictor:
    """Gather single-image predictions from many threads into batched forward passes.

    Parameters
    ----------
    predictor : BoneAgePredictor
        The model; only the model thread calls its :meth:`~BoneAgePredictor.predict_batch`.
    max_batch : int
        Most images in one forward pass (at least 1).
    max_wait_s : float
        Longest time the first image of a batch waits for others (at least 0).
    on_batch : callable, optional
        ``on_batch(size, seconds)`` after every batch (metrics); it must not raise.

    Notes
    -----
    :meth:`predict` may be called from any number of threads. The model thread is a
    daemon started here; :meth:`close` stops it after the images already handed in.
    """

    def __init__(
        self,
        predictor: BoneAgePredictor,
        *,
        max_batch: int,
        max_wait_s: float,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._accepting = threading.Lock()  # no image is handed in once close() began
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)
        self._thread.start()

    def predict(self, image: np.ndarray, *, male: bool) -> Prediction:
        """Bone age, Grad-CAM map and intervals for one image, computed in a shared batch.

        Parameters
        ----------
        image : numpy.ndarray
            2-D grey image ``(H, W)``, bone bright, float32 in [0, 1].
        male : bool
            Patient sex.

        Returns
        -------
        Prediction
            As :meth:`BoneAgePredictor.predict` returns it.

        Raises
        ------
        RuntimeError
            If the batcher is closed.
        """
        # Preprocessing is CPU work: done here, in the caller's thread, beside the batch
        # that is on the device now.
        request = _Request(image, bool(male), self.predictor.prepare(image))
        with self._accepting:
            if self._closed.is_set():
                raise RuntimeError("the batching predictor is closed")
            self._requests.put(request)
        return request.result.result()

    def close(self, timeout: float | None = 30.0) -> None:
        """Finish the images already handed in, then stop the model thread."""
        with self._accepting:
            if not self._closed.is_set():
                self._closed.set()
                self._requests.put(None)
        self._thread.join(timeout)

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` and what arrives within ``max_wait_s`` of it; and whether to stop."""
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                # past the deadline a zero timeout still takes what is already waiting
                item = self._requests.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:  # close(): nothing comes after it
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._requests.get()
            if first is None:
                return
            batch, stop = self._gather(first)
            self._predict(batch)

    def _predict(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        try:
            results = self.predictor.predict_batch(
                [r.image for r in batch],
                [r.male for r in batch],
                prepared=[r.prepared for r in batch],
            )
        except Exception as exc:
            # a failed GPU fails each image again: each is told at once, none blamed
            if len(batch) == 1 or isinstance(exc, DeviceFailure):
                for request in batch:
                    request.result.set_exception(exc)
                return
            logger.warning(
                "a batch of %d failed (%s): running its images one by one",
                len(batch),
                type(exc).__name__,
            )
            for request in batch:
                self._predict([request])
            return
        if self._on_batch is not None:
            try:
                self._on_batch(len(batch), time.perf_counter() - started)
            except Exception:  # metrics must never cost an image its result
                logger.exception("batch observer failed")
        for request, result in zip(batch, results, strict=True):
            request.result.set_result(result)
