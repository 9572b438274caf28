"""The listener process: the SCP, wired to the database and the broker.

It also runs the reconciler periodically, and retention (``BONEAGE_RETENTION_DAYS``,
:mod:`worker.retention`) every hour: the listener is the one process a site always has
running, and it has both the database and the broker at hand.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from db.engine import session_scope
from db.queries import database_now
from db.schema import FINISHED, Instance, InstanceState
from dicom_io.scp import ReceivedInstance, StorageSCP
from worker.celery_app import app as celery_app
from worker.celery_app import queue_depths
from worker.heap import freeze_start_up_objects
from worker.heartbeat import HeartbeatThread
from worker.messaging import (
    Enqueuer,
    prune_embedded_broker,
)
from worker.metrics import MetricsServer, NodeCollector, node_registry
from worker.reconciler import reconcile_via_broker
from worker.retention import RetentionReport, remove_expired_files
from worker.runtime import Runtime
from worker.settings import Settings

logger = logging.getLogger(__name__)

#: Retention runs a few minutes after the listener starts, then every hour.
RETENTION_FIRST_SECONDS = 300.0
RETENTION_INTERVAL_SECONDS = 3600.0


def record_instance(database_url: str, received: ReceivedInstance) -> int:
    """Commit the row for a received instance; the same SOP Instance UID keeps one row.

    Raises on any database trouble: the caller then answers 0xA700.
    """
    with session_scope(database_url) as session:
        # The database's clock, not this host's: a worker's claim (worker.pipeline) and the
        # reconciler compare these times with their own, dated by it too.
        stamp = database_now(session)
        existing = session.scalar(
            select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid)
        )
        if existing is None:
            instance = Instance(
                sop_instance_uid=received.sop_instance_uid,
                sop_class_uid=received.sop_class_uid,
                study_instance_uid=received.study_instance_uid,
                series_instance_uid=received.series_instance_uid,
                modality=received.modality,
                transfer_syntax_uid=received.transfer_syntax_uid,
                calling_ae_title=received.calling_ae_title,
                spool_path=str(received.path),
                size_bytes=received.size_bytes,
                state=InstanceState.RECEIVED,
                received_at=stamp,
                times_received=1,
                attempts=0,
            )
            session.add(instance)
            try:
                session.flush()
            except IntegrityError:
                # The same instance on two associations at once: the other row stands.
                session.rollback()
                return record_instance(database_url, received)
            return instance.id
        session.execute(
            update(Instance)
            .where(Instance.id == existing.id)
            .values(
                times_received=Instance.times_received + 1,
                size_bytes=received.size_bytes,
                # where the copy is now: the data directory may have moved since the last
                spool_path=str(received.path),
                files_removed_at=None,  # a new copy is on disk: retention starts over
                # to be compared with what its assessment read (worker.pipeline)
                received_again_at=stamp,
                # and kept after it is: retention counts its days from the later of this
                # and finished_at (worker.retention)
                last_received_again_at=stamp,
            )
        )
        if (
            existing.state not in FINISHED
            and existing.study_instance_uid
            and received.study_instance_uid
            and received.study_instance_uid != existing.study_instance_uid
        ):
            # The assessment to come reads this copy: the image moved, or its patient
            # corrected, at the PACS; another image under its UID is then the one assessed.
            logger.warning(
                "instance %d: a copy in another study replaced the one waiting to be "
                "assessed (moved at the PACS, or another image under its UID)",
                existing.id,
            )
        return existing.id


class Listener:
    """The SCP plus enqueuer, reconciler and heartbeat, as one unit with start/stop."""

    def __init__(self, settings: Settings, *, ssl_context: Any = None) -> None:
        self.settings = settings
        self.runtime = Runtime(settings)
        url = settings.effective_database_url
        self.enqueuer = Enqueuer(url)
        self.scp = StorageSCP(
            ae_title=settings.ae_title,
            spool_dir=settings.spool_dir,
            record=lambda received: record_instance(url, received),
            notify=self._notify,
            allowed_callers=[(a.ae_title, a.host) for a in settings.allowed_aets],
            host=settings.host,
            port=settings.port,
            ssl_context=ssl_context,
            maximum_associations_per_peer=settings.max_associations_per_peer,
            reserve_bytes=settings.min_free_mb << 20,
        )
        self.heartbeat = HeartbeatThread(url, "listener", self._detail)
        self._stop = threading.Event()
        self._reconciler = threading.Thread(
            target=self._reconcile_loop, name="reconciler", daemon=True
        )
        self.metrics: MetricsServer | None = None
        if settings.metrics_port:
            collector = NodeCollector(
                url,
                lambda: queue_depths(celery_app),
                lambda: dict(self.scp.counters),
                data_dir=settings.data_dir,
                refused_connections=lambda: self.scp.refused_connections,
            )
            self.metrics = MetricsServer(
                node_registry(collector), settings.host, settings.metrics_port
            )

    def _notify(self, instance_id: int) -> None:
        self.enqueuer.submit(instance_id)

    def _detail(self) -> dict[str, Any]:
        return {
            "ae_title": self.settings.ae_title,
            "port": self.scp.port,
            "counters": dict(self.scp.counters),
            "connections_refused": self.scp.refused_connections,
            "enqueue_backlog": self.enqueuer.backlog,
            "frozen_start_up_objects": gc.get_freeze_count(),  # serve_forever's
        }

    def start(self) -> None:
        if not self.settings.allowed_aets:
            logger.warning("BONEAGE_ALLOWED_AETS is empty: any calling AE title may send images")
        if self.metrics is not None:
            # First: a port already taken stops the listener before it accepts images.
            self.metrics.start()
        self.enqueuer.start()
        self.scp.start()
        self.heartbeat.start()
        self._reconciler.start()

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        self.enqueuer.stop()
        self.heartbeat.stop()
        if self.metrics is not None:
            self.metrics.stop()

    def reconcile_once(self, *, startup: bool = False) -> None:
        try:
            reconcile_via_broker(self.runtime, startup=startup)
        except Exception as exc:
            logger.warning("reconciliation failed (%s); next round retries", type(exc).__name__)

    def _reconcile_loop(self) -> None:
        retention_due = time.monotonic() + RETENTION_FIRST_SECONDS
        while not self._stop.wait(self.settings.reconcile_interval_seconds):
            self.reconcile_once()
            try:
                self.scp.sweep_incoming()  # partial files nothing will finish
            except OSError as exc:
                logger.warning("spool/.incoming not swept (%s)", exc.strerror or exc)
            try:
                prune_embedded_broker(self.settings.effective_broker_url)
            except Exception as exc:
                logger.warning("embedded broker not pruned (%s)", type(exc).__name__)
            if time.monotonic() >= retention_due:
                retention_due = time.monotonic() + RETENTION_INTERVAL_SECONDS
                self.apply_retention()

    def apply_retention(self) -> RetentionReport | None:
        """Remove the files BONEAGE_RETENTION_DAYS lets go (None when it is 0 or fails)."""
        days = self.settings.retention_days
        if not days:
            return None
        try:
            return remove_expired_files(
                self.settings.effective_database_url,
                older_than=timedelta(days=days),
                outbox_dir=self.settings.outbox_dir,
                spool_dir=self.settings.spool_dir,
            )
        except Exception as exc:
            logger.warning("retention not applied (%s); next round retries", type(exc).__name__)
            return None

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT."""
        done = threading.Event()

        def _signal(signum: int, _frame: Any) -> None:
            logger.info("listener stopping (signal %d)", signum)
            done.set()

        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
        self.start()
        # What start-up made and kept (SQLAlchemy, kombu, pydicom's dictionaries: some
        # 130,000 objects) lives as long as the process; the collector's full passes
        # walked it all, 0.1 s of CPU about every 40 instances of a burst.
        freeze_start_up_objects()
        self.heartbeat.beat()  # with the count, not ten seconds later
        try:
            done.wait()
        finally:
            self.stop()
