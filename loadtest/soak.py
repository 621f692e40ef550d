"""Soak: one engine at a steady moderate load for a long time; do its resources stay flat?

    python -m loadtest.soak --minutes 30            # the documented run (docs/high-availability.md)
    python -m loadtest.soak --minutes 2 --warmup-minutes 0.5 --plot ''   # a quick look
    python -m loadtest.soak --from-json loadtest/results/X-soak.json --json X.json   # judge again

What runs (every part a real process on loopback, as in :mod:`loadtest.run`): a private
``redis-server``, the generated dataset (:mod:`loadtest.dataset`) published into it, one
``callgate serve`` with its metrics endpoint on a free port, and the load driver
(:mod:`loadtest.driver`, two processes) offering ``--cps`` calls per second open loop with
the realistic mix (about 15 % rejects of every reason), accepted calls held ``--hold``
seconds and then hung up by the "switch", so the engine runs its whole life cycle on every
call: decision, limits acquire, funds reservation, hangup, release, settlement of the
reservation and the CDR written to the Redis stream. No sync worker runs: it is another
process, and the engine's side of accounting (engine.billing) needs only Redis; the CDRs
accumulate in the private Redis's stream.

Every ``--interval`` seconds the engine is sampled: its RSS and open file descriptors
(``/proc/<pid>``), and from its ``/metrics``: the greenlets alive
(``callgate_greenlets``), the calls up (``callgate_active_calls``), the decisions per
second and the p99 decision latency over the interval (from the histogram's bucket
deltas, interpolated inside the bucket as Prometheus' ``histogram_quantile`` does). The
machine's load average is recorded with each sample: the machine is shared.

The verdict (:func:`assess`): after ``--warmup-minutes`` (the calls up reach their steady
count after one hold time; the allocator and the caches settle over the first minutes), a
least-squares slope per hour of each of RSS, file descriptors and greenlets, at a constant
number of calls up (:func:`trend`: each series is fitted on time and calls up together, since
the calls up dip whenever the shared machine starves the driver). A series is
``flat`` when its slope is within its tolerance (:data:`TOLERANCES`: a share of its median
per hour, with an absolute floor), else ``growing``. The JSON goes to ``--json``, the plot
(matplotlib, the ``bench`` extra) to ``--plot``; the exit status is 1 if a series grows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.dataset import DEFAULT_MIX, Scale

RESULTS = Path(__file__).resolve().parent / "results"

#: The series the verdict judges.
SERIES = ("rss_mib", "open_fds", "greenlets")


@dataclass(frozen=True)
class Tolerance:
    """How much growth per hour still counts as flat: ``relative`` of the series' median,
    at least ``floor`` (in the series' unit)."""

    relative: float
    floor: float

    def limit(self, median: float) -> float:
        return max(self.floor, self.relative * abs(median))


#: RSS may breathe with the allocator and the periodic full collection; descriptors and
#: greenlets follow the calls up (one each per call), which the steady load holds constant.
TOLERANCES: dict[str, Tolerance] = {
    "rss_mib": Tolerance(relative=0.05, floor=4.0),
    "open_fds": Tolerance(relative=0.02, floor=10.0),
    "greenlets": Tolerance(relative=0.02, floor=10.0),
}


# --------------------------------------------------------------------------- pure logic


@dataclass
class Scrape:
    """What one /metrics read tells the soak."""

    decisions: float = 0.0  # callgate_decisions_total, all labels
    degraded: float = 0.0  # of which ENGINE_DEGRADED (shed, deadline...: a busy machine shows here)
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    active_calls: float = 0.0
    greenlets: float = 0.0  # callgate_greenlets, all kinds


def parse_scrape(text: str) -> Scrape:
    """The series the soak needs from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "callgate_decisions_total":
                scrape.decisions += sample.value
                if sample.labels.get("reason") == "ENGINE_DEGRADED":
                    scrape.degraded += sample.value
            elif sample.name == "callgate_decision_duration_seconds_bucket":
                scrape.buckets[float(sample.labels["le"])] = sample.value
            elif sample.name == "callgate_active_calls":
                scrape.active_calls += sample.value
            elif sample.name == "callgate_greenlets":
                scrape.greenlets += sample.value
    return scrape


def window_quantile(before: Mapping[float, float], after: Mapping[float, float], q: float) -> float | None:
    """The ``q`` quantile (seconds) of the observations between two reads of a cumulative
    histogram: the bucket where the cumulative delta crosses ``q`` of the total, linearly
    interpolated inside it (Prometheus' ``histogram_quantile``). None when nothing was
    observed; the highest finite bound when the quantile falls in the +Inf bucket."""
    bounds = sorted(after)
    deltas = [after[b] - before.get(b, 0.0) for b in bounds]
    if not deltas or deltas[-1] <= 0:
        return None
    rank = q * deltas[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, deltas, strict=True):
        if cumulative >= rank:
            if math.isinf(bound):
                return lower
            inside = cumulative - below
            share = (rank - below) / inside if inside > 0 else 1.0
            return lower + (bound - lower) * share
        lower, below = bound, cumulative
    return lower


def slope_per_hour(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, in value units per hour (0 for < 2 points)."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread == 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread * 3600.0


def trend(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares of value = a + b * t + c * calls over (seconds, calls up, value) points:
    (b per hour, c per call). The time slope at a constant number of calls up: on a shared
    machine the driver falls behind now and then and the calls up dip, which moves every series
    with them; that is load, not a leak. Without spread in the calls (or too few points) it is
    the plain slope over time, c = 0."""
    n = len(points)
    if n < 3:
        return slope_per_hour([(t, v) for t, _, v in points]), 0.0
    mean_t = sum(t for t, _, _ in points) / n
    mean_c = sum(c for _, c, _ in points) / n
    mean_v = sum(v for _, _, v in points) / n
    stt = sum((t - mean_t) ** 2 for t, _, _ in points)
    scc = sum((c - mean_c) ** 2 for _, c, _ in points)
    stc = sum((t - mean_t) * (c - mean_c) for t, c, _ in points)
    stv = sum((t - mean_t) * (v - mean_v) for t, _, v in points)
    scv = sum((c - mean_c) * (v - mean_v) for _, c, v in points)
    det = stt * scc - stc * stc
    if stt == 0:
        return 0.0, 0.0
    if scc == 0 or det <= 1e-9 * stt * scc:
        return stv / stt * 3600.0, 0.0
    return (stv * scc - scv * stc) / det * 3600.0, (scv * stt - stv * stc) / det


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def assess(
    samples: Iterable[Mapping[str, Any]],
    warmup_seconds: float,
    tolerances: Mapping[str, Tolerance] = TOLERANCES,
) -> dict[str, Any]:
    """The verdict per series over the samples at ``t >= warmup_seconds``: the slope per hour
    at constant calls up (:func:`trend`; samples without ``calls_up`` count as constant), the
    plain slope, median, the allowed slope, growth over the judged span, and ``flat`` or
    ``growing`` (a falling series is flat: nothing accumulates). ``verdict`` is ``flat`` only
    when every series is; ``too short`` when fewer than 3 samples are past the warm-up."""
    judged = [s for s in samples if s["t"] >= warmup_seconds]
    out: dict[str, Any] = {"warmup_seconds": warmup_seconds, "samples_judged": len(judged), "series": {}}
    if len(judged) < 3:
        out["verdict"] = "too short"
        return out
    span = judged[-1]["t"] - judged[0]["t"]
    verdicts = []
    for name, tolerance in tolerances.items():
        points = [
            (s["t"], float(s.get("calls_up") or 0.0), float(s[name]))
            for s in judged
            if s.get(name) is not None
        ]
        values = [v for _, _, v in points]
        slope, per_call = trend(points)
        middle = median(values)
        limit = tolerance.limit(middle)
        state = "growing" if slope > limit else "flat"
        verdicts.append(state)
        out["series"][name] = {
            "slope_per_hour": slope,
            "per_call_up": per_call,
            "plain_slope_per_hour": slope_per_hour([(t, v) for t, _, v in points]),
            "median": middle,
            "min": min(values, default=math.nan),
            "max": max(values, default=math.nan),
            "allowed_slope_per_hour": limit,
            "growth_over_span": slope * span / 3600.0,
            "verdict": state,
        }
    out["judged_span_seconds"] = span
    out["verdict"] = "flat" if all(v == "flat" for v in verdicts) else "growing"
    return out


def describe(assessment: Mapping[str, Any]) -> str:
    """One line per series, then the verdict."""
    lines = []
    for name, row in assessment.get("series", {}).items():
        lines.append(
            f"{name:10s} median {row['median']:9.1f}  slope {row['slope_per_hour']:+9.2f}/h at constant "
            f"calls up (plain {row['plain_slope_per_hour']:+.2f}/h, "
            f"allowed {row['allowed_slope_per_hour']:.2f}/h)  -> {row['verdict']}"
        )
    lines.append(f"verdict: {assessment['verdict']} (after {assessment['warmup_seconds']:.0f}s warm-up)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- sampling (I/O)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return math.nan


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse_scrape(response.read().decode())


def sample(
    pid: int, metrics_port: int, t: float, previous: tuple[float, Scrape] | None
) -> tuple[dict[str, Any], Scrape]:
    """One reading of the engine; the per-window rates come from the previous scrape."""
    now = scrape(metrics_port)
    row: dict[str, Any] = {
        "t": t,
        "rss_mib": rss_mib(pid),
        "open_fds": open_fds(pid),
        "greenlets": now.greenlets,
        "calls_up": now.active_calls,
        "load_average": os.getloadavg()[0],
        "decisions_per_second": None,
        "degraded_per_second": None,
        "p99_ms": None,
    }
    if previous is not None:
        before_t, before = previous
        elapsed = max(1e-9, t - before_t)
        row["decisions_per_second"] = (now.decisions - before.decisions) / elapsed
        row["degraded_per_second"] = (now.degraded - before.degraded) / elapsed
        p99 = window_quantile(before.buckets, now.buckets, 0.99)
        row["p99_ms"] = None if p99 is None else p99 * 1000.0
    return row, now


# --------------------------------------------------------------------------- the plot


def plot(result: Mapping[str, Any], path: Path) -> None:
    """RSS, open descriptors and greenlets (with the calls up) over time, the warm-up shaded
    and the fitted slope drawn; decisions per second and p99 below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    warm = result["assessment"]["warmup_seconds"] / 60.0
    minutes = [s["t"] / 60.0 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    titles = {"rss_mib": "RSS (MiB)", "open_fds": "open file descriptors", "greenlets": "greenlets"}
    judged = [s for s in samples if s["t"] >= result["assessment"]["warmup_seconds"]]
    for ax, name in zip(axes, SERIES, strict=False):
        row = result["assessment"].get("series", {}).get(name)
        ax.plot(minutes, [s[name] for s in samples], lw=1.2, label=titles[name])
        target = ax
        values = [float(s[name]) for s in samples]
        if name != "rss_mib":
            # One descriptor and one greenlet per call up: what is left beyond them is what a
            # leak would make grow. On the right axis, with the trend drawn on it.
            ax.plot(
                minutes, [s["calls_up"] for s in samples], lw=0.8, ls="--", color="grey", label="calls up"
            )
            ax.legend(loc="lower left", fontsize=8)
            target = ax.twinx()
            values = [float(s[name]) - float(s["calls_up"]) for s in samples]
            target.plot(minutes, values, lw=1, color="tab:green", label="beyond the calls up (right axis)")
            low, high = min(values), max(values)
            target.set_ylim(min(0.0, low - 5), high + max(10.0, high - low))
        if row and judged:  # the fitted line passes through the judged samples' mean point
            first = samples.index(judged[0])
            mean_t = sum(s["t"] for s in judged) / len(judged)
            mean_v = sum(values[first:]) / len(judged)
            ends = [judged[0]["t"], judged[-1]["t"]]
            target.plot(
                [t / 60.0 for t in ends],
                [mean_v + row["slope_per_hour"] * (t - mean_t) / 3600.0 for t in ends],
                color="red",
                lw=1.2,
                label=f"trend at constant calls up {row['slope_per_hour']:+.1f}/h ({row['verdict']})",
            )
        ax.axvspan(0, warm, color="0.9", zorder=0)
        ax.set_ylabel(titles[name])
        target.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[3]
    ax.plot(minutes, [s["decisions_per_second"] for s in samples], lw=1, label="decisions/s")
    ax.plot(
        minutes,
        [s.get("degraded_per_second") for s in samples],
        lw=0.8,
        color="tab:red",
        label="of which ENGINE_DEGRADED/s",
    )
    ax.set_ylabel("decisions/s")
    twin = ax.twinx()
    twin.plot(minutes, [s["p99_ms"] for s in samples], lw=1, color="tab:orange", label="p99 (ms)")
    twin.set_ylabel("p99 decision latency (ms)")
    ax.axvspan(0, warm, color="0.9", zorder=0)
    ax.set_xlabel("minutes (shaded: warm-up, not judged)")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    config = result["config"]
    fig.suptitle(
        f"callgate soak: {config['cps']:g} CPS offered, hold {config['hold']:g}s, "
        f"{result['assessment']['verdict']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from loadtest import probes
    from loadtest.driver import LoadConfig, _library_in_subprocess, drive
    from loadtest.run import ServerSpec, free_port, log, publish, redis_for_run, server

    scale = Scale(accounts=args.accounts, rates=args.rates, groups=10, termination_rates=10_000)
    duration = args.minutes * 60.0
    metrics_port = free_port()
    lib = _library_in_subprocess()
    samples: list[dict[str, Any]] = []
    driven: dict[str, Any] = {}
    with redis_for_run(args.redis) as redis_url, tempfile.TemporaryDirectory(prefix="cgsoak-") as tmp:
        prefix = publish(redis_url, scale)
        spec = ServerSpec("callgate", "callgate", env={"CALLGATE_METRICS__LISTEN_PORT": str(metrics_port)})
        with server(spec, redis_url, prefix, Path(tmp), cpus=None, lib=lib, scale=scale) as srv:
            pid = srv.pids[0]
            config = LoadConfig(
                target=("127.0.0.1", srv.port),
                cps=args.cps,
                duration=duration,
                warmup=min(args.warmup_minutes * 60.0, duration / 2),
                mix=dict(DEFAULT_MIX),
                hold=args.hold,
                scale=scale,
                procs=2,
                drain=args.hold + 10,
                timeout=10.0,
            )

            def load() -> None:
                driven.update(drive(config, server_pids=[pid], redis_url=redis_url, library=lib))

            log(f"soak: {args.cps:g} CPS, hold {args.hold:g}s, {args.minutes:g} min, engine pid {pid}")
            driver = threading.Thread(target=load, daemon=True)
            start = time.monotonic() + 1.2  # the driver's processes start ~1.2 s from now
            driver.start()
            previous: tuple[float, Scrape] | None = None
            next_at = start
            while next_at <= start + duration:  # samples while calls arrive, not in the drain
                time.sleep(max(0.0, next_at - time.monotonic()))
                t = time.monotonic() - start
                row, reading = sample(pid, metrics_port, t, previous)
                previous = (t, reading)
                samples.append(row)
                next_at += args.interval
                if len(samples) % 6 == 1:
                    log(
                        f"  t={t / 60:5.1f} min rss {row['rss_mib']:.1f} MiB, fds {row['open_fds']}, "
                        f"greenlets {row['greenlets']:.0f}, calls up {row['calls_up']:.0f}, "
                        f"{row['decisions_per_second'] or 0:.0f}/s, p99 {row['p99_ms'] or math.nan:.2f} ms, "
                        f"load {row['load_average']:.2f}"
                    )
            driver.join()
    assessment = assess(samples, args.warmup_minutes * 60.0)
    loads = [s["load_average"] for s in samples]
    return {
        "scenario": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": "python -m loadtest.soak " + " ".join(sys.argv[1:]),
        "machine": probes.machine_description(),
        "config": {
            "cps": args.cps,
            "hold": args.hold,
            "minutes": args.minutes,
            "interval": args.interval,
            "dataset": scale.label(),
            "mix": dict(DEFAULT_MIX),
            "tolerances": {k: asdict(v) for k, v in TOLERANCES.items()},
        },
        "load_average": {
            "min": min(loads, default=math.nan),
            "median": median(loads),
            "max": max(loads, default=math.nan),
        },
        "assessment": assessment,
        "windows": summarize_windows(samples),
        "driver": {
            k: driven.get(k) for k in ("calls", "decided", "errors", "error_kinds", "outcomes", "latency")
        },
        "samples": samples,
    }


def summarize_windows(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Decisions per second and p99 over the run's windows: median and worst."""
    rates = [s["decisions_per_second"] for s in samples if s.get("decisions_per_second") is not None]
    p99s = [s["p99_ms"] for s in samples if s.get("p99_ms") is not None]
    return {
        "decisions_per_second_median": median(rates),
        "p99_ms_median": median(p99s),
        "p99_ms_worst": max(p99s, default=math.nan),
        "calls_up_median": median([s["calls_up"] for s in samples]),
        "degraded_share": degraded_share(samples),
    }


def degraded_share(samples: Sequence[Mapping[str, Any]]) -> float | None:
    """The share of the decisions answered ENGINE_DEGRADED over the sampled windows (None if not sampled)."""
    windows = [s for s in samples if s.get("degraded_per_second") is not None]
    total = sum(s["decisions_per_second"] for s in windows)
    return sum(s["degraded_per_second"] for s in windows) / total if total else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--cps", type=float, default=75.0, help="offered calls per second (open loop)")
    parser.add_argument("--hold", type=float, default=25.0, help="seconds an accepted call stays up")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="left out of the verdict")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--rates", type=int, default=100_000)
    parser.add_argument("--redis", default=None, help="Redis URL (default: a private redis-server)")
    day = time.strftime("%Y-%m-%d")
    parser.add_argument("--json", default=str(RESULTS / f"{day}-soak.json"), help="where the results go")
    parser.add_argument(
        "--plot", default=str(RESULTS / f"{day}-soak.png"), help="where the PNG goes ('' for none)"
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="judge and plot the samples of an earlier run (with --warmup-minutes) instead of running",
    )
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["assessment"] = assess(result["samples"], args.warmup_minutes * 60.0)
        result["windows"] = summarize_windows(result["samples"])
    else:
        result = run(args)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.plot:
        plot(result, Path(args.plot))
    print(describe(result["assessment"]))
    windows = result["windows"]
    degraded = windows.get("degraded_share")
    share = "not sampled" if degraded is None else f"{degraded:.1%} of the decisions"
    print(
        f"decisions/s median {windows['decisions_per_second_median']:.1f}, calls up median "
        f"{windows['calls_up_median']:.0f}, p99 median {windows['p99_ms_median']:.2f} ms "
        f"(worst window {windows['p99_ms_worst']:.2f} ms), ENGINE_DEGRADED {share}; load average median "
        f"{result['load_average']['median']:.2f} (max {result['load_average']['max']:.2f})"
    )
    return 0 if result["assessment"]["verdict"] == "flat" else 1


if __name__ == "__main__":
    sys.exit(main())
