"""Liveness rows: each process says every few seconds that it is alive and what it runs on.

A row's times are the database server's clock (`db.queries.database_now`), never the
writing host's: `status` and `reprocess` judge them by the same clock, so hosts whose
clocks differ by more than `STALE_AFTER` still see each other alive.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete

from db.engine import session_scope
from db.queries import database_now
from db.schema import Heartbeat

logger = logging.getLogger(__name__)

INTERVAL_SECONDS = 10.0
#: A process whose heartbeat is older than this is down (three missed beats).
STALE_AFTER = timedelta(seconds=3 * INTERVAL_SECONDS)


def process_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


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

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        try:
            with session_scope(self._url) as session:
                seen = database_now(session)
                session.merge(
                    Heartbeat(
                        name=self.name,
                        role=self._role,
                        detail=self._detail(),
                        started_at=self._started or seen,
                        seen_at=seen,
                    )
                )
            self._started = self._started or seen
        except Exception as exc:  # the db may be down; status will show us as stale
            logger.warning("heartbeat not written (%s)", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            with session_scope(self._url) as session:
                session.execute(delete(Heartbeat).where(Heartbeat.name == self.name))
        except Exception as exc:
            logger.warning("heartbeat row not removed (%s)", type(exc).__name__)
