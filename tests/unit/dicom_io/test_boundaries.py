"""dicom_io must stay free of torch, Celery, SQL and the other packages of the node."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "celery", "sqlalchemy", "models", "db", "worker")
MODULES = (
    "dicom_io.content",
    "dicom_io.codes",
    "dicom_io.sr",
    "dicom_io.sc",
    "dicom_io.pixels",
    "dicom_io.synthetic",
)


def test_output_modules_import_nothing_forbidden() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {module}\n" for module in MODULES)
        + f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        + "print(','.join(bad))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
