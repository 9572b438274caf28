"""The Celery application: two queues, late acknowledgement, one task at a time.

``inference`` carries ``boneage.assess`` (GPU/CPU heavy, one worker process per
device); ``delivery`` carries ``boneage.deliver`` and ``boneage.reconcile``
(network bound). Tasks take database ids, never datasets.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import ssl
import time
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery
from kombu import Queue
from kombu.transport import TRANSPORT_ALIASES

from worker.embedded_broker import sqlite_path, wakeups_available
from worker.settings import Settings

logger = logging.getLogger(__name__)

#: Messages a worker process holds per task it can run. On Redis or RabbitMQ the next
#: message is pushed within a millisecond of an acknowledgement, and a consumer of the
#: embedded broker is woken by it (`embedded_broker.Waker`), so a worker holds only what
#: it runs (prefetch 1).
PREFETCH_MULTIPLIER = 1

#: Where the embedded broker's consumers cannot be woken (no inotify) they poll: after an
#: acknowledgement the consumer learns of the free slot at its next poll, up to
#: `embedded_broker.POLL_SECONDS` later, and a prefork child stood idle that long after
#: every image (the machine 90 % busy through a burst instead of 97 %). There each process
#: holds one message more. Nothing is less safe for it: acknowledgement stays late, and
#: the messages a killed worker held are re-queued by the reconciler, as the one it was
#: running always was.
POLLED_PREFETCH_MULTIPLIER = 2

#: The transport behind the embedded broker's "sqla+sqlite:///" URL.
EMBEDDED_TRANSPORT = "worker.embedded_broker:Transport"

INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"

ASSESS_TASK = "boneage.assess"
DELIVER_TASK = "boneage.deliver"
RECONCILE_TASK = "boneage.reconcile"

app = Celery("boneage_worker", include=["worker.tasks"])


def deliver_time_limit() -> float:
    """Seconds after which a ``deliver`` task is killed (Celery's hard time limit).

    Longer than the longest claim (`worker.delivery.MAX_CLAIM_SECONDS`), whose send
    ends before the claim does, so that no send that may still succeed is cut short;
    once it passes, the claim has run out and the reconciler sends the rows again. Each
    send is bounded by its own timeouts (connection, ACSE, DIMSE, network) and its
    deadline: this catches what they do not. Celery enforces it in the prefork pool
    only, not in the solo pool.
    """
    from worker.delivery import MAX_CLAIM_SECONDS, SEND_TIMEOUT

    # the longest claim: a send ends before it does (its ``deadline``)
    return MAX_CLAIM_SECONDS + 2 * SEND_TIMEOUT


#: Seconds a command to Redis waits for its reply before it fails (redis-py's
#: TimeoutError, one of kombu's connection errors: the publish is retried on a new
#: connection, then fails to its caller, who tries again), and, as a publish's
#: ``timeout`` and ``confirm_timeout``, an AMQP message's write and the wait for
#: RabbitMQ's confirm. Without it, a connection that a firewall or NAT dropped without
#: closing (half-open) held a publish, a query of the queues, or the reconciler, until TCP
#: gave up retransmitting, about 15 min; the listener's enqueuer meanwhile published
#: nothing. It applies to every Redis connection: consumers (a BRPOP returns every second,
#: kombu's brpop_timeout), a task's acknowledgement, `status`'s queries. A healthy broker
#: answers in milliseconds, but not always: RabbitMQ confirms a persistent message after
#: its fsync, and a Redis with appendonly stalls writes for seconds while its disk is busy,
#: as it is during a PACS's backfill, when the spool and the database write the same disk.
#: 3 s (as it was for a while) was too short for that: publishes timed out and were
#: published again (duplicates, and new connections), a worker's acknowledgement failed
#: (its message came back after the visibility timeout, 4 h, and the image was assessed
#: again), and `status` called the broker unreachable.
BROKER_SOCKET_TIMEOUT = 10.0

#: Seconds to open a connection to the broker (TCP, and each wait of RabbitMQ's
#: handshake), Redis or RabbitMQ: a SYN lost once is sent again after 1 s, and a busy
#: broker takes a while to accept.
BROKER_CONNECT_TIMEOUT = 5.0

#: Seconds, about, that one publish may take, its tries, pauses and reconnections all
#: together; then it fails to its caller (`worker.messaging.PublishDeadline`), which keeps
#: the row for the next try, as for a broker that is away. What it bounds is how long a
#: broker in trouble holds whoever publishes: the listener's enqueuer (it publishes after
#: the PACS has had its answer, on a thread of its own, so no C-STORE waits for it, but
#: the images behind it do), a task (a worker's process, and the task's retry), or the
#: reconciler's round. A try is begun only while it can end within the budget (a new
#: connection, then a wait for the reply: `publish_try_seconds`), and none is cut short:
#: where a try waits on the broker more than that (a reconnection's handshake whose every
#: frame comes late, or py-amqp's channel.open and confirm_select, which wait without a
#: timeout of their own) the publish ends later, which only a broker that answers, but
#: slowly, does. A broker answers in milliseconds (RabbitMQ's confirm of a persistent
#: message: a few, for its fsync; seconds on a busy disk); a broker that is away, refusing
#: or blocked (a memory or disk alarm) uses the budget up. On a half-open connection a
#: publish gives up after two waits: about 20 s on Redis (the reply, then the new
#: connection's first command), 15 s on RabbitMQ (the confirm, then the handshake).
PUBLISH_BUDGET_SECONDS = 30.0


def broker_wait_seconds() -> float:
    """The longest one blocking step of a publish waits: opening a connection, one Redis
    command, an AMQP message's write, or the wait for RabbitMQ's confirm."""
    return max(BROKER_SOCKET_TIMEOUT, BROKER_CONNECT_TIMEOUT)


def publish_try_seconds() -> float:
    """What one more try of a publish may wait, about: a new connection, then one wait for
    the broker's reply (a Redis command's, or RabbitMQ's confirm)."""
    return BROKER_CONNECT_TIMEOUT + broker_wait_seconds()


def is_amqp(broker_url: str) -> bool:
    """Whether ``broker_url`` is RabbitMQ's (kombu's py-amqp transport)."""
    return broker_url.partition("://")[0].lower() in {"amqp", "amqps", "pyamqp"}


def broker_tls(broker_url: str) -> dict[str, Any] | None:
    """The TLS options of a connection to ``broker_url`` (Celery's ``broker_use_ssl``):
    the broker's certificate checked, chain and name, against the system's trusted
    authorities; None where kombu's own are to be taken (no TLS, or a ``rediss`` URL
    that says how in its query: ``?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem``).

    kombu connects to a ``rediss`` URL that says nothing with no check at all (one
    warning in the log): anyone on the path could pose as Redis and take its password and
    every message. py-amqp, given ``amqps``, checks the chain but not the name; it
    checks the name too, but for a list of brokers to fail over to
    (``amqps://a…;amqps://b…``), whose chain alone is checked.
    """
    parts = urlsplit(broker_url)
    scheme = parts.scheme.lower()
    if scheme == "rediss" and "ssl_cert_reqs" not in parse_qs(parts.query):
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if scheme == "amqps":
        if ";" in broker_url:
            # a failover list: kombu hands every host the one dict, and a name pinned
            # there would check the next broker's certificate against the first's name
            return {"cert_reqs": ssl.CERT_REQUIRED}
        return {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": parts.hostname}
    return None


#: TCP keepalive on broker connections, and how long data may stay unacknowledged
#: (TCP_USER_TIMEOUT, ms). An idle connection is probed after 30 s, which also keeps it
#: in the state tables of firewalls and NATs (whose idle timeouts are minutes), and one
#: whose peer is gone is closed within about a minute, before anything waits on it.
#: kombu hands redis-py ``socket_keepalive=None`` unless told: keepalive was off.
#: RabbitMQ needs nothing: py-amqp sets keepalive (60 s) and TCP_USER_TIMEOUT (1 s) on
#: its sockets itself, and Celery's consumer sends AMQP heartbeats (broker_heartbeat).
TCP_KEEPALIVE = {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}
TCP_USER_TIMEOUT_MS = 30_000


def tcp_keepalive_options() -> dict[int, int]:
    """`TCP_KEEPALIVE` and `TCP_USER_TIMEOUT_MS` as socket options (IPPROTO_TCP level),
    those of them this platform has."""
    named = {**TCP_KEEPALIVE, "TCP_USER_TIMEOUT": TCP_USER_TIMEOUT_MS}
    return {getattr(socket, name): value for name, value in named.items() if hasattr(socket, name)}


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        # kombu's SQLAlchemy transport hands these to create_engine: wait on a busy
        # SQLite file instead of failing.
        return {"connect_args": {"timeout": 30}}
    options: dict[str, Any] = {
        # Unacknowledged messages come back after this; it must exceed the longest task.
        "visibility_timeout": 4 * 3600,
        "socket_connect_timeout": BROKER_CONNECT_TIMEOUT,
        # Redis (py-amqp takes neither, and ignores them): a half-open connection fails
        # within the timeout, and an idle one is probed (see BROKER_SOCKET_TIMEOUT).
        # retry_on_timeout stays off: redis-py would send a publish that timed out again
        # itself, and kombu's retry policy already does so on a new connection.
        "socket_timeout": BROKER_SOCKET_TIMEOUT,
        "socket_keepalive": True,
        "socket_keepalive_options": tcp_keepalive_options(),
    }
    if settings.broker_prefix:
        options["global_keyprefix"] = settings.broker_prefix
    if is_amqp(settings.effective_broker_url):
        # Publisher confirms: each publish waits for RabbitMQ's basic.ack. Without them a
        # message the broker dropped (a queue at its length limit with reject-publish, a
        # connection lost after the write) was lost in silence, its row marked `queued`,
        # and the image waited for the reconciler. A basic.nack raises (py-amqp's
        # MessageNacked) and a confirm that does not come within `broker_wait_seconds`
        # times out: the publish is tried again, then fails to its caller, whose row
        # stays `received` for the next try. A message confirmed twice (a confirm lost
        # with its connection) is harmless: tasks are idempotent.
        options["confirm_publish"] = True
    return options


def use_write_ahead_log(broker_url: str, *, create: bool = True) -> None:
    """Switch the embedded broker's SQLite file to write-ahead logging.

    kombu opens it in SQLite's default rollback-journal mode, where every published
    message costs two or more fsyncs and readers block the writer; in WAL mode a commit
    is one fsync of the log, still durable (kombu keeps ``synchronous=FULL``), and the
    workers' polling no longer holds up the listener. The mode is stored in the file,
    so this is done once; the file is created when missing, unless ``create`` is false.
    """
    name = sqlite_path(broker_url)
    if name is None:
        return
    path = Path(name)
    if not create and not path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(path, timeout=30)) as connection:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    except sqlite3.Error as exc:
        logger.warning("embedded broker left in its journal mode (%s)", exc)
        return
    if str(mode).lower() != "wal":
        logger.warning("embedded broker could not switch to WAL (mode %s)", mode)


#: How often, and after which pauses, a publish (or the enqueuer's connection) is tried
#: before it fails: a broker outage must not stall the listener's enqueuer for minutes.
#: Our publishes also stop trying where another try could not end within
#: `PUBLISH_BUDGET_SECONDS` (`worker.messaging.PublishDeadline`).
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5}


def prefetch_multiplier(settings: Settings) -> int:
    """One message a process where the broker pushes or wakes its consumers, two where
    they poll (a ``sqla+`` broker that is not a SQLite file, or no inotify)."""
    if not settings.embedded_broker:
        return PREFETCH_MULTIPLIER
    broker_file = sqlite_path(settings.effective_broker_url)
    if broker_file is not None and wakeups_available(broker_file):
        return PREFETCH_MULTIPLIER
    return POLLED_PREFETCH_MULTIPLIER


def configure(settings: Settings, *, create_broker: bool = True) -> Celery:
    """Point the process-wide app at the configured broker (call once per process).

    With ``create_broker`` false, an embedded broker's file missing is not created here
    (`status`, run where no node is, makes nothing there).
    """
    if settings.embedded_broker:
        use_write_ahead_log(settings.effective_broker_url, create=create_broker)
        # "sqla+" URLs get our subclass of kombu's transport in this process: its
        # consumers are woken by each publish and acknowledgement and poll every 1 s
        # (every 0.1 s where they cannot be woken), and a queue is not queried when
        # nothing was committed since it was found empty (worker.embedded_broker).
        TRANSPORT_ALIASES["sqla"] = EMBEDDED_TRANSPORT
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        # RabbitMQ's (Redis takes socket_connect_timeout from the transport options)
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT,
        broker_use_ssl=broker_tls(settings.effective_broker_url),
        task_queues=(Queue(INFERENCE_QUEUE), Queue(DELIVERY_QUEUE)),
        task_default_queue=DELIVERY_QUEUE,
        task_routes={
            ASSESS_TASK: {"queue": INFERENCE_QUEUE},
            DELIVER_TASK: {"queue": DELIVERY_QUEUE},
            RECONCILE_TASK: {"queue": DELIVERY_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=prefetch_multiplier(settings),
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Loading a ResNet-50 can exceed the 4 s default in a prefork child.
        worker_proc_alive_timeout=120,
        enable_utc=True,
    )
    app.conf["boneage_settings"] = settings
    return app


def queue_depths(celery: Celery) -> dict[str, int]:
    """Messages waiting in each queue, read from the broker itself."""
    depths: dict[str, int] = {}
    with celery.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=5)
        channel = connection.default_channel
        for name in (INFERENCE_QUEUE, DELIVERY_QUEUE):
            declared = channel.queue_declare(
                queue=name, passive=False, durable=True, auto_delete=False
            )
            depths[name] = int(declared.message_count)
    return depths


def prepare_embedded_broker(celery: Celery, *, attempts: int = 5) -> None:
    """Create the embedded broker's tables and queues before the processes using it start.

    kombu's SQLAlchemy transport creates them on first use. Processes started together
    (``serve`` starts three) then race: the loser's insert of a queue row fails with an
    IntegrityError, the publish or poll that made it fails, and that channel's session
    stays unusable. Done here first, nobody inserts later. A race with another node
    started on the same files at the same moment is met by trying again.
    """
    settings = celery.conf.get("boneage_settings")
    if settings is None or not settings.embedded_broker:
        return
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, attempts + 1):
        try:
            with celery.connection_for_write() as connection:
                channel = connection.default_channel
                for name in (INFERENCE_QUEUE, DELIVERY_QUEUE):
                    channel.queue_declare(queue=name, durable=True, auto_delete=False)
            return
        except SQLAlchemyError as exc:
            if attempt == attempts:
                # Not fatal: the enqueuer and Celery try again on their own.
                logger.warning("embedded broker queues not created (%s)", type(exc).__name__)
                return
            time.sleep(0.1 * attempt)
