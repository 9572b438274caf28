"""`serve` and a GPU `work` supervise child processes (worker.cli._supervise)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from worker.cli import _supervise


def test_a_child_that_keeps_exiting_stops_the_supervisor_with_a_failure(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    starts = tmp_path / "starts"
    crashing = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    with pytest.raises(SystemExit) as stopped:
        _supervise({"crashing child": [sys.executable, "-c", crashing]}, env={})
    assert stopped.value.code == 1  # a service manager sees the failure
    assert starts.read_text() == "x" * 6  # started, then restarted five times
    assert "crashing child exited with code 3; restarting" in caplog.text
    assert "crashing child keeps exiting (code 3); stopping the service" in caplog.text
