"""worker.pipeline._failure: where an attempt failed, in a checkout and where installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import pipeline

LIBRARY = """
def refuse(value):
    raise ValueError(f"{value!r} is not a valid date")
"""

OURS = """
def build(value):
    refuse(value)
"""


def _raised_through(root: Path) -> BaseException:
    """A ValueError raised in a library module under ``root``, called from one of ours."""
    library: dict[str, object] = {}
    exec(compile(LIBRARY, str(root / "pydicom" / "valuerep.py"), "exec"), library)
    ours: dict[str, object] = {"refuse": library["refuse"]}
    exec(compile(OURS, str(root / "dicom_io" / "sr.py"), "exec"), ours)
    try:
        ours["build"]("2015")  # type: ignore[operator]
    except ValueError as exc:
        return exc
    raise AssertionError("nothing raised")


@pytest.mark.parametrize("root", ["/srv/boneage", "/opt/boneage/venv/lib/python3.11/site-packages"])
def test_the_place_is_the_last_line_of_our_code_installed_or_not(
    monkeypatch: pytest.MonkeyPatch, root: str
) -> None:
    monkeypatch.setattr(pipeline, "_PACKAGES_ROOT", Path(root))
    failure = pipeline._failure(_raised_through(Path(root)))
    assert failure == "ValueError in dicom_io/sr.py:3 (build)"
    assert "2015" not in failure  # the message may quote the patient


def test_a_failure_outside_our_code_names_only_its_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "_PACKAGES_ROOT", Path("/elsewhere"))
    assert pipeline._failure(_raised_through(Path("/srv/boneage"))) == "ValueError"
