"""End to end: a burst of studies from C-STORE in to the SR delivered, against the bare forward.

Two stacks, each measured in the same run on the same inputs:

- ``embedded``: ``boneage-worker serve`` on the defaults (SQLite database and SQLite
  broker in BONEAGE_DATA_DIR), which starts a listener, ``work -Q inference`` (on a CPU
  one process per core, at most 4, each with its share of the cores as torch threads)
  and ``work -Q delivery``;
- ``redis-postgres``: a fresh PostgreSQL database and a private Redis key prefix, with
  the same three processes started separately (``listen``, ``work -Q inference``,
  ``work -Q delivery``), as production runs it.

Each study is one hand-phantom DX of 2500 x 2000 12-bit pixels, uncompressed (Explicit
VR Little Endian, about 10 MB), with its own Study and SOP Instance UIDs, sex and dates
the gate accepts. The destination (the PACS stand-in) is dcmtk's ``storescp``. The
model is the one the workers load without BONEAGE_MODEL: an untrained ResNet-50
BoneAgeNet at 512 px, on the CPU (BONEAGE_DEVICE=cpu, so the comparison with the bare
forward pass below holds on any machine).

Per stack: one warm-up study is sent first and its SR awaited (model loaded, kernels
warm; not counted). Then the burst is sent the way a PACS auto-forward rule with a few
parallel forward jobs sends it: ``--senders`` dcmtk ``storescu`` processes at once, each
one association carrying its share of the studies. The bench then polls the database
until every instance of the burst has its SR delivery in state ``delivered``, and reads
``received_at`` (set when the instance is on disk and committed, i.e. after its C-STORE
data arrived) and the SR's ``delivered_at`` (set when the destination answered the
C-STORE) of each.

Figures: wall time from the first C-STORE sent to the last SR delivered; throughput =
studies / wall; latency = SR delivered_at - instance received_at (p50, p95, max); the
median time the worker spent in the model (``Result.inference_seconds``: forward plus
Grad-CAM). The reference is the bare forward pass of the same model (batch 1, inference
mode, this process's default torch thread count: all cores, or as many as a container's
CPU quota feeds), timed ``--repeats`` times in this process just before each stack
starts and as many times again just after it stopped, while nothing else runs, with the
heap setting inference workers use: the median of both, so that the VM's drift during
the burst weighs on the reference too.
With BONEAGE_PRECISION=bfloat16 passed through, the bare model is timed in float32 and
under bfloat16 autocast, and the faster of the two is the reference ("fwd in").
Also printed: the CPU seconds per study of each process tree (``serve``'s listener,
inference and delivery workers each apart) and the machine's busy share over the burst,
which show whether the run was CPU-bound and where the time went.
BONEAGE_INFERENCE_PROCESSES, BONEAGE_TORCH_THREADS and the other settings in
``PASSED_THROUGH`` pass through to the stacks, to compare layouts. ``--rounds N`` runs
the stacks N times in turn (each round with its own reference) and judges each stack by
its median ratio: on a shared VM one burst's ratio moves by ±0.05 and more from one run
to the next.
Target: throughput >= 0.8 x the bare forward rate.

    .venv/bin/python -m tests.bench.bench_e2e [--studies 50] [--rounds 1]
        [--stack embedded|redis-postgres|both]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom import dcmread
from sqlalchemy import select

from db.engine import get_engine, session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind, Result
from dicom_io.synthetic import make_radiograph_dataset
from models.checkpoint import untrained_model
from models.phantoms import make_phantom
from tests.bench import TICKS, heap_as_in_workers, proc_stat
from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL, StoreSCP
from tests.support import dcmtk_tool, free_port, wait_for, wait_for_port

STACKS = ("embedded", "redis-postgres")
ROWS, COLUMNS = 2500, 2000
ARCH, INPUT_SIZE = "resnet50", 512
CALLING_AE, CALLED_AE = "PACS", "BONEAGE"
STOP_TIMEOUT = 60.0


# -- inputs --------------------------------------------------------------------------


def make_inputs(folder: Path, count: int, phantoms: int) -> tuple[Path, list[Path]]:
    """Write the warm-up study and ``count`` burst studies; return their paths.

    A phantom of this size takes seconds to draw, so only ``phantoms`` are drawn (ages
    and seeds differ) and each study gets one of them at its own gain, sex and dates.
    """
    folder.mkdir(parents=True, exist_ok=True)
    side = max(ROWS, COLUMNS)
    top, left = (side - ROWS) // 2, (side - COLUMNS) // 2
    bases = []
    for k in range(max(1, min(phantoms, count + 1))):
        age = 96.0 + 24.0 * k  # 8, 10, 12 ... years
        phantom = make_phantom(age, male=k % 2 == 0, size=side, rng=np.random.default_rng(k))
        bases.append((age, phantom.image[top : top + ROWS, left : left + COLUMNS]))
    study_date = dt.date(2025, 3, 14)
    paths = []
    for i in range(count + 1):  # index 0 is the warm-up
        age, image = bases[i % len(bases)]
        gain = 0.9 + 0.1 * ((i * 37) % 11) / 10
        age_days = round((age + (i % 7) - 3) * 30.4375)
        ds = make_radiograph_dataset(
            np.clip(image * gain, 0.0, 1.0).astype(np.float32),
            modality="DX",
            sex="M" if i % 2 == 0 else "F",
            birth_date=study_date - dt.timedelta(days=age_days),
            study_date=study_date,
            patient_id=f"BENCH{i:04d}",
            bits_stored=12,
        )
        path = folder / f"study{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths[0], paths[1:]


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


#: Settings taken from this process's environment, to compare inference layouts and the
#: heat-map picture's floor.
PASSED_THROUGH = (
    "BONEAGE_INFERENCE_PROCESSES",
    "BONEAGE_TORCH_THREADS",
    "BONEAGE_INFERENCE_BATCH",
    "BONEAGE_INFERENCE_BATCH_WAIT_MS",
    "BONEAGE_SC_MIN_LONG_SIDE",
    "BONEAGE_PRECISION",
)


# -- the bare forward pass -----------------------------------------------------------


class Forward:
    """The model the workers load, run bare: batch 1, inference mode, CPU, float32.

    When BONEAGE_PRECISION=bfloat16 is passed through, the same model is also timed
    under bfloat16 autocast, and the reference is whichever of the two is faster: the
    stack is held to the best the bare model does in either precision (on a CPU with
    AMX the bare NCHW model is slower under autocast than in float32).
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        # The model as built (batch norms, NCHW memory): the bare forward pass. The
        # workers run a folded, channels-last copy of it (BoneAgePredictor).
        self.model = untrained_model(arch=ARCH, input_size=INPUT_SIZE).model
        self.x = torch.randn(1, 1, INPUT_SIZE, INPUT_SIZE)
        self.male = torch.ones(1)
        self.precisions = ["float32"]
        if os.environ.get("BONEAGE_PRECISION") == "bfloat16":
            self.precisions.append("bfloat16")

    def seconds(self, repeats: int) -> dict[str, list[float]]:
        """``repeats`` timed forward passes in each precision."""
        times: dict[str, list[float]] = {}
        for precision in self.precisions:
            with (
                torch.inference_mode(),
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"),
            ):
                self.model(self.x, self.male)  # warm-up
                times[precision] = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    self.model(self.x, self.male)
                    times[precision].append(time.perf_counter() - start)
        return times


def describe_forward(times: dict[str, list[float]]) -> str:
    return ", ".join(f"{p} {statistics.median(t):.3f} s" for p, t in times.items())


# -- processes -------------------------------------------------------------------------


class Processes:
    """Service processes with one log file each; stopped with SIGTERM, then killed."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: `serve`'s children can be killed too
            )
        self.started.append((name, proc, log))
        return proc

    def check_alive(self) -> None:
        for name, proc, log in self.started:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(log)}")

    def stop(self) -> None:
        for _, proc, _ in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, proc, _ in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # Not reaped yet, so its group is still ours: kill it with what it started.
                print(f"  {name} did not stop in {STOP_TIMEOUT:.0f}s: killed", flush=True)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def tails(self) -> str:
        return "\n".join(f"--- {name} ---\n{tail(log)}" for name, _, log in self.started)


# -- where the CPU goes ------------------------------------------------------------------


def tree_cpu_by_process(root: int, stop_at: Collection[int] = ()) -> dict[int, tuple[int, float]]:
    """``pid -> (parent pid, CPU seconds)`` of ``root`` and its live descendants.

    The subtrees of the processes in ``stop_at`` are left out (counted in a role of
    their own).
    """
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in stats and (pid == root or pid not in stop_at):
            tree[pid] = stats[pid]
            frontier.extend(child for child, (parent, _) in stats.items() if parent == pid)
    return tree


def tree_cpu_seconds(root: int, stop_at: Collection[int] = ()) -> float:
    """CPU seconds of ``root`` and its live descendants (prefork children, serve's)."""
    return sum(cpu for _, cpu in tree_cpu_by_process(root, stop_at).values())


def serve_children(serve: int) -> dict[str, int]:
    """Role -> pid of the processes ``serve`` supervises, named by their command."""
    children = {}
    for pid, (parent, _) in tree_cpu_by_process(serve).items():
        if parent != serve:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        role = " ".join(argv[argv.index("worker") + 1 :]).strip() if "worker" in argv else ""
        children[f"serve: {role or pid}"] = pid
    return children


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (/proc/stat)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / TICKS


@dataclass
class CpuMeter:
    """CPU seconds per role between :meth:`start` and :meth:`stop`."""

    roles: dict[str, int]  # role -> root pid
    begun: dict[str, float] | None = None
    spent: dict[str, float] | None = None

    def _read(self) -> dict[str, float]:
        roots = set(self.roles.values())
        readings = {role: tree_cpu_seconds(pid, roots) for role, pid in self.roles.items()}
        readings["senders (storescu)"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
        readings["senders (storescu)"] += resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime
        readings["machine"] = machine_busy_seconds()
        return readings

    def start(self) -> None:
        self.begun = self._read()

    def stop(self) -> None:
        assert self.begun is not None
        end = self._read()
        self.spent = {role: end[role] - self.begun[role] for role in end}
        tracked = sum(v for role, v in self.spent.items() if role != "machine")
        self.spent["other (database, broker, this bench)"] = self.spent["machine"] - tracked


def tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def storescu(port: int, files: list[Path]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            dcmtk_tool("storescu"),
            "-aet",
            CALLING_AE,
            "-aec",
            CALLED_AE,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_senders(senders: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    errors = []
    try:
        for proc in senders:
            _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if proc.returncode != 0:
                errors.append(err.decode(errors="replace")[-2000:])
    finally:
        for proc in senders:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    if errors:
        raise RuntimeError("storescu failed:\n" + "\n".join(errors))


@contextmanager
def destination(folder: Path) -> Iterator[StoreSCP]:
    peer = StoreSCP(folder)
    try:
        yield peer.start()
    finally:
        if peer.process is not None and peer.process.poll() is None:
            peer.process.terminate()
            try:
                peer.process.wait(10)
            except subprocess.TimeoutExpired:
                peer.process.kill()
                peer.process.wait(10)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    import psycopg

    name = f"bench_e2e_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{base}/{name}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A private key prefix on the Redis broker; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    client.ping()
    prefix = f"bench-e2e-{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


# -- waiting on the database -------------------------------------------------------------


def sr_delivered(database_url: str, uids: list[str]) -> int:
    with session_scope(database_url) as session:
        return len(
            session.scalars(
                select(Delivery.id)
                .join(Instance, Delivery.instance_id == Instance.id)
                .where(
                    Instance.sop_instance_uid.in_(uids),
                    Delivery.kind == ObjectKind.SR,
                    Delivery.state == DeliveryState.DELIVERED,
                )
            ).all()
        )


def progress(database_url: str, uids: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Instances of ``uids`` by state, and their deliveries by kind and state."""
    with session_scope(database_url) as session:
        instances = Counter(
            str(s)
            for s in session.scalars(
                select(Instance.state).where(Instance.sop_instance_uid.in_(uids))
            )
        )
        deliveries = Counter(
            f"{kind} {state}"
            for kind, state in session.execute(
                select(Delivery.kind, Delivery.state)
                .join(Instance, Delivery.instance_id == Instance.id)
                .where(Instance.sop_instance_uid.in_(uids))
            )
        )
    return instances, deliveries


def describe(counts: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"


def wait_delivered(
    database_url: str, uids: list[str], processes: Processes, *, timeout: float, what: str
) -> None:
    """Poll until every instance of ``uids`` has its SR delivered; fail fast on a dead end."""
    last_report = time.monotonic()

    def done() -> bool:
        nonlocal last_report
        processes.check_alive()
        if sr_delivered(database_url, uids) == len(uids):
            return True
        now = time.monotonic()
        if now - last_report > (5 if len(uids) == 1 else 30):
            instances, deliveries = progress(database_url, uids)
            dead = {str(InstanceState.ERROR), str(InstanceState.NOT_ASSESSED)}
            if dead & set(instances) or any(str(DeliveryState.FAILED) in d for d in deliveries):
                raise RuntimeError(
                    f"{what}: a study cannot finish (instances: {describe(instances)}; "
                    f"deliveries: {describe(deliveries)})"
                )
            if len(uids) > 1:
                print(
                    f"  … instances: {describe(instances)}; deliveries: {describe(deliveries)}",
                    flush=True,
                )
            last_report = now
        return False

    try:
        wait_for(done, timeout=timeout, what=what, interval=0.25)
    except AssertionError as exc:
        instances, deliveries = progress(database_url, uids)
        raise RuntimeError(
            f"{exc}; of {len(uids)}: instances {describe(instances)}; "
            f"deliveries {describe(deliveries)}"
        ) from None


# -- one stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """The node running on one stack, its PACS stand-in, and its database."""

    name: str
    port: int
    database_url: str
    processes: Processes
    pacs: StoreSCP

    def roles(self) -> dict[str, int]:
        """Role -> root pid of each process tree whose CPU is counted."""
        roles = {}
        for name, proc, _ in self.processes.started:
            if name == "serve":  # its listener, inference and delivery workers apart
                roles["serve (supervisor)"] = proc.pid
                roles |= serve_children(proc.pid)
            else:
                roles[name] = proc.pid
        if self.pacs.process is not None:
            roles["destination (storescp)"] = self.pacs.process.pid
        return roles


@contextmanager
def running_stack(stack: str, folder: Path) -> Iterator[Stack]:
    """Start the node on ``stack`` with its files in ``folder`` (removed afterwards).

    ``embedded``: ``serve`` on the defaults; ``redis-postgres``: a listener and the two
    workers on a fresh PostgreSQL database and a private Redis prefix. The destination is
    a dcmtk ``storescp``. Yields once the listener accepts associations.
    """
    with ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, folder, ignore_errors=True)  # last, once all stopped
        pacs = cleanup.enter_context(destination(folder / "pacs"))
        port = free_port()
        # the node's own defaults, except the inference layout when the caller sets it
        env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
        env.update({k: os.environ[k] for k in PASSED_THROUGH if k in os.environ})
        env.update(
            BONEAGE_DATA_DIR=str(folder / "data"),
            BONEAGE_PORT=str(port),
            BONEAGE_AE_TITLE=CALLED_AE,
            BONEAGE_ALLOWED_AETS=CALLING_AE,
            BONEAGE_DESTINATIONS=pacs.destination,
            BONEAGE_DEVICE="cpu",
        )
        if stack == "embedded":
            database_url = f"sqlite:///{folder / 'data' / 'boneage.db'}"
        else:
            database_url = cleanup.enter_context(postgres_database())
            env.update(
                BONEAGE_DATABASE_URL=database_url,
                BONEAGE_BROKER_URL=REDIS_URL,
                BONEAGE_BROKER_PREFIX=cleanup.enter_context(redis_prefix()),
            )
        upgraded = subprocess.run(
            [sys.executable, "-m", "worker", "db", "upgrade"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if upgraded.returncode != 0:
            raise RuntimeError(f"db upgrade failed:\n{upgraded.stderr[-4000:]}")

        processes = Processes(folder / "logs", env)
        cleanup.callback(processes.stop)
        try:
            if stack == "embedded":
                first = processes.start("serve", "serve")
            else:
                first = processes.start("listener", "listen")
                processes.start("inference", "work", "-Q", "inference")
                processes.start("delivery", "work", "-Q", "delivery")
            wait_for_port(port, timeout=120, process=first)
        except Exception:
            print(f"[{stack}] failed to start; the processes' last log lines:\n{processes.tails()}")
            raise
        yield Stack(stack, port, database_url, processes, pacs)


def send_and_wait(node: Stack, study: Path, what: str) -> float:
    """Send one study; seconds from its first C-STORE to its SR delivered."""
    first_sent = dt.datetime.now(dt.UTC)
    finish_senders([storescu(node.port, [study])], timeout=120)
    uids = [sop_uid(study)]
    wait_delivered(node.database_url, uids, node.processes, timeout=600, what=what)
    wall, _, _ = measure(node.database_url, uids, first_sent)
    return wall


@dataclass
class Figures:
    stack: str
    forward_s: float
    forward_precision: str
    sent_s: float
    wall_s: float
    latencies: list[float]
    inference_s: float
    cpu: dict[str, float]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s

    @property
    def ratio(self) -> float:
        return self.throughput * self.forward_s


def measure(
    database_url: str, uids: list[str], first_sent: dt.datetime
) -> tuple[float, list[float], float]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(Instance.received_at, Delivery.delivered_at)
            .join(Delivery, Delivery.instance_id == Instance.id)
            .where(Instance.sop_instance_uid.in_(uids), Delivery.kind == ObjectKind.SR)
        ).all()
        inference = list(
            session.scalars(
                select(Result.inference_seconds)
                .join(Instance, Result.instance_id == Instance.id)
                .where(Instance.sop_instance_uid.in_(uids))
            )
        )
    pairs = [(received, delivered) for received, delivered in rows if delivered is not None]
    if len(pairs) != len(uids):
        raise RuntimeError(f"{len(pairs)} SRs delivered for {len(uids)} studies")
    latencies = [(delivered - received).total_seconds() for received, delivered in pairs]
    wall = (max(delivered for _, delivered in pairs) - first_sent).total_seconds()
    return wall, latencies, statistics.median(inference) if inference else float("nan")


def run_stack(
    stack: str,
    work: Path,
    warmup: Path,
    files: list[Path],
    uids: list[str],
    forward: Forward,
    args: argparse.Namespace,
) -> Figures:
    before = forward.seconds(args.repeats)  # nothing of the stack runs yet
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(
        f"[{stack}] bare forward {describe_forward(before)} (load average {load}); "
        "starting the stack",
        flush=True,
    )
    folder = Path(tempfile.mkdtemp(prefix=f"{stack}-", dir=work))  # one per round
    with running_stack(stack, folder) as node:
        try:
            # model loaded, kernels warm, every process past its start
            send_and_wait(node, warmup, "the warm-up SR")
            print(f"[{stack}] warm-up SR delivered; sending {len(files)} studies", flush=True)
            meter = CpuMeter(node.roles())
            meter.start()

            senders = min(args.senders, len(files))
            shares = [files[i::senders] for i in range(senders)]
            first_sent = dt.datetime.now(dt.UTC)
            started = time.perf_counter()
            burst = [storescu(node.port, share) for share in shares]
            finish_senders(burst, timeout=60 + 10 * len(files))
            sent_s = time.perf_counter() - started
            timeout = args.timeout or 300 + 30 * len(files)
            wait_delivered(
                node.database_url,
                uids,
                node.processes,
                timeout=timeout,
                what=f"{len(uids)} SRs delivered",
            )
            meter.stop()
            wall, latencies, inference = measure(node.database_url, uids, first_sent)
        except Exception:
            print(f"[{stack}] failed; the processes' last log lines:\n{node.processes.tails()}")
            raise
    assert meter.spent is not None
    after = forward.seconds(args.repeats)  # the stack has stopped
    both = {p: before[p] + after[p] for p in before}
    precision = min(both, key=lambda p: statistics.median(both[p]))  # the faster
    forward_s = statistics.median(both[precision])
    print(
        f"[{stack}] bare forward {describe_forward(after)} after the burst; "
        f"reference {forward_s:.3f} s ({precision})",
        flush=True,
    )
    return Figures(stack, forward_s, precision, sent_s, wall, latencies, inference, meter.spent)


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--stack", choices=[*STACKS, "both"], default="both")
    parser.add_argument(
        "--senders", type=int, default=5, help="parallel storescu associations in the burst"
    )
    parser.add_argument("--repeats", type=int, default=9, help="bare forward passes timed")
    parser.add_argument(
        "--phantoms", type=int, default=4, help="distinct phantoms drawn (each takes seconds)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds for the burst (default 300 + 30/study)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where temp files go")
    parser.add_argument(
        "--rounds", type=int, default=1, help="times each stack runs, in turn (verdict: median)"
    )
    args = parser.parse_args()
    heap = heap_as_in_workers()
    if args.studies < 1:
        parser.error("--studies must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    stacks = STACKS if args.stack == "both" else (args.stack,)

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-", dir=args.workdir))
    results: list[Figures] = []
    try:
        print(f"writing {args.studies} + 1 studies ({ROWS}x{COLUMNS} DX) …", flush=True)
        warmup, files = make_inputs(work / "inputs", args.studies, args.phantoms)
        size_mb = sum(f.stat().st_size for f in files) / len(files) / 1e6
        uids = [sop_uid(f) for f in files]
        forward = Forward()
        for _ in range(args.rounds):
            for stack in stacks:
                results.append(run_stack(stack, work, warmup, files, uids, forward, args))
    except RuntimeError as exc:  # a stack failed or timed out: say how far it got, no trace
        sys.exit(f"bench_e2e: {exc}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, "
        f"device cpu, {torch.get_num_threads()} torch threads; model {ARCH} {INPUT_SIZE}px "
        "(untrained)"
    )
    print(
        f"{args.studies} studies of {size_mb:.1f} MB ({ROWS}x{COLUMNS} DX 12-bit, uncompressed), "
        f"burst over {min(args.senders, args.studies)} parallel associations; "
        f"bare forward: batch 1, median of {args.repeats} before and {args.repeats} after each "
        f"stack, {' and '.join(forward.precisions)}"
        f"{' (the faster is the reference)' if len(forward.precisions) > 1 else ''}; {heap}"
    )
    passed = [f"{k}={os.environ[k]}" for k in PASSED_THROUGH if k in os.environ]
    print(f"settings passed through: {', '.join(passed) or 'none (the defaults)'}")
    print(
        f"{'stack':<16}{'sent s':>8}{'wall s':>9}{'studies/s':>11}{'fwd img/s':>11}{'fwd in':>10}"
        f"{'× fwd':>7}{'p50 s':>8}{'p95 s':>8}{'max s':>8}{'model s':>9}"
    )
    for r in results:
        p50, p95 = np.percentile(r.latencies, [50, 95])
        print(
            f"{r.stack:<16}{r.sent_s:>8.1f}{r.wall_s:>9.1f}{r.throughput:>11.3f}"
            f"{1 / r.forward_s:>11.3f}{r.forward_precision:>10}{r.ratio:>7.2f}"
            f"{p50:>8.1f}{p95:>8.1f}{max(r.latencies):>8.1f}{r.inference_s:>9.2f}"
        )
    print(
        "wall: first C-STORE sent to last SR delivered; latency: instance received_at to its "
        "SR delivered_at; model s: median Result.inference_seconds (forward + Grad-CAM)"
    )
    print("CPU seconds per study, first C-STORE sent to last SR delivered:")
    for r in results:
        studies = len(r.latencies)
        parts = ", ".join(
            f"{role} {seconds / studies:.3f}"
            for role, seconds in r.cpu.items()
            if role != "machine"
        )
        busy = r.cpu["machine"] / (r.wall_s * (os.cpu_count() or 1))
        print(f"  {r.stack}: {parts}; machine busy {100 * busy:.0f}%")
    for stack in stacks:
        ratios = [r.ratio for r in results if r.stack == stack]
        ratio = statistics.median(ratios)
        verdict = "met" if ratio >= 0.8 else "missed"
        # two decimals, or three where two would round a miss up to the target (0.795)
        digits = 3 if round(ratio, 2) >= 0.8 > ratio else 2
        rounds = f" (median of {len(ratios)}: {', '.join(f'{x:.{digits}f}' for x in ratios)})"
        print(
            f"{stack}: throughput / bare forward = {ratio:.{digits}f}×"
            f"{rounds if len(ratios) > 1 else ''} (target ≥ 0.8×: {verdict})"
        )


if __name__ == "__main__":
    main()
