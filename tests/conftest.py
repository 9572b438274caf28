"""Shared fixtures: real PostgreSQL, real Redis, dcmtk peers, free ports."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from tests.proxy import TcpProxy
from tests.support import (
    dcmtk_tool,
    free_port,
    keep_process_log,
    process_logs_since,
    wait_for,
    wait_for_port,
)

POSTGRES_ADMIN_URL = os.environ.get(
    "BONEAGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BONEAGE_TEST_REDIS", "redis://127.0.0.1:6379/0")


def sessions_waiting_on_a_lock(postgres_url: str) -> int:
    """Sessions of the PostgreSQL database of ``postgres_url`` that wait on a lock now:
    how a test sees one transaction truly held up by another."""
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        waiting = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (postgres_url.rsplit("/", 1)[1],),
        ).fetchone()
    return int(waiting[0]) if waiting else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with the logs its processes wrote meanwhile.

    CI keeps only the report: without them a timeout in a multi-process test says
    what was awaited, never why it did not come.
    """
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and call.when in ("setup", "call"):
        for path, tail in process_logs_since(call.start):
            name = "/".join(path.parts[-3:])
            report.sections.append((f"end of {name}", tail))


def _require_tool(name: str) -> str:
    try:
        return dcmtk_tool(name)
    except AssertionError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def postgres_server() -> str:
    import psycopg

    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    return POSTGRES_ADMIN_URL


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import psycopg

    name = f"boneage_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = postgres_server.rsplit("/", 1)[0]
    yield f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    from db import engine as db_engine

    for url, (eng, _) in list(db_engine._engines.items()):
        if url.endswith(f"/{name}"):
            eng.dispose()
            del db_engine._engines[url]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_broker() -> Iterator[tuple[str, str]]:
    """(broker URL, key prefix) on the real Redis; the prefix isolates this test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc}")
    prefix = f"boneage-test-{uuid.uuid4().hex[:10]}:"
    yield REDIS_URL, prefix
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture
def proxied_redis(
    redis_broker: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TcpProxy, str, str]]:
    """(proxy, broker URL through the proxy, key prefix) on the real Redis, behind a real
    TCP proxy that a test can make stop forwarding (half-open, `tests.proxy.TcpProxy`)."""
    from urllib.parse import urlparse

    from worker.celery_app import app

    url, prefix = redis_broker
    parsed = urlparse(url)
    proxy = TcpProxy(parsed.port or 6379, parsed.hostname or "127.0.0.1")
    # the app's connection pools, made for an earlier test's broker, are made again
    monkeypatch.setattr(app, "_pool", None)
    monkeypatch.setattr(app.amqp, "_producer_pool", None)
    try:
        yield proxy, f"redis://127.0.0.1:{proxy.port}{parsed.path}", prefix
    finally:
        if app._pool is not None:
            app._pool.force_close_all()
        proxy.close()


@pytest.fixture(scope="session")
def dcmtk() -> dict[str, str]:
    return {name: _require_tool(name) for name in ("storescu", "storescp", "dsrdump", "dcmj2pnm")}


@pytest.fixture(scope="session")
def dciodvfy() -> str:
    return _require_tool("dciodvfy")


class StoreSCP:
    """dcmtk's storescp on a free port, writing what it receives to a folder."""

    def __init__(self, folder: Path, ae_title: str = "PACS", options: Sequence[str] = ()) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.options = tuple(options)  # more storescp options, e.g. --config-file
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """storescp's verbose log (one "Association Acknowledged" line per association)."""
        return self.folder.with_name(f"{self.folder.name}-storescp.log")

    def associations(self) -> int:
        """Associations storescp accepted so far, over all its starts (not bare connects)."""
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count("Association Acknowledged")

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        keep_process_log(self.log)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    dcmtk_tool("storescp"),
                    "--verbose",
                    "--aetitle",
                    self.ae_title,
                    "--output-directory",
                    str(self.folder),
                    *(self.options or ("--accept-all",)),
                    "--sort-on-study-uid",
                    "st",
                    str(self.port),
                ],
                stdout=log,
                stderr=log,
            )
        wait_for_port(self.port, timeout=20, process=self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def received(self) -> list[Path]:
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def wait_for_objects(self, count: int, timeout: float) -> list[Path]:
        """Wait until ``count`` complete objects arrived (storescp writes in place)."""

        def complete() -> list[Path] | None:
            files = self.received()
            if len(files) < count:
                return None
            try:
                for path in files:
                    dcmread(path)
            except (InvalidDicomError, EOFError, OSError, ValueError):
                return None
            return files

        return wait_for(complete, timeout=timeout, what=f"{count} objects at {self.ae_title}")


@pytest.fixture
def storescp(tmp_path: Path, dcmtk: dict[str, str]) -> Iterator[StoreSCP]:
    peer = StoreSCP(tmp_path / "pacs").start()
    yield peer
    peer.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model (resnet18, 128 px, random weights) saved as a real checkpoint."""
    from models.checkpoint import save_checkpoint, untrained_model

    loaded = untrained_model(arch="resnet18", input_size=128, seed=1)
    path = tmp_path_factory.mktemp("model") / "tiny-resnet18.safetensors"
    save_checkpoint(path, loaded.model, loaded.meta)
    return path


@pytest.fixture(autouse=True)
def _sqlite_engines_disposed() -> Iterator[None]:
    """Dispose of the SQLite engines a test made (one per temporary database): their
    pooled connections hold file descriptors (the database, its -wal and -shm) for the
    rest of the run. A suite of tests that each make one held hundreds, and pynetdicom
    waits on its sockets with select(), which cannot take a descriptor past 1023."""
    from db import engine as db_engine

    before = set(db_engine._engines)
    yield
    for url in set(db_engine._engines) - before:
        if url.startswith("sqlite"):
            eng, _ = db_engine._engines.pop(url)
            eng.dispose()
