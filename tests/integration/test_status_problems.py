"""`status` says when work ends in error or stops moving, or when the inference workers
run a model whose results are not for clinical use, not only when a process is down.

A node's real database (SQLite), with instances spooled and recorded as the listener
records them; the states an outage or a hung worker leaves are written into the rows,
and the heartbeats of its processes as they write them.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event, insert, select, update

from db.engine import get_engine, session_scope
from db.schema import Delivery, DeliveryState, Heartbeat, Instance, InstanceState
from db.schema import utcnow as now
from tests.conftest import StoreSCP
from tests.integration.test_pipeline import make_runtime, spool_instance
from worker import storage
from worker.cli import main as cli
from worker.cli import reprocess
from worker.delivery import send_deliveries
from worker.pipeline import assess_instance
from worker.runtime import Runtime
from worker.status import collect

pytestmark = pytest.mark.integration


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP) -> Runtime:
    return make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, requeue_after_seconds=60
    )


def _problems(rt: Runtime) -> list[str]:
    report = collect(rt.settings)
    assert report["healthy"] is (not report["problems"])
    return list(report["problems"])


def _stuck(problems: list[str]) -> list[str]:
    return [p for p in problems if "none finished in the last" in p]


def _errors(problems: list[str]) -> list[str]:
    return [p for p in problems if "ended in error in the last hour" in p]


def _undelivered(problems: list[str]) -> list[str]:
    return [p for p in problems if "delivered in the last" in p]


def _models(problems: list[str]) -> list[str]:
    return [p for p in problems if "model" in p]


UNTRAINED = (
    "inference worker(s) run an UNTRAINED model: results are not for clinical use; "
    "set BONEAGE_MODEL"
)


def _beat(rt: Runtime, name: str, **detail: object) -> None:
    """A live inference worker's heartbeat, with what its detail says of its model."""
    with session_scope(rt.database_url) as session:
        session.execute(
            insert(Heartbeat).values(
                name=name,
                role="worker",
                detail={"queues": ["inference"], "device": "cpu", **detail},
                started_at=now(),
                seen_at=now(),
            )
        )


def test_work_that_stops_moving_makes_the_node_unhealthy(runtime: Runtime) -> None:
    waiting = spool_instance(runtime)
    assert _stuck(_problems(runtime)) == []  # just received

    # Queued 10 minutes ago (twice the requeue interval is 2 minutes here), nothing
    # finished since: a worker that hangs still beats its heart, so this is the sign.
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == waiting)
            .values(state=InstanceState.QUEUED, queued_at=now() - dt.timedelta(minutes=10))
        )
    [stuck] = _stuck(_problems(runtime))
    assert stuck.startswith("1 instance(s) wait, the oldest for 10 min, and none finished")
    report = collect(runtime.settings)
    assert report["waiting"]["instances"] == 1
    assert report["waiting"]["last_finished_at"] is None

    # A backlog that moves is not stuck: another instance finished a moment ago.
    assert assess_instance(runtime, spool_instance(runtime, sex="M")).state == "assessed"
    assert _stuck(_problems(runtime)) == []


def test_an_attempt_under_way_for_long_counts_from_its_start(runtime: Runtime) -> None:
    claimed = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == claimed)
            .values(
                state=InstanceState.PROCESSING,
                received_at=now() - dt.timedelta(hours=2),
                queued_at=now() - dt.timedelta(hours=2),
                started_at=now() - dt.timedelta(seconds=30),
            )
        )
    assert _stuck(_problems(runtime)) == []
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == claimed)
            .values(started_at=now() - dt.timedelta(minutes=45))
        )
    [stuck] = _stuck(_problems(runtime))
    assert "the oldest for 45 min" in stuck


def test_instances_ended_in_error_in_the_last_hour_make_the_node_unhealthy(
    runtime: Runtime,
) -> None:
    gone = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        Path(session.get_one(Instance, gone).spool_path).unlink()
    assert assess_instance(runtime, gone).state == "error"
    [error] = _errors(_problems(runtime))
    assert error.startswith("1 instance(s) ended in error in the last hour")
    # reprocess keeps its results unless told to send them: the advice tells it to
    assert "'boneage-worker reprocess --instance ID --send' assesses one again" in error
    assert "--send" in [flag for option in reprocess.params for flag in option.opts]
    assert collect(runtime.settings)["last_hour"]["error"] == 1

    # An hour later it is history: the counts and recent problems still show it.
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == gone)
            .values(finished_at=now() - dt.timedelta(hours=2))
        )
    assert _errors(_problems(runtime)) == []
    report = collect(runtime.settings)
    assert report["instances"]["error"] == 1
    assert any(p["what"] == f"instance {gone}" for p in report["recent_problems"])


def test_status_quiet_prints_only_the_problems(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a container's health check runs: Docker keeps its output, so it holds the
    problems and nothing of the report's recent reasons."""
    gone = spool_instance(runtime)
    with session_scope(runtime.database_url) as session:
        Path(session.get_one(Instance, gone).spool_path).unlink()
    assert assess_instance(runtime, gone).state == "error"
    monkeypatch.setenv("BONEAGE_DATA_DIR", str(runtime.settings.data_dir))
    monkeypatch.setenv("BONEAGE_DESTINATIONS", ",".join(map(str, runtime.settings.destinations)))
    statements: list[str] = []

    def executed(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = get_engine(runtime.database_url)
    event.listen(engine, "before_cursor_execute", executed)
    try:
        quiet = CliRunner().invoke(cli, ["status", "--quiet"])
    finally:
        event.remove(engine, "before_cursor_execute", executed)
    # every minute in each container: no reason of every row read (no index finds them)
    assert statements and not [s for s in statements if " LIKE " in s.upper()], statements
    assert quiet.exit_code == 1
    lines = quiet.output.splitlines()
    assert lines == collect(runtime.settings)["problems"]
    assert any(line.startswith("1 instance(s) ended in error") for line in lines)
    assert "spooled file is missing" not in quiet.output  # a reason, shown by `status` alone
    both = CliRunner().invoke(cli, ["status", "--quiet", "--json"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_inference_workers_on_an_untrained_model_make_the_node_unhealthy(
    runtime: Runtime, tiny_checkpoint: Path
) -> None:
    """The tiny checkpoint's model is a random one: a node whose workers run it, or run
    no checkpoint at all, gives bone ages that mean nothing, and is not healthy, though
    each SR and SC says so."""
    assert runtime.predictor.meta.trained is False
    model = runtime.predictor.model_id
    _beat(runtime, "worker@gpu-1:11", trained=True, model_id=model)
    assert _models(_problems(runtime)) == []
    _beat(runtime, "worker@gpu-2:12", trained=False, model_id=model)
    assert _models(_problems(runtime)) == [UNTRAINED]
    # a worker gone for good no longer counts
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Heartbeat)
            .where(Heartbeat.name == "worker@gpu-2:12")
            .values(seen_at=now() - dt.timedelta(minutes=5))
        )
    assert _models(_problems(runtime)) == []


def test_inference_workers_on_different_models_make_the_node_unhealthy(
    runtime: Runtime,
) -> None:
    """Two workers restarted with different checkpoints (one of them after a new
    BONEAGE_MODEL, the other not): an image's bone age depends on which one takes it."""
    _beat(runtime, "worker@gpu-1:11", trained=True, model_id="a" * 64)
    _beat(runtime, "worker@gpu-2:12", trained=True, model_id="a" * 64)
    assert _models(_problems(runtime)) == []
    _beat(runtime, "worker@gpu-3:13", trained=True, model_id="b" * 64)
    [different] = _models(_problems(runtime))
    assert different.startswith(f"inference workers run different models ({'a' * 12}, {'b' * 12})")


def test_inference_workers_under_different_uid_roots_make_the_node_unhealthy(
    runtime: Runtime,
) -> None:
    """BONEAGE_UID_ROOT is read by each process: two workers with different values make
    new images' UIDs under different roots, which one depending on the worker that
    first assesses an image. A worker of a release before the node's UIDs says no root,
    and is left out."""
    _beat(runtime, "worker@gpu-1:11", uid_root="2.25")
    _beat(runtime, "worker@gpu-2:12", uid_root="2.25")
    _beat(runtime, "worker@gpu-3:13")
    assert _roots(_problems(runtime)) == []
    _beat(runtime, "worker@gpu-4:14", uid_root="1.2.840.99999.7")
    assert _roots(_problems(runtime)) == [
        "inference workers make UIDs under different roots (1.2.840.99999.7, 2.25): the "
        "root of an image's objects depends on which worker assesses it first; give "
        "every process the same BONEAGE_UID_ROOT and restart them"
    ]
    # the worker restarted with the others' value: gone, its heartbeat stale
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Heartbeat)
            .where(Heartbeat.name == "worker@gpu-4:14")
            .values(seen_at=now() - dt.timedelta(minutes=5))
        )
    assert _roots(_problems(runtime)) == []


def _roots(problems: list[str]) -> list[str]:
    return [p for p in problems if "BONEAGE_UID_ROOT" in p]


def test_workers_with_different_destinations_make_the_node_unhealthy(
    runtime: Runtime,
) -> None:
    """A ConfigMap applied and no pod restarted: a worker started since sends to the new
    destination, one started before does not, and each delivery to it failed as
    "destination no longer configured", again after each `retry-deliveries`, while
    `status` said to fix the destination. A worker of a release before says none."""
    _beat(runtime, "worker@infer-1:11", queues=["inference"], destinations=["PACS@10.0.0.3:104"])
    _beat(runtime, "worker@send-1:12", queues=["delivery"], destinations=["PACS@10.0.0.3:104"])
    _beat(runtime, "worker@old-1:13", queues=["delivery"])
    # the host in another case is the same destination, as deliveries take it
    _beat(runtime, "worker@send-3:15", queues=["delivery"], destinations=["PACS@10.0.0.3:104"])
    _beat(runtime, "worker@send-4:16", queues=["delivery"], destinations=["PACS@Pacs.Local:104"])
    _beat(runtime, "worker@send-5:17", queues=["delivery"], destinations=["PACS@pacs.local:104"])
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Heartbeat)
            .where(Heartbeat.name.in_(["worker@send-4:16", "worker@send-5:17"]))
            .values(seen_at=now() - dt.timedelta(minutes=5))
        )
    assert _destinations(_problems(runtime)) == []
    _beat(runtime, "worker@send-2:14", queues=["delivery"], destinations=["PACS@10.0.0.2:104"])
    assert _destinations(_problems(runtime)) == [
        "workers have different BONEAGE_DESTINATIONS (PACS@10.0.0.2:104; PACS@10.0.0.3:104): "
        "an image's results go, or fail, by the workers that take them; give every process "
        "the same and restart them"
    ]
    with session_scope(runtime.database_url) as session:  # restarted with the others'
        session.execute(
            update(Heartbeat)
            .where(Heartbeat.name == "worker@send-2:14")
            .values(seen_at=now() - dt.timedelta(minutes=5))
        )
    assert _destinations(_problems(runtime)) == []


def _destinations(problems: list[str]) -> list[str]:
    return [p for p in problems if "BONEAGE_DESTINATIONS" in p]


def test_deliveries_that_no_worker_takes_make_the_node_unhealthy(
    runtime: Runtime, storescp: StoreSCP
) -> None:
    """A delivery worker that hangs (or consumes another broker) leaves the SR and SC
    pending, never attempted: results stop reaching the PACS, and `status` says so once
    they are overdue for twice the requeue interval (2 minutes here) with nothing
    delivered meanwhile."""
    outcome = assess_instance(runtime, spool_instance(runtime))
    ids = list(outcome.delivery_ids)
    assert len(ids) == 2 and _undelivered(_problems(runtime)) == []  # just made

    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(next_attempt_at=now() - dt.timedelta(minutes=10))
        )
    [stuck] = _undelivered(_problems(runtime))
    assert stuck.startswith("2 deliveries are due, the longest for 10 min, and none was")
    assert "is a delivery worker hanging" in stuck
    assert collect(runtime.settings)["overdue_deliveries"]["deliveries"] == 2

    # one retried later (its attempt failed, the PACS down) is not overdue: it waits
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[0])
            .values(attempts=1, next_attempt_at=now() + dt.timedelta(minutes=1))
        )
    [stuck] = _undelivered(_problems(runtime))
    assert stuck.startswith("1 deliveries are due, the longest for 10 min")

    # Deliveries that move are not stuck: the other one was just delivered.
    assert send_deliveries(runtime, [ids[1]])[ids[1]].state == "delivered"
    with session_scope(runtime.database_url) as session:
        states = {i: state for i, state in session.execute(select(Delivery.id, Delivery.state))}
    assert states == {ids[0]: DeliveryState.PENDING, ids[1]: DeliveryState.DELIVERED}
    with session_scope(runtime.database_url) as session:
        session.execute(
            update(Delivery)
            .where(Delivery.id == ids[0])
            .values(next_attempt_at=now() - dt.timedelta(minutes=10))
        )
    assert _undelivered(_problems(runtime)) == []


def test_status_says_when_the_listener_refuses_images_for_its_reserve(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP
) -> None:
    """Past the reserve (here: a reserve a terabyte more than the disk has free) every
    image is refused, whatever the share of the disk that is free: said as such."""
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    rt = make_runtime(
        tmp_path,
        tiny_checkpoint,
        destinations=storescp.destination,
        min_free_mb=(free >> 20) + (1 << 20),
    )
    rt.settings.spool_dir.mkdir(parents=True, exist_ok=True)
    [refusing] = [p for p in _problems(rt) if "BONEAGE_MIN_FREE_MB" in p]
    assert "MiB the listener keeps (BONEAGE_MIN_FREE_MB): it refuses every image now" in (refusing)
    rt = make_runtime(tmp_path, tiny_checkpoint, destinations=storescp.destination)
    assert not [p for p in _problems(rt) if "refuses every image now" in p]


def test_one_disk_past_the_reserve_is_said_once_though_read_apart(
    tmp_path: Path, tiny_checkpoint: Path, storescp: StoreSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool and the data directory on one disk, low and past the reserve: one
    line, though the listener wrote between the two reads of its free bytes (before,
    two differing readings of one disk were taken for two disks, and said twice)."""
    real = shutil.disk_usage
    written = iter(range(0, 1 << 30, 1 << 20))  # a megabyte more before each read

    def disk_usage(path: str | os.PathLike[str]) -> Any:
        usage = real(path)  # 1 GiB free, low, less a megabyte at each read
        return usage._replace(free=(1 << 30) - next(written))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    rt = make_runtime(
        tmp_path, tiny_checkpoint, destinations=storescp.destination, min_free_mb=2048
    )
    rt.settings.spool_dir.mkdir(parents=True, exist_ok=True)
    space, spool = storage.disk_space(rt.settings.data_dir), storage.disk_space(tmp_path)
    assert space is not None and spool is not None and space.low and space != spool
    disk = [p for p in _problems(rt) if "BONEAGE_MIN_FREE_MB" in p]
    assert len(disk) == 1 and "it refuses every image now" in disk[0], disk
