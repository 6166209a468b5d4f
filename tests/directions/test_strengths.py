"""Strength checks shared by the steering parser and the bake."""

from __future__ import annotations

import math

import pytest

from directions.strengths import StrengthError, check_strength


@pytest.mark.parametrize(("value", "expected"), [(1, 1.0), (0.5, 0.5), (-2, -2.0), (0, 0.0)])
def test_numbers_are_accepted(value, expected):
    assert check_strength("r", value, max_abs=4.0) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (True, "a number"),
        ("1", "a number"),
        (None, "a number"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (10**400, "finite"),  # an integer literal too large for a float
        (4.5, "within"),
    ],
)
def test_non_numbers_and_out_of_bounds_are_refused(value, why):
    with pytest.raises(StrengthError, match=why):
        check_strength("r", value, max_abs=4.0)


def test_no_bound_without_max_abs():
    assert check_strength("r", 1e6) == 1e6
