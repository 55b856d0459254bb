"""Uncertainty of the success rates: with tens of evaluation games a rate moves by 10 points
between two runs of the same policy, so every rate is reported with its interval."""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a success rate of ``successes`` out of ``n`` (z=1.96: 95%).

    Unlike the normal approximation p ± z·sqrt(p(1-p)/n), it stays inside [0, 1] and is not
    zero-width at 0/n or n/n, which small evaluation sets hit often. With no trials nothing
    is known: (0.0, 1.0).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"{successes} successes out of {n} trials")
    p = successes / n
    shrink = 1 + z * z / n
    center = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp: at 0/n or n/n the bound is 0 or 1 up to rounding.
    return max(0.0, center - half), min(1.0, center + half)
