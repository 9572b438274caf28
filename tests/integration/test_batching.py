"""A batching inference worker (BONEAGE_INFERENCE_BATCH > 1, the GPU default) end to end.

Real processes on Redis + PostgreSQL, dcmtk storescu in and storescp out, on the CPU
(the batching path is device-agnostic; a GPU only makes it pay). Eight hands wait in
the queue before the inference worker starts, so its task threads hand them to the model
together: the worker's /metrics must show forward passes of several images, every
image must get exactly one result equal to what the model gives it alone, and each
SR and SC must come back once. The same holds for two batching processes sharing the
device (BONEAGE_INFERENCE_PROCESSES=2, as on a GPU host), which the `work` command
supervises: a process that dies is started again, and none outlives the supervisor.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.schema import Instance, InstanceState, Result
from dicom_io.pixels import decode_for_display, decode_reduction
from models.checkpoint import load_checkpoint
from models.predictor import BoneAgePredictor
from tests.conftest import StoreSCP
from tests.integration.test_end_to_end import Node, base_env, cli, storescu
from tests.integration.test_metrics import free_port_pair, scrape, value
from tests.integration.test_reliability import (
    everything_delivered,
    make_hands,
    received_sop_uids,
)
from tests.support import free_port, wait_for, wait_for_port
from worker.settings import SC_MIN_LONG_SIDE, usable_cpus

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HANDS = 8
BATCH = 4


def queued(database_url: str, count: int) -> bool:
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(Instance)))
    return len(rows) == count and all(r.state is InstanceState.QUEUED for r in rows)


def alone(predictor: BoneAgePredictor, path: Path) -> float:
    """The bone age the model gives this image on its own, decoded as the worker does."""
    ds = dcmread(path)
    reduce = decode_reduction(
        ds, min_short_side=predictor.input_size, min_long_side=SC_MIN_LONG_SIDE
    )
    male = str(ds.PatientSex) == "M"
    return predictor.predict(decode_for_display(ds, reduce=reduce), male=male).bone_age_months


@pytest.mark.parametrize("processes", [1, 2])
def test_batching_worker_assesses_each_image_once_in_shared_forward_passes(
    processes: int,
    tmp_path: Path,
    storescp: StoreSCP,
    tiny_checkpoint: Path,
    redis_broker: tuple[str, str],
    postgres_url: str,
) -> None:
    port, worker_port = free_port(), free_port_pair()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(
        BONEAGE_BROKER_URL=redis_broker[0],
        BONEAGE_BROKER_PREFIX=redis_broker[1],
        BONEAGE_DATABASE_URL=postgres_url,
        BONEAGE_DEVICE="cpu",
        BONEAGE_INFERENCE_BATCH=str(BATCH),
        BONEAGE_INFERENCE_PROCESSES=str(processes),
        # long enough that images decoded one after another on two cores still meet
        BONEAGE_INFERENCE_BATCH_WAIT_MS="1000",
        BONEAGE_WORKER_METRICS_PORT=str(worker_port),
        BONEAGE_HOST="127.0.0.1",
        BONEAGE_LOG_LEVEL="INFO",
    )
    assert cli("db", "upgrade", env=env).returncode == 0
    hands = make_hands(tmp_path, env, HANDS)
    node = Node(tmp_path, env)
    try:
        listener = node.start("listener", "listen")
        wait_for_port(port, timeout=120, process=listener)
        storescu(port, *hands)
        wait_for(lambda: queued(postgres_url, HANDS), timeout=60, what="every hand queued")

        worker = node.start("inference", "work", "-Q", "inference")
        node.start("delivery", "work", "-Q", "delivery")
        wait_for(
            lambda: everything_delivered(postgres_url, HANDS),
            timeout=300,
            what="every SR and SC delivered",
            process=worker,
        )
        metrics = wait_for(lambda: scrape(worker_port), timeout=30, what="inference /metrics")
        status = json.loads(cli("status", "--json", env=env).stdout)
        shown = cli("status", env={**env, "COLUMNS": "200"}).stdout  # no folded cells
    finally:
        codes = node.stop()
    assert codes == [0, 0, 0], node.log_text()[-4000:]

    # The threads shared forward passes: fewer passes than images, none above the limit.
    passes = value(metrics, "boneage_inference_batch_images_count")
    assert value(metrics, "boneage_inference_batch_images_sum") == HANDS
    assert passes < HANDS
    assert value(metrics, "boneage_inference_batch_images_bucket", le=f"{float(BATCH)}") == passes
    assert value(metrics, "boneage_inference_batch_seconds_count") == passes
    # with two processes the supervisor serves the sum of both
    assert (
        value(metrics, "boneage_worker_tasks_total", task="boneage.assess", outcome="assessed")
        == HANDS
    )
    if processes == 1:
        assert "1 process, 8 task threads, batches of up to 4" in node.log_text()
    else:
        assert "2 batching processes on device cpu, 8 task threads each" in node.log_text()
        for k in (1, 2):
            assert f"process {k}/2, 8 task threads, batches of up to 4" in node.log_text()
    inference = [p for p in status["processes"] if p.get("queues") == ["inference"]]
    assert [(p["alive"], p["inference_batch"]) for p in inference] == [(True, BATCH)] * processes
    for shown_process in inference:
        assert shown_process["batching_processes"] == processes
        # Pillow decodes JPEG 2000 under the interpreter lock, one study at a time in a
        # process: each decode gets the cores the process shares with its siblings
        assert shown_process["jpeg2000_threads"] == max(1, usable_cpus() // processes)
        # its task threads share as many malloc arenas as it has cores (worker.heap)
        assert shown_process["malloc_arenas"] == max(1, usable_cpus() // processes)
    assert f"batches of up to {BATCH}" in shown

    # One result per image, equal to the image assessed alone; each object delivered once.
    predictor = BoneAgePredictor(load_checkpoint(tiny_checkpoint), device="cpu")
    by_uid = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in hands}
    with session_scope(postgres_url) as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Result.bone_age_months).join(
                Result, Result.instance_id == Instance.id
            )
        ).all()
    assert sorted(uid for uid, _ in rows) == sorted(by_uid)
    for uid, months in rows:
        assert months == pytest.approx(alone(predictor, by_uid[uid]), abs=1e-3)
    uids = received_sop_uids(storescp)
    assert len(uids) == len(set(uids)) == 2 * HANDS


def test_a_batch_setting_with_a_one_image_pool_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(BONEAGE_DATA_DIR=str(tmp_path / "data"), BONEAGE_INFERENCE_BATCH="4")
    assert cli("db", "upgrade", env=env).returncode == 0
    refused = cli("work", "-Q", "inference", "--pool", "solo", env=env)
    assert refused.returncode == 2
    assert "a batching inference worker runs --pool threads" in refused.stderr


def live_children(pid: int) -> set[int]:
    """Processes whose parent is ``pid``, zombies left out."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(parent) == pid and state != "Z":
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_batching_processes_are_restarted_and_stop_with_their_supervisor(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path
) -> None:
    env = base_env(tmp_path, storescp, tiny_checkpoint, free_port())
    env.update(
        BONEAGE_DEVICE="cpu",
        BONEAGE_INFERENCE_BATCH="2",
        BONEAGE_INFERENCE_PROCESSES="2",
        BONEAGE_LOG_LEVEL="INFO",
    )
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    try:
        supervisor = node.start("inference", "work", "-Q", "inference")
        members = wait_for(
            lambda: found if len(found := live_children(supervisor.pid)) == 2 else None,
            timeout=60,
            what="two batching processes",
            process=supervisor,
        )

        def workers_alive() -> int:
            report = json.loads(cli("status", "--json", env=env).stdout)
            return sum(p["alive"] for p in report["processes"] if p["role"] == "worker")

        # each is a worker of its own, with its own heartbeat
        wait_for(lambda: workers_alive() == 2, timeout=120, what="two workers in status")

        killed, kept = sorted(members)
        os.kill(killed, signal.SIGKILL)
        again = wait_for(
            lambda: (
                found
                if len(found := live_children(supervisor.pid)) == 2 and killed not in found
                else None
            ),
            timeout=60,
            what="the killed batching process started again",
            process=supervisor,
        )
        assert kept in again
        assert re.search(r"exited with code -9 after \d+ s; restarting in 1 s", node.log_text())

        # the supervisor SIGKILLed: the kernel stops its batching processes too
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(30)
        wait_for(
            lambda: not any(alive(pid) for pid in again),
            timeout=60,
            what="the batching processes to stop with their supervisor",
        )
    finally:
        node.stop()


def test_a_batching_process_whose_supervisor_is_gone_does_not_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(BONEAGE_DATA_DIR=str(tmp_path / "data"), BONEAGE_INFERENCE_BATCH="4")
    # process 1 (init) is nobody's supervisor here: this process's parent is the test
    refused = cli("work", "-Q", "inference", "--member", "1/2", "--supervisor", "1", env=env)
    assert refused.returncode == 1
    assert "the supervising worker (process 1) is gone" in refused.stderr


def test_a_solo_worker_assesses_one_study_at_a_time_whatever_the_processes_setting(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path
) -> None:
    # --pool solo runs one task at a time: its concurrency is 1, so its JPEG 2000 decodes
    # get every core, not the share of BONEAGE_INFERENCE_PROCESSES processes it never runs
    env = base_env(tmp_path, storescp, tiny_checkpoint, free_port())
    env.update(BONEAGE_DEVICE="cpu", BONEAGE_INFERENCE_PROCESSES="2", BONEAGE_LOG_LEVEL="INFO")
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    try:
        worker = node.start("inference", "work", "-Q", "inference", "--pool", "solo")
        wait_for(
            lambda: "inference: 1 process(es)" in node.log_text(),
            timeout=60,
            what="the solo worker's layout in its log",
            process=worker,
        )
    finally:
        node.stop()
