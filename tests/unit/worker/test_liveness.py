"""`boneage-worker liveness`: a worker process that has run one task past HUNG_AFTER is
hung, though its heartbeat thread goes on; the probe sees it from local files alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from celery import Celery
from click.testing import CliRunner

from db.engine import upgrade
from worker.celery_app import deliver_time_limit
from worker.cli import main as cli
from worker.heartbeat import HUNG_AFTER, HeartbeatThread, TasksInHand, hung_tasks
from worker.reconciler import PROCESSING_LEASE

LONG_AGO = HUNG_AFTER.total_seconds() + 60

#: A worker process elsewhere on this host: its tasks in hand noted, one begun
#: ``argv[2]`` seconds ago and never finished; it says when it is up, then waits.
WORKER = """
import sys, threading, time
from pathlib import Path
from worker.heartbeat import TasksInHand
tasks = TasksInHand(Path(sys.argv[1]), clock=lambda: time.time() - float(sys.argv[2]))
tasks.started("t1", "boneage.assess")
print("up", flush=True)
threading.Event().wait()
"""


@pytest.fixture
def directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's temporary directory is the host's, for this process and its children."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path / f"boneage-worker-{os.getuid()}" / "tasks"


def _probe() -> subprocess.CompletedProcess[str]:
    """The probe as Kubernetes runs it: a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "worker", "liveness"], capture_output=True, text=True, timeout=60
    )


def _worker(directory: Path, began_ago: float) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(directory), str(began_ago)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "up\n"
    return process


def test_hung_after_is_far_past_what_bounds_a_task() -> None:
    assert HUNG_AFTER >= 2 * PROCESSING_LEASE
    assert HUNG_AFTER.total_seconds() >= 2 * deliver_time_limit()


def test_a_worker_process_with_a_task_past_hung_after_fails_the_probe(directory: Path) -> None:
    assert _probe().returncode == 0  # no worker process here yet
    busy = _worker(directory, began_ago=60)  # a minute into a task: working
    hung = None
    try:
        assert (_probe().returncode, _probe().stdout) == (0, "alive\n")
        hung = _worker(directory, began_ago=LONG_AGO)
        probe = _probe()
        assert probe.returncode == 1
        assert probe.stdout == (
            f"worker process {hung.pid} has run boneage.assess for 61 min (hung after 60)\n"
        )
    finally:
        for process in (busy, hung):
            if process is not None:
                process.kill()
                process.wait()
    # Killed, they leave their files behind, unlocked: a process that died is no
    # process that hangs (and its id may be another's now).
    assert len(list(directory.glob("*.json"))) == 2
    assert _probe().returncode == 0


def test_celery_tasks_are_noted_from_start_to_end(directory: Path) -> None:
    """Through Celery's own tracing (task_prerun, task_postrun), in whatever pool."""
    app = Celery("liveness-test", set_as_current=False)
    tasks = TasksInHand(clock=lambda: time.time() - LONG_AGO)
    tasks.watch_celery()
    seen_while_running: list[list[str]] = []

    @app.task(name="boneage.assess")
    def assess() -> None:
        seen_while_running.append([h.task for h in hung_tasks()])
        seen_while_running.append(CliRunner().invoke(cli, ["liveness"]).output.split()[:1])

    try:
        assess.apply()
        assert seen_while_running == [["boneage.assess"], ["worker"]]
        assert hung_tasks() == []  # it ended
        result = CliRunner().invoke(cli, ["liveness"])
        assert (result.exit_code, result.output) == (0, "alive\n")

        @app.task(name="boneage.deliver")
        def failing() -> None:
            raise OSError("the PACS went away")

        failing.apply()  # a task that raises ends too
        assert hung_tasks() == []
    finally:
        tasks.close()
    assert not tasks.path.exists()


def test_a_worker_heartbeat_notes_its_tasks_and_a_listener_does_not(
    directory: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    upgrade(url)
    listener = HeartbeatThread(url, "listener")
    listener.start()
    worker = HeartbeatThread(url, "worker")
    worker.start()
    try:
        assert listener.tasks is None
        assert worker.tasks is not None
        assert [p.name for p in directory.iterdir()] == [f"{os.getpid()}.json"]
        worker.tasks.started("t1", "boneage.assess")
        assert hung_tasks() == []
        in_an_hour = [h.task for h in hung_tasks(now=time.time() + LONG_AGO)]
        assert in_an_hour == ["boneage.assess"]
    finally:
        worker.stop()
        listener.stop()
    assert list(directory.iterdir()) == []  # stopped cleanly: nothing left


def test_a_probe_never_fails_on_a_file_being_written(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "12345.json").write_text("")  # created, not yet locked nor written
    assert hung_tasks() == []
    process = _worker(directory, began_ago=LONG_AGO)
    try:
        os.kill(process.pid, signal.SIGSTOP)  # frozen, yet holding its lock: still hung
        assert [h.pid for h in hung_tasks()] == [process.pid]
    finally:
        process.kill()
        process.wait()
    assert hung_tasks() == []  # its lock went with it
