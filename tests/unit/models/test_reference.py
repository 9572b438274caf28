"""Greulich–Pyle SD table, SDS and calendar-exact age."""

from __future__ import annotations

import datetime as dt

import pytest

from models.reference import (
    GP_AGES_BOYS_MONTHS,
    GP_AGES_GIRLS_MONTHS,
    GP_SD_BOYS_MONTHS,
    GP_SD_GIRLS_MONTHS,
    age_in_months,
    bone_age_sds,
    gp_sd_months,
    sd_table_ages,
)


def test_table_lengths_match_the_ages() -> None:
    assert len(GP_AGES_BOYS_MONTHS) == len(GP_SD_BOYS_MONTHS) == 24
    assert len(GP_AGES_GIRLS_MONTHS) == len(GP_SD_GIRLS_MONTHS) == 23
    assert GP_AGES_BOYS_MONTHS[-1] == 17 * 12
    assert GP_AGES_GIRLS_MONTHS[-1] == 16 * 12


@pytest.mark.parametrize(
    ("age", "male", "sd"),
    [
        (3.0, True, 0.69),
        (18.0, False, 3.49),
        (60.0, True, 8.79),
        (120.0, True, 9.79),  # 6 y is the 13th value (9.17); 10 y the 17th
        (120.0, False, 11.73),
        (204.0, True, 13.05),
        (192.0, False, 7.31),
    ],
)
def test_sd_at_table_ages(age: float, male: bool, sd: float) -> None:
    assert gp_sd_months(age, male=male) == pytest.approx(sd)


def test_sd_interpolates_linearly() -> None:
    # Boys 2 y (3.92) and 2.5 y (4.52): 27 months is half-way.
    assert gp_sd_months(27.0, male=True) == pytest.approx((3.92 + 4.52) / 2)
    # Girls 10 y (11.73) and 11 y (11.94), a quarter of the way.
    assert gp_sd_months(123.0, male=False) == pytest.approx(11.73 + 0.25 * (11.94 - 11.73))


def test_sd_is_clamped_at_the_ends() -> None:
    assert gp_sd_months(0.0, male=True) == pytest.approx(0.69)
    assert gp_sd_months(230.0, male=True) == pytest.approx(13.05)
    assert gp_sd_months(220.0, male=False) == pytest.approx(7.31)


def test_the_table_runs_from_3_months_to_17_or_16_years() -> None:
    assert sd_table_ages(male=True) == (3.0, 204.0)
    assert sd_table_ages(male=False) == (3.0, 192.0)


def test_sd_rejects_negative_age() -> None:
    with pytest.raises(ValueError, match="≥ 0"):
        gp_sd_months(-1.0, male=True)


def test_sds_worked_example_boy_10y_bone_age_12y() -> None:
    # SD at 10 years (boys) is 9.79 months: (144 - 120) / 9.79 = 2.4515...
    assert bone_age_sds(144.0, 120.0, male=True) == pytest.approx(24 / 9.79)
    assert bone_age_sds(144.0, 120.0, male=True) == pytest.approx(2.4515, abs=1e-4)


def test_sds_worked_example_girl_delayed() -> None:
    # Girl aged 7 y 6 m (90 months), bone age 6 y: SD = (10.23 + 9.64) / 2 = 9.935.
    assert bone_age_sds(72.0, 90.0, male=False) == pytest.approx(-18 / 9.935)


@pytest.mark.parametrize(
    ("birth", "on", "months"),
    [
        (dt.date(2014, 3, 15), dt.date(2024, 3, 15), 120.0),
        (dt.date(2014, 3, 15), dt.date(2014, 4, 15), 1.0),
        (dt.date(2014, 3, 15), dt.date(2014, 3, 15), 0.0),
        # 15 Mar -> 15 Apr is 31 days; 16 days in.
        (dt.date(2014, 3, 15), dt.date(2014, 3, 31), 16 / 31),
        # Born on the 31st: the month-day falls on the last day of shorter months.
        (dt.date(2020, 1, 31), dt.date(2020, 2, 29), 1.0),
        (dt.date(2020, 1, 31), dt.date(2020, 3, 1), 1 + 1 / 31),
        # Leap-day birth.
        (dt.date(2016, 2, 29), dt.date(2017, 2, 28), 12.0),
    ],
)
def test_age_in_months(birth: dt.date, on: dt.date, months: float) -> None:
    assert age_in_months(birth, on) == pytest.approx(months)


def test_age_in_months_rejects_exam_before_birth() -> None:
    with pytest.raises(ValueError, match="before the birth date"):
        age_in_months(dt.date(2020, 5, 2), dt.date(2020, 5, 1))
