"""A burst: 20 associations at once (20 dcmtk storescu), 50 instances each, into `serve`.

Embedded defaults (SQLite database, SQLite broker), the tiny model, no destination:
what is measured is the listener under concurrency and the path to a terminal state.
The figures are logged (``-o log_cli=true`` shows them).
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from db.engine import session_scope
from db.schema import Instance, InstanceState
from dicom_io.synthetic import make_radiograph_dataset
from tests.integration.test_end_to_end import Node
from tests.support import free_port, storescu_command, wait_for, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

logger = logging.getLogger(__name__)

ASSOCIATIONS = 20
PER_ASSOCIATION = 50
TERMINAL = (InstanceState.ASSESSED, InstanceState.NOT_ASSESSED, InstanceState.ERROR)
RSS_GROWTH_LIMIT_KB = 300 * 1024


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def listener_pid(serve_pid: int) -> int | None:
    """The `listen` child of a `serve` process, found through /proc."""
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    for child in children:
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"listen" in argv:
            return int(child)
    return None


class RssSampler:
    """Samples a process's VmRSS every 50 ms on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(rss_kb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def write_burst(folder: Path, seed: int) -> list[Path]:
    """PER_ASSOCIATION small DX instances of one study, as files for one storescu."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(256, 256), dtype=np.uint16)
    ds = make_radiograph_dataset(
        pixels,
        sex="F" if seed % 2 else "M",
        birth_date=dt.date(2015, 1, 1),
        study_date=dt.date(2025, 1, 1),
    )
    folder.mkdir(parents=True)
    files = []
    for n in range(PER_ASSOCIATION):
        uid = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@pytest.fixture
def node(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[Node]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(tmp_path / "data"),
        BONEAGE_PORT=str(free_port()),
        BONEAGE_ALLOWED_AETS="PACS",
        # the twenty senders all come from loopback, one address here: twenty nodes of a
        # hospital, each within its own share
        BONEAGE_MAX_ASSOCIATIONS_PER_PEER=str(ASSOCIATIONS),
        BONEAGE_MODEL=str(tiny_checkpoint),
        BONEAGE_LOG_LEVEL="WARNING",
    )
    made = Node(tmp_path, env)
    yield made
    made.stop()


def terminal_count(database_url: str) -> int:
    with session_scope(database_url) as session:
        return (
            session.scalar(
                select(func.count()).select_from(Instance).where(Instance.state.in_(TERMINAL))
            )
            or 0
        )


@pytest.mark.timeout(900)
def test_burst_of_1000_instances_nothing_lost(node: Node, tmp_path: Path) -> None:
    port = int(node.env["BONEAGE_PORT"])
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    serve = node.start("serve", "serve")
    wait_for_port(port, timeout=120, process=serve)
    pid = wait_for(lambda: listener_pid(serve.pid), timeout=30, what="the listener process")
    assert pid is not None
    baseline = rss_kb(pid)

    bursts = [write_burst(tmp_path / f"burst{i:02d}", i) for i in range(ASSOCIATIONS)]
    # Twenty real peers, each its own process (dcmtk storescu, verbose so that every
    # response is printed): nothing of the sender shares the test process's threads.
    started = time.monotonic()
    with RssSampler(pid) as sampler:
        senders = [
            subprocess.Popen(
                storescu_command(port, *files, extra=("-v",)),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for files in bursts
        ]
        outputs = [sender.communicate(timeout=600)[0] for sender in senders]
    acknowledged = time.monotonic() - started
    total = ASSOCIATIONS * PER_ASSOCIATION
    for sender, output in zip(senders, outputs, strict=True):
        assert sender.returncode == 0, output[-2000:]
        assert output.count("Received Store Response (Success)") == PER_ASSOCIATION, output[-2000:]
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == total

    wait_for(
        lambda: terminal_count(database_url) == total,
        timeout=600,
        interval=1,
        what="every instance in a terminal state",
        process=serve,
    )
    processed = time.monotonic() - started
    with session_scope(database_url) as session:
        by_state = dict(
            session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
        )
    peak = max([baseline, *sampler.samples])
    logger.warning(
        "load: %d instances acknowledged in %.1fs (%.1f/s), all terminal after %.1fs "
        "(%.1f/s); states %s; listener RSS baseline %d MB, peak %d MB over %d samples",
        total,
        acknowledged,
        total / acknowledged,
        processed,
        total / processed,
        {str(k): v for k, v in by_state.items()},
        baseline // 1024,
        peak // 1024,
        len(sampler.samples),
    )
    assert by_state == {InstanceState.ASSESSED: total}
    assert peak - baseline < RSS_GROWTH_LIMIT_KB
