"""Keep large heap blocks in inference processes instead of returning them to the OS.

glibc's ``malloc`` serves every block above its mmap threshold (128 KiB, rising to at
most 32 MiB as blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``. An
inference process allocates the same large buffers for every image: the decoded
pixels, and for each layer of the network activations of several megabytes. Each
``mmap`` hands back pages the kernel has to fault in and zero again on first touch,
one 4 KiB page at a time. On the development VM that is a quarter of a ResNet-50
forward pass at 512 x 512 with two threads (0.22 s against 0.165 s), a tenth with one.

:func:`keep_large_blocks` raises the mmap threshold, so those blocks come from the
heap and are reused, and raises the trim threshold with it, so the freed top of the
heap is not handed back after every image. The cost is resident memory: an inference
process keeps about its peak working set (a few hundred MB on a CPU) while it runs.
This is what PyTorch's CPU performance guides get by swapping in jemalloc or tcmalloc,
done with the allocator that is already there.

Only inference processes call :func:`keep_large_blocks`; the listener's memory must stay
flat.

:func:`limit_arenas` is for a batching inference process. glibc gives each thread that
allocates while another holds the lock of its arena an arena of its own, up to eight per
core, and a freed block is reused only by the threads of its arena. A batching process
runs twice its batch in task threads, which take turns at the interpreter lock, and
each thread's arena kept the peak of its own studies: 60 MB a thread on 2500 x 2000 DXs
with 128 arenas allowed, as on a 16-core host. With 4, and the source's pixels dropped
once decoded, it was 22 MB (docs/performance.md, "Host memory of a batching worker").

:func:`freeze_start_up_objects` is for every long-running process: what start-up made
(modules, the model, highdicom's and pydicom's tables of the standard, SQLAlchemy and
Celery) lives as long as the process, and the garbage collector's full passes would
walk all of it each time, at whatever moment the allocation counts set one off.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform
from collections.abc import Callable
from typing import cast

logger = logging.getLogger(__name__)

__all__ = ["MMAP_THRESHOLD_BYTES", "freeze_start_up_objects", "keep_large_blocks", "limit_arenas"]

#: Blocks up to this size come from the reusable heap (glibc's ceiling for its own
#: dynamic threshold is 32 MiB; one activation of ResNet-50 at batch 8 is larger).
MMAP_THRESHOLD_BYTES = 256 << 20
# mallopt parameters, <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where the C library is not glibc (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return cast("Callable[[int, int], int]", mallopt)


def keep_large_blocks(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc keep freed blocks up to ``threshold`` bytes for reuse.

    Parameters
    ----------
    threshold : int
        Largest block served from the heap rather than by its own ``mmap``; the heap's
        free top is kept up to twice this.

    Returns
    -------
    bool
        True when the C library took both settings; False where it is not glibc (musl,
        macOS, Windows), which leaves allocation as it was.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    limit = min(threshold, (1 << 31) - 1)
    kept = mallopt(_M_MMAP_THRESHOLD, limit) == 1
    kept = kept and mallopt(_M_TRIM_THRESHOLD, min(2 * limit, (1 << 31) - 1)) == 1
    if kept:
        logger.debug("heap keeps blocks up to %d MiB for reuse", limit >> 20)
    return kept


def limit_arenas(arenas: int) -> bool:
    """Have glibc's ``malloc`` make at most ``arenas`` arenas for this process's threads.

    Call it before the threads start: an arena made before stays.

    Parameters
    ----------
    arenas : int
        The most arenas, the main one included; a batching inference process passes its
        share of the cores, the most threads it runs outside the interpreter lock at once
        (decoders and torch's threads).

    Returns
    -------
    bool
        True when the C library took the setting; False where it is not glibc.
    """
    if arenas <= 0:
        raise ValueError(f"arenas must be positive, got {arenas}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    limited = mallopt(_M_ARENA_MAX, arenas) == 1
    if limited:
        logger.debug("malloc keeps at most %d arenas", arenas)
    return limited


def freeze_start_up_objects() -> int:
    """Leave what the process holds now out of the garbage collector's passes.

    Collects first, so no start-up garbage is kept, then moves every object still
    tracked into the collector's permanent generation (``gc.freeze``). Objects made
    afterwards are collected as before. Call it once start-up is over: an object frozen
    here that is later dropped inside a reference cycle is never reclaimed (one dropped
    outside any cycle still goes when its count reaches zero).

    An inference process holds some 745,000 tracked objects after its warm-up, and a
    full pass over them took 0.20–0.31 s of CPU on an Intel Xeon; the delivery worker's
    229,000 took 0.085 s, in the middle of a burst (docs/performance.md, "The garbage
    collector's full passes").

    Returns
    -------
    int
        How many objects the permanent generation holds now.
    """
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("%d start-up objects left out of the garbage collector's passes", frozen)
    return frozen
