"""Prometheus metrics of a running node: the listener's /metrics and the workers' own.

`boneage-worker serve` with BONEAGE_METRICS_PORT and BONEAGE_WORKER_METRICS_PORT on
free ports, two prefork inference processes and a solo delivery worker; a hand and a
CT go in by dcmtk storescu; once the results are delivered, the three /metrics
endpoints are scraped over HTTP and parsed as Prometheus does.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from db.engine import session_scope, upgrade
from db.queries import database_now
from db.schema import Heartbeat, Instance, InstanceState
from db.schema import utcnow as now
from tests.conftest import StoreSCP
from tests.integration.test_end_to_end import (
    Node,
    _all_delivered,
    base_env,
    make_inputs,
    spooled_bytes,
    storescu,
)
from tests.support import free_port, wait_for, wait_for_port
from worker.heartbeat import STALE_AFTER
from worker.metrics import MetricsServer, NodeCollector, node_registry

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port_pair() -> int:
    """A port ``p`` such that ``p`` and ``p + 1`` are both free (workers use both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def scrape(port: int) -> Samples | None:
    """Every sample of ``/metrics`` keyed by (name, sorted labels); None if not served yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    return parse(text)


def parse(text: str) -> Samples:
    """Every sample of a scrape's text keyed by (name, sorted labels)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_of_a_running_node(
    tmp_path: Path, storescp: StoreSCP, tiny_checkpoint: Path
) -> None:
    port, metrics_port, worker_port = free_port(), free_port(), free_port_pair()
    env = base_env(tmp_path, storescp, tiny_checkpoint, port)
    env.update(
        BONEAGE_METRICS_PORT=str(metrics_port),
        BONEAGE_WORKER_METRICS_PORT=str(worker_port),
        # two prefork inference processes (the CPU default on two cores): their counters
        # are summed through prometheus_client's multiprocess files; delivery is solo
        BONEAGE_INFERENCE_PROCESSES="2",
        BONEAGE_HOST="127.0.0.1",
        # the host's temporary directory, where a prefork worker's children keep their
        # metric files (never the data directory other hosts share)
        TMPDIR=str(tmp_path / "tmp"),
    )
    (tmp_path / "tmp").mkdir()
    node = Node(tmp_path, env)
    try:
        serve = node.start("serve", "serve")
        wait_for_port(port, timeout=120, process=serve)
        # Before any image: served, and every state is there at zero.
        empty = wait_for(lambda: scrape(metrics_port), timeout=30, what="listener /metrics")
        assert value(empty, "boneage_up") == 1
        assert value(empty, "boneage_instances", state="assessed") == 0

        hand, ct = make_inputs(tmp_path, env)
        storescu(port, hand, ct)
        storescp.wait_for_objects(2, timeout=240)
        database_url = f"sqlite:///{tmp_path / 'data' / 'boneage.db'}"
        wait_for(lambda: _all_delivered(database_url), timeout=60, what="deliveries delivered")

        node_metrics = scrape(metrics_port)
        assert node_metrics is not None
        assert value(node_metrics, "boneage_up") == 1
        assert value(node_metrics, "boneage_database_up") == 1
        assert value(node_metrics, "boneage_broker_up") == 1
        assert value(node_metrics, "boneage_instances", state="assessed") == 1
        assert value(node_metrics, "boneage_instances", state="not_assessed") == 1
        assert value(node_metrics, "boneage_instances_not_assessed", reason="sop_class") == 1
        assert value(node_metrics, "boneage_instances_not_assessed", reason="other") == 0
        assert value(node_metrics, "boneage_deliveries", state="delivered") == 2
        assert value(node_metrics, "boneage_deliveries", state="failed") == 0
        for queue in ("inference", "delivery"):
            assert value(node_metrics, "boneage_queue_depth", queue=queue) >= 0
        assert value(node_metrics, "boneage_listener_objects_total", outcome="stored") == 2
        assert ("boneage_listener_objects_total", (("outcome", "refused"),)) not in node_metrics
        assert value(node_metrics, "boneage_listener_associations_refused_total") == 0
        assert value(node_metrics, "boneage_listener_connections_refused_total") == 0
        assert value(node_metrics, "boneage_received_to_assessed_seconds_gcount") >= 1
        assert value(
            node_metrics, "boneage_received_to_assessed_seconds_bucket", le="+Inf"
        ) == value(node_metrics, "boneage_received_to_assessed_seconds_gcount")
        assert value(node_metrics, "boneage_received_to_delivered_seconds_gcount") >= 1
        # BONEAGE_INFERENCE_PROCESSES, each with its heartbeat
        assert value(node_metrics, "boneage_workers", queue="inference") == 2
        assert value(node_metrics, "boneage_workers", queue="delivery") == 1
        assert value(node_metrics, "boneage_spool_images") == 2
        assert value(node_metrics, "boneage_spool_bytes") == spooled_bytes(tmp_path / "data")
        free = value(node_metrics, "boneage_storage_free_bytes")
        assert 0 < free <= value(node_metrics, "boneage_storage_total_bytes")
        # Labels are categories, never text from an image.
        reasons = {
            dict(labels)["reason"] for name, labels in node_metrics if "reason" in dict(labels)
        }
        assert reasons <= {
            "sop_class",
            "own_result",
            "study_uid",
            "pixels",
            "body_part",
            "view",
            "size",
            "pixel_shape",
            "sex",
            "age",
            "parse",
            "key_object",
            "other",
        }

        inference = wait_for(
            lambda: scrape(worker_port), timeout=30, what="inference worker /metrics"
        )
        assessed = value(
            inference, "boneage_worker_tasks_total", task="boneage.assess", outcome="assessed"
        )
        not_assessed = value(
            inference, "boneage_worker_tasks_total", task="boneage.assess", outcome="not_assessed"
        )
        assert (assessed, not_assessed) == (1, 1)  # each counted once, whichever child ran it
        assert value(inference, "boneage_assess_seconds_count") == 1
        assert value(inference, "boneage_assess_seconds_bucket", le="+Inf") == 1
        local = tmp_path / "tmp" / f"boneage-worker-{os.getuid()}" / "metrics"
        assert any((local / f"inference-{worker_port}").glob("*.db")), "the children's files"
        assert not (tmp_path / "data" / "metrics").exists()  # shared with other hosts

        delivery = wait_for(
            lambda: scrape(worker_port + 1), timeout=30, what="delivery worker /metrics"
        )
        assert value(delivery, "boneage_delivery_attempts_total", outcome="delivered") == 2
        # the assessed image's SR and SC went in one task (one association)
        assert (
            value(
                delivery, "boneage_worker_tasks_total", task="boneage.deliver", outcome="delivered"
            )
            == 1
        )
    finally:
        codes = node.stop()
    assert codes == [0], node.log_text()[-4000:]


def test_connections_the_listener_closed_on_arrival_are_a_counter(tmp_path: Path) -> None:
    """What `StorageSCP.refused_connections` says reaches the scrape as a counter."""
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    upgrade(url)
    refused = [0]
    registry = CollectorRegistry()
    registry.register(
        NodeCollector(
            url, lambda: {}, lambda: {"stored": 0}, refused_connections=lambda: refused[0]
        )
    )

    def scraped() -> float:
        text = generate_latest(registry).decode()
        [family] = [
            f
            for f in text_string_to_metric_families(text)
            if f.name == "boneage_listener_connections_refused"
        ]
        assert family.type == "counter"
        [sample] = family.samples
        assert sample.name == "boneage_listener_connections_refused_total"
        return float(sample.value)

    assert scraped() == 0
    refused[0] = 12
    assert scraped() == 12


def test_the_last_hours_latencies_are_gauge_histograms(tmp_path: Path) -> None:
    """Served as Prometheus asks (OpenMetrics), the latencies of the last hour are
    gauge histograms: a window, whose buckets go down as the hour moves on, which a
    histogram's counters would have rate() read as resets."""
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    upgrade(url)
    current = now()
    with session_scope(url) as session:
        for n, (seconds, state) in enumerate([(90, "assessed"), (7, "assessed"), (5, "error")]):
            session.add(
                Instance(
                    sop_instance_uid=f"1.2.3.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    study_instance_uid="1.2.3",
                    series_instance_uid="1.2.3.9",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    calling_ae_title="PACS",
                    spool_path=f"/nonexistent/{n}.dcm",
                    size_bytes=1,
                    state=InstanceState(state),
                    received_at=current - dt.timedelta(seconds=seconds),
                    finished_at=current,
                )
            )
    registry = node_registry(NodeCollector(url, lambda: {}))
    server = MetricsServer(registry, "127.0.0.1", free_port()).start()
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            text = answer.read().decode()
    finally:
        server.stop()
    [family] = [
        f for f in openmetrics_families(text) if f.name == "boneage_received_to_assessed_seconds"
    ]
    assert family.type == "gaugehistogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("boneage_received_to_assessed_seconds_bucket", "10.0")] == 1
    assert samples[("boneage_received_to_assessed_seconds_bucket", "+Inf")] == 2
    assert samples[("boneage_received_to_assessed_seconds_gcount", None)] == 2
    assert 96 <= samples[("boneage_received_to_assessed_seconds_gsum", None)] < 98


def test_live_workers_are_counted_by_queue(tmp_path: Path) -> None:
    """`boneage_workers{queue}` counts the workers whose heartbeat is fresh by the
    database's clock: a queue no live worker consumes reads 0, an alert's condition,
    whatever the queue's depth."""
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    upgrade(url)
    with session_scope(url) as session:
        current = database_now(session)
        for name, role, queues, seen in [
            ("inference-1", "worker", ["inference"], current),
            ("both", "worker", ["inference", "delivery"], current - dt.timedelta(seconds=10)),
            ("delivery-gone", "worker", ["delivery"], current - STALE_AFTER * 2),
            ("listener", "listener", [], current),
        ]:
            session.add(Heartbeat(name=name, role=role, detail={"queues": queues}, seen_at=seen))
    registry = CollectorRegistry()
    registry.register(NodeCollector(url, lambda: {}))

    def workers() -> dict[str, float]:
        text = generate_latest(registry).decode()
        [family] = [f for f in text_string_to_metric_families(text) if f.name == "boneage_workers"]
        return {sample.labels["queue"]: sample.value for sample in family.samples}

    assert workers() == {"inference": 2, "delivery": 1}
    with session_scope(url) as session:
        session.execute(delete(Heartbeat).where(Heartbeat.name == "both"))
    assert workers() == {"inference": 1, "delivery": 0}


def test_refused_associations_are_counted_apart_from_objects(tmp_path: Path) -> None:
    """The listener's refusals are of associations (each may have carried a study), not
    of objects: a counter of their own, never an outcome among the C-STOREs."""
    url = f"sqlite:///{tmp_path / 'boneage.db'}"
    upgrade(url)
    counters = {"stored": 3, "refused": 2, "failed": 1, "deferred": 4}
    registry = CollectorRegistry()
    registry.register(NodeCollector(url, lambda: {}, lambda: counters))
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "boneage_listener_associations_refused_total") == 2
    objects = {
        dict(labels)["outcome"]: count
        for (name, labels), count in samples.items()
        if name == "boneage_listener_objects_total"
    }
    assert objects == {"stored": 3, "failed": 1, "deferred": 4}
    assert counters["refused"] == 2  # the listener's own counters are left as they are
