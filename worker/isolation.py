"""One image assessed alone in a process whose task threads share it (a batching worker).

A batching worker's task threads hold several images at once. Where the process dies (a
decoder's crash, the kernel's OOM killer), the images it held cannot tell which of them
killed it: the reconciler counts none of their attempts and has each assessed alone from
then on (worker.reconciler, ``Instance.alone``). Such an image's task waits here until
the process holds no other image, and holds off every other until it is done: a death
then is that image's own, and counts.

Every wait is bounded: an image that hangs (a read on a stalled network file system)
would otherwise stop every other task of its process for good, where it used to take
one task thread. Once no image has been let go for the bound, an image to be alone is
held beside the others, and one held off goes on beside the one alone; each says so in
the log. The bound counts from the last image let go, not from the start of the wait:
after a death with thirty images held, thirty are assessed alone one after another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ALONE_WAIT_SECONDS", "Isolation"]

logger = logging.getLogger(__name__)

#: The longest an image waits, with no image let go meanwhile, to be held alone, or held
#: off by one alone or waiting to be. The images a batching worker holds take seconds
#: each; past this one of them hangs.
ALONE_WAIT_SECONDS = 120.0


class Isolation:
    """The images a process holds: any number together, or one alone.

    One waiting to be alone holds off those that come after it, so that a busy process
    does not keep it waiting for ever; those under way finish first.
    """

    def __init__(self, wait_seconds: float = ALONE_WAIT_SECONDS) -> None:
        self.wait_seconds = wait_seconds
        self._changed = threading.Condition()
        self._together = 0  # held beside others, now
        self._alone = False  # one held alone, now
        self._waiting_alone = 0
        self._let_go_at = time.monotonic()  # when an image was last let go

    def _wait_for(self, ready: Callable[[], bool]) -> bool:
        """Under the condition: wait until ``ready()``, or until :attr:`wait_seconds` have
        passed with no image let go since this wait began or the last one let go;
        whether ready."""
        began = time.monotonic()
        while not ready():
            left = max(began, self._let_go_at) + self.wait_seconds - time.monotonic()
            if left <= 0:
                return False
            self._changed.wait(left)
        return True

    def _let_go(self) -> None:
        """Under the condition: an image was let go."""
        self._let_go_at = time.monotonic()
        self._changed.notify_all()

    @contextmanager
    def together(self) -> Iterator[None]:
        """Hold an image beside others: at once, unless one is alone or waits to be; then
        once it is done, or :attr:`wait_seconds` have passed."""
        with self._changed:
            if not self._wait_for(lambda: not self._alone and not self._waiting_alone):
                logger.warning(
                    "no image let go in this process for %.0f s, one of them alone: the "
                    "next is assessed beside it",
                    self.wait_seconds,
                )
            self._together += 1
        try:
            yield
        finally:
            with self._changed:
                self._together -= 1
                self._let_go()

    @contextmanager
    def alone(self) -> Iterator[bool]:
        """Hold an image alone, once those held are done and no other is alone: yields
        True. Where that has not come within :attr:`wait_seconds`, it stops holding the
        others off and holds the image beside them instead: yields False."""
        with self._changed:
            self._waiting_alone += 1
            try:
                alone = self._wait_for(lambda: not self._alone and not self._together)
                if alone:
                    self._alone = True
                else:
                    self._together += 1
            finally:
                self._waiting_alone -= 1
                self._changed.notify_all()  # where it stopped waiting, the others go on
        if not alone:
            logger.warning(
                "an image to be assessed alone waited, and no other image of this process "
                "was let go for %.0f s (one may hang): it is assessed beside them",
                self.wait_seconds,
            )
        try:
            yield alone
        finally:
            with self._changed:
                if alone:
                    self._alone = False
                else:
                    self._together -= 1
                self._let_go()

    @property
    def held(self) -> int:
        """Images held now, alone or together."""
        with self._changed:
            return self._together + int(self._alone)
