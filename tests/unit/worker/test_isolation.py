"""worker.isolation: images held together, or one alone, by a process's task threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import SimpleNamespace

import pytest

from tests.support import wait_for
from worker import isolation as isolation_module
from worker.isolation import Isolation


class Holder:
    """A thread that holds an image through ``hold`` until told to let it go, writing
    ``name`` into ``order`` once it holds it."""

    def __init__(
        self, name: str, hold: Callable[[], AbstractContextManager[object]], order: list[str]
    ) -> None:
        self.holds = threading.Event()
        self.release = threading.Event()
        self.done = threading.Event()

        def run() -> None:
            with hold():
                order.append(name)
                self.holds.set()
                self.release.wait(30)
            self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def let_go(self) -> None:
        self.release.set()
        assert self.done.wait(30)
        self.thread.join(30)


def test_images_are_held_together_at_once() -> None:
    isolation, order = Isolation(), list[str]()
    holders = [Holder(f"t{i}", isolation.together, order) for i in range(4)]
    for holder in holders:
        assert holder.holds.wait(30)
    assert isolation.held == 4
    for holder in holders:
        holder.let_go()
    assert isolation.held == 0


def test_one_alone_waits_for_those_held_and_holds_off_those_after_it() -> None:
    isolation, order = Isolation(), list[str]()
    first = Holder("first", isolation.together, order)
    assert first.holds.wait(30)
    alone = Holder("alone", isolation.alone, order)
    wait_for(lambda: isolation._waiting_alone == 1, timeout=30, what="one waiting to be alone")
    after = Holder("after", isolation.together, order)  # comes while one waits to be alone
    assert order == ["first"]

    first.let_go()
    assert alone.holds.wait(30)
    assert isolation.held == 1  # alone: "after" waits
    alone.let_go()
    assert after.holds.wait(30)
    after.let_go()
    assert order == ["first", "alone", "after"]


def test_two_alone_never_overlap() -> None:
    isolation, order = Isolation(), list[str]()
    one = Holder("one", isolation.alone, order)
    assert one.holds.wait(30)
    two = Holder("two", isolation.alone, order)
    wait_for(lambda: isolation._waiting_alone == 1, timeout=30, what="the second waiting")
    assert order == ["one"]
    one.let_go()
    assert two.holds.wait(30)
    assert isolation.held == 1
    two.let_go()
    assert order == ["one", "two"]


def test_one_that_gives_up_waiting_to_be_alone_holds_off_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread interrupted while it waits (its wait raises) leaves the others to go on."""
    isolation, order = Isolation(), list[str]()
    first = Holder("first", isolation.together, order)
    assert first.holds.wait(30)

    class GaveUp(Exception):
        pass

    def interrupted(timeout: float | None = None) -> bool:
        raise GaveUp

    monkeypatch.setattr(isolation._changed, "wait", interrupted)
    with pytest.raises(GaveUp), isolation.alone():
        raise AssertionError("held alone while another is held")
    monkeypatch.undo()
    assert isolation._waiting_alone == 0
    second = Holder("second", isolation.together, order)
    assert second.holds.wait(30)
    first.let_go()
    second.let_go()


def test_the_bound_counts_from_the_last_image_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a death with many images held, each is assessed alone in turn: one waiting
    behind the others gives up only once none has been let go for the bound, not once
    the bound has passed since it began. On a clock of the test's: an image is let go
    90 s into the wait, and the wait ends 100 s after that, not 100 s after it began."""
    clock = [0.0]
    monkeypatch.setattr(isolation_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    isolation = Isolation(wait_seconds=100)
    waits: list[float] = []

    def wait(timeout: float | None = None) -> bool:
        assert timeout is not None
        waits.append(timeout)
        if len(waits) == 1:
            clock[0] = 90.0
            isolation._let_go()  # another image let go, this one still not ready
        else:
            clock[0] += timeout
        return False

    monkeypatch.setattr(isolation._changed, "wait", wait)
    with isolation._changed:
        assert isolation._wait_for(lambda: False) is False
    assert (waits, clock[0]) == ([100.0, 100.0], 190.0)


def test_one_alone_goes_on_beside_one_that_hangs_once_it_has_waited_its_bound() -> None:
    """A held image that never ends (a read on a stalled file system) would otherwise stop
    every other of the process for good: past the bound, the one to be alone is held
    beside it (False), and those it held off go on."""
    isolation, order = Isolation(wait_seconds=0.2), list[str]()
    hung = Holder("hung", isolation.together, order)
    assert hung.holds.wait(30)
    with isolation.alone() as alone:
        assert alone is False
        assert isolation.held == 2
        after = Holder("after", isolation.together, order)
        assert after.holds.wait(30)
        after.let_go()
    hung.let_go()
    assert isolation.held == 0


def test_one_held_off_goes_on_beside_one_alone_that_hangs_past_the_bound() -> None:
    isolation, order = Isolation(wait_seconds=0.2), list[str]()
    with isolation.alone() as alone:
        assert alone is True
        late = Holder("late", isolation.together, order)
        assert late.holds.wait(30)
        assert isolation.held == 2
        late.let_go()
    assert isolation.held == 0
