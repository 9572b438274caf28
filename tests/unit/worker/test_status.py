"""worker.status.render: what an administrator reads on one screen."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from tests.support import free_port
from worker.status import render

#: The listener's port and a destination's, as a node would report them (none is opened).
PORT, PACS_PORT = free_port(), free_port()


def _report(**changes: Any) -> dict[str, Any]:
    """A healthy node's report, as `status --json` prints it."""
    report: dict[str, Any] = {
        "time": "2026-12-05T15:30:00+00:00",
        "ae_title": "BONEAGE",
        "port": PORT,
        "destinations": [f"PACS@10.0.0.5:{PACS_PORT}"],
        "problems": [],
        "healthy": True,
        "database": "ok",
        "broker": "ok",
        "queues": {"inference": 0, "delivery": 0},
        "processes": [
            {
                "name": "listener@node:101",
                "role": "listener",
                "alive": True,
                "seen": "2026-12-05T15:29:56+00:00",
                "ae_title": "BONEAGE",
                "port": PORT,
            },
            {
                "name": "worker@node:102",
                "role": "worker",
                "alive": True,
                "seen": "2026-12-05T15:18:00+00:00",
                "queues": ["inference"],
                "device": "cpu",
                "precision": "float32",
                "trained": True,
            },
            {
                "name": "worker@node:103",
                "role": "worker",
                "alive": False,
                "seen": "2026-12-05T12:29:00+00:00",
                "queues": ["delivery"],
            },
        ],
        "storage": {
            "free_bytes": 40 * 2**30,
            "total_bytes": 100 * 2**30,
            "spool_instances": 1,
            "spool_bytes": 9_500_000,
            "retention_days": 30,
        },
    }
    report.update(changes)
    return report


def _shown(report: dict[str, Any]) -> str:
    console = Console(record=True, width=160, color_system=None)
    render(report, console)
    return console.export_text()


def test_each_process_says_how_long_ago_it_was_last_seen() -> None:
    shown = _shown(_report())
    assert "4 s ago" in shown  # the listener
    assert "12 min ago" in shown  # an inference worker
    assert "3 h ago" in shown  # a delivery worker that stopped
    assert "2026-12-05T15:29:56" not in shown  # the timestamps stay in --json


def test_storage_counts_images_and_bytes_in_readable_units() -> None:
    shown = _shown(_report())
    assert "40.0 GiB free of 100.0" in shown
    assert "1 received image on disk (9.5 MB), kept 30 days after delivery" in shown
    storage = {**_report()["storage"], "spool_instances": 0, "spool_bytes": 0}
    assert "0 received images on disk (0 B)" in _shown(_report(storage=storage))
    storage = {**storage, "spool_instances": 5000, "spool_bytes": 47_500_000_000}
    storage["retention_days"] = 0
    assert "5000 received images on disk (47.5 GB), kept for ever" in _shown(
        _report(storage=storage)
    )


def test_an_unhealthy_node_lists_its_problems() -> None:
    problems = ["no worker consumes the delivery queue"]
    shown = _shown(_report(healthy=False, problems=problems))
    assert "UNHEALTHY" in shown and "no worker consumes the delivery queue" in shown


def test_the_listener_says_when_it_closed_connections_for_too_many_at_once() -> None:
    assert "closed on arrival" not in _shown(_report())
    report = _report()
    report["processes"][0]["connections_refused"] = 12
    assert "12 connections closed on arrival (too many at once)" in _shown(report)


def _failed(n: int, error: str, **changes: Any) -> dict[str, Any]:
    """A failed delivery as `status --json` lists it."""
    return {
        "id": n,
        "instance": 100 + n,
        "kind": "sr",
        "destination": f"PACS@10.0.0.5:{PACS_PORT}",
        "attempts": 31,
        "error": error,
        "last_attempt_at": f"2026-12-05T{n % 24:02d}:00:00+00:00",
        "last_attempt_reckoned": True,
        **changes,
    }


def test_failed_deliveries_are_listed_with_their_errors() -> None:
    assert "failed deliveries" not in _shown(_report())
    failed = [
        _failed(7, "no answer to the C-STORE within 30 s", last_attempt_reckoned=False),
        _failed(3, "association rejected by PACS (calling AE not known)", attempts=1),
    ]
    shown = _shown(_report(failed_deliveries=failed))
    assert f"delivery 7 (sr to PACS@10.0.0.5:{PACS_PORT}) of instance 107" in shown
    assert "no answer to the C-STORE within 30 s" in shown
    assert "association rejected by PACS (calling AE not known)" in shown
    # a time the row recorded as it is, one reckoned from the back-off marked so
    assert "2026-12-05T07:00:00+00:00" in shown and "≈ 2026-12-05T07" not in shown
    assert "≈ 2026-12-05T03:00:00+00:00" in shown


def test_failed_deliveries_past_those_listed_are_counted_by_error() -> None:
    """A day's deliveries failed: the latest are listed, and every error of the others
    is still shown, with how many it ended."""
    failed = [_failed(n, "association rejected by PACS") for n in range(40, 10, -1)]
    failed.append(_failed(5, "the outbox file is damaged: SHA-256 differs"))
    shown = _shown(_report(failed_deliveries=failed))
    assert shown.count("association rejected by PACS") == 10 + 1  # the rows, the count
    assert "delivery 31 (" in shown and "delivery 30 (" not in shown
    assert (
        "21 more failed deliveries ('status --json' lists them): 20 × association "
        "rejected by PACS; 1 × the outbox file is damaged: SHA-256 differs"
    ) in shown
