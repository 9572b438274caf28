"""Bad input ("Nothing lost", item 6): the listener and the pipeline against odd files.

Every file pydicom ships for its own tests, crafted broken datasets, malformed
association traffic and random pixel modules go through the real components: the
StorageSCP over loopback (SQLite behind it), ``assess_instance`` with the tiny
checkpoint, and ``gate.check`` / ``decode_for_display``. Each input must end in a
clear DICOM status (or a refused association) and, once accepted, in a recorded
state with a reason; never a crash, a hang, or a number for an image not assessed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from unittest import mock

import imagecodecs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from sqlalchemy import select, update

from db.engine import session_scope, upgrade
from db.schema import Instance, InstanceState, Result
from dicom_io import gate, pixels
from dicom_io.pixels import PixelDataError, decode_for_display, read_image
from dicom_io.scp import (
    CANNOT_UNDERSTAND,
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
    INCOMING_LOCK_NAME,
    RECORDING_LOCK_NAME,
    SUCCESS,
    TRANSFER_SYNTAXES,
    ReceivedInstance,
    StorageSCP,
    image_storage_sop_classes,
    spool_path,
)
from dicom_io.synthetic import make_radiograph_dataset
from tests.dicomtools import run_tool
from tests.support import free_port, storescu_command, wait_for
from worker.listener import record_instance
from worker.pipeline import assess_instance
from worker.runtime import Runtime
from worker.settings import load_settings

pytestmark = pytest.mark.integration
logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
_TERMINAL = {InstanceState.ASSESSED, InstanceState.NOT_ASSESSED, InstanceState.ERROR}
#: Longest a single store may take before we call it a hang.
STORE_DEADLINE_S = 20.0


class _Timeouts(TypedDict):
    """StorageSCP's timeout keyword arguments."""

    network_timeout: float
    acse_timeout: float
    dimse_timeout: float


#: The listener's timeouts in these tests: a stalled peer is dropped quickly.
SHORT_TIMEOUTS: _Timeouts = {"network_timeout": 2.0, "acse_timeout": 2.0, "dimse_timeout": 10.0}


# -- fixtures ---------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    settings = load_settings(data_dir=tmp_path / "data", model=tiny_checkpoint)
    upgrade(settings.effective_database_url)
    return Runtime(settings)


@pytest.fixture
def listener(runtime: Runtime) -> Iterator[StorageSCP]:
    """The real SCP on a free loopback port, recording into the runtime's database."""
    scp = StorageSCP(
        ae_title="BONEAGE",
        spool_dir=runtime.settings.spool_dir,
        record=lambda received: record_instance(runtime.database_url, received),
        notify=lambda _id: None,
        host="127.0.0.1",
        port=free_port(),
        **SHORT_TIMEOUTS,
    )
    scp.start()
    yield scp
    scp.stop()


@pytest.fixture(autouse=True)
def _send_files_verbatim(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom streams a file path as stored instead of decoding and re-encoding it,
    # so the listener sees exactly the bytes of the (possibly broken) file.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# -- sending ----------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """What a C-STORE attempt came to: a DIMSE status, or why none was sent."""

    status: int | None
    refused: str | None
    seconds: float

    def __str__(self) -> str:
        if self.refused is not None:
            return self.refused
        return f"0x{self.status:04X}" if self.status is not None else "no answer"


def write_wire_file(
    path: Path, payload: bytes, *, sop_class: str, sop_instance: str, transfer_syntax: str
) -> Path:
    """A Part 10 file whose data set is ``payload`` byte for byte, whatever it holds."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    encoded = DicomBytesIO()
    write_file_meta_info(encoded, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + encoded.getvalue() + payload)
    return path


def send_file(port: int, path: Path, *, command_sop_class: str | None = None) -> Sent:
    """C-STORE ``path`` as stored, over a fresh association, with a pynetdicom SCU.

    ``command_sop_class`` proposes (and puts in the command) another SOP class than
    the file meta's, for datasets that lie about what they are.
    """
    meta, _ = split_dataset(path)
    sop_class = command_sop_class or str(meta.MediaStorageSOPClassUID)
    if command_sop_class:
        path = write_wire_file(
            path.with_suffix(".cmd.dcm"),
            path.read_bytes()[_offset(path) :],
            sop_class=command_sop_class,
            sop_instance=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
        )
    ae = AE(ae_title="PACS")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = STORE_DEADLINE_S
    ae.add_requested_context(sop_class, str(meta.TransferSyntaxUID))
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="BONEAGE")
    try:
        if assoc.is_rejected:
            return Sent(None, "association rejected", time.monotonic() - started)
        if not assoc.is_established:
            # pynetdicom's acceptor aborts when it accepts no presentation context.
            return Sent(None, "no presentation context accepted", time.monotonic() - started)
        status = assoc.send_c_store(path)
        code = int(status.Status) if "Status" in status else None
        return Sent(code, None, time.monotonic() - started)
    finally:
        if assoc.is_established:
            assoc.release()


def _offset(path: Path) -> int:
    return split_dataset(path)[1]


def _guess_syntax(ds: Dataset | None) -> str:
    """Transfer syntax of a data set read without file meta (pydicom's own guess)."""
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        return str(ImplicitVRLittleEndian)
    return str(ExplicitVRLittleEndian if little in (True, None) else ExplicitVRBigEndian)


@dataclass(frozen=True)
class WireForm:
    payload: bytes
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def wire_form(source: Path) -> WireForm:
    """How a PACS would forward ``source``: its data set bytes, UIDs and transfer syntax.

    Files without file meta (or not DICOM at all) are sent whole, as Secondary Capture
    in the syntax pydicom guesses, so their bytes still reach the listener.
    """
    raw = source.read_bytes()
    meta: Dataset = Dataset()
    offset = 0
    try:
        meta, offset = split_dataset(source)
    except Exception:  # no preamble and DICM prefix: the whole file is the data set
        logger.debug("%s has no file meta", source.name)
    ds: Dataset | None = None
    try:
        ds = dcmread(source, force=True, stop_before_pixels=True)
    except Exception:
        logger.debug("%s cannot be parsed", source.name)

    def found(meta_keyword: str, keyword: str) -> str | None:
        for holder, key in ((meta, meta_keyword), (ds, keyword)):
            try:
                value = holder.get(key) if holder is not None else None
            except Exception:  # a value pydicom cannot convert
                value = None
            if value and 0 < len(str(value)) <= 64:
                return str(value)
        return None

    return WireForm(
        payload=raw[offset:],
        sop_class=found("MediaStorageSOPClassUID", "SOPClassUID") or SecondaryCaptureImageStorage,
        sop_instance=found("MediaStorageSOPInstanceUID", "SOPInstanceUID") or generate_uid(),
        transfer_syntax=str(meta.get("TransferSyntaxUID") or _guess_syntax(ds)),
    )


def bundled_files() -> list[Path]:
    """Every regular file pydicom ships for its tests, DICOM or not."""
    return sorted(Path(p) for p in get_testdata_files() if Path(p).is_file())


def short_name(path: Path) -> str:
    """``path`` below pydicom's test file folder (some base names occur twice)."""
    parts = path.parts
    return "/".join(parts[parts.index("test_files") + 1 :]) if "test_files" in parts else path.name


# -- checking what the pipeline made of it ------------------------------------


def assess_and_check(rt: Runtime, instance_id: int) -> tuple[InstanceState, str | None]:
    """Run the pipeline on one row and check its contract; return (state, reason)."""
    outcome = assess_instance(rt, instance_id)  # must not raise for bad input
    with session_scope(rt.database_url) as session:
        row = session.get_one(Instance, instance_id)
        results = list(session.scalars(select(Result).where(Result.instance_id == instance_id)))
        state, reason = row.state, row.reason
    assert state in _TERMINAL, (outcome, state)
    assert outcome.state == state.value
    if state is InstanceState.ASSESSED:
        [result] = results
        assert math.isfinite(result.bone_age_months)
    else:
        assert results == [], "an image not assessed never has a number"
        assert reason and len(reason) > 10 and "Traceback" not in reason, reason
    return state, reason


def retire(rt: Runtime, instance_id: int) -> None:
    # pydicom's test files share SOP Instance UIDs (MR_small*, the DICOMDIR series...);
    # a row keeps one UID, so move the assessed row aside for the next file.
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(sop_instance_uid=f"retired-{instance_id}")
        )


def row_for(rt: Runtime, sop_instance_uid: str) -> Instance:
    with session_scope(rt.database_url) as session:
        row = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid))
        assert row is not None, "accepted with 0x0000 but no row recorded"
        session.expunge(row)
        return row


def write_hand(path: Path, pixels: np.ndarray | None = None, **kwargs: object) -> Path:
    if pixels is None:
        pixels = (np.random.default_rng(0).random((300, 240)) * 4000).astype(np.uint16)
    ds = make_radiograph_dataset(
        pixels,
        sex="M",
        birth_date=dt.date(2015, 5, 1),
        study_date=dt.date(2026, 5, 1),
        **kwargs,  # type: ignore[arg-type]
    )
    ds.save_as(path, enforce_file_format=True)
    return path


def storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        storescu_command(port, path),
        capture_output=True,
        text=True,
        timeout=STORE_DEADLINE_S,
    )


# -- a. every file pydicom ships ------------------------------------------------


def test_every_pydicom_test_file_gets_a_status_and_a_recorded_outcome(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    summary: dict[str, str] = {}
    for source in bundled_files():
        name = short_name(source)
        wire = wire_form(source)
        path = write_wire_file(
            tmp_path / "wire.dcm",
            wire.payload,
            sop_class=wire.sop_class,
            sop_instance=wire.sop_instance,
            transfer_syntax=wire.transfer_syntax,
        )
        sent = send_file(listener.port, path)
        assert sent.seconds < STORE_DEADLINE_S, f"{name}: store took {sent.seconds:.1f}s"
        if sent.refused is not None:
            # Only what we do not take at all is refused: non-image SOP classes, or a
            # transfer syntax outside ours.
            assert (
                wire.sop_class not in image_storage_sop_classes()
                or wire.transfer_syntax not in TRANSFER_SYNTAXES
            ), f"{name}: image refused ({sent.refused})"
            summary[name] = f"refused: {sent.refused}"
            continue
        answers = (SUCCESS, CANNOT_UNDERSTAND, DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
        assert sent.status in answers, f"{name}: {sent}"
        if sent.status == CANNOT_UNDERSTAND:
            summary[name] = "0xC210"
            continue
        if sent.status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS:
            # only a data set whose own SOP Class UID is not the one it was sent as
            own = dcmread(source, force=True, specific_tags=["SOPClassUID"]).get("SOPClassUID")
            assert own is not None and str(own) != wire.sop_class, f"{name}: {sent}"
            summary[name] = "0xA900"
            continue
        row = row_for(runtime, wire.sop_instance)
        state, reason = assess_and_check(runtime, row.id)
        summary[name] = f"0x0000 -> {state.value}: {reason}"
        retire(runtime, row.id)

    report = "\n".join(f"  {name}: {what}" for name, what in sorted(summary.items()))
    logger.info("pydicom test files through the listener and the pipeline:\n%s", report)
    assert len(summary) == len(bundled_files())
    # Pinned examples of each outcome, so a change in behaviour shows up here.
    assert summary["test-SR.dcm"].startswith("refused")  # SR is not an image
    assert summary["waveform_ecg.dcm"].startswith("refused")
    assert summary["README.txt"] == "0xC210"  # not DICOM at all
    assert summary["CT_small.dcm"].startswith("0x0000 -> not_assessed: SOP class CT Image")
    assert summary["JPEG-lossy.dcm"].startswith("0x0000 -> not_assessed")
    counts = {
        "accepted": sum(v.startswith("0x0000") for v in summary.values()),
        "0xC210": sum(v == "0xC210" for v in summary.values()),
        "refused": sum(v.startswith("refused") for v in summary.values()),
    }
    assert min(counts.values()) > 0, counts
    # The listener is still up and serves a normal store.
    assert storescu(listener.port, write_hand(tmp_path / "hand.dcm")).returncode == 0


def _hand_versions() -> list[Path]:
    """Bundled images big enough for the gate, that pydicom can read and write again."""
    chosen = []
    for path in bundled_files():
        try:
            ds = dcmread(path)
            big = min(int(ds.Rows), int(ds.Columns)) >= 128 and "PixelData" in ds
            ds.save_as(io.BytesIO())
        except Exception:  # not an image, or an element pydicom cannot write back
            continue
        if big:
            chosen.append(path)
    return chosen


@pytest.mark.parametrize("source", _hand_versions(), ids=lambda p: p.name)
def test_bundled_image_dressed_as_a_hand_is_assessed_or_refused_with_a_reason(
    runtime: Runtime, source: Path
) -> None:
    # The bundled files are CT, MR, US...: the gate stops them before the pixels. Dressed
    # as a hand DX, their pixel modules (colour, palette, multi-frame, compressed) reach
    # the decoder and the model.
    ds = dcmread(source)
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.BodyPartExamined = "HAND"
    ds.PatientSex = "F"
    ds.PatientBirthDate = "20150101"
    ds.StudyDate = "20250101"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = spool_path(runtime.settings.spool_dir, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    instance_id = record_instance(
        runtime.database_url,
        ReceivedInstance(
            ds.SOPInstanceUID,
            ds.SOPClassUID,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            "DX",
            str(ds.file_meta.TransferSyntaxUID),
            "PACS",
            path,
            path.stat().st_size,
        ),
    )
    state, reason = assess_and_check(runtime, instance_id)
    # refused where the pixels are read: undecodable, or decoded to nothing to assess
    # (SC_rgb_jpeg_dcmd.dcm is 98.6 % one grey as a DX)
    assert state is InstanceState.ASSESSED or (reason or "").startswith(
        ("pixel data cannot be decoded", "pixel data: the image has no usable contrast")
    ), reason


# -- b. crafted datasets --------------------------------------------------------


def _dataset_bytes(path: Path) -> bytes:
    return path.read_bytes()[_offset(path) :]


def _send_crafted(
    listener: StorageSCP, path: Path, payload: bytes, ds_like: Path, **overrides: str
) -> tuple[Sent, str]:
    meta, _ = split_dataset(ds_like)
    uids = {
        "sop_class": str(meta.MediaStorageSOPClassUID),
        "sop_instance": str(meta.MediaStorageSOPInstanceUID),
        "transfer_syntax": str(meta.TransferSyntaxUID),
    } | overrides
    wire = write_wire_file(path, payload, **uids)
    return send_file(listener.port, wire), uids["sop_instance"]


def test_truncated_file_is_accepted_and_not_assessed_with_a_reason(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    source = write_hand(tmp_path / "hand.dcm")
    whole = _dataset_bytes(source)
    cut = whole[: len(whole) - 300 * 240]  # half of the 16-bit pixel data is gone
    sent, uid = _send_crafted(listener, tmp_path / "wire.dcm", cut, source)
    # The header is intact and the bytes are what the PACS holds: keep them and say why.
    assert sent.status == SUCCESS, sent
    state, reason = assess_and_check(runtime, row_for(runtime, uid).id)
    assert state is InstanceState.NOT_ASSESSED
    assert reason is not None and "pixel data cannot be decoded" in reason


def test_zero_length_dataset_cannot_be_understood(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    source = write_hand(tmp_path / "hand.dcm")
    sent, _ = _send_crafted(listener, tmp_path / "wire.dcm", b"", source)
    assert sent.status == CANNOT_UNDERSTAND, sent
    with session_scope(runtime.database_url) as session:
        assert list(session.scalars(select(Instance))) == []


def test_a_million_sequence_items_are_stored_and_not_assessed_with_a_reason(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    """8 MB, a million empty items in the Request Attributes Sequence, after what the
    listener reads: stored at once (it took the listener 17 s and 700 MiB), and refused
    by the worker's read within its budget (it was read whole, and assessed), the image
    not assessed, saying why."""
    from tests.unit.dicom_io.test_pixels_header_budget import with_items

    source = write_hand(tmp_path / "hand.dcm")
    payload = with_items(dcmread(source), 1_000_000)
    sent, uid = _send_crafted(listener, tmp_path / "wire.dcm", payload, source)
    assert sent.status == SUCCESS, sent
    assert sent.seconds < 10, sent
    state, reason = assess_and_check(runtime, row_for(runtime, uid).id)
    assert state is InstanceState.NOT_ASSESSED
    assert reason == "the file cannot be parsed as DICOM (HeaderTooLargeError)"


def test_dataset_of_another_sop_class_than_the_command(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    # A CT data set sent as DX. (It was stored and recorded as CT before, answered
    # Success: the PACS believed it had delivered a DX.) PS3.4 B.2.3 has a status for it.
    source = write_hand(tmp_path / "ct.dcm", modality="CT")
    sent, _ = _send_crafted(
        listener,
        tmp_path / "wire.dcm",
        _dataset_bytes(source),
        source,
        sop_class=DigitalXRayImageStorageForPresentation,
    )
    assert sent.status == DATA_SET_DOES_NOT_MATCH_SOP_CLASS, sent
    with session_scope(runtime.database_url) as session:
        assert list(session.scalars(select(Instance))) == []
    spool = runtime.settings.spool_dir
    locks = (INCOMING_LOCK_NAME, RECORDING_LOCK_NAME)
    kept = [p for p in spool.rglob("*") if p.is_file() and p.name not in locks]
    assert kept == []  # nothing kept, not even partly (the listener's locks are no data)


def test_one_pixel_image_is_not_assessed(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    source = write_hand(tmp_path / "dot.dcm", np.array([[100]], dtype=np.uint16))
    assert send_file(listener.port, source).status == SUCCESS
    state, reason = assess_and_check(runtime, row_for(runtime, dcmread(source).SOPInstanceUID).id)
    assert state is InstanceState.NOT_ASSESSED
    assert reason == "image is 1x1 pixels, smaller than 128x128"
    image = decode_for_display(dcmread(source))  # the decoder itself copes with one pixel
    assert image.shape == (1, 1) and np.isfinite(image).all()


def test_garbage_jpeg_ls_pixel_data_is_not_assessed_with_a_reason(
    listener: StorageSCP, runtime: Runtime, tmp_path: Path
) -> None:
    ds = dcmread(write_hand(tmp_path / "hand.dcm"))
    garbage = random.Random(6).randbytes(5000)
    ds.PixelData = encapsulate([garbage])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    sent = send_file(listener.port, tmp_path / "jls.dcm")
    assert sent.status == SUCCESS, sent
    state, reason = assess_and_check(runtime, row_for(runtime, ds.SOPInstanceUID).id)
    assert state is InstanceState.NOT_ASSESSED
    assert reason is not None and reason.startswith("pixel data cannot be decoded")
    assert "JPEG-LS" in reason


@pytest.mark.parametrize(
    ("encoder", "damage", "reason"),
    [
        (
            ("dcmcjpeg", "+e1"),
            lambda stream: stream[: len(stream) * 3 // 4],
            "The JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
            "[Selection Value 1]) codestream ends without its end-of-image marker (FFD9): "
            "the pixel data is incomplete.",
        ),
        (
            ("dcmcjpls",),
            lambda stream: (
                stream[: len(stream) // 2] + bytes(1024) + stream[len(stream) // 2 + 1024 :]
            ),
            "The JPEG-LS Lossless Image Compression codestream is damaged (CharLS: Invalid "
            "JPEG-LS stream, the encoded bit stream contains a general structural problem); "
            "the pixel data is not decoded.",
        ),
    ],
    ids=["jpeg-lossless-cut-short", "jpeg-ls-damaged-inside"],
)
def test_a_damaged_jpeg_frame_is_not_assessed_with_a_reason(
    listener: StorageSCP,
    runtime: Runtime,
    tmp_path: Path,
    encoder: tuple[str, ...],
    damage: Callable[[bytes], bytes],
    reason: str,
) -> None:
    """The file is sound and only its codestream is not: cut short (decoders would make
    up the missing rows, so the EOI check must say the image is incomplete), or a
    kilobyte of a JPEG-LS scan zeroed, the stream whole in length and ending in EOI
    (CharLS stops at it; pydicom's decoder, which would invent half the hand, is not
    asked)."""
    encoded = tmp_path / "encoded.dcm"
    run_tool(*encoder, write_hand(tmp_path / "hand.dcm"), encoded)
    ds = dcmread(encoded)
    stream = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    ds.PixelData = encapsulate([damage(stream)])
    ds.save_as(tmp_path / "damaged.dcm", enforce_file_format=True)
    sent = send_file(listener.port, tmp_path / "damaged.dcm")
    assert sent.status == SUCCESS, sent
    state, recorded = assess_and_check(runtime, row_for(runtime, ds.SOPInstanceUID).id)
    assert state is InstanceState.NOT_ASSESSED
    assert recorded == f"pixel data cannot be decoded: {reason}"


# -- b. a huge image, memory measured in the processes that handle it ------------

HUGE = 8000  # 8000 x 8000 x 16 bit: 128 MB of pixel data

_RECEIVE_SCRIPT = """
import json, sys, threading
from pathlib import Path
from dicom_io.scp import StorageSCP

def rss_kib(field="VmRSS:"):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field))

stored = threading.Event()
scp = StorageSCP(ae_title="BONEAGE", spool_dir=Path(sys.argv[1]), record=lambda r: 1,
                 notify=lambda i: stored.set(), host="127.0.0.1", port=0)
scp.start()
base = rss_kib()
print(scp.port, flush=True)
ok = stored.wait(120)
print(json.dumps({"stored": ok, "base_kib": base,
                  "peak_kib": rss_kib("VmHWM:")}), flush=True)
scp.stop()
"""

_ASSESS_SCRIPT = """
import json, sys
from pathlib import Path
from pydicom import dcmread
from db.engine import upgrade
from dicom_io.scp import ReceivedInstance
from worker.listener import record_instance
from worker.pipeline import assess_instance
from worker.runtime import Runtime
from worker.settings import load_settings

def rss_kib(field="VmRSS:"):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith(field))

data_dir, model, spooled = map(Path, sys.argv[1:4])
settings = load_settings(data_dir=data_dir, model=model)
upgrade(settings.effective_database_url)
rt = Runtime(settings)
rt.predictor  # loaded before the baseline: it is not what we measure
h = dcmread(spooled, stop_before_pixels=True)
instance_id = record_instance(rt.database_url, ReceivedInstance(
    h.SOPInstanceUID, h.SOPClassUID, h.StudyInstanceUID, h.SeriesInstanceUID, "DX",
    str(h.file_meta.TransferSyntaxUID), "PACS", spooled, spooled.stat().st_size))
base = rss_kib()
outcome = assess_instance(rt, instance_id)
print(json.dumps({"state": outcome.state, "reason": outcome.reason, "base_kib": base,
                  "peak_kib": rss_kib("VmHWM:")}))
"""


def write_huge_hand(path: Path, size: int) -> Path:
    """A size x size 16-bit hand DX, pixel data streamed to disk a band at a time."""
    ds = make_radiograph_dataset(
        np.zeros((8, 8), dtype=np.uint16),
        sex="M",
        birth_date=dt.date(2015, 5, 1),
        study_date=dt.date(2026, 5, 1),
    )
    ds.Rows = ds.Columns = size
    # the window of the 12-bit noise written below (the 8 x 8 zeros' would leave no
    # contrast, and the image would be refused before the model saw it)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    band = 500
    rng = np.random.default_rng(8)
    with path.open("ab") as fh:
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, 2 reserved, 4-byte length.
        fh.write(b"\xe0\x7f\x10\x00OW\0\0" + (size * size * 2).to_bytes(4, "little"))
        for top in range(0, size, band):
            rows = min(band, size - top)
            fh.write(rng.integers(0, 4096, (rows, size), dtype=np.uint16).tobytes())
    return path


def _python(script: str, *args: str, stdout: int | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], env=env, text=True, cwd=REPO, stdout=stdout
    )


def test_huge_image_is_streamed_to_disk_and_assessed_within_bounded_memory(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    source = write_huge_hand(tmp_path / "huge.dcm", HUGE)
    pixel_bytes = HUGE * HUGE * 2
    spool = tmp_path / "spool"
    receiver = _python(_RECEIVE_SCRIPT, str(spool), stdout=subprocess.PIPE)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        sent = send_file(port, source)  # the SCU streams the file from disk too
        assert sent.status == SUCCESS, sent
        received = json.loads(receiver.stdout.readline())
        receiver.wait(30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
    assert received["stored"]
    [spooled] = [p for p in spool.rglob("*.dcm") if ".incoming" not in p.parts]
    assert spooled.stat().st_size > pixel_bytes
    receive_growth = (received["peak_kib"] - received["base_kib"]) * 1024
    logger.info(
        "receiving %d MB grew the listener by %d MB", pixel_bytes >> 20, receive_growth >> 20
    )
    assert receive_growth < pixel_bytes / 2, "the listener held the image in memory"

    assessor = _python(
        _ASSESS_SCRIPT,
        str(tmp_path / "data"),
        str(tiny_checkpoint),
        str(spooled),
        stdout=subprocess.PIPE,
    )
    out, _ = assessor.communicate(timeout=240)
    assert assessor.returncode == 0, out
    assessed = json.loads(out.strip().splitlines()[-1])
    assess_growth = (assessed["peak_kib"] - assessed["base_kib"]) * 1024
    logger.info("assessing it grew the worker by %d MB", assess_growth >> 20)
    assert assessed["state"] == "assessed", assessed  # the model ran on it
    # A few float32 copies of the image at most, not dozens: a worker must survive it.
    assert assess_growth < 16 * pixel_bytes, f"{assess_growth >> 20} MB"


# -- c. malformed association traffic ---------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=STORE_DEADLINE_S)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the listener has closed the connection (EOF or reset)."""
    try:
        while sock.recv(4096):
            pass  # an A-ABORT or A-ASSOCIATE-RJ may come before the close
    except ConnectionResetError:
        pass
    return True


def test_listener_survives_malformed_traffic_and_serves_the_next_client(
    listener: StorageSCP, tmp_path: Path
) -> None:
    hand = write_hand(tmp_path / "hand.dcm")
    rng = random.Random(6)
    # Random bytes, also behind each valid PDU type so the decoder itself is reached.
    for first in [None, *range(1, 8)]:
        with _connect(listener.port) as sock:
            noise = rng.randbytes(2048)
            if first is not None:
                noise = bytes([first, 0]) + (2042).to_bytes(4, "big") + noise[6:]
            sock.sendall(noise)
            assert _closed_by_peer(sock)
    # Half a PDU: an A-ASSOCIATE-RQ header claiming 4 KiB, 10 bytes sent, then closed.
    with _connect(listener.port) as sock:
        sock.sendall(b"\x01\x00" + (4096).to_bytes(4, "big") + b"\x00\x01\x00\x00" + b"x" * 6)
    # Half a PDU again, and then silence: dropped after the network timeout.
    half = _connect(listener.port)
    half.sendall(b"\x01\x00" + (4096).to_bytes(4, "big") + b"\x00\x01")
    # A client that connects and never speaks: dropped after the ACSE timeout.
    silent = _connect(listener.port)
    try:
        started = time.monotonic()
        done = storescu(listener.port, hand)
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 10, "the next client waited on a stalled one"
        for stalled in (half, silent):
            assert _closed_by_peer(stalled)
    finally:
        half.close()
        silent.close()
    server = listener._server
    assert server is not None
    wait_for(
        lambda: not server.active_associations,
        timeout=10,
        what="every association thread to end",
    )
    assert storescu(listener.port, hand).returncode == 0


# -- d. the decode path under random pixel modules --------------------------------


@st.composite
def pixel_modules(draw: st.DrawFn) -> tuple[Dataset, tuple[int, int]]:
    """A plausible image header with random pixel bytes, sometimes of the wrong length."""
    rows = draw(st.integers(1, 48))
    columns = draw(st.integers(1, 48))
    colour = draw(st.booleans()) and draw(st.booleans())  # one time in four
    samples = 3 if colour else 1
    allocated = draw(st.sampled_from([8, 16] if colour else [8, 16, 32]))
    stored = draw(st.integers(1, allocated))
    signed = draw(st.booleans()) and not colour
    frames = draw(st.sampled_from([1, 1, 1, 2]))
    expected = rows * columns * samples * (allocated // 8) * frames
    length = draw(
        st.one_of(
            st.just(expected),
            st.just(expected),
            st.integers(0, expected + 64),  # inconsistent with the header
        )
    )
    length += length % 2  # OB/OW values have even length
    pixels = draw(st.binary(min_size=length, max_size=length))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = draw(
        st.sampled_from([DigitalXRayImageStorageForPresentation, SecondaryCaptureImageStorage])
    )
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.BodyPartExamined = draw(st.sampled_from(["HAND", "CHEST", ""]))
    ds.PatientSex = draw(st.sampled_from(["M", "F", "O", ""]))
    ds.PatientBirthDate = draw(st.sampled_from(["20150101", "", "2015", "garbage!"]))
    ds.StudyDate = draw(st.sampled_from(["20250101", "", "19000101"]))
    ds.PatientAge = draw(st.sampled_from(["010Y", "", "abc", "999D"]))
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = samples
    ds.BitsAllocated = allocated
    ds.BitsStored = stored
    ds.HighBit = stored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    if colour:
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = draw(st.integers(0, 1))
    else:
        ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
    number = st.floats(-1e6, 1e6, allow_nan=False) | st.sampled_from([0.0, 1e-30, 1e30, -1e30])

    def ds_text(value: float) -> str:
        return f"{value:.6g}"

    if draw(st.booleans()):
        ds.RescaleSlope = ds_text(draw(number))
        ds.RescaleIntercept = ds_text(draw(number))
    if draw(st.booleans()):
        ds.WindowCenter = ds_text(draw(number))
        ds.WindowWidth = ds_text(draw(number))
        if draw(st.booleans()):
            ds.VOILUTFunction = draw(st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "X"]))
    if draw(st.booleans()) and allocated <= 16:
        vr, low, high = ("SS", -32768, 32767) if signed else ("US", 0, 65535)
        ds.add_new(0x00280120, vr, draw(st.integers(low, high)))  # Pixel Padding Value
        if draw(st.booleans()):
            ds.add_new(0x00280121, vr, draw(st.integers(low, high)))  # Range Limit
    ds.add_new(0x7FE00010, "OB" if allocated == 8 else "OW", pixels)

    # Through bytes, as a PACS would send it: values come back as read from a file.
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue())), (rows, columns)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixel_modules())
def test_decode_returns_a_finite_unit_image_or_a_pixel_data_error(
    module: tuple[Dataset, tuple[int, int]],
) -> None:
    ds, shape = module
    decision = gate.check(ds)
    assert isinstance(decision, gate.GateDecision)
    assert decision.accepted or decision.reason
    try:
        image = decode_for_display(ds)
    except PixelDataError:
        return
    assert image.dtype == np.float32
    assert image.shape == shape
    assert np.isfinite(image).all(), "NaN or infinity in a decoded image"
    assert image.min() >= 0.0 and image.max() <= 1.0


def _decoded(decode: Callable[[], np.ndarray]) -> np.ndarray | str:
    """The image ``decode`` gives, or the reason it refuses it."""
    try:
        return decode()
    except PixelDataError as exc:
        return f"refused: {exc}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixel_modules(), st.integers(0, 2))
def test_read_from_the_file_a_strip_at_a_time_decodes_or_refuses_as_read_whole(
    module: tuple[Dataset, tuple[int, int]], reduce: int
) -> None:
    """The worker reads an uncompressed image reduced from its file, a strip of rows at a
    time: whatever the header says, the same image as the instance read whole, or the
    same refusal (a PixelDataError, never another error)."""
    ds, _ = module
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instance.dcm"
        ds.save_as(path, enforce_file_format=True)
        whole = _decoded(lambda: decode_for_display(dcmread(path), reduce=reduce))
        # values over 16 bytes left in the file: these images are at most 48 x 48
        with (
            mock.patch.object(pixels, "DEFERRED_BYTES", 16),
            mock.patch.object(pixels, "_STRIP_BYTES", 64),
        ):
            from_the_file = _decoded(lambda: decode_for_display(read_image(path), reduce=reduce))
    if isinstance(whole, str) or isinstance(from_the_file, str):
        assert from_the_file == whole
    else:
        np.testing.assert_array_equal(from_the_file, whole)


_ENCODERS: dict[str, tuple[UID, Callable[[np.ndarray, int], bytes | bytearray]]] = {
    "JPEG 2000": (
        JPEG2000Lossless,
        lambda a, bits: imagecodecs.jpeg2k_encode(
            a, level=0, codecformat="J2K", reversible=True, bitspersample=bits
        ),
    ),
    "JPEG-LS": (JPEGLSLossless, lambda a, bits: imagecodecs.jpegls_encode(a, level=0)),
    "lossless JPEG": (
        JPEGLossless,
        lambda a, bits: imagecodecs.ljpeg_encode(a, bitspersample=bits),
    ),
}


@st.composite
def compressed_modules(draw: st.DrawFn) -> tuple[Dataset, tuple[int, int], int]:
    """One grey frame encoded losslessly, described by a header that may not match it:
    rows, columns, Bits Stored, signedness and samples as a modality might get them
    wrong; and the codestream sometimes cut short. Returns the dataset read back from
    its bytes, the header's (rows, columns) and the codestream's precision."""
    name = draw(st.sampled_from(sorted(_ENCODERS)))
    syntax, encode = _ENCODERS[name]
    rows, columns = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    bits = draw(st.integers(8 if name == "JPEG 2000" else 2, 16))
    seed = draw(st.integers(0, 2**32 - 1))
    stored = np.random.default_rng(seed).integers(0, 1 << bits, (rows, columns))
    codestream = encode(stored.astype(np.uint16 if bits > 8 else np.uint8), bits)
    if draw(st.integers(0, 4)) == 0:
        codestream = codestream[: draw(st.integers(2, len(codestream) - 1))]

    header_rows = draw(st.sampled_from([rows, rows, rows, rows + 1, rows - 3, columns]))
    header_columns = draw(st.sampled_from([columns, columns, columns, columns + 2, rows]))
    header_bits = draw(st.sampled_from([bits, bits, bits, max(1, bits - 4), min(16, bits + 1)]))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.BodyPartExamined = "HAND"
    ds.Rows, ds.Columns = header_rows, header_columns
    ds.SamplesPerPixel = draw(st.sampled_from([1, 1, 1, 1, 3]))
    ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2"]))
    ds.BitsAllocated = 8 if header_bits <= 8 and draw(st.booleans()) else 16
    ds.BitsStored = min(header_bits, ds.BitsAllocated)
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = draw(st.sampled_from([0, 0, 0, 1]))
    if draw(st.booleans()):
        ds.WindowCenter, ds.WindowWidth = 1 << (bits - 1), 1 << bits
    ds.add_new(0x7FE00010, "OB", encapsulate([bytes(codestream)]))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return dcmread(io.BytesIO(buffer.getvalue())), (header_rows, header_columns), bits


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compressed_modules(), st.integers(0, 2))
def test_a_compressed_frame_described_wrongly_decodes_to_its_header_or_is_refused(
    module: tuple[Dataset, tuple[int, int], int], reduce: int
) -> None:
    """Whatever the header says of a JPEG 2000, JPEG-LS or lossless JPEG frame: a finite
    image in [0, 1] of the header's size (halved ``reduce`` times), or a PixelDataError;
    the same read from the file as read whole."""
    ds, (rows, columns), _ = module
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instance.dcm"
        ds.save_as(path, enforce_file_format=True)
        whole = _decoded(lambda: decode_for_display(dcmread(path), reduce=reduce))
        with mock.patch.object(pixels, "DEFERRED_BYTES", 16):
            from_the_file = _decoded(lambda: decode_for_display(read_image(path), reduce=reduce))
    if isinstance(whole, str) or isinstance(from_the_file, str):
        assert from_the_file == whole
        return
    np.testing.assert_array_equal(from_the_file, whole)
    image = whole
    assert image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.shape in {(rows >> r, columns >> r) for r in range(reduce + 1)} | {
        (-(-rows >> r), -(-columns >> r)) for r in range(reduce + 1)
    }, (image.shape, rows, columns, reduce)
