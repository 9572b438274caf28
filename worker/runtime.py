"""Per-process state of a worker: settings, database URL, the loaded model.

The model is loaded once per process (`Runtime.predictor`), in the process that
uses it: never in a parent that forks, so CUDA is never initialised before a fork.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from pydicom.uid import generate_uid

from worker.settings import Settings

if TYPE_CHECKING:
    from models.predictor import BoneAgePredictor

logger = logging.getLogger(__name__)

#: Name written into every output as the producing software.
SOFTWARE_NAME = "boneage-worker"


@dataclass
class Runtime:
    settings: Settings
    #: Id of the model whose `models` row this process knows exists.
    model_recorded: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def database_url(self) -> str:
        return self.settings.effective_database_url

    @cached_property
    def device_observer_uid(self) -> str:
        # Stable per node: the same AE title on the same host is the same device.
        return str(
            generate_uid(entropy_srcs=[SOFTWARE_NAME, self.settings.ae_title, socket.gethostname()])
        )

    @cached_property
    def predictor(self) -> BoneAgePredictor:
        with self._lock:
            return self._load_predictor()

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
        predictor = BoneAgePredictor(loaded, device=settings.device)
        logger.info("model ready on %s", predictor.device)
        return predictor
