"""Benchmarks: ``python -m tests.bench`` (see README.md here). Never part of the test suite."""

from __future__ import annotations

from dicom_io.content import BoneAgeFinding
from models.predictor import Prediction
from worker.heap import keep_large_blocks


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
