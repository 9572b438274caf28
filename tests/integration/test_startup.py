"""A worker whose start-up fails stops, with exit status 1, instead of taking images.

Celery's signals log a receiver's exception and carry on, so an inference process whose
model did not load, or whose warm-up could not read the database, used to stay up with
no heartbeat and fail every image it took three times. Here the real `boneage-worker
work` and `serve` run on the embedded broker; each test waits for the process to exit
(or for `serve` to say it restarts its worker), never for a time.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from tests.integration.test_end_to_end import Node, cli
from tests.integration.test_security import Certificates
from tests.support import free_port, keep_process_log, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Long enough for a worker to import torch and load a small model on a busy 2-core VM.
START_SECONDS = 180

#: What the worker process logs when its start-up fails.
START_UP_FAILED = "worker process start-up failed ("


def _env(tmp_path: Path, model: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(tmp_path / "data"),
        BONEAGE_DEVICE="cpu",
        BONEAGE_ALLOWED_AETS="PACS",
        BONEAGE_PORT=str(free_port()),
    )
    if model is not None:
        env["BONEAGE_MODEL"] = str(model)
    return env


def _upgraded(env: dict[str, str]) -> str:
    """Create the database schema; its SQLite URL."""
    done = cli("db", "upgrade", env=env)
    assert done.returncode == 0, done.stderr
    return str(Path(env["BONEAGE_DATA_DIR"]) / "boneage.db")


def _not_a_checkpoint(tmp_path: Path) -> Path:
    """A file where the checkpoint should be, that is not one (a copy cut short)."""
    path = tmp_path / "cut-short.safetensors"
    path.write_bytes(b"\x07" * 4096)
    return path


@contextmanager
def _work(
    env: dict[str, str], log: Path, queue: str = "inference"
) -> Iterator[subprocess.Popen[bytes]]:
    """`boneage-worker work -Q QUEUE`, killed afterwards if it still runs."""
    keep_process_log(log)
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "work", "-Q", queue],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        yield worker
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _exit_status(worker: subprocess.Popen[bytes]) -> int | None:
    try:
        return worker.wait(START_SECONDS)
    except subprocess.TimeoutExpired:
        return None  # still running: it would take images it cannot assess


def _heartbeats(database: str) -> list[str]:
    with closing(sqlite3.connect(database)) as db:
        return [name for (name,) in db.execute("SELECT name FROM heartbeats")]


# -- the setting, checked before anything starts -----------------------------------


@pytest.mark.parametrize("command", [("work", "-Q", "inference"), ("serve",)])
@pytest.mark.parametrize("where", ["missing", "directory"])
def test_a_model_path_that_names_no_file_is_refused_in_one_line(
    tmp_path: Path, command: tuple[str, ...], where: str
) -> None:
    model = tmp_path / "models" / "boneage-r50.safetensros"  # misspelt
    if where == "directory":
        model = tmp_path / "models"
        model.mkdir()
    env = _env(tmp_path, model)
    _upgraded(env)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` started with BONEAGE_MODEL={model}")
    what = "does not exist" if where == "missing" else "is not a file (a .safetensors checkpoint)"
    assert done.returncode == 1
    assert done.stderr.strip() == f"Error: invalid settings: BONEAGE_MODEL {model} {what}", (
        done.stderr[-4000:]
    )


@pytest.mark.parametrize(
    "command", [("predict", "--sex", "F", "HAND"), ("reprocess", "--instance", "1")]
)
def test_a_command_that_loads_the_model_refuses_one_that_names_no_file(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """`predict` and `reprocess` load BONEAGE_MODEL themselves where no --model is given:
    one line, as `work` and `serve` say it, not a traceback."""
    model = tmp_path / "boneage-r50.safetensros"  # misspelt
    env = _env(tmp_path, model)
    _upgraded(env)
    hand = tmp_path / "hand.png"
    hand.write_bytes(b"")
    done = cli(*(str(hand) if arg == "HAND" else arg for arg in command), env=env)
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"Error: invalid settings: BONEAGE_MODEL {model} does not exist"
    ), done.stderr[-4000:]


def test_an_empty_model_setting_is_refused(tmp_path: Path) -> None:
    env = _env(tmp_path, None)
    env["BONEAGE_MODEL"] = ""
    done = cli("work", "-Q", "inference", env=env)
    assert done.returncode == 1
    assert "BONEAGE_MODEL is empty" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_delivery_worker_does_not_need_the_model_file(tmp_path: Path) -> None:
    """The listener and delivery workers may share a BONEAGE_MODEL whose volume only the
    inference workers mount (a Kubernetes ConfigMap): it is not theirs to check."""
    env = _env(tmp_path, tmp_path / "mounted-elsewhere.safetensors")
    database = _upgraded(env)
    with _work(env, tmp_path / "delivery.log", queue="delivery") as delivery:
        wait_for(
            lambda: any(name.startswith("worker@") for name in _heartbeats(database)),
            timeout=START_SECONDS,
            what="the delivery worker's heartbeat",
            process=delivery,
        )
        assert delivery.poll() is None


def _destinations_tls(tmp_path: Path, files: str) -> dict[str, str]:
    """BONEAGE_DESTINATIONS_TLS on, with TLS files that are ``files``: ``usable`` ones,
    a CA file that is ``missing``, or a key that is ``another's`` than the certificate's."""
    env = {"BONEAGE_DESTINATIONS_TLS": "true"}
    if files == "missing":
        return {**env, "BONEAGE_TLS_CA_CERTIFICATES": str(tmp_path / "missing-ca.pem")}
    pki = Certificates(tmp_path / "pki")
    certificate, key = pki.node
    if files == "another's":
        _, key = pki.client
    return {
        **env,
        "BONEAGE_TLS_CA_CERTIFICATES": str(pki.ca),
        "BONEAGE_TLS_CERTIFICATE": str(certificate),
        "BONEAGE_TLS_PRIVATE_KEY": str(key),
    }


@pytest.mark.parametrize("command", [("work", "-Q", "delivery"), ("serve",)])
@pytest.mark.parametrize(
    ("files", "error"),
    [("missing", "[Errno 2] No such file or directory"), ("another's", "[X509: KEY_VALUES")],
)
def test_tls_settings_no_delivery_can_use_are_refused_in_one_line(
    tmp_path: Path, command: tuple[str, ...], files: str, error: str
) -> None:
    """A delivery worker started with them looked alive, and failed every delivery as
    "TLS settings unusable" for a day before each was `failed`."""
    tls = _destinations_tls(tmp_path, files)
    env = {**_env(tmp_path, None), **tls}
    database = _upgraded(env)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=START_SECONDS,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(command)}` started with TLS settings it cannot use")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"Error: TLS settings unusable for BONEAGE_DESTINATIONS_TLS: {error}"), (
        done.stderr[-4000:]
    )
    named = "; ".join(
        f"{name} {tls[name]}"
        for name in (
            "BONEAGE_TLS_CA_CERTIFICATES",
            "BONEAGE_TLS_CERTIFICATE",
            "BONEAGE_TLS_PRIVATE_KEY",
        )
        if name in tls
    )
    assert line.endswith(f" ({named})"), line
    assert _heartbeats(database) == []


def test_a_delivery_worker_with_usable_tls_settings_starts(tmp_path: Path) -> None:
    env = {**_env(tmp_path, None), **_destinations_tls(tmp_path, "usable")}
    database = _upgraded(env)
    with _work(env, tmp_path / "delivery.log", queue="delivery") as delivery:
        wait_for(
            lambda: any(name.startswith("worker@") for name in _heartbeats(database)),
            timeout=START_SECONDS,
            what="the delivery worker's heartbeat",
            process=delivery,
        )
        assert delivery.poll() is None


# -- a process whose start-up fails ---------------------------------------------------


@pytest.mark.parametrize(
    "pool",
    [
        pytest.param({"BONEAGE_INFERENCE_PROCESSES": "1"}, id="solo"),
        # the children fail; the worker's own process must stop too
        pytest.param({"BONEAGE_INFERENCE_PROCESSES": "2"}, id="prefork"),
        # a batching worker sets its one process up in worker_init, not worker_process_init
        pytest.param({"BONEAGE_INFERENCE_BATCH": "2"}, id="threads"),
    ],
)
def test_a_model_that_does_not_load_ends_the_worker_with_status_1(
    tmp_path: Path, pool: dict[str, str]
) -> None:
    env = {**_env(tmp_path, _not_a_checkpoint(tmp_path)), **pool}
    database = _upgraded(env)
    log = tmp_path / "work.log"
    with _work(env, log) as worker:
        status = _exit_status(worker)
    text = log.read_text(errors="replace")
    assert status == 1, text[-4000:]
    # what failed and why, in the administrator's words, once per process that tried
    assert f"{START_UP_FAILED}ValueError: " in text
    assert "cut-short.safetensors" in text  # the file it could not load
    assert _heartbeats(database) == []  # it never said it was there to take work


def test_a_warm_up_that_cannot_read_the_database_ends_the_worker_with_status_1(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The warm-up reads the node's Device Observer UID from the database; here the row
    is missing, as a read would fail in a database outage."""
    env = _env(tmp_path, tiny_checkpoint)
    env["BONEAGE_INFERENCE_PROCESSES"] = "1"
    database = _upgraded(env)
    with closing(sqlite3.connect(database)) as db, db:
        db.execute("DELETE FROM node")
    log = tmp_path / "work.log"
    with _work(env, log) as worker:
        status = _exit_status(worker)
    text = log.read_text(errors="replace")
    assert status == 1, text[-4000:]
    assert f"{START_UP_FAILED}RuntimeError: the database has no node row" in text
    assert _heartbeats(database) == []


def test_serve_restarts_an_inference_worker_that_cannot_start(tmp_path: Path) -> None:
    env = _env(tmp_path, _not_a_checkpoint(tmp_path))
    env["BONEAGE_INFERENCE_PROCESSES"] = "1"
    node = Node(tmp_path, env)
    serve = node.start("serve", "serve")
    log = node.logs / "serve.log"
    try:
        wait_for(
            lambda: re.search(
                r"inference worker exited with code 1 after \d+ s; restarting in 1 s",
                log.read_text(),
            ),
            timeout=START_SECONDS,
            what="serve to restart its inference worker",
            process=serve,
        )
    finally:
        codes = node.stop()
    assert START_UP_FAILED in log.read_text()
    assert codes == [0], node.log_text()[-4000:]
