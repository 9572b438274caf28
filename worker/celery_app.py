"""The Celery application: two queues, late acknowledgement, one task at a time.

``inference`` carries ``boneage.assess`` (GPU/CPU heavy, one worker process per
device); ``delivery`` carries ``boneage.deliver`` and ``boneage.reconcile``
(network bound). Tasks take database ids, never datasets.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from worker.settings import Settings

INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"

ASSESS_TASK = "boneage.assess"
DELIVER_TASK = "boneage.deliver"
RECONCILE_TASK = "boneage.reconcile"

app = Celery("boneage_worker", include=["worker.tasks"])


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        # kombu's SQLAlchemy transport hands these to create_engine: wait on a busy
        # SQLite file instead of failing.
        return {"connect_args": {"timeout": 30}}
    options: dict[str, Any] = {
        # Unacknowledged messages come back after this; it must exceed the longest task.
        "visibility_timeout": 4 * 3600,
        "socket_connect_timeout": 5,
    }
    if settings.broker_prefix:
        options["global_keyprefix"] = settings.broker_prefix
    return options


def configure(settings: Settings) -> Celery:
    """Point the process-wide app at the configured broker (call once per process)."""
    app.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(INFERENCE_QUEUE), Queue(DELIVERY_QUEUE)),
        task_default_queue=DELIVERY_QUEUE,
        task_routes={
            ASSESS_TASK: {"queue": INFERENCE_QUEUE},
            DELIVER_TASK: {"queue": DELIVERY_QUEUE},
            RECONCILE_TASK: {"queue": DELIVERY_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        # A broker outage must not stall the listener's enqueuer for minutes.
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
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
