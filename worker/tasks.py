"""Thin Celery tasks: ids in, plain functions do the work.

`acks_late` + `reject_on_worker_lost` mean a task whose worker dies is delivered
again; the functions it calls are idempotent, so that is safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Reject
from celery.signals import (
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from db.engine import dispose_after_fork, session_scope
from db.queries import take_instances
from db.schema import Delivery, DeliveryState, Instance, InstanceState
from dicom_io.pixels import set_jpeg2000_threads
from dicom_io.sr import local_time_zone, unknown_time_zone
from worker import metrics
from worker.celery_app import ASSESS_TASK, DELIVER_TASK, RECONCILE_TASK, app, deliver_time_limit
from worker.cgroups import cpu_quota, memory_limit
from worker.cores import CoreShare, batching_process_cores, cores_per_task, jpeg2000_threads
from worker.delivery import Claim, send_deliveries
from worker.heap import freeze_start_up_objects, keep_large_blocks, limit_arenas
from worker.heartbeat import HeartbeatThread, process_name
from worker.isolation import Isolation
from worker.messaging import (
    PublishDeadline,
    bounded_publish_options,
    enqueue_assess,
    enqueue_delivery,
    failure_name,
)
from worker.metrics_files import worker_metrics_port
from worker.pipeline import (
    BEING_ASSESSED,
    RETRIED_BY_THE_TASK,
    TRANSIENT_RETRIES,
    Attempt,
    assess_instance,
    give_up_retries,
    node_uids,
    sweep_staged,
    warm_up,
)
from worker.reconciler import (
    RETRY_BACKOFF_MAX_SECONDS,
    RETRY_BACKOFF_SECONDS,
    ReconcileReport,
    reconcile_via_broker,
)
from worker.runtime import Runtime
from worker.settings import Settings, usable_cpus

logger = logging.getLogger(__name__)

_state: dict[str, Any] = {"queues": ("inference", "delivery")}


def set_worker_queues(
    queues: tuple[str, ...],
    *,
    pool: str = "solo",
    concurrency: int = 1,
    settings: Settings | None = None,
    processes: int = 1,
) -> None:
    """Called by `boneage-worker work` before the worker starts (inherited by children).

    ``concurrency`` is the worker's processes (prefork) or task threads (threads). An
    inference worker's processes on a CPU, each with a share of the cores, get a
    :class:`~worker.cores.CoreShare` (unless ``settings`` fix the torch threads): a study
    that comes alone is then assessed on every core. ``processes`` is how many batching
    workers (threads pools) share this host's cores, this one included.
    """
    _state["queues"] = queues
    _state["pool"] = pool
    # the worker's own process: a prefork child whose start-up fails stops it
    # (_start_up_failed)
    _state["main_pid"] = os.getpid()
    _state["concurrency"] = concurrency
    _state["processes"] = processes
    _state.pop("cores", None)
    if "inference" in queues:
        # Once, before the fork: the children inherit it instead of each importing it.
        # Only an inference worker: a delivery worker never needs torch (600 MB here).
        import torch  # noqa: F401
    if (
        settings is not None
        and "inference" in queues
        and pool == "prefork"
        and settings.runs_on_cpu
        and not settings.torch_threads
    ):
        share = _torch_threads(settings)
        if share < usable_cpus():
            try:
                _state["cores"] = CoreShare(cores=usable_cpus(), share=share)
            except OSError as exc:  # its lock files: no writable temporary directory
                logger.warning(
                    "a study that comes alone runs on its process's share of the cores (%s: %s)",
                    type(exc).__name__,
                    exc.strerror,
                )


def core_share() -> CoreShare | None:
    """The cores this worker's processes share, if they do (see set_worker_queues)."""
    share: CoreShare | None = _state.get("cores")
    return share


def _processes() -> int:
    return 1 if _state.get("pool") == "threads" else int(_state.get("concurrency", 1))


def _torch_threads(settings: Settings) -> int:
    """Torch threads for this process: the setting, or the cores shared among processes."""
    if settings.torch_threads:
        return settings.torch_threads
    return max(1, usable_cpus() // _processes())


def _cores_per_task() -> int:
    """The cores shared among the studies this worker works on at once."""
    return cores_per_task(usable_cpus(), int(_state.get("concurrency", 1)))


def _jpeg2000_threads() -> int:
    """Threads for each JPEG 2000 decode in this process (worker.cores.jpeg2000_threads)."""
    return jpeg2000_threads(
        usable_cpus(),
        pool=str(_state.get("pool", "solo")),
        concurrency=int(_state.get("concurrency", 1)),
        processes=int(_state.get("processes", 1)),
    )


def runtime() -> Runtime:
    if "runtime" not in _state:
        _state["runtime"] = Runtime(app.conf["boneage_settings"])
    rt: Runtime = _state["runtime"]
    return rt


@worker_init.connect
def _init_threads_pool(**_: Any) -> None:
    # The threads pool (a batching inference worker) runs its tasks in this very
    # process and sends no worker_process_init: set the process up here.
    if _state.get("pool") == "threads":
        _init_process()


#: What a prefork child whose start-up failed sends the worker's own process
#: (_start_up_failed). Celery leaves it alone unless CELERY_RDBSIG asks for its debugger.
CHILD_FAILED_SIGNAL = signal.SIGUSR2


@worker_init.connect
def _stop_when_a_child_cannot_start(sender: Any = None, **_: Any) -> None:
    _state["controller"] = sender  # Celery's WorkController: its exit status, once done
    # Celery's own signals stop a worker with status 0 (SIGTERM, a warm shutdown) or
    # end it without one (SIGQUIT, cold: WorkerTerminate sets no exit code).
    if _state.get("pool") == "prefork":
        signal.signal(CHILD_FAILED_SIGNAL, _a_child_could_not_start)


def worker_exit_status() -> int:
    """The exit status the Celery worker that ran in this process ended with.

    ``app.worker_main`` returns nothing, whatever the worker's status: 1 after a child
    that could not start, or an unrecoverable error; 0 after a warm shutdown.
    """
    code = getattr(_state.get("controller"), "exitcode", None)
    return code if isinstance(code, int) else 0


def _a_child_could_not_start(_signum: int, _frame: Any) -> None:
    from celery.platforms import EX_FAILURE
    from celery.worker import state

    # Celery's warm shutdown, as SIGTERM asks for it (the tasks the other children hold
    # are finished first), with exit status 1.
    state.should_stop = EX_FAILURE


@worker_shutdown.connect
def _stop_threads_pool(**_: Any) -> None:
    if _state.get("pool") == "threads":
        _stop_process()


@worker_process_init.connect
def _init_process(**_: Any) -> None:
    # Fires in prefork children and in the solo pool: the place to load the model,
    # never the parent (a CUDA context does not survive fork).
    try:
        _start_process()
    except BaseException as exc:
        _start_up_failed(exc)


def _start_up_failed(exc: BaseException) -> NoReturn:
    """End this worker, with exit status 1, because its process could not start.

    Celery's signals log a receiver's exception and carry on: a process whose model did
    not load (BONEAGE_MODEL not a checkpoint, BONEAGE_DEVICE=cuda without a driver) or
    whose warm-up could not read the database would take images with no model and no
    heartbeat, fail each three times and end it in error. Exiting instead lets `serve`,
    a batching worker's supervisor, systemd or the kubelet restart it, and say so.

    A prefork child stops its parent too (:data:`CHILD_FAILED_SIGNAL`: a warm shutdown
    with exit status 1): billiard would start another child in its place, and again,
    while the parent held the messages it had taken. Nothing of a patient is in hand at
    start-up (the warm-up assesses a synthetic hand), so the exception's message is
    logged with its type.
    """
    logger.critical(
        "worker process start-up failed (%s: %s): it takes no work and exits with "
        "status 1, to be restarted",
        type(exc).__name__,
        str(exc)[:500] or "no message",
        exc_info=exc,
    )
    _exit_to_be_restarted()


def _exit_to_be_restarted() -> NoReturn:
    """Exit with status 1, a prefork child stopping its parent too (:func:`_start_up_failed`)."""
    main = _state.get("main_pid")
    if main is not None and main != os.getpid():
        with contextlib.suppress(ProcessLookupError):  # the parent is gone already
            os.kill(main, CHILD_FAILED_SIGNAL)
    logging.shutdown()  # flushes the handlers, which os._exit would not
    os._exit(1)


def _start_process() -> None:
    """Set this worker process up: the model loaded and warmed up, the heartbeat on."""
    dispose_after_fork()
    rt = runtime()
    detail: dict[str, Any] = {
        "queues": list(_state["queues"]),
        # where an inference worker's results go, and where a delivery worker sends:
        # every process must have the same, which `status` checks
        "destinations": sorted(str(d) for d in rt.settings.destinations),
    }
    if "inference" in _state["queues"]:
        # the cores its processes and threads are sized to, and a container's CPU
        # quota and memory limit, which may lower them (worker.cgroups)
        detail.update(usable_cpus=usable_cpus(), cpu_quota=cpu_quota(), memory_limit=memory_limit())
        # Imported here: a delivery worker never needs torch (about 600 MB of memory).
        import torch

        # every image reuses the same large buffers: keep them instead of page-faulting
        # them in again (a quarter of a CPU forward pass); see worker.heap
        detail["heap_keeps_large_blocks"] = keep_large_blocks()
        if _state.get("pool") == "threads":
            # A batching worker's task threads (twice its batch) would each keep an arena
            # of their own, with their own studies' peak in it (worker.heap): as many
            # arenas as the cores this process shares with the host's other batching ones.
            arenas = batching_process_cores(usable_cpus(), int(_state.get("processes", 1)))
            detail["malloc_arenas"] = arenas if limit_arenas(arenas) else None
        if rt.settings.runs_on_cpu:
            # Several processes each with all the cores' threads would oversubscribe.
            torch.set_num_threads(_torch_threads(rt.settings))
        else:
            # The model runs on the GPU; each task thread's preprocessing would otherwise
            # start a team of threads on every core.
            torch.set_num_threads(rt.settings.torch_threads or _cores_per_task())
        # JPEG 2000 decodes share the cores among the studies this worker's processes
        # may decode at once (worker.cores.jpeg2000_threads says how, and where a
        # batching worker's full-size decodes may overlap).
        decode_threads = _jpeg2000_threads()
        set_jpeg2000_threads(decode_threads)
        cores = core_share()
        if cores is not None:
            # a study that comes alone is decoded and assessed on every core
            rt.cores = cores
            detail["lone_study_threads"] = cores.cores
        # what an SR or SC is dated in where its image states no time zone
        detail["time_zone"] = local_time_zone()
        if (unknown := unknown_time_zone()) is not None:
            logger.warning(
                "TZ=%s names no time zone known here: SRs and SCs whose image states "
                "none are dated in UTC",
                unknown,
            )
        predictor = rt.predictor
        # the model's first forward pass and highdicom's first SR and SC are slow
        logger.info("model and DICOM output builders warmed up in %.1fs", warm_up(rt))
        batcher = rt.batcher  # started now, before the first task thread needs it
        detail.update(
            device=predictor.device,
            precision=predictor.precision,
            # on a CPU in float32: the trunk as oneDNN fused convolutions (models.fused)
            fused_convolutions=predictor.fused_convolutions,
            model_id=predictor.model_id,
            trained=predictor.meta.trained,
            torch_threads=torch.get_num_threads(),
            inference_batch=batcher.max_batch if batcher is not None else 1,
            jpeg2000_threads=decode_threads,
            # batching workers sharing the device, this one included (work --member K/N)
            batching_processes=int(_state.get("processes", 1)) if batcher is not None else 0,
            sc_min_long_side=rt.settings.sc_min_long_side,  # the heat-map picture's floor
            # the root a new image's UIDs are made under (BONEAGE_UID_ROOT): every
            # process must have the same, which `status` checks
            uid_root=node_uids(rt).root,
        )
    # the model, the tables of the standard, Celery: kept for the process's life
    detail["frozen_start_up_objects"] = freeze_start_up_objects()
    heartbeat = HeartbeatThread(rt.database_url, "worker", lambda: detail)
    heartbeat.start()
    _state["heartbeat"] = heartbeat


@worker_process_shutdown.connect
def _stop_process(**_: Any) -> None:
    heartbeat = _state.pop("heartbeat", None)
    if heartbeat is not None:
        heartbeat.stop()
    rt = _state.get("runtime")
    if rt is not None:
        rt.close()


@worker_ready.connect
def _on_ready(sender: Any = None, **_: Any) -> None:
    _serve_metrics(sender)
    if "inference" in _state["queues"]:
        try:
            sweep_staged(runtime().settings.outbox_dir)
        except OSError as exc:
            logger.warning("outbox sweep skipped (%s)", exc.strerror)
    # A worker that starts may be the first thing up after an outage: pick up the
    # work whose messages were lost while nothing was consuming.
    try:
        run_reconcile()
    except Exception as exc:
        logger.warning("start-up reconciliation skipped (%s)", type(exc).__name__)
    # the consumer's process (a prefork pool's parent) keeps what it started with too
    freeze_start_up_objects()


class RetriedWithinBudget(Task):
    """A task whose retry is published as our other publishes are: it ends within about
    `worker.celery_app.PUBLISH_BUDGET_SECONDS`, tries and reconnections together.

    Celery publishes a retry (``autoretry_for``, ``Task.retry``) with its default retry
    policy and no timeouts: with RabbitMQ's confirms on, py-amqp waited for the confirm
    without end, and a broker blocked by a disk alarm held the worker's process in the
    retry until the alarm cleared. Where the retry cannot be published, Celery rejects the
    message (``Reject``, not requeued), and the task gives its work back to the database,
    for the reconciler to queue again once the broker takes messages (deliveries at its
    next round; an image once the pause its retry would have waited is over,
    `worker.reconciler.retry_pause`), where it used to wait for the claim to run out
    (half an hour for an image):

    - an instance that this attempt claimed, and that this process still holds under
      the same claim (its assessment, and the time the attempt began), is `received`
      again, claimed by none, in the same transaction that ends its reason with
      `RETRY_NOT_PUBLISHED` (it said "retried: n of 21 tries" alone, for a retry that
      never came). Its attempts and transient failures stay as the attempt counted them.
      A claim that another attempt took meanwhile is left as it is. Where the error came
      before the claim committed (the database away as the attempt began), the instance
      stays `queued`, with no message, and the reconciler queues it again once the
      inference queue is empty, later during a backlog;
    - the deliveries of the message that this attempt still holds (their claim's
      ``next_attempt_at`` and ``sending_since``, as this attempt's claim committed them,
      `worker.delivery.Claim`) are due again; each keeps its ``sending_since``, which
      says that its object may be at the destination (it may have been sent, and its
      answer not recorded). Where no claim of this attempt committed, nothing is given
      back: a claim on the same rows is another worker's, sending them now.
    """

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: Any = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Any:
        if self.name == ASSESS_TASK and kwargs is None:
            kwargs = _held_by_the_retry(self.request)
        with PublishDeadline().applied():
            try:
                return super().retry(
                    args,
                    kwargs,
                    exc,
                    throw,
                    eta,
                    countdown,
                    max_retries,
                    **{**bounded_publish_options(), **options},
                )
            except Reject as rejected:
                reason = rejected.reason
                logger.error(
                    "%s: its retry was not published (%s): the message is dropped, and its "
                    "work is given back for the reconciler to queue again",
                    self.name,
                    failure_name(reason) if isinstance(reason, BaseException) else reason,
                )
                call_args = self.request.args if args is None else args
                call_kwargs = self.request.kwargs if kwargs is None else kwargs
                if self.name == ASSESS_TASK:
                    instance_id = (call_kwargs or {}).get("instance_id")
                    if instance_id is None and call_args:
                        instance_id = call_args[0]
                    attempt = getattr(self.request, "assess_attempt", None)
                    if isinstance(instance_id, int) and isinstance(attempt, Attempt):
                        _give_back_instance(instance_id, attempt)
                elif self.name == DELIVER_TASK:
                    delivery_ids = (call_kwargs or {}).get("delivery_ids")
                    if delivery_ids is None and call_args:
                        delivery_ids = call_args[0]
                    claim = getattr(self.request, "deliver_claim", None)
                    if isinstance(claim, Claim) and delivery_ids is not None:
                        ids = [delivery_ids] if isinstance(delivery_ids, int) else delivery_ids
                        _give_back_deliveries(list(ids), claim)
                raise


def _held_by_the_retry(request: Any) -> dict[str, Any] | None:
    """The keyword arguments of an `assess` retry: the message's own, and the time of the
    claim this try took (``held_since``), which the retry takes over where this try still
    holds it, although no other message may while it stands (worker.pipeline._claim),
    and the count of attempts it left (``held_attempts``), which the retry keeps, the
    give-back recorded or not. None, the message's as they came, where this try took
    none: a ``held_since`` they carry is the claim of the try before, still standing."""
    attempt = getattr(request, "assess_attempt", None)
    if not isinstance(attempt, Attempt) or attempt.started_at is None:
        return None
    return {
        **(request.kwargs or {}),
        "held_since": attempt.started_at.isoformat(),
        "held_attempts": attempt.attempts,
    }


#: What the reason of an instance whose `assess` retry was not published ends with: no
#: retry comes, whatever "(retried: n of 21 tries)" before it says. It stays until the
#: next attempt ends, while the image is queued again and assessed, so it says what
#: happened, not what is to come (it said "the reconciler queues it again once the broker
#: takes messages", shown by `status` while the image was queued or being assessed).
RETRY_NOT_PUBLISHED = "; retry not published: given back to be queued again"


def _give_back_instance(instance_id: int, attempt: Attempt) -> None:
    """Put ``instance_id`` back to `received`, claimed by none, its reason ending with
    `RETRY_NOT_PUBLISHED`, where this process still holds it under ``attempt``'s claim:
    the reconciler queues it again once the pause the task's retry would have waited is
    over (`worker.reconciler.reconcile`, `worker.reconciler.retry_pause`).
    Where a copy of the image was received during the attempt (``received_again_at``
    after it began), the listener's enqueuer published a message for it while the row
    was `processing`, and that message was refused (worker.pipeline.BEING_ASSESSED) and
    acknowledged: the row is given back `received` all the same, and the reconciler
    queues it once the copy has waited as long as a new image would (it cannot tell
    that copy from one received after the give-back, whose message the enqueuer
    publishes). Given back `queued`, for the copy's message to take, it waited for an
    empty inference queue, hours in a backlog (found in review); a second message, were
    there one, is refused or finds the image finished.
    Where that cannot be written (the database may be what failed), a warning: the
    retry's own failure goes on, and the reconciler takes the instance back once its
    lease runs out.

    The attempt's staged outputs are gone (an attempt that fails removes what it staged),
    and whatever it left in the outbox is written again by the next attempt, as after
    the reconciler takes an instance back from a worker that died.
    """
    try:
        with session_scope(runtime().database_url) as session:
            # its row first, as the pipeline notes a failed attempt: read under the lock
            take_instances(session, [instance_id])
            instance = session.get(Instance, instance_id)
            if (
                instance is not None
                and instance.state is InstanceState.PROCESSING
                and instance.claimed_by == process_name("worker")
                and instance.assessment == attempt.assessment
                and instance.started_at == attempt.started_at
            ):
                before = instance.reason or ""
                if not before.endswith(RETRY_NOT_PUBLISHED):
                    instance.reason = f"{before}{RETRY_NOT_PUBLISHED}".removeprefix("; ")
                instance.state = InstanceState.RECEIVED
                instance.claimed_by = None
    except Exception as noted:  # the database away: the Reject goes on as it is
        logger.warning(
            "instance %d: that its retry was not published is not recorded (%s); the "
            "reconciler takes it back once its lease runs out",
            instance_id,
            type(noted).__name__,
        )


def _give_back_deliveries(delivery_ids: list[int], claim: Claim) -> None:
    """End ``claim`` (the one an attempt of `deliver` committed) on those of
    ``delivery_ids`` that still hold it: they are due at once, for the reconciler's next
    round.

    A row still holds it where its ``sending_since`` is the claim's very time and its
    ``next_attempt_at`` the end the claim gave it: a row whose failure the attempt
    recorded (its back-off), or that it delivered, no longer has the claim's marks, nor
    one another worker claimed since, whenever that was. Where no claim committed
    (``claim.claimed_at`` None: the database away as the attempt began, say), nothing is
    given back: a claim on the rows is another worker's, sending them now; it used to be
    guessed from the times, and another worker's claim taken after this attempt began
    was ended, and the reconciler had a third send what the second was sending.
    Its ``sending_since`` is kept: the object may have gone, its answer unrecorded."""
    if claim.claimed_at is None or claim.until is None:
        return
    ids = list(dict.fromkeys(delivery_ids))
    try:
        with session_scope(runtime().database_url) as session:
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(ids),
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.sending_since == claim.claimed_at,
                    Delivery.next_attempt_at == claim.until,
                )
                .values(next_attempt_at=None)
                .execution_options(synchronize_session=False)
            )
    except Exception as failed:  # the database away: the claim runs out as it would
        logger.warning(
            "deliveries %s: their claim is not given back (%s); the reconciler sends them "
            "again once it runs out",
            ", ".join(map(str, ids)),
            type(failed).__name__,
        )


@app.task(
    name=ASSESS_TASK,
    base=RetriedWithinBudget,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=RETRIED_BY_THE_TASK,
    retry_backoff=RETRY_BACKOFF_SECONDS,  # which the reconciler keeps (retry_pause)
    retry_backoff_max=RETRY_BACKOFF_MAX_SECONDS,
    max_retries=TRANSIENT_RETRIES,  # the pipeline ends the instance in error after them
)
def assess(
    self: Task,
    instance_id: int,
    send: bool = True,
    held_since: str | None = None,
    held_attempts: int | None = None,
    **_later: Any,  # a later release's arguments, taken by this one during an upgrade
) -> str:
    started = time.perf_counter()
    rt = runtime()
    # the claim this attempt takes, which a retry not published gives back
    attempt = self.request.assess_attempt = Attempt()
    # a retry's: the claim the try before took (_held_by_the_retry)
    held = datetime.fromisoformat(held_since) if held_since else None
    shared = _shares_its_process()
    try:
        with contextlib.ExitStack() as holding:
            alone = False
            if shared and _assessed_alone(rt, instance_id):
                alone = holding.enter_context(_ISOLATION.alone())
            elif shared:
                holding.enter_context(_ISOLATION.together())
            if rt.cores is not None:
                holding.enter_context(rt.cores.task())
            try:
                outcome = assess_instance(
                    rt,
                    instance_id,
                    send=send,
                    attempt=attempt,
                    held=held,
                    shared=shared and not alone,
                    held_attempts=held_attempts if held is not None else None,
                )
            except Exception as exc:
                # still holding its place: an image waiting to be alone is not let in,
                # to be claimed and counted, before the process ends
                _stop_if_the_device_failed(exc)
                raise
    except RETRIED_BY_THE_TASK:
        metrics.TASKS.labels(ASSESS_TASK, "exception").inc()
        if self.request.retries >= self.max_retries:  # no retry comes after this one
            give_up_retries(rt, instance_id)
        raise
    except Exception:
        metrics.TASKS.labels(ASSESS_TASK, "exception").inc()
        raise
    # a message refused because another attempt holds the image: `refused`, told from
    # `skipped` (already finished, no such instance) in the metric alone; the task's
    # state stays `skipped`
    refused = outcome.state == "skipped" and outcome.reason == BEING_ASSESSED
    metrics.TASKS.labels(ASSESS_TASK, "refused" if refused else outcome.state).inc()
    if outcome.state == "assessed":
        metrics.ASSESS_SECONDS.observe(time.perf_counter() - started)
    if outcome.copy_to_compare:
        _queue_copy_to_compare(instance_id)
    if outcome.delivery_ids:
        enqueue_delivery(outcome.delivery_ids)  # SR and SC: one association per destination
    return outcome.state


#: The images this process holds: together, or one alone (worker.isolation).
_ISOLATION = Isolation()


def _shares_its_process() -> bool:
    """Whether this process's task threads hold several images at once (a batching
    worker's threads pool): a death of the process cannot then tell which killed it."""
    return _state.get("pool") == "threads" and int(_state.get("concurrency", 1)) > 1


def _assessed_alone(rt: Runtime, instance_id: int) -> bool:
    """Whether ``instance_id`` is to be assessed with no other image in its process: a
    process died holding it and others (worker.reconciler.reconcile)."""
    with session_scope(rt.database_url) as session:
        return bool(session.scalar(select(Instance.alone).where(Instance.id == instance_id)))


def _stop_if_the_device_failed(exc: BaseException) -> None:
    """End this worker, with exit status 1, where its GPU failed during the assessment
    (`models.predictor.DeviceFailure`; the pipeline gave back every image this process
    holds, their attempts not counted: `worker.pipeline.give_back_held_from_a_failed_device`):
    every image it took next would fail the same way and end in error after three
    attempts. `serve`, systemd or
    the kubelet restart it, on a GPU that works again or with an error that says why
    not. The message names the CUDA error alone."""
    from models.predictor import DeviceFailure  # torch: loaded by then

    if not isinstance(exc, DeviceFailure):
        return
    # a threads pool's other tasks meet the same failure: one ends the process, the
    # others wait here until it has
    with _DEVICE_FAILED:
        logger.critical(
            "the GPU failed during an assessment (%s): the images this worker holds are "
            "given back, and it takes no more work and exits with status 1, to be restarted",
            exc,
        )
        _exit_to_be_restarted()


#: Held by the one task thread that ends the process after its GPU failed.
_DEVICE_FAILED = threading.Lock()


def _queue_copy_to_compare(instance_id: int) -> None:
    """Queue ``instance_id`` again, for the copy received while this attempt held it
    (its own message was refused then: worker.pipeline._claim). Where that cannot be
    published, the reconciler queues it once the inference queue is empty."""
    try:
        enqueue_assess(instance_id)
    except Exception as exc:
        logger.warning(
            "instance %d: its copy received again was not queued to be compared (%s); "
            "the reconciler queues it",
            instance_id,
            failure_name(exc),
        )


@app.task(
    name=DELIVER_TASK,
    base=RetriedWithinBudget,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    # Declared with the task, not as an annotation in configure(): Celery reads the
    # annotations once, when the first task is bound, and a task bound before
    # configure() (any other task's first use) left this one without a limit.
    time_limit=deliver_time_limit(),
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    max_retries=20,
)
def deliver(self: Task, delivery_ids: list[int] | int) -> str:
    # A message of an earlier version carries one id.
    ids = [delivery_ids] if isinstance(delivery_ids, int) else list(delivery_ids)
    # the claim this attempt takes, as committed, which a retry not published gives back
    claim = self.request.deliver_claim = Claim()
    try:
        outcomes = send_deliveries(runtime(), ids, claim=claim)
    except Exception:
        metrics.TASKS.labels(DELIVER_TASK, "exception").inc()
        raise
    retries: dict[float, list[int]] = {}
    for delivery_id, outcome in outcomes.items():
        metrics.DELIVERY_ATTEMPTS.labels(outcome.state).inc()
        if outcome.retry_in is not None:
            retries.setdefault(outcome.retry_in, []).append(delivery_id)
    for wait, retry_ids in retries.items():
        # The due time is in the db too: if this message is lost, the reconciler re-sends,
        # and it alone sends a retry due later than a message may be held
        if wait <= MAX_COUNTDOWN_SECONDS:
            enqueue_delivery(retry_ids, countdown=wait)
    state = _worst(outcome.state for outcome in outcomes.values())
    metrics.TASKS.labels(DELIVER_TASK, state).inc()
    return state


#: The longest a `deliver` retry's message waits to be due. Celery holds a message with
#: a countdown unacknowledged until it is due, and RabbitMQ closes the channel of a
#: consumer that holds one longer than its ``consumer_timeout`` (30 min by default): the
#: worker stopped ("Unrecoverable error"), with the sends it had under way, every half
#: hour of a destination's outage once the back-off passed 30 min. A retry due later is
#: published by the reconciler once due (it sends every pending delivery 30 s overdue),
#: on every broker alike.
MAX_COUNTDOWN_SECONDS = 15 * 60


#: A deliver task's outcome is its least successful delivery's.
_SEVERITY = ("skipped", "delivered", "waiting", "retry", "failed")


def _worst(states: Iterable[str]) -> str:
    return max(states, key=_SEVERITY.index, default="skipped")


@app.task(name=RECONCILE_TASK, acks_late=True)
def reconcile_task() -> dict[str, int]:
    report = run_reconcile()
    metrics.TASKS.labels(RECONCILE_TASK, "done").inc()
    return {"instances": len(report.instances), "deliveries": len(report.deliveries)}


def run_reconcile(*, startup: bool = False) -> ReconcileReport:
    return reconcile_via_broker(runtime(), startup=startup)


def _serve_metrics(consumer: Any) -> None:
    """Start this worker's ``/metrics`` (BONEAGE_WORKER_METRICS_PORT).

    A solo worker serves its own counters; a prefork worker the sum of its children's,
    from prometheus_client's multiprocess directory (set up by ``work``).
    """
    settings = app.conf.get("boneage_settings")
    port = worker_metrics_port(
        settings.worker_metrics_port if settings is not None else None, _state["queues"]
    )
    if port is None or "metrics" in _state:
        return
    registry = metrics.WORKER_REGISTRY
    pool = type(getattr(consumer, "pool", None)).__module__
    if not pool.endswith((".solo", ".thread")):
        # Tasks run in child processes; their counters reach us only through files.
        shared = metrics.multiprocess_registry()
        if shared is None:
            logger.warning("worker metrics of a %s pool need a multiprocess directory", pool)
            return
        registry = shared
    try:
        _state["metrics"] = metrics.MetricsServer(registry, settings.host, port).start()
    except OSError as exc:
        logger.warning("worker metrics not served: port %d unusable (%s)", port, exc.strerror)
