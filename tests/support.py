"""Helpers for tests: free ports, waiting on conditions with a deadline, process logs,
control groups with a CPU or memory limit."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydicom import Dataset
from pydicom.uid import generate_uid

from dicom_io.ko import Reference, build_rejection_note
from dicom_io.scp import ReceivedInstance

if TYPE_CHECKING:
    import pytest

    from db.schema import InstanceState
    from models.data import PreparedDataset

T = TypeVar("T")

_pause = threading.Event()

#: Logs of the processes tests started (our nodes, storescp), for failure reports.
_process_logs: list[Path] = []

#: How much of each log a failure report shows (its end).
LOG_TAIL_CHARS = 12_000


def keep_process_log(path: Path) -> None:
    """Show the end of ``path`` in the report of a test that fails while it is written."""
    if path not in _process_logs:
        _process_logs.append(path)


def process_logs_since(started: float) -> list[tuple[Path, str]]:
    """(log, its end) for each kept log written to at or after ``started`` (epoch s)."""
    tails = []
    for path in _process_logs:
        try:
            if path.stat().st_mtime < started:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tails.append((path, text[-LOG_TAIL_CHARS:]))
    return tails


def dcmtk_tool(name: str) -> str:
    """Absolute path of a dcmtk tool, never pynetdicom's same-named script in the venv."""
    venv_bin = os.path.dirname(sys.executable)
    search = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and os.path.realpath(p) != os.path.realpath(venv_bin)
    )
    found = shutil.which(name, path=search or None) or shutil.which(name, path="/usr/bin")
    if found is None:
        raise AssertionError(f"dcmtk's {name} is not installed: run scripts/setup.sh")
    return found


def storescu_command(
    port: int, *files: Path, calling: str = "PACS", extra: Sequence[str] = ()
) -> list[str]:
    """dcmtk's storescu sending ``files`` over one association to the listener
    (BONEAGE) on loopback ``port``, as ``calling``; ``extra``: its other options."""
    return [
        dcmtk_tool("storescu"),
        *("-aet", calling, "-aec", "BONEAGE", *extra),
        *("127.0.0.1", str(port), *map(str, files)),
    ]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.1,
    process: subprocess.Popen[bytes] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout``.

    If ``process`` is given and exits first, fail at once with its stderr.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise AssertionError(
                f"process exited with {process.returncode} while waiting for {what}:\n{err[-4000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        _pause.wait(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int, *, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    wait_for(lambda: port_open(port), timeout=timeout, what=f"port {port}", process=process)


def instance_state(database_url: str, instance_id: int) -> InstanceState | None:
    """The state of the instance ``instance_id`` now; None if there is no such row."""
    from sqlalchemy import select

    from db.engine import session_scope
    from db.schema import Instance

    with session_scope(database_url) as session:
        return session.scalar(select(Instance.state).where(Instance.id == instance_id))


def a_listener_writing_for_a_while(database_url: str) -> None:
    """A listener's heartbeat, fresh, written without a break for twice `STALE_AFTER`:
    the witness by which another process's stale heartbeat is its death
    (worker.heartbeat.claim_holders), as the listener that runs the reconciler is."""
    from db.engine import session_scope
    from db.queries import database_now
    from db.schema import Heartbeat
    from worker.heartbeat import STALE_AFTER

    with session_scope(database_url) as session:
        current = database_now(session)
        session.merge(
            Heartbeat(
                name="listener@witness/test:1",
                role="listener",
                detail={},
                started_at=current - 2 * STALE_AFTER,
                seen_at=current,
                writing_since=current - 2 * STALE_AFTER,
            )
        )


@contextlib.contextmanager
def own_redis_server(
    port: int, options: Sequence[str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A redis-server of the test's own, listening on ``port`` (its TLS port, where
    ``options`` say so), with the app's connection pools, made for an earlier test's
    broker, made again; stopped after."""
    from worker.celery_app import app

    server = shutil.which("redis-server")
    assert server is not None, "redis-server is not installed"
    proc = subprocess.Popen(
        [server, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    try:
        wait_for_port(port, timeout=30, process=proc)
        yield
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        proc.terminate()
        proc.wait(10)


def timed_call(call: Callable[[], None], limit: float) -> tuple[float, BaseException | None]:
    """Seconds ``call`` took on a thread of its own, and what it raised; fails if it has
    not returned within ``limit`` (it is left to end on its own)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the test
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="publish", daemon=True)
    began = time.monotonic()
    thread.start()
    thread.join(limit)
    took = time.monotonic() - began
    assert not thread.is_alive(), f"the publish still waited after {took:.1f} s"
    return took, outcome[0]


def redis_queue_ids(prefix: str, queue: str, *, each_once: bool = False) -> list[object]:
    """The first argument of each message waiting in the Redis list ``prefix + queue``,
    oldest first, read directly; ``each_once``: a message there twice counted once (a
    publish whose reply came after its wait is published again, harmlessly: tasks are
    idempotent)."""
    import base64
    import json

    import redis

    client = redis.Redis(host="127.0.0.1", port=6379)
    try:
        raw = client.lrange(f"{prefix}{queue}", 0, -1)
    finally:
        client.close()
    ids: list[object] = []
    for message in reversed(raw):  # kombu pushes on the left
        first = json.loads(base64.b64decode(json.loads(message)["body"]))[0][0]
        if not (each_once and first in ids):
            ids.append(first)
    return ids


def received(uid: str = "1.2.3.4", tmp_path: Path = Path("/nonexistent")) -> ReceivedInstance:
    """What the listener learns of a stored DX instance, for recording a row directly."""
    return ReceivedInstance(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        modality="DX",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae_title="PACS",
        path=tmp_path / "x.dcm",
        size_bytes=10,
    )


@contextlib.contextmanager
def limited_group(*, cpus: float | None = None, memory: int | None = None) -> Iterator[list[Path]]:
    """Real control groups allowing ``cpus`` CPUs' worth of time a 100 ms period and
    ``memory`` bytes, as ``docker run --cpus --memory`` makes: one group on cgroup v2, one
    per controller's hierarchy on v1. Skips the test where they cannot be made (it needs
    root). Start processes in them with :func:`in_group`; they are removed afterwards."""
    name = f"boneage-test-{uuid.uuid4().hex[:8]}"
    # each controller's limit: its files on cgroup v1, then on v2
    limits: dict[str, tuple[dict[str, str], dict[str, str]]] = {}
    if cpus is not None:
        quota = f"{cpus * 100_000:.0f}"
        limits["cpu"] = (
            {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": quota},
            {"cpu.max": f"{quota} 100000"},
        )
    if memory is not None:
        limits["memory"] = ({"memory.limit_in_bytes": str(memory)}, {"memory.max": str(memory)})
    root = Path("/sys/fs/cgroup")
    if all(os.access(root / controller, os.W_OK) for controller in limits):
        # v1: a hierarchy, and so a group, for each controller
        plan = [(root / controller / name, v1) for controller, (v1, _) in limits.items()]
    elif set(limits) <= set(_read_text(root / "cgroup.subtree_control").split()) and os.access(
        root, os.W_OK
    ):
        plan = [(root / name, {f: v for _, v2 in limits.values() for f, v in v2.items()})]
    else:
        import pytest

        pytest.skip("no control group with a CPU or memory limit can be made here (needs root)")
    made: list[Path] = []
    try:
        for group, files in plan:
            group.mkdir()
            made.append(group)
            for file, value in files.items():
                (group / file).write_text(value)
        yield made
    finally:
        for group in made:
            with contextlib.suppress(OSError):  # left behind if a process in it still runs
                group.rmdir()


def in_group(groups: list[Path], *command: str) -> list[str]:
    """``command`` run in ``groups``: a shell joins them, then becomes the command."""
    join = " && ".join(f'echo $$ > "{group}/cgroup.procs"' for group in groups)
    return ["sh", "-c", f'{join} && exec "$@"', "sh", *command]


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def record_evaluated_datasets(monkeypatch: pytest.MonkeyPatch) -> list[PreparedDataset]:
    """The datasets `models.evaluate.evaluate` builds from now on, in order: what it
    gives the model, image by image."""
    import models.evaluate
    from models.data import PreparedDataset

    made: list[PreparedDataset] = []

    class Recording(PreparedDataset):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(models.evaluate, "PreparedDataset", Recording)
    return made


def reference_of(ds: Dataset) -> Reference:
    """``ds`` as a rejection note names it."""
    return Reference(
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
    )


def pacs_rejection_note(
    image: Dataset, code: str = "113038", *, also: Sequence[Reference] = ()
) -> Dataset:
    """The IOCM rejection note a PACS stores for ``image`` (and ``also``), with its own
    UIDs and equipment: "Incorrect Modality Worklist Entry" unless ``code`` says
    otherwise."""
    note = build_rejection_note(
        image,
        code,
        [reference_of(image), *also],
        description="Rejected at the PACS",
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=990,
        manufacturer_model_name="PACS",
    )
    note.Manufacturer = "Hospital PACS"
    return note
