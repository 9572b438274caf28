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
