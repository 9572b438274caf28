"""worker.metrics_files: the prefork worker's metrics directory is set before prometheus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import prometheus_client  # noqa: F401  (imported here on purpose: see the second test)

from tests.support import free_port
from worker.metrics_files import MULTIPROCESS_ENV, use_multiprocess_directory, worker_metrics_port

# A fresh interpreter: the directory is emptied, and prometheus_client, imported after,
# keeps a counter incremented in a child process in files there.
_PROBE = """
import json, os, sys
from pathlib import Path
from worker.metrics_files import use_multiprocess_directory
directory = Path(sys.argv[1])
ok = use_multiprocess_directory(directory)
from prometheus_client import CollectorRegistry, Counter, multiprocess
counter = Counter("probe_events", "events", registry=None)
pid = os.fork()
if pid == 0:
    counter.inc(3)
    os._exit(0)
os.waitpid(pid, 0)
counter.inc()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=str(directory))
print(json.dumps({"ok": ok, "total": registry.get_sample_value("probe_events_total"),
                  "stale": (directory / "stale.db").exists()}))
"""


def test_children_counters_are_summed_and_stale_files_removed(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "inference-9100"
    directory.mkdir(parents=True)
    (directory / "stale.db").write_bytes(b"left by an earlier run")
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(done.stdout) == {"ok": True, "total": 4.0, "stale": False}
    assert directory.stat().st_mode & 0o777 == 0o700


def test_too_late_once_prometheus_client_is_imported(tmp_path: Path) -> None:
    assert use_multiprocess_directory(tmp_path / "late") is False
    assert not (tmp_path / "late").exists()
    assert MULTIPROCESS_ENV not in os.environ


def test_worker_metrics_port() -> None:
    assert worker_metrics_port(None, ["inference"]) is None
    base = free_port()
    assert worker_metrics_port(base, ["inference", "delivery"]) == base
    assert worker_metrics_port(base, ["delivery"]) == base + 1
