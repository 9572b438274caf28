"""Batched inference on a GPU (or the CPU) against the bare model's batched throughput.

Measured in one run, at the model's input size (ResNet-50 BoneAgeNet, random weights):

- **bare, batched**: the model as built (batch norms, NCHW, float32), ``--batch`` images
  per forward pass, inference mode: the reference;
- **bare, autocast**: the same under float16 autocast on CUDA (bfloat16 on a CPU, or
  what ``--precision`` names), to show what mixed precision alone gives; not run on a
  CPU without bfloat16 instructions, where it is emulated;
- **ours, batched**: :meth:`BoneAgePredictor.predict_batch` on prepared tensors: batch
  norms folded, channels-last, in ``--precision`` (as ``BONEAGE_PRECISION``: by default
  float16 autocast on CUDA, float32 on a CPU), plus Grad-CAM and its maps copied back to
  the host;
- **service path**: ``--threads`` threads, each doing what an inference worker's task
  thread does for its own study (read the file, gate, decode at reduced resolution,
  preprocess, hand the image to the shared :class:`BatchingPredictor`, then build and
  write the SR and the heat-map SC), over ``--count`` 2500 x 2000 DX files; decoding and
  DICOM work overlap the device's batches;
- **CPU side alone**: the same threads and studies, each study's prediction computed
  before the clock starts (no model, no batching): the most studies a second that one
  worker process's CPU work allows, a bound for the service path as the bare SCP is for
  the listener. The threads share one interpreter and most of that work (pydicom and
  highdicom objects) holds the GIL, so the bound grows little with the cores; where the
  device is faster than it, several inference processes per device pay;
- **service path, N processes** (``--processes``, e.g. ``2,4,8``): N spawned processes
  on the same device, each what one batching inference worker is (its own predictor,
  batcher, ``--threads`` task threads, torch and JPEG 2000 threads as a worker sets
  them), each assessing the ``--count`` studies, started together; studies a second of
  all of them. This is what several ``work -Q inference`` workers per GPU would give.
  Each such row also gives the most host memory one of the processes held (``VmHWM``)
  and the sum over all of them, and on CUDA the most device memory one process's
  caching allocator reserved (its CUDA context is not counted): what a host, a
  container's memory limit and the device must hold.

``--jpeg-lossless``, ``--jpeg-ls`` or ``--j2k`` write the studies in that lossless
syntax, so that decoding (for JPEG 2000 at a reduced resolution level) is part of what
overlaps the device.

Each row also shows the process's CPU seconds over its wall time (cores busy).

Images per second of each, and each against the bare batched rate. Then the largest
difference in bone age between ours and the bare float32 model on the same inputs
(what autocast and folding cost in accuracy).

Every figure is printed with the device, batch size and thread count. On a CPU the
figures are a check that the path runs, not a target: batching gains nothing there.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid

from dicom_io import gate
from dicom_io.pixels import (
    decode_for_display,
    decode_reduction,
    drop_pixel_data,
    read_image,
    set_jpeg2000_threads,
)
from models.batching import BatchingPredictor
from models.checkpoint import untrained_model
from models.predictor import (
    PRECISIONS,
    BoneAgePredictor,
    Prediction,
    cpu_computes_bfloat16,
    describe_device,
    resolve_device,
    resolve_precision,
)
from tests.bench import bench_finding, heap_as_in_workers, peak_rss_mb
from tests.bench.bench_pipeline import BENCH_UIDS, SYNTAXES, add_syntax_options, make_input
from worker.cores import batching_process_cores, cores_per_task, jpeg2000_threads
from worker.heap import limit_arenas
from worker.pipeline import publish, stage_outputs
from worker.settings import SC_MIN_LONG_SIDE, usable_cpus

#: A child of ``--processes`` that has not reached the next step by then has failed.
STEP_TIMEOUT_S = 600.0


def _make_inputs(folder: Path, count: int, *, syntax: str) -> list[Path]:
    """``count`` 2500 x 2000 DX studies: eight phantoms, then copies under new UIDs.

    Drawing a phantom this size takes about ten seconds on one core, so the eight are
    drawn in parallel; the copies only change their UIDs.
    """
    paths = [folder / f"in-{n:03d}.dcm" for n in range(count)]
    phantoms = paths[:8]
    context = multiprocessing.get_context("spawn")  # the caller may hold a CUDA context
    with ProcessPoolExecutor(min(len(phantoms), usable_cpus()), mp_context=context) as pool:
        list(pool.map(partial(_make_phantom_input, syntax=syntax), phantoms, range(len(phantoms))))
    for n, path in enumerate(paths[8:], start=8):
        ds = dcmread(paths[n % 8])
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    return paths


def _make_phantom_input(path: Path, seed: int, *, syntax: str) -> None:
    make_input(path, rows=2500, columns=2000, modality="DX", syntax=syntax, seed=seed)


class _Studies:
    """What a batching inference worker's task thread does for one study.

    Read the file, gate it, decode at the reduced resolution the model and the heat-map
    picture need, preprocess, get the prediction (from the shared batcher, or one computed
    beforehand), then build, write and publish the SR and the heat-map SC.
    """

    def __init__(
        self, predictor: BoneAgePredictor, batcher: BatchingPredictor | None, outbox: Path
    ) -> None:
        self.predictor = predictor
        self.batcher = batcher
        self.outbox = outbox

    def decoded(self, path: Path) -> tuple[Dataset, np.ndarray]:
        ds = read_image(path)
        reduce = decode_reduction(
            ds, min_short_side=self.predictor.input_size, min_long_side=SC_MIN_LONG_SIDE
        )
        return ds, decode_for_display(ds, reduce=reduce)

    def assess(self, path: Path, known: dict[Path, Prediction] | None = None) -> None:
        ds, image = self.decoded(path)
        decision = gate.check(ds)
        assert decision.accepted, decision.reason
        drop_pixel_data(ds)  # as the worker does once the image is decoded
        if known is None:
            assert self.batcher is not None
            prediction = self.batcher.predict(image, male=True)
        else:  # the CPU side alone: this study's prediction, computed beforehand
            self.predictor.prepare(image)
            prediction = known[path]
        publish(
            stage_outputs(
                ds,
                image,
                prediction,
                bench_finding(prediction, self.predictor.model_id),
                source_uid=str(ds.SOPInstanceUID),
                uids=BENCH_UIDS,
                outbox_dir=self.outbox,
                device_observer_uid=BENCH_UIDS.derive("bench-device"),
            )
        )

    def run(
        self, paths: list[Path], threads: int, known: dict[Path, Prediction] | None = None
    ) -> None:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda path: self.assess(path, known), paths))


def _set_threads_as_in_a_worker(device: torch.device, threads: int, processes: int = 1) -> str:
    """Torch and JPEG 2000 threads, and malloc's arenas, as one of ``processes`` batching
    inference workers with ``threads`` task threads sets them (worker.tasks, by
    worker.cores's rules)."""
    cpus = usable_cpus()
    if device.type == "cuda":
        torch.set_num_threads(cores_per_task(cpus, threads))
    decode = jpeg2000_threads(cpus, pool="threads", concurrency=threads, processes=processes)
    set_jpeg2000_threads(decode)
    arenas = batching_process_cores(cpus, processes)
    limited = f", at most {arenas} malloc arena(s)" if limit_arenas(arenas) else ""
    return f"JPEG 2000 decoded on {decode} thread(s){limited}, as in inference workers"


@dataclass(frozen=True)
class _Round:
    """What one of ``--processes`` reports after a round."""

    rank: int
    cpu_s: float  # its CPU seconds in the round, all threads
    sizes: list[int]  # the batches its batcher formed
    host_mb: float  # the most resident memory it has held so far (VmHWM)
    device_mb: float  # the most device memory its caching allocator reserved; NaN on a CPU


@dataclass(frozen=True)
class _Processes:
    """Every round of ``--processes`` N, all processes together."""

    walls: list[float]  # each round's wall seconds
    busy: list[float]  # each round's CPU seconds of all processes over its wall time
    sizes: list[int]  # every batch size seen
    host_mb: list[float]  # each process's peak resident memory
    device_mb: list[float]  # each process's peak reserved device memory (NaN on a CPU)


def _service_process(
    rank: int,
    processes: int,
    args: argparse.Namespace,
    paths: list[Path],
    outbox: Path,
    barrier: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[_Round],
) -> None:
    """One of ``--processes``: a batching inference worker's work on every study, repeated.

    Waits at ``barrier`` before each round and after it, so that the parent times the
    rounds of all processes together; reports each round's CPU seconds, batch sizes and
    the process's peak memory.
    """
    heap_as_in_workers()
    device = resolve_device(args.device)
    _set_threads_as_in_a_worker(device, args.threads, processes)
    predictor = BoneAgePredictor(
        untrained_model(arch="resnet50", input_size=args.size),
        device=str(device),
        precision=args.precision,
    )
    sizes: list[int] = []
    batcher = BatchingPredictor(
        predictor,
        max_batch=args.batch,
        max_wait_s=args.wait_ms / 1000,
        on_batch=lambda n, _seconds: sizes.append(n),  # one model thread appends
    )
    studies = _Studies(predictor, batcher, outbox)
    gpu = device.type == "cuda"
    try:
        studies.run(paths, args.threads)  # warm-up: kernels, allocator, highdicom
        for _ in range(args.repeats):
            sizes.clear()
            barrier.wait(STEP_TIMEOUT_S)
            cpu = time.process_time()
            studies.run(paths, args.threads)
            cpu = time.process_time() - cpu
            device_mb = torch.cuda.max_memory_reserved(device) / 2**20 if gpu else math.nan
            results.put(_Round(rank, cpu, list(sizes), peak_rss_mb(os.getpid()), device_mb))
            barrier.wait(STEP_TIMEOUT_S)
    except BaseException:
        barrier.abort()  # the parent and the other processes stop waiting
        raise
    finally:
        batcher.close()


def _several_processes(
    n: int, args: argparse.Namespace, paths: list[Path], work: Path
) -> _Processes:
    """Run ``n`` service processes together ``--repeats`` times."""
    context = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    barrier = context.Barrier(n + 1)
    results: multiprocessing.queues.Queue[_Round] = context.Queue()
    children = [
        context.Process(
            target=_service_process,
            args=(rank, n, args, paths, work / f"outbox-{n}-{rank}", barrier, results),
            daemon=True,
        )
        for rank in range(n)
    ]
    for child in children:
        child.start()
    walls: list[float] = []
    busy: list[float] = []
    sizes: list[int] = []
    last: list[_Round] = []
    try:
        for _ in range(args.repeats):
            barrier.wait(STEP_TIMEOUT_S)  # every process is ready: go
            start = time.perf_counter()
            barrier.wait(STEP_TIMEOUT_S)  # every process is done
            walls.append(time.perf_counter() - start)
            last = [results.get(timeout=STEP_TIMEOUT_S) for _ in children]
            busy.append(sum(done.cpu_s for done in last) / walls[-1])
            sizes += [size for done in last for size in done.sizes]
    except threading.BrokenBarrierError as exc:
        for child in children:
            child.join(30)
        codes = [child.exitcode for child in children]
        raise SystemExit(
            f"a service process failed (exit codes {codes}); its traceback is above"
        ) from exc
    finally:
        for child in children:
            child.join(STEP_TIMEOUT_S)
            if child.is_alive():
                child.terminate()
    # peaks only grow, so each process's last report holds its peak over every round
    return _Processes(
        walls, busy, sizes, [done.host_mb for done in last], [done.device_mb for done in last]
    )


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--size", type=int, default=512, help="network input side")
    parser.add_argument(
        "--batch", type=int, default=0, help="images per forward pass (0: 16 on CUDA, 4 on a CPU)"
    )
    parser.add_argument("--repeats", type=int, default=0, help="0: 5 on CUDA, 2 on a CPU")
    parser.add_argument(
        "--count", type=int, default=0, help="studies in the service path (0: 4 x batch)"
    )
    parser.add_argument("--threads", type=int, default=0, help="task threads (0: 2 x batch)")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="batch gathering wait")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="ours and the service path, as BONEAGE_PRECISION (auto: float16 on CUDA, "
        "float32 on a CPU); the bare autocast row uses it too where it is not float32",
    )
    parser.add_argument(
        "--processes",
        default="",
        help="also run the service path in this many processes at once, each its own "
        "worker on the device: a comma-separated list, e.g. 2,4,8",
    )
    add_syntax_options(parser, "studies")
    args = parser.parse_args()
    heap = heap_as_in_workers()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (16 if gpu else 4)
    args.repeats = args.repeats or (5 if gpu else 2)
    args.count = args.count or 4 * args.batch
    args.threads = args.threads or 2 * args.batch
    processes = sorted({int(n) for n in args.processes.split(",") if n.strip()})
    if any(n < 1 for n in processes):
        parser.error("--processes takes counts of 1 or more")
    run = _timer(device)

    loaded = untrained_model(arch="resnet50", input_size=args.size)
    predictor = BoneAgePredictor(loaded, device=str(device), precision=args.precision)
    bare = loaded.model.to(device)  # the model as built: batch norms, NCHW, float32
    x = torch.randn(args.batch, 1, args.size, args.size, device=device)
    male = torch.ones(args.batch, device=device)
    half = resolve_precision(args.precision, device)
    if half == torch.float32:  # the bare autocast row shows what the device's usual one gives
        half = torch.float16 if device.type == "cuda" else torch.bfloat16

    def bare_forward() -> None:
        with torch.inference_mode():
            bare(x, male)

    def bare_autocast() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=half):
            bare(x, male)

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        paths = _make_inputs(work, args.count, syntax=args.syntax)
        # the bare rows ran at every core; the service path's threads as in a worker
        threads_note = _set_threads_as_in_a_worker(device, args.threads)
        studies = _Studies(predictor, None, work / "outbox")
        images = [studies.decoded(p)[1] for p in paths[: args.batch]]
        prepared = [predictor.prepare(image) for image in images]

        def ours_batched() -> None:
            predictor.predict_batch(images, [True] * len(images), prepared=prepared)

        sizes: list[int] = []
        lock = threading.Lock()

        def observe(n: int, _seconds: float) -> None:
            with lock:
                sizes.append(n)

        studies.batcher = BatchingPredictor(
            predictor, max_batch=args.batch, max_wait_s=args.wait_ms / 1000, on_batch=observe
        )

        def service_path() -> None:
            studies.run(paths, args.threads)

        known = {path: predictor.predict(studies.decoded(path)[1], male=True) for path in paths}

        def cpu_side_alone() -> None:
            studies.run(paths, args.threads, known)

        autocast = f"bare, {str(half).split('.')[-1]} autocast"
        cases: dict[str, tuple[Callable[[], object], int]] = {
            "bare, batched": (bare_forward, args.batch),
            autocast: (bare_autocast, args.batch),
            "ours, batched": (ours_batched, args.batch),
            "service path": (service_path, args.count),
            "CPU side alone": (cpu_side_alone, args.count),
        }
        emulated = half == torch.bfloat16 and device.type == "cpu" and not cpu_computes_bfloat16()
        if emulated:
            # oneDNN emulates it there: the case ran for many minutes on an AVX2 CPU and
            # shows nothing a site would run (the worker warns against it on such a CPU).
            del cases[autocast]
        for fn, _ in cases.values():  # warm-up: kernels, allocator, cuDNN choices
            run(fn)
        sizes.clear()
        times: dict[str, list[float]] = {name: [] for name in cases}
        busy: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (fn, _) in cases.items():
                cpu = time.process_time()  # every thread of this process
                times[name].append(run(fn))
                busy[name].append((time.process_time() - cpu) / times[name][-1])
        studies.batcher.close()

        with torch.inference_mode():
            x_real = torch.stack([p.tensor for p in prepared]).to(device)
            z_bare = bare(x_real, male[: len(prepared)]).float()
        meta = loaded.meta
        ours = predictor.predict_batch(images, [True] * len(images), prepared=prepared)
        bare_months = (z_bare * meta.target_sd + meta.target_mean).clamp(0, 240).cpu()
        worst = max(
            abs(p.bone_age_months - float(b)) for p, b in zip(ours, bare_months, strict=True)
        )

        rates = {name: n / statistics.median(times[name]) for name, (_, n) in cases.items()}
        base = rates["bare, batched"]

        # printed before the processes run: a run stopped during them keeps this
        print(
            f"resnet50, {args.size}x{args.size}, {describe_device(device)}, "
            f"batch {args.batch}, ours in {predictor.precision}, torch {torch.__version__}, "
            f"median of {args.repeats}; {heap}"
        )
        print(
            f"service path: {args.count} DX 2500x2000 "
            f"{SYNTAXES[args.syntax]} studies, "
            f"{args.threads} task threads, {torch.get_num_threads()} torch CPU thread(s), "
            f"{threads_note}; batches gathered up to {args.wait_ms:g} ms; "
            f"batch sizes seen: median {statistics.median(sizes) if sizes else 0:g}, "
            f"max {max(sizes) if sizes else 0}"
        )
        print(f"{'case':<28}{'median s':>10}{'images/s':>11}{'× bare':>9}{'cores busy':>12}")
        for name in cases:
            print(
                f"{name:<28}{statistics.median(times[name]):>10.3f}{rates[name]:>11.1f}"
                f"{rates[name] / base:>9.2f}{statistics.median(busy[name]):>12.2f}"
            )
        if emulated:
            print(f"{autocast:<28}  not run: this CPU has no bfloat16 instructions")
        print(
            f"service path / CPU side alone: "
            f"{rates['service path'] / rates['CPU side alone']:.2f}; cores busy: the CPU "
            f"seconds of the process(es), all threads, over the case's wall time, "
            f"{usable_cpus()} CPUs usable here"
        )
        print(
            f"ours vs the bare float32 model, same {len(ours)} images: largest bone-age "
            f"difference {worst:.3f} months"
        )
        for n in processes:
            run_n = _several_processes(n, args, paths, work)
            rate = n * args.count / statistics.median(run_n.walls)
            name = f"service path, {n} process{'es' if n > 1 else ''}"
            seen = run_n.sizes
            memory = (
                f"; peak host memory {max(run_n.host_mb):,.0f} MB a process, "
                f"{sum(run_n.host_mb):,.0f} MB in all"
            )
            if not any(math.isnan(mb) for mb in run_n.device_mb):
                memory += f"; device memory reserved {max(run_n.device_mb):,.0f} MB a process"
            print(
                f"{name:<28}{statistics.median(run_n.walls):>10.3f}{rate:>11.1f}"
                f"{rate / base:>9.2f}{statistics.median(run_n.busy):>12.2f}"
                f"   batch sizes: median {statistics.median(seen) if seen else 0:g}{memory}",
                flush=True,
            )


if __name__ == "__main__":
    main()
