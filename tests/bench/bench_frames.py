"""Memory to decode an instance's first frame as it grows: left in the file vs read whole.

An inference process decodes one frame of an instance, its first. It reads the instance
with ``dicom_io.pixels.read_image``, which leaves the pixel data in the file, and then
reads from the file only what it decodes: of several frames, the first; of an
uncompressed frame decoded reduced, a strip of rows at a time; of a compressed one, its
codestream, for the decoder only. Reading the instance whole (``pydicom.dcmread``, the
worker's way until the twenty-fourth session) holds all of its pixel data in memory.

Two tables, each instance written once and then, in a fresh interpreter with the
inference workers' heap setting, read, gated and its first frame decoded as the pipeline
does it (``gate.check``, ``decode_reduction``, ``decode_for_display``), once each way:

- frames: a multi-frame grey Secondary Capture of 2500 x 2000 12-bit frames
  (uncompressed, 10 MB each), of 1, 4 and 40 frames;
- megapixels: one 12-bit DX frame of 5, 15 and 29 megapixels, uncompressed, JPEG
  Lossless SV1 (dcmtk) and JPEG 2000 lossless.

Each row shows how far above its resident memory before (``VmRSS``) that took the
process's peak (``VmHWM``, started again there through ``/proc/self/clear_refs``; Linux
only) and how long it took.

    .venv/bin/python -m tests.bench.bench_frames [--frames 1,4,40] [--sizes 2500x2000,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, COLUMNS = 2500, 2000
READS = ("whole", "alone")
WIDTHS = (6, 8, 10, 8, 10, 8)  # of the frames table's columns
SIZES = "2500x2000,4300x3500,6000x4800"
SYNTAXES = ("native", "jpeg-lossless", "j2k")


def write_instance(path: Path, frames: int) -> int:
    """A multi-frame grey SC of ``frames`` copies of a phantom hand; its size in bytes."""
    from pydicom.uid import MultiFrameGrayscaleWordSecondaryCaptureImageStorage

    from tests.bench.bench_pipeline import make_input

    ds = make_input(path, rows=ROWS, columns=COLUMNS, modality="DX")  # one frame
    ds.SOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = frames
    ds.PixelData = bytes(ds.PixelData) * frames
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def measure(path: Path, read: str) -> dict[str, float]:
    """In this process: read ``path`` (``read``: whole or alone), gate it, decode it."""
    from pydicom import dcmread

    from dicom_io import gate
    from dicom_io.pixels import decode_for_display, decode_reduction, read_image
    from tests.bench import heap_as_in_workers, peak_rss_mb, status_mib
    from worker.settings import SC_MIN_LONG_SIDE

    heap_as_in_workers()
    reader = dcmread if read == "whole" else read_image
    # the peak from here on: what the imports held at most does not count
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again at VmRSS
    before = status_mib(os.getpid(), "VmRSS")
    started = time.perf_counter()
    ds = reader(path)
    decision = gate.check(ds)
    assert decision.accepted, decision.reason
    reduce = decode_reduction(ds, min_short_side=512, min_long_side=SC_MIN_LONG_SIDE)
    image = decode_for_display(ds, reduce=reduce)
    seconds = time.perf_counter() - started
    rise = peak_rss_mb(os.getpid()) - before
    return {"rise_mib": rise, "seconds": seconds, "rows": image.shape[0]}


def in_fresh_interpreter(path: Path, read: str) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, "-m", "tests.bench.bench_frames", "--child", str(path), "--read", read],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    figures: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", default="1,4,40", help="frame counts, comma-separated")
    parser.add_argument(
        "--sizes", default=SIZES, help="single frames, ROWSxCOLUMNS, comma-separated ('': none)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read", choices=READS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.read)))
        return
    counts = sorted({int(n) for n in args.frames.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        parser.error("--frames needs counts of 1 or more")
    try:
        sides = [tuple(map(int, size.split("x"))) for size in args.sizes.split(",") if size]
        sizes = [(rows, columns) for rows, columns in sides]
    except ValueError:
        parser.error("--sizes needs ROWSxCOLUMNS, comma-separated")
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as folder:
        frames_table(Path(folder), counts)
        if sizes:
            print()
            sizes_table(Path(folder), sorted(sizes, key=lambda size: size[0] * size[1]))


def frames_table(folder: Path, counts: list[int]) -> None:
    frame_mib = ROWS * COLUMNS * 2 / 2**20
    print(
        f"multi-frame grey SC, frames of {COLUMNS}x{ROWS} 12-bit, uncompressed "
        f"({frame_mib:.1f} MiB each); read, gate, decode the first frame, each in a fresh "
        "interpreter; peak resident memory above that before (VmHWM - VmRSS)",
        flush=True,
    )
    header = ("frames", "file MB", "whole MiB", "whole s", "alone MiB", "alone s")
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, WIDTHS, strict=True)))
    rises: dict[str, dict[int, float]] = {read: {} for read in READS}
    for frames in counts:
        path = folder / f"frames-{frames}.dcm"
        size = write_instance(path, frames)
        figures = {read: in_fresh_interpreter(path, read) for read in READS}
        for read in READS:
            rises[read][frames] = figures[read]["rise_mib"]
        print(
            f"{frames:>6} {size / 1e6:>8.0f} "
            f"{figures['whole']['rise_mib']:>10.1f} {figures['whole']['seconds']:>8.3f} "
            f"{figures['alone']['rise_mib']:>10.1f} {figures['alone']['seconds']:>8.3f}",
            flush=True,
        )
        path.unlink()
    several = [n for n in counts if n > 1]
    if len(several) >= 2:
        low, high = several[0], several[-1]
        for read in READS:
            per_frame = (rises[read][high] - rises[read][low]) / (high - low)
            print(
                f"read {read}: {per_frame:+.2f} MiB a frame from {low} to {high} frames "
                f"(a frame is {frame_mib:.1f} MiB)"
            )


def sizes_table(folder: Path, sizes: list[tuple[int, int]]) -> None:
    from tests.bench.bench_pipeline import make_input

    print(
        "one 12-bit DX frame as it grows, decoded reduced for the network and the heat-map "
        "picture; peak resident memory above that before (VmHWM - VmRSS); 'whole': "
        "pydicom.dcmread, 'file': read_image",
        flush=True,
    )
    header = ("size", "MP", "syntax", "file MB", "whole MiB", "whole s", "file MiB", "file s")
    widths = (10, 5, 14, 8, 10, 8, 9, 7)
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, widths, strict=True)))
    rises: dict[tuple[str, str], dict[float, float]] = {}
    for rows, columns in sizes:
        megapixels = rows * columns / 1e6
        for syntax in SYNTAXES:
            path = folder / f"{syntax}-{rows}x{columns}.dcm"
            make_input(path, rows=rows, columns=columns, modality="DX", syntax=syntax)
            figures = {read: in_fresh_interpreter(path, read) for read in READS}
            for read in READS:
                rises.setdefault((syntax, read), {})[megapixels] = figures[read]["rise_mib"]
            print(
                f"{f'{rows}x{columns}':>10} {megapixels:>5.1f} {syntax:>14} "
                f"{path.stat().st_size / 1e6:>8.1f} "
                f"{figures['whole']['rise_mib']:>10.1f} {figures['whole']['seconds']:>8.3f} "
                f"{figures['alone']['rise_mib']:>9.1f} {figures['alone']['seconds']:>7.3f}",
                flush=True,
            )
            path.unlink()
    low, high = sizes[0][0] * sizes[0][1] / 1e6, sizes[-1][0] * sizes[-1][1] / 1e6
    if high > low:
        for syntax in SYNTAXES:
            slopes = [
                (rises[syntax, read][high] - rises[syntax, read][low]) / (high - low)
                for read in READS
            ]
            print(
                f"{syntax}: {slopes[0]:+.2f} MiB a megapixel read whole, {slopes[1]:+.2f} "
                f"from the file ({low:.1f} to {high:.1f} MP; 12-bit stored values are "
                f"{2 / 1.048576:.2f} MiB a megapixel)"
            )


if __name__ == "__main__":
    main()
