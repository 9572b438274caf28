"""Claims on instances: a live worker's are never taken back, even when it claims the
instance the moment the reconciler publishes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from db.engine import session_scope, upgrade
from db.schema import Instance, InstanceState
from db.schema import utcnow as now
from tests.support import received
from worker.heartbeat import STALE_AFTER, HeartbeatThread, process_name
from worker.listener import record_instance
from worker.reconciler import reconcile
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration


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
