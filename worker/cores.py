"""Every core for a study that comes alone.

On a CPU an inference worker runs several processes (one per core, up to four), each
with its share of the cores as torch threads: in a burst, passes side by side, a share
each, do the most per second (docs/performance.md, "End to end"). But a PACS forwards
most studies one at a time, minutes apart, and such a study's forward pass ran on its
process's share while the other cores idled.

:class:`CoreShare` is made by the worker's parent before it forks its processes. A
process whose siblings are all idle when its forward pass (or its JPEG 2000 decode)
begins runs it on every core. A sibling that takes up a study meanwhile waits for that
stage to end (a fraction of a second, and the cores are busy with it) instead of
starting threads of its own beside it: more threads than cores slow every thread of a
pass that synchronises them.

Nothing here can hang a worker whose sibling dies: the mutex and the wait are
``flock`` locks, which the kernel releases with the process that held them, and a
dead sibling's marks are recognised by its process id and ignored.

    share = CoreShare(cores=8, share=2)  # in the parent, before the fork
    ...
    with share.task():                   # in a child, around each task
        ...
        with share.stage():              # around a decode, around the forward pass
            predictor.predict(image, male=male)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from dicom_io.pixels import set_jpeg2000_threads

logger = logging.getLogger(__name__)

__all__ = ["CoreShare", "batching_process_cores", "cores_per_task", "jpeg2000_threads"]

#: Processes one share can track at once: a worker's processes (at most 64, see
#: BONEAGE_INFERENCE_PROCESSES) and those that replace them.
SLOTS = 128


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has taken the id: not our sibling
        return False
    return True


def cores_per_task(cpus: int, concurrency: int) -> int:
    """The cores each of ``concurrency`` studies a worker works on at once gets.

    A solo worker decodes one study at a time on every core; two prefork processes on
    two cores one thread each (measured: two threads each, oversubscribed, were slower).
    On a GPU worker it is also each task thread's torch CPU threads, which serve only
    preprocessing.
    """
    return max(1, cpus // concurrency)


def batching_process_cores(cpus: int, processes: int) -> int:
    """The cores each of ``processes`` batching inference workers on a host shares.

    Its JPEG 2000 decodes run on that many threads, and its malloc keeps that many arenas
    (:func:`worker.heap.limit_arenas`): no more of its threads than that run outside the
    interpreter lock at once.
    """
    return max(1, cpus // processes)


def jpeg2000_threads(cpus: int, *, pool: str, concurrency: int, processes: int = 1) -> int:
    """Threads for each JPEG 2000 decode in one worker process.

    The studies a worker decodes at once share the cores (:func:`cores_per_task`),
    except in a batching worker (``pool="threads"``): a reduced decode goes through
    Pillow, which holds the interpreter lock for the whole decode, so its task threads
    make those one at a time, and the only way to use more cores is more threads in that
    decode (measured: two task threads decoding side by side kept 1.01 cores busy on one
    thread each, 1.87 on two). The ``processes`` batching workers on the host share its
    cores. Full-size decodes go through imagecodecs, which releases the lock, so several
    may then run at once, each on these threads: more threads than cores, which on two
    cores was still 1.14-1.18x faster than the same decodes one at a time
    (docs/performance.md, "Lossless JPEG and JPEG-LS"); not measured on a GPU host.
    """
    if pool == "threads":
        return batching_process_cores(cpus, processes)
    return cores_per_task(cpus, concurrency)


class CoreShare:
    """The machine's cores, shared by the processes one inference worker forks.

    Parameters
    ----------
    cores : int
        Threads of a stage that begins while no sibling has a task.
    share : int
        Threads of a stage otherwise: the process's share of the cores, which its torch
        and JPEG 2000 threads are set to when it starts.
    """

    def __init__(self, *, cores: int, share: int) -> None:
        if not 1 <= share <= cores:
            raise ValueError(f"a process's share ({share}) must be 1 to {cores} cores")
        self.cores = cores
        self.share = share
        context = multiprocessing.get_context("fork")
        # Process ids: of the processes in a task, and of the one in a pass on every core.
        self._busy = context.RawArray("i", SLOTS)
        self._wide = context.RawValue("i", 0)
        self._dir = Path(tempfile.mkdtemp(prefix="boneage-cores-"))
        (self._dir / "mutex").touch()
        (self._dir / "wide").touch()
        self._opened_by = -1
        self._mutex_fd = self._wide_fd = -1
        self._remove_dir = weakref.finalize(self, _remove, self._dir, os.getpid())

    # -- used by each process ----------------------------------------------------------

    @contextlib.contextmanager
    def task(self) -> Iterator[None]:
        """Around one task: this process counts as busy; a sibling's stage on every core,
        if one is running, is waited out first."""
        pid = os.getpid()
        while True:
            with self._mutex():
                holder = self._wide.value
                if holder in (0, pid) or not _alive(holder):
                    slot = self._take_slot(pid)
                    break
            self._wait_for_wide_pass()
        try:
            yield
        finally:
            if slot is not None:
                self._busy[slot] = 0  # only this process writes its own slot's mark

    @contextlib.contextmanager
    def stage(self) -> Iterator[int]:
        """Around a stage that can run on several cores (the forward pass, a JPEG 2000
        decode): on every core if no sibling has a task, else on this process's share,
        which its torch and decoder threads are set to outside a stage. Yields the
        threads."""
        pid = os.getpid()
        with self._mutex():
            alone = not any(p not in (0, pid) and _alive(p) for p in self._busy)
            if alone:
                self._wide.value = pid
                fcntl.flock(self._wide_fd, fcntl.LOCK_EX)  # siblings' task() waits on it
        if not alone:
            yield self.share
            return
        try:
            _set_threads(self.cores)
            yield self.cores
        finally:
            _set_threads(self.share)
            with self._mutex():
                self._wide.value = 0
                fcntl.flock(self._wide_fd, fcntl.LOCK_UN)

    # -- internals -----------------------------------------------------------------------

    def _open(self) -> None:
        # Each process opens the files itself: an flock belongs to the open file, and
        # one inherited across the fork would be shared with every sibling.
        if self._opened_by == os.getpid():
            return
        self._mutex_fd = os.open(self._dir / "mutex", os.O_RDWR | os.O_CLOEXEC)
        self._wide_fd = os.open(self._dir / "wide", os.O_RDWR | os.O_CLOEXEC)
        self._opened_by = os.getpid()

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[None]:
        self._open()
        fcntl.flock(self._mutex_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._mutex_fd, fcntl.LOCK_UN)

    def _wait_for_wide_pass(self) -> None:
        # Blocks while the pass holds the file; returns at once if it ended meanwhile.
        fcntl.flock(self._wide_fd, fcntl.LOCK_SH)
        fcntl.flock(self._wide_fd, fcntl.LOCK_UN)

    def _take_slot(self, pid: int) -> int | None:
        """A free slot (or one a dead process left) marked with ``pid``; under the mutex."""
        for slot, marked in enumerate(self._busy):
            if marked == 0 or not _alive(marked):
                self._busy[slot] = pid
                return slot
        logger.warning("more than %d inference processes: this one is not counted", SLOTS)
        return None


def _set_threads(threads: int) -> None:
    import torch  # only inference processes get here; a worker's parent need not import it

    torch.set_num_threads(threads)
    set_jpeg2000_threads(threads)


def _remove(directory: Path, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child, whose copy of the share is collected
        shutil.rmtree(directory, ignore_errors=True)
