"""Prometheus metrics: the node's state for the listener's ``/metrics``, counters for workers.

The listener (``BONEAGE_METRICS_PORT``) serves :class:`NodeCollector`: everything is
read from the database and the broker when Prometheus scrapes, with aggregated
queries and a one-hour window for latencies (gauge histograms). Each is served by an
index (revisions 0021, 0024): the hour's rows and the images still on disk are read
alone, and the counts by state and by delivery state read their indexes, not the rows;
the reasons of the images not assessed are read from the rows, once per scrape.

A worker (``BONEAGE_WORKER_METRICS_PORT``; a worker that consumes only the delivery
queue uses that port + 1, so that ``serve``'s two workers do not collide) serves the
counters of the tasks it ran. With ``--pool solo`` or ``--pool threads`` (a batching
inference worker) they live in the worker's memory.
A prefork worker (the CPU inference worker's default) runs its tasks in child
processes, so it uses prometheus_client's multiprocess mode: ``work`` points
prometheus_client at a directory of the worker's own before importing it
(:mod:`worker.metrics_files`), every child writes its counters to memory-mapped files
there, and the main process serves their sum (:func:`multiprocess_registry`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from db import queries
from db.engine import session_scope
from worker.heartbeat import STALE_AFTER, live_workers_by_queue
from worker.metrics_files import MULTIPROCESS_ENV
from worker.storage import disk_space

logger = logging.getLogger(__name__)

#: Latency buckets (seconds) for received → assessed and received → delivered.
LATENCY_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Wall time of assessing one image on CPU or GPU.
ASSESS_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
LATENCY_WINDOW = timedelta(hours=1)
#: Images per batched forward pass.
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def histogram_buckets(values: Sequence[float], bounds: Sequence[float]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of ``values``, ending with ``+Inf``."""
    ordered = sorted(values)
    buckets: list[tuple[str, float]] = []
    index = 0
    for bound in bounds:
        while index < len(ordered) and ordered[index] <= bound:
            index += 1
        buckets.append((str(float(bound)), float(index)))
    buckets.append(("+Inf", float(len(ordered))))
    return buckets


class NodeCollector(Collector):
    """The node's state, computed at scrape time from the database and the broker.

    Parameters
    ----------
    database_url
        The node's database.
    queue_depths
        Returns messages waiting per queue; raising means the broker is down.
    listener_counters
        The listener's own counters (stored, refused, failed associations' objects).
    refused_connections
        Connections the listener closed on arrival, for being more than it takes at once.
    data_dir
        The data directory (spool, outbox), whose disk space is reported.
    """

    def __init__(
        self,
        database_url: str,
        queue_depths: Callable[[], Mapping[str, int]],
        listener_counters: Callable[[], Mapping[str, int]] | None = None,
        data_dir: Path | None = None,
        refused_connections: Callable[[], int] | None = None,
    ) -> None:
        self.database_url = database_url
        self.queue_depths = queue_depths
        self.listener_counters = listener_counters
        self.refused_connections = refused_connections
        self.data_dir = data_dir

    def describe(self) -> Iterable[Metric]:
        # No scrape at registration: families are produced only when collected.
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("boneage_up", "1 when this boneage-worker process answers.")
        up.add_metric([], 1)
        yield up
        yield from self._listener()
        yield from self._storage()
        yield from self._broker()
        yield from self._database()

    def _storage(self) -> Iterable[Metric]:
        space = disk_space(self.data_dir) if self.data_dir is not None else None
        if space is None:
            return
        for name, what, amount in (
            ("boneage_storage_free_bytes", "Free", space.free_bytes),
            ("boneage_storage_total_bytes", "Size of", space.total_bytes),
        ):
            gauge = GaugeMetricFamily(name, f"{what} the disk holding the data directory.")
            gauge.add_metric([], amount)
            yield gauge

    def _listener(self) -> Iterable[Metric]:
        if self.listener_counters is None:
            return
        counters = dict(self.listener_counters())
        # associations, not objects: one refused may have carried a whole study
        associations = CounterMetricFamily(
            "boneage_listener_associations_refused",
            "Associations the listener refused since it started: a called AE title not "
            "this node's, a calling AE title not allowed (or not from its pinned address), "
            "or more at once than it takes (from one address, or past 64 in all).",
        )
        associations.add_metric([], counters.pop("refused", 0))
        yield associations
        received = CounterMetricFamily(
            "boneage_listener_objects",
            "Objects offered to the listener by C-STORE since it started, by outcome.",
            labels=["outcome"],
        )
        for outcome, count in sorted(counters.items()):
            received.add_metric([outcome], count)
        yield received
        if self.refused_connections is not None:
            refused = CounterMetricFamily(
                "boneage_listener_connections_refused",
                "Connections closed on arrival since the listener started, for being more "
                "than it takes at once, in all or from one address (a port scan, clients "
                "that connect and never speak).",
            )
            refused.add_metric([], self.refused_connections())
            yield refused

    def _broker(self) -> Iterable[Metric]:
        broker_up = GaugeMetricFamily("boneage_broker_up", "1 when the broker answered.")
        depth = GaugeMetricFamily(
            "boneage_queue_depth", "Messages waiting in a broker queue.", labels=["queue"]
        )
        try:
            depths = self.queue_depths()
        except Exception as exc:  # any broker trouble is what this gauge reports
            logger.warning("metrics: broker unreachable (%s)", type(exc).__name__)
            broker_up.add_metric([], 0)
        else:
            broker_up.add_metric([], 1)
            for queue, count in sorted(depths.items()):
                depth.add_metric([queue], count)
        yield broker_up
        yield depth

    def _database(self) -> Iterable[Metric]:
        database_up = GaugeMetricFamily("boneage_database_up", "1 when the database answered.")
        try:
            with session_scope(self.database_url) as session:
                instances = queries.instance_counts(session)
                reasons = queries.not_assessed_by_reason(session)
                deliveries = queries.delivery_counts(session)
                # by the database's clock, which dated the rows (hosts' clocks may differ)
                current = queries.database_now(session)
                latencies = queries.latencies_since(session, current - LATENCY_WINDOW)
                beats = queries.heartbeats(session)
                spool_images, spool_bytes = queries.spooled(session)
        except Exception as exc:  # the scrape must answer, saying the database is down
            logger.warning("metrics: database unreachable (%s)", type(exc).__name__)
            database_up.add_metric([], 0)
            yield database_up
            return
        database_up.add_metric([], 1)
        yield database_up

        by_state = GaugeMetricFamily(
            "boneage_instances", "Received instances by state.", labels=["state"]
        )
        for state, count in instances.items():
            by_state.add_metric([state], count)
        yield by_state
        by_reason = GaugeMetricFamily(
            "boneage_instances_not_assessed",
            "Instances not assessed, by reason category.",
            labels=["reason"],
        )
        for reason, count in reasons.items():
            by_reason.add_metric([reason], count)
        yield by_reason
        sent = GaugeMetricFamily(
            "boneage_deliveries", "SR, SC and rejection-note deliveries by state.", labels=["state"]
        )
        for state, count in deliveries.items():
            sent.add_metric([state], count)
        yield sent
        workers = GaugeMetricFamily(
            "boneage_workers",
            "Worker processes alive (a heartbeat in the last "
            f"{STALE_AFTER.total_seconds():.0f} s, by the database's clock), by the queue "
            "they consume: at 0, images (or results) wait, however quiet the night.",
            labels=["queue"],
        )
        for queue, count in live_workers_by_queue(beats, current).items():
            workers.add_metric([queue], count)
        yield workers
        for name, what, amount in (
            ("boneage_spool_images", "Received images on disk", spool_images),
            ("boneage_spool_bytes", "Bytes of the received images on disk", spool_bytes),
        ):
            gauge = GaugeMetricFamily(
                name, f"{what} (retention, BONEAGE_RETENTION_DAYS, has not removed them)."
            )
            gauge.add_metric([], amount)
            yield gauge
        # A window, not a running total: its buckets go down as the hour moves on. A
        # gauge histogram says so (OpenMetrics), where a histogram's counters would be
        # read by rate() as reset at every fall; histogram_quantile() reads its buckets
        # as they are.
        for name, what, values in (
            ("boneage_received_to_assessed_seconds", "a result", latencies.to_assessed),
            ("boneage_received_to_delivered_seconds", "the last delivery", latencies.to_delivered),
        ):
            yield GaugeHistogramMetricFamily(
                name,
                f"Seconds from reception to {what}, for the instances of the last hour.",
                buckets=histogram_buckets(values, LATENCY_BUCKETS),
                gsum_value=sum(values),
            )


class MetricsServer:
    """A ``/metrics`` HTTP server on a daemon thread, serving one registry."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )
        logger.info("metrics served on %s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def node_registry(collector: NodeCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProcessCollector(registry=None))
    registry.register(collector)
    return registry


# -- worker metrics (filled by worker/tasks.py) ---------------------------------------

WORKER_REGISTRY = CollectorRegistry()
ProcessCollector(registry=WORKER_REGISTRY)

TASKS = Counter(
    "boneage_worker_tasks",
    "Tasks run by this worker, by task name and outcome.",
    ["task", "outcome"],
    registry=WORKER_REGISTRY,
)
ASSESS_SECONDS = Histogram(
    "boneage_assess_seconds",
    "Wall time of assessing one image that was assessed (read, gate, decode, model, "
    "Grad-CAM, SR and SC).",
    buckets=ASSESS_BUCKETS,
    registry=WORKER_REGISTRY,
)
INFERENCE_BATCH = Histogram(
    "boneage_inference_batch_images",
    "Images per forward pass of a batching inference worker (BONEAGE_INFERENCE_BATCH).",
    buckets=BATCH_BUCKETS,
    registry=WORKER_REGISTRY,
)
INFERENCE_BATCH_SECONDS = Histogram(
    "boneage_inference_batch_seconds",
    "Wall time of one batched forward pass with Grad-CAM.",
    buckets=ASSESS_BUCKETS,
    registry=WORKER_REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "boneage_delivery_attempts",
    "Delivery attempts by this worker, by outcome (delivered, retry, failed, skipped; "
    "waiting: a rejection note of ours held, not sent, while its object is being sent).",
    ["outcome"],
    registry=WORKER_REGISTRY,
)


def observe_inference_batch(images: int, seconds: float) -> None:
    """Record one batched forward pass (the batching predictor's observer)."""
    INFERENCE_BATCH.observe(images)
    INFERENCE_BATCH_SECONDS.observe(seconds)


def multiprocess_registry() -> CollectorRegistry | None:
    """The sum of every process's worker metrics in multiprocess mode; else None."""
    directory = os.environ.get(MULTIPROCESS_ENV)
    if not directory:
        return None
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry
