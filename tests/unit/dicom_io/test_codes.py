"""Coded concepts used in the SR."""

from __future__ import annotations

import pytest

from dicom_io import codes


def test_standard_codes() -> None:
    assert (codes.BONE_AGE.value, codes.BONE_AGE.scheme_designator) == ("85151-9", "LN")
    assert (codes.HAND.value, codes.HAND.scheme_designator) == ("85562004", "SCT")
    assert codes.LEFT.value == "7771000"
    assert codes.RIGHT.value == "24028007"
    assert (codes.UCUM_MONTH.value, codes.UCUM_MONTH.scheme_designator) == ("mo", "UCUM")


def test_laterality_code() -> None:
    assert codes.laterality_code("L") == codes.LEFT
    assert codes.laterality_code("R") == codes.RIGHT
    assert codes.laterality_code(None) is None
    with pytest.raises(ValueError, match="laterality"):
        codes.laterality_code("left")


def test_prediction_interval_codes_are_distinct_and_short() -> None:
    made = {
        codes.prediction_interval_bound(level, bound)
        for level in (0.8, 0.9, 0.95, 0.875)
        for bound in ("lower", "upper")
    }
    assert len({code.value for code in made}) == 8
    assert all(len(code.value) <= 16 for code in made)
    assert all(code.scheme_designator == codes.PRIVATE_SCHEME for code in made)
    with pytest.raises(ValueError, match="bound"):
        codes.prediction_interval_bound(0.9, "middle")
    with pytest.raises(ValueError, match="level"):
        codes.prediction_interval_bound(90, "lower")


def test_private_scheme_is_declared() -> None:
    (item,) = codes.coding_scheme_identification()
    assert item.CodingSchemeDesignator == codes.PRIVATE_SCHEME
    assert codes.PRIVATE_SCHEME.startswith("99")
