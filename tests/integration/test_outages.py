"""Nothing lost: the database down, the destination down, the same study sent twice.

Real processes, a private PostgreSQL cluster for the database outage, dcmtk peers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, Result
from dicom_io.scu import send_files
from tests.conftest import StoreSCP
from tests.integration.test_end_to_end import Node, base_env, cli, storescu
from tests.integration.test_reliability import (
    everything_delivered,
    make_hands,
    received_sop_uids,
)
from tests.support import free_port, port_open, wait_for, wait_for_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port that a test can stop and start.

    PostgreSQL refuses to run as root, so as root the server runs as ``postgres``,
    in a directory outside pytest's root-only temporary tree.
    """

    def __init__(self) -> None:
        bindir = _PG_BIN if _PG_BIN.is_dir() else None
        initdb = shutil.which("initdb", path=str(bindir) if bindir else None)
        if initdb is None:
            pytest.fail("PostgreSQL server binaries (initdb, postgres) are not installed")
        self.bindir = Path(initdb).parent
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="boneage-pg-"))
        if self.user:
            shutil.chown(self.root, self.user, self.user)
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"],
            user=self.user,
            check=True,
            capture_output=True,
            timeout=120,
        )

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for_port(self.port, timeout=60, process=self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # "fast" shutdown: clients cut off
            self.process.wait(60)
        wait_for(lambda: not port_open(self.port), timeout=10, what="PostgreSQL down")

    def create_database(self, name: str) -> None:
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres()
    cluster.start()
    yield cluster
    cluster.remove()


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.stop()


def counts(database_url: str) -> tuple[int, int, int]:
    """(instances, results, deliveries) in the database."""
    with session_scope(database_url) as session:
        return (
            session.scalar(select(func.count()).select_from(Instance)) or 0,
            session.scalar(select(func.count()).select_from(Result)) or 0,
            session.scalar(select(func.count()).select_from(Delivery)) or 0,
        )


def deliveries(database_url: str) -> list[Delivery]:
    with session_scope(database_url) as session:
        rows = list(session.scalars(select(Delivery).order_by(Delivery.id)))
        session.expunge_all()
    return rows


def c_store(port: int, path: Path) -> int:
    """C-STORE one file with a pynetdicom SCU as the PACS; the status it got."""
    [outcome] = send_files(
        [path], ae_title="BONEAGE", host="127.0.0.1", port=port, calling_ae_title="PACS"
    )
    return outcome.status


def test_database_down_refuses_with_a700_then_accepts(
    tmp_path: Path,
    storescp: StoreSCP,
    tiny_checkpoint: Path,
    private_postgres: PrivatePostgres,
    nodes: list[Node],
) -> None:
    private_postgres.create_database("boneage")
    database_url = private_postgres.url("boneage")
    port = free_port()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(BONEAGE_DATABASE_URL=database_url, BONEAGE_LOG_LEVEL="INFO")
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    nodes.append(node)
    listener = node.start("listener", "listen")
    wait_for_port(port, timeout=120, process=listener)
    [hand] = make_hands(tmp_path, env, 1)

    private_postgres.stop()
    # Out of resources: the PACS keeps the image and sends it again later.
    assert c_store(port, hand) == 0xA700
    assert listener.poll() is None

    private_postgres.start()
    assert counts(database_url) == (0, 0, 0)  # nothing was recorded while it was down
    assert c_store(port, hand) == 0x0000
    node.start("inference", "work", "-Q", "inference")
    node.start("delivery", "work", "-Q", "delivery")
    wait_for(lambda: everything_delivered(database_url, 1), timeout=240, what="the study processed")
    assert len(set(received_sop_uids(storescp))) == 2  # its SR and SC
    with session_scope(database_url) as session:
        [row] = session.scalars(select(Instance))
        assert row.state is InstanceState.ASSESSED
        assert row.times_received == 1
    assert "cannot record the instance" in node.log_text()


def test_destination_down_retries_across_a_worker_restart(
    tmp_path: Path, tiny_checkpoint: Path, redis_broker: tuple[str, str], nodes: list[Node]
) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # its port is chosen; nothing listens there yet
    port = free_port()
    env = base_env(tmp_path, pacs, tiny_checkpoint, port)
    env.update(
        BONEAGE_BROKER_URL=redis_broker[0],
        BONEAGE_BROKER_PREFIX=redis_broker[1],
        BONEAGE_DELIVERY_BACKOFF_SECONDS="0.5",
        BONEAGE_DELIVERY_BACKOFF_MAX_SECONDS="2",
        BONEAGE_DELIVERY_MAX_ATTEMPTS="1000",
        BONEAGE_RECONCILE_INTERVAL_SECONDS="1",
        BONEAGE_LOG_LEVEL="INFO",
    )
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    assert cli("db", "upgrade", env=env).returncode == 0
    node = Node(tmp_path, env)
    nodes.append(node)
    listener = node.start("listener", "listen")
    node.start("inference", "work", "-Q", "inference")
    delivery = node.start("delivery-1", "work", "-Q", "delivery")
    wait_for_port(port, timeout=120, process=listener)
    [hand] = make_hands(tmp_path, env, 1)
    storescu(port, hand)

    def retried(at_least: int) -> bool:
        rows = deliveries(database_url)
        return len(rows) == 2 and all(
            d.state is DeliveryState.PENDING and d.attempts >= at_least and d.last_error
            for d in rows
        )

    wait_for(lambda: retried(2), timeout=240, what="deliveries retried", process=delivery)
    delivery.send_signal(signal.SIGTERM)
    assert delivery.wait(60) == 0
    before = max(d.attempts for d in deliveries(database_url))
    delivery = node.start("delivery-2", "work", "-Q", "delivery")
    wait_for(
        lambda: retried(before + 1),
        timeout=120,
        what="the restarted worker retrying",
        process=delivery,
    )

    pacs.start()
    try:
        wait_for(lambda: everything_delivered(database_url, 1), timeout=120, what="both delivered")
        assert len(set(received_sop_uids(pacs))) == 2
    finally:
        pacs.stop()
    assert "next in" in node.log_text()  # each failure scheduled a later attempt


def test_failed_deliveries_show_in_status_and_are_sent_again(
    tmp_path: Path, tiny_checkpoint: Path, nodes: list[Node]
) -> None:
    pacs = StoreSCP(tmp_path / "pacs")
    port = free_port()
    env = base_env(tmp_path, pacs, tiny_checkpoint, port)
    env.update(
        BONEAGE_DELIVERY_BACKOFF_SECONDS="0.2",
        BONEAGE_DELIVERY_MAX_ATTEMPTS="2",
        BONEAGE_LOG_LEVEL="INFO",
    )
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    node = Node(tmp_path, env)
    nodes.append(node)
    serve = node.start("serve", "serve")
    wait_for_port(port, timeout=120, process=serve)
    [hand] = make_hands(tmp_path, env, 1)
    storescu(port, hand)

    def all_failed() -> bool:
        rows = deliveries(database_url)
        return len(rows) == 2 and all(d.state is DeliveryState.FAILED for d in rows)

    wait_for(all_failed, timeout=240, what="deliveries failed", process=serve)
    assert all(d.attempts == 2 for d in deliveries(database_url))
    status = cli("status", "--json", env=env)
    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert report["healthy"] is False
    assert report["deliveries"]["failed"] == 2
    assert any("2 deliveries failed" in p for p in report["problems"])

    pacs.start()
    try:
        again = cli("retry-deliveries", env=env)
        assert again.returncode == 0, again.stderr
        assert "2 failed deliveries queued again" in again.stdout
        wait_for(lambda: everything_delivered(database_url, 1), timeout=120, what="both delivered")
        assert len(set(received_sop_uids(pacs))) == 2
    finally:
        pacs.stop()


def test_same_study_sent_twice_yields_one_result_per_instance(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path, nodes: list[Node]
) -> None:
    port = free_port()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(BONEAGE_LOG_LEVEL="INFO")
    database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
    node = Node(tmp_path, env)
    nodes.append(node)
    serve = node.start("serve", "serve")
    wait_for_port(port, timeout=120, process=serve)
    files = make_hands(tmp_path, env, 3)
    study = dcmread(files[0]).StudyInstanceUID
    for path in files[1:]:  # one study of three instances
        ds = dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path, enforce_file_format=True)

    storescu(port, *files)
    storescu(port, *files)  # a second association with the same instances

    def settled() -> bool:
        with session_scope(database_url) as session:
            rows = list(session.scalars(select(Instance)))
        return (
            len(rows) == 3
            and all(r.times_received == 2 for r in rows)
            and everything_delivered(database_url, 3)
        )

    wait_for(settled, timeout=240, what="both sendings processed", process=serve)

    def queues_empty() -> bool:
        report = json.loads(cli("status", "--json", env=env).stdout)
        return report.get("queues") == {"inference": 0, "delivery": 0}

    # The re-sent instances' messages are consumed (and skipped) before counting.
    wait_for(queues_empty, timeout=120, what="empty queues", process=serve)
    with session_scope(database_url) as session:
        results = list(session.scalars(select(Result)))
        assert sorted(r.instance_id for r in results) == [1, 2, 3]
        per_instance = session.execute(
            select(Delivery.instance_id, func.count()).group_by(Delivery.instance_id)
        ).all()
        assert sorted(per_instance) == [(1, 2), (2, 2), (3, 2)]
    uids = received_sop_uids(storescp)
    assert len(set(uids)) == 6  # one SR and one SC for each instance
