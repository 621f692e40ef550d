"""Percentiles and latency summaries for the load-test reports.

Percentiles use the nearest-rank definition: the p-th percentile of n sorted samples is
the sample at rank ceil(p/100 * n) (1-based). It is always one of the measured values
(never interpolated), and p99.9 of fewer than 1000 samples is simply the maximum, which
is what a tail percentile can honestly claim from few samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["REPORTED", "percentile", "percentiles", "summarize"]

REPORTED = (50.0, 90.0, 99.0, 99.9)


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (``nan`` when empty)."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within 0..100, not {p}")
    n = len(sorted_values)
    if n == 0:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * n - 1e-9))
    return sorted_values[min(rank, n) - 1]


def percentiles(values: Iterable[float], ps: Iterable[float] = REPORTED) -> dict[str, float]:
    ordered = sorted(values)
    return {_label(p): percentile(ordered, p) for p in ps}


def _label(p: float) -> str:
    return f"p{p:g}"


def summarize(seconds: Iterable[float]) -> dict[str, float | int]:
    """count, mean, max and the reported percentiles, in milliseconds."""
    ordered = sorted(seconds)
    n = len(ordered)
    out: dict[str, float | int] = {"count": n}
    if n == 0:
        return out
    out["mean_ms"] = sum(ordered) / n * 1000
    for p in REPORTED:
        out[f"{_label(p)}_ms"] = percentile(ordered, p) * 1000
    out["max_ms"] = ordered[-1] * 1000
    return out
