"""Where a prefork worker's processes keep their metrics; free of prometheus_client.

prometheus_client chooses, once, when it is imported, whether metric values live in
process memory or in memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR``. A prefork
worker needs the files (its tasks run in child processes), so ``work`` sets the
directory up with this module before anything imports prometheus_client.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["MULTIPROCESS_ENV", "use_multiprocess_directory", "worker_metrics_port"]

#: prometheus_client reads this once, at import, to choose multiprocess mode.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_metrics_port(base: int | None, queues: Sequence[str]) -> int | None:
    """The port of a worker's ``/metrics``: ``base``, or ``base + 1`` for delivery only."""
    if not base:
        return None
    return base if "inference" in queues else base + 1


def use_multiprocess_directory(directory: Path) -> bool:
    """Have this process's metrics, and its children's, kept in ``directory``.

    Must run before prometheus_client is imported. The directory is emptied first:
    files left by an earlier run would be added to this run's counters.

    Parameters
    ----------
    directory : pathlib.Path
        A directory for this worker alone (created owner-only).

    Returns
    -------
    bool
        False when prometheus_client was already imported; the worker then serves no
        metrics of its children (logged).
    """
    if "prometheus_client" in sys.modules:
        logger.warning(
            "worker metrics of child processes unavailable: prometheus_client was "
            "imported before its multiprocess directory was set"
        )
        return False
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True, mode=0o700)
    os.environ[MULTIPROCESS_ENV] = str(directory)
    return True
