"""How a supervisor (`serve`, a GPU `work`) stops its children: SIGTERM, then, after
its grace, SIGKILL for those still running (worker.cli._supervise)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support import wait_for
from worker.cli import _supervise

#: A child that says it is up, then records each SIGTERM (and, stubborn, goes on).
CHILD = """
import os, signal, sys, threading
up, terms, stubborn = sys.argv[1], sys.argv[2], sys.argv[3] == "stubborn"
def term(signum, frame):
    open(terms, "a").write("TERM\\n")
    if not stubborn:
        raise SystemExit(0)
signal.signal(signal.SIGTERM, term)
open(up + ".tmp", "w").write(str(os.getpid()))
os.rename(up + ".tmp", up)
threading.Event().wait()
"""


class StopWhenUp(threading.Thread):
    """Sends this process (the supervisor) SIGTERM once the child is up, as a service
    manager stopping it does, and notes when."""

    def __init__(self, up: Path) -> None:
        super().__init__(daemon=True)
        self.up = up
        self.sent_at = 0.0

    def run(self) -> None:
        wait_for(self.up.exists, timeout=60, what="the child to start")
        self.sent_at = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _supervised(tmp_path: Path, behaviour: str, *, grace: float) -> tuple[float, Path, Path]:
    """Supervise one child that behaves as ``behaviour`` says on SIGTERM, stopping the
    supervisor once the child is up: (seconds from the stop to the supervisor's return,
    the file the child's pid is in, the file its SIGTERMs are noted in)."""
    up, terms = tmp_path / "up", tmp_path / "terms"
    command = [sys.executable, "-c", CHILD, str(up), str(terms), behaviour]
    stopper = StopWhenUp(up)
    stopper.start()
    _supervise({f"{behaviour} child": command}, env=dict(os.environ), grace=grace)
    return time.monotonic() - stopper.sent_at, up, terms


def test_a_child_that_ignores_sigterm_is_killed_once_the_grace_is_over(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    stopped_after, up, terms = _supervised(tmp_path, "stubborn", grace=1.0)

    assert terms.read_text() == "TERM\n"  # asked once, then given the grace
    assert stopped_after >= 1.0
    assert "stubborn child did not stop within 1 s of SIGTERM; killed" in caplog.text
    assert not _alive(int(up.read_text()))  # killed, and reaped


def test_a_child_that_stops_on_sigterm_is_not_waited_for_longer(
    tmp_path: Path, signal_handlers: None, caplog: pytest.LogCaptureFixture
) -> None:
    stopped_after, up, terms = _supervised(tmp_path, "obliging", grace=600)

    assert stopped_after < 60  # not the grace: the child had stopped
    assert terms.read_text() == "TERM\n"
    assert "killed" not in caplog.text
    assert not _alive(int(up.read_text()))
