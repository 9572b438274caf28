"""Delivery: an assessment's SR and SC sent to dcmtk's storescp, the ways it can be done.

Each assessment is the worker's own pair of outputs for a 2500 x 2000 DX hand phantom
(an SR, and the RGB heat-map SC of 1510 x 1000; the sizes are printed), built by the
pipeline's ``build_outputs`` with distinct UIDs, written to a temporary outbox. The destination is
dcmtk's ``storescp`` on loopback, which writes each object to disk. Cases:

- ``pynetdicom defaults, per object``: how the delivery worker sent before: one
  association per object, pynetdicom's sockets as they come (Nagle's algorithm on);
- ``ours, per object``: ``dicom_io.scu.send_files`` (TCP_NODELAY, TCP_QUICKACK) with one
  association per object;
- ``read back, encoded again, per assessment``: the delivery worker before this
  session: each file parsed in full (``worker.delivery.check_outbox`` without a
  checksum) and the datasets encoded again by pynetdicom, over one association;
- ``ours, per assessment``: the delivery worker now: each file's SHA-256 checked against
  the one recorded at writing (``check_outbox``) and the files sent as stored, SR and SC
  over one association;
- ``dcmtk storescu, per assessment``: the peer tool sending the same two files over one
  association (a new process each time: its start-up is in the figure).

Figures: median wall milliseconds per assessment over ``--count`` assessments, and the
CPU milliseconds of this process per assessment (our cases; storescu's are its own).

    .venv/bin/python -m tests.bench.bench_delivery [--count 20]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pynetdicom import AE

from dicom_io.pixels import decode_for_display
from dicom_io.scu import send_datasets, stored
from dicom_io.synthetic import make_radiograph_dataset
from dicom_io.uids import UUID_ROOT, UidScheme
from models.checkpoint import untrained_model
from models.phantoms import make_phantom
from models.predictor import BoneAgePredictor
from tests.bench import bench_finding
from tests.conftest import StoreSCP
from tests.support import dcmtk_tool
from worker.delivery import check_outbox
from worker.pipeline import build_outputs, write_atomically

CALLING_AE = "BONEAGE"


#: SHA-256 of each outbox file as written, as the Delivery rows record it.
DIGESTS: dict[Path, str] = {}


def make_pairs(folder: Path, count: int) -> list[tuple[Path, Path]]:
    phantom = make_phantom(122.0, male=False, size=2500, rng=np.random.default_rng(7))
    pixels = np.round(phantom.image[:, :2000] * 4095).astype(np.uint16)
    source = make_radiograph_dataset(
        pixels, birth_date=dt.date(2016, 1, 1), study_date=dt.date(2026, 3, 1)
    )
    loaded = untrained_model(arch="resnet18", input_size=128, seed=0)
    predictor = BoneAgePredictor(loaded, device="cpu")
    image = decode_for_display(source, reduce=2)
    prediction = predictor.predict(image, male=False)
    finding = bench_finding(prediction, predictor.model_id)
    pairs = []
    for index in range(count):
        sr, sc = build_outputs(
            source,
            image,
            prediction,
            finding,
            source_uid=f"{source.SOPInstanceUID}.{index}",
            uids=UidScheme(UUID_ROOT, "bench"),
            device_observer_uid="2.25.1",
        )
        paths = (folder / f"{index}-sr.dcm", folder / f"{index}-sc.dcm")
        DIGESTS[paths[0]] = write_atomically(sr, paths[0], sync_directory=False)
        DIGESTS[paths[1]] = write_atomically(sc, paths[1])
        pairs.append(paths)
    return pairs


def pynetdicom_defaults(peer: StoreSCP, files: list[Path]) -> None:
    for path in files:  # one association each, as the worker did
        ds = dcmread(path)
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", peer.port, ae_title=peer.ae_title)
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0x0000


def _send(peer: StoreSCP, objects: list[Dataset | Path]) -> None:
    statuses = send_datasets(
        objects,
        ae_title=peer.ae_title,
        host="127.0.0.1",
        port=peer.port,
        calling_ae_title=CALLING_AE,
    )
    assert all(stored(status) for status in statuses)


def ours(peer: StoreSCP, files: list[Path]) -> None:
    _send(peer, [check_outbox(path, DIGESTS[path]) for path in files])


def read_back(peer: StoreSCP, files: list[Path]) -> None:
    _send(peer, [check_outbox(path, None) for path in files])


def ours_per_object(peer: StoreSCP, files: list[Path]) -> None:
    for path in files:
        ours(peer, [path])


def storescu(peer: StoreSCP, files: list[Path]) -> None:
    subprocess.run(
        [
            dcmtk_tool("storescu"),
            "-aet",
            CALLING_AE,
            "-aec",
            peer.ae_title,
            "127.0.0.1",
            str(peer.port),
            *map(str, files),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


CASES: list[tuple[str, Callable[[StoreSCP, list[Path]], None], bool]] = [
    ("pynetdicom defaults, per object", pynetdicom_defaults, True),
    ("ours, per object", ours_per_object, True),
    ("read back, encoded again, per assessment", read_back, True),
    ("ours, per assessment", ours, True),
    ("dcmtk storescu, per assessment", storescu, False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20, help="assessments (SR + SC pairs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as temp:
        folder = Path(temp)
        pairs = make_pairs(folder / "outbox", args.count)
        sr_kb = statistics.mean(sr.stat().st_size for sr, _ in pairs) / 1e3
        sc_mb = statistics.mean(sc.stat().st_size for _, sc in pairs) / 1e6
        peer = StoreSCP(folder / "pacs").start()
        try:
            figures = []
            for name, send, in_process in CASES:
                send(peer, list(pairs[0]))  # warm: imports, connections, page cache
                walls, cpus = [], []
                for pair in pairs:
                    cpu_started = time.process_time()
                    started = time.perf_counter()
                    send(peer, list(pair))
                    walls.append(time.perf_counter() - started)
                    cpus.append(time.process_time() - cpu_started)
                figures.append(
                    (
                        name,
                        statistics.median(walls),
                        statistics.median(cpus) if in_process else None,
                    )
                )
        finally:
            peer.stop()
    print(
        f"{args.count} assessments (SR {sr_kb:.0f} kB + SC {sc_mb:.2f} MB), to dcmtk storescp "
        "on loopback; median per assessment"
    )
    reference = {n: w for n, w, _ in figures}["ours, per assessment"]
    print(f"{'case':42} {'wall ms':>8} {'cpu ms':>7} {'× ours':>7}")
    for name, wall, cpu in figures:
        shown = f"{1000 * cpu:7.1f}" if cpu is not None else f"{'-':>7}"
        print(f"{name:42} {1000 * wall:8.1f} {shown} {wall / reference:7.2f}")


if __name__ == "__main__":
    main()
