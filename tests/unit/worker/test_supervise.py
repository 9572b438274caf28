"""`serve` and a GPU `work` supervise child processes (worker.cli._supervise)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
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


class RunsAsIf:
    """A supervisor's clock by which each run a child ended lasted ``seconds(n)`` (its
    ``n``th), counted from the runs that wrote ``done`` as they ended: the tests need not
    wait that long."""

    def __init__(self, done: Path, seconds: Callable[[int], float]) -> None:
        self.done, self.seconds = done, seconds

    def __call__(self) -> float:
        ended = len(self.done.read_text()) if self.done.exists() else 0
        return time.monotonic() + sum(self.seconds(n) for n in range(1, ended + 1))


def _ends(done: Path, code: int) -> str:
    return f"f = open({str(done)!r}, 'a'); f.write('x'); f.close(); raise SystemExit({code})"


def test_a_child_slow_to_fail_stops_the_supervisor_all_the_same(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """However long a failing start takes (a model that loads, then no database), the
    starts that fail in a row are counted: each of these runs 13 s, longer than a minute
    holds five of with their back-off, so counting exits within a minute never stopped it."""
    starts, done = tmp_path / "starts", tmp_path / "done"
    with pytest.raises(SystemExit) as stopped:
        _supervise(
            {"slow child": _child(starts, _ends(done, 4))},
            env={},
            restart_delay=0.05,
            clock=RunsAsIf(done, lambda n: 13.0),
        )
    assert stopped.value.code == 1
    assert starts.read_text() == "x" * FAILED_STARTS
    assert "slow child exited with code 4 after 13 s" in caplog.text
    assert "slow child keeps exiting (code 4, 6 times in a row within 120 s" in caplog.text


def test_a_child_that_ran_a_while_starts_its_count_again(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Four failed starts, then a run longer than ``started_after`` (a crash after
    working, not a failed start): the count begins again, so six more failed starts
    are needed to stop the supervisor."""
    starts, done = tmp_path / "starts", tmp_path / "done"
    with pytest.raises(SystemExit):
        _supervise(
            {"child": _child(starts, _ends(done, 5))},
            env={},
            restart_delay=0.05,
            clock=RunsAsIf(done, lambda n: 200.0 if n == 5 else 0.0),
        )
    assert starts.read_text() == "x" * (4 + 1 + FAILED_STARTS)
    assert "child exited with code 5 after 200 s; restarting in 0.05 s" in caplog.text


def test_the_wait_before_a_restart_doubles_with_each_failed_start(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    with pytest.raises(SystemExit):
        _supervise({"child": _child(starts, "raise SystemExit(6)")}, env={}, restart_delay=0.1)
    waits = re.findall(r"restarting in ([\d.]+) s", caplog.text)
    assert waits == ["0.1", "0.2", "0.4", "0.8", "1.6"]
