"""What `status` (and the metrics) say of deliveries: every failed one with its error,
and a latency from reception to delivery that our rejection notes do not distort.

A node's real database (SQLite), with instances spooled and recorded as the listener
records them; the deliveries' states, times and errors are written into their rows as
the delivery worker leaves them.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import insert, update

from db import queries
from db.engine import session_scope
from db.schema import Delivery, DeliveryState, Instance, InstanceState, ObjectKind
from db.schema import utcnow as now
from tests.integration.test_delivery_destinations import retry_deliveries
from tests.integration.test_pipeline import make_runtime, spool_instance
from worker.delivery import NOT_CONFIGURED, DeliveryOutcome, retry_failed, send_deliveries
from worker.runtime import Runtime
from worker.status import collect, render

pytestmark = pytest.mark.integration

DESTINATION = "PACS@127.0.0.1:104"  # never reached: nothing here is sent


@pytest.fixture
def runtime(tmp_path: Path, tiny_checkpoint: Path) -> Runtime:
    # the default back-off (30 s, doubling, at most an hour) and attempts (31)
    return make_runtime(tmp_path, tiny_checkpoint, destinations=DESTINATION)


def _instance(rt: Runtime, state: InstanceState, finished: dt.datetime, **values: Any) -> int:
    """An instance recorded as received, left in ``state``."""
    instance_id = spool_instance(rt)
    with session_scope(rt.database_url) as session:
        session.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(state=state, finished_at=finished, **values)
        )
    return instance_id


def _delivery(rt: Runtime, instance_id: int, uid: str, **values: Any) -> int:
    row = {
        "instance_id": instance_id,
        "kind": ObjectKind.SR,
        "destination": DESTINATION,
        "sop_instance_uid": uid,
        "path": f"/nonexistent/{uid}.dcm",
        **values,
    }
    with session_scope(rt.database_url) as session:
        return int(
            session.execute(insert(Delivery).values(row).returning(Delivery.id)).scalar_one()
        )


def _shown(report: dict[str, Any]) -> str:
    console = Console(record=True, width=240, color_system=None)
    render(report, console)
    return console.export_text()


def test_failed_deliveries_are_listed_with_their_errors_whatever_else_went_wrong(
    runtime: Runtime,
) -> None:
    """Chest films forwarded by mistake (not assessed) once pushed a failed delivery, and
    its error, out of the few recent problems shown. Each failed delivery is listed, the
    one whose last attempt came last first: dated at the earliest that attempt can have
    begun, reckoned from its creation and the back-off before each attempt, or from the
    mark of a C-STORE never answered, where that is later."""
    current = now()
    # retried for a day, since 25 hours ago: its 31st attempt was about an hour ago
    day_long = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=25)),
        "9.9.1",
        state=DeliveryState.FAILED,
        attempts=31,
        last_error="association rejected by PACS (calling AE not known)",
        created_at=current - dt.timedelta(hours=25),
    )
    # refused for good at its first attempt, two hours ago
    refused = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=2)),
        "9.9.2",
        state=DeliveryState.FAILED,
        attempts=1,
        last_error="PACS answered status 0xA900 (a refusal: not sent again)",
        created_at=current - dt.timedelta(hours=2),
    )
    # its last C-STORE, begun 20 minutes ago, was never answered: the row says when
    unanswered = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=30)),
        "9.9.3",
        state=DeliveryState.FAILED,
        attempts=31,
        last_error="no answer to the C-STORE within 30 s",
        created_at=current - dt.timedelta(hours=30),
        sending_since=current - dt.timedelta(minutes=20),
    )
    for hours in range(1, 7):  # six chest films in the last hours
        _instance(
            runtime,
            InstanceState.NOT_ASSESSED,
            current - dt.timedelta(minutes=30 * hours),
            reason="body part is CHEST, not a hand",
        )

    report = collect(runtime.settings)
    failed = report["failed_deliveries"]
    assert [d["id"] for d in failed] == [unanswered, day_long, refused]
    assert [d["last_attempt_reckoned"] for d in failed] == [True] * 3
    assert failed[0]["last_attempt_at"] == (current - dt.timedelta(minutes=20)).isoformat(
        timespec="seconds"
    )
    # 30 + 60 + ... + 1920 s, then 23 hours at the cap of an hour: 24 h 3 min 30 s
    reckoned = dt.datetime.fromisoformat(failed[1]["last_attempt_at"])
    expected = current - dt.timedelta(hours=25) + dt.timedelta(hours=24, seconds=210)
    assert abs(reckoned - expected) <= dt.timedelta(seconds=1)
    assert failed[1]["error"] == "association rejected by PACS (calling AE not known)"
    assert {d["kind"] for d in failed} == {"sr"} and failed[2]["attempts"] == 1
    # what `status --json` prints, and the problem line a health check prints
    printed = json.dumps(report, default=str)
    assert "association rejected by PACS" in printed and "0xA900" in printed
    assert (
        "3 deliveries failed: fix the destination, then run 'boneage-worker "
        "retry-deliveries'; latest error: no answer to the C-STORE within 30 s"
    ) in report["problems"]
    # the recent problems are the instances'
    assert len(report["recent_problems"]) == 5
    assert all(p["what"].startswith("instance ") for p in report["recent_problems"])

    shown = _shown(report)
    assert "failed deliveries" in shown
    for d in failed:
        assert f"delivery {d['id']} (sr to {DESTINATION})" in shown
        assert d["error"] in shown
    for d in failed:  # reckoned, not recorded
        assert f"≈ {d['last_attempt_at']}" in shown


def test_our_rejection_notes_do_not_count_as_deliveries_of_their_images(
    runtime: Runtime,
) -> None:
    """The PACS rejects an image a month after it came: our note that withdraws its SR
    goes now. It is no delivery of the image's result, and a month of latency in the
    last hour's figures (status, boneage_received_to_delivered_seconds) would hide the
    seconds the images of the hour took."""
    current = now()
    month_ago = current - dt.timedelta(days=30)
    rejected = _instance(
        runtime, InstanceState.REJECTED, month_ago, received_at=month_ago - dt.timedelta(seconds=9)
    )
    _delivery(
        runtime,
        rejected,
        "9.9.40",
        state=DeliveryState.DELIVERED,
        attempts=1,
        created_at=month_ago,
        delivered_at=month_ago,
    )
    _delivery(
        runtime,
        rejected,
        "9.9.41",
        kind=ObjectKind.KO,
        withdraws="9.9.40",
        state=DeliveryState.DELIVERED,
        attempts=1,
        created_at=current - dt.timedelta(minutes=6),
        delivered_at=current - dt.timedelta(minutes=5),
    )
    for minutes in (20, 21, 22):  # three images of the hour, each delivered in 8 s
        received = current - dt.timedelta(minutes=minutes)
        image = _instance(
            runtime,
            InstanceState.ASSESSED,
            received + dt.timedelta(seconds=4),
            received_at=received,
        )
        _delivery(
            runtime,
            image,
            f"9.9.5{minutes}",
            state=DeliveryState.DELIVERED,
            attempts=1,
            created_at=received + dt.timedelta(seconds=4),
            delivered_at=received + dt.timedelta(seconds=8),
        )

    hour_ago = current - dt.timedelta(hours=1)
    with session_scope(runtime.database_url) as session:
        assert sorted(queries.latencies_since(session, hour_ago).to_delivered) == [8.0] * 3
        hour = queries.last_hour(session, current)
    assert (hour["delivered_p50_s"], hour["delivered_p95_s"]) == (8.0, 8.0)


def test_failed_deliveries_whose_files_are_gone_are_not_said_to_be_redirected(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Two SRs failed to a destination taken out of the settings; retention removed the
    files of one's image. `retry-deliveries` sends the other to the configured
    destination and leaves that one failed: `status` says so of each, before and after
    (it said both would go)."""
    old = "OLD@127.0.0.1:104"
    current = now()
    kept_file = tmp_path / "outbox" / "9.9.60.dcm"
    kept_file.parent.mkdir()
    kept_file.write_bytes(b"an SR of ours")
    kept = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=2)),
        "9.9.60",
        destination=old,
        path=str(kept_file),
        state=DeliveryState.FAILED,
        attempts=1,
        last_error=NOT_CONFIGURED,
        created_at=current - dt.timedelta(hours=2),
    )
    gone = _delivery(
        runtime,
        _instance(
            runtime,
            InstanceState.ASSESSED,
            current - dt.timedelta(days=40),
            files_removed_at=current - dt.timedelta(days=9),
        ),
        "9.9.61",  # its path names no file
        destination=old,
        state=DeliveryState.FAILED,
        attempts=1,
        last_error=NOT_CONFIGURED,
        created_at=current - dt.timedelta(days=40),
    )
    retry = "'boneage-worker retry-deliveries'"
    unsendable = (
        f"nothing can send {{}}, and {retry} leaves them failed; their results are in the "
        "database only, and 'boneage-worker abandon-deliveries' closes them"
    )

    report = collect(runtime.settings)

    problem = (
        f"2 deliveries failed to destinations no longer configured ({old}): {retry} sends "
        "them to the configured destinations instead, all but 1 whose files are gone: 1 "
        f"removed by retention: {unsendable.format('those')}; latest error: {NOT_CONFIGURED}"
    )
    assert [p for p in report["problems"] if "deliveries failed" in p] == [problem]
    assert problem in _shown_wide(report)

    # as it says: the one with its file goes to the configured destination, not the other
    retried = retry_failed(runtime)
    assert (list(retried.redirected), retried.no_file) == ([kept], [gone])
    [new] = retried.redirected[kept]
    with session_scope(runtime.database_url) as session:
        assert (session.get_one(Delivery, new).state, session.get_one(Delivery, gone).state) == (
            DeliveryState.PENDING,
            DeliveryState.FAILED,
        )

    problem = (
        f"1 deliveries failed to destinations no longer configured ({old}): their files are "
        f"gone (retention removed them): {unsendable.format('them')}; latest error: "
        f"{NOT_CONFIGURED}"
    )
    report = collect(runtime.settings)
    assert [p for p in report["problems"] if "deliveries failed" in p] == [problem]
    assert problem in _shown_wide(report)
    assert retry_failed(runtime).no_file == [gone]  # and so it stays


def _shown_wide(report: dict[str, Any]) -> str:
    """``report`` as `status` shows it, on a screen wide enough for a problem's line."""
    console = Console(record=True, width=1000, color_system=None)
    render(report, console)
    return console.export_text()


def test_a_failed_delivery_is_dated_by_its_last_attempt_not_an_earlier_unanswered_one(
    runtime: Runtime,
) -> None:
    """An SR's C-STORE went unanswered two days ago (the destination may have stored it),
    and its attempts ran out. Today `retry-deliveries` put it back, and its attempt
    failed at once, sending nothing (its outbox file is missing): the row keeps the mark
    of the unanswered send. Another SR was refused an hour ago. `status` lists the first
    first, its last attempt today, and its error as the latest. Before, the mark two
    days old was taken as the time of its last attempt, exact: it was listed last, and
    the latest error was the other's."""
    current = now()
    unanswered = current - dt.timedelta(days=2)
    put_back = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(days=3)),
        "9.9.70",
        path=str(runtime.settings.data_dir / "9.9.70.dcm"),  # no file, in a folder that is
        state=DeliveryState.FAILED,
        attempts=31,
        last_error="no answer to the C-STORE within 30 s",
        created_at=current - dt.timedelta(days=3),
        sending_since=unanswered,
    )
    refused = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=1)),
        "9.9.71",
        state=DeliveryState.FAILED,
        attempts=1,
        last_error="PACS answered status 0xA900 (a refusal: not sent again)",
        created_at=current - dt.timedelta(hours=1),
    )
    missing = "the outbox file is missing"
    assert retry_failed(runtime, [put_back]).reset == [put_back]
    assert send_deliveries(runtime, [put_back]) == {
        put_back: DeliveryOutcome("failed", error=missing)
    }
    done = now()
    with session_scope(runtime.database_url) as session:
        assert session.get_one(Delivery, put_back).sending_since == unanswered  # kept

    report = collect(runtime.settings)

    failed = report["failed_deliveries"]
    assert [(d["id"], d["error"]) for d in failed] == [
        (put_back, missing),
        (refused, "PACS answered status 0xA900 (a refusal: not sent again)"),
    ]
    last = dt.datetime.fromisoformat(failed[0]["last_attempt_at"])
    assert current - dt.timedelta(seconds=1) <= last <= done  # today, not two days ago
    assert [d["last_attempt_reckoned"] for d in failed] == [True, True]
    assert (
        "2 deliveries failed: fix the destination, then run 'boneage-worker "
        f"retry-deliveries'; latest error: {missing}"
    ) in report["problems"]
    assert f"≈ {failed[0]['last_attempt_at']}" in _shown(report)


def test_failed_deliveries_whose_files_are_not_there_are_not_said_removed_by_retention(
    runtime: Runtime, tmp_path: Path
) -> None:
    """Three SRs failed to a destination taken out of the settings. One has its file;
    retention removed another's; the third's file is not where it was written, and
    retention removed nothing of its image (an outbox volume not mounted, say). `status`
    and `retry-deliveries` say that nothing can send the one retention removed, and that
    the third goes once the outbox is back where it was written. Before, they blamed
    retention for every file not there, then said nothing could send the third either:
    an operator told so left a result that could still be sent unsent."""
    old = "OLD@127.0.0.1:104"
    current = now()
    kept_file = tmp_path / "outbox" / "9.9.80.dcm"
    kept_file.parent.mkdir()
    kept_file.write_bytes(b"an SR of ours")
    failed = {
        "destination": old,
        "state": DeliveryState.FAILED,
        "attempts": 1,
        "last_error": NOT_CONFIGURED,
    }
    kept = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=3)),
        "9.9.80",
        path=str(kept_file),
        created_at=current - dt.timedelta(hours=3),
        **failed,
    )
    removed = _delivery(
        runtime,
        _instance(
            runtime,
            InstanceState.ASSESSED,
            current - dt.timedelta(days=40),
            files_removed_at=current - dt.timedelta(days=9),
        ),
        "9.9.81",
        created_at=current - dt.timedelta(days=40),
        **failed,
    )
    not_there = _delivery(
        runtime,
        _instance(runtime, InstanceState.ASSESSED, current - dt.timedelta(hours=2)),
        "9.9.82",
        created_at=current - dt.timedelta(hours=2),
        **failed,
    )
    retry = "'boneage-worker retry-deliveries'"
    put_back = f"put the outbox back where it was written (BONEAGE_DATA_DIR), then run {retry}"
    unsendable = (
        f"nothing can send those, and {retry} leaves them failed; their results are in the "
        "database only, and 'boneage-worker abandon-deliveries' closes them"
    )

    problem = (
        f"3 deliveries failed to destinations no longer configured ({old}): {retry} sends "
        "them to the configured destinations instead, all but 2 whose files are gone: 1 not "
        f"found where they were written: {put_back}; 1 removed by retention: {unsendable}; "
        f"latest error: {NOT_CONFIGURED}"
    )
    assert [p for p in collect(runtime.settings)["problems"] if "deliveries failed" in p] == [
        problem
    ]

    printed = retry_deliveries(runtime, DESTINATION).splitlines()

    assert printed == [
        "0 failed deliveries queued again",
        "1 failed deliveries to destinations no longer configured sent to the configured "
        f"destinations instead: 1 deliveries queued to {DESTINATION}",
        "1 failed deliveries left failed, their destinations no longer configured: their "
        "files are gone (retention removed them): nothing can send them; close them with "
        f"'boneage-worker abandon-deliveries --reason TEXT {removed}'",
        "1 failed deliveries left failed, their destinations no longer configured: their "
        f"files are not found where they were written: {put_back} again",
    ]
    with session_scope(runtime.database_url) as session:
        states = {i: session.get_one(Delivery, i).state for i in (kept, removed, not_there)}
    assert states == {
        kept: DeliveryState.SUPERSEDED,
        removed: DeliveryState.FAILED,
        not_there: DeliveryState.FAILED,
    }
    problem = (
        f"2 deliveries failed to destinations no longer configured ({old}): their files are "
        f"gone: 1 not found where they were written: {put_back}; 1 removed by retention: "
        f"{unsendable}; latest error: {NOT_CONFIGURED}"
    )
    assert [p for p in collect(runtime.settings)["problems"] if "deliveries failed" in p] == [
        problem
    ]
    # the one not there alone: retention not named at all
    alone = retry_failed(runtime, [not_there])
    assert (alone.no_file, alone.removed, alone.missing) == ([not_there], [], [not_there])
