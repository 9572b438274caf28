"""A CPU inference worker in a container limited to one CPU (a control group's quota, as
``docker run --cpus 1`` sets): it runs one process of one thread, as ``status`` shows,
not one per core of the host, which its affinity mask still lists (worker.cgroups)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_end_to_end import cli
from tests.support import cpu_quota_group, in_group, keep_process_log, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _inference_processes(env: dict[str, str]) -> list[dict[str, Any]] | None:
    report = json.loads(cli("status", "--json", env=env).stdout)
    alive = [p for p in report["processes"] if p["alive"] and "inference" in p.get("queues", [])]
    # a process shows its threads once its model is loaded
    return alive if alive and all("torch_threads" in p for p in alive) else None


def test_a_cpu_worker_sizes_itself_to_its_cpu_quota(tmp_path: Path, tiny_checkpoint: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.pop("OMP_NUM_THREADS", None)
    env.update(
        BONEAGE_DATA_DIR=str(tmp_path / "data"),
        BONEAGE_MODEL=str(tiny_checkpoint),
        BONEAGE_DEVICE="cpu",
    )
    assert cli("db", "upgrade", env=env).returncode == 0
    log = tmp_path / "worker.log"
    keep_process_log(log)
    with cpu_quota_group(1.0) as group:
        worker = subprocess.Popen(
            in_group(group, sys.executable, "-m", "worker", "work", "-Q", "inference"),
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            processes = wait_for(
                lambda: _inference_processes(env), timeout=180, what="the worker's heartbeat"
            )
            shown = cli("status", env={**env, "COLUMNS": "200"}).stdout  # one line a process
            # prefork children the worker started, whether or not they have beaten yet
            children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(60) == 0
    # one process: the worker assesses in itself, one study at a time (the solo pool)
    assert children == []
    (process,) = processes
    assert process["name"].endswith(f":{worker.pid}")
    assert process["cpu_quota"] == 1.0
    assert process["usable_cpus"] == 1
    assert process["torch_threads"] == 1
    assert process["jpeg2000_threads"] == 1
    # no pass on "every core" for a study that comes alone: the quota feeds one
    assert "lone_study_threads" not in process
    assert "CPU limit 1" in shown  # what the administrator reads
