"""`serve` and a GPU `work` supervise child processes (worker.cli._supervise)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from worker.cli import FAILED_STARTS, _supervise


def _child(starts: Path, script: str) -> list[str]:
    """A child that notes each start in ``starts``, then runs ``script`` (which sees
    ``n``, its start's number from 1)."""
    note = f"f = open({str(starts)!r}, 'a'); f.write('x'); f.close()\n"
    count = f"n = len(open({str(starts)!r}).read())\n"
    return [sys.executable, "-c", note + count + script]


def test_a_child_that_keeps_exiting_stops_the_supervisor_with_a_failure(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    with pytest.raises(SystemExit) as stopped:
        _supervise(
            {"crashing child": _child(starts, "raise SystemExit(3)")},
            env={},
            restart_delay=0.05,
        )
    assert stopped.value.code == 1  # a service manager sees the failure
    assert starts.read_text() == "x" * FAILED_STARTS == "x" * 6  # started, restarted 5 times
    assert "crashing child exited with code 3 after 0 s; restarting in 0.05 s" in caplog.text
    assert (
        "crashing child keeps exiting (code 3, 6 times in a row within 120 s of starting); "
        "stopping the service" in caplog.text
    )


def test_a_child_slow_to_fail_stops_the_supervisor_all_the_same(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """However long a failing start takes (a model that loads, then no database), the
    starts that fail in a row are counted: this one takes longer than the back-off
    between its restarts, so counting exits within a time window would never stop it."""
    starts = tmp_path / "starts"
    slow = "import time; time.sleep(0.6); raise SystemExit(4)"
    with pytest.raises(SystemExit) as stopped:
        _supervise(
            {"slow child": _child(starts, slow)}, env={}, started_after=5.0, restart_delay=0.05
        )
    assert stopped.value.code == 1
    assert starts.read_text() == "x" * FAILED_STARTS
    assert "slow child keeps exiting (code 4, 6 times in a row within 5 s" in caplog.text


def test_a_child_that_ran_a_while_starts_its_count_again(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Four failed starts, then a run longer than ``started_after`` (a crash after
    working, not a failed start): the count begins again, so six more failed starts
    are needed to stop the supervisor."""
    starts = tmp_path / "starts"
    script = "import time\nif n == 5: time.sleep(1.5)\nraise SystemExit(5)"
    with pytest.raises(SystemExit):
        _supervise({"child": _child(starts, script)}, env={}, started_after=1.0, restart_delay=0.05)
    assert starts.read_text() == "x" * (4 + 1 + FAILED_STARTS)
    assert re.search(r"child exited with code 5 after [12] s; restarting in 0.05 s", caplog.text)


def test_the_wait_before_a_restart_doubles_with_each_failed_start(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    with pytest.raises(SystemExit):
        _supervise({"child": _child(starts, "raise SystemExit(6)")}, env={}, restart_delay=0.1)
    waits = re.findall(r"restarting in ([\d.]+) s", caplog.text)
    assert waits == ["0.1", "0.2", "0.4", "0.8", "1.6"]
