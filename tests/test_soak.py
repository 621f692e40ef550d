"""The soak's sampling and verdict logic (loadtest/soak.py), without a process or a socket."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine.metrics import EngineMetrics
from loadtest.soak import (
    Tolerance,
    assess,
    degraded_share,
    median,
    parse_scrape,
    slope_per_hour,
    trend,
    window_quantile,
)


def test_slope_per_hour_of_a_straight_line_is_exact():
    points = [(t, 100.0 + 2.0 * t / 60.0) for t in range(0, 1800, 10)]  # +2 per minute
    assert slope_per_hour(points) == pytest.approx(120.0)
    assert slope_per_hour([(0.0, 5.0)]) == 0.0
    assert slope_per_hour([(3.0, 5.0), (3.0, 9.0)]) == 0.0  # no spread in time


def test_median_of_odd_and_even_counts():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert math.isnan(median([]))


def _samples(rss, fds, greenlets, minutes=30, every=10):
    return [
        {"t": float(t), "rss_mib": rss(t), "open_fds": fds(t), "greenlets": greenlets(t)}
        for t in range(0, minutes * 60 + 1, every)
    ]


def test_a_flat_run_with_noise_is_flat_and_the_warm_up_is_not_judged():
    def noisy(base, amplitude):
        return lambda t: base + amplitude * math.sin(t / 37.0)

    # The first five minutes climb steeply (the warm-up); afterwards only noise.
    def rss(t):
        return 60 + t / 5 if t < 300 else 120 + 3 * math.sin(t / 50.0)

    samples = _samples(rss, noisy(2000, 30), noisy(2005, 30))
    verdict = assess(samples, warmup_seconds=300)
    assert verdict["verdict"] == "flat", verdict
    assert verdict["samples_judged"] == len([s for s in samples if s["t"] >= 300])
    assert all(row["verdict"] == "flat" for row in verdict["series"].values())
    # Judged from t = 0 the same run would look like a leak: the warm-up is what is excluded.
    assert assess(samples, warmup_seconds=0)["series"]["rss_mib"]["verdict"] == "growing"


def test_a_slow_leak_in_any_series_makes_the_run_growing():
    flat = lambda value: lambda t: value  # noqa: E731
    leaking_fds = _samples(flat(120.0), lambda t: 2000 + t / 60.0, flat(2005.0))  # +60 fds per hour
    verdict = assess(leaking_fds, warmup_seconds=300)
    assert verdict["verdict"] == "growing"
    assert verdict["series"]["open_fds"]["verdict"] == "growing"
    assert verdict["series"]["open_fds"]["slope_per_hour"] == pytest.approx(60.0)
    assert verdict["series"]["rss_mib"]["verdict"] == "flat"
    # 10 MiB per hour on 120 MiB is over the 5 %/h allowance (6 MiB/h).
    leaking_rss = _samples(lambda t: 120 + 10 * t / 3600.0, flat(2000.0), flat(2005.0))
    assert assess(leaking_rss, warmup_seconds=300)["series"]["rss_mib"]["verdict"] == "growing"
    # A falling series accumulates nothing: flat.
    falling = _samples(lambda t: 200 - t / 60.0, flat(2000.0), flat(2005.0))
    assert assess(falling, warmup_seconds=300)["verdict"] == "flat"


def test_the_tolerance_is_relative_with_an_absolute_floor():
    assert Tolerance(relative=0.05, floor=4.0).limit(200.0) == pytest.approx(10.0)
    assert Tolerance(relative=0.05, floor=4.0).limit(20.0) == 4.0
    tiny = _samples(lambda t: 50.0 + 3 * t / 3600.0, lambda t: 12.0, lambda t: 5.0)  # +3 MiB/h on 50
    assert assess(tiny, warmup_seconds=0)["series"]["rss_mib"]["verdict"] == "flat"


def test_too_few_samples_past_the_warm_up_give_no_verdict():
    samples = _samples(lambda t: 1.0, lambda t: 1.0, lambda t: 1.0, minutes=1)
    assert assess(samples, warmup_seconds=3600)["verdict"] == "too short"


def test_window_quantile_interpolates_inside_the_bucket_of_the_window_only():
    before = {0.001: 100.0, 0.002: 100.0, 0.005: 100.0, math.inf: 100.0}  # 100 fast calls earlier
    # In the window: 50 under 1 ms, 50 between 2 and 5 ms.
    after = {0.001: 150.0, 0.002: 150.0, 0.005: 200.0, math.inf: 200.0}
    assert window_quantile(before, after, 0.5) == pytest.approx(0.001)
    # rank 99 of 100: 49 of the 50 in (2 ms, 5 ms] -> 2 + 3 * 49/50 ms
    assert window_quantile(before, after, 0.99) == pytest.approx(0.002 + 0.003 * 49 / 50)
    assert window_quantile(after, after, 0.99) is None  # nothing observed in the window
    slow = {0.001: 150.0, 0.002: 150.0, 0.005: 150.0, math.inf: 200.0}
    assert window_quantile(before, slow, 0.99) == 0.005  # beyond the last bound: the last bound


def test_parse_scrape_reads_the_engine_s_own_exposition():
    metrics = EngineMetrics(CollectorRegistry())
    for seconds in (0.0004, 0.0008, 0.003):
        metrics.observe_decision("accept", "", seconds)
    metrics.observe_decision("reject", "NO_SUFFICIENT_FUND", 0.0006)
    metrics.observe_decision("reject", "ENGINE_DEGRADED", 0.0002, "load shed: event loop 0.2 s behind")
    metrics.active_calls.inc(3)
    metrics.set_greenlets(connections=3, background=5)
    scrape = parse_scrape(generate_latest(metrics.registry).decode())
    assert scrape.decisions == 5 and scrape.degraded == 1
    assert scrape.active_calls == 3
    assert scrape.greenlets == 8
    assert scrape.buckets[0.0005] == 2 and scrape.buckets[0.001] == 4 and scrape.buckets[math.inf] == 5


def test_trend_separates_time_from_the_calls_up():
    # Each call up holds 1 fd; the calls up dip now and then (a starved driver), and late in
    # the run more often: the plain slope sees a fall that is only load, the trend sees none.
    points = []
    for k in range(180):
        t = 300.0 + 10 * k
        calls = 2000.0 - (900.0 if k % 7 == 0 or (k > 120 and k % 3 == 0) else 0.0)
        points.append((t, calls, 40.0 + calls))
    slope, per_call = trend(points)
    assert slope == pytest.approx(0.0, abs=1e-6) and per_call == pytest.approx(1.0)
    assert slope_per_hour([(t, v) for t, _, v in points]) < -100
    # A real leak of 30 fds per hour under the same noise is still seen, whole.
    leaking = [(t, c, v + 30.0 * (t - 300.0) / 3600.0) for t, c, v in points]
    assert trend(leaking)[0] == pytest.approx(30.0)
    # Constant calls up: the plain slope.
    flat_calls = [(t, 2000.0, v) for t, _, v in leaking]
    assert trend(flat_calls) == (pytest.approx(slope_per_hour([(t, v) for t, _, v in flat_calls])), 0.0)


def test_assess_judges_at_constant_calls_up():
    samples = []
    for k in range(180):
        calls = 2000.0 - (900.0 if k > 90 and k % 2 else 0.0)  # the second half is noisier
        samples.append(
            {"t": 10.0 * k, "calls_up": calls, "rss_mib": 100 + calls / 100, "open_fds": 40 + calls,
             "greenlets": 5 + calls}
        )  # fmt: skip
    verdict = assess(samples, warmup_seconds=0)
    assert verdict["verdict"] == "flat"
    assert verdict["series"]["open_fds"]["per_call_up"] == pytest.approx(1.0)
    assert verdict["series"]["open_fds"]["plain_slope_per_hour"] < -100  # what the old judge saw


def test_the_degraded_share_of_the_windows() -> None:
    samples: list[dict[str, float | None]] = [
        {"decisions_per_second": 80.0, "degraded_per_second": 8.0},
        {"decisions_per_second": 80.0, "degraded_per_second": 0.0},
        {"decisions_per_second": None, "degraded_per_second": None},  # the first sample
    ]
    assert degraded_share(samples) == pytest.approx(0.05)
    assert degraded_share([{"decisions_per_second": 80.0}]) is None  # an older run's samples
