"""Logging for every boneage-worker process: plain text lines or JSON lines.

Only entry points call :func:`setup_logging`. Whatever the format, the loggers of
libraries that print dataset contents (pynetdicom, highdicom) are held at WARNING,
so no patient attribute reaches a log line through them; and an exception is written
with its type and traceback but without its message, which may quote a data set's
values or a database row's (pydicom's, highdicom's, PostgreSQL's "Key (...)=(...)"),
unless it is of a kind whose message is about the machine: the file system, the
network, the database connection (:func:`exception_text`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import warnings
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "exception_summary",
    "exception_text",
    "setup_logging",
]

LogFormat = Literal["text", "json"]

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"

#: Attributes every LogRecord has; anything else was passed with ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


#: What a log says in place of a message withheld.
WITHHELD = "(message withheld from the log: it may quote patient data)"


def _keeps_its_message(exc: BaseException) -> bool:
    """Whether ``exc``'s message is about the machine, not about data: the file system
    and the network (OSError: a path in the spool or outbox is named by a hash), the
    database's connection (SQLAlchemy's OperationalError, without its parameters), and
    the broker's (:data:`_BROKER_CLIENTS`)."""
    if isinstance(exc, (OSError, MemoryError)):
        return True
    return any(
        (kind.__name__ == "OperationalError" and kind.__module__.startswith("sqlalchemy"))
        or kind.__module__.split(".", 1)[0] in _BROKER_CLIENTS
        for kind in type(exc).__mro__
    )


#: The broker's client libraries: their errors are about the connection (refused,
#: forced closed, authentication), and our messages carry ids only.
_BROKER_CLIENTS = frozenset({"kombu", "amqp", "redis"})


def _exception_only(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"{name}: {exc}" if _keeps_its_message(exc) else f"{name}: {WITHHELD}"


def exception_summary(exc: BaseException) -> str:
    """``exc`` in a few words that may go where an administrator reads them (a log line,
    a delivery's ``last_error``, which `status` prints): its type, and its message only
    where :func:`_keeps_its_message`; another's may quote a data set's values."""
    name = type(exc).__name__
    return f"{name}: {exc}" if _keeps_its_message(exc) else name


def exception_text(exc: BaseException) -> str:
    """``exc`` as a traceback prints it, causes and contexts first, each message
    withheld unless :func:`_keeps_its_message`: the frames and types say where and what
    failed, and a message may quote a patient's attributes."""
    parts: list[str] = []
    seen: set[int] = set()

    def add(error: BaseException) -> None:
        seen.add(id(error))
        cause, context = error.__cause__, error.__context__
        if cause is not None and id(cause) not in seen:
            add(cause)
            parts.append(
                "\nThe above exception was the direct cause of the following exception:\n\n"
            )
        elif context is not None and not error.__suppress_context__ and id(context) not in seen:
            add(context)
            parts.append(
                "\nDuring handling of the above exception, another exception occurred:\n\n"
            )
        if error.__traceback__ is not None:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(
                traceback.StackSummary.extract(traceback.walk_tb(error.__traceback__)).format()
            )
        parts.append(_exception_only(error) + "\n")

    add(exc)
    return "".join(parts).rstrip("\n")


class _ExceptionsWithheld(logging.Formatter):
    """A formatter that writes exceptions as :func:`exception_text`."""

    def formatException(self, ei: Any) -> str:
        if ei and ei[1] is not None:
            return exception_text(ei[1])
        return super().formatException(ei)


class TextFormatter(_ExceptionsWithheld):
    """One human-readable line per record (a traceback on the lines after it)."""


class _CeleryTaskErrors(logging.Filter):
    """Celery's report of a failed task: its message and its ``data`` extra quote the
    exception (``%(exc)s``, ``traceback``); they say as much as :func:`exception_text`."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not record.name.startswith("celery"):
            return True
        if isinstance(record.args, dict) and "exc" in record.args:
            record.args = {**record.args, "exc": _exception_only(exc)}
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            record.data = {**data, "exc": _exception_only(exc), "traceback": exception_text(exc)}
        return True


class _ExceptionMessagesWithheld(logging.Filter):
    """A record whose message is an exception, or that formats one into it: pynetdicom
    logs what it catches as ``LOGGER.exception(exc)`` (encoding a data set, decoding a
    C-FIND identifier, a failing event handler), pydicom as ``logger.error(exc)``, each
    message a library's, which may quote a data set's values (``Invalid value for VR
    PN: 'DOE^JANE'``). Each such exception is written as :func:`_exception_only` does:
    its type, its message withheld unless it is about the machine.

    Our own records keep the exceptions they format: each call says what it logs, and
    ours word theirs (a backfill's refused series, say) for the administrator.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, BaseException):
            record.msg = _exception_only(record.msg)
            record.args = ()
        elif record.name.split(".", 1)[0] in _OUR_PACKAGES:
            pass
        elif isinstance(record.args, tuple):
            record.args = tuple(map(_shown, record.args))
        elif isinstance(record.args, dict):
            record.args = {key: _shown(arg) for key, arg in record.args.items()}
        return True


#: The packages whose records format exceptions of their own choosing.
_OUR_PACKAGES = frozenset({"worker", "dicom_io", "db", "models", "boneage"})


def _shown(arg: object) -> object:
    """An argument of a log record, an exception among them as :func:`_exception_only`."""
    if isinstance(arg, BaseException) and not _keeps_its_message(arg):
        return _exception_only(arg)
    return arg


#: Libraries whose records quote the values of data sets.
_DATASET_LIBRARIES = ("pydicom", "highdicom")


class _DatasetLibrariesQuiet(logging.Filter):
    """pydicom's and highdicom's records below ERROR, dropped at our handler: their
    warnings quote the values of data sets ("Invalid value for VR DA: '2015-3-1'", a
    patient's name). The loggers' levels alone do not hold: importing pydicom sets its
    logger back to WARNING (``pydicom.config.debug(False)``), and a process that sets
    up logging before it first imports pydicom (``boneage-worker work``) kept that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not record.name.startswith(_DATASET_LIBRARIES)


class JsonFormatter(_ExceptionsWithheld):
    """One JSON object per line: time, level, logger, role, pid, message, extras.

    Parameters
    ----------
    role
        What this process is (``listener``, ``worker``, ``supervisor``, ...);
        ``None`` leaves the key out.
    """

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
        }
        if self.role is not None:
            entry["role"] = self.role
        entry["pid"] = record.process
        entry["message"] = record.getMessage()
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold (a Path, a datetime) is still written.
        return json.dumps(entry, default=str, ensure_ascii=False)


def _default_role() -> str:
    """The CLI command this process runs, in an administrator's words."""
    words = {"listen": "listener", "work": "worker", "serve": "supervisor"}
    for arg in sys.argv[1:]:
        if not arg.startswith("-"):
            return words.get(arg, arg)
    return os.path.basename(sys.argv[0]) or "boneage-worker"


def setup_logging(level: str, fmt: LogFormat | str = "text", *, role: str | None = None) -> None:
    """Configure the root logger of this process (stderr).

    Parameters
    ----------
    level
        ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    fmt
        ``text`` (one human-readable line per record) or ``json`` (one JSON object
        per line, for a log collector).
    role
        The process role written into JSON lines; default: from the command line.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} must be 'text' or 'json'")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(role or _default_role()))
    else:
        handler.setFormatter(TextFormatter(_TEXT_FORMAT))
    handler.addFilter(_CeleryTaskErrors())
    handler.addFilter(_ExceptionMessagesWithheld())
    handler.addFilter(_DatasetLibrariesQuiet())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Python's warnings would otherwise be bare lines on stderr, breaking JSON lines.
    logging.captureWarnings(fmt == "json")
    # pynetdicom logs every PDU and dataset summary at DEBUG/INFO, including patient
    # attributes: keep it at WARNING whatever our own level is.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs the UIDs of the datasets it copies from at INFO.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # pydicom and highdicom warn about the contents of data sets and quote the values
    # (highdicom's person-name warning prints the patient's name): such text must never
    # reach a log, so their warnings are dropped and pydicom's logger kept to errors.
    # (the handler's filter holds where pydicom sets its level back).
    for package in _DATASET_LIBRARIES:
        warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("celery").setLevel(max(logging.INFO, logging.getLevelName(level)))
