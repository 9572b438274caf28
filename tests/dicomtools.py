"""Helpers that run dcmtk and dicom3tools on files for the tests.

A missing tool fails the test: `scripts/setup.sh` installs dcmtk and dicom3tools,
and a skipped check would hide that a validation never ran.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support import dcmtk_tool

__all__ = ["dciodvfy_errors", "dcmj2pnm", "dsr2html", "dsrdump", "require_tool", "run_tool"]

_TIMEOUT_S = 120


def require_tool(name: str) -> str:
    """Return the path of ``name`` or skip the test when it is not installed."""
    try:
        return dcmtk_tool(name)
    except AssertionError:
        pytest.fail(f"{name} is not installed: scripts/setup.sh installs dcmtk and dicom3tools")


def run_tool(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command-line tool and return its completed process (stdout + stderr text)."""
    tool = require_tool(str(args[0]))
    result = subprocess.run(
        [tool, *map(str, args[1:])],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    return result


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines of ``dciodvfy`` output that contain "Error" (empty when the file is valid)."""
    result = run_tool("dciodvfy", path, check=False)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "Error" in line]


def dsrdump(path: Path) -> str:
    """The ``dsrdump`` text of an SR file, long text values printed in full."""
    return run_tool("dsrdump", "+Pl", path).stdout


def dcmj2pnm(path: Path, png: Path) -> Path:
    """Render a DICOM image to a non-interlaced PNG with ``dcmj2pnm``; return ``png``."""
    run_tool("dcmj2pnm", "--write-png", "--nointerlace", path, png)
    if not png.is_file() or png.stat().st_size == 0:
        raise AssertionError(f"dcmj2pnm wrote no PNG for {path}")
    return png


def dsr2html(path: Path) -> str:
    """The HTML rendering of an SR by ``dsr2html``."""
    return run_tool("dsr2html", path).stdout
