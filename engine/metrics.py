"""Prometheus metrics of the engine, and the /metrics, /healthz and /readyz endpoint.

Naming follows Prometheus practice: one `callgate_` prefix, base units, `_total`
counters, and only bounded labels (never an account, number, UUID or address).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Sub-millisecond resolution: the decision budget is ~1 ms, the client's defaults start at 5 ms.
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.0035, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "callgate_decisions_total",
            "Call decisions by result and reason",
            ["result", "reason"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "callgate_decision_duration_seconds",
            "From channel data received to the decision written to FreeSWITCH",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.active_calls = Gauge(
            "callgate_active_calls", "Calls holding a socket on this process", registry=r
        )
        self.socket_errors = Counter(
            "callgate_socket_errors_total",
            "Outbound-socket connections dropped, by kind",
            ["kind"],
            registry=r,
        )
        self.snapshot_version = Gauge("callgate_snapshot_version", "Snapshot version in use", registry=r)
        self.snapshot_age = Gauge(
            "callgate_snapshot_age_seconds",
            "Seconds since the snapshot in use was confirmed current",
            registry=r,
        )

        self.limit_rejections = Counter(
            "callgate_limit_rejections_total",
            "Calls refused or trunks skipped at a limit, by level and kind",
            ["level", "kind"],
            registry=r,
        )
        self.fail_open_decisions = Counter(
            "callgate_limits_fail_open_decisions_total",
            "Limit decisions taken by the local approximation while Redis was unreachable",
            ["outcome"],
            registry=r,
        )
        self.redis_errors = Counter(
            "callgate_redis_errors_total",
            "Redis failures on the engine, by operation",
            ["operation"],
            registry=r,
        )
        self.reconciler_removals = Counter(
            "callgate_reconciler_removals_total", "Counted calls no FreeSWITCH knew, released", registry=r
        )

    def observe_decision(self, result: str, reason: str, seconds: float) -> None:
        self.decisions.labels(result, reason).inc()
        self.decision_seconds.observe(seconds)


def wsgi_app(
    registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]], before_scrape: Callable[[], None]
) -> Callable:
    """/metrics (Prometheus text), /healthz (process alive), /readyz (200 only when able to decide)."""

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            before_scrape()
            body = generate_latest(registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            ok, detail = ready()
            start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [detail.encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    return app
