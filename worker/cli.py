"""`boneage-worker`: the command line of the service."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from rich.console import Console

from worker.settings import Settings, load_settings

logger = logging.getLogger("boneage")
console = Console()

_PHI_SAFE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format=_PHI_SAFE_FORMAT, stream=sys.stderr, force=True)
    # pynetdicom logs every PDU and dataset summary at DEBUG/INFO, including patient
    # attributes: keep it at WARNING whatever our own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs the UIDs of the datasets it copies from at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("celery").setLevel(max(logging.INFO, logging.getLevelName(level)))


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    obj: dict[str, Any] = ctx.ensure_object(dict)
    merged = {**obj.get("overrides", {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        settings = load_settings(obj.get("config"), **merged)
    except (ValidationError, ValueError) as exc:
        raise click.ClickException(f"invalid settings: {exc}") from exc
    setup_logging(settings.log_level)
    return settings


def _settings_env(settings: Settings) -> dict[str, str]:
    """The settings as BONEAGE_* variables, for child processes."""
    env = dict(os.environ)
    values = {
        "AE_TITLE": settings.ae_title,
        "HOST": settings.host,
        "PORT": str(settings.port),
        "ALLOWED_AETS": ",".join(str(a) for a in settings.allowed_aets),
        "DESTINATIONS": ",".join(str(d) for d in settings.destinations),
        "DATA_DIR": str(settings.data_dir),
        "DATABASE_URL": settings.effective_database_url,
        "BROKER_URL": settings.effective_broker_url,
        "BROKER_PREFIX": settings.broker_prefix,
        "DEVICE": settings.device,
        "ARCH": settings.arch,
        "INPUT_SIZE": str(settings.input_size),
        "LOG_LEVEL": settings.log_level,
    }
    if settings.model is not None:
        values["MODEL"] = str(settings.model)
    env.update({f"BONEAGE_{k}": v for k, v in values.items()})
    return env


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


def _require_schema(settings: Settings) -> None:
    from db.engine import DatabaseNotReady, check_schema

    try:
        check_schema(settings.effective_database_url)
    except DatabaseNotReady as exc:
        raise click.ClickException(str(exc)) from exc


# -- service processes --------------------------------------------------------


@main.command()
@click.option("--ae-title", help="BONEAGE_AE_TITLE")
@click.option("--port", type=int, help="BONEAGE_PORT")
@click.pass_context
def listen(ctx: click.Context, ae_title: str | None, port: int | None) -> None:
    """Run the DICOM listener (Storage SCP)."""
    from worker.celery_app import configure
    from worker.listener import Listener

    settings = _settings(ctx, ae_title=ae_title, port=port)
    _require_schema(settings)
    configure(settings)
    Listener(settings).serve_forever()


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
    type=click.Choice(["solo", "prefork"]),
    default="solo",
    show_default=True,
    help="solo: one process (one per GPU); prefork: --concurrency processes.",
)
@click.option("-c", "--concurrency", type=int, default=1, show_default=True)
@click.option("--device", help="BONEAGE_DEVICE")
@click.pass_context
def work(ctx: click.Context, queues: str, pool: str, concurrency: int, device: str | None) -> None:
    """Run a Celery worker for the given queues."""
    from worker import tasks
    from worker.celery_app import configure

    settings = _settings(ctx, device=device)
    _require_schema(settings)
    names = tuple(q.strip() for q in queues.split(",") if q.strip())
    unknown = set(names) - {"inference", "delivery"}
    if unknown:
        raise click.BadParameter(
            f"unknown queue(s): {', '.join(sorted(unknown))}", param_hint="--queues"
        )
    app = configure(settings)
    tasks.set_worker_queues(names)
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


@main.command()
@click.option("--ae-title", help="BONEAGE_AE_TITLE")
@click.option("--port", type=int, help="BONEAGE_PORT")
@click.pass_context
def serve(ctx: click.Context, ae_title: str | None, port: int | None) -> None:
    """Run listener, inference worker and delivery worker together (one machine).

    Migrates the database first. Children that die are restarted; SIGTERM or
    Ctrl-C stops them all.
    """
    from db.engine import upgrade

    settings = _settings(ctx, ae_title=ae_title, port=port)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    upgrade(settings.effective_database_url)
    env = _settings_env(settings)
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


def _supervise(commands: dict[str, list[str]], env: dict[str, str]) -> None:
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    children = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    restarts: dict[str, list[float]] = {name: [] for name in commands}
    try:
        while not stopping:
            time.sleep(0.5)
            for name, child in list(children.items()):
                code = child.poll()
                if code is None or stopping:
                    continue
                recent = [t for t in restarts[name] if time.monotonic() - t < 60]
                if len(recent) >= 5:
                    logger.error("%s keeps exiting (code %s); stopping the service", name, code)
                    stopping = True
                    break
                logger.warning("%s exited with code %s; restarting", name, code)
                restarts[name] = [*recent, time.monotonic()]
                children[name] = subprocess.Popen(commands[name], env=env)
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()


# -- administration -------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Health of the node; exit code 1 when unhealthy."""
    from worker.celery_app import configure
    from worker.status import collect, render

    settings = _settings(ctx)
    configure(settings)
    report = collect(settings)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render(report, console)
    ctx.exit(0 if report.get("healthy") else 1)


@main.command("retry-deliveries")
@click.argument("delivery_ids", nargs=-1, type=int)
@click.pass_context
def retry_deliveries(ctx: click.Context, delivery_ids: tuple[int, ...]) -> None:
    """Send failed deliveries again (all of them, or the ids given)."""
    from worker.celery_app import configure
    from worker.delivery import reset_failed
    from worker.messaging import enqueue_delivery
    from worker.runtime import Runtime

    settings = _settings(ctx)
    _require_schema(settings)
    configure(settings)
    ids = reset_failed(Runtime(settings), list(delivery_ids) or None)
    for delivery_id in ids:
        enqueue_delivery(delivery_id)
    console.print(f"{len(ids)} failed deliveries queued again")


@main.command()
@click.pass_context
def reconcile(ctx: click.Context) -> None:
    """Queue again the work whose broker messages were lost."""
    from worker import tasks
    from worker.celery_app import configure

    settings = _settings(ctx)
    _require_schema(settings)
    configure(settings)
    report = tasks.run_reconcile()
    console.print(
        f"re-queued {len(report.instances)} instances, {len(report.deliveries)} deliveries"
    )


@main.command()
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--to", "destination", required=True, help="AE@host:port")
@click.option("--calling-ae", default=None, help="Our AE title (default BONEAGE_AE_TITLE).")
@click.pass_context
def send(
    ctx: click.Context, files: tuple[Path, ...], destination: str, calling_ae: str | None
) -> None:
    """C-STORE DICOM files to a node."""
    from dicom_io.scu import SendError, send_files
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
        )
    except SendError as exc:
        raise click.ClickException(str(exc)) from exc
    for outcome in outcomes:
        console.print(f"{outcome.path}: status 0x{outcome.status:04X}")
    if not all(o.ok for o in outcomes):
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


if __name__ == "__main__":
    main()
