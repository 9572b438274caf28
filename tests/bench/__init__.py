"""Benchmarks: ``python -m tests.bench`` (see README.md here). Never part of the test suite."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_io.content import BoneAgeFinding
from dicom_io.pixels import set_jpeg2000_threads
from worker.cores import cores_per_task
from worker.heap import keep_large_blocks
from worker.settings import threads_within_cpu_quota, usable_cpus

# Before any benchmark imports torch: within a container's CPU quota the reference
# forward pass runs on as many threads as the quota feeds, as the worker's do. On more
# threads it would be slower, and flatter every ratio against it.
threads_within_cpu_quota()

if TYPE_CHECKING:
    from models.predictor import Prediction


def heap_as_in_workers() -> str:
    """Give this process the heap setting inference workers run with; say which.

    A reference forward pass timed with glibc's default heap would be slower than the
    one the workers run (:mod:`worker.heap`), flattering every ratio against it, so
    each benchmark's process takes the workers' setting before it times anything.
    """
    if keep_large_blocks():
        return "heap: large blocks kept for reuse, as in inference workers"
    return "heap: the C library's default (not glibc), as in inference workers"


def bench_finding(prediction: Prediction, model_id: str) -> BoneAgeFinding:
    """The finding the worker would report for a benchmark's phantom (a 10-year-old)."""
    return BoneAgeFinding(
        bone_age_months=prediction.bone_age_months,
        chronological_age_months=122.0,
        sds=None,
        intervals=dict(prediction.intervals),
        model_id=model_id,
        model_name="BoneAgeNet resnet50",
        model_version="bench",
        model_trained=False,
        laterality="L",
    )


def decode_threads_as_in_workers(tasks_at_once: int = 1) -> str:
    """Give JPEG 2000 decodes the threads an inference worker's would have; say how many.

    A worker shares the cores among the studies it works on at once
    (``worker.tasks``): every core for a process that assesses one study at a time.
    """
    threads = cores_per_task(usable_cpus(), tasks_at_once)
    set_jpeg2000_threads(threads)
    return f"JPEG 2000 decoded on {threads} thread(s), as in inference workers"


#: Clock ticks a second, the unit of /proc's CPU times.
TICKS = os.sysconf("SC_CLK_TCK")


def proc_stat(pid: int) -> tuple[int, float] | None:
    """``(parent pid, CPU seconds)`` of a live process, all its threads, from /proc/<pid>/stat.

    ``None`` once the process is gone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state ppid ... utime (14th field of the line) stime (15th)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid: int) -> float:
    """The most resident memory a live process has held, in MiB (``VmHWM``; NaN if unknown).

    ``VmHWM`` starts again at ``exec``, where ``ru_maxrss`` carries the forking parent's.
    """
    return status_mib(pid, "VmHWM")


def status_mib(pid: int, field: str) -> float:
    """A memory figure (``VmRSS``, ``VmHWM`` ...) of a live process, in MiB; NaN if unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")
