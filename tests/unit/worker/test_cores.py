"""CoreShare: a study that comes alone runs on every core; siblings never crowd it, and a
sibling that dies blocks nothing. The siblings are real forked processes."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import signal
import tempfile
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import numpy as np
import pytest
import torch

from models.fused import fusion_available
from tests.support import wait_for
from worker.cores import CoreShare
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def share() -> Iterator[CoreShare]:
    """Two cores, one each for two processes, as on this project's machines."""
    threads, decoders = torch.get_num_threads(), os.environ.get("OPJ_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OPJ_NUM_THREADS"] = "1"
    yield CoreShare(cores=2, share=1)
    torch.set_num_threads(threads)
    if decoders is None:
        os.environ.pop("OPJ_NUM_THREADS", None)
    else:
        os.environ["OPJ_NUM_THREADS"] = decoders


def _sibling(share: CoreShare, pipe: Connection, *, stage: bool) -> None:
    """Take a task (and a stage, if asked), say so, then hold it until told to go."""
    with share.task():
        if stage:
            with share.stage() as threads:
                pipe.send(("in", threads))
                pipe.recv()
        else:
            pipe.send(("in", None))
            pipe.recv()
    pipe.send(("out", None))


def _start_sibling(share: CoreShare, *, stage: bool) -> tuple[BaseProcess, Connection]:
    ours, theirs = FORK.Pipe()
    process = FORK.Process(target=_sibling, args=(share, theirs), kwargs={"stage": stage})
    process.start()
    return process, ours


def _waits_on_a_lock(pid: int) -> bool:
    """Whether ``pid`` is blocked waiting for a file lock: the kernel's /proc/locks lists
    a waiter as ``N: -> FLOCK ADVISORY READ <pid> ...``."""
    return any(
        fields[1:2] == ["->"] and fields[5:6] == [str(pid)]
        for fields in map(str.split, Path("/proc/locks").read_text().splitlines())
    )


def test_a_process_alone_runs_its_stage_on_every_core(share: CoreShare) -> None:
    with share.task():
        with share.stage() as threads:
            assert threads == 2
            assert torch.get_num_threads() == 2
            assert os.environ["OPJ_NUM_THREADS"] == "2"  # JPEG 2000 decodes too
        # back to its share outside the stage
        assert torch.get_num_threads() == 1
        assert os.environ["OPJ_NUM_THREADS"] == "1"


def test_a_busy_sibling_keeps_each_process_to_its_share(share: CoreShare) -> None:
    sibling, pipe = _start_sibling(share, stage=False)
    try:
        assert pipe.recv() == ("in", None)
        with share.task(), share.stage() as threads:
            assert threads == 1
            assert torch.get_num_threads() == 1
    finally:
        pipe.send("go")
        sibling.join(30)
    assert sibling.exitcode == 0
    # the sibling's task is over: alone again
    with share.task(), share.stage() as threads:
        assert threads == 2


def test_a_sibling_waits_for_a_stage_on_every_core_to_end(share: CoreShare) -> None:
    with share.task():
        with share.stage() as threads:
            assert threads == 2
            sibling, pipe = _start_sibling(share, stage=True)
            # It does not start its task (or threads of its own) beside this stage ...
            wait_for(lambda: _waits_on_a_lock(sibling.pid or 0), timeout=30, what="a waiter")
            assert not pipe.poll()
        # ... but as soon as the stage ends; this process is busy, so on its share.
        assert pipe.recv() == ("in", 1)
        pipe.send("go")
        assert pipe.recv() == ("out", None)
    sibling.join(30)
    assert sibling.exitcode == 0


@pytest.mark.parametrize("stage", [False, True], ids=["in a task", "in a stage"])
def test_a_sibling_killed_holds_nothing_up(share: CoreShare, stage: bool) -> None:
    sibling, pipe = _start_sibling(share, stage=stage)
    assert pipe.recv() == ("in", 2 if stage else None)
    os.kill(sibling.pid or 0, signal.SIGKILL)
    sibling.join(30)
    # its marks are left behind, but its process is gone: this one is alone
    with share.task(), share.stage() as threads:
        assert threads == 2


def test_a_worker_s_runtime_assesses_a_lone_image_on_every_core(
    share: CoreShare, tmp_path: Path
) -> None:
    # The runtime an inference process uses, with the share its parent made: the model
    # is packed for both thread counts where fused convolutions run, and every module of
    # the forward pass runs on every core while no sibling has a task, else on one.
    rt = Runtime(load_settings(data_dir=tmp_path, arch="resnet18", input_size=64, device="cpu"))
    rt.cores = share
    predictor = rt.predictor
    assert predictor.thread_counts == ((1, 2) if fusion_available() is None else ())
    threads_seen: list[int] = []
    for count in (1, 2):
        for module in predictor.inference_model(count).modules():
            module.register_forward_hook(lambda *_: threads_seen.append(torch.get_num_threads()))
    image = np.random.default_rng(0).random((100, 80), dtype=np.float32)
    with share.task():
        rt.predict(image, male=True)
    assert threads_seen and set(threads_seen) == {2}
    threads_seen.clear()
    sibling, pipe = _start_sibling(share, stage=False)
    try:
        assert pipe.recv() == ("in", None)
        with share.task():
            rt.predict(image, male=True)
    finally:
        pipe.send("go")
        sibling.join(30)
    assert threads_seen and set(threads_seen) == {1}


def test_a_share_must_fit_the_cores() -> None:
    with pytest.raises(ValueError, match="share"):
        CoreShare(cores=2, share=3)


def test_a_worker_shares_its_cores_where_it_can(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from worker import tasks

    monkeypatch.setattr(tasks, "_state", {})
    monkeypatch.setattr(tasks, "usable_cpus", lambda: 4)
    settings = Settings(device="cpu")
    tasks.set_worker_queues(("inference",), pool="prefork", concurrency=2, settings=settings)
    share = tasks.core_share()
    assert share is not None and (share.cores, share.share) == (4, 2)
    # threads fixed by the administrator, or a delivery worker: no share
    fixed = Settings(device="cpu", torch_threads=2)
    tasks.set_worker_queues(("inference",), pool="prefork", concurrency=2, settings=fixed)
    assert tasks.core_share() is None
    tasks.set_worker_queues(("delivery",), pool="prefork", concurrency=2, settings=settings)
    assert tasks.core_share() is None

    # no writable temporary directory for its lock files: the worker still starts
    def refuse(*args: object, **kwargs: object) -> str:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with caplog.at_level(logging.WARNING, logger="worker.tasks"):
        tasks.set_worker_queues(("inference",), pool="prefork", concurrency=2, settings=settings)
    assert tasks.core_share() is None
    assert "runs on its process's share of the cores" in caplog.text


def test_jpeg2000_decodes_get_the_cores_their_process_can_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import tasks

    monkeypatch.setattr(tasks, "_state", {})
    monkeypatch.setattr(tasks, "usable_cpus", lambda: 16)
    settings = Settings(device="cpu")
    # prefork processes or a solo worker: the cores shared among the studies at once
    tasks.set_worker_queues(("inference",), pool="prefork", concurrency=4, settings=settings)
    assert tasks._jpeg2000_threads() == 4
    tasks.set_worker_queues(("inference",), pool="solo", concurrency=1, settings=settings)
    assert tasks._jpeg2000_threads() == 16
    # a batching worker's task threads decode one study at a time (Pillow holds the
    # interpreter lock): each decode gets the process's cores, shared with the other
    # batching processes on the host
    tasks.set_worker_queues(("inference",), pool="threads", concurrency=32, settings=settings)
    assert tasks._jpeg2000_threads() == 16
    tasks.set_worker_queues(
        ("inference",), pool="threads", concurrency=32, settings=settings, processes=4
    )
    assert tasks._jpeg2000_threads() == 4
    assert tasks._cores_per_task() == 1  # torch's threads: one for each task thread
    tasks.set_worker_queues(
        ("inference",), pool="threads", concurrency=32, settings=settings, processes=32
    )
    assert tasks._jpeg2000_threads() == 1
