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
import tempfile
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "MULTIPROCESS_ENV",
    "metrics_directory",
    "use_multiprocess_directory",
    "worker_metrics_port",
]

#: prometheus_client reads this once, at import, to choose multiprocess mode.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_metrics_port(base: int | None, queues: Sequence[str]) -> int | None:
    """The port of a worker's ``/metrics``: ``base``, or ``base + 1`` for delivery only."""
    if not base:
        return None
    return base if "inference" in queues else base + 1


def metrics_directory(queues: Sequence[str], port: int) -> Path:
    """Where the worker serving ``/metrics`` on ``port`` for ``queues`` keeps its
    processes' metric files: this host's temporary directory (a pod's or container's
    own /tmp, a systemd unit's PrivateTmp), beside the files of ``worker.heartbeat``'s
    ``tasks_directory``.

    Never the shared data directory: workers on other hosts with the same queues and
    port (pods scaled by KEDA, ``compose --scale``, machines sharing it over NFS) would
    empty each other's files when they start and serve each other's counts.
    """
    return (
        Path(tempfile.gettempdir())
        / f"boneage-worker-{os.getuid()}"
        / "metrics"
        / f"{'-'.join(queues)}-{port}"
    )


def use_multiprocess_directory(directory: Path) -> bool:
    """Have this process's metrics, and its children's, kept in ``directory``.

    Must run before prometheus_client is imported. The directory is emptied first:
    files left by an earlier run would be added to this run's counters.

    Parameters
    ----------
    directory : pathlib.Path
        A directory for this worker alone (created owner-only if it does not exist):
        :func:`metrics_directory`.

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
    # exist_ok: what rmtree could not remove, or made again meanwhile, is no reason not
    # to start (on NFS a file still open elsewhere stays behind as .nfsXXXX)
    directory.mkdir(parents=True, mode=0o700, exist_ok=True)
    if left := sorted(p.name for p in directory.glob("*.db")):
        logger.warning(
            "worker metrics: %d file(s) of an earlier run could not be removed from %s; "
            "their counts are added to this run's",
            len(left),
            directory,
        )
    os.environ[MULTIPROCESS_ENV] = str(directory)
    return True
