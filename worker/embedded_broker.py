"""The embedded broker's transport: kombu's SQLAlchemy transport, polling what changed.

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
says. Nothing changes in what is found or when: the interval stays the same, a message
is still fetched at the first poll after its commit, and acknowledgement, visibility
and ordering are kombu's. Brokers other than SQLite (``sqla+postgresql://``) are polled
as kombu does.

Publishing to a SQLite file is one ``INSERT`` and a commit, without the ORM: kombu's own
publish looks the queue's row up again each time and flushes the message through the
ORM's unit of work, 1.1–1.7 ms of the listener's Python per instance against 0.3–0.5 ms
(section "Ingest" of docs/performance.md). The row written is the one kombu writes.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as sqla_transport
from kombu.utils.json import dumps
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

logger = logging.getLogger(__name__)

__all__ = ["FULL_POLL_SECONDS", "POLL_SECONDS", "Channel", "Transport", "sqlite_path"]

#: How often a consumer looks at its queues. After an acknowledgement a prefork worker
#: learns of the free slot at its next poll; at kombu's default (1 s) a child idled up to
#: a second between images.
POLL_SECONDS = 0.1

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


class Channel(sqla_transport.Channel):
    """kombu's SQLAlchemy channel, skipping the query of a queue nothing can have changed."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._version_lock = threading.Lock()
        self._version_connection: sqlite3.Connection | None = None
        self._path = sqlite_path(str(connection.client.hostname))  # None: not gated
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

    def close(self) -> None:
        with self._version_lock:
            self._close_version_connection()
        super().close()


class Transport(sqla_transport.Transport):
    """kombu's SQLAlchemy transport with :class:`Channel` and a poll every :data:`POLL_SECONDS`.

    kombu hands every transport option to ``create_engine``, so the interval is set here
    rather than as an option.
    """

    Channel = Channel
    polling_interval = POLL_SECONDS
