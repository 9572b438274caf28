"""BoneAgeFinding validation and age formatting."""

from __future__ import annotations

import dataclasses

import pytest

from dicom_io.content import (
    AI_RESULT_NOTICE,
    UNTRAINED_WARNING,
    BoneAgeFinding,
    check_uid,
    format_age,
    format_sds,
)

from .conftest import MODEL_ID


def _finding(**changes: object) -> BoneAgeFinding:
    values: dict[str, object] = {
        "bone_age_months": 100.0,
        "chronological_age_months": 96.0,
        "sds": 0.5,
        "model_id": MODEL_ID,
        "model_name": "net",
        "model_version": "1",
        "model_trained": True,
    }
    values.update(changes)
    return BoneAgeFinding(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("months", "text"),
    [
        (124.3, "10 y 4 mo"),
        (0, "0 y 0 mo"),
        (11.6, "1 y 0 mo"),
        (-5.2, "-0 y 5 mo"),
        (240, "20 y 0 mo"),
    ],
)
def test_format_age(months: float, text: str) -> None:
    assert format_age(months) == text


def test_format_age_refuses_nan() -> None:
    with pytest.raises(ValueError, match="months"):
        format_age(float("nan"))


def test_format_sds_signed() -> None:
    assert format_sds(0.14) == "+0.14"
    assert format_sds(-1.5) == "-1.50"


def test_finding_is_frozen_and_keyword_only(finding: BoneAgeFinding) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        finding.bone_age_months = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        BoneAgeFinding(100.0, 96.0, 0.5, MODEL_ID, "net", "1", True)  # type: ignore[call-arg]


def test_intervals_are_copied_read_only() -> None:
    intervals = {0.9: (90.0, 110.0)}
    result = _finding(intervals=intervals)
    intervals[0.8] = (1.0, 2.0)
    assert dict(result.intervals) == {0.9: (90.0, 110.0)}
    with pytest.raises(TypeError):
        result.intervals[0.5] = (1.0, 2.0)  # type: ignore[index]


def test_difference(finding: BoneAgeFinding) -> None:
    assert finding.bone_age_minus_chronological_age_months == pytest.approx(1.3)
    assert _finding(chronological_age_months=None).bone_age_minus_chronological_age_months is None


def test_model_id_upper_case_is_normalised() -> None:
    assert _finding(model_id=MODEL_ID.upper()).model_id == MODEL_ID


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"bone_age_months": -1.0}, ValueError, "bone_age_months"),
        ({"bone_age_months": float("inf")}, ValueError, "bone_age_months"),
        ({"bone_age_months": "12"}, TypeError, "bone_age_months"),
        ({"chronological_age_months": -3.0}, ValueError, "chronological_age_months"),
        ({"sds": float("nan")}, ValueError, "sds"),
        ({"intervals": {1.5: (1.0, 2.0)}}, ValueError, "intervals"),
        ({"intervals": {0.9: (3.0, 2.0)}}, ValueError, "intervals"),
        ({"intervals": {0.9: (3.0,)}}, TypeError, "intervals"),
        ({"intervals": [(0.9, (1.0, 2.0))]}, TypeError, "intervals"),
        ({"model_id": "abc"}, ValueError, "model_id"),
        ({"model_name": " "}, ValueError, "model_name"),
        ({"model_trained": 1}, TypeError, "model_trained"),
        ({"laterality": "B"}, ValueError, "laterality"),
        ({"precision": "half"}, ValueError, "precision"),
    ],
)
def test_finding_rejects(changes: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _finding(**changes)


def test_summary_lines(finding: BoneAgeFinding, untrained_finding: BoneAgeFinding) -> None:
    lines = finding.summary_lines()
    assert lines[0] == "Bone age: 10 y 4 mo"
    assert "Chronological age: 10 y 3 mo" in lines
    assert "SDS: +0.14 (Greulich-Pyle)" in lines
    assert "90% interval: 9 y 2 mo - 11 y 7 mo" in lines
    assert AI_RESULT_NOTICE in lines
    assert UNTRAINED_WARNING not in lines
    assert untrained_finding.summary_lines()[-1] == UNTRAINED_WARNING


def test_check_uid() -> None:
    assert check_uid("x", "1.2.3") == "1.2.3"
    with pytest.raises(ValueError, match='"x"'):
        check_uid("x", "1.02.x")
    with pytest.raises(TypeError, match='"x"'):
        check_uid("x", 123)
