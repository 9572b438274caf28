"""The hard time limit of the ``deliver`` task: longer than any claim it works under."""

from __future__ import annotations

from pathlib import Path

import worker.tasks  # noqa: F401  # declares the tasks, as the worker's start does
from worker.celery_app import DELIVER_TASK, app, configure, deliver_time_limit
from worker.delivery import (
    FLOOR_RATE,
    MAX_CLAIM_SECONDS,
    SEND_TIMEOUT,
    claim_seconds,
)
from worker.messaging import DELIVERIES_PER_MESSAGE
from worker.settings import load_settings


def test_the_deliver_task_is_killed_only_after_its_longest_claim_ran_out(tmp_path: Path) -> None:
    configure(load_settings(data_dir=tmp_path / "data"))
    limit = app.tasks[DELIVER_TASK].time_limit  # binds the tasks (after configure, or before)
    assert limit == deliver_time_limit()
    assert limit > claim_seconds(DELIVERIES_PER_MESSAGE)
    configure(load_settings(data_dir=tmp_path / "data"))  # again, with the tasks bound
    assert app.tasks[DELIVER_TASK].time_limit == limit


def test_a_claim_carries_its_objects_at_the_floor_rate() -> None:
    # an SR and a 12 MB heat map: the association, each answer and the release, and the
    # bytes at FLOOR_RATE, before the send's deadline. Before, 120 s whatever the size:
    # a heat map below 0.8 Mbit/s outlasted its claim, and a second worker sent it too.
    size = 40_000 + 12_000_000
    seconds = claim_seconds(2, size)
    assert seconds - SEND_TIMEOUT >= 3 * SEND_TIMEOUT + size / FLOOR_RATE
    assert claim_seconds(2) == 4 * SEND_TIMEOUT


def test_no_claim_outlasts_the_deliver_tasks_time_limit() -> None:
    # the cap binds a message too large to go at FLOOR_RATE: its send's deadline with it
    assert claim_seconds(DELIVERIES_PER_MESSAGE, 10**12) == MAX_CLAIM_SECONDS
    assert deliver_time_limit() > MAX_CLAIM_SECONDS
