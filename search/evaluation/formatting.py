"""Numbers as the reports write them, in one place: the comparison's sentences and tables, the final run's
report and its model card.

One formatter per kind of number, so that the recommendation, the terminal table, the
Markdown page and the card never give the same p-value or difference two ways. Every formatter takes
plain floats (fractions where a share is meant), says 'n/a' for a NaN rather than 'nan',
and never writes '-0.0', which reads as a loss that is not there.

Pure (standard library only).
"""

from __future__ import annotations

import math
from typing import Protocol

NA = "n/a"
"""A number that could not be computed (NaN): ROC-AUC with a class missing from the test split, say."""


class Bounded(Protocol):
    """Anything with a low and a high bound (intervals.Interval), without importing it: this module stays pure."""

    @property
    def low(self) -> float: ...

    @property
    def high(self) -> float: ...


def finite(x: float | None) -> bool:
    """False for None, NaN and infinity: a number that was not measured, to be written 'n/a'."""
    return x is not None and math.isfinite(x)


def _unsigned_zero(text: str) -> str:
    """'-0.0' -> '0.0': a negative number too small for the digits shown, or a negated zero, is no loss."""
    digits = text.lstrip("+-")
    return digits if text[:1] == "-" and set(digits) <= set("0.") else text


def fixed(x: float, digits: int, sign: bool = False) -> str:
    """`x` to `digits` decimals ('+' before a positive one if `sign`); 'n/a' for NaN."""
    if not finite(x):
        return NA
    text = _unsigned_zero(f"{x:.{digits}f}")
    return "+" + text if sign and text[0] != "-" and float(text) != 0 else text


def _two_significant(x: float) -> str:
    """'0.42', '0.0042', '1.0': two significant digits, always with a decimal point so it reads as measured."""
    text = f"{x:.2g}"
    return text if "." in text else text + ".0"


def p_value(p: float) -> str:
    """'0.21', '0.0042', '< 0.001': two significant digits, and no false precision near zero (a table cell)."""
    if not finite(p):
        return NA
    return "< 0.001" if p < 0.001 else _two_significant(p)


def p_text(p: float) -> str:
    """'p = 0.21', 'p < 0.001' (in a sentence)."""
    value = p_value(p)
    return f"p {value}" if value.startswith("<") else f"p = {value}"


def points(fraction: float, sign: bool = False) -> str:
    """A difference of two fractions in percentage points, one decimal: '1.3', '-4.1', '+1.3' with `sign`.

    A non-zero difference too small for one decimal gets two significant digits ('0.04')
    rather than a '0.0' that reads as none; an exact zero is '0.0', never signed.
    """
    if not finite(fraction):
        return NA
    value = 100 * fraction
    text = fixed(value, 1)
    if value != 0 and float(text) == 0:
        text = f"{value:.2g}"
    return "+" + text if sign and value > 0 else text


def bounds(interval: Bounded) -> str:
    """'[-0.4, 3.0]': an interval of a difference, in percentage points; 'n/a' if a bound is missing."""
    if not (finite(interval.low) and finite(interval.high)):
        return NA
    return f"[{points(interval.low)}, {points(interval.high)}]"


def span(low: float, high: float) -> str:
    """'0.8800–0.9400': a score's interval to 4 decimals; 'n/a' where a bound is undefined."""
    if not (finite(low) and finite(high)):
        return NA
    return f"{fixed(low, 4)}–{fixed(high, 4)}"


def score_ci(value: float, interval: Bounded, confidence: float) -> str:
    """'0.9123  (95 % CI 0.8800–0.9400)': a test score with its interval, the level named (a report line)."""
    return f"{fixed(value, 4)}  ({round(100 * confidence)} % CI {span(interval.low, interval.high)})"


def ci(interval: Bounded, confidence: float) -> str:
    """'95 % CI [-0.4, 3.0]': a difference's confidence interval in percentage points, its level named."""
    return f"{round(100 * confidence)} % CI {bounds(interval)}"


def percent(fraction: float) -> str:
    """'91.2 %': a share of images."""
    return NA if not finite(fraction) else f"{fixed(100 * fraction, 1)} %"


def ms(milliseconds: float) -> str:
    """'3.1', '38.0', '0.42': a latency, one decimal from a millisecond up, two significant digits below."""
    if not finite(milliseconds):
        return NA
    return fixed(milliseconds, 1) if milliseconds >= 1 else _two_significant(milliseconds)


def ratio(x: float) -> str:
    """'2.9x', '0.42x'; two decimals where one would say '1.0x' of two models that do differ."""
    if not finite(x) or x <= 0:
        return NA
    text = f"{x:.1f}" if x >= 1 else _two_significant(x)
    return f"{x:.2f}x" if float(text) == 1 else f"{text}x"
