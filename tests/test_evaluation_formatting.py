"""The number formatters every report shares (search/evaluation/formatting.py): 'n/a' for NaN, no '-0.0'."""

from __future__ import annotations

import math

from search.evaluation.formatting import NA, ci, fixed, ms, p_text, p_value, percent, points, ratio
from search.evaluation.intervals import Interval


def test_p_values() -> None:
    assert [p_text(p) for p in (0.21, 0.0042, 0.5, 1.0, 0.0004)] == [
        "p = 0.21",
        "p = 0.0042",
        "p = 0.5",
        "p = 1.0",
        "p < 0.001",
    ]
    assert p_value(0.031) == "0.031" and p_value(0.0004) == "< 0.001"
    assert p_value(math.nan) == NA and p_text(math.nan) == f"p = {NA}"


def test_points_and_ci() -> None:
    assert [points(x) for x in (0.013, -0.041, 0.0, -0.0, -0.0004)] == ["1.3", "-4.1", "0.0", "0.0", "-0.04"]
    assert [points(x, sign=True) for x in (0.013, -0.041, 0.0, 0.0004)] == ["+1.3", "-4.1", "0.0", "+0.04"]
    assert points(math.nan) == NA
    assert ci(Interval(0.013, -0.004, 0.030), 0.95) == "95 % CI [-0.4, 3.0]"
    assert ci(Interval(0.013, math.nan, 0.030), 0.95) == f"95 % CI {NA}"


def test_percent_ms_ratio_fixed() -> None:
    assert percent(0.912) == "91.2 %" and percent(math.nan) == NA
    assert [ms(x) for x in (3.14, 38.0, 0.42, 0.999, math.nan)] == ["3.1", "38.0", "0.42", "1.0", NA]
    assert [ratio(x) for x in (812.4 / 240, 2.94, 1.04, 0.31, 0.0, math.nan)] == [
        "3.4x",
        "2.9x",
        "1.04x",
        "0.31x",
        NA,
        NA,
    ]
    assert fixed(-0.0004, 1) == "0.0" and fixed(1.26, 1, sign=True) == "+1.3" and fixed(0.0, 1, sign=True) == "0.0"


def test_a_score_s_interval_is_written_one_way_everywhere():
    from search.evaluation.formatting import score_ci, span
    from search.evaluation.intervals import Interval

    assert span(0.88, 0.94) == "0.8800–0.9400"
    assert span(float("nan"), float("nan")) == "n/a"
    assert score_ci(0.9123, Interval(0.9123, 0.88, 0.94), 0.95) == "0.9123  (95 % CI 0.8800–0.9400)"
