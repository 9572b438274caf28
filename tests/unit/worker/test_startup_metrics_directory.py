"""Where a worker's processes keep their metric files, and its start-up when the
directory is there already.

The files were under the shared data directory, where workers on other hosts with the
same queues and port (pods scaled by KEDA, `compose --scale`, machines on one NFS
export) emptied each other's and served each other's counts; and a directory made
again by one of them between another's removal and creation stopped that worker's
start with FileExistsError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from worker.metrics_files import metrics_directory

# A fresh interpreter (prometheus_client must not be imported before the directory is
# set): the directory is emptied as another host's worker makes it again meanwhile, or
# keeps a file its removal left (NFS), and a counter still reaches its files.
_PROBE = """
import json, logging, os, shutil, sys
from pathlib import Path
logging.basicConfig(level=logging.WARNING, format="%(message)s")
directory, how = Path(sys.argv[1]), sys.argv[2]
removal = shutil.rmtree

def rmtree(path, ignore_errors=False):
    if how == "made-again":
        removal(path, ignore_errors=ignore_errors)
        Path(path).mkdir(parents=True)  # another host's worker, meanwhile
    # "left": nothing could be removed (a file still open elsewhere on NFS)

shutil.rmtree = rmtree
from worker.metrics_files import use_multiprocess_directory
ok = use_multiprocess_directory(directory)
from prometheus_client import CollectorRegistry, Counter, multiprocess
Counter("probe_events", "events", registry=None).inc(2)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=str(directory))
print(json.dumps({"ok": ok, "total": registry.get_sample_value("probe_events_total")}))
"""


def _probe(directory: Path, how: str) -> tuple[dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(directory), how],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout), done.stderr


def test_the_metrics_directory_is_this_hosts_not_the_shared_data_directory() -> None:
    directory = metrics_directory(("inference", "delivery"), 9100)
    local = Path(tempfile.gettempdir()) / f"boneage-worker-{os.getuid()}"
    assert directory == local / "metrics" / "inference-delivery-9100"
    # one per worker on a host: its queues and its port
    assert metrics_directory(("delivery",), 9101) != metrics_directory(("inference",), 9101)


def test_a_directory_made_again_meanwhile_does_not_stop_the_start(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "inference-9100"
    directory.mkdir(parents=True)
    answer, _ = _probe(directory, "made-again")
    assert answer == {"ok": True, "total": 2.0}


def test_files_that_could_not_be_removed_are_said(tmp_path: Path) -> None:
    directory = tmp_path / "metrics" / "delivery-9101"
    earlier, _ = _probe(directory, "made-again")
    assert earlier == {"ok": True, "total": 2.0}
    answer, log = _probe(directory, "left")
    # the earlier run's counts are added to this one's, as the warning says
    assert answer == {"ok": True, "total": 4.0}
    assert f"1 file(s) of an earlier run could not be removed from {directory}" in log
