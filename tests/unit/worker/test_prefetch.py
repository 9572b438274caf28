"""prefetch: results in order, work started ahead, errors surfaced at their place."""

from __future__ import annotations

import threading

import pytest

from worker.prefetch import prefetch


def test_results_come_in_input_order() -> None:
    assert list(prefetch(range(10), lambda n: n * n, depth=3, workers=2)) == [
        n * n for n in range(10)
    ]


def test_the_next_item_runs_while_the_consumer_holds_the_first() -> None:
    started = threading.Event()

    def work(n: int) -> int:
        if n == 1:
            started.set()
        return n

    results = prefetch([0, 1, 2], work, depth=1)
    assert next(results) == 0
    assert started.wait(timeout=10)  # item 1 was submitted before item 0 was consumed
    assert list(results) == [1, 2]


def test_an_error_is_raised_when_its_result_is_reached() -> None:
    def work(n: int) -> int:
        if n == 2:
            raise RuntimeError("cannot decode")
        return n

    results = prefetch(range(4), work)
    assert [next(results), next(results)] == [0, 1]
    with pytest.raises(RuntimeError, match="cannot decode"):
        next(results)


def test_rejects_a_depth_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        list(prefetch([1], lambda n: n, depth=0))
