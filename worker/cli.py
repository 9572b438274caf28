"""`boneage-worker`: the command line of the service."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast, get_args

import click
from rich.console import Console

from worker.cgroups import memory_limit
from worker.settings import (
    Precision,
    Settings,
    load_settings,
    settings_error,
    threads_within_cpu_quota,
    usable_cpus,
)

logger = logging.getLogger("boneage")
console = Console()


def setup_logging(level: str, fmt: str = "text") -> None:
    """Text or JSON lines on stderr; see `worker.logs` (patient-safe library levels)."""
    from worker.logs import setup_logging as configure_logging

    configure_logging(level, fmt)


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    merged = {**obj.get("overrides", {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        settings = load_settings(obj.get("config"), **merged)
    except ValueError as exc:  # a pydantic ValidationError too
        # its own text quotes the values given: a database URL's password among them
        raise click.ClickException(f"invalid settings: {settings_error(exc)}") from None
    setup_logging(settings.log_level, settings.log_format)
    return settings


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), help="TOML settings file."
)
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), help="BONEAGE_DATA_DIR"
)
@click.option("--database-url", help="BONEAGE_DATABASE_URL")
@click.option("--broker-url", help="BONEAGE_BROKER_URL")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
)
@click.version_option(package_name="boneage-worker")
@click.pass_context
def main(
    ctx: click.Context,
    config: Path | None,
    data_dir: Path | None,
    database_url: str | None,
    broker_url: str | None,
    log_level: str | None,
) -> None:
    """Bone age from pediatric hand radiographs, as a DICOM node."""
    threads_within_cpu_quota()
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["overrides"] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "broker_url": broker_url,
        "log_level": log_level.upper() if log_level else None,
    }


# -- database ---------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema management."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Create or migrate the database schema to this version."""
    from db.engine import upgrade

    settings = _settings(ctx)
    revision = upgrade(settings.effective_database_url)
    console.print(f"database schema at revision {revision}")


@db.command("new-identity")
@click.option("--yes", is_flag=True, help="Give it without asking.")
@click.pass_context
def db_new_identity(ctx: click.Context, yes: bool) -> None:
    """Give a database copied from another node an identity of its own.

    The node's identity (its Device Observer UID, kept in its database) goes into the
    UIDs of every SR, SC and note it makes: a node set up from a copy of another's
    database (a validation node from production's) would make that node's UIDs. Only
    while no process of the node runs (each keeps the identity it read at its start).
    The objects recorded stay as they are; an image among them assessed again here gets
    its new objects in new series. The deliveries recorded become the other node's: the
    unsent ones are superseded, never sent from here, and no note of ours withdraws the
    objects of the others. Asks first, unless --yes.
    """
    from worker.delivery import configured
    from worker.node_identity import give_new_identity, identity_in_use

    settings = _settings(ctx)
    _require_schema(settings)
    url = settings.effective_database_url
    try:
        now = identity_in_use(url)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    if now.processes:
        raise click.ClickException(
            f"identity unchanged: {len(now.processes)} process(es) of the node are running "
            f"({', '.join(now.processes)}), each with the identity it read at its start; "
            "stop them all, then run this again"
        )
    click.echo(f"the node's identity (its Device Observer UID) is {now.identity}")
    if now.images:
        click.echo(
            f"{now.images} image(s) have objects of ours recorded (of the node this "
            "database was copied from, if it is a copy): they stay as recorded, but an "
            "image among them assessed again here gets its new SR and SC in new series, not "
            "those recorded; on the node whose database this is, that would happen to its "
            "own images"
        )
    # what the new identity does to the deliveries recorded (give_new_identity)
    fates = []
    if now.pending or now.failed:
        fates.append(
            f"{now.pending} pending and {now.failed} failed deliveries are recorded (of the "
            "node this database was copied from, if it is a copy): they will be superseded, "
            "never sent from here, nor again by retry-deliveries"
        )
    if now.delivered:
        fates.append(
            f"no note of ours will withdraw the objects of the {now.delivered} delivered "
            "ones (their image rejected by the PACS, received again corrected, or moved): "
            "they are left to the node that sent them"
        )
    if fates:
        click.echo(
            f"{'; and '.join(fates)}; on the node whose database this is, that would happen "
            "to its own"
        )
    if elsewhere := [d for d in now.destinations if not configured(settings, d)]:
        click.echo(
            f"warning: objects of ours are recorded as sent to {', '.join(elsewhere)}, not "
            "among BONEAGE_DESTINATIONS here: with a new identity nothing recorded goes "
            "there from here, no note withdrawing one of them either; a copy keeps the "
            "other node's"
        )
    if not yes:
        question = (
            "Give this node a new identity? Only for a database copied from another node: "
            "the UIDs of what it makes from now on are its own, and the deliveries "
            "recorded the other node's"
        )
        if not _agreed(question):
            raise click.ClickException(
                "identity unchanged: answer y to the question, or pass --yes"
            )
    new = give_new_identity(url, replacing=now.identity)
    if new is None:
        raise click.ClickException(
            "identity unchanged: it changed while this command ran (another run of it?); "
            "run it again"
        )
    logger.warning(
        "node identity changed from %s to %s by %s: deliveries up to id %d are the other "
        "node's, %d unsent ones of them superseded",
        now.identity,
        new.identity,
        _who(),
        new.copied_up_to,
        new.superseded,
    )
    if new.superseded:
        click.echo(
            f"{new.superseded} pending or failed deliveries superseded: made by the node "
            "this database was copied from, they are not this node's to send"
        )
    click.echo(f"the node's identity is now {new.identity}: start the node's processes")


def _private_files(settings: Settings) -> None:
    """Everything a service process creates (spool, outbox, SQLite files) is owner-only."""
    os.umask(0o077)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


def _require_schema(settings: Settings) -> None:
    from db.engine import DatabaseNotReady, check_schema

    try:
        check_schema(settings.effective_database_url)
    except DatabaseNotReady as exc:
        raise click.ClickException(str(exc)) from exc


# -- service processes --------------------------------------------------------


_TLS_OPTION = click.option(
    "--tls/--no-tls",
    default=None,
    help="DICOM over TLS, with BONEAGE_TLS_* certificates "
    "(default: as BONEAGE_DESTINATIONS_TLS says).",
)


def _client_tls(settings: Settings, tls: bool | None) -> ssl.SSLContext | None:
    """The TLS context ``send`` and ``echo`` use, or None for plain TCP."""
    from worker.tls import client_context

    try:
        return client_context(settings, enabled=tls)
    except (OSError, ssl.SSLError) as exc:
        raise click.ClickException(f"TLS settings unusable: {exc}") from exc


def _check_destinations_tls(settings: Settings) -> None:
    """Stop at once, in one line, when BONEAGE_DESTINATIONS_TLS is on and the TLS files
    make no context: a delivery worker would otherwise start, look alive, and fail every
    delivery as "TLS settings unusable" until its attempts ran out, a day later. Each
    attempt still builds its own (worker.delivery): a certificate renewed in place is
    taken up without a restart."""
    from worker.tls import client_context

    try:
        client_context(settings)
    except (OSError, ssl.SSLError) as exc:
        # ssl's errors do not say which file: the ones in play
        files = "; ".join(
            f"BONEAGE_{name.upper()} {path}"
            for name in ("tls_ca_certificates", "tls_certificate", "tls_private_key")
            if (path := getattr(settings, name)) is not None
        )
        raise click.ClickException(
            f"TLS settings unusable for BONEAGE_DESTINATIONS_TLS: {exc} "
            f"({files or 'the system CA store'})"
        ) from exc


@main.command()
@click.option("--ae-title", help="BONEAGE_AE_TITLE")
@click.option("--port", type=int, help="BONEAGE_PORT")
@click.pass_context
def listen(ctx: click.Context, ae_title: str | None, port: int | None) -> None:
    """Run the DICOM listener (Storage SCP)."""
    from worker.celery_app import configure
    from worker.listener import Listener
    from worker.tls import server_context

    settings = _settings(ctx, ae_title=ae_title, port=port)
    _private_files(settings)
    _require_schema(settings)
    try:
        ssl_context = server_context(settings)
    except (OSError, ssl.SSLError) as exc:
        raise click.ClickException(f"TLS settings unusable: {exc}") from exc
    configure(settings)
    Listener(settings, ssl_context=ssl_context).serve_forever()


@main.command()
@click.option(
    "-Q",
    "--queues",
    default="inference,delivery",
    show_default=True,
    help="Comma-separated queues: inference (model), delivery (C-STORE out).",
)
@click.option(
    "--pool",
    type=click.Choice(["solo", "prefork", "threads"]),
    default=None,
    help="solo: one process, one task at a time; prefork: --concurrency processes; "
    "threads: one process, --concurrency task threads sharing batched forward passes. "
    "Default for an inference worker: threads when BONEAGE_INFERENCE_BATCH is above 1 "
    "(a GPU), prefork with several processes (a CPU), else solo.",
)
@click.option(
    "-c",
    "--concurrency",
    type=int,
    default=None,
    help="Processes (prefork) or task threads (threads). Default for an inference worker: "
    "twice BONEAGE_INFERENCE_BATCH threads when batching (one batch on the device while "
    "the next is decoded), else BONEAGE_INFERENCE_PROCESSES; 1 for a delivery worker.",
)
@click.option("--device", help="BONEAGE_DEVICE")
@click.option(
    "--member",
    hidden=True,
    help="K/N: this worker is batching process K of the N a supervising `work` started.",
)
@click.option("--supervisor", type=int, hidden=True, help="That supervisor's process id.")
@click.pass_context
def work(
    ctx: click.Context,
    queues: str,
    pool: str | None,
    concurrency: int | None,
    device: str | None,
    member: str | None,
    supervisor: int | None,
) -> None:
    """Run a Celery worker for the given queues.

    A batching inference worker (a GPU) with BONEAGE_INFERENCE_PROCESSES above 1 runs
    that many batching processes on the device, each its own Celery worker, restarted
    if it exits; this process supervises them and serves their summed /metrics.
    """
    if supervisor is not None:
        _stop_with(supervisor)
    settings = _settings(ctx, device=device)
    processes = _member_of(member)
    _private_files(settings)
    _require_schema(settings)
    names = tuple(q.strip() for q in queues.split(",") if q.strip())
    unknown = set(names) - {"inference", "delivery"}
    if unknown:
        raise click.BadParameter(
            f"unknown queue(s): {', '.join(sorted(unknown))}", param_hint="--queues"
        )
    if "inference" in names:
        _check_model_file(settings)
    if "delivery" in names:
        _check_destinations_tls(settings)
    batch = settings.effective_inference_batch if "inference" in names else 1
    if batch > 1 and pool in ("solo", "prefork"):
        if settings.inference_batch > 1:
            raise click.UsageError(
                f"BONEAGE_INFERENCE_BATCH is {batch}: a batching inference worker runs "
                "--pool threads (its task threads share the forward passes)"
            )
        # A pool chosen by hand that runs one task at a time per process: no batching.
        batch = 1
        settings = settings.model_copy(update={"inference_batch": 1})
    if concurrency is None:
        if batch > 1:
            concurrency = 2 * batch  # one batch on the device while the next is decoded
        elif pool == "solo":
            concurrency = 1  # one study at a time: its decodes get every core
        else:
            concurrency = settings.effective_inference_processes if "inference" in names else 1
    if pool is None:
        pool = "threads" if batch > 1 else "prefork" if concurrency > 1 else "solo"
    if member is None and batch > 1 and pool == "threads":
        processes = settings.effective_inference_processes
    if member is None and "inference" in names:
        _check_memory_limit(settings, processes if pool == "threads" else concurrency)
    if member is None and batch > 1 and pool == "threads" and processes > 1:
        _supervise_batching(settings, names, concurrency, processes)
        return
    if member is not None and settings.worker_metrics_port:
        # the supervisor serves the members' summed metrics (from their files)
        settings = settings.model_copy(update={"worker_metrics_port": None})
    if pool == "prefork" and settings.worker_metrics_port:
        # before prometheus_client is imported (by worker.tasks): the children's counters
        # go to files there, which this process sums when scraped
        from worker.metrics_files import (
            metrics_directory,
            use_multiprocess_directory,
            worker_metrics_port,
        )

        served = worker_metrics_port(settings.worker_metrics_port, names)
        assert served is not None
        use_multiprocess_directory(metrics_directory(names, served))
    from worker import tasks
    from worker.celery_app import configure

    app = configure(settings)
    tasks.set_worker_queues(
        names, pool=pool, concurrency=concurrency, settings=settings, processes=processes
    )
    if "inference" in names and pool == "threads":
        logger.info(
            "inference: %s, %d task threads, batches of up to %d, device %s",
            f"process {member}" if member else "1 process",
            concurrency,
            batch,
            settings.device,
        )
    elif "inference" in names:
        share = tasks.core_share()
        logger.info(
            "inference: %d process(es), %s torch thread(s) each%s, device %s",
            concurrency,
            settings.torch_threads or "auto",
            f" (a study that comes alone: all {share.cores} cores)" if share else "",
            settings.device,
        )
    argv = [
        "worker",
        "-Q",
        ",".join(names),
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "-n",
        f"{'-'.join(names)}.{os.getpid()}@%h",
        "--loglevel",
        settings.log_level,
        # Gossip, mingle and heartbeats need broadcast, which the embedded broker lacks;
        # liveness is written to the database instead (see `status`).
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    app.worker_main(argv)
    # a process that could not start ends the worker with status 1 (worker.tasks), which
    # worker_main does not pass on: serve, systemd and the kubelet restart on it
    if status := tasks.worker_exit_status():
        raise SystemExit(status)


def _check_model_file(settings: Settings) -> None:
    """Stop at once, in one line, when BONEAGE_MODEL names no readable file: otherwise
    each inference process would stop as it starts, and be restarted, again and again
    (and a command that loads the model itself would end in a traceback)."""
    try:
        settings.check_model_file()
    except ValueError as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc


#: prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _check_memory_limit(settings: Settings, processes: int) -> None:
    """Say what a container's memory limit makes of the inference processes: how many it
    holds, and a warning where it holds fewer than will run (set by hand, or one that
    needs more than the limit): the kernel would stop one in the middle of a study."""
    limit = memory_limit()
    if limit is None:
        return
    holds = settings.memory_holds(limit)
    each = settings.inference_process_memory
    if processes > holds:
        logger.warning(
            "the memory limit (%.1f GiB) holds %d inference process(es) of about %.1f GiB "
            "at their peak, and %d will run: one may be stopped in the middle of a study "
            "(give the container more memory, or set BONEAGE_INFERENCE_PROCESSES lower)",
            limit / 2**30,
            max(holds, 0),
            each / 2**30,
            processes,
        )
    else:
        logger.info(
            "memory limit %.1f GiB: %d inference process(es) of about %.1f GiB at their peak",
            limit / 2**30,
            processes,
            each / 2**30,
        )


def _stop_with(supervisor: int) -> None:
    """Have this process stopped (SIGTERM: Celery's warm shutdown) when ``supervisor``,
    its parent, dies, however it dies; exit at once if it is already gone.

    Without this, batching processes whose supervisor was SIGKILLed would work on beside
    the ones its restart starts.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:  # not Linux
        logger.warning("this worker will outlive its supervisor if it dies (%s)", exc)
    if os.getppid() != supervisor:  # it died before the line above
        raise SystemExit(f"the supervising worker (process {supervisor}) is gone")


def _member_of(member: str | None) -> int:
    """N of ``--member K/N``: the batching processes that share this host; 1 without it."""
    if member is None:
        return 1
    try:
        k, n = (int(part) for part in member.split("/"))
    except ValueError:
        k = n = 0
    if not 1 <= k <= n:
        raise click.BadParameter(f"{member!r} is not K/N with 1 <= K <= N", param_hint="--member")
    return n


def _supervise_batching(
    settings: Settings, names: tuple[str, ...], concurrency: int, processes: int
) -> None:
    """Run ``processes`` batching workers on the device, restarted when they exit.

    Each is a ``work --member K/N`` child with ``concurrency`` task threads; together
    they share the host's cores (their JPEG 2000 decode threads). With
    BONEAGE_WORKER_METRICS_PORT their counters go to files in a multiprocess directory,
    and this process serves the sum, as a prefork worker's parent does.
    """
    from worker.metrics_files import (
        MULTIPROCESS_ENV,
        metrics_directory,
        use_multiprocess_directory,
        worker_metrics_port,
    )

    env = {**os.environ, **settings.as_environment()}
    port = worker_metrics_port(settings.worker_metrics_port, names)
    server = None
    if port is not None:
        directory = metrics_directory(names, port)
        if use_multiprocess_directory(directory):  # before prometheus_client is imported
            from worker import metrics

            env[MULTIPROCESS_ENV] = str(directory)
            registry = metrics.multiprocess_registry()
            assert registry is not None
            try:
                server = metrics.MetricsServer(registry, settings.host, port).start()
            except OSError as exc:
                logger.warning(
                    "worker metrics not served: port %d unusable (%s)", port, exc.strerror
                )
    command = [sys.executable, "-m", "worker", "work", "-Q", ",".join(names)]
    command += ["--pool", "threads", "--concurrency", str(concurrency)]
    command += ["--supervisor", str(os.getpid())]
    logger.info(
        "inference: %d batching processes on device %s, %d task threads each",
        processes,
        settings.device,
        concurrency,
    )
    try:
        _supervise(
            {
                f"batching process {k}/{processes}": [*command, "--member", f"{k}/{processes}"]
                for k in range(1, processes + 1)
            },
            env,
        )
    finally:
        if server is not None:
            server.stop()


@main.command()
@click.option("--ae-title", help="BONEAGE_AE_TITLE")
@click.option("--port", type=int, help="BONEAGE_PORT")
@click.pass_context
def serve(ctx: click.Context, ae_title: str | None, port: int | None) -> None:
    """Run listener, inference worker and delivery worker together (one machine).

    Migrates the database (and creates the embedded broker's queues) first. Children
    that die are restarted, after a delay that grows while they keep failing; SIGTERM or
    Ctrl-C stops them all. One that exits within two minutes of starting six times in a
    row stops them all, and `serve` exits with status 1.
    """
    from db.engine import upgrade
    from worker.celery_app import configure, prepare_embedded_broker

    settings = _settings(ctx, ae_title=ae_title, port=port)
    _check_model_file(settings)  # its inference worker loads the model
    _check_destinations_tls(settings)  # its delivery worker sends with them
    _private_files(settings)
    upgrade(settings.effective_database_url)
    prepare_embedded_broker(configure(settings))
    env = {**os.environ, **settings.as_environment()}
    base = [sys.executable, "-m", "worker"]
    commands = {
        "listener": [*base, "listen"],
        "inference worker": [*base, "work", "-Q", "inference"],
        "delivery worker": [*base, "work", "-Q", "delivery"],
    }
    console.print(
        f"[bold]boneage-worker[/] AE [cyan]{settings.ae_title}[/] "
        f"on port [cyan]{settings.port}[/], "
        f"data in {settings.data_dir}, sending to "
        f"{', '.join(map(str, settings.destinations)) or '[yellow]no destination[/]'}"
    )
    _supervise(commands, env)


#: How long a supervised child (`serve`'s listener and workers, a GPU worker's batching
#: processes) has after SIGTERM to finish what it holds (Celery's warm shutdown: the
#: images being assessed, a send under way) before the supervisor kills it. A service
#: manager must give the supervisor longer, or it kills them all first: Compose's
#: stop_grace_period, Kubernetes' terminationGracePeriodSeconds and systemd's
#: TimeoutStopSec are 120 s in deploy/, and `docker run` needs `--stop-timeout 120`
#: (Docker's default is 10 s). tests/unit/test_deploy.py checks them.
STOP_GRACE_SECONDS = 90.0

#: A supervised child that ran this long before it exited had started: its exit is a
#: crash to restart from, and its count of failed starts begins again.
STARTED_AFTER_SECONDS = 120.0

#: Failed starts in a row (exits within STARTED_AFTER_SECONDS of starting) after which
#: the supervisor stops the service and exits with status 1.
FAILED_STARTS = 6

#: The wait before the first restart; each failed start in a row doubles it, up to
#: RESTART_DELAY_MAX_SECONDS (a database or broker that is restarting gets the time).
RESTART_DELAY_SECONDS = 1.0
RESTART_DELAY_MAX_SECONDS = 30.0


@dataclasses.dataclass
class _Child:
    """One supervised child: its process, when it started, its failed starts in a row,
    and, while it waits to be restarted, when."""

    process: subprocess.Popen[bytes]
    started: float
    failed_starts: int = 0
    restart_at: float | None = None


def _supervise(
    commands: dict[str, list[str]],
    env: dict[str, str],
    *,
    grace: float = STOP_GRACE_SECONDS,
    started_after: float = STARTED_AFTER_SECONDS,
    restart_delay: float = RESTART_DELAY_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Run ``commands`` as children, restart one that exits, stop all on SIGTERM/SIGINT.

    A child that exits is restarted after a delay that doubles with each failed start
    in a row (an exit within ``started_after`` seconds of starting), from
    ``restart_delay`` up to :data:`RESTART_DELAY_MAX_SECONDS`. After
    :data:`FAILED_STARTS` failed starts in a row, however long each took to fail (a
    model that loads for 20 s and then finds no database), it stops them all, and this
    process then exits with status 1, so that a service manager restarts it or reports
    the failure. Stopping sends each child SIGTERM and kills those still running
    ``grace`` seconds later. ``clock`` tells how long a child ran (its tests give one in
    place of waiting that long).
    """
    stopping = gave_up = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    def _start(name: str) -> tuple[subprocess.Popen[bytes], float]:
        return subprocess.Popen(commands[name], env=env), clock()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    children = {name: _Child(*_start(name)) for name in commands}
    try:
        while not stopping:
            time.sleep(0.2)
            now = clock()
            for name, child in children.items():
                if stopping:
                    break
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        child.process, child.started = _start(name)
                        child.restart_at = None
                    continue
                if (code := child.process.poll()) is None:
                    continue
                ran = now - child.started
                child.failed_starts = child.failed_starts + 1 if ran < started_after else 0
                if child.failed_starts >= FAILED_STARTS:
                    logger.error(
                        "%s keeps exiting (code %s, %d times in a row within %.0f s of "
                        "starting); stopping the service",
                        name,
                        code,
                        child.failed_starts,
                        started_after,
                    )
                    stopping = gave_up = True
                    break
                delay = min(
                    restart_delay * 2 ** max(child.failed_starts - 1, 0),
                    RESTART_DELAY_MAX_SECONDS,
                )
                logger.warning(
                    "%s exited with code %s after %.0f s; restarting in %g s",
                    name,
                    code,
                    ran,
                    delay,
                )
                child.restart_at = now + delay
    finally:
        running = [c.process for c in children.values() if c.restart_at is None]
        for process in running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, child in children.items():
            if child.restart_at is not None:  # exited, and reaped by poll()
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s of SIGTERM; killed", name, grace)
                child.process.kill()
                child.process.wait()
    if gave_up:
        raise SystemExit(1)


# -- administration -------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--quiet",
    is_flag=True,
    help="Print only 'healthy' or the problems, one a line (for health checks, whose "
    "runners keep what a check printed).",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, quiet: bool) -> None:
    """Health of the node; exit code 1 when unhealthy."""
    from worker.celery_app import configure
    from worker.status import collect, render

    if as_json and quiet:
        raise click.UsageError("--json and --quiet exclude each other")
    settings = _settings(ctx)
    # nothing made where no node is: the database is checked before the broker is used
    configure(settings, create_broker=False)
    report = collect(settings, details=not quiet)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    elif quiet:
        # no recent problems, reasons or process details: only what makes it unhealthy
        click.echo("\n".join(report["problems"]) if report["problems"] else "healthy")
    else:
        render(report, console)
    ctx.exit(0 if report.get("healthy") else 1)


@main.command()
@click.pass_context
def liveness(ctx: click.Context) -> None:
    """Exit 1 when a worker process here has run one task for over an hour (hung).

    A liveness probe for a worker's container: a hung worker still beats its heart in
    `status`. It reads only what this host's worker processes note in the temporary
    directory, never the database or the broker, so their outage restarts nothing.
    """
    from worker.heartbeat import HUNG_AFTER, hung_tasks

    hung = hung_tasks()
    for task in hung:
        click.echo(
            f"worker process {task.pid} has run {task.task} for {task.seconds / 60:.0f} min "
            f"(hung after {HUNG_AFTER.total_seconds() / 60:.0f})"
        )
    if not hung:
        click.echo("alive")
    ctx.exit(1 if hung else 0)


@main.command("retry-deliveries")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.pass_context
def retry_deliveries(ctx: click.Context, delivery_ids: tuple[int, ...]) -> None:
    """Send failed deliveries again (all of them, or the ids given).

    An SR or SC whose destination is no longer in BONEAGE_DESTINATIONS goes to the
    configured destinations instead. Where the broker does not take the messages, the
    deliveries stay pending for the reconciler, and the command exits with status 1.
    """
    from worker.celery_app import configure
    from worker.delivery import PUT_BACK, RetryInterrupted, not_failed, retry_failed
    from worker.runtime import Runtime

    settings = _settings(ctx)
    _require_schema(settings)
    configure(settings)
    rt = Runtime(settings)
    # read before: those it puts back are pending after
    left_as_they_are = not_failed(rt.database_url, delivery_ids)
    stopped: RetryInterrupted | None = None
    try:
        retried = retry_failed(rt, list(delivery_ids) or None)
    except RetryInterrupted as interrupted:
        # what committed before the error is pending all the same: published and said
        retried, stopped = interrupted.retried, interrupted
    # in id order: an assessment's SR and SC mostly share a message
    unpublished, failure = _publish_deliveries(retried.queued)
    click.echo(f"{len(retried.reset)} failed deliveries queued again")
    if left_as_they_are:
        why = "; ".join(f"delivery {i} {text}" for i, text in left_as_they_are.items())
        click.echo(
            f"{len(left_as_they_are)} deliveries given were left as they are, only failed ones "
            f"are sent again: {why}"
        )
    if retried.redirected:
        made = sum(len(new) for new in retried.redirected.values())
        where = (
            f"{made} deliveries queued to {', '.join(retried.destinations)}"
            if made
            else "the configured destinations each had them already"
        )
        click.echo(
            f"{len(retried.redirected)} failed deliveries to destinations no longer "
            f"configured sent to the configured destinations instead: {where}"
        )
    if retried.abandoned_there:
        there = sorted({d for ds in retried.abandoned_there.values() for d in ds})
        click.echo(
            f"{len(retried.abandoned_there)} failed deliveries left failed, their "
            "destinations no longer configured: abandoned at the configured "
            f"destination(s) {', '.join(there)}, and no other configured destination "
            "would get them: give them up too with "
            f"{_abandon_command(list(retried.abandoned_there))}, or configure a "
            "destination that takes them and run retry-deliveries again"
        )
    if retried.no_destination:
        click.echo(
            f"{len(retried.no_destination)} failed deliveries left failed, their "
            "destinations no longer configured: no destination is configured "
            "(BONEAGE_DESTINATIONS)"
        )
    if retried.removed:
        click.echo(
            f"{len(retried.removed)} failed deliveries left failed, their destinations no "
            "longer configured: their files are gone (retention removed them): nothing "
            f"can send them; close them with {_abandon_command(retried.removed)}"
        )
    if retried.missing:
        click.echo(
            f"{len(retried.missing)} failed deliveries left failed, their destinations no "
            "longer configured: their files are not found where they were written: "
            f"{PUT_BACK} again"
        )
    not_sent = (
        None
        if failure is None
        else _broker_unreachable(
            settings,
            failure,
            f"{len(unpublished)} deliveries stay pending, and the reconciler sends them",
        )
    )
    if stopped is not None:
        click.echo(
            f"retry-deliveries stopped ({type(stopped.__cause__).__name__}): "
            f"{len(stopped.left)} failed deliveries to destinations no longer configured "
            "not redirected, left failed: run it again",
            err=True,
        )
        if not_sent is not None:
            click.echo(not_sent, err=True)
        raise stopped
    if not_sent is not None:
        raise click.ClickException(not_sent)


def _abandon_command(delivery_ids: list[int]) -> str:
    """The command that closes failed deliveries nothing can send, for a message: with
    every id, as an administrator copies it."""
    return f"'boneage-worker abandon-deliveries --reason TEXT {' '.join(map(str, delivery_ids))}'"


def _broker_shown(settings: Settings) -> str:
    """The broker's URL as a message shows it: each URL of a failover list (``;``, spaces
    around it allowed) without its password (`_url_shown`)."""
    return ";".join(_url_shown(url.strip()) for url in settings.effective_broker_url.split(";"))


#: The user information of a URL as kombu's ``maybe_sanitize_url`` leaves it shown: a
#: password is ``**``.
_USERINFO = re.compile(r"://([^/@]*)@")
#: A URL's scheme (RFC 3986 3.1).
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _url_shown(url: str) -> str:
    """``url`` without its password, as Celery's own banner shows it (kombu's
    ``maybe_sanitize_url``), or ``scheme://***`` where it cannot be shown so: kombu could
    not read it (a password with an unescaped ``/``, ``#`` or ``?``: its ValueError
    quotes part of it), or what it shows still holds a password (a second URL after a
    comma; a password cut at an unescaped ``;``); ``***`` where not even the scheme is
    sure. Never any part of the credentials."""
    from kombu.utils.url import maybe_sanitize_url

    scheme, sep, _ = url.partition("://")
    if not sep:
        # a host of a failover list ("h2:26379"), or a password's rest cut at a ';'
        return "***" if "@" in url else url
    if not _SCHEME.fullmatch(scheme):
        return "***"
    masked = f"{scheme}://***"
    try:
        shown = maybe_sanitize_url(url)
    except Exception:  # its message may quote the password
        return masked
    if not isinstance(shown, str) or any(
        ":" in userinfo and userinfo.partition(":")[2] != "**"
        for userinfo in _USERINFO.findall(shown)
    ):
        return masked
    return shown


def _broker_unreachable(settings: Settings, exc: BaseException, left: str) -> str:
    """The sentence a command that publishes ends with when the broker did not take its
    messages (away, or refusing them): which broker, why by type, and ``left``, what
    stays for the reconciler, which it sends once the broker is back. The traceback
    goes to the log at DEBUG."""
    from worker.messaging import failure_name

    logger.debug("publishing failed", exc_info=exc)
    return (
        f"the broker at {_broker_shown(settings)} could not be reached "
        f"({failure_name(exc)}): {left} once the broker is back"
    )


def _publish_deliveries(delivery_ids: list[int]) -> tuple[list[int], Exception | None]:
    """Publish `deliver` messages for ``delivery_ids``, in order, as
    `worker.messaging.enqueue_delivery` does: those the broker did not take (from the
    first message it did not take on: none is tried after it) and why, or none and None.
    Their rows stay pending: the reconciler publishes them again."""
    from worker.messaging import DELIVERIES_PER_MESSAGE, enqueue_delivery

    for start in range(0, len(delivery_ids), DELIVERIES_PER_MESSAGE):
        try:
            enqueue_delivery(delivery_ids[start : start + DELIVERIES_PER_MESSAGE])
        except Exception as exc:  # broker down or refusing: the rows stay pending
            return delivery_ids[start:], exc
    return [], None


#: Failed deliveries `abandon-deliveries` lists one by one before it asks; the rest counted.
ABANDON_LISTED = 20


@main.command("abandon-deliveries")
@click.argument("delivery_ids", nargs=-1, required=True, type=int)
@click.option(
    "--reason",
    required=True,
    help="Why they are given up: kept in each delivery's row, with who and when.",
)
@click.option("--yes", is_flag=True, help="Abandon them without asking.")
@click.option(
    "--including-notes",
    is_flag=True,
    help=(
        "Abandon failed rejection notes of ours to configured destinations too (a "
        "destination that never takes them): the results they withdraw stay at the PACS, "
        "to be withdrawn there by hand."
    ),
)
@click.pass_context
def abandon_deliveries(
    ctx: click.Context,
    delivery_ids: tuple[int, ...],
    reason: str,
    yes: bool,
    including_notes: bool,
) -> None:
    """Give up failed deliveries on purpose (the ids given): never sent again.

    For a failed SR or SC that nothing can send (its file removed by retention), or that
    its destination will never take. Each keeps who gave it up, when and why in its row
    (its error, shown by `status --json`); `status` then counts it as abandoned instead
    of reporting the node unhealthy. Only failed SRs and SCs, and failed rejection notes
    of ours whose destinations are no longer configured (a node decommissioned: nothing
    can send them; listed with a warning that the PACS there may still show the result
    they withdraw): where an id given is not one (a note to a configured destination,
    which withdraws a result it may show, is given up only with --including-notes, for
    one the destination never takes, with a warning that the result stays at the PACS,
    to be withdrawn there by hand), nothing is abandoned.
    Asks before it abandons them, unless --yes.
    """
    from worker.delivery import abandon_failed, abandonable, configured

    reason = " ".join(reason.split())
    if not reason:
        raise click.BadParameter("say why they are given up", param_hint="--reason")
    settings = _settings(ctx)
    _require_schema(settings)
    url = settings.effective_database_url
    failed, refused = abandonable(url, delivery_ids, settings, including_notes=including_notes)
    if refused:
        why = "; ".join(f"delivery {i} {text}" for i, text in sorted(refused.items()))
        notes_too = (
            ""
            if including_notes
            else " (a rejection note only where its destination is no longer configured)"
        )
        raise click.ClickException(
            f"nothing abandoned: only failed deliveries can be abandoned{notes_too}, and {why}"
        )
    file = {True: "; its file removed by retention", False: "; its file not found", None: ""}
    for d in failed[:ABANDON_LISTED]:
        click.echo(
            f"delivery {d.id} ({d.kind} to {d.destination}) of instance {d.instance_id}, "
            f"failed: {d.last_error or 'no error recorded'}{file[d.file_gone]}"
        )
    if len(failed) > ABANDON_LISTED:
        click.echo(f"and {len(failed) - ABANDON_LISTED} more failed deliveries")
    # to configured destinations only --including-notes: `abandonable` refuses them
    notes = sum(1 for d in failed if d.kind == "ko")
    there = [d.id for d in failed if d.kind == "ko" and configured(settings, d.destination)]
    if notes > len(there):
        click.echo(
            f"warning: {notes - len(there)} of them are rejection notes to destinations no "
            "longer configured: the PACS there may still show the results they withdraw, "
            "and nothing withdraws them once abandoned"
        )
    if there:
        click.echo(
            f"WARNING: {len(there)} of them are rejection notes of ours to configured "
            f"destinations (deliveries {' '.join(map(str, there))}): each withdraws an SR or "
            "SC of ours that the PACS has or may have (its image rejected by the PACS, or "
            "now under another patient or study). Abandoned, it is never sent: that result "
            "stays at the PACS, perhaps under the wrong patient, and 'status' no longer "
            "reports it; withdraw it there by hand"
        )
    if not yes:
        what = "deliveries" if notes else "SR and SC deliveries"
        question = (
            f"Abandon these {len(failed)} failed {what}? Never sent again, "
            "none reaches the destination it failed to"
        )
        if not _agreed(question):
            raise click.ClickException("nothing abandoned: answer y to the question, or pass --yes")
    done = abandon_failed(
        url,
        [d.id for d in failed],
        reason=reason,
        by=_who(),
        settings=settings,
        including_notes=including_notes,
    )
    click.echo(
        f"{len(done)} failed deliveries abandoned: never sent again, and 'status' counts "
        "them as abandoned"
    )
    if left := sorted({d.id for d in failed} - set(done)):
        click.echo(
            f"{len(left)} left as they are, no longer failed (sent again by "
            f"retry-deliveries, or superseded, meanwhile): {' '.join(map(str, left))}"
        )


def _agreed(question: str) -> bool:
    """The administrator's answer to ``question``, no by default: no answer (no terminal,
    end of input) or Ctrl-C is no."""
    try:
        return click.confirm(question, default=False)
    except click.Abort:
        return False


def _who() -> str:
    """Who abandons deliveries, as their rows record it: this process's effective user
    by the system's user database (not $LOGNAME or $USER, which anyone sets), its uid
    where it has no name (a container's user), and the user sudo was run by, where sudo
    says so ($SUDO_USER): "the administrator (user root via sudo from alice)"."""
    import pwd

    uid = os.geteuid()
    try:
        user = f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:  # a container's user with no name
        user = f"uid {uid}"
    sudo = os.environ.get("SUDO_USER", "").strip()
    via = f" via sudo from {sudo}" if sudo else ""
    return f"the administrator ({user}{via})"


@main.command()
@click.option("--study", "study_uids", multiple=True, help="Study Instance UID (repeatable).")
@click.option(
    "--instance",
    "instance_ids",
    multiple=True,
    type=int,
    help="Instance id as `status` shows it (repeatable).",
)
@click.option(
    "--model",
    "checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Checkpoint to assess with (default BONEAGE_MODEL); workers must run it too.",
)
@click.option(
    "--send/--no-send",
    default=False,
    show_default=True,
    help="Send the new SR and SC to the destinations.",
)
@click.pass_context
def reprocess(
    ctx: click.Context,
    study_uids: tuple[str, ...],
    instance_ids: tuple[int, ...],
    checkpoint: Path | None,
    send: bool,
) -> None:
    """Assess chosen studies again, with the configured (new) model.

    Instances this model already assessed are skipped; new results are only sent
    with --send, which also sends, assessing them again, those this model's reprocess
    without --send kept unsent.
    """
    from worker.celery_app import configure
    from worker.messaging import enqueue_assess
    from worker.reprocess import (
        files_removed,
        kept_unsent,
        matched_nothing,
        models_of_live_workers,
        not_finished,
        prepare_reprocess,
        rejected_by_the_pacs,
        select_instances,
        sent_by_other_models,
        uid_clashes,
        workers_problem,
    )
    from worker.runtime import Runtime

    settings = _settings(ctx, model=checkpoint)
    _check_model_file(settings)  # it loads the model, for its id
    _require_schema(settings)
    configure(settings)
    rt = Runtime(settings)
    try:
        chosen = select_instances(rt, study_uids=study_uids, instance_ids=instance_ids)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # a UID mistyped, an id of another node: said, not taken for nothing left to do
    no_study, no_instance = matched_nothing(rt, study_uids=study_uids, instance_ids=instance_ids)
    unknown = "; ".join(
        [
            *([f"no image received here is in study {', '.join(no_study)}"] if no_study else []),
            *([f"no instance has id {', '.join(map(str, no_instance))}"] if no_instance else []),
        ]
    )
    if not chosen:
        raise click.ClickException(f"nothing to reprocess: {unknown}")
    # The workers assess with the model they run, whatever this command loaded.
    if (problem := workers_problem(rt)) is not None:
        raise click.ClickException(problem)
    if not models_of_live_workers(rt):
        console.print(
            "[yellow]No inference worker is running: the instances wait in the queue for "
            f"one that runs model {rt.predictor.model_id[:12]} (BONEAGE_MODEL).[/]"
        )
    waiting = not_finished(rt, chosen)  # before: what it queues is not finished after
    rejected = rejected_by_the_pacs(rt, chosen)
    clashes = uid_clashes(rt, chosen)
    unsent = set(kept_unsent(rt, chosen))  # before: a reprocess asked to send removes them
    todo = prepare_reprocess(rt, chosen, send=send)
    unpublished: list[int] = []
    failure: Exception | None = None
    for index, instance_id in enumerate(todo):
        # a message not published: the reconciler queues it, as asked
        try:
            enqueue_assess(instance_id, send=send)
        except Exception as exc:  # broker down or refusing: none is tried after it
            unpublished, failure = todo[index:], exc
            break
    gone = files_removed(rt, chosen, send=send)
    fate = (
        "results will be sent"
        if send
        else "results kept, not sent: reprocess again with --send to send them"
    )
    # each instance counted once: one retention cleaned up may be a clash or rejected too
    already = set(chosen) - set(todo) - {*gone, *waiting, *rejected, *clashes}
    if unknown:
        console.print(f"[yellow]Matched nothing: {unknown}.[/]")
    console.print(
        f"{len(chosen)} instances chosen; {len(todo)} queued for model "
        f"{rt.predictor.model_id[:12]} ({fate}); {len(already)} already assessed by it; "
        f"{len(waiting)} not finished yet (left as they are)"
    )
    if resent := sorted(unsent & set(todo)):
        console.print(
            f"{len(resent)} of those queued were assessed by this model before with their "
            "results kept, not sent (reprocess without --send): they are assessed again, "
            f"and sent this time. Instance ids: {', '.join(map(str, resent))}"
        )
    if kept := sorted(unsent & already):
        # with --send, where nothing is configured to send them to
        how = (
            "configure BONEAGE_DESTINATIONS, then run reprocess again with --send"
            if send and not settings.destinations
            else "run reprocess again with --send to assess them again and send them"
        )
        console.print(
            f"[yellow]{len(kept)} of those already assessed by it have their results kept, "
            "not sent (a reprocess without --send, or no destination configured then): "
            f"{how}. Instance ids: {', '.join(map(str, kept))}[/]"
        )
    if send and (beside := sent_by_other_models(rt, todo)):
        console.print(
            f"[yellow]{len(beside)} instance(s) have a bone age of another model at the "
            "destinations: the new SR and SC join it in series of their own and do not "
            "replace it; the radiologist sees both. Instance ids: "
            f"{', '.join(map(str, beside))}[/]"
        )
    if rejected:
        console.print(
            f"[yellow]{len(rejected)} instance(s) not queued: the PACS rejected them (a "
            "rejection note), and what was sent of them was withdrawn. Instance ids: "
            f"{', '.join(map(str, rejected))}[/]"
        )
    if clashes:
        console.print(
            f"[yellow]{len(clashes)} instance(s) not queued: another image came under their "
            "SOP Instance UID and was refused, and it is what the spool holds now; have the "
            "PACS send the image again. Instance ids: "
            f"{', '.join(map(str, clashes))}[/]"
        )
    if gone:
        console.print(
            f"[yellow]{len(gone)} instance(s) not queued: retention removed their received "
            "images (BONEAGE_RETENTION_DAYS); send them again from the PACS, or backfill "
            f"them. Instance ids: {', '.join(map(str, gone))}[/]"
        )
    if failure is not None:
        raise click.ClickException(
            _broker_unreachable(
                settings,
                failure,
                f"{len(unpublished)} instances stay queued, and the reconciler queues them",
            )
        )


@main.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Queue again the work whose broker messages were lost.

    Where the broker does not take the messages, what was not queued stays for the
    reconciler's next round, and the command exits with status 1.
    """
    from worker import tasks
    from worker.celery_app import configure

    settings = _settings(ctx)
    _require_schema(settings)
    configure(settings)
    report = tasks.run_reconcile()
    console.print(
        f"re-queued {len(report.instances)} instances, {len(report.deliveries)} deliveries"
    )
    if report.failure is not None:
        raise click.ClickException(
            _broker_unreachable(
                settings,
                report.failure,
                f"{len(report.instances_not_published)} instances and "
                f"{len(report.deliveries_not_published)} deliveries were not queued, and "
                "the reconciler queues them",
            )
        )


@main.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option(
    "--days",
    type=click.FloatRange(min=0, min_open=True),
    help="Keep files this many days instead of BONEAGE_RETENTION_DAYS.",
)
@click.option(
    "--all-marked",
    is_flag=True,
    help="Look again at the files of every instance retention marked before, not only "
    "the last day's: after linking a moved data directory's old place to the new.",
)
@click.pass_context
def retention(ctx: click.Context, dry_run: bool, days: float | None, all_marked: bool) -> None:
    """Remove received images and SR/SC files that retention lets go, now.

    Files of an instance go BONEAGE_RETENTION_DAYS after it finished, once every
    delivery of it succeeded; its database rows and results stay. A received image
    that no instance records is removed too, BONEAGE_RETENTION_DAYS after retention
    first found it unrecorded. The listener does this every hour; this command is for
    a first clean-up or a dry run.
    """
    from worker.retention import remove_expired_files

    settings = _settings(ctx)
    _require_schema(settings)
    keep = days if days is not None else settings.retention_days
    if not keep:
        raise click.UsageError(
            "BONEAGE_RETENTION_DAYS is 0 (files kept for ever); pass --days to remove some"
        )
    if all_marked and dry_run:  # the instances marked before are looked at by removing
        raise click.UsageError("--all-marked removes; it has no dry run")
    report = remove_expired_files(
        settings.effective_database_url,
        older_than=timedelta(days=keep),
        dry_run=dry_run,
        outbox_dir=settings.outbox_dir,
        spool_dir=settings.spool_dir,
        all_marked=all_marked,
    )
    verb = "would remove" if dry_run else "removed"
    unsent = (
        f", {report.unsent_outputs} of them SR or SC files made with nothing to send them to"
        if report.unsent_outputs
        else ""
    )
    if report.unrecorded_images:
        unsent += (
            f", {report.unrecorded_images} of them received images that no instance "
            f"recorded for {keep:g} day(s) since retention found them (a row not committed, "
            "or lost to a database restore)"
        )
    marked_before = " (and of the instances marked before)" if all_marked else ""
    console.print(
        f"{verb} the files of {report.instances} instance(s){marked_before} finished and last "
        f"received more than {keep:g} day(s) ago and fully delivered: {report.files} "
        f"file(s), {report.bytes / 1e6:.1f} MB"
        f"{unsent}"
    )
    if report.unrecorded_first_seen:
        console.print(
            f"{report.unrecorded_first_seen} received image(s) that no instance records "
            f"{'would be' if dry_run else 'were'} found for the first time (a row not "
            f"committed, or lost to a database restore): removed {keep:g} day(s) after "
            "that unless a row names them"
        )
    if report.unrecorded_unmarked:
        console.print(
            f"[yellow]{report.unrecorded_unmarked} received image(s) that no instance "
            f"records {'would not be' if dry_run else 'were not'} dated (markers are the "
            "spool owner's to make; see the warning): kept until a run as the spool's "
            "owner dates them"
        )
    if report.kept_elsewhere:
        console.print(
            f"[yellow]{report.kept_elsewhere} file(s) that those instances' rows name outside "
            f"this node's spool and outbox {'would be' if dry_run else 'were'} kept: another "
            "node's (a database copied from it), or this node's where its data directory "
            "once was (moved: link the old place to the new, and run `boneage-worker "
            "retention --all-marked`)"
        )
    if report.left:
        later = (
            "run `boneage-worker retention --all-marked` again"
            if all_marked
            else "the next runs remove them, within a day of their mark (after it, "
            "`boneage-worker retention --all-marked`)"
        )
        console.print(
            f"[yellow]the files of {report.left} instance(s) marked removed (by this run, or "
            "before) were kept this time: listeners held the spool's recording lock "
            f"(images being received); {later}"
        )


@main.command()
@click.option("--from", "source", required=True, help="The PACS to query, AE@host:port.")
@click.option("--since", required=True, type=click.DateTime(["%Y-%m-%d"]), help="First study date.")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Last study date (inclusive).")
@click.option("--modality", default="CR,DX", show_default=True, help="Comma-separated.")
@click.option("--dry-run", is_flag=True, help="List what would be moved; move nothing.")
@_TLS_OPTION
@click.pass_context
def backfill(
    ctx: click.Context,
    source: str,
    since: Any,
    until: Any,
    modality: str,
    dry_run: bool,
    tls: bool | None,
) -> None:
    """Have a PACS send the hand radiographs it already holds (C-FIND, then C-MOVE to us).

    The PACS must know our AE title (BONEAGE_AE_TITLE) as a move destination with the
    listener's host and port, and allow us C-FIND and C-MOVE.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    from dicom_io.qr import QueryError
    from dicom_io.scp import uid_tag
    from worker.backfill import (
        BackfillInterrupted,
        BackfillReport,
        plan_backfill,
        run_backfill,
    )
    from worker.settings import Destination

    settings = _settings(ctx)
    try:
        peer = Destination.parse(source)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from exc
    modalities = [m.strip().upper() for m in modality.split(",") if m.strip()]
    if not modalities:
        raise click.BadParameter("name at least one modality", param_hint="--modality")
    first, last = since.date(), until.date() if until else None
    if last is not None and last < first:
        raise click.BadParameter("--until is before --since", param_hint="--until")
    ssl_context = _client_tls(settings, tls)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(f"querying {peer}", total=None)
            plan = plan_backfill(
                peer,
                calling_ae_title=settings.ae_title,
                since=first,
                until=last,
                modalities=modalities,
                on_study=lambda _tag: progress.advance(task),
                ssl_context=ssl_context,
            )
    except QueryError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        console.print("interrupted while the studies' series were listed: nothing moved")
        ctx.exit(130)

    if dry_run:
        table = Table(title=f"series that would be moved from {peer} to {settings.ae_title}")
        for column in ("study date", "study", "series", "modality", "body part", "instances"):
            table.add_column(column)
        dates = {s.study_instance_uid: s.study_date for s in plan.studies}
        for series in plan.series:
            table.add_row(
                dates.get(series.study_instance_uid) or "-",
                uid_tag(series.study_instance_uid),
                uid_tag(series.series_instance_uid),
                series.modality,
                series.body_part_examined or "-",
                str(series.number_of_instances) if series.number_of_instances is not None else "?",
            )
        console.print(table)
        console.print(
            f"dry run: {len(plan.studies)} studies found, {len(plan.series)} series would be "
            f"moved, {len(plan.failures)} failures"
        )
        for failure in plan.failures:
            console.print(f"  [red]{failure}[/]")
        ctx.exit(1 if plan.failures else 0)

    report: BackfillReport | None = None
    interrupted = False
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(
                f"moving series to {settings.ae_title}", total=len(plan.series)
            )
            report = run_backfill(
                peer,
                plan,
                calling_ae_title=settings.ae_title,
                move_destination=settings.ae_title,
                on_series=lambda _tag: progress.advance(task),
                ssl_context=ssl_context,
            )
    except KeyboardInterrupt as exc:  # what was moved is said, then the usual 130
        report, interrupted = BackfillInterrupted.report_of(exc) or report, True
        if report is None:
            raise
    warned = report.instances_with_warnings
    warned_said = f", {warned} with a warning" if warned else ""
    # what was left where the listing or the run stopped: the PACS no longer answering,
    # or Ctrl-C
    left = "".join(
        f"{label}: {count}, "
        for label, count in (
            ("studies not tried", report.studies_not_tried),
            ("series not tried", report.series_not_tried),
        )
        if count
    )
    console.print(
        f"{'interrupted: ' if interrupted else ''}"
        f"studies found: {report.studies_found}, series matched: {report.series_matched}, "
        f"series moved: {report.series_moved} ({report.instances_moved} instances"
        f"{warned_said}), {left}failures: {len(report.failures)}"
    )
    for failure in report.failures:
        console.print(f"  [red]{failure}[/]")
    ctx.exit(130 if interrupted else 1 if report.failures else 0)


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--to", "destination", required=True, help="AE@host:port")
@click.option("--calling-ae", default=None, help="Our AE title (default BONEAGE_AE_TITLE).")
@_TLS_OPTION
@click.pass_context
def send(
    ctx: click.Context,
    files: tuple[Path, ...],
    destination: str,
    calling_ae: str | None,
    tls: bool | None,
) -> None:
    """C-STORE DICOM files to a node."""
    from dicom_io.scu import NotSendable, SendError, send_files
    from worker.settings import Destination

    settings = _settings(ctx)
    try:
        dest = Destination.parse(destination)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--to") from exc
    try:
        outcomes = send_files(
            list(files),
            ae_title=dest.ae_title,
            host=dest.host,
            port=dest.port,
            calling_ae_title=calling_ae or settings.ae_title,
            ssl_context=_client_tls(settings, tls),
        )
    except (SendError, NotSendable) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot read {exc.filename}: {exc.strerror}") from exc
    for outcome in outcomes:
        console.print(f"{outcome.path}: status 0x{outcome.status:04X}")
    if not all(o.ok for o in outcomes):
        ctx.exit(1)


@main.command()
@click.argument("destination")
@click.option("--calling-ae", default=None, help="Our AE title (default BONEAGE_AE_TITLE).")
@_TLS_OPTION
@click.pass_context
def echo(ctx: click.Context, destination: str, calling_ae: str | None, tls: bool | None) -> None:
    """C-ECHO a DICOM node given as AE@host:port (checks a destination or our listener)."""
    from rich.markup import escape

    from dicom_io.scu import SendError
    from dicom_io.scu import echo as c_echo
    from worker.settings import Destination

    settings = _settings(ctx)
    try:
        dest = Destination.parse(destination)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="DESTINATION") from exc
    try:
        status = c_echo(
            dest.ae_title,
            dest.host,
            dest.port,
            calling_ae_title=calling_ae or settings.ae_title,
            ssl_context=_client_tls(settings, tls),
        )
    except SendError as exc:  # refused, rejected (and why), TLS failed, not answered
        console.print(f"[red]{dest}: no C-ECHO answer: {escape(str(exc))}[/]")
        ctx.exit(1)
    if status == 0x0000:
        console.print(f"{dest}: C-ECHO succeeded")
    else:
        console.print(f"[red]{dest}: C-ECHO answered status 0x{status:04X}[/]")
        ctx.exit(1)


@main.command("demo-image")
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--age-months", type=float, default=120.0, show_default=True)
@click.option("--sex", type=click.Choice(["M", "F"]), default="M", show_default=True)
@click.option("--modality", type=click.Choice(["DX", "CR", "CT"]), default="DX", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_image(output: Path, age_months: float, sex: str, modality: str, seed: int) -> None:
    """Write a synthetic hand radiograph (a phantom, not a patient) as DICOM."""
    import datetime as dt

    import numpy as np

    from dicom_io.synthetic import make_radiograph_dataset
    from models.phantoms import make_phantom

    phantom = make_phantom(age_months, male=sex == "M", size=1024, rng=np.random.default_rng(seed))
    study = dt.date.today()
    birth = study - dt.timedelta(days=round(age_months * 30.4375))
    pixels = np.round(phantom.image * 4095).astype(np.uint16)
    ds = make_radiograph_dataset(
        pixels, modality=modality, sex=sex, birth_date=birth, study_date=study
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(output, enforce_file_format=True)
    console.print(f"wrote {output} ({modality}, {sex}, {age_months:.0f} months)")


# -- machine learning -------------------------------------------------------------


def _data_options(func: Any) -> Any:
    options = [
        click.option(
            "--rsna-csv",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="RSNA labels CSV: the training set's (id, boneage, male), the validation "
            "set's (Image ID, male, Bone Age (months)) or the test set's (Case ID, Sex, "
            "Ground truth bone age (months)).",
        ),
        click.option(
            "--rsna-images",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Folder with <id>.png.",
        ),
        click.option(
            "--dicom-dir",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Folder of DICOM radiographs.",
        ),
        click.option(
            "--labels",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="CSV for --dicom-dir: file, boneage[, male][, patient]. Images of one "
            "patient (PatientID, or the patient column) stay on one side of the split.",
        ),
        click.option(
            "--phantoms", type=int, help="Use N synthetic phantoms (for trying things out)."
        ),
        click.option("--phantom-size", type=int, default=128, show_default=True),
        click.option("--limit", type=int, help="Use only the first N images."),
        click.option(
            "--seed",
            type=int,
            default=0,
            show_default=True,
            help="Seed of the phantoms (train: of the split and training too). evaluate "
            "draws its phantoms from seed + 1000000, never the phantoms train drew.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _items(**kwargs: Any) -> tuple[list[Any], str]:
    from worker.datasets import load_items

    try:
        return load_items(**kwargs)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@_data_options
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Checkpoint to write (.safetensors).",
)
@click.option(
    "--arch",
    type=click.Choice(["resnet18", "resnet34", "resnet50"]),
    default="resnet50",
    show_default=True,
)
@click.option(
    "--input-size", type=click.IntRange(32, 2048), default=512, show_default=True
)  # as a checkpoint may name (models.checkpoint.MAX_INPUT_SIZE)
@click.option(
    "--pretrained",
    type=click.Choice(["imagenet"]),
    default=None,
    help="Start the trunk from torchvision's ImageNet weights (downloaded by torchvision).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lr", type=float, default=3e-4, show_default=True)
@click.option("--loss", type=click.Choice(["l1", "mse", "huber"]), default="l1", show_default=True)
@click.option(
    "--schedule", type=click.Choice(["cosine", "plateau"]), default="cosine", show_default=True
)
@click.option(
    "--patience",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Early-stopping patience (epochs).",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 0.5, min_open=True),
    default=0.15,
    show_default=True,
    help="Share of the patients held out for validation and the intervals, to the nearest "
    "whole patient (the shares of patients and images used are logged and in the checkpoint).",
)
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA.")
@click.option(
    "--clahe",
    is_flag=True,
    help="CLAHE contrast equalisation in preprocessing (recorded in the checkpoint: the "
    "worker and evaluate then apply it too, and need OpenCV).",
)
@click.option(
    "--workers",
    "num_workers",
    type=int,
    default=0,
    show_default=True,
    help="Data-loading processes.",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where per-epoch training state goes (needed for --resume).",
)
@click.option("--resume", is_flag=True, help="Continue from --state-dir.")
@click.option(
    "--restart",
    is_flag=True,
    help="Train anew in --state-dir, replacing the run saved there (refused without it).",
)
@click.option(
    "--version", "model_version", default="", help="Version string stored in the checkpoint."
)
@click.pass_context
def train(
    ctx: click.Context,
    output: Path,
    arch: str,
    input_size: int,
    pretrained: str | None,
    epochs: int,
    batch_size: int,
    lr: float,
    loss: str,
    schedule: str,
    patience: int,
    val_fraction: float,
    augment: bool,
    amp: bool,
    clahe: bool,
    num_workers: int,
    device: str,
    state_dir: Path | None,
    resume: bool,
    restart: bool,
    model_version: str,
    **data: Any,
) -> None:
    """Train a bone-age model and write a checkpoint with conformal intervals.

    DICOM images (--dicom-dir) are decoded as the service decodes them for a model of
    --input-size, at the reduced resolution the site's BONEAGE_SC_MIN_LONG_SIDE allows:
    the model learns from the inputs it will be given.
    """
    from models.train import TrainConfig, check_destinations
    from models.train import train as run_training

    settings = _settings(ctx)  # the site's sc_min_long_side bounds the service's decode
    if resume and state_dir is None:
        raise click.BadParameter("--resume needs --state-dir", param_hint="--resume")
    if resume and restart:
        raise click.UsageError("--resume and --restart exclude each other")
    try:  # a setting out of range: said in one line, before any data are read
        config = TrainConfig(
            arch=arch,
            input_size=input_size,
            pretrained=cast(Literal["imagenet"] | None, pretrained),
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            loss=cast(Literal["l1", "mse", "huber"], loss),
            schedule=cast(Literal["cosine", "plateau"], schedule),
            patience=patience,
            val_fraction=val_fraction,
            augment=augment,
            amp=amp,
            clahe=clahe,
            num_workers=num_workers,
            seed=data["seed"],
            device=device,
            version=model_version,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    # before the data is read (a folder of DICOM files takes a while): where the results
    # go, and a saved run's settings, which the data's description is not part of
    try:
        check_destinations(output, state_dir, config=config, resume=resume, restart=restart)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    items, description = _items(
        **data, input_size=input_size, sc_min_long_side=settings.sc_min_long_side
    )
    config = dataclasses.replace(config, data_description=description)
    console.print(f"training {arch} at {input_size} px on {description}")
    try:
        result = run_training(
            items, output, config=config, state_dir=state_dir, resume=resume, restart=restart
        )
    # --clahe without OpenCV (the message says what to install); a refusal, or an image
    # that cannot be decoded or read (named: a DICOM file with its labels file and line)
    except (ImportError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    metrics = ", ".join(f"{k} {v:.3g}" for k, v in result.meta.metrics.items())
    console.print(
        f"wrote {result.checkpoint} (model id {result.model_id[:12]}); validation: {metrics}"
    )


@main.command()
@_data_options
@click.option(
    "--model",
    "checkpoint",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
)
@click.option("--output-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--precision",
    type=click.Choice(get_args(Precision)),
    default="auto",
    show_default=True,
    help="What the trunk runs in, as BONEAGE_PRECISION (auto: float16 on CUDA, else float32).",
)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--plots/--no-plots", default=True, show_default=True)
@click.option(
    "--allow-missing",
    is_flag=True,
    help="Evaluate the images found when some the labels list are missing (counted in "
    "metrics.json and report.md); without it that is an error.",
)
@click.option(
    "--bootstrap",
    "resamples",
    type=click.IntRange(min=0),
    default=2000,
    show_default=True,
    help="Resamples of the 95 % confidence intervals of MAE and bias (seed 0): of "
    "patients where the labels group images by patient, else of images. 0: none.",
)
@click.option(
    "--all-images",
    is_flag=True,
    help="With --dicom-dir: score every image, also those the service's gate refuses "
    "(another body part or view, an age out of range, ...) and never assesses; without it "
    "they are left out and counted by reason in metrics.json and report.md.",
)
@click.pass_context
def evaluate(
    ctx: click.Context,
    checkpoint: Path,
    output_dir: Path,
    device: str,
    precision: str,
    batch_size: int,
    plots: bool,
    allow_missing: bool,
    resamples: int,
    all_images: bool,
    **data: Any,
) -> None:
    """Evaluate a checkpoint: metrics overall, by sex and age band; plots; JSON + Markdown.

    DICOM images (--dicom-dir) are decoded as the service decodes them for this model,
    at the reduced resolution the site's BONEAGE_SC_MIN_LONG_SIDE allows, so that the
    figures are of what the service does; those its gate refuses are left out and counted
    by reason (--all-images scores them too).
    """
    from rich.table import Table

    from db.queries import reason_category
    from models.checkpoint import load_checkpoint
    from models.data import LabelledSet
    from models.evaluate import (
        BAND_TABLE_LEGEND,
        INTERVAL_TABLE_LEGEND,
        GateOutcome,
        band_interval_table,
        band_table,
        bootstrap_sentence,
        gate_sentence,
    )
    from models.evaluate import evaluate as run_evaluation
    from models.predictor import resolve_device, resolve_precision

    settings = _settings(ctx)  # the site's sc_min_long_side bounds the service's decode
    try:  # before reading any data: a device or precision this machine cannot run
        resolve_precision(precision, resolve_device(device))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        loaded = load_checkpoint(checkpoint)
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    from worker.datasets import EVALUATION_PHANTOM_SEED_OFFSET

    items, description = _items(
        **data,
        # another stream than train's phantoms of the same --seed: unseen images
        phantom_seed_offset=EVALUATION_PHANTOM_SEED_OFFSET,
        input_size=loaded.meta.input_size,
        sc_min_long_side=settings.sc_min_long_side,
        # DICOM images: only those the worker would assess (worker.pipeline._decide)
        gate=not all_images,
        # and given the sex the worker gives the model (its header's; else the label's,
        # or the site's: worker.datasets.read_dicom_folder)
        missing_sex=settings.missing_sex,
    )
    gate: GateOutcome | None = None  # images that are not DICOM: the gate has no say
    if data["dicom_dir"] is not None:
        left_out = items.left_out if isinstance(items, LabelledSet) else {}
        # by kind of reason, as status counts them: the reasons carry each image's values
        gate = GateOutcome.grouped(left_out, reason_category, applied=not all_images)
        if not items:
            raise click.ClickException(
                f"{gate_sentence({'gate': gate.as_metrics()})}: nothing is left to "
                "evaluate (--all-images to score them anyway)"
            )
    console.print(f"evaluating {checkpoint.name} on {description}")
    if gate is not None:
        console.print(gate_sentence({"gate": gate.as_metrics()}))
    try:
        report = run_evaluation(
            loaded,
            items,
            output_dir,
            device=device,
            precision=precision,
            batch_size=batch_size,
            plots=plots,
            allow_missing=allow_missing,
            bootstrap=resamples,
            data=description,
            gate=gate,
        )
    # OpenCV for a CLAHE model; missing images; an image that cannot be read or decoded
    # (named); an output folder that cannot be written
    except (ImportError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    overall = report.metrics.get("overall", report.metrics)
    shown = {k: overall[k] for k in ("mae", "rmse", "r2") if k in overall}
    console.print("  ".join(f"{k.upper()} {v:.3g}" for k, v in shown.items()))
    if (sentence := bootstrap_sentence(report.metrics)) is not None:
        console.print(sentence)
    tables = [("by age band", BAND_TABLE_LEGEND, band_table(report.metrics))]
    if (intervals := band_interval_table(report.metrics)) is not None:
        tables.append(("confidence intervals by age band", INTERVAL_TABLE_LEGEND, intervals))
    for title, legend, (header, rows) in tables:
        table = Table(title=title, caption=legend)
        for name in header:
            table.add_column(name, overflow="fold")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
    for path in report.files.values():
        console.print(f"  wrote {path}")


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--model",
    "checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Checkpoint (default BONEAGE_MODEL; none = untrained model).",
)
@click.option(
    "--sex",
    type=click.Choice(["M", "F"]),
    help="For PNG/JPEG inputs; for a DICOM file whose PatientSex is not M or F, in place "
    "of the site's BONEAGE_MISSING_SEX.",
)
@click.option(
    "--heatmap-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write the heat-map image as PNG here.",
)
@click.pass_context
def predict(
    ctx: click.Context,
    files: tuple[Path, ...],
    checkpoint: Path | None,
    sex: str | None,
    heatmap_dir: Path | None,
) -> None:
    """Estimate bone age for local files (DICOM or PNG), without the service.

    A file that cannot be assessed (the service's gate for DICOM; for an image file,
    a side under the gate's 128 px) is listed with the reason, and the command then
    exits with status 1.
    """
    from rich.table import Table

    from dicom_io import gate
    from dicom_io.content import format_age
    from dicom_io.pixels import decode_as_assessed, read_image, set_jpeg2000_threads
    from dicom_io.sc import render_overlay
    from models.data import load_image
    from worker.pipeline import age_notes, assessment_finding, site_sex_note
    from worker.runtime import Runtime

    settings = _settings(ctx, model=checkpoint)
    _check_model_file(settings)  # BONEAGE_MODEL, where --model is not given
    set_jpeg2000_threads(usable_cpus())  # one file at a time: every core for its decode
    try:
        predictor = Runtime(settings).predictor
    # a CLAHE model without OpenCV: the message says what to install; a file that is no
    # checkpoint of this software
    except (ImportError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table(
        title=f"bone age ({'trained' if predictor.meta.trained else 'UNTRAINED'} model "
        f"{predictor.model_id[:12]})"
    )
    for col in ("file", "sex", "bone age", "chronological", "SDS", "90% interval", "note"):
        table.add_column(col, overflow="fold")
    refused = 0
    for path in files:
        told: list[str] = []  # the service's note of a sex it was not told
        try:
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff"}:
                if sex is None:
                    raise ValueError("--sex is needed for image files")
                image, male = load_image(path), sex == "M"
                # nothing known of the patient but the sex given
                facts = gate.PatientFacts(male, None, None, None, None)
                rows, columns = image.shape[:2]
                if min(rows, columns) < gate.MIN_SIZE:
                    raise ValueError(
                        f"image is {columns}x{rows} pixels, smaller than "
                        f"{gate.MIN_SIZE}x{gate.MIN_SIZE}"
                    )
            else:
                ds = read_image(path)
                # a header with no sex: --sex, else as the service (BONEAGE_MISSING_SEX)
                site_sex = sex is None and settings.missing_sex != "reject"
                decision = gate.check(ds, require_sex=sex is None and not site_sex)
                if not decision.accepted:
                    reason = decision.reason or "not assessable"
                    if reason.startswith("patient sex is"):  # the site refuses it so
                        reason += " (--sex gives it one)"
                    raise ValueError(reason)
                facts = decision.facts
                male = facts.male if facts.male is not None else sex == "M"
                if facts.male is None and site_sex:
                    male = settings.missing_sex == "male"
                    told = [site_sex_note(male)]
                # as the service decodes it, so the bone age is the one its SR would give
                image = decode_as_assessed(
                    ds,
                    input_size=predictor.input_size,
                    sc_min_long_side=settings.sc_min_long_side,
                )
        except Exception as exc:  # one bad file must not stop the others
            table.add_row(path.name, "", "", "", "", "", f"[red]{exc}[/]")
            refused += 1
            continue
        prediction = predictor.predict(image, male=male)
        # as the service reports it: the same ages, SDS and notes as its SR and SC
        finding = assessment_finding(
            predictor, prediction, facts, male=male, notes=[*told, *age_notes(facts, male=male)]
        )
        chronological, sds = finding.chronological_age_months, finding.sds
        notes = [] if predictor.meta.trained else ["[yellow]untrained model[/]"]
        interval = prediction.intervals.get(0.9)
        table.add_row(
            path.name,
            "M" if male else "F",
            format_age(prediction.bone_age_months),
            format_age(chronological) if chronological is not None else "-",
            f"{sds:+.2f}" if sds is not None else "-",
            f"{format_age(interval[0])} – {format_age(interval[1])}" if interval else "-",
            "; ".join([*notes, *finding.notes]),
        )
        if heatmap_dir is not None:
            from PIL import Image

            heatmap_dir.mkdir(parents=True, exist_ok=True)
            out = heatmap_dir / f"{path.stem}-heatmap.png"
            Image.fromarray(render_overlay(image, prediction.cam, finding)).save(out)
    console.print(table)
    if refused:
        console.print(f"{refused} of {len(files)} files not assessed")
        ctx.exit(1)


if __name__ == "__main__":
    main()
