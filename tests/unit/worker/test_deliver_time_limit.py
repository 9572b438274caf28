"""The hard time limit of the ``deliver`` task: longer than any claim it works under."""

from __future__ import annotations

from pathlib import Path

import worker.tasks  # noqa: F401  # declares the tasks, as the worker's start does
from worker.celery_app import DELIVER_TASK, app, configure, deliver_time_limit
from worker.delivery import claim_seconds
from worker.messaging import DELIVERIES_PER_MESSAGE
from worker.settings import load_settings


def test_the_deliver_task_is_killed_only_after_its_longest_claim_ran_out(tmp_path: Path) -> None:
    configure(load_settings(data_dir=tmp_path / "data"))
    limit = app.tasks[DELIVER_TASK].time_limit  # binds the tasks (after configure, or before)
    assert limit == deliver_time_limit()
    assert limit > claim_seconds(DELIVERIES_PER_MESSAGE)
    configure(load_settings(data_dir=tmp_path / "data"))  # again, with the tasks bound
    assert app.tasks[DELIVER_TASK].time_limit == limit
