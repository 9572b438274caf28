"""Nothing lost: a worker killed mid-inference, and the broker down while studies arrive.

Real processes, real Redis (a private redis-server for the outage), dcmtk peers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from db.engine import session_scope
from db.queries import database_now
from db.schema import Delivery, DeliveryState, Heartbeat, Instance, InstanceState, Result
from tests.conftest import StoreSCP
from tests.integration.test_end_to_end import Node, base_env, cli, storescu
from tests.support import free_port, port_open, wait_for, wait_for_port
from worker.heartbeat import STALE_AFTER
from worker.reconciler import DIED

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def make_hands(tmp_path: Path, env: dict[str, str], count: int) -> list[Path]:
    files = []
    for i in range(count):
        path = tmp_path / f"hand{i}.dcm"
        result = cli(
            "demo-image", str(path), "--seed", str(i), "--age-months", str(60 + 10 * i), env=env
        )
        assert result.returncode == 0, result.stderr
        files.append(path)
    return files


def states(database_url: str) -> dict[int, InstanceState]:
    with session_scope(database_url) as session:
        return {row.id: row.state for row in session.scalars(select(Instance))}


def everything_delivered(database_url: str, instances: int) -> bool:
    with session_scope(database_url) as session:
        results = list(session.scalars(select(Result)))
        deliveries = list(session.scalars(select(Delivery)))
    return (
        len(results) == instances
        and len(deliveries) == 2 * instances
        and all(d.state is DeliveryState.DELIVERED for d in deliveries)
    )


def received_sop_uids(storescp: StoreSCP) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in storescp.received()]


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()


@dataclass
class Running:
    """A listener, a delivery worker and an inference worker busy with 4 hand images."""

    node: Node
    worker: subprocess.Popen[bytes]
    database_url: str


def start_with_four_hands(
    tmp_path: Path,
    storescp: StoreSCP,
    redis_broker: tuple[str, str] | None,
    nodes: list[Node],
    **settings: str,
) -> Running:
    """Start the node's three processes and send it four hands.

    ``redis_broker`` None: the embedded broker (a SQLite file in the data folder).
    """
    port = free_port()
    # The real ResNet-50 at 512 px (no checkpoint): slow enough to be caught mid-inference.
    env = base_env(tmp_path, storescp, Path("unused"), port)
    del env["BONEAGE_MODEL"]
    if redis_broker is not None:
        env.update(BONEAGE_BROKER_URL=redis_broker[0], BONEAGE_BROKER_PREFIX=redis_broker[1])
    env.update(BONEAGE_LOG_LEVEL="INFO", **settings)
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    nodes.append(node)
    listener = node.start("listener", "listen")
    node.start("delivery", "work", "-Q", "delivery")
    worker = node.start("inference-1", "work", "-Q", "inference")
    wait_for_port(port, timeout=120, process=listener)
    storescu(port, *make_hands(tmp_path, env, 4))
    return Running(node, worker, database_url)


def being_processed(running: Running) -> list[tuple[int, int]]:
    """(instance id, pid of the process holding it) for every image being processed.

    Waits (up to 3 minutes) until there is one: the test may kill that process.
    """

    def claimed() -> list[tuple[int, int]]:
        with session_scope(running.database_url) as session:
            rows = session.scalars(
                select(Instance).where(Instance.state == InstanceState.PROCESSING)
            )
            # claimed_by is the heartbeat name, "<role>@<host>:<pid>"
            return [(i.id, int(i.claimed_by.rsplit(":", 1)[1])) for i in rows if i.claimed_by]

    return wait_for(
        claimed,
        timeout=180,
        interval=0.02,
        what="an instance being processed",
        process=running.worker,
    )


def assert_each_assessed_once(
    running: Running, storescp: StoreSCP, killed: Sequence[int] = (), *, attempts: int = 2
) -> None:
    """Every image delivered with one result; those in ``killed`` took ``attempts``."""
    wait_for(
        lambda: everything_delivered(running.database_url, 4),
        timeout=300,
        what="all results delivered",
    )
    with session_scope(running.database_url) as session:
        results = list(session.scalars(select(Result)))
        # one result each
        assert sorted(r.instance_id for r in results) == sorted(states(running.database_url))
        for instance_id in killed:
            assert session.get_one(Instance, instance_id).attempts == attempts
    uids = received_sop_uids(storescp)
    assert len(set(uids)) == 8  # one SR and one SC for each of the 4 images


def test_worker_killed_mid_inference_processes_each_instance_once(
    tmp_path: Path, storescp: StoreSCP, redis_broker: tuple[str, str], nodes: list[Node]
) -> None:
    running = start_with_four_hands(
        tmp_path,
        storescp,
        redis_broker,
        nodes,
        BONEAGE_RECONCILE_INTERVAL_SECONDS="1",
        # one process (solo pool): the whole worker dies, not one prefork child
        BONEAGE_INFERENCE_PROCESSES="1",
    )

    def processing() -> list[int]:
        return [i for i, s in states(running.database_url).items() if s is InstanceState.PROCESSING]

    wait_for(
        processing,
        timeout=180,
        interval=0.02,
        what="an instance being processed",
        process=running.worker,
    )
    running.worker.send_signal(signal.SIGKILL)
    running.worker.wait(30)
    [killed] = processing()  # still `processing`: the worker died in the middle of it

    running.node.start("inference-2", "work", "-Q", "inference")
    assert_each_assessed_once(running, storescp, [killed])


def test_prefork_child_killed_mid_inference_its_image_is_assessed_once(
    tmp_path: Path, storescp: StoreSCP, redis_broker: tuple[str, str], nodes: list[Node]
) -> None:
    # The CPU default: one inference worker with two prefork children. One child dies
    # in the middle of an image; Celery replaces it, the message comes back
    # (reject_on_worker_lost) and the image is assessed once, by another process.
    running = start_with_four_hands(
        tmp_path,
        storescp,
        redis_broker,
        nodes,
        BONEAGE_DEVICE="cpu",
        BONEAGE_INFERENCE_PROCESSES="2",
    )

    [(killed, child), *_] = being_processed(running)
    assert child != running.worker.pid  # a prefork child, not the worker's main process
    os.kill(child, signal.SIGKILL)
    assert_each_assessed_once(running, storescp, [killed])
    assert running.worker.poll() is None  # the worker lives on with a new child


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_prefork_main_process_killed_nothing_lost_or_done_twice(
    tmp_path: Path,
    storescp: StoreSCP,
    broker: str,
    request: pytest.FixtureRequest,
    nodes: list[Node],
) -> None:
    # SIGKILL of the inference worker's main process (an OOM kill, say) while a child is
    # in the middle of an image: the orphaned children finish what they hold or die
    # with it; the messages the main process had reserved are gone with it (Redis would
    # return them only after its visibility timeout, hours later; the embedded broker
    # marks a message taken when it hands it out, and its workers hold one message per
    # child more, here all four), so the reconciler queues those images again once they
    # have waited BONEAGE_REQUEUE_AFTER_SECONDS (here 5 s instead of 300) with the queue
    # empty. Every image is assessed and delivered once, and no orphan stays behind.
    running = start_with_four_hands(
        tmp_path,
        storescp,
        request.getfixturevalue("redis_broker") if broker == "redis" else None,
        nodes,
        BONEAGE_DEVICE="cpu",
        BONEAGE_INFERENCE_PROCESSES="2",
        BONEAGE_RECONCILE_INTERVAL_SECONDS="1",
        BONEAGE_REQUEUE_AFTER_SECONDS="5",
    )

    children = [pid for _, pid in being_processed(running)]
    assert running.worker.pid not in children  # the work happens in prefork children
    running.worker.send_signal(signal.SIGKILL)
    running.worker.wait(30)
    running.node.start("inference-2", "work", "-Q", "inference")
    assert_each_assessed_once(running, storescp)

    def orphans_left() -> bool:
        for pid in children:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        return False

    wait_for(lambda: not orphans_left(), timeout=60, what="the orphaned children to exit")


#: A GPU worker's layout, on the CPU: one process whose task threads share batched
#: forward passes, its images held a second each; the reconciler's rounds a second apart.
BATCHING_ON_THE_CPU = {
    "BONEAGE_DEVICE": "cpu",
    "BONEAGE_INFERENCE_BATCH": "4",
    "BONEAGE_INFERENCE_BATCH_WAIT_MS": "1000",
    "BONEAGE_RECONCILE_INTERVAL_SECONDS": "1",
    "BONEAGE_REQUEUE_AFTER_SECONDS": "5",
}


def test_batching_worker_killed_mid_batch_each_image_assessed_once(
    tmp_path: Path, storescp: StoreSCP, redis_broker: tuple[str, str], nodes: list[Node]
) -> None:
    # A GPU worker's layout, on the CPU: one process whose task threads share batched
    # forward passes. SIGKILL while its threads hold images: those it had claimed are
    # taken back once its heartbeat stops, their attempts not counted (which of them
    # killed it cannot be told: each is assessed alone next), those it had only reserved
    # come back through the reconciler; each is assessed and delivered once by the next
    # worker.
    running = start_with_four_hands(tmp_path, storescp, redis_broker, nodes, **BATCHING_ON_THE_CPU)

    held = being_processed(running)
    assert {pid for _, pid in held} == {running.worker.pid}  # threads of one process
    running.worker.send_signal(signal.SIGKILL)
    running.worker.wait(30)
    running.node.start("inference-2", "work", "-Q", "inference")
    killed = [instance_id for instance_id, _ in held]
    assert_each_assessed_once(running, storescp, killed, attempts=1)
    with session_scope(running.database_url) as session:
        assert all(session.get_one(Instance, i).alone for i in killed)
    uids = received_sop_uids(storescp)
    assert len(uids) == len(set(uids))  # and none sent twice


def _dies(running: Running, worker: subprocess.Popen[bytes], claimed_by: str) -> None:
    """SIGKILL ``worker``, and age its heartbeat as 30 s without one would (the test need
    not wait for them): the reconciler then takes back what it held."""
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    with session_scope(running.database_url) as session:
        beat = session.get_one(Heartbeat, claimed_by)
        beat.seen_at = database_now(session) - 2 * STALE_AFTER


def test_an_image_that_kills_its_batching_worker_each_time_ends_alone_in_error(
    tmp_path: Path, storescp: StoreSCP, redis_broker: tuple[str, str], nodes: list[Node]
) -> None:
    """The first image a batching worker holds kills it, each time (here: the test kills
    the worker whenever it holds that image, as a decoder's crash would). The first
    death counts against none of the images it held; each is then assessed alone. The
    deaths after are that image's own: it ends in error after three, and the three
    others are assessed and delivered once each. Before, all four were queued again
    together, taken together again, and all ended in error after three deaths."""
    running = start_with_four_hands(tmp_path, storescp, redis_broker, nodes, **BATCHING_ON_THE_CPU)
    held = being_processed(running)
    poison = min(instance_id for instance_id, _ in held)
    worker, deaths, alone_then = running.worker, 0, []

    def poison_held_or_ended() -> tuple[InstanceState, str | None, bool] | None:
        with session_scope(running.database_url) as session:
            row = session.get_one(Instance, poison)
            others = session.scalars(
                select(Instance.id).where(
                    Instance.id != poison, Instance.state == InstanceState.PROCESSING
                )
            ).all()
            if row.state is InstanceState.ERROR:
                return row.state, None, False
            held_by = (row.claimed_by or ":").rsplit(":", 1)[1]  # "<role>@<host>/<token>:<pid>"
            if row.state is InstanceState.PROCESSING and held_by == str(worker.pid):
                return row.state, row.claimed_by, not others
        return None

    while True:
        state, claimed_by, alone = wait_for(
            poison_held_or_ended, timeout=180, interval=0.02, what="the image held, or in error"
        )
        if state is InstanceState.ERROR:
            break
        assert claimed_by is not None
        alone_then.append(alone)
        _dies(running, worker, claimed_by)
        deaths += 1
        worker = running.node.start(f"inference-{deaths + 1}", "work", "-Q", "inference")

    assert deaths == 4  # one held beside others, not counted; three alone
    assert alone_then[1:] == [True, True, True]
    wait_for(lambda: len(storescp.received()) == 6, timeout=300, what="the others' SR and SC")
    with session_scope(running.database_url) as session:
        rows = {row.id: row for row in session.scalars(select(Instance))}
        assert (rows[poison].attempts, rows[poison].reason) == (
            3,
            "processing did not complete in 3 attempts; the last: attempt 3" + DIED,
        )
        others = [row for instance_id, row in rows.items() if instance_id != poison]
        assert [(row.state, row.attempts) for row in others] == [(InstanceState.ASSESSED, 1)] * 3
    uids = received_sop_uids(storescp)
    assert len(uids) == len(set(uids)) == 6


def test_broker_outage_keeps_acknowledging_then_catches_up(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, nodes: list[Node]
) -> None:
    redis_server = shutil.which("redis-server")
    assert redis_server is not None, "redis-server is not installed"
    redis_port = free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(redis_port, timeout=30, process=proc)
        return proc

    redis_proc = start_redis()
    port = free_port()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(
        BONEAGE_BROKER_URL=f"redis://127.0.0.1:{redis_port}/0",
        BONEAGE_LOG_LEVEL="INFO",
    )  # the reconciler at its defaults: it would re-queue `received` rows after 5 minutes
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    nodes.append(node)
    listener = node.start("listener", "listen")
    node.start("inference", "work", "-Q", "inference")
    node.start("delivery", "work", "-Q", "delivery")
    wait_for_port(port, timeout=120, process=listener)
    try:
        files = make_hands(tmp_path, env, 3)
        storescu(port, files[0])
        wait_for(lambda: everything_delivered(database_url, 1), timeout=120, what="the first study")

        redis_proc.terminate()
        redis_proc.wait(10)
        wait_for(lambda: not port_open(redis_port), timeout=10, what="Redis down")
        storescu(port, *files[1:])  # acknowledged with Redis down: files and rows are durable
        assert sorted(states(database_url).values()).count(InstanceState.RECEIVED) == 2
        assert listener.poll() is None
        wait_for(
            lambda: "instances stay received and are tried again" in node.log_text(),
            timeout=60,
            what="the enqueuer giving up its first try",
        )

        redis_proc = start_redis()
        # The enqueuer tries again by itself (every 30 s at most): within a minute, not
        # the reconciler's five.
        wait_for(
            lambda: everything_delivered(database_url, 3), timeout=120, what="the backlog processed"
        )
        assert len(set(received_sop_uids(storescp))) == 6
        assert "broker reachable again" in node.log_text()
    finally:
        if redis_proc.poll() is None:
            redis_proc.terminate()
            redis_proc.wait(10)
