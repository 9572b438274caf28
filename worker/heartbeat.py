"""Liveness rows: each process says every few seconds that it is alive and what it runs on.

A row's times are the database server's clock (`db.queries.database_now`), never the
writing host's: `status` and `reprocess` judge them by the same clock, so hosts whose
clocks differ by more than `STALE_AFTER` still see each other alive.

A hung worker still beats (the beat is a thread of its own), so a worker process also
notes on local disk when each task it runs began (`TasksInHand`): `boneage-worker
liveness`, a container's liveness probe, fails when one has run past `HUNG_AFTER`.
That check needs neither the database nor the broker, so their outage restarts nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from celery.signals import task_postrun, task_prerun
from sqlalchemy import ColumnElement, Select, delete, exists, or_, select
from sqlalchemy.orm import Session, aliased

from db.engine import session_scope
from db.queries import ProcessBeat, database_now
from db.schema import Heartbeat

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 10.0
#: A process whose heartbeat is older than this is down (three missed beats).
STALE_AFTER = timedelta(seconds=3 * INTERVAL_SECONDS)


def alive(session: Session) -> ColumnElement[bool]:
    """The condition on `Heartbeat` rows of processes alive now: seen within
    `STALE_AFTER` by the database's clock, which dated them (hosts' clocks may differ)."""
    return Heartbeat.seen_at >= database_now(session) - STALE_AFTER


def claim_holders(session: Session) -> Select[str]:
    """The names of the processes whose claims stand (worker.reconciler.claim_ended):
    those alive (:func:`alive`); but, while no live process has written its heartbeat
    without a break (``Heartbeat.writing_since``) for `STALE_AFTER`, every process with
    a heartbeat row.

    A heartbeat goes stale when its process dies, and also when the database is away
    for longer than `STALE_AFTER` (a failover): then every heartbeat is stale, the
    living's too, until each writes again, within `INTERVAL_SECONDS` of its return. A
    round of the reconciler in between took every image in hand from the living and
    said their workers had died. A process that has written for `STALE_AFTER` since
    the database came back vouches that the others had their turns to write: a
    heartbeat stale then is a death. A process that stopped removes its row; one
    killed while nobody vouches keeps its claims until somebody does.
    """
    current = database_now(session)
    witness = aliased(Heartbeat)
    vouched = exists().where(
        witness.seen_at >= current - STALE_AFTER,
        witness.writing_since <= current - STALE_AFTER,
    )
    return select(Heartbeat.name).where(or_(Heartbeat.seen_at >= current - STALE_AFTER, ~vouched))


#: The queues workers consume, whose live workers `status` and the metrics count.
WORKER_QUEUES = ("inference", "delivery")


def live_workers_by_queue(beats: Iterable[ProcessBeat], current: datetime) -> dict[str, int]:
    """Of ``beats`` (:func:`db.queries.heartbeats`), the worker processes alive at
    ``current`` (the database's clock, which dated them) consuming each of
    :data:`WORKER_QUEUES`."""
    live = [b for b in beats if b.role == "worker" and current - b.seen_at <= STALE_AFTER]
    return {q: sum(q in b.detail.get("queues", ()) for b in live) for q in WORKER_QUEUES}


#: A task still running this long after it began is hung. An image takes seconds. The
#: reconciler gives an instance being assessed to another worker after 30 min
#: (`worker.reconciler.PROCESSING_LEASE`); Celery kills a delivery after 6 min
#: (`worker.celery_app.deliver_time_limit`) in a prefork pool, but in no other pool, and
#: no assessment in any; a query or a publish on a connection that went away fails
#: within a few minutes (`db.engine.POSTGRESQL_CONNECT_ARGS`,
#: `worker.celery_app.BROKER_SOCKET_TIMEOUT`). Twice the lease is far past each of them.
HUNG_AFTER = timedelta(hours=1)


def _lifetime_token() -> str:
    return secrets.token_hex(4)


#: Drawn anew by each process, at its start and in a child after a fork: it tells this
#: process's lifetime from an earlier one with the same host name and process id.
_token = _lifetime_token()


def _new_lifetime() -> None:
    global _token
    _token = _lifetime_token()


os.register_at_fork(after_in_child=_new_lifetime)


def process_name(role: str) -> str:
    """This process's name in its heartbeat and in the claims it takes:
    ``role@host/token:pid``, the process id last.

    A host name and a process id alone do not tell two lifetimes apart: a restarted
    container keeps its host name, and its new PID namespace hands the same process ids
    to its workers in the same order. A dead worker's claims then looked like those of
    its successor, alive, and waited for the reconciler's lease (30 min). The token is
    drawn for each process (`_token`).
    """
    return f"{role}@{socket.gethostname()}/{_token}:{os.getpid()}"


def tasks_directory() -> Path:
    """Where this host's worker processes note the tasks they run: one file each, in the
    temporary directory (a pod's or container's own /tmp, a unit's PrivateTmp), never on
    the shared data directory."""
    return Path(tempfile.gettempdir()) / f"boneage-worker-{os.getuid()}" / "tasks"


#: Each process's file is rewritten whole, at this length, in one write, never truncated:
#: a reader finds one record, or nothing in a file just created.
_RECORD_BYTES = 512


class TasksInHand:
    """This process's tasks under way, noted in its own file of ``directory`` for
    `boneage-worker liveness` (:func:`hung_tasks`) to read.

    The process holds an exclusive lock (flock) on its file while it lives, so a file
    left by a process that died (SIGKILL, a container restarted on the same /tmp) is
    unlocked, and passed over, even when its process id has been given to another.
    """

    def __init__(
        self, directory: Path | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = directory or tasks_directory()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = self.directory / f"{os.getpid()}.json"
        self._clock = clock
        self._tasks: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._write()

    def started(self, task_id: str, name: str) -> None:
        with self._lock:
            self._tasks[task_id] = (name, self._clock())
            self._write()

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)
            self._write()

    def watch_celery(self) -> None:
        """Note every Celery task this process runs, from its start to its end."""
        task_prerun.connect(self._on_prerun, weak=False)
        task_postrun.connect(self._on_postrun, weak=False)

    def close(self) -> None:
        task_prerun.disconnect(self._on_prerun)
        task_postrun.disconnect(self._on_postrun)
        with self._lock:
            if not self._closed:
                self._closed = True
                self.path.unlink(missing_ok=True)
                os.close(self._fd)

    def _on_prerun(self, task_id: str, task: Any, **_: Any) -> None:
        self.started(task_id, str(task.name))

    def _on_postrun(self, task_id: str, **_: Any) -> None:
        self.finished(task_id)

    def _write(self) -> None:
        if self._closed:
            return
        oldest = min(self._tasks.values(), key=lambda t: t[1], default=None)
        record = {
            "tasks": len(self._tasks),
            "oldest": {"task": oldest[0], "started": oldest[1]} if oldest else None,
        }
        data = json.dumps(record).encode()
        try:
            os.pwrite(self._fd, data.ljust(_RECORD_BYTES), 0)
        except OSError as exc:  # a full /tmp: the probe then sees the last record
            logger.warning("tasks in hand not noted (%s)", exc.strerror)


@dataclass(frozen=True)
class HungTask:
    pid: int
    task: str
    seconds: float  # how long it has run


def hung_tasks(directory: Path | None = None, now: float | None = None) -> list[HungTask]:
    """The tasks of this host's live worker processes that have run past `HUNG_AFTER`."""
    directory = directory or tasks_directory()
    current = time.time() if now is None else now
    hung = []
    for path in sorted(directory.glob("*.json")):
        if not path.stem.isdigit():
            continue
        record = _read_if_alive(path)
        oldest = (record or {}).get("oldest")
        if oldest and current - oldest["started"] > HUNG_AFTER.total_seconds():
            hung.append(HungTask(int(path.stem), oldest["task"], current - oldest["started"]))
    return hung


def _read_if_alive(path: Path) -> dict[str, Any] | None:
    """A process's record, if that process still holds its lock; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:  # its process stopped meanwhile
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # locked: its process lives
            text = os.pread(fd, _RECORD_BYTES, 0)
        else:
            return None  # left by a process that died
        record: dict[str, Any] = json.loads(text)
        return record
    except ValueError:  # being created: nothing in hand yet
        return None
    finally:
        os.close(fd)


class HeartbeatThread:
    """Writes this process's `Heartbeat` row until stopped, then removes it."""

    def __init__(
        self,
        database_url: str,
        role: str,
        detail: Callable[[], dict[str, Any]] = dict,
        interval: float = INTERVAL_SECONDS,
    ) -> None:
        self.name = process_name(role)
        self._url = database_url
        self._role = role
        self._detail = detail
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{role}", daemon=True)
        # when the database first heard of it, by the database's clock
        self._started: datetime | None = None
        # the first of its writes since which none failed or came late (claim_holders),
        # and the last
        self._writing_since: datetime | None = None
        self._written: datetime | None = None
        self.tasks: TasksInHand | None = None

    def start(self) -> None:
        if self._role == "worker":
            try:
                self.tasks = TasksInHand()
            except OSError as exc:
                logger.warning(
                    "tasks in hand not noted: `liveness` cannot see this process hang (%s)",
                    exc.strerror,
                )
            else:
                self.tasks.watch_celery()
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            with session_scope(self._url) as session:
                seen = database_now(session)
                since = self._writing_since
                if since is None or self._written is None or seen - self._written > STALE_AFTER:
                    since = seen  # the first, or the first after a break
                session.merge(
                    Heartbeat(
                        name=self.name,
                        role=self._role,
                        detail=self._detail(),
                        started_at=self._started or seen,
                        seen_at=seen,
                        writing_since=since,
                    )
                )
            self._started = self._started or seen
            self._writing_since, self._written = since, seen
        except Exception as exc:  # the db may be down; status will show us as stale
            self._writing_since = None
            logger.warning("heartbeat not written (%s)", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()

    def stop(self) -> None:
        if self.tasks is not None:
            self.tasks.close()
        self._stop.set()
        self._thread.join(5)
        try:
            with session_scope(self._url) as session:
                session.execute(delete(Heartbeat).where(Heartbeat.name == self.name))
        except Exception as exc:
            logger.warning("heartbeat row not removed (%s)", type(exc).__name__)
