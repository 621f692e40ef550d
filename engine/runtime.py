"""`callgate serve`: wire configuration, snapshot, rules, socket server and metrics together.

The caller must have monkey-patched with gevent before importing this module.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime

import gevent
import gevent.event
import gevent.pool
import redis
from gevent.pywsgi import WSGIServer

import engine.model
import engine.rules
from engine import gcpolicy
from engine.billing.funds import Funds
from engine.billing.live import LiveBilling
from engine.billing.settler import Settler
from engine.billing.ticket import ticket_keys
from engine.call.driver import CallHandler, CallRecord
from engine.config import Config, rules_config
from engine.decider import Decider, snapshot_distrust
from engine.decision import Accept
from engine.esl.server import LISTEN_BACKLOG, CallServer, listening_socket, parse_networks
from engine.limits_runtime import (
    ReleaseBatcher,
    build_limiter,
    limit_result_observer,
    recounter_for,
    run_reconciler,
    run_resync,
    switch_addresses,
)
from engine.logs import Every, setup_logging
from engine.metrics import EngineMetrics, wsgi_app
from engine.rules.catalog import RECORD_TYPES, Catalog
from engine.rules.gate import first_uses
from engine.rules.packed import set_entity_cache
from engine.rules.text import show
from engine.state.direct import DirectConnections
from engine.state.events import EventPublisher
from engine.state.image import ImageStore, code_fingerprint
from engine.state.limits import FailOpenLimiter
from engine.state.redisconn import describe, redis_client
from engine.state.snapshot import SnapshotUnavailable
from engine.state.watcher import SnapshotHolder

log = logging.getLogger("callgate.serve")

REFUSED_LOG_INTERVAL = 10.0  # at most one log line this often about refused connections
DRAIN_SECONDS = 2.0  # on SIGTERM, calls still being decided get this long to finish
METRICS_REFRESH_SECONDS = 1.0  # multiprocess mode: how often each process refreshes its gauges
SNAPSHOT_READ_TIMEOUT = 30.0  # seconds one bulk round trip of a snapshot read may take


class RefusalLog:
    """Logs refused connections at most once per ``interval`` seconds, with the count since
    (a scan or a misconfigured switch must not flood the log)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._every = Every(interval, clock)

    def note(self, source: str) -> bool:
        """Count one refusal; True when it was logged."""
        held = self._every.due()
        if held is None:
            return False
        more = f" (and {held} more refused since the last report)" if held else ""
        log.warning("refused a connection from %s: not in engine.allowed_networks%s", show(source, 64), more)
        return True


class Engine:
    """One engine process: everything `serve` starts, reachable for tests and health checks."""

    def __init__(self, config: Config, listener: socket.socket) -> None:
        self.config = config
        # First, before any other metric object exists: multiprocess mode is process-wide.
        self.metrics = EngineMetrics(multiprocess_dir=config.metrics.multiprocess_dir)
        self.metrics_server: WSGIServer | None = None
        rules = rules_config(config.rules)
        # A bounded pool: greenlets beyond max_connections wait for a connection (within the
        # decision deadline) instead of failing with "Too many connections".
        # With [redis] sentinels, connections ask the sentinels for the primary (engine.state.redisconn).
        self.redis = redis_client(
            config.redis,
            socket_timeout=config.redis.socket_timeout,
            max_connections=config.redis.max_connections,
            blocking_timeout=config.engine.decision_deadline,
        )
        pool = self.redis.connection_pool
        log.info("Redis: %s", describe(config.redis))
        # The snapshot is read in bulk (HSCAN pages of thousands of rows per hash): on its own
        # connections with a bulk timeout. With the hot path's per-round-trip deadline a busy
        # host's 1M-row read timed out, so the first load failed and was retried over and over.
        self.snapshot_redis = redis_client(
            config.redis,
            socket_timeout=max(config.redis.socket_timeout, SNAPSHOT_READ_TIMEOUT),
            socket_connect_timeout=config.redis.socket_timeout,
        )
        set_entity_cache(config.engine.entity_cache)  # before any catalogue is built or mapped
        # Catalogue images: mapped from the image directory (when set), else fetched from the
        # image the sync worker published in Redis (engine.state.imageblob), else built from rows.
        images = ImageStore(
            config.engine.snapshot_image_dir or None,
            config.redis.key_prefix,
            code_fingerprint([engine.model, engine.rules]),
        )
        self.snapshots: SnapshotHolder[Catalog] = SnapshotHolder(
            self.snapshot_redis,
            config.redis.key_prefix,
            Catalog.build,
            images=images,
            image_blobs=config.engine.snapshot_image_fetch,
            records=RECORD_TYPES,
            image_wait=config.engine.snapshot_image_wait,
        )
        # The per-call limits script skips redis-py's pool and wrappers (engine.state.direct).
        self.direct_redis = DirectConnections.like(
            pool, size=config.redis.max_connections, checkout_timeout=config.engine.decision_deadline
        )
        self.limiter = build_limiter(config, self.redis, self.metrics, self.direct_redis)
        self.switches = switch_addresses(config.limits)
        # Engine -> PostgreSQL events (first use of an account) leave through a Redis stream,
        # queued without blocking the call; the sync worker persists them.
        self.events = EventPublisher(
            self.redis,
            config.redis.key_prefix,
            maxlen=config.sync.events_maxlen,
            registry=None if self.metrics.multiprocess else self.metrics.registry,
        )
        # Call ends only queue their release; one greenlet releases them in pipelined batches.
        self.releases = ReleaseBatcher(self.limiter)
        # Accounting (docs/accounting.md): funds reserved with the limits, settled at hangup in batches.
        self.funds = Funds(
            self.redis,
            config.redis.key_prefix,
            margin_seconds=config.limits.margin_seconds,
            direct=self.direct_redis,  # the settler's batches, on the engine's hub
        )
        self.settler = Settler(
            self.funds, registry=None if self.metrics.multiprocess else self.metrics.registry
        )
        self.billing = LiveBilling(self.settler, lambda: self.snapshots.current[1], rules.sip_response)
        decider = Decider(
            self.snapshots,
            rules,
            max_age=config.engine.snapshot_max_age,
            switch_max_age=config.engine.snapshot_switch_max_age,
            limiter=self.limiter,
            on_limit_result=limit_result_observer(self.metrics),
            on_accept=self._record_first_uses,
            release_later=self.releases.release,  # an acquire that timed out may have taken slots
            funds=self.funds,
        )
        handler = CallHandler(
            config,
            decider,
            self.metrics,
            rules,
            on_end=self._release_call,
            on_bill=self._bill_call,
        )
        self.refusals = RefusalLog(REFUSED_LOG_INTERVAL)
        self.server = CallServer(
            listener,
            handler,
            max_frame_bytes=config.engine.max_frame_bytes,
            allowed=parse_networks(config.engine.allowed_networks),
            on_refused=self._refused,
            count_accept_queue=config.engine.shed_accept_queue,
        )
        handler.attach_listener(self.server)  # stops listening while saturated (engine.shedding)
        self._listener = listener
        # Every background task of the process runs in this group: its size is the
        # callgate_greenlets{kind="background"} gauge, counted without walking the heap.
        self.tasks = gevent.pool.Group()
        self.stopping = gevent.event.Event()
        # Set after the drain, not with `stopping`: calls ending during the drain are still released promptly.
        self._releases_stop = gevent.event.Event()

    def _release_call(self, record: CallRecord) -> None:
        if record.request is not None:
            self.releases.release(record.request.uuid)

    def _bill_call(self, record: CallRecord, may_hold_funds: bool) -> None:
        self.billing.bill(record.request, record.decision, record.hangup, may_hold_funds=may_hold_funds)

    def _refused(self, peer: tuple[object, ...]) -> None:
        """A connection from outside engine.allowed_networks, closed at accept."""
        self.metrics.socket_error("refused")
        self.refusals.note(str(peer[0]) if peer else "-")

    def _record_first_uses(self, accept: Accept, catalog: Catalog, now: datetime) -> None:
        self.events.first_uses(first_uses(accept, catalog, now))

    def _can_decide(self) -> tuple[bool, str]:
        """Snapshot loaded and confirmed recently (no I/O)."""
        engine = self.config.engine
        distrust = snapshot_distrust(self.snapshots, engine.snapshot_max_age, engine.snapshot_switch_max_age)
        if distrust is not None:
            return False, distrust
        return True, f"snapshot {self.snapshots.current[0]}"

    def ready(self) -> tuple[bool, str]:
        """/readyz: this process can decide calls (snapshot loaded and confirmed, Redis answers)."""
        ok, detail = self._can_decide()
        if not ok:
            return False, f"not ready: {detail} (pid {os.getpid()})"
        try:
            with self.metrics.redis_call("ping"):
                self.redis.ping()
        except (redis.RedisError, OSError) as exc:
            return False, f"not ready: Redis unreachable: {exc} (pid {os.getpid()})"
        return True, f"ready: {detail}, Redis reachable (pid {os.getpid()})"

    def _before_scrape(self) -> None:
        loaded = self.snapshots.loaded
        self.metrics.set_snapshot(
            loaded=loaded,
            version=self.snapshots.current[0] if loaded else 0,
            age=self.snapshots.confirmed_age(),
            ready=self._can_decide()[0],
        )
        self.metrics.count_snapshot_updates(
            full=self.snapshots.full_loads, change=self.snapshots.changes_applied
        )
        self.metrics.set_greenlets(connections=self.server.connections, background=len(self.tasks))

    def _scrape(self) -> None:
        self.metrics.before_scrape()
        self._before_scrape()

    def _refresh_metrics(self) -> None:
        """Multiprocess mode: a scrape reads every process's files, so each keeps its gauges fresh."""
        while not self.stopping.wait(METRICS_REFRESH_SECONDS):
            try:
                self._before_scrape()
            except Exception:
                log.exception("refreshing the metrics failed")

    def start_metrics(self) -> None:
        """Gauges, then the /metrics, /healthz, /readyz endpoint (shared port in multiprocess mode)."""
        self._before_scrape()
        if self.metrics.multiprocess:
            self.tasks.spawn(self._refresh_metrics)
        settings = self.config.metrics
        if not settings.listen_port:
            return
        try:
            listener = listening_socket(
                settings.listen_host, settings.listen_port, reuse_port=self.metrics.multiprocess
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and not self.metrics.multiprocess:
                log.error(
                    "metrics port %s:%s is in use; several engine processes on one host need "
                    "metrics.multiprocess_dir (shared metrics port) or metrics.listen_port = 0",
                    settings.listen_host,
                    settings.listen_port,
                )
            raise
        app = wsgi_app(self.metrics.registry, self.ready, self._scrape)
        self.metrics_server = WSGIServer(listener, app, log=None)
        self.metrics_server.start()
        log.info("metrics on http://%s:%s/metrics", *listener.getsockname()[:2])

    def load_initial_snapshot(self) -> None:
        try:
            self.snapshots.refresh()
        except SnapshotUnavailable:
            log.warning("no snapshot in Redis yet (run `callgate sync --once`); calls answer ENGINE_DEGRADED")
        except redis.RedisError as exc:
            log.warning("Redis unreachable at start (%s); calls answer ENGINE_DEGRADED until it is back", exc)

    def start(self) -> None:
        """Load the snapshot, start the background tasks, then accept calls.

        The listener may be bound but not yet listening (``serve`` does that): it starts
        listening only here, after the initial load, so while a big snapshot loads the
        kernel refuses FreeSWITCH's connections (or, with SO_REUSEPORT, hands them to the
        host's other engine processes) instead of queueing calls nobody can decide yet.
        If the load fails (no snapshot, Redis down), the engine listens anyway and answers
        ENGINE_DEGRADED at once until a snapshot arrives.
        """
        self.load_initial_snapshot()
        self._start_gc_policy()
        self.tasks.spawn(self.snapshots.run, self.stopping, self.config.engine.snapshot_poll_interval)
        if isinstance(self.limiter, FailOpenLimiter):
            self.tasks.spawn(run_resync, self.limiter, self.stopping)
        if self.switches:
            interval = self.config.limits.reconcile_interval
            self.tasks.spawn(
                run_reconciler, self.limiter, self.switches, interval, self.metrics, self.stopping,
                self.funds.release_calls,  # the reservations of the calls released
                self.funds.reserved_calls,  # and of calls neither live nor counted
                recounter_for(self.limiter, self.funds, ticket_keys(self.config.billing.ticket_keys)),
            )  # fmt: skip
        self._events_task = self.tasks.spawn(self.events.run, self.stopping)
        self.tasks.spawn(self.releases.run, self._releases_stop)
        self._settler_task = self.tasks.spawn(self.settler.run, self._releases_stop)
        self._listener.listen(LISTEN_BACKLOG)  # a no-op but for the backlog if already listening
        self.server.start()
        self.metrics.set_listening(True)
        self.start_metrics()

    def _start_gc_policy(self) -> None:
        settings = self.config.engine
        gcpolicy.apply(settings.gc_young_threshold, settings.gc_middle_threshold)
        if settings.gc_young_threshold > 0:
            self.tasks.spawn(gcpolicy.run_full_collections, settings.gc_full_interval, self.stopping)
            if settings.gc_young_interval > 0:
                self.tasks.spawn(gcpolicy.run_young_collections, settings.gc_young_interval, self.stopping)

    def stop(self) -> None:
        self.stopping.set()
        self.server.stop(timeout=DRAIN_SECONDS)
        self._releases_stop.set()
        self.releases.flush()  # the releases still queued: none is lost at shutdown
        self._settler_task.join(timeout=5.0)  # settles what is queued (one attempt), then returns
        self._events_task.join(timeout=1.0)  # one last flush of queued events
        self.redis.close()
        self.snapshot_redis.close()
        self.direct_redis.close()


def warn_about_settings(config: Config) -> None:
    """Settings that work but are known to fail some calls on a real switch."""
    if config.rules.local_domain.startswith("${"):
        log.warning(
            "rules.local_domain is %s: FreeSWITCH expands it per call, and calls without it (from a "
            "carrier to a DID that rings a SIP device) fail with 480; set the directory domain",
            config.rules.local_domain,
        )
    if not config.engine.allowed_networks:
        log.info("engine.allowed_networks is empty: any source may connect; firewall the engine port")
    from engine.billing.ticket import log_ticket_signing

    log_ticket_signing(log, config.billing.ticket_keys, "the engine writes")


def raise_file_limit() -> None:
    """Every call up holds a socket: take the hard limit of file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def bound_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """The call listener bound to its address but not listening yet (see :meth:`Engine.start`).

    Until ``listen()`` the kernel refuses connections to it (RST), and with SO_REUSEPORT
    it is not in the group the kernel spreads connections over.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def serve(config: Config, host: str | None = None, port: int | None = None) -> int:
    setup_logging(config.logging)
    raise_file_limit()
    settings = config.engine
    # Bound now (a taken port fails at once), listening only once the snapshot is loaded.
    listener = bound_socket(
        host or settings.listen_host, port or settings.listen_port, reuse_port=settings.reuse_port
    )
    warn_about_settings(config)
    engine = Engine(config, listener)
    engine.start()
    log.info("callgate listening on %s:%s", *listener.getsockname()[:2])
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, engine.stopping.set)
    engine.stopping.wait()
    log.info("stopping: no new calls accepted")
    engine.stop()
    return 0
