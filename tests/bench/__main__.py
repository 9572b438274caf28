"""Run every benchmark, one after another, each in a fresh process; print their tables.

    .venv/bin/python -m tests.bench            # the figures in docs/performance.md
    .venv/bin/python -m tests.bench --quick    # fewer repeats and studies: a look in minutes
    .venv/bin/python -m tests.bench --only ingest,pipeline

Run it on an otherwise idle machine: every figure is a ratio taken within one run of
one benchmark, but other load still adds noise.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time

import torch

#: name -> (module, full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "gradcam": ("bench_gradcam", [], ["--repeats", "3"]),
    "ingest": ("bench_ingest", [], ["--count", "30", "--rounds", "2"]),
    "delivery": ("bench_delivery", [], ["--count", "5"]),
    "pipeline": ("bench_pipeline", [], ["--repeats", "3"]),
    "pipeline-j2k": ("bench_pipeline", ["--j2k"], ["--j2k", "--repeats", "3"]),
    "pipeline-jpeg-lossless": (
        "bench_pipeline",
        ["--jpeg-lossless"],
        ["--jpeg-lossless", "--repeats", "3"],
    ),
    "throughput": ("bench_throughput", [], ["--count", "6", "--repeats", "1"]),
    # memory to decode an instance's first frame, as its frames grow
    "frames": ("bench_frames", [], ["--frames", "1,4,12"]),
    "e2e": ("bench_e2e", [], ["--studies", "10"]),
    # no target: what the node costs while it waits
    "idle": ("bench_idle", [], ["--seconds", "20"]),
    # the GPU item (on a CPU only a check that the batching path runs)
    "batching": ("bench_batching", [], ["--count", "8", "--repeats", "1"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repeats (rough figures)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    print(
        f"machine: {platform.node()}, {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"CUDA {'available' if torch.cuda.is_available() else 'not available'}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}",
        flush=True,
    )
    failed: list[str] = []
    for name in chosen:
        module, full, quick = BENCHMARKS[name]
        command = [sys.executable, "-m", f"tests.bench.{module}", *(quick if args.quick else full)]
        print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(command)
        print(f"== {name}: {time.monotonic() - started:.0f} s, exit code {code}", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
