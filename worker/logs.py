"""Logging for every boneage-worker process: plain text lines or JSON lines.

Only entry points call :func:`setup_logging`. Whatever the format, the loggers of
libraries that print dataset contents (pynetdicom, highdicom) are held at WARNING,
so no patient attribute reaches a log line through them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = ["JsonFormatter", "setup_logging"]

LogFormat = Literal["text", "json"]

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"

#: Attributes every LogRecord has; anything else was passed with ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
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
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
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
    for package in ("pydicom", "highdicom"):
        warnings.filterwarnings("ignore", module=rf"{package}(\..*)?$")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("celery").setLevel(max(logging.INFO, logging.getLevelName(level)))
