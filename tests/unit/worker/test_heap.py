"""worker.heap: freed large blocks are reused instead of being faulted in again, by the
threads of a batching process too; start-up objects are left out of the garbage
collector's passes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, TypedDict

import pytest

from worker.heap import keep_large_blocks, limit_arenas

# Allocates and touches buffers of 1 to 32 MiB, as an image and a network's layers do,
# frees them, and does it again; prints the page faults the later rounds cost. Runs in
# its own interpreter so the setting stays out of this one.
_PROBE = """
import json, resource, sys
import numpy as np
from worker.heap import keep_large_blocks, limit_arenas
kept = keep_large_blocks() if sys.argv[1] == "kept" else None
def one_image():
    buffers = [np.ones(mib << 18, dtype=np.float32) for mib in (1, 2, 4, 8, 16, 32)]
    return sum(float(b[-1]) for b in buffers)
one_image()  # the first image grows the heap once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_image()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before}))
"""


class _Probe(TypedDict):
    """What _PROBE prints."""

    kept: bool
    faults: int


def _run(script: str, *args: str) -> Any:
    """Run ``script`` in an interpreter of its own; what it printed, parsed as JSON."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def _probe(mode: str) -> _Probe:
    probe: _Probe = _run(_PROBE, mode)
    return probe


def test_kept_blocks_are_not_faulted_in_again() -> None:
    default, kept = _probe("default"), _probe("kept")
    if kept["kept"] is not True:
        pytest.skip("not glibc: the C library's allocator is left as it is")
    # glibc's default maps the larger buffers afresh for every image and faults them in
    # (here several thousand faults, 4 KiB or 2 MiB pages); kept, they are reused
    assert int(default["faults"]) > 1000
    assert int(kept["faults"]) < 100


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        keep_large_blocks(0)


# Sixteen threads, all alive, as a batching worker's task threads are; in turn each
# allocates and touches an 8 MiB block, as a study's pixels, and frees it. Prints how much
# more memory the process holds once all have. Large blocks kept, as in the worker.
_ARENA_PROBE = """
import json, sys, threading
import numpy as np
from worker.heap import keep_large_blocks, limit_arenas
keep_large_blocks()
limited = limit_arenas(1) if sys.argv[1] == "limited" else None
THREADS, MIB = 16, 8
def resident_kib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
turns = [threading.Event() for _ in range(THREADS + 1)]
finished = threading.Event()
def study(i):
    np.ones(1024, dtype=np.float32)  # the thread's first allocations take it an arena
    turns[i].wait()
    block = np.ones(MIB << 18, dtype=np.float32)
    del block
    turns[i + 1].set()
    finished.wait()  # alive until all have had their turn, as task threads are
threads = [threading.Thread(target=study, args=(i,)) for i in range(THREADS)]
for thread in threads:
    thread.start()
before = resident_kib()
turns[0].set()
turns[THREADS].wait()
held = resident_kib() - before
finished.set()
for thread in threads:
    thread.join()
print(json.dumps({"limited": limited, "held_mib": held / 1024}))
"""


class _ArenaProbe(TypedDict):
    """What _ARENA_PROBE prints."""

    limited: bool | None
    held_mib: float


def _arena_probe(mode: str) -> _ArenaProbe:
    probe: _ArenaProbe = _run(_ARENA_PROBE, mode)
    return probe


def test_threads_reuse_one_anothers_freed_blocks_when_arenas_are_limited() -> None:
    default, limited = _arena_probe("default"), _arena_probe("limited")
    if limited["limited"] is not True:
        pytest.skip("not glibc: the C library's allocator is left as it is")
    # glibc gives each thread an arena of its own (up to eight per core), and each arena
    # keeps its thread's freed block: several 8 MiB blocks held, 128 MiB on two cores
    assert default["held_mib"] > 4 * 8
    # in one arena each thread reuses the block the one before it freed
    assert limited["held_mib"] < 2 * 8


def test_arenas_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        limit_arenas(0)


# A process's start-up: objects it keeps (as a model's tables would be), and a reference
# cycle it has already dropped. Then freeze_start_up_objects(), and a cycle dropped
# after it. Runs in its own interpreter so that this one's collector is left alone.
_FREEZE_PROBE = """
import gc, json, weakref
from worker.heap import freeze_start_up_objects
class Node:
    pass
def dropped_cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)
kept = [Node() for _ in range(50_000)]
before = dropped_cycle()
frozen = freeze_start_up_objects()
after = dropped_cycle()
tracked = {id(o) for o in gc.get_objects()}
gc.collect()
print(json.dumps({
    "frozen": frozen,
    "kept_tracked": sum(id(o) in tracked for o in kept),
    "tracked": len(tracked),
    "cycle_before_collected": before() is None,
    "cycle_after_collected": after() is None,
}))
"""


def test_start_up_objects_are_left_out_of_the_collectors_passes() -> None:
    probe = _run(_FREEZE_PROBE)
    # what start-up kept is frozen: no pass of the collector walks it any more
    assert probe["frozen"] >= 50_000
    assert probe["kept_tracked"] == 0
    assert probe["tracked"] < 10_000
    # garbage from start-up was collected, not frozen with it; later garbage still is
    assert probe["cycle_before_collected"]
    assert probe["cycle_after_collected"]
