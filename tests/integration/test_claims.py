"""Claims on instances: a dead worker's are taken back even when its successor has its
host name and process id; a live worker's never are, even when it claims the instance
the moment the reconciler publishes it."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from sqlalchemy import select, update

from db.engine import session_scope, upgrade
from db.schema import Heartbeat, Instance, InstanceState
from db.schema import utcnow as now
from tests.support import a_listener_writing_for_a_while, received
from worker.heartbeat import STALE_AFTER, HeartbeatThread, process_name
from worker.listener import record_instance
from worker.reconciler import reconcile
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    database_url = (
        request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    )
    loaded = load_settings(data_dir=tmp_path / "data", database_url=database_url)
    upgrade(loaded.effective_database_url)
    return loaded


def _claim(database_url: str, instance_id: int, worker: str | None) -> None:
    """Claim the instance as `worker.pipeline` does, for ``worker``."""
    with session_scope(database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(
                state=InstanceState.PROCESSING,
                claimed_by=worker,
                started_at=now(),
                attempts=Instance.attempts + 1,
            )
        )


def _claimed(database_url: str, instance_id: int) -> tuple[InstanceState, str | None]:
    with session_scope(database_url) as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        return instance.state, instance.claimed_by


# -- a worker that claims what the reconciler publishes, at once ---------------------------


def test_an_instance_claimed_as_soon_as_it_is_published_keeps_its_claim(
    settings: Settings,
) -> None:
    url = settings.effective_database_url
    instance_id = record_instance(url, received())
    _claim(url, instance_id, "worker@gone/00000000:7")  # a worker that died with it
    HeartbeatThread(url, "worker").beat()  # this process: the live worker that takes it
    claimer = process_name("worker")

    def publish_and_claim(published: int) -> None:
        # the embedded broker wakes a waiting worker with the publish: it may claim the
        # instance before the publisher's next statement
        _claim(url, published, claimer)

    report = reconcile(
        Runtime(settings), publish_and_claim, lambda _: None, inference_queue_empty=True
    )
    assert report.instances == [instance_id]
    assert _claimed(url, instance_id) == (InstanceState.PROCESSING, claimer)


def test_an_instance_the_reconciler_could_not_publish_is_queued_by_its_next_round(
    settings: Settings,
) -> None:
    url = settings.effective_database_url
    instance_id = record_instance(url, received())
    _claim(url, instance_id, "worker@gone/00000000:7")
    with session_scope(url) as session:  # received long ago
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(received_at=now() - 10 * STALE_AFTER)
        )
    rt = Runtime(settings)

    def broker_down(_: int) -> None:
        raise ConnectionError("broker away")

    # the broker away: its queue's depth unknown, so `queued` rows may have a message
    assert reconcile(rt, broker_down, lambda _: None, inference_queue_empty=False).instances == []
    # not `queued`, which nothing published: `received`, as the listener leaves it
    assert _claimed(url, instance_id) == (InstanceState.RECEIVED, None)
    queued: list[int] = []
    reconcile(rt, queued.append, lambda _: None, inference_queue_empty=False)
    assert queued == [instance_id]
    assert _claimed(url, instance_id) == (InstanceState.QUEUED, None)


# -- a worker's name is its process's lifetime's ----------------------------------------------

_CONTAINER = """
import sys
from db.schema import Instance, InstanceState
from db.schema import utcnow
from db.engine import session_scope
from sqlalchemy import update
from worker.heartbeat import HeartbeatThread, process_name

url, instance_id = sys.argv[1], int(sys.argv[2])
HeartbeatThread(url, "worker").beat()
if instance_id:
    with session_scope(url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(
                state=InstanceState.PROCESSING,
                claimed_by=process_name("worker"),
                started_at=utcnow(),
                attempts=1,
            )
        )
print(process_name("worker"))
"""


def _unshare_works() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _in_a_new_container(database_url: str, instance_id: int = 0) -> str:
    """Run `_CONTAINER` as the first process of a PID namespace of its own, as a restarted
    container's is (on the same host name): its heartbeat, its claim of ``instance_id``
    (if not 0); returns its process's name."""
    command = ["unshare", "--pid", "--fork", sys.executable, "-c", _CONTAINER]
    done = subprocess.run(
        [*command, database_url, str(instance_id)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not _unshare_works(), reason="needs PID namespaces (unshare --pid)")
def test_a_restarted_containers_worker_does_not_keep_its_predecessors_claims(
    tmp_path: Path,
) -> None:
    settings = load_settings(data_dir=tmp_path / "data")
    url = settings.effective_database_url
    upgrade(url)
    instance_id = record_instance(url, received())

    before = _in_a_new_container(url, instance_id)  # claims it, then is killed
    with session_scope(url) as session:  # its heartbeat stops: stale by now
        beat = session.get(Heartbeat, before)
        assert beat is not None
        beat.seen_at -= 2 * STALE_AFTER
    after = _in_a_new_container(url)  # the container restarted: a new worker beats
    a_listener_writing_for_a_while(url)  # and the listener, which reconciles, went on

    queued: list[int] = []
    reconcile(Runtime(settings), queued.append, lambda _: None, inference_queue_empty=True)
    assert queued == [instance_id]  # not left to the 30 min lease
    # the same host name and process id (1, each the first of its namespace) ...
    assert before.rsplit(":", 1)[1] == after.rsplit(":", 1)[1] == "1"
    assert before.split("/")[0] == after.split("/")[0]
    # ... but another process, another name
    assert before != after
    with session_scope(url) as session:
        names = set(session.scalars(select(Heartbeat.name).where(Heartbeat.role == "worker")))
        assert names == {before, after}


def _name_in_child(pipe: Connection) -> None:
    pipe.send(process_name("worker"))


def test_a_forked_process_draws_a_name_of_its_own() -> None:
    # a prefork pool's child replaced after its predecessor died may get its process id
    # once the ids wrap: the name must still differ
    parent = process_name("worker")
    mine, theirs = multiprocessing.get_context("fork").Pipe()
    child = multiprocessing.get_context("fork").Process(target=_name_in_child, args=(theirs,))
    child.start()
    try:
        named = mine.recv()
    finally:
        child.join(30)
    token = named.rsplit(":", 1)[0].rsplit("/", 1)[1]
    assert token != parent.rsplit(":", 1)[0].rsplit("/", 1)[1]
    assert named.startswith(parent.split("/")[0] + "/")
    assert named.endswith(f":{child.pid}")
    assert process_name("worker") == parent  # drawn once per process: the same each time
