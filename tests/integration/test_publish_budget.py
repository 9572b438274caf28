"""A publish to Redis gives up within about its budget (`PUBLISH_BUDGET_SECONDS`), all
its tries together, and its image is published once the broker answers again.

The broker is the real Redis behind a real TCP proxy (`tests.proxy.TcpProxy`) that stops
forwarding and closes nothing (a connection a firewall dropped: half-open), with the
service's timeouts: what these tests prove is the service's own bound, so each publish
that gives up costs its real time, about 20 s (the reply's wait, 10 s, then the new
connection's first command's, 10 s), and the file about a minute. Before the budget,
each of the retry policy's three tries waited out the socket timeout, and as long again
to connect anew: about 3 min with the 30 s timeout of the time.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from db.engine import upgrade
from db.schema import InstanceState
from tests.proxy import TcpProxy
from tests.support import (
    free_port,
    instance_state,
    own_redis_server,
    received,
    redis_queue_ids,
    timed_call,
    wait_for,
)
from worker import messaging
from worker.celery_app import (
    BROKER_SOCKET_TIMEOUT,
    INFERENCE_QUEUE,
    PUBLISH_BUDGET_SECONDS,
    configure,
)
from worker.listener import record_instance
from worker.messaging import Enqueuer, enqueue_assess, enqueue_delivery
from worker.settings import load_settings

pytestmark = pytest.mark.integration

#: What a publish may take, all its tries together: the budget the README states.
BUDGET = PUBLISH_BUDGET_SECONDS

#: What a publish may take beyond the budget: the test's polling (0.1 s) or thread.
MARGIN = 1.0


def _node(tmp_path: Path, broker_url: str, prefix: str) -> str:
    """Configure the app on ``broker_url``; the database's URL."""
    settings = load_settings(data_dir=tmp_path, broker_url=broker_url, broker_prefix=prefix)
    upgrade(settings.effective_database_url)
    configure(settings)
    return settings.effective_database_url


def _published(prefix: str, queue: str = INFERENCE_QUEUE) -> list[object]:
    """The first argument of each message waiting in ``queue``, oldest first, each once:
    a message may be there twice, harmlessly (`tests.support.redis_queue_ids`)."""
    return redis_queue_ids(prefix, queue, each_once=True)


def test_the_enqueuers_publish_gives_up_within_the_budget_and_the_image_waits(
    tmp_path: Path,
    proxied_redis: tuple[TcpProxy, str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, broker_url, prefix = proxied_redis
    url = _node(tmp_path, broker_url, prefix)
    enqueuer = Enqueuer(url)
    enqueuer.start()
    try:
        first = record_instance(url, received("1.2.3.6.1"))
        enqueuer.submit(first)
        wait_for(
            lambda: instance_state(url, first) == InstanceState.QUEUED,
            timeout=30,
            what="first queued",
        )

        proxy.black_hole()
        second = record_instance(url, received("1.2.3.6.2"))
        with caplog.at_level(logging.ERROR, logger="worker.messaging"):
            began = time.monotonic()
            enqueuer.submit(second)
            wait_for(
                lambda: "broker unavailable" in caplog.text,
                timeout=BUDGET + MARGIN,
                what="the publish on the half-open connection to give up",
            )
            took = time.monotonic() - began
        assert took < BUDGET + MARGIN, f"the publish gave up after {took:.1f} s"
        assert "PublishBudgetExceeded" in caplog.text
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


def test_a_publish_on_the_apps_pool_gives_up_within_the_budget(
    tmp_path: Path, proxied_redis: tuple[TcpProxy, str, str]
) -> None:
    proxy, broker_url, prefix = proxied_redis
    _node(tmp_path, broker_url, prefix)
    enqueue_assess(1)  # the pool's connection, through the proxy, is open
    proxy.black_hole()

    # the reconciler's publishes, and those of a task: they raise, and their rows wait
    took, error = timed_call(lambda: enqueue_assess(2), BUDGET + MARGIN)
    assert isinstance(error, OperationalError), f"the publish returned: {error!r}"
    assert isinstance(error, messaging.PublishBudgetExceeded), repr(error)
    assert took < BUDGET + MARGIN

    # on a connection the pool has to open again: kombu gives up after its connect timeout
    took, error = timed_call(lambda: enqueue_delivery([7, 8]), BUDGET + MARGIN)
    assert isinstance(error, OperationalError), repr(error)
    assert took < BUDGET + MARGIN

    proxy.forward()
    enqueue_assess(2)
    assert _published(prefix) == [1, 2]
    assert _published(prefix, "delivery") == []


#: How long the Redis of `test_a_publish_waits_out_a_healthy_redis_that_stalls` stalls, as
#: one with appendonly does while its disk is busy: longer than the 3 s a command once
#: waited, well within the socket timeout.
STALL_SECONDS = 5


@pytest.fixture
def stallable_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The port of a redis-server of this test's own that takes ``DEBUG SLEEP`` (a stall
    of the shared one would stall every test using it)."""
    port = free_port()
    options = ["--port", str(port), "--dir", str(tmp_path), "--enable-debug-command", "yes"]
    with own_redis_server(port, options, monkeypatch):
        yield port


def _stalled(port: int) -> bool:
    """Whether the Redis on ``port`` leaves a PING unanswered for 0.2 s (on a socket of
    its own: redis-py would try it again itself)."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
        sock.sendall(b"PING\r\n")
        try:
            sock.recv(64)
        except TimeoutError:
            return True
    return False


def test_a_publish_waits_out_a_healthy_redis_that_stalls(
    tmp_path: Path, stallable_redis: int
) -> None:
    """A Redis that stalls for a few seconds (appendonly's fsync on a disk a backfill keeps
    busy) is not taken for one that is gone: the publish waits for it and goes once. With
    a 3 s socket timeout it timed out and was published again, on a new connection, while
    Redis still held the first: the message was there twice. About 5 s."""
    assert STALL_SECONDS < BROKER_SOCKET_TIMEOUT
    port = stallable_redis
    _node(tmp_path, f"redis://127.0.0.1:{port}/0", "")
    enqueue_assess(1)  # the pool's connection is open
    stall = threading.Thread(
        target=lambda: redis.Redis(host="127.0.0.1", port=port).execute_command(
            "DEBUG", "SLEEP", STALL_SECONDS
        ),
        name="stall",
        daemon=True,
    )
    stall.start()
    wait_for(lambda: _stalled(port), timeout=10, what="Redis to stall")

    took, error = timed_call(lambda: enqueue_assess(2), BUDGET + MARGIN)
    assert error is None, f"the publish failed after {took:.1f} s: {error!r}"
    stall.join(BUDGET)
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        raw = client.lrange(INFERENCE_QUEUE, 0, -1)
    finally:
        client.close()
    firsts = [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw]
    assert sorted(firsts) == [1, 2]  # each once
