"""Prometheus metrics of the sync worker (`callgate sync`, served on [sync] metrics_port)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("callgate.sync")

# From a change's write in PostgreSQL to its MULTI/EXEC in Redis: milliseconds, up to a full resync.
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.lag = Histogram(
            "callgate_sync_lag_seconds",
            "From a change's write in PostgreSQL to its application in Redis",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.catch_up_seconds = Histogram(
            "callgate_sync_catch_up_duration_seconds",
            "One catch-up: its PostgreSQL snapshot transaction and the Redis write",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.changes_applied = Counter(
            "callgate_sync_changes_applied_total",
            "Entity changes applied to the Redis snapshot one by one, by entity type",
            ["entity"],
            registry=r,
        )
        self.full_resyncs = Counter(
            "callgate_sync_full_resyncs_total",
            "Whole snapshots published by the worker, by reason",
            ["reason"],
            registry=r,
        )
        self.errors = Counter(
            "callgate_sync_errors_total",
            "Failures of the sync worker, by kind (postgres, redis, conflict, apply, events, sweep)",
            ["kind"],
            registry=r,
        )
        self.drift_repaired = Counter(
            "callgate_sync_drift_repaired_total",
            "Entities the periodic sweep found different in Redis and rewrote",
            registry=r,
        )
        self.events_persisted = Counter(
            "callgate_sync_events_persisted_total",
            "Engine events written to PostgreSQL, by type",
            ["type"],
            registry=r,
        )
        self.leader = Gauge("callgate_sync_leader", "1 while this worker holds the leader lease", registry=r)
        self.applied_change_version = Gauge(
            "callgate_sync_applied_change_version", "Highest change version applied to Redis", registry=r
        )
        self.snapshot_version = Gauge(
            "callgate_sync_snapshot_version", "Snapshot version the worker applies to", registry=r
        )
        self.last_apply = Gauge(
            "callgate_sync_last_apply_timestamp_seconds",
            "Unix time of the last catch-up that reached Redis (changes or not)",
            registry=r,
        )


def serve_metrics(metrics: SyncMetrics, host: str, port: int) -> None:
    """Serve /metrics in a daemon thread; a port in use is logged, not fatal."""
    if not port:
        return
    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        log.warning("sync metrics not served on %s:%s: %s", host, port, exc)
