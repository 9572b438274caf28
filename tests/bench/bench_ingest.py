"""Ingest throughput: our listener vs dcmtk storescp vs a bare fsync'ing pynetdicom SCP.

All three receive the same N hand-radiograph-sized instances (about 9 MB each,
2 300 × 2 000 16-bit DX) from dcmtk's storescu over loopback, one association each,
in one run. Ours does the full job: stream to the spool, fsync, rename, commit the
row (SQLite, the embedded default), hand to the enqueuer (embedded broker); no
worker runs, so the figure is ingest alone. Also reports each receiver's CPU per
instance and peak RSS.
Between receivers, their files are removed and the page cache is written back
(``os.sync``), so no receiver pays for its predecessor's unwritten data.

    .venv/bin/python -m tests.bench.bench_ingest [--count 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dicom_io.synthetic import make_radiograph_dataset
from tests.bench import peak_rss_mb, proc_stat
from tests.support import dcmtk_tool, free_port, port_open, wait_for

ROOT = Path(__file__).resolve().parents[2]


def make_inputs(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    base = (rng.random((2300, 2000)) * 4000).astype(np.uint16)
    files = []
    for i in range(count):
        ds = make_radiograph_dataset(
            base, sex="F", birth_date=dt.date(2015, 1, 1), study_date=dt.date(2025, 1, 1)
        )
        path = folder / f"in{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def send(port: int, ae: str, files: list[Path]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            "BENCH",
            "-aec",
            ae,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads."""
    stat = proc_stat(pid)
    if stat is None:
        raise RuntimeError(f"process {pid} exited while receiving")
    return stat[1]


def run_peer(name: str, work: Path, files: list[Path]) -> tuple[float, float, float]:
    port = free_port()
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    if name == "storescp":
        cmd, ae = [dcmtk_tool("storescp"), "--output-directory", str(out), str(port)], "ANY-SCP"
    elif name == "bare pynetdicom":
        cmd, ae = (
            [sys.executable, str(Path(__file__).with_name("bare_scp.py")), str(port), str(out)],
            "BARE",
        )
        env["PYTHONPATH"] = str(ROOT)
    else:
        env.update(BONEAGE_DATA_DIR=str(out), BONEAGE_PORT=str(port), BONEAGE_LOG_LEVEL="WARNING")
        subprocess.run(
            [sys.executable, "-m", "worker", "db", "upgrade"],
            env=env,
            check=True,
            capture_output=True,
        )
        cmd, ae = [sys.executable, "-m", "worker", "listen"], "BONEAGE"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), timeout=60, what=f"{name} listening")
        cpu_before = cpu_seconds(proc.pid)
        seconds = send(port, ae, files)
        cpu = cpu_seconds(proc.pid) - cpu_before
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        # Every receiver starts from the same state: storescp does not fsync, and the
        # ~1 GB it leaves dirty would otherwise be written back during the next run.
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
    return seconds, cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="on the disk to measure (default: tmp)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.workdir))
    try:
        (work / "inputs").mkdir()
        files = make_inputs(work / "inputs", args.count)
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        peers = ["storescp", "bare pynetdicom", "boneage-worker listen"]
        times: dict[str, list[float]] = {p: [] for p in peers}
        cpus: dict[str, list[float]] = {p: [] for p in peers}
        rss: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved, so drift hits all alike
            for peer in peers:
                seconds, cpu, peak = run_peer(peer, work, files)
                times[peer].append(seconds)
                cpus[peer].append(cpu)
                rss[peer] = max(rss.get(peer, 0.0), peak)
        print(
            f"{args.count} instances, {size_mb:.0f} MB, median of {args.rounds} rounds, "
            "one association each"
        )
        print(
            f"{'receiver':<24}{'s':>8}{'MB/s':>9}{'inst/s':>9}{'× storescp':>12}"
            f"{'CPU ms/inst':>13}{'peak RSS MB':>13}"
        )
        base = statistics.median(times["storescp"])
        for peer in peers:
            t = statistics.median(times[peer])
            cpu_ms = 1000 * statistics.median(cpus[peer]) / args.count
            print(
                f"{peer:<24}{t:>8.2f}{size_mb / t:>9.0f}{args.count / t:>9.1f}"
                f"{base / t:>12.2f}{cpu_ms:>13.1f}{rss[peer]:>13.0f}"
            )
        print("CPU ms/inst: the receiver's user + system CPU (all threads) while the files came")
        ours, bare = statistics.median(times[peers[2]]), statistics.median(times[peers[1]])
        rounds = " ".join(
            f"{b / o:.2f}" for b, o in zip(times[peers[1]], times[peers[2]], strict=True)
        )
        print(f"ours / bare pynetdicom rate, round by round: {rounds}")
        print(
            f"ours vs bare pynetdicom: {bare / ours:.2f}× its rate (target ≥ 0.8); "
            f"ours vs storescp: {base / ours:.2f}× (target ≥ 1.5)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
