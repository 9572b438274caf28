"""A broker or database connection that a firewall dropped without closing (half-open)
holds nothing up for long: a publish fails within the broker's socket timeout, and
what it was publishing is published once the network works again.

The broker is the real Redis behind a real TCP proxy (`tests.proxy.TcpProxy`) that
stops forwarding, and closes nothing. Keepalive is read from the kernel's sockets.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from db.engine import create_db_engine, upgrade
from db.schema import InstanceState
from tests.proxy import TcpProxy
from tests.support import instance_state, received, redis_queue_ids, wait_for
from worker import celery_app
from worker.celery_app import INFERENCE_QUEUE, PUBLISH_RETRY_POLICY, configure
from worker.listener import record_instance
from worker.messaging import Enqueuer
from worker.reconciler import reconcile_via_broker
from worker.runtime import Runtime
from worker.settings import Settings, load_settings

pytestmark = pytest.mark.integration

#: The broker's socket timeout in these tests, short to keep them fast (the service's is
#: `worker.celery_app.BROKER_SOCKET_TIMEOUT`, which test_publish_budget.py keeps).
TIMEOUT = 1.0

#: The most a publish may take on a half-open connection: each of the retry policy's
#: tries waits out the timeout, once to send and once more to connect again, and the
#: pauses between them. Without a timeout it took until TCP gave up, about 15 min.
BOUND = (PUBLISH_RETRY_POLICY["max_retries"] + 1) * 2 * TIMEOUT + 5


@pytest.fixture
def proxied_broker(
    proxied_redis: tuple[TcpProxy, str, str], monkeypatch: pytest.MonkeyPatch
) -> tuple[TcpProxy, str, str]:
    """`proxied_redis`, with the short socket timeout of these tests."""
    monkeypatch.setattr(celery_app, "BROKER_SOCKET_TIMEOUT", TIMEOUT)
    return proxied_redis


def _node(tmp_path: Path, broker_url: str, prefix: str, **overrides: Any) -> Settings:
    settings = load_settings(
        data_dir=tmp_path, broker_url=broker_url, broker_prefix=prefix, **overrides
    )
    upgrade(settings.effective_database_url)
    configure(settings)
    return settings


def _published(prefix: str) -> list[object]:
    """The instance ids of the `assess` messages waiting in the inference queue, oldest
    first (Redis, read directly)."""
    return redis_queue_ids(prefix, INFERENCE_QUEUE)


def _keepalive_timers(port: int) -> list[float]:
    """Seconds until the next keepalive probe of each established IPv4 connection to
    127.0.0.1:``port`` (inf for one whose keepalive timer is not armed), read from
    /proc/net/tcp: its ``tr`` field is 2 while the keepalive timer runs, and
    ``tm->when`` counts clock ticks."""
    ticks = os.sysconf("SC_CLK_TCK")
    timers = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            remote, state, timer = fields[2], fields[3], fields[5]
            if state != "01" or int(remote.split(":")[1], 16) != port:
                continue
            active, when = timer.split(":")
            timers.append(int(when, 16) / ticks if int(active, 16) == 2 else float("inf"))
    return timers


def test_a_publish_on_a_half_open_connection_fails_within_the_timeout_then_goes_out(
    tmp_path: Path,
    proxied_broker: tuple[TcpProxy, str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, broker_url, prefix = proxied_broker
    url = _node(tmp_path, broker_url, prefix).effective_database_url
    enqueuer = Enqueuer(url)
    enqueuer.start()
    try:
        first = record_instance(url, received("1.2.3.4.1"))
        enqueuer.submit(first)
        wait_for(
            lambda: instance_state(url, first) == InstanceState.QUEUED,
            timeout=30,
            what="first queued",
        )
        # the enqueuer's connection, idle, is probed by TCP keepalive
        timers = _keepalive_timers(proxy.port)
        assert timers and max(timers) <= celery_app.TCP_KEEPALIVE["TCP_KEEPIDLE"], timers

        proxy.black_hole()
        second = record_instance(url, received("1.2.3.4.2"))
        with caplog.at_level(logging.ERROR, logger="worker.messaging"):
            began = time.monotonic()
            enqueuer.submit(second)
            wait_for(
                lambda: "broker unavailable" in caplog.text,
                timeout=BOUND + 30,
                what="the publish on the half-open connection to fail",
            )
            took = time.monotonic() - began
        assert took < BOUND, f"the publish failed after {took:.1f} s"
        assert instance_state(url, second) == InstanceState.RECEIVED

        proxy.forward()
        wait_for(
            lambda: instance_state(url, second) == InstanceState.QUEUED,
            timeout=60,
            what="the second published once the network is back",
        )
        assert _published(prefix) == [first, second]
    finally:
        enqueuer.stop()


def test_a_reconciler_round_on_a_half_open_connection_ends_within_the_timeout(
    tmp_path: Path, proxied_broker: tuple[TcpProxy, str, str]
) -> None:
    proxy, broker_url, prefix = proxied_broker
    # what was received and not published is the reconciler's at once
    settings = _node(tmp_path, broker_url, prefix, requeue_after_seconds=0.001)
    url = settings.effective_database_url
    rt = Runtime(settings)
    first = record_instance(url, received("1.2.3.4.3"))
    # published on a connection of the app's pool, which the proxy then cuts off
    assert reconcile_via_broker(rt).instances == [first]

    proxy.black_hole()
    lost = record_instance(url, received("1.2.3.4.4"))
    began = time.monotonic()
    report = reconcile_via_broker(rt)
    took = time.monotonic() - began
    # the queues' depths asked for, then one publish tried
    assert took < 2 * BOUND, f"the round took {took:.1f} s"
    assert report.instances == []
    assert instance_state(url, lost) == InstanceState.RECEIVED

    proxy.forward()
    assert reconcile_via_broker(rt).instances == [lost]
    assert _published(prefix) == [first, lost]


def test_database_connections_are_probed_and_fail_on_unacknowledged_data(
    postgres_url: str,
) -> None:
    engine = create_db_engine(postgres_url)
    try:
        with engine.connect() as connection:
            fd = connection.connection.dbapi_connection.fileno()  # type: ignore[union-attr]
            with socket.socket(fileno=os.dup(fd)) as sock:
                options = {
                    name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")
                }
                keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                user_timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        # probed after 30 s idle (the system's default is 2 h), gone after 3 probes
        assert keepalive == 1
        assert options == {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
        # a query sent into a half-open connection fails after 30 s, not after TCP's
        # retransmissions (about 15 min)
        assert user_timeout == 30_000
        # and a pooled connection is never idle as long as a firewall keeps its state
        assert 0 < engine.pool._recycle <= 240
    finally:
        engine.dispose()
