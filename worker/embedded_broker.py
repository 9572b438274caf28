"""The embedded broker's transport: kombu's SQLAlchemy transport, woken by each message,
polling what changed.

kombu cannot be told when a message arrives in a SQLite file, so its consumer polls:
each poll of a queue is two queries, the second inside ``BEGIN IMMEDIATE`` (SQLite's
write lock, which the listener's publishes wait on), about 1.8 ms of Python. At the
interval a burst needs (:data:`POLL_SECONDS`, so that a prefork child never idles long
between images) an idle node's two workers spent 4–7 % of a core on twenty such polls
a second, all day.

SQLite says whether anything changed: ``PRAGMA data_version`` differs between two reads
on one connection exactly when another connection committed in between (SQLite's own
documentation; it holds across processes, and in WAL mode). A queue whose last query
came back empty is therefore queried again only once something was committed to the
file since that query began, or after :data:`FULL_POLL_SECONDS` whatever the version
says. Nothing changes in what is found: acknowledgement, visibility and ordering are
kombu's. Brokers other than SQLite (``sqla+postgresql://``) are polled as kombu does.

Between two polls a consumer does not sleep out the interval: it waits (Linux's
inotify, :class:`Waker`) for a publisher to open and close ``broker.db-wakeup``, which
every publish through this transport does after its commit, and for its own
acknowledgements, which free a slot for the next message without a commit. A message
published to an idle node is fetched within a few milliseconds, not at the next poll: a
lone study lost 0.07 s between listener and inference worker and 0.05–0.07 s between
inference and delivery worker (section "Woken, not polled" of
docs/performance.md). SQLite's own files are not watched: it writes its log before the
commit is visible, so a consumer woken by that write looked too early and found nothing.
The poll stays, every :data:`WOKEN_POLL_SECONDS`, as the bound on a wake-up not seen;
where inotify is missing (not Linux) or refused (its per-user limits), or the folder's
watch is lost, a consumer polls every :data:`POLL_SECONDS` as before.

Publishing to a SQLite file is one ``INSERT`` and a commit, without the ORM: kombu's own
publish looks the queue's row up again each time and flushes the message through the
ORM's unit of work, 1.1–1.7 ms of the listener's Python per instance against 0.3–0.5 ms
(section "Ingest" of docs/performance.md). The row written is the one kombu writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import select
import sqlite3
import struct
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as sqla_transport
from kombu.utils.json import dumps
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

logger = logging.getLogger(__name__)

__all__ = [
    "FULL_POLL_SECONDS",
    "POLL_SECONDS",
    "WOKEN_POLL_SECONDS",
    "Channel",
    "Transport",
    "Waker",
    "announce",
    "sqlite_path",
    "wakeup_file",
    "wakeups_available",
]

#: How often a consumer that cannot be woken looks at its queues. After an
#: acknowledgement it learns of the free slot at its next poll; at kombu's default (1 s)
#: a prefork child idled up to a second between images.
POLL_SECONDS = 0.1

#: How long a consumer that can be woken (:class:`Waker`) waits between two polls. It
#: is woken by every publish and acknowledgement, so this bounds only the wait for one
#: that went unseen; an idle node's consumers wake ten times less than at
#: :data:`POLL_SECONDS` (in ``bench_idle``, 0.37 % of a core against 0.93 %).
WOKEN_POLL_SECONDS = 1.0

#: A queue found empty is queried again at least this often even when SQLite reports no
#: commit since: a bound on the wait should the version ever miss a change (a broker file
#: replaced under the node, say), which it is not known to do.
FULL_POLL_SECONDS = 2.0


def sqlite_path(url: str) -> str | None:
    """The file a (kombu ``sqla+``) SQLAlchemy SQLite URL names, or ``None`` otherwise."""
    try:
        parsed = make_url(url.removeprefix("sqla+"))
    except ArgumentError:
        return None  # not a SQLAlchemy URL (redis://, amqp:// parse; nonsense does not)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


# inotify(7): a file in the folder, opened for writing, was closed
_IN_CLOSE_WRITE = 0x008
_IN_Q_OVERFLOW = 0x4000  # events were lost: a wake-up, to be safe
_IN_IGNORED = 0x8000  # the watch is gone (the folder was removed): poll from now on
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name


def wakeup_file(broker_file: str) -> Path:
    """The file a publisher opens and closes after each commit: ``broker.db-wakeup``."""
    path = Path(broker_file)
    return path.with_name(path.name + "-wakeup")


def announce(wakeup: Path) -> None:
    """Tell the consumers waiting on this broker that a message was committed.

    Opening the file for writing and closing it is what inotify reports; nothing is
    written. Called after the commit, so a consumer woken by it finds the message. The
    file is made with the broker file's permissions, as SQLite makes its log, so that
    every process that may publish may open it. A failure only leaves the consumers to
    their next poll.
    """
    try:
        try:
            fd = os.open(wakeup, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            broker = wakeup.with_name(wakeup.name.removesuffix("-wakeup"))
            mode = broker.stat().st_mode & 0o666
            fd = os.open(wakeup, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, mode)
        os.close(fd)
    except OSError as exc:
        logger.debug("embedded broker: consumers not woken (%s)", exc.strerror)


def _inotify_watch(folder: Path) -> int | None:
    """A non-blocking inotify descriptor watching ``folder``, or ``None`` where none can be had."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        init, add_watch = libc.inotify_init1, libc.inotify_add_watch
    except (OSError, AttributeError):
        return None  # not Linux
    fd = int(init(os.O_NONBLOCK | os.O_CLOEXEC))
    if fd >= 0 and add_watch(fd, os.fsencode(folder), _IN_CLOSE_WRITE) >= 0:
        return fd
    error = ctypes.get_errno()
    if fd >= 0:
        os.close(fd)
    logger.info(
        "embedded broker: consumers poll every %g s (inotify: %s)", POLL_SECONDS, os.strerror(error)
    )
    return None


def wakeups_available(broker_file: str) -> bool:
    """Whether a consumer of this broker file can be woken (:class:`Waker`), or must poll."""
    fd = _inotify_watch(wakeup_file(broker_file).absolute().parent)
    if fd is None:
        return False
    os.close(fd)
    return True


class Waker:
    """What a consumer waits on between two polls of the embedded broker.

    :meth:`wait` returns when a publisher announces a commit (:func:`announce`), when
    :meth:`wake` is called (an acknowledgement, which commits nothing), or after
    ``seconds``. A wake-up that comes while nobody waits is kept for the next
    :meth:`wait`, so none is lost between a poll that found nothing and the wait after it.

    The broker's own files are not watched: SQLite writes its log before the commit is
    visible to readers, so a consumer woken by that write would look too early.
    :meth:`create` returns ``None`` where inotify cannot be had; the caller then sleeps.
    """

    def __init__(self, inotify_fd: int, name: bytes) -> None:
        self._inotify = inotify_fd
        self._name = name
        self._read_end, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poller = select.poll()
        self._poller.register(self._inotify, select.POLLIN)
        self._poller.register(self._read_end, select.POLLIN)
        #: False once the folder's watch is gone; wake-ups by publishers then never come
        self.watching = True

    @classmethod
    def create(cls, broker_file: str) -> Waker | None:
        wakeup = wakeup_file(broker_file).absolute()
        fd = _inotify_watch(wakeup.parent)
        return cls(fd, os.fsencode(wakeup.name)) if fd is not None else None

    def wake(self) -> None:
        """End the current or the next :meth:`wait` (safe from any thread)."""
        # BlockingIOError: the pipe is full of wake-ups already; OSError: closed, nobody waits
        with contextlib.suppress(OSError):
            os.write(self._write_end, b"\0")

    def wait(self, seconds: float) -> bool:
        """Wait until woken or ``seconds`` pass; whether it was woken.

        Other files closed in the folder are read past and the wait goes on.
        """
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            woken = False
            for fd, _ in self._poller.poll(left * 1000):
                if fd == self._read_end:
                    while self._read(self._read_end):
                        pass
                    woken = True
                elif self._announced():
                    woken = True
            if woken:
                return True
        return False

    def _announced(self) -> bool:
        announced = False
        while data := self._read(self._inotify):
            offset = 0
            while offset + _EVENT.size <= len(data):
                _, mask, _, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                offset = start + length
                if mask & _IN_IGNORED:
                    self.watching = False
                if mask & (_IN_Q_OVERFLOW | _IN_IGNORED) or name == self._name:
                    announced = True
        return announced

    @staticmethod
    def _read(fd: int) -> bytes:
        try:
            return os.read(fd, 65536)
        except BlockingIOError:
            return b""

    def close(self) -> None:
        for fd in (self._inotify, self._read_end, self._write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


class Channel(sqla_transport.Channel):
    """kombu's SQLAlchemy channel, skipping the query of a queue nothing can have changed."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._version_lock = threading.Lock()
        self._version_connection: sqlite3.Connection | None = None
        self._path = sqlite_path(str(connection.client.hostname))  # None: not gated
        self._wakeup = wakeup_file(self._path) if self._path is not None else None
        # queue -> (data_version read before its last query, when), for queues found empty
        self._found_empty: dict[str, tuple[int, float]] = {}
        # queue -> id of its row; kombu never deletes a queue's row
        self._queue_ids: dict[str, int] = {}

    # -- publishing ---------------------------------------------------------------------

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue_id(queue)  # declared: created if missing, and its id kept

    def _queue_id(self, queue: str) -> int:
        if queue not in self._queue_ids:
            self._queue_ids[queue] = int(self._get_or_create(queue).id)
        return self._queue_ids[queue]

    # kombu's two base classes name the second parameter differently (message, payload)
    def _put(self, queue: Any, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if self._path is None:
            super()._put(queue, message, **kwargs)
            return
        # The row kombu's ORM writes: visible, no timestamp (it is set when consumed),
        # version 1 (the mapper's version counter starts there).
        row = {
            "queue_id": self._queue_id(queue),
            "payload": dumps(message),
            "visible": True,
            "version": 1,
        }
        session = self.session
        try:
            session.execute(insert(self.message_cls.__table__), row)
            session.commit()
        except SQLAlchemyError:
            # As kombu does: the publish fails (and is tried again), the session is
            # usable, and the queues are looked up afresh.
            session.rollback()
            self._queue_ids.clear()
            raise
        if self._wakeup is not None:
            announce(self._wakeup)

    # -- consuming ----------------------------------------------------------------------

    def _data_version(self) -> int | None:
        """SQLite's commit counter as this channel's own connection sees it (None: unknown)."""
        if self._path is None:
            return None
        with self._version_lock:
            try:
                if self._version_connection is None:
                    # Opened as kombu's own connections are (a read-only one may take
                    # SQLite's special path for WAL readers that cannot write the -shm
                    # file); it only ever reads this pragma, outside any transaction,
                    # so it holds no lock.
                    self._version_connection = sqlite3.connect(
                        self._path,
                        timeout=30,
                        isolation_level=None,
                        check_same_thread=False,
                    )
                # fetchall: the statement runs to its end, so no read snapshot stays open
                # (one held would hide later commits and hold back WAL checkpoints)
                [(version,)] = self._version_connection.execute("PRAGMA data_version").fetchall()
                return int(version)
            except sqlite3.Error as exc:
                # Unknown is safe: the queue is queried as kombu would.
                logger.debug("embedded broker: data_version unavailable (%s)", exc)
                self._close_version_connection()
                return None

    def _get(self, queue: str, timeout: Any = None) -> Any:
        version = self._data_version()  # read before the query: a commit after it shows
        now = time.monotonic()
        seen = self._found_empty.get(queue)
        if (
            version is not None
            and seen is not None
            and seen[0] == version
            and now - seen[1] < FULL_POLL_SECONDS
        ):
            raise Empty()
        try:
            message = super()._get(queue)
        except Empty:
            if version is not None:
                self._found_empty[queue] = (version, now)
            raise
        self._found_empty.pop(queue, None)
        return message

    def _close_version_connection(self) -> None:
        if self._version_connection is not None:
            try:
                self._version_connection.close()
            finally:
                self._version_connection = None

    # -- acknowledging: a slot freed without a commit ---------------------------------

    def basic_ack(self, delivery_tag: Any, multiple: bool = False) -> None:
        super().basic_ack(delivery_tag, multiple=multiple)
        self._slot_freed()

    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        super().basic_reject(delivery_tag, requeue=requeue)
        self._slot_freed()

    def _slot_freed(self) -> None:
        transport = self.connection  # None once the channel is closed
        if isinstance(transport, Transport):
            transport.wake()

    def close(self) -> None:
        with self._version_lock:
            self._close_version_connection()
        super().close()


class Transport(sqla_transport.Transport):
    """kombu's SQLAlchemy transport with :class:`Channel`: woken between polls by a
    :class:`Waker` and polled every :data:`WOKEN_POLL_SECONDS`, or, where it cannot be
    woken, polled every :data:`POLL_SECONDS`.

    kombu hands every transport option to ``create_engine``, so the interval is set here
    rather than as an option.
    """

    Channel = Channel
    polling_interval = POLL_SECONDS

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._waker_lock = threading.Lock()
        self._waker: Waker | None = None
        self._waker_tried_in: int | None = None  # the process whose waker _waker is
        self._broker_file = sqlite_path(str(client.hostname))  # None: not SQLite, not woken

    def _waker_of_this_process(self) -> Waker | None:
        """Made by the process that first waits (a fork's child makes its own)."""
        with self._waker_lock:
            if self._waker_tried_in != os.getpid():
                inherited, path = self._waker, self._broker_file
                if inherited is not None:
                    inherited.close()  # the parent's descriptors, as this child holds them
                self._waker = Waker.create(path) if path is not None else None
                self._waker_tried_in = os.getpid()
            return self._waker

    def wake(self) -> None:
        """End this process's current or next wait between polls."""
        waker = self._waker
        if waker is not None and self._waker_tried_in == os.getpid():
            waker.wake()  # never a parent's, from a child that inherited it

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """kombu's loop (a poll of the queues, a pause, until a message or the timeout),
        its pause a :meth:`Waker.wait` instead of a sleep."""
        waker, cycle = self._waker_of_this_process(), self.cycle
        if waker is None or cycle is None:
            super().drain_events(connection, timeout=timeout, **kwargs)
            return
        start = time.monotonic()
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)
            except Empty:
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise TimeoutError() from None  # socket.timeout, as kombu raises
                pause = WOKEN_POLL_SECONDS if waker.watching else self.polling_interval
                if timeout is not None:  # never past the caller's timeout
                    pause = min(pause, timeout - (time.monotonic() - start))
                waker.wait(pause)
            else:
                return

    def close_connection(self, connection: Any) -> None:
        super().close_connection(connection)
        with self._waker_lock:
            waker, self._waker, self._waker_tried_in = self._waker, None, None
        if waker is not None:
            waker.close()
