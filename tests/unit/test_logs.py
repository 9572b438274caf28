"""JSON log lines: the formatter, and a real `listen` process with BONEAGE_LOG_FORMAT=json."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import free_port, wait_for_port
from worker.celery_app import app as celery_app
from worker.logs import WITHHELD, JsonFormatter, setup_logging

KEYS = {"time", "level", "logger", "role", "pid", "message"}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in ("pynetdicom", "highdicom", "alembic")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(False)


def test_formatter_writes_one_json_object_with_extras() -> None:
    record = logging.LogRecord(
        "worker.tasks", logging.WARNING, __file__, 1, "took %d s", (3,), None
    )
    record.instance_id = 42
    line = JsonFormatter(role="worker").format(record)
    entry = json.loads(line)
    assert entry.keys() >= KEYS
    assert entry["level"] == "WARNING" and entry["logger"] == "worker.tasks"
    assert entry["role"] == "worker" and entry["message"] == "took 3 s"
    assert entry["instance_id"] == 42
    assert "\n" not in line


def test_formatter_keeps_tracebacks_on_one_line() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert f"ValueError: {WITHHELD}" in json.loads(line)["exception"]


#: A patient's name, as a library's exception message may quote it.
NAME = "Müller^Jürgen"


def _refuse_the_name() -> None:
    raise ValueError(f"{NAME!r} is not a valid person name")


def _read_the_name() -> None:
    entries: dict[str, str] = {}
    try:
        entries[NAME]
    except KeyError as exc:
        raise RuntimeError(f"no entry for {NAME}") from exc


def _logging_to_a_string(monkeypatch: pytest.MonkeyPatch, fmt: str) -> io.StringIO:
    """:func:`setup_logging` as a worker's, writing to the string returned."""
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("INFO", fmt, role="worker")
    return stream


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_exceptions_message_is_withheld_its_type_and_frames_kept(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    stream = _logging_to_a_string(monkeypatch, fmt)
    log = logging.getLogger("worker.test")
    for fails in (_refuse_the_name, _read_the_name):
        try:
            fails()
        except Exception:
            log.exception("instance 7 failed")
    written = stream.getvalue()
    assert "Müller" not in written and "Jürgen" not in written
    for shown in ("ValueError: ", "KeyError: ", "RuntimeError: ", WITHHELD, "_refuse_the_name"):
        assert shown in written, shown
    assert "The above exception was the direct cause of the following exception" in written


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_exception_logged_as_the_message_is_withheld(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """pynetdicom logs what it catches as ``LOGGER.exception(exc)`` (encoding a data set,
    decoding a C-FIND response's identifier), pydicom as ``logger.error(exc)``, and our
    DUL's abort wrote ``error("%s", exc)``: the message line is the exception's. Found in
    review: a patient's name, in the text and in the JSON lines."""
    stream = _logging_to_a_string(monkeypatch, fmt)
    try:
        _refuse_the_name()
    except ValueError as exc:
        logging.getLogger("pynetdicom.dsutils").exception(exc)
        logging.getLogger("pydicom").error(exc)
        logging.getLogger("pynetdicom.dul").error("%s", exc, exc_info=exc)
        logging.getLogger("pynetdicom.events").warning("not sent (%(why)s)", {"why": exc})
    logging.getLogger("pynetdicom.dul").error("%s", OSError(28, "No space left on device"))
    # ours word the exceptions they log (a backfill's refused series)
    ours = ValueError("C-MOVE refused: 0xA801, move destination unknown")
    logging.getLogger("worker.backfill").warning("series 1 not moved: %s", ours)
    written = stream.getvalue()
    assert "Müller" not in written and "Jürgen" not in written, written
    withheld = f"ValueError: {WITHHELD}"
    if fmt == "json":
        messages = [json.loads(line)["message"] for line in written.splitlines()]
        assert messages == [
            withheld,
            withheld,
            withheld,
            f"not sent ({withheld})",
            "[Errno 28] No space left on device",
            f"series 1 not moved: {ours}",
        ]
    else:
        for shown in (
            f": {withheld}\n",
            f"not sent ({withheld})",
            "No space left on device",
            f"series 1 not moved: {ours}",
        ):
            assert shown in written, shown


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_message_about_the_machine_is_kept(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    stream = _logging_to_a_string(monkeypatch, fmt)
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        logging.getLogger("worker.test").exception("spooling failed")
    assert "No space left on device" in stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_brokers_connection_errors_keep_their_message(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Celery's "Cannot connect to ...: %s" formats the client library's exception: why
    the broker refused (authentication, a closed connection) is the administrator's
    first clue, and no message of ours carries more than ids."""
    stream = _logging_to_a_string(monkeypatch, fmt)
    refused = redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1.")
    logging.getLogger("celery.worker.consumer.consumer").error(
        "consumer: Cannot connect to %s: %s.", "redis://127.0.0.1:1//", refused
    )
    assert "Error 111 connecting to 127.0.0.1:1." in stream.getvalue()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_celery_task_that_fails_is_logged_without_its_message(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """Celery's own report (logger celery.app.trace): its line quotes the exception, and
    its ``data`` extra, which JSON lines carry, the traceback as Celery formatted it."""
    stream = _logging_to_a_string(monkeypatch, fmt)

    @celery_app.task(name="tests.refuse_the_name")
    def refuse() -> None:
        _refuse_the_name()

    assert refuse.apply().failed()
    written = stream.getvalue()
    assert "raised unexpected: ValueError" in written, written
    assert "Müller" not in written and "Jürgen" not in written


def test_setup_logging_json_holds_libraries_at_warning(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    setup_logging("DEBUG", "json", role="listener")
    logging.getLogger("worker.test").debug("hello", extra={"db_id": 7})
    logging.getLogger("pynetdicom.events").info("dataset with patient name")
    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "hello" and entry["db_id"] == 7 and entry["role"] == "listener"
    assert logging.getLogger("pynetdicom").level == logging.WARNING


def test_setup_logging_rejects_unknown_format(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")


@pytest.mark.integration
def test_listen_logs_json_lines(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BONEAGE_")}
    env.update(
        BONEAGE_DATA_DIR=str(tmp_path / "data"),
        BONEAGE_PORT=str(port),
        BONEAGE_HOST="127.0.0.1",
        BONEAGE_LOG_LEVEL="DEBUG",
        BONEAGE_LOG_FORMAT="json",
    )
    command = [sys.executable, "-m", "worker"]
    upgrade = subprocess.run(
        [*command, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert upgrade.returncode == 0, upgrade.stderr
    listen = subprocess.Popen(
        [*command, "listen"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_port(port, timeout=60, process=listen)
        echo = subprocess.run(
            [*command, "echo", f"BONEAGE@127.0.0.1:{port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert echo.returncode == 0, echo.stderr
    finally:
        listen.send_signal(signal.SIGTERM)
        _, err = listen.communicate(timeout=60)
    assert listen.returncode == 0, err.decode(errors="replace")[-4000:]
    lines = err.decode().splitlines()
    assert lines, "the listener logged nothing"
    entries = [json.loads(line) for line in lines]
    for entry in entries:
        assert entry.keys() >= KEYS, entry
        assert entry["role"] == "listener"
    assert any(e["message"].startswith("listener stopping") for e in entries)
    assert all(not e["logger"].startswith("pynetdicom") or e["level"] != "INFO" for e in entries)


_WARNING_SCRIPT = """
import warnings
from pydicom import Dataset
from worker.logs import setup_logging

setup_logging("DEBUG", "{fmt}")
# What highdicom says when it copies a single-component patient name.
warnings.warn_explicit(
    'The string "SECRETNAME" is unlikely to represent the intended person name',
    UserWarning, "highdicom/base.py", 199, module="highdicom.base",
)
ds = Dataset()
ds.StudyInstanceUID = "1.2." + "9" * 70  # pydicom warns and logs the over-long value
"""


#: ``boneage-worker work``'s order: logging set up before pydicom is first imported,
#: which sets pydicom's logger back to WARNING (found in review: a birth date a modality
#: wrote as ``2015-3-1`` reached the log, quoted by pydicom, from every SR built).
_WARNING_SCRIPT_PYDICOM_LATER = """
from worker.logs import setup_logging

setup_logging("DEBUG", "{fmt}")
from pydicom import Dataset

ds = Dataset()
ds.PatientBirthDate = "2015-3-1"
ds.StudyInstanceUID = "1.2." + "9" * 70
"""


@pytest.mark.parametrize("script", [_WARNING_SCRIPT, _WARNING_SCRIPT_PYDICOM_LATER])
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_dataset_warnings_never_reach_the_log(fmt: str, script: str) -> None:
    # A process of its own: pytest would otherwise catch the warnings itself.
    result = subprocess.run(
        [sys.executable, "-c", script.format(fmt=fmt)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "SECRETNAME" not in result.stderr
    assert "9999999999" not in result.stderr
    assert "2015-3-1" not in result.stderr
