"""What a request asks of one direction, and the checks every caller applies to a strength.

The server's steering parser (``server.steering``) and the bake take strengths from users;
both check them here, so the rules (a real, finite number within a bound) are written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

When = Literal["always", "auto"]
WHEN: tuple[When, ...] = ("always", "auto")


@dataclass
class DirectionRequest:
    """How much of one direction to remove, and whether only when its condition fires.

    ``when="auto"`` is conditional ablation: the direction applies only to requests whose
    prompt makes its detection score exceed the calibrated threshold.
    """

    strength: float
    when: When = "always"


class StrengthError(ValueError):
    """A strength that is not a finite number within the allowed bound; the message says why."""


def check_strength(name: str, value: Any, max_abs: float | None = None) -> float:
    """``value`` as a float, or :class:`StrengthError`: booleans and strings are not numbers here
    (JSON ``true`` or ``"1"`` is a client bug, not a strength), and neither are NaN and infinities."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StrengthError(f"strength for '{name}' must be a number")
    try:
        s = float(value)
    except OverflowError:  # an integer literal too large for a float
        s = math.inf
    if not math.isfinite(s):
        raise StrengthError(f"strength for '{name}' must be finite")
    if max_abs is not None and abs(s) > max_abs:
        raise StrengthError(f"strength for '{name}' must be within ±{max_abs}")
    return s
