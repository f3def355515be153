"""Intervals for the figures we report: every accuracy and win rate comes with its n and a 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


def proportion_interval(successes: float, n: int) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion successes / n (good near 0 and 1, unlike the normal one)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Normal 95% interval of a mean over independent units (prompts, rankings): mean ± 1.96·sd/√n."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    return (mean - half, mean + half)


def with_interval(value: float, interval: tuple[float, float], n: int, percent: bool = True) -> str:
    """'72.5% [68.1, 76.6] (n=400)': a figure as the reports print it."""
    scale, unit = (100, "%") if percent else (1, "")
    low, high = interval
    return f"{scale * value:.1f}{unit} [{scale * low:.1f}, {scale * high:.1f}] (n={n})"
