"""Run a CPU stage ahead of the model: decode the next images while the network runs.

Decoding (JPEG 2000 above all) and the forward pass take turns on one image at a time
unless something overlaps them. :func:`prefetch` keeps up to ``depth`` calls of a
function running on a small thread pool and hands back their results in input order, so
the consumer (the model) never waits for a decode that could have started earlier.
Threads suffice: the decoders and PyTorch release the GIL while they work.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

logger = logging.getLogger(__name__)

__all__ = ["prefetch"]

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Iterable[T], fn: Callable[[T], R], *, depth: int = 2, workers: int = 1
) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computing up to ``depth`` ahead.

    Parameters
    ----------
    items : iterable
        Inputs, consumed lazily.
    fn : callable
        The stage to run ahead (for example read + decode + preprocess).
    depth : int
        Results computed ahead of the consumer (at least 1).
    workers : int
        Threads running ``fn`` (at least 1).

    Yields
    ------
    object
        ``fn(item)``, in the order of ``items``. An exception raised by ``fn`` is raised
        here, when its result is reached; the calls already started are finished first.

    Raises
    ------
    ValueError
        When ``depth`` or ``workers`` is below 1.
    """
    if depth < 1 or workers < 1:
        raise ValueError(f"depth and workers must be at least 1, got {depth} and {workers}")
    pending: deque[Future[R]] = deque()
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        try:
            for item in iterator:
                pending.append(pool.submit(fn, item))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
