"""Per-process state of a worker: settings, database URL, the loaded model.

The model is loaded once per process (`Runtime.predictor`), in the process that
uses it: never in a parent that forks, so CUDA is never initialised before a fork.
"""

from __future__ import annotations

import logging
import threading
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING

from worker.settings import Settings

if TYPE_CHECKING:
    import numpy as np

    from models.batching import BatchingPredictor
    from models.predictor import BoneAgePredictor, Prediction
    from worker.cores import CoreShare

logger = logging.getLogger(__name__)

#: Name written into every output as the producing software.
SOFTWARE_NAME = "boneage-worker"


def _now() -> datetime:
    from db.schema import utcnow  # the database's module: not loaded where unused

    return utcnow()


@dataclass
class Runtime:
    settings: Settings
    #: Id of the model whose `models` row this process knows exists.
    model_recorded: str | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _predictor: BoneAgePredictor | None = field(default=None, repr=False)
    _batcher: BatchingPredictor | None = field(default=None, repr=False)
    #: The cores this process shares with its siblings (prefork on a CPU), if it does.
    cores: CoreShare | None = None
    #: When this process took up its settings: work made after it (a delivery row) may
    #: come from a process that took up newer ones (worker.delivery).
    settings_since: datetime = field(default_factory=lambda: _now())

    @property
    def database_url(self) -> str:
        return self.settings.effective_database_url

    @cached_property
    def device_observer_uid(self) -> str:
        """The Device Observer UID our SRs name this node by: kept in its database
        (revision 0010), so the same for every process of the node, on any host or in
        any container, across redeployments."""
        from sqlalchemy import select

        from db.engine import session_scope
        from db.schema import Node

        with session_scope(self.database_url) as session:
            uid = session.scalar(select(Node.device_observer_uid).where(Node.id == 1))
        if uid is None:
            raise RuntimeError(
                "the database has no node row (revision 0010 makes it): "
                "run `boneage-worker db upgrade`"
            )
        return uid

    @property
    def predictor(self) -> BoneAgePredictor:
        """The model, loaded on first use (once, whichever thread asks first)."""
        if self._predictor is None:
            with self._lock:
                if self._predictor is None:
                    self._predictor = self._load_predictor()
        return self._predictor

    @property
    def batcher(self) -> BatchingPredictor | None:
        """Shares forward passes among this process's task threads; None at batch 1."""
        batch = self.settings.effective_inference_batch
        if batch <= 1:
            return None
        if self._batcher is None:
            from models.batching import BatchingPredictor
            from worker import metrics

            with self._lock:
                if self._batcher is None:
                    self._batcher = BatchingPredictor(
                        self.predictor,
                        max_batch=batch,
                        max_wait_s=self.settings.inference_batch_wait_ms / 1000,
                        on_batch=metrics.observe_inference_batch,
                    )
                    logger.info(
                        "inference in batches of up to %d images (the first waits up to %g ms)",
                        batch,
                        self.settings.inference_batch_wait_ms,
                    )
        return self._batcher

    def close(self) -> None:
        """Stop the batcher's model thread, after the images already handed to it."""
        with self._lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()

    def predict(self, image: np.ndarray, *, male: bool) -> Prediction:
        """Assess one image: alone, or in a batch shared with other task threads."""
        batcher = self.batcher
        if batcher is not None:
            return batcher.predict(image, male=male)
        with self.stage():
            return self.predictor.predict(image, male=male)

    def stage(self) -> AbstractContextManager[object]:
        """Around work that runs on several cores (the forward pass, a JPEG 2000 decode):
        every core when this process's siblings are idle (:class:`~worker.cores.CoreShare`)."""
        return self.cores.stage() if self.cores is not None else nullcontext()

    def _load_predictor(self) -> BoneAgePredictor:
        from models.checkpoint import load_checkpoint, untrained_model
        from models.predictor import BoneAgePredictor

        settings = self.settings
        if settings.model is not None:
            loaded = load_checkpoint(settings.model, device="cpu")
            logger.info("loaded model %s from checkpoint", loaded.model_id[:12])
        else:
            loaded = untrained_model(arch=settings.arch, input_size=settings.input_size)
            logger.warning(
                "BONEAGE_MODEL is not set: using an UNTRAINED %s; every output says so",
                settings.arch,
            )
        predictor = BoneAgePredictor(
            loaded,
            device=settings.device,
            precision=settings.precision,
            # a study that comes alone runs on every core: packed for that count too
            cpu_threads=(self.cores.cores,) if self.cores is not None else (),
        )
        logger.info("model ready on %s", predictor.runs_on)
        return predictor
