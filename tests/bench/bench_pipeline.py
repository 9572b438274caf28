"""Whole per-image pipeline against the bare forward pass, measured in one run.

Each repeat runs, on the same model (ResNet-50 BoneAgeNet, random weights, CPU):

- the bare forward pass at the model's input size (inference mode, one image) of the
  model as built (batch norms, NCHW memory): the reference;
- the same forward pass of the predictor's inference copy (batch norms folded into the
  convolutions, channels-last, and on a CPU in float32 the trunk as oneDNN fused
  convolutions), shown beside it, with the folded copy run eagerly (without the fused
  convolutions) for comparison; and
- the worker's per-image path with the very functions ``worker.pipeline.assess_instance``
  calls: read the file + gate, decode, preprocess, forward + Grad-CAM, then
  ``stage_outputs`` and ``publish`` (SR, heat-map picture, SC, both written: temporary
  file, fsync, rename, one directory fsync).

The parts of the output stage are also timed on their own, outside the total, to show
where its time goes.

The input is a synthetic hand phantom as a ~2000 x 2500 12-bit DX, uncompressed
(Explicit VR Little Endian) by default; JPEG Lossless SV1 with ``--jpeg-lossless`` (what
PACSes most often store radiographs in), JPEG-LS lossless with ``--jpeg-ls``, or JPEG 2000
lossless with ``--j2k`` (then a ~1.5-megapixel CR unless ``--rows``/``--columns`` say
otherwise). Timings are medians of interleaved repeats, so drift affects the pipeline and
the forward pass alike.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom import Dataset, dcmread
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from dicom_io import gate
from dicom_io.pixels import decode_for_display, decode_reduction, read_image
from dicom_io.sc import build_heatmap_sc, overlay_shape, render_overlay
from dicom_io.sr import build_bone_age_sr
from dicom_io.synthetic import make_radiograph_dataset
from dicom_io.uids import UUID_ROOT, UidScheme
from models.checkpoint import untrained_model
from models.net import fold_batch_norm
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor
from tests.bench import bench_finding, decode_threads_as_in_workers, heap_as_in_workers
from tests.support import dcmtk_tool
from worker.pipeline import (
    SC_SERIES_NUMBER,
    SR_SERIES_NUMBER,
    publish,
    stage_outputs,
    write_atomically,
)
from worker.settings import SC_MIN_LONG_SIDE

STAGES = (
    "read + gate",
    "decode",
    "preprocess",
    "forward + Grad-CAM",
    "SR + SC, both written",
)
PARTS = ("SR", "overlay", "SC", "write SR", "write SC")
#: How the benchmarks derive the UIDs of their objects, as a node does.
BENCH_UIDS = UidScheme(UUID_ROOT, "bench")

#: Transfer syntaxes the benchmarks' inputs can be written in: option value -> name.
SYNTAXES = {
    "native": "Explicit VR Little Endian",
    "jpeg-lossless": "JPEG Lossless SV1",
    "jpeg-ls": "JPEG-LS lossless",
    "j2k": "JPEG 2000 lossless",
}


def add_syntax_options(parser: argparse.ArgumentParser, what: str = "input") -> None:
    """``--jpeg-lossless``, ``--jpeg-ls`` or ``--j2k`` (one at most) into ``args.syntax``."""
    group = parser.add_mutually_exclusive_group()
    for syntax in ("jpeg-lossless", "jpeg-ls", "j2k"):
        group.add_argument(
            f"--{syntax}",
            dest="syntax",
            action="store_const",
            const=syntax,
            help=f"{SYNTAXES[syntax]} {what}",
        )
    parser.set_defaults(syntax="native")


def make_input(
    path: Path, *, rows: int, columns: int, modality: str, syntax: str = "native", seed: int = 0
) -> Dataset:
    """Write a phantom radiograph of ``rows`` x ``columns`` to ``path`` in ``syntax`` (a key
    of :data:`SYNTAXES`); return it as written."""
    side = max(rows, columns)
    phantom = make_phantom(120.0, male=True, size=side, rng=np.random.default_rng(seed))
    top, left = (side - rows) // 2, (side - columns) // 2
    pixels = np.ascontiguousarray(phantom.image[top : top + rows, left : left + columns])
    ds = make_radiograph_dataset(
        pixels,
        modality=modality,
        sex="M",
        birth_date=datetime.date(2014, 3, 1),
        study_date=datetime.date(2024, 5, 2),
        bits_stored=12,
    )
    if syntax == "j2k":
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    elif syntax == "jpeg-ls":
        ds.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    elif syntax not in SYNTAXES:
        raise ValueError(f"unknown input syntax {syntax!r}")
    ds.save_as(path, enforce_file_format=True)
    if syntax == "jpeg-lossless":  # pydicom has no JPEG Lossless encoder; dcmtk has
        native = path.with_name(f"{path.name}.native")
        path.rename(native)
        subprocess.run([dcmtk_tool("dcmcjpeg"), "+e1", native, path], check=True)
        native.unlink()
        ds = dcmread(path)
    return ds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_syntax_options(parser)
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--columns", type=int, default=None)
    parser.add_argument("--size", type=int, default=512, help="network input side")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's, all cores; the CPU worker runs one process "
        "per core with 1 thread each)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    heap = f"{heap_as_in_workers()}; {decode_threads_as_in_workers()}"
    j2k = args.syntax == "j2k"
    rows = args.rows or (1400 if j2k else 2500)
    columns = args.columns or (1100 if j2k else 2000)
    modality = "CR" if j2k else "DX"

    torch.manual_seed(0)
    loaded = untrained_model(arch="resnet50", input_size=args.size)
    predictor = BoneAgePredictor(loaded, device="cpu")
    # The reference is the model as built (batch norms, NCHW memory); the predictor runs
    # an inference copy (batch norms folded, channels-last, fused convolutions), timed
    # bare beside it, and so is the folded copy without the fused convolutions.
    model, served = loaded.model, predictor._model
    folded = fold_batch_norm(model).to(memory_format=torch.channels_last)
    x = torch.randn(1, 1, args.size, args.size)
    x_served = x.contiguous(memory_format=torch.channels_last)
    male = torch.ones(1)

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "in.dcm"
        make_input(source, rows=rows, columns=columns, modality=modality, syntax=args.syntax)
        size_mb = source.stat().st_size / 1e6

        def forward() -> None:
            with torch.inference_mode():
                model(x, male)

        def served_forward() -> None:
            with torch.inference_mode():
                served(x_served, male)

        def folded_forward() -> None:
            with torch.inference_mode():
                folded(x_served, male)

        def pipeline() -> dict[str, float]:
            marks: list[float] = [time.perf_counter()]

            def mark() -> None:
                marks.append(time.perf_counter())

            ds = read_image(source)
            decision = gate.check(ds)
            assert decision.accepted, decision.reason
            mark()
            reduce = decode_reduction(
                ds, min_short_side=predictor.input_size, min_long_side=SC_MIN_LONG_SIDE
            )
            image = decode_for_display(ds, reduce=reduce)
            mark()
            prepared = predictor.prepare(image)
            mark()
            prediction = predictor.predict_batch([image], [True], prepared=[prepared])[0]
            mark()
            finding = bench_finding(prediction, predictor.model_id)
            outputs = publish(
                stage_outputs(
                    ds,
                    image,
                    prediction,
                    finding,
                    source_uid=str(ds.SOPInstanceUID),
                    uids=BENCH_UIDS,
                    outbox_dir=work / "outbox",
                    device_observer_uid=BENCH_UIDS.derive("bench-device"),
                )
            )
            mark()
            sc = dcmread(outputs[1].path, stop_before_pixels=True)
            info.update(image=image.shape, sc=(sc.Rows, sc.Columns))
            info.update(age=prediction.bone_age_months)
            info["last"] = (ds, image, prediction, finding)
            return {name: b - a for name, a, b in zip(STAGES, marks[:-1], marks[1:], strict=True)}

        def output_parts() -> dict[str, float]:
            """The output stage's parts, each timed (not part of the total)."""
            ds, image, prediction, finding = info["last"]
            uid = str(ds.SOPInstanceUID)
            marks = [time.perf_counter()]
            sr = build_bone_age_sr(
                ds,
                finding,
                series_instance_uid=BENCH_UIDS.derive(uid, "sr-series"),
                sop_instance_uid=BENCH_UIDS.derive(uid, "sr"),
                series_number=SR_SERIES_NUMBER,
                device_observer_uid=BENCH_UIDS.derive("bench-device"),
            )
            marks.append(time.perf_counter())
            rgb = render_overlay(image, prediction.cam_at(overlay_shape(image.shape)), finding)
            marks.append(time.perf_counter())
            sc = build_heatmap_sc(
                ds,
                rgb,
                finding,
                series_instance_uid=BENCH_UIDS.derive(uid, "sc-series"),
                sop_instance_uid=BENCH_UIDS.derive(uid, "sc"),
                series_number=SC_SERIES_NUMBER,
            )
            marks.append(time.perf_counter())
            write_atomically(sr, work / "parts" / "sr.dcm")
            marks.append(time.perf_counter())
            write_atomically(sc, work / "parts" / "sc.dcm")
            marks.append(time.perf_counter())
            return {name: b - a for name, a, b in zip(PARTS, marks[:-1], marks[1:], strict=True)}

        info: dict[str, Any] = {}
        _time(forward)
        _time(served_forward)
        _time(folded_forward)
        pipeline()  # warm-up: allocator, kernels, imports, the SR thread
        output_parts()
        forwards: list[float] = []
        served_forwards: list[float] = []
        folded_forwards: list[float] = []
        stages: dict[str, list[float]] = {name: [] for name in STAGES}
        parts: dict[str, list[float]] = {name: [] for name in PARTS}
        totals: list[float] = []
        for _ in range(args.repeats):
            forwards.append(_time(forward))
            served_forwards.append(_time(served_forward))
            folded_forwards.append(_time(folded_forward))
            split = pipeline()
            for name, seconds in split.items():
                stages[name].append(seconds)
            totals.append(sum(split.values()))
            for name, seconds in output_parts().items():
                parts[name].append(seconds)

    base = statistics.median(forwards)
    syntax = SYNTAXES[args.syntax]
    print(
        f"resnet50, {args.size}x{args.size}, batch 1, cpu, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}; {heap}"
    )
    print(
        f"input: {modality} {rows}x{columns} 12-bit, {syntax}, {size_mb:.1f} MB; "
        f"decoded {info['image'][0]}x{info['image'][1]}, SC {info['sc'][0]}x{info['sc'][1]}; "
        f"bone age {info['age']:.2f} months"
    )
    print(f"{'stage':<26}{'median s':>10}{'× forward':>11}")
    print(f"{'bare forward (reference)':<26}{base:>10.3f}{1.0:>11.2f}")
    eager = statistics.median(folded_forwards)
    print(f"{'folded, channels-last fwd':<26}{eager:>10.3f}{eager / base:>11.2f}")
    ours = statistics.median(served_forwards)
    if predictor.fused_convolutions:
        print(f"{'  the same, fused (ours)':<26}{ours:>10.3f}{ours / base:>11.2f}")
    for name, values in stages.items():
        median = statistics.median(values)
        print(f"  {name:<24}{median:>10.3f}{median / base:>11.2f}")
    total = statistics.median(totals)
    print(f"{'whole pipeline':<26}{total:>10.3f}{total / base:>11.2f}")
    print("output stage, its parts (not in the total):")
    for name, values in parts.items():
        median = statistics.median(values)
        print(f"  {name:<24}{median:>10.3f}{median / base:>11.2f}")
    if args.syntax != "native":  # issue 6 sets the 1.2× target for uncompressed input only
        verdict = "no target for compressed input; see bench_throughput"
    else:
        verdict = f"target ≤ 1.2×: {'met' if total / base <= 1.2 else 'missed'}"
    print(f"pipeline / bare forward: {total / base:.2f}× ({verdict})")
    print(
        f"pipeline / the predictor's own forward pass: {total / ours:.2f}× "
        f"(everything around the network: {total - ours:.3f} s)"
    )


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
