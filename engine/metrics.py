"""Prometheus metrics of the engine, and the /metrics, /healthz and /readyz endpoint.

Naming follows Prometheus practice: one `callgate_` prefix, base units, `_total`
counters, and only bounded labels (never an account, number, UUID or address):
every label value is checked against a closed list and anything else is counted
as "other".

Several `callgate serve` processes on one host (engine.reuse_port) keep correct
totals with ``[metrics] multiprocess_dir``: every process writes its values to
memory-mapped files in that directory (prometheus_client's multiprocess mode),
every process serves the sum over all of them, and the metrics port is shared
with SO_REUSEPORT like the call port, so a scrape may land on any process and
still sees the whole host. See :class:`SharedDirectory` for the bookkeeping of
processes that start and die.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from typing import Any, cast

import redis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    values,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from engine.decision import Reason
from engine.state.limits import LevelKind, LimitKind, LimitsUnavailable

log = logging.getLogger("callgate.metrics")

# prometheus_client's multiprocess helpers carry no annotations: typed here once, so that
# their calls below are checked (and mypy's strict mode has no untyped call to refuse).
_disable_created_metrics = cast(Callable[[], None], disable_created_metrics)
_multiprocess_collector = cast(Callable[..., object], MultiProcessCollector)
_mark_process_dead = cast(Callable[[int, str], None], mark_process_dead)
_multiprocess_value_class = cast(Callable[[], Any], values.MultiProcessValue)

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# Sub-millisecond resolution: the decision budget is ~1 ms (p99 target 20 ms); the client's
# default buckets start at 5 ms and would put every healthy decision in the first one.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.0035, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
# One Redis round trip on the hot path: a local Redis answers in ~0.1-0.5 ms; redis.socket_timeout
# (0.25 s by default) bounds the tail.
REDIS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

OTHER = "other"
RESULTS = ("accept", "reject")
REASONS = ("", *(reason.value for reason in Reason))  # "" for accepted calls
# Why a call was answered ENGINE_DEGRADED (the reject's detail names it; see degraded_cause).
DEGRADED_CAUSES = (
    "no_snapshot",  # nothing loaded from Redis yet
    "stale_snapshot",  # the snapshot was not confirmed by Redis within engine.snapshot_max_age
    "limits_unavailable",  # Redis did not answer the limits script (fail closed)
    "deadline",  # engine.decision_deadline passed
    "overload",  # over engine.max_connections
    "shed",  # shedding before deciding: lag, backlog or wait since accept over its bound (engine.shedding)
    "internal_error",  # the decision raised
    OTHER,
)
SOCKET_ERROR_KINDS = ("protocol", "timeout", "gone", "late_replies", "refused")
LIMIT_LEVELS = tuple(level.value for level in LevelKind)
LIMIT_KINDS = tuple(kind.value for kind in LimitKind)
FAIL_OPEN_OUTCOMES = ("admitted", "refused")
SNAPSHOT_UPDATE_KINDS = ("full", "change")
# Greenlets of the engine, by what they run: one per outbound-socket connection, and the
# process's background tasks (snapshot watcher, release batcher, settler, event publisher...).
GREENLET_KINDS = ("connection", "background")
# Redis round trips, by what they are for.
REDIS_OPERATIONS = ("limits", "release", "snapshot", "reconcile", "resync", "ping")

# Prefixes of the ENGINE_DEGRADED details written by engine.decider and engine.call.driver.
_DEGRADED_DETAILS = (
    ("no snapshot", "no_snapshot"),
    ("snapshot unconfirmed", "stale_snapshot"),
    ("limits unavailable", "limits_unavailable"),
    ("decision deadline", "deadline"),
    ("over engine.max_connections", "overload"),
    ("load shed", "shed"),
    ("internal error", "internal_error"),
)


def degraded_cause(detail: str) -> str:
    """The bounded cause label of an ENGINE_DEGRADED reject, from its detail text."""
    text = (detail or "").strip().lower()
    for prefix, cause in _DEGRADED_DETAILS:
        if text.startswith(prefix):
            return cause
    return OTHER


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


_RESULT_SET = frozenset(RESULTS)
_REASON_SET = frozenset(REASONS)
_SOCKET_ERROR_SET = frozenset(SOCKET_ERROR_KINDS)
_LEVEL_SET = frozenset(LIMIT_LEVELS)
_KIND_SET = frozenset(LIMIT_KINDS)
_REDIS_OPERATION_SET = frozenset(REDIS_OPERATIONS)


class _RedisTimer:
    """``with metrics.redis_call(op)``: a class-based timer with the labelled children looked
    up once per operation; cheaper than a generator context manager and two labels() per
    round trip (~8 -> ~2 us)."""

    __slots__ = ("_children", "_started")

    def __init__(self, children: tuple[Any, Any]) -> None:
        self._children = children  # (latency histogram child, error counter child)
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        latency, errors = self._children
        if kind is not None and issubclass(kind, (redis.RedisError, LimitsUnavailable, OSError)):
            errors.inc()
        latency.observe(time.perf_counter() - self._started)


def build_version() -> str:
    try:
        return metadata.version("callgate")
    except metadata.PackageNotFoundError:
        return "unknown"


class EngineMetrics:
    """Every metric of one engine process.

    ``multiprocess_dir`` (or $PROMETHEUS_MULTIPROC_DIR when empty) switches to
    prometheus_client's multiprocess mode: values live in files shared by the processes
    of the host, and ``registry`` (what /metrics serves) collects all of them. It must
    be given before any other metric of the process is created; it is process-wide.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str = "") -> None:
        directory = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
        # No `*_created` series: Prometheus would store each as a metric of its own (process-wide).
        _disable_created_metrics()
        self.shared: SharedDirectory | None = None
        self.registry = registry or CollectorRegistry()
        if directory:
            self.shared = SharedDirectory(directory)
            self.shared.join()
            _enable_multiprocess(self.shared.path)
            _multiprocess_collector(self.registry, path=self.shared.path)
            r: CollectorRegistry | None = None  # the objects below only write their files
        else:
            r = self.registry
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.multiprocess = self.shared is not None
        self._decision_children: dict[tuple[str, str], Any] = {}
        self._redis_children: dict[str, tuple[Any, Any]] = {}

        self.decisions = Counter(
            "callgate_decisions_total",
            "Call decisions by result (accept, reject) and reject reason; rate() is the calls per second",
            ["result", "reason"],
            registry=r,
        )
        self.decision_seconds = Histogram(
            "callgate_decision_duration_seconds",
            "From channel data received to the decision written to FreeSWITCH",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.degraded_decisions = Counter(
            "callgate_degraded_decisions_total",
            "Calls answered ENGINE_DEGRADED (503, fail closed), by cause",
            ["cause"],
            registry=r,
        )
        self.active_calls = Gauge(
            "callgate_active_calls",
            "Calls holding a socket (decided and not yet hung up)",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Load shedding at the front of the queue (engine.shedding.ListenGate).
        self.listening = Gauge(
            "callgate_listening",
            "1 while the process listens for calls, 0 while saturated (connections refused)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.listener_stops = Counter(
            "callgate_listener_stops_total",
            "Times the process stopped listening because it was saturated",
            registry=r,
        )
        self.listener_stopped_seconds = Counter(
            "callgate_listener_stopped_seconds_total",
            "Seconds the process did not listen because it was saturated (pauses that ended)",
            registry=r,
        )
        self.socket_errors = Counter(
            "callgate_socket_errors_total",
            "Outbound-socket connections dropped by the engine (peer misbehaved), by kind",
            ["kind"],
            registry=r,
        )
        self.snapshot_version = Gauge(
            "callgate_snapshot_version",
            "Snapshot version in use (the oldest among the host's processes)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.snapshot_age = Gauge(
            "callgate_snapshot_age_seconds",
            "Seconds since Redis last confirmed the snapshot in use (the worst process; 1e9 if none)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.snapshot_updates = Counter(
            "callgate_snapshot_updates_total",
            "Snapshot updates taken by the engine processes: whole snapshots loaded (full), "
            "sync change events applied in place (change)",
            ["kind"],
            registry=r,
        )
        self._snapshot_updates_seen: dict[str, int] = {}
        self.ready = Gauge(
            "callgate_ready",
            "1 when every process can decide calls (snapshot loaded and confirmed), else 0",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.processes = Gauge(
            "callgate_engine_processes",
            "Engine processes alive on this host (sharing the metrics)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.build_info = Gauge(
            "callgate_build_info",
            "Always 1; the labels name the running version",
            ["version", "python_version"],
            registry=r,
            multiprocess_mode="livemax",
        )

        self.limit_rejections = Counter(
            "callgate_limit_rejections_total",
            "Calls refused, or trunks skipped, at a concurrent-call or CPS limit, by level and kind",
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
        self.redis_latency = Histogram(
            "callgate_redis_request_duration_seconds",
            "Redis round trips of the engine, by operation (failed ones included)",
            ["operation"],
            buckets=REDIS_BUCKETS,
            registry=r,
        )
        self.reconciler_removals = Counter(
            "callgate_reconciler_removals_total", "Counted calls no FreeSWITCH knew, released", registry=r
        )
        self.greenlets = Gauge(
            "callgate_greenlets",
            "Greenlets alive: one per outbound-socket connection (connection), and the background "
            "tasks (background); sampled at scrape time",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.reconciler_recounts = Counter(
            "callgate_reconciler_recounts_total",
            "Live calls the registry of counted calls lacked (acquire lost), counted again",
            registry=r,
        )

        self._initialise_series()

    def _initialise_series(self) -> None:
        """Create every label combination at 0, so rate() and the alerts see them from the start."""
        self.decisions.labels("accept", "")
        for reason in REASONS[1:]:
            self.decisions.labels("reject", reason)
        for cause in DEGRADED_CAUSES:
            self.degraded_decisions.labels(cause)
        for kind in SOCKET_ERROR_KINDS:
            self.socket_errors.labels(kind)
        for level in LIMIT_LEVELS:
            for kind in LIMIT_KINDS:
                self.limit_rejections.labels(level, kind)
        for outcome in FAIL_OPEN_OUTCOMES:
            self.fail_open_decisions.labels(outcome)
        for kind in SNAPSHOT_UPDATE_KINDS:
            self.snapshot_updates.labels(kind)
        for operation in REDIS_OPERATIONS:
            self.redis_errors.labels(operation)
            self.redis_latency.labels(operation)
        for kind in GREENLET_KINDS:
            self.greenlets.labels(kind)
        self.processes.set(1)
        self.build_info.labels(build_version(), platform.python_version()).set(1)

    # -- what the call path calls ---------------------------------------------------------

    def observe_decision(self, result: str, reason: str, seconds: float, detail: str = "") -> None:
        """One decided call. ``detail`` (the reject's detail) names the cause of ENGINE_DEGRADED."""
        result = _bounded(result, _RESULT_SET)
        reason = _bounded(reason, _REASON_SET)
        # labels() takes a lock and builds a key on every call: its child is kept (the label
        # sets are closed lists, so the cache is bounded), ~2 us of each call.
        child = self._decision_children.get((result, reason))
        if child is None:
            child = self._decision_children[(result, reason)] = self.decisions.labels(result, reason)
        child.inc()
        self.decision_seconds.observe(seconds)
        if reason == Reason.ENGINE_DEGRADED.value:
            self.degraded_decisions.labels(degraded_cause(detail)).inc()

    def set_listening(self, listening: bool) -> None:
        self.listening.set(1 if listening else 0)

    def listener_stopped(self) -> None:
        self.listener_stops.inc()
        self.listening.set(0)

    def listener_resumed(self, seconds: float) -> None:
        self.listener_stopped_seconds.inc(seconds)
        self.listening.set(1)

    def socket_error(self, kind: str) -> None:
        self.socket_errors.labels(_bounded(kind, _SOCKET_ERROR_SET)).inc()

    def limit_rejection(self, level: str, kind: str) -> None:
        self.limit_rejections.labels(_bounded(str(level), _LEVEL_SET), _bounded(str(kind), _KIND_SET)).inc()

    def redis_call(self, operation: str) -> _RedisTimer:
        """Time one Redis round trip; a Redis failure (or LimitsUnavailable) also counts an error.

        Usage: ``with metrics.redis_call("limits"): result = limiter.acquire(...)``.
        The exception is re-raised unchanged.
        """
        operation = _bounded(operation, _REDIS_OPERATION_SET)
        children = self._redis_children.get(operation)
        if children is None:
            children = (self.redis_latency.labels(operation), self.redis_errors.labels(operation))
            self._redis_children[operation] = children
        return _RedisTimer(children)

    # -- state sampled before a scrape ----------------------------------------------------

    def set_snapshot(self, *, loaded: bool, version: int, age: float, ready: bool) -> None:
        self.snapshot_version.set(version if loaded else 0)
        self.snapshot_age.set(min(age, 1e9))
        self.ready.set(1 if ready else 0)

    def set_greenlets(self, *, connections: int, background: int) -> None:
        """The greenlet census (a soak watches it stay flat: loadtest/soak.py)."""
        self.greenlets.labels("connection").set(connections)
        self.greenlets.labels("background").set(background)

    def count_snapshot_updates(self, *, full: int, change: int) -> None:
        """Bring callgate_snapshot_updates_total up to the holder's own running counts."""
        for kind, total in (("full", full), ("change", change)):
            seen = self._snapshot_updates_seen.get(kind, 0)
            if total > seen:
                self.snapshot_updates.labels(kind).inc(total - seen)
            self._snapshot_updates_seen[kind] = total

    def before_scrape(self) -> None:
        """Forget processes that died since the last scrape (multiprocess mode)."""
        if self.shared is not None:
            self.shared.reap()

    def close(self) -> None:
        """This process is going away: its live gauges leave the host's sums (counters stay)."""
        if self.shared is not None:
            self.shared.leave()


def _enable_multiprocess(path: str) -> None:
    """Make every metric created from now on in this process write to ``path``."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    current = values.ValueClass
    if getattr(current, "_multiprocess", False) and getattr(current, "_callgate_dir", None) == path:
        return
    value_class = _multiprocess_value_class()
    value_class._callgate_dir = path
    values.ValueClass = value_class


_PID_FILE = re.compile(r"_(\d+)\.db$")


class SharedDirectory:
    """The multiprocess directory of one host's engine processes.

    Each process holds an exclusive flock on ``alive_<pid>.lock`` for its lifetime, so a
    process that died, even by SIGKILL, is recognised (its lock is free) without trusting
    a pid that may have been reused. ``join`` (at start) and ``reap`` (before each scrape)
    call prometheus_client's ``mark_process_dead`` for dead processes: their live gauges
    (active calls, readiness, snapshot age…) leave the sums, while their counters and
    histograms stay, so host totals never go backwards when one process restarts. The
    first process to start when no other is alive wipes the directory: a whole-host
    restart resets the counters, as a single process's restart does.
    """

    JOIN_LOCK = ".join.lock"

    def __init__(self, path: str, pid: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.pid = os.getpid() if pid is None else pid
        self._alive_fd: int | None = None
        self.wiped = False

    def _lock_path(self, pid: int) -> str:
        return os.path.join(self.path, f"alive_{pid}.lock")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.path, self.JOIN_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def join(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        with self._exclusive():
            alive = self._reap_locked()
            if not alive:
                for name in glob.glob(os.path.join(self.path, "*.db")):
                    os.remove(name)
                self.wiped = True
            _mark_process_dead(self.pid, self.path)  # a dead process that had our pid
            fd = os.open(self._lock_path(self.pid), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._alive_fd = fd
        atexit.register(self.leave)

    def leave(self) -> None:
        if self._alive_fd is None:
            return
        with self._exclusive():
            _mark_process_dead(self.pid, self.path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._lock_path(self.pid))
            os.close(self._alive_fd)
            self._alive_fd = None

    def reap(self) -> list[int]:
        """mark_process_dead every process that is gone; returns their pids."""
        with self._exclusive():
            before = self._pids_with_live_files()
            alive = self._reap_locked()
        return sorted(before - alive - {self.pid})

    def live_pids(self) -> set[int]:
        with self._exclusive():
            return self._reap_locked() | ({self.pid} if self._alive_fd is not None else set())

    def _pids_with_live_files(self) -> set[int]:
        return {int(m.group(1)) for m in map(_PID_FILE.search, glob.glob(self._live_pattern())) if m}

    def _live_pattern(self) -> str:
        return os.path.join(self.path, "gauge_live*_*.db")

    def _reap_locked(self) -> set[int]:
        """Pids of the other live processes; the dead ones are marked dead on the way."""
        alive: set[int] = set()
        dead: set[int] = set()
        for name in glob.glob(os.path.join(self.path, "alive_*.lock")):
            pid = int(os.path.basename(name)[len("alive_") : -len(".lock")])
            if pid == self.pid and self._alive_fd is not None:
                continue
            if _lock_held(name):
                alive.add(pid)
            else:
                dead.add(pid)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(name)
        # Files of a process that never took a lock (another tool, an older callgate): ask the kernel.
        for pid in self._pids_with_live_files() - alive - dead - {self.pid}:
            if _pid_running(pid):
                alive.add(pid)
            else:
                dead.add(pid)
        for pid in dead:
            _mark_process_dead(pid, self.path)
        return alive


def _lock_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing releases the probe's lock
    return False


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wsgi_app(
    registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]], before_scrape: Callable[[], None]
) -> WsgiApp:
    """/metrics (Prometheus text, or OpenMetrics when asked), /healthz (process alive),
    /readyz (200 only when this process can decide calls)."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            try:
                before_scrape()
            except Exception:  # a failed refresh must not cost the scrape
                log.exception("refreshing the metrics before a scrape failed")
            encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
            body = encoder(registry)
            start_response("200 OK", [("Content-Type", content_type)])
            return [body]
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"ok\n"]
        if path == "/readyz":
            try:
                ok, detail = ready()
            except Exception as exc:
                ok, detail = False, f"readiness check failed: {exc!r}"
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8")]
            )
            return [detail.encode() + b"\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    return app
