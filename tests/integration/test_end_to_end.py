"""The whole path with real processes: storescu → listener → worker → storescp.

Once on the embedded defaults (`boneage-worker serve`: SQLite, SQLite broker) and
once as production runs it (Redis + PostgreSQL, listener and workers as separate
processes).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, Result
from dicom_io.uids import UUID_ROOT
from models.fused import fusion_available
from tests.conftest import StoreSCP
from tests.dicomtools import dciodvfy_errors, dsrdump
from tests.support import (
    free_port,
    keep_process_log,
    storescu_command,
    wait_for,
    wait_for_port,
)
from worker.messaging import prune_embedded_broker
from worker.settings import usable_cpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT_VALUES = ("PHANTOM^HAND", "PHANTOM001")  # what demo-image writes as name and ID


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


class Node:
    """boneage-worker processes started with a given environment; logs kept per process."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.env = env
        self.logs = tmp_path / "logs"
        self.logs.mkdir(exist_ok=True)
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        keep_process_log(log)
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", *args],
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.processes.append((proc, log))
        return proc

    def stop(self) -> list[int | None]:
        for proc, _ in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc, _ in self.processes:
            try:
                codes.append(proc.wait(60))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(None)
        return codes

    def log_text(self) -> str:
        return "\n".join(log.read_text(errors="replace") for _, log in self.processes)


def make_inputs(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    hand, ct = tmp_path / "hand.dcm", tmp_path / "ct.dcm"
    assert (
        cli("demo-image", str(hand), "--age-months", "110", "--sex", "F", env=env).returncode == 0
    )
    assert cli("demo-image", str(ct), "--modality", "CT", "--seed", "2", env=env).returncode == 0
    return hand, ct


def spooled_bytes(data_dir: Path) -> int:
    """Bytes of the received files in the spool (temporary files of unfinished C-STOREs
    left out)."""
    spool = data_dir / "spool"
    return sum(
        p.stat().st_size
        for p in spool.rglob("*.dcm")
        if ".incoming" not in p.relative_to(spool).parts
    )


def storescu(port: int, *files: Path) -> None:
    result = subprocess.run(
        storescu_command(port, *files),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def check_round_trip(
    node: Node,
    database_url: str,
    storescp: StoreSCP,
    hand: Path,
    port: int,
    *,
    precision: str = "float32",
    sc_min_long_side: int = 1000,
    time_zone: str | None = None,
    uid_root: str = UUID_ROOT,
) -> None:
    """``time_zone``: the TZ the node runs in (None: this process's); ``uid_root``: the
    root its UIDs are made under (BONEAGE_UID_ROOT)."""
    # The SR and the SC for the hand come back; the CT yields nothing.
    received = storescp.wait_for_objects(2, timeout=240)
    source = dcmread(hand)
    objects = {dcmread(p).SOPClassUID.name: p for p in received}
    assert set(objects) == {"Comprehensive SR Storage", "Secondary Capture Image Storage"}
    here = datetime.now(ZoneInfo(time_zone)) if time_zone else datetime.now().astimezone()
    for path in received:
        ds = dcmread(path)
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert dciodvfy_errors(path) == []
        assert str(ds.SOPInstanceUID).startswith(f"{uid_root}."), ds.SOPInstanceUID
        # the image states no time zone: dated in the node's local time, and none stated
        assert "TimezoneOffsetFromUTC" not in source and "TimezoneOffsetFromUTC" not in ds
        made = datetime.strptime(f"{ds.ContentDate}{ds.ContentTime}", "%Y%m%d%H%M%S.%f")
        assert timedelta(0) <= here.replace(tzinfo=None) - made < timedelta(minutes=10)
    text = dsrdump(objects["Comprehensive SR Storage"])
    assert re.search(r'NUM:\(,,"Bone age"\)="[0-9.]+" \(mo,UCUM', text)
    assert "UNTRAINED MODEL - NOT FOR CLINICAL USE" in text

    with session_scope(database_url) as session:
        rows = {r.modality: r for r in session.scalars(select(Instance))}
        assert rows["DX"].state is InstanceState.ASSESSED
        assert rows["CT"].state is InstanceState.NOT_ASSESSED
        assert (
            rows["CT"].reason
            and "CT Image Storage is not a projection radiograph" in rows["CT"].reason
        )
        assert len(list(session.scalars(select(Result)))) == 1
        # each row's timeline is whole and in order, even where an inference worker
        # claimed the instance before the enqueuer's commit marked it queued
        for row in rows.values():
            stamps = [row.received_at, row.queued_at, row.started_at, row.finished_at]
            present = [stamp for stamp in stamps if stamp is not None]
            assert present == stamps and sorted(present) == present, stamps
    wait_for(lambda: _all_delivered(database_url), timeout=60, what="deliveries marked delivered")

    # the tiny checkpoint is a random model: healthy but for that, which status says
    status = wait_for(
        lambda: _healthy_but_untrained(node.env),
        timeout=60,
        what="a status whose one problem is the untrained model",
    )
    assert status["instances"]["assessed"] == 1 and status["instances"]["not_assessed"] == 1
    assert status["deliveries"]["delivered"] == 2
    alive = [p for p in status["processes"] if p["alive"]]
    assert [p["role"] for p in alive].count("listener") == 1
    # the delivery worker, and on a CPU one inference process per core (at most 4), each
    # with its share of the cores as torch threads
    inference = [p for p in alive if "inference" in p.get("queues", [])]
    delivery = [p for p in alive if p.get("queues") == ["delivery"]]
    assert len(delivery) == 1
    # the delivery worker never loads torch (about 600 MB of memory)
    assert not _loads_torch(delivery[0]) and all(_loads_torch(p) for p in inference)
    assert len(inference) == min(usable_cpus(), 4)
    threads = max(1, usable_cpus() // len(inference))
    assert all(p["torch_threads"] == threads for p in inference)
    # a study that comes alone is assessed on every core (worker.cores)
    lone = usable_cpus() if threads < usable_cpus() else None
    assert all(p.get("lone_study_threads") == lone for p in inference)
    assert all(p["heap_keeps_large_blocks"] for p in inference)  # glibc here
    # what each process started with is left out of the garbage collector's passes
    # (an inference process's model and tables of the standard: some 745,000 objects)
    assert all(p["frozen_start_up_objects"] > 100_000 for p in alive), [
        (p["role"], p.get("frozen_start_up_objects")) for p in alive
    ]
    # the cores shared among the processes' JPEG 2000 decodes
    assert all(p["jpeg2000_threads"] == max(1, usable_cpus() // len(inference)) for p in inference)
    assert all(p["sc_min_long_side"] == sc_min_long_side for p in inference)
    # the root each makes new images' UIDs under, which `status` compares
    assert all(p["uid_root"] == uid_root for p in inference)
    zone = f"UTC{here.strftime('%z')[:3]}:{here.strftime('%z')[3:]} ({here.tzname()})"
    assert all(p["time_zone"] == zone for p in inference), (zone, inference)
    assert all(p["precision"] == precision for p in inference)
    fused = precision == "float32" and fusion_available() is None
    assert all(p["fused_convolutions"] is fused for p in inference)
    assert any("CT Image Storage" in (p["reason"] or "") for p in status["recent_problems"])
    storage = status["storage"]
    assert storage["spool_instances"] == 2 and storage["retention_days"] == 30
    assert storage["spool_bytes"] == spooled_bytes(Path(node.env["BONEAGE_DATA_DIR"]))
    assert 0 < storage["free_bytes"] <= storage["total_bytes"]
    shown = cli("status", env={**node.env, "COLUMNS": "200"})  # no folded cells
    assert "received images on disk" in shown.stdout, shown.stdout
    assert f"dates in {zone}" in shown.stdout, shown.stdout
    # bfloat16 is an opt-in: the administrator sees it, and each result records it
    assert (f"cpu · {precision}" in shown.stdout) is (precision != "float32"), shown.stdout
    with session_scope(database_url) as session:
        devices = {r.device for r in session.scalars(select(Result))}
    assert devices == {"cpu" if precision == "float32" else f"cpu, {precision}"}


def _loads_torch(process: dict[str, Any]) -> bool:
    """Whether a node process of `status --json` has torch loaded (a heartbeat's name
    ends in its process id)."""
    pid = int(process["name"].rsplit(":", 1)[1])
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _all_delivered(database_url: str, count: int = 2) -> bool:
    with session_scope(database_url) as session:
        states = [d.state for d in session.scalars(select(Delivery))]
    return len(states) == count and all(s is DeliveryState.DELIVERED for s in states)


#: An organisation's UID root (BONEAGE_UID_ROOT), as an administrator sets it.
ORGANISATION = "1.2.840.99999.7"
#: What `status` says of a node whose inference workers run an untrained model.
UNTRAINED = (
    "inference worker(s) run an UNTRAINED model: results are not for clinical use; "
    "set BONEAGE_MODEL"
)


def _healthy_but_untrained(env: dict[str, str]) -> dict[str, Any] | None:
    result = cli("status", "--json", env=env)
    report = json.loads(result.stdout)
    settled = result.returncode == 1 and report["problems"] == [UNTRAINED]
    return report if settled and report["healthy"] is False else None


def base_env(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, port: int
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(tmp_path / "data"),
        BONEAGE_PORT=str(port),
        BONEAGE_DESTINATIONS=storescp.destination,
        BONEAGE_ALLOWED_AETS="PACS",
        BONEAGE_MODEL=str(tiny_checkpoint),
        BONEAGE_LOG_LEVEL="DEBUG",  # the most talkative level, for the log check below
    )
    return env


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for node in nodes:
        node.stop()


def serve_embedded(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, node_factory: list[Node]
) -> tuple[Node, int]:
    """`boneage-worker serve` on the embedded defaults, listening: the node and its port."""
    port = free_port()
    node = Node(tmp_path, base_env(tmp_path, storescp, tiny_checkpoint, port))
    node_factory.append(node)
    serve = node.start("serve", "serve")
    wait_for_port(port, timeout=120, process=serve)
    return node, port


def test_embedded_defaults_serve(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, node_factory: list[Node]
) -> None:
    node, port = serve_embedded(tmp_path, storescp, tiny_checkpoint, node_factory)
    hand, ct = make_inputs(tmp_path, node.env)
    storescu(port, hand, ct)
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    check_round_trip(node, database_url, storescp, hand, port)

    assert node.stop() == [0]
    # Consumed messages are pruned from the embedded broker (else it grows for ever).
    broker = f"sqla+sqlite:///{tmp_path / 'data' / 'broker.db'}"
    # the embedded broker runs in WAL mode (one fsync per published message)
    with closing(sqlite3.connect(tmp_path / "data" / "broker.db")) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # 2 assess messages, 1 deliver (the SR and the SC share one)
    assert prune_embedded_broker(broker, older_than=timedelta(0)) >= 3
    assert prune_embedded_broker(broker, older_than=timedelta(0)) == 0
    logs = node.log_text()
    assert "instance 2 assessed" in logs or "assessed in" in logs
    for value in PATIENT_VALUES:
        assert value not in logs, f"patient value {value!r} in the logs"
    assert dcmread(hand).StudyInstanceUID not in logs


def test_a_corrected_copy_sent_again_is_assessed_again_and_replaces_the_report(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, node_factory: list[Node]
) -> None:
    """The PACS sends the hand, then the same image with the patient's sex corrected:
    a second SR and SC come back, the SR naming the first as the report it replaces;
    the same image sent a third time, unchanged, brings nothing."""
    node, port = serve_embedded(tmp_path, storescp, tiny_checkpoint, node_factory)
    hand, _ = make_inputs(tmp_path, node.env)
    storescu(port, hand)
    first = storescp.wait_for_objects(2, timeout=240)
    [first_sr] = [dcmread(p) for p in first if dcmread(p).Modality == "SR"]

    corrected = tmp_path / "hand-corrected.dcm"
    ds = dcmread(hand)
    ds.PatientSex = "M"
    ds.save_as(corrected, enforce_file_format=True)
    storescu(port, corrected)
    both = storescp.wait_for_objects(4, timeout=240)
    again = [dcmread(p) for p in both if p not in first]
    [second_sr] = [o for o in again if o.Modality == "SR"]
    assert second_sr.PatientSex == "M" and second_sr.InstanceNumber == 2
    [study] = second_sr.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    for path in both:
        assert dciodvfy_errors(path) == []

    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    wait_for(
        lambda: _all_delivered(database_url, count=4),
        timeout=60,
        what="the four deliveries marked delivered",
    )
    storescu(port, corrected)  # once more, as it is

    with session_scope(database_url) as session:
        [instance_id] = session.scalars(select(Instance.id))

    def received_three_times() -> bool:
        with session_scope(database_url) as session:
            instance = session.get_one(Instance, instance_id)
            return instance.times_received == 3 and instance.state is InstanceState.ASSESSED

    wait_for(received_three_times, timeout=60, what="the third copy recorded")
    wait_for(
        lambda: f"instance {instance_id} already assessed" in node.log_text(),
        timeout=60,
        what="the third copy's message handled",
    )
    with session_scope(database_url) as session:
        [instance] = session.scalars(select(Instance))
        assert instance.assessment == 2
        assert [r.male for r in session.scalars(select(Result).order_by(Result.id))] == [
            False,
            True,
        ]
        assert len(list(session.scalars(select(Delivery)))) == 4
    assert len(storescp.received()) == 4
    assert node.stop() == [0]
    logs = node.log_text()
    assert "received again with other patient, study or image values" in logs
    for value in PATIENT_VALUES:
        assert value not in logs, f"patient value {value!r} in the logs"


def test_redis_and_postgresql_separate_processes(
    tmp_path: Path,
    storescp: StoreSCP,
    tiny_checkpoint: Path,
    postgres_url: str,
    redis_broker: tuple[str, str],
    node_factory: list[Node],
) -> None:
    port = free_port()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(
        BONEAGE_DATABASE_URL=postgres_url,
        BONEAGE_BROKER_URL=redis_broker[0],
        BONEAGE_BROKER_PREFIX=redis_broker[1],
        # the opt-ins a CPU site may take (the embedded test keeps the defaults)
        BONEAGE_PRECISION="bfloat16",
        BONEAGE_SC_MIN_LONG_SIDE="700",
        # a hospital's zone, not the container's UTC (India's: no daylight saving time)
        TZ="Asia/Kolkata",
        # the organisation's UID root
        BONEAGE_UID_ROOT=ORGANISATION,
    )
    # Without a migrated schema the listener refuses to start, and says why.
    refused = cli("listen", env=env)
    assert refused.returncode != 0 and "boneage-worker db upgrade" in refused.stderr
    assert cli("db", "upgrade", env=env).returncode == 0

    node = Node(tmp_path, env)
    node_factory.append(node)
    listener = node.start("listener", "listen")
    node.start("inference", "work", "-Q", "inference")
    node.start("delivery", "work", "-Q", "delivery")
    wait_for_port(port, timeout=120, process=listener)
    hand, ct = make_inputs(tmp_path, env)
    storescu(port, hand, ct)
    check_round_trip(
        node,
        postgres_url,
        storescp,
        hand,
        port,
        precision="bfloat16",
        sc_min_long_side=700,
        time_zone="Asia/Kolkata",
        uid_root=ORGANISATION,
    )
    assert all(code == 0 for code in node.stop())
    logs = node.log_text()
    for value in PATIENT_VALUES:
        assert value not in logs
