"""Greulich–Pyle reference: SD of skeletal age by chronological age and sex, and SDS.

Standard deviations (months) of skeletal age in the Brush Foundation study underlying the
Greulich–Pyle atlas, at chronological ages 3, 6, 9, 12, 18 months, 2, 2.5, 3, 3.5, 4, 4.5,
5 years and then yearly from 6 years to 17 (boys) or 16 (girls) years.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging

import numpy as np

logger = logging.getLogger(__name__)

REFERENCE_NAME = "Greulich-Pyle (Brush Foundation) skeletal age SD"
"""How outputs name the reference used for the SDS."""

_EARLY_AGES_MONTHS: tuple[float, ...] = (3, 6, 9, 12, 18, 24, 30, 36, 42, 48, 54, 60)

GP_AGES_BOYS_MONTHS: tuple[float, ...] = _EARLY_AGES_MONTHS + tuple(12.0 * y for y in range(6, 18))
"""Chronological ages (months) of the boys' SD table: 3 months … 17 years."""

GP_AGES_GIRLS_MONTHS: tuple[float, ...] = _EARLY_AGES_MONTHS + tuple(12.0 * y for y in range(6, 17))
"""Chronological ages (months) of the girls' SD table: 3 months … 16 years."""

GP_SD_BOYS_MONTHS: tuple[float, ...] = (
    0.69, 1.13, 1.43, 1.97, 3.52, 3.92, 4.52, 5.08, 5.40, 6.66, 8.36, 8.79,
    9.17, 8.91, 9.10, 9.00, 9.79, 10.09, 10.38, 10.44, 10.72, 11.32, 12.86, 13.05,
)  # fmt: skip
"""SD of skeletal age (months), boys, at :data:`GP_AGES_BOYS_MONTHS`."""

GP_SD_GIRLS_MONTHS: tuple[float, ...] = (
    0.72, 1.16, 1.36, 1.77, 3.49, 4.64, 5.37, 5.97, 7.48, 8.98, 10.73, 11.65,
    10.23, 9.64, 10.23, 10.74, 11.73, 11.94, 10.24, 10.67, 11.30, 9.23, 7.31,
)  # fmt: skip
"""SD of skeletal age (months), girls, at :data:`GP_AGES_GIRLS_MONTHS`."""

assert len(GP_AGES_BOYS_MONTHS) == len(GP_SD_BOYS_MONTHS) == 24
assert len(GP_AGES_GIRLS_MONTHS) == len(GP_SD_GIRLS_MONTHS) == 23


def gp_sd_months(chronological_age_months: float, *, male: bool) -> float:
    """Return the Greulich–Pyle SD of skeletal age at a chronological age.

    Parameters
    ----------
    chronological_age_months : float
        Chronological age in months (≥ 0).
    male : bool
        True for boys, False for girls.

    Returns
    -------
    float
        SD in months, linearly interpolated between table ages and held constant beyond
        the first and last (3 months; 17 years boys, 16 years girls).

    Raises
    ------
    ValueError
        If the age is negative or not finite.
    """
    age = float(chronological_age_months)
    if not np.isfinite(age) or age < 0:
        raise ValueError(f"chronological age must be a finite number ≥ 0, got {age}")
    ages = GP_AGES_BOYS_MONTHS if male else GP_AGES_GIRLS_MONTHS
    sds = GP_SD_BOYS_MONTHS if male else GP_SD_GIRLS_MONTHS
    return float(np.interp(age, ages, sds))


def sd_table_ages(*, male: bool) -> tuple[float, float]:
    """The first and last chronological ages (months) the SD table has a value at: 3
    months to 17 years (boys) or 16 years (girls). An SDS outside them would rest on an
    SD the study never measured; past the last, on a skeleton that may be mature, whose
    bone age no longer rises with age."""
    ages = GP_AGES_BOYS_MONTHS if male else GP_AGES_GIRLS_MONTHS
    return ages[0], ages[-1]


def bone_age_sds(bone_age_months: float, chronological_age_months: float, *, male: bool) -> float:
    """Return the bone-age standard deviation score.

    ``SDS = (bone age - chronological age) / SD(chronological age, sex)``.

    Parameters
    ----------
    bone_age_months : float
        Estimated bone age, months.
    chronological_age_months : float
        Chronological age, months.
    male : bool
        True for boys, False for girls.

    Returns
    -------
    float
        The SDS (positive: advanced bone age).
    """
    sd = gp_sd_months(chronological_age_months, male=male)
    return (float(bone_age_months) - float(chronological_age_months)) / sd


def _add_months(day: dt.date, months: int) -> dt.date:
    """``day`` plus whole months, the day of month clamped to the target month's length."""
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    last = calendar.monthrange(year, month + 1)[1]
    return dt.date(year, month + 1, min(day.day, last))


def age_in_months(birth: dt.date, on: dt.date) -> float:
    """Return the calendar-exact age in months.

    Whole months are counted as on a calendar (a birthday on the 31st falls on the last
    day of shorter months); the remainder is the share of the current month-long interval
    that has elapsed.

    Parameters
    ----------
    birth : datetime.date
        Date of birth.
    on : datetime.date
        Date of the examination.

    Returns
    -------
    float
        Age in months (e.g. exactly 120.0 on the tenth birthday).

    Raises
    ------
    ValueError
        If ``on`` is before ``birth``.
    """
    if isinstance(birth, dt.datetime):
        birth = birth.date()
    if isinstance(on, dt.datetime):
        on = on.date()
    if on < birth:
        # Dates stay out of the message: it may end up in logs.
        raise ValueError("examination date is before the birth date")
    whole = (on.year - birth.year) * 12 + (on.month - birth.month)
    if _add_months(birth, whole) > on:
        whole -= 1
    start = _add_months(birth, whole)
    end = _add_months(birth, whole + 1)
    return whole + (on - start).days / (end - start).days
