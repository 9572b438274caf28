"""Memory to decode the first frame of an instance as its frames grow: read alone vs whole.

An inference process decodes one frame of an instance, its first. It reads the instance
with ``dicom_io.pixels.read_image``, which leaves the pixel data in the file, and
``decode_frame`` then reads from the file only that frame. Reading the instance whole
(``pydicom.dcmread``, the worker's way until the twenty-fourth session) holds every frame
in memory.

For each frame count, a multi-frame grey Secondary Capture of 2500 x 2000 12-bit frames
(uncompressed, 10 MB each) is written once. Then, each in a fresh interpreter with the
inference workers' heap setting, the instance is read, gated and its first frame decoded
as the pipeline does it (``gate.check``, ``decode_reduction``, ``decode_for_display``),
once each way. The table shows how far above its resident memory before (``VmRSS``) that
took the process's peak (``VmHWM``, started again there through ``/proc/self/clear_refs``;
Linux only) and how long it took.

    .venv/bin/python -m tests.bench.bench_frames [--frames 1,4,40]
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
WIDTHS = (6, 8, 10, 8, 10, 8)  # of the table's columns


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
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read", choices=READS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child, args.read)))
        return
    counts = sorted({int(n) for n in args.frames.split(",") if n.strip()})
    if not counts or counts[0] < 1:
        parser.error("--frames needs counts of 1 or more")

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
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as folder:
        for frames in counts:
            path = Path(folder) / f"frames-{frames}.dcm"
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


if __name__ == "__main__":
    main()
