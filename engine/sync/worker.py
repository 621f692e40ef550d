"""`callgate sync`: the live PostgreSQL -> Redis worker (design and failure modes: docs/sync.md).

One loop, in order, on every (re)connection:

1. connect and ``LISTEN callgate_changes`` (from then on no commit goes unnoticed);
2. catch up: in one REPEATABLE READ transaction, read the change-log rows of the
   transactions that the Redis state's pg_snapshot did not see, and the current rows
   of the entities they name; apply them to the current snapshot version in one
   compare-and-set MULTI/EXEC that also moves the state to the new pg_snapshot and
   publishes the change event the engines apply in place. More than
   ``bulk_threshold`` changes (a rate-deck import), a TRUNCATE, a pruned log, a
   missing, flushed or foreign state: publish a whole new snapshot instead (the
   engines switch to it at once);
3. wait for a notification (then catch up at once) or ``check_interval`` (catch up
   anyway: that also notices a flushed Redis); prune the log every
   ``prune_interval``; compare all of Redis with PostgreSQL every ``sweep_interval``.

Only the holder of the leader lease applies (the others keep listening, to take over
at once); the compare-and-set makes a double application impossible even if two
workers believed they led. Engine events (first uses, call records) are persisted by
every worker (engine.sync.persist), in a thread of their own.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import random
import secrets
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis

from engine.billing.alerts import Mailer, SmtpSettings
from engine.billing.metrics import BillingMetrics
from engine.config import Config
from engine.db import ownership
from engine.db.loader import load_catalog, load_entities
from engine.model import ENTITY_TYPES, CatalogData
from engine.state.codec import decode_many, encode_entity, schema
from engine.state.imageblob import clear_building, mark_building
from engine.state.keys import entity_hash_key, meta_key
from engine.state.redisconn import redis_client
from engine.state.snapshot import SchemaMismatch, current_version, entity_key
from engine.sync import pg, publish_data
from engine.sync.cdrs import CdrWriter
from engine.sync.metrics import SyncMetrics, serve_metrics
from engine.sync.persist import EventPersister
from engine.sync.state import LeaderLease, StateMoved, SyncState, apply_batch, read_position, read_state

__all__ = ["CatchUp", "SyncWorker"]

log = logging.getLogger("callgate.sync")

_MAX_WAIT = 0.5  # longest single wait: leadership changes and stop are noticed this fast
_LEASE_POLL = 0.2  # how often a worker without the lease tries to take it
_ATTEMPTS = 3  # compare-and-set conflicts retried at once before giving up for this round
_SWEEP_PENDING_MAX = 100_000  # more changes pending than this: no sweep this time


class CatchUp:
    """What one catch-up did (for logs and tests)."""

    __slots__ = ("applied", "full", "reason", "version")

    def __init__(self, applied: int = 0, full: bool = False, reason: str = "", version: int = 0) -> None:
        self.applied = applied  # entity changes applied one by one
        self.full = full  # a whole snapshot was published instead
        self.reason = reason
        self.version = version  # the snapshot version afterwards

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"CatchUp({fields})"


class SyncWorker:
    def __init__(
        self,
        config: Config,
        *,
        metrics: SyncMetrics | None = None,
        worker_id: str | None = None,
        image_job: Callable[[Config, int], None] | None = None,
        image_fingerprint: str | None = None,
    ) -> None:
        """``image_job(config, version)``: run in a child process (multiprocessing, spawn) after
        each full snapshot this worker publishes, to build and publish its catalogue image
        (``engine.imagejob.produce_in_child``); None = no images. ``image_fingerprint``: the
        code fingerprint of the images it builds (``engine.imagejob.image_fingerprint``): the
        version's image is marked as being built before the child starts, so that the engines
        switching to it wait for the image instead of building the catalogue themselves."""
        self.config = config
        self._image_job = image_job
        self._image_fingerprint = image_fingerprint
        self._image_child: multiprocessing.process.BaseProcess | None = None
        self.settings = config.sync
        self.prefix = config.redis.key_prefix
        # SIP devices are published as a1-hashes for this realm, never with their password.
        self.sip_realm = config.fsxml.domain
        self.metrics = metrics or SyncMetrics()
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.redis = redis_client(config.redis, socket_timeout=30, socket_connect_timeout=5)
        self.lease = LeaderLease(self.redis, self.prefix, self.worker_id, self.settings.lease_seconds)
        self.caught_up = threading.Event()  # set by the first catch-up after each (re)connection
        self.failures = 0
        self._listen: psycopg.Connection | None = None
        self._query: psycopg.Connection | None = None
        self._source = ""
        self._wake = True
        self._next_check = 0.0
        self._next_prune = 0.0
        self._next_sweep = time.monotonic() + self.settings.sweep_interval
        self._sweeping: threading.Thread | None = None
        self._suspects: set[tuple[str, str]] = set()  # found by the sweep, rewritten by the next catch-up
        self._suspects_lock = threading.Lock()
        self._standing_by = False
        self._connected = False  # PostgreSQL connected and no failure since: the lease is held only then
        # (version, token, change count) of the last sync state this worker wrote: a Redis state
        # of that version with fewer changes lost writes (restored from an older backup).
        self._written: tuple[int, str, int] | None = None

    # --- the process -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set: lease keeper and event persister threads, and the sync loop."""
        serve_metrics(self.metrics, self.settings.metrics_host, self.settings.metrics_port)
        helpers = [
            threading.Thread(target=self._keep_lease, args=(stop,), name="sync-lease", daemon=True),
            threading.Thread(target=self._persist_events, args=(stop,), name="sync-events", daemon=True),
            threading.Thread(target=self._write_cdrs, args=(stop,), name="sync-cdrs", daemon=True),
        ]
        for thread in helpers:
            thread.start()
        log.info("sync worker %s started", self.worker_id)
        try:
            self._loop(stop)
        finally:
            stop.set()
            for thread in helpers:
                thread.join(5)
            with contextlib.suppress(redis.RedisError):
                self.lease.release()
            self._stop_image_child()
            self.close()
            self.redis.close()
            log.info("sync worker %s stopped", self.worker_id)

    def _keep_lease(self, stop: threading.Event) -> None:
        """Hold the lease while this worker can sync: one cut off from PostgreSQL lets it go."""
        failures = 0
        while not stop.is_set():
            was = self.lease.held
            try:
                if self._connected:
                    held = self.lease.renew()
                else:
                    if was:
                        log.warning("sync worker %s cannot reach PostgreSQL: lease released", self.worker_id)
                    self.lease.release()
                    held = False
                failures = 0
            except redis.RedisError as exc:
                held = self.lease.held  # keeps counting down locally
                failures += 1
                self.metrics.errors.labels("redis").inc()
                if failures == 1:
                    log.warning("leader lease: Redis unreachable: %r", exc)
            if held and not was:
                log.info("sync worker %s is the leader", self.worker_id)
                self._wake = True
            elif was and not held:
                log.warning("sync worker %s lost the leader lease", self.worker_id)
            elif not held and failures == 0 and self._connected and not self._standing_by:
                holder, _ = self.lease.holder()
                log.info("sync worker %s stands by (leader: %s)", self.worker_id, holder)
            self._standing_by = not held and self._connected
            self.metrics.leader.set(1 if held else 0)
            # the holder renews at a third of the lease; the others try often, to take over at once
            stop.wait(self.lease.lease_ms / 1000 / 3 if held and failures == 0 else _LEASE_POLL)

    def _write_cdrs(self, stop: threading.Event) -> None:
        """CDRs, call debits and balances (engine.sync.cdrs), and the low-balance mailer after each batch."""
        client = redis_client(self.config.redis, socket_timeout=30, socket_connect_timeout=5)
        metrics = BillingMetrics(self.metrics.registry)
        smtp = SmtpSettings.from_config(self.config.smtp)  # [smtp], CALLGATE_SMTP_* overrides
        mailer = Mailer(smtp, metrics=metrics) if smtp is not None else None
        writer = CdrWriter(
            client,
            self.prefix,
            lambda: psycopg.connect(
                self.config.database.url,
                connect_timeout=max(1, int(self.config.database.connect_timeout)),
                application_name="callgate-sync-cdrs",
            ),
            self.worker_id,
            metrics=metrics,
            after_commit=mailer.send_pending if mailer is not None else None,
            backoff_max=self.settings.reconnect_max_delay,
        )
        try:
            writer.run(stop)
        finally:
            client.close()

    def _persist_events(self, stop: threading.Event) -> None:
        client = redis_client(self.config.redis, socket_timeout=30, socket_connect_timeout=5)
        persister = EventPersister(
            client,
            self.prefix,
            lambda: psycopg.connect(
                self.config.database.url,
                connect_timeout=max(1, int(self.config.database.connect_timeout)),
                application_name="callgate-sync-events",
            ),
            self.worker_id,
            batch=self.settings.events_batch,
            metrics=self.metrics,
            backoff_max=self.settings.reconnect_max_delay,
        )
        try:
            persister.run(stop)
        finally:
            client.close()

    # --- the loop --------------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.connect()
                self._connected = True
                self._wake = True
                while not stop.is_set():
                    if self.lease.held:
                        self._leader_round()
                    self._wait(stop)
            except Exception as exc:  # the loop must survive anything
                self._connected = False
                self.close()
                self.caught_up.clear()
                stop.wait(self._failed(exc))

    def _leader_round(self) -> None:
        now = time.monotonic()
        if self._wake or now >= self._next_check:
            self._wake = False
            result = self.catch_up()
            self._next_check = time.monotonic() + self.settings.check_interval
            if not self.caught_up.is_set():
                log.info("caught up: %s", result)
                self.caught_up.set()
            if self.failures:
                log.info("sync recovered after %d failures", self.failures)
                self.failures = 0
        if self.settings.prune_interval > 0 and now >= self._next_prune:
            self._next_prune = now + self.settings.prune_interval
            self.prune()
        if self.settings.sweep_interval > 0 and now >= self._next_sweep:
            self._next_sweep = now + self.settings.sweep_interval
            if self._sweeping is None or not self._sweeping.is_alive():
                self._sweeping = threading.Thread(target=self._sweep_quietly, name="sync-sweep", daemon=True)
                self._sweeping.start()

    def _sweep_quietly(self) -> None:
        try:
            self.sweep()
        except Exception as exc:  # the next sweep tries again
            self.metrics.errors.labels("sweep").inc()
            log.warning("sweep failed: %r", exc, exc_info=True)

    def connect(self) -> None:
        url, timeout = self.config.database.url, self.config.database.connect_timeout
        self.close()
        self._listen = pg.connect(url, timeout=timeout, autocommit=True)
        pg.listen(self._listen)  # first LISTEN, then catch up: nothing committed after this is missed
        self._query = pg.connect(url, timeout=timeout, autocommit=False)
        self._source = pg.source_identity(self._listen)
        log.info("listening for changes on %s", self._source)

    def close(self) -> None:
        for conn in (self._listen, self._query):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    log.debug("closing a PostgreSQL connection failed", exc_info=True)
        self._listen = self._query = None

    def _wait(self, stop: threading.Event) -> None:
        """Block until a notification, the next check, or _MAX_WAIT; drain a burst at once."""
        assert self._listen is not None
        timeout = _MAX_WAIT
        if self.lease.held and not self._wake:
            timeout = min(_MAX_WAIT, max(0.0, self._next_check - time.monotonic()))
        if self._wake and self.lease.held:
            timeout = 0.0
        woke = False
        for _ in self._listen.notifies(timeout=timeout, stop_after=1):
            woke = True
        if woke:
            for _ in self._listen.notifies(timeout=0):
                pass
            self._wake = True

    def _failed(self, exc: Exception) -> float:
        self.failures += 1
        kind = (
            "postgres"
            if isinstance(exc, psycopg.Error)
            else "redis"
            if isinstance(exc, (redis.RedisError, OSError))
            else "apply"
        )
        self.metrics.errors.labels(kind).inc()
        if self.failures == 1:
            log.warning("sync failed (%s), reconnecting: %r", kind, exc, exc_info=kind == "apply")
        else:
            log.debug("sync failed again (%d): %r", self.failures, exc)
        delay: float = min(self.settings.reconnect_max_delay, 0.1 * 2.0 ** min(self.failures - 1, 10))
        return delay * random.uniform(0.8, 1.2)

    # --- catching up -----------------------------------------------------------------------

    def catch_up(self) -> CatchUp:
        """Apply everything committed since the Redis state (or publish anew); see the module docstring."""
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                with self.metrics.catch_up_seconds.time():
                    return self._catch_up_once()
            except StateMoved as exc:  # another writer moved the state: recompute from it
                self.metrics.errors.labels("conflict").inc()
                log.info("sync state moved meanwhile (attempt %d): %s", attempt, exc)
            except SchemaMismatch as exc:  # written by a version with other fields (an upgrade)
                log.info("the current snapshot has other fields (%s): publishing anew", exc)
                return self.full_resync("schema")
        raise StateMoved(f"the sync state kept moving ({_ATTEMPTS} attempts)")

    def _catch_up_once(self) -> CatchUp:
        with self._suspects_lock:
            suspects = set(self._suspects)
        state, reason = self._usable_state()
        conn = self._query
        assert conn is not None
        full_data: CatalogData | None = None
        changes: list[pg.LoggedChange] = []
        found: dict[str, dict[str, Any]] = {}
        keys: dict[str, set[str]] = defaultdict(set)
        with pg.snapshot_transaction(conn, state.pg_snapshot if state else None) as (snap, pruned):
            if pruned:
                reason = "log_pruned"
            if state is not None and not reason:
                changes = pg.changes_since(conn, state.pg_snapshot, self.settings.bulk_threshold + 1)
                if len(changes) > self.settings.bulk_threshold:
                    reason = "bulk"
                elif any(change.key == "*" for change in changes):
                    reason = "whole_table"
                elif ({c.entity for c in changes} | {n for n, _ in suspects}) & ownership.CHECKED_ENTITIES:
                    reason = "identification"  # the ownership rule looks at the whole table
            if reason:
                full_data = load_catalog(conn, self.sip_realm)
            elif changes or suspects:
                for change in changes:
                    if change.entity in ENTITY_TYPES:
                        keys[change.entity].add(change.key)
                    else:
                        log.warning("change log names an unknown entity %r: ignored", change.entity)
                for name, key in suspects:
                    keys[name].add(key)
                found = {
                    name: load_entities(conn, name, sorted(k), self.sip_realm) for name, k in keys.items()
                }
        if full_data is not None:
            result = self._publish(full_data, snap, reason, changes)
            self._forget_suspects(suspects)
            return result
        assert state is not None
        if not changes and not suspects and snap == state.pg_snapshot:
            return CatchUp(version=state.version)
        upserts = [obj for by_key in found.values() for obj in by_key.values()]
        deletes = [(name, key) for name, by_key in found.items() for key in keys[name] if key not in by_key]
        newest = max(changes, key=lambda c: c.at, default=None)
        new_state = apply_batch(
            self.redis,
            self.prefix,
            state,
            pg_snapshot=snap,
            upserts=upserts,
            deletes=deletes,
            change_version=max((c.version for c in changes), default=0),
            change_at_ms=0 if newest is None else int(newest.at.timestamp() * 1000),
            journal_maxlen=self.settings.journal_maxlen,
        )
        self._written = (new_state.version, new_state.token, new_state.changes)
        self._forget_suspects(suspects)
        self._observe(changes, new_state)
        for name, names_keys in keys.items():
            self.metrics.changes_applied.labels(name).inc(len(names_keys))
        if changes:
            log.debug(
                "applied %d changes (%d entities) to version %d",
                len(changes),
                len(upserts) + len(deletes),
                new_state.version,
            )
        return CatchUp(applied=len(upserts) + len(deletes), version=new_state.version)

    def _forget_suspects(self, done: set[tuple[str, str]]) -> None:
        if done:
            with self._suspects_lock:
                self._suspects -= done

    def _usable_state(self) -> tuple[SyncState | None, str]:
        """The Redis sync state if a catch-up can start from it, else (None or it, why not)."""
        state, version, token = read_position(self.redis, self.prefix)
        if version is None:
            return None, "no_snapshot"
        if state is None:
            return None, "no_state"
        if state.version != version or state.token != token:
            return None, "other_version"
        if state.source != self._source:
            return None, "other_database"
        if state.sip_realm != self.sip_realm:
            return None, "sip_realm"  # every device's a1-hash changes: a whole new snapshot
        written = self._written
        if written is not None and written[:2] == (state.version, state.token) and state.changes < written[2]:
            # Redis lost writes this worker made (restored from an older backup). Catching up from
            # it would count changes again from a lower number: an engine holding the lost ones
            # could meet its own count again and keep them. A new version makes every engine load.
            log.warning(
                "sync state of version %d went back from %d to %d changes (Redis restored?): publishing anew",
                state.version,
                written[2],
                state.changes,
            )
            return state, "went_back"  # (a log pruned past it says log_pruned instead)
        return state, ""

    def full_resync(self, reason: str = "requested") -> CatchUp:
        """Publish a whole new snapshot from one PostgreSQL snapshot and record it."""
        assert self._query is not None
        with pg.snapshot_transaction(self._query) as (snap, _):
            data = load_catalog(self._query, self.sip_realm)
        return self._publish(data, snap, reason, [])

    def _publish(self, data: CatalogData, snap: str, reason: str, changes: list[pg.LoggedChange]) -> CatchUp:
        started = time.monotonic()
        data, dropped = ownership.enforce(data, log)  # cross-tenant claims never reach the engines
        self.metrics.errors.labels("ownership").inc(dropped)
        version, state = publish_data(
            self.redis, self.prefix, data, pg_snapshot=snap, source=self._source, sip_realm=self.sip_realm
        )
        if state is None:
            raise StateMoved(f"version {version} was superseded right after its publish")
        self._written = (state.version, state.token, state.changes)
        self.metrics.full_resyncs.labels(reason).inc()
        self._observe(changes, state)
        self._start_image_child(version, state.token)
        log.info(
            "full snapshot %d published (%s): %d entities in %.2fs",
            version,
            reason,
            sum(len(getattr(data, name)) for name in ENTITY_TYPES),
            time.monotonic() - started,
        )
        return CatchUp(full=True, reason=reason, version=version)

    def _start_image_child(self, version: int, token: str | None = None) -> None:
        """Build and publish ``version``'s catalogue image in a child process (``image_job``).

        One child at a time: a child still building an older version is stopped (its version
        is no longer current: its image would not be used). A child that fails only logs:
        engines then load rows, as without images. The version's image is marked as being built
        first (the child takes a second or two to start; then it renews and removes the mark):
        the engines that see the new version wait for its image (``engine.snapshot_image_wait``).
        """
        if self._image_job is None:
            return
        self._stop_image_child()
        if self._image_fingerprint is not None:
            try:
                mark_building(
                    self.redis, self.prefix, version, token, self._image_fingerprint, by=self.worker_id
                )
            except redis.RedisError:  # the engines then build from rows: slower, not wrong
                log.warning("could not mark the image of version %d as being built", version, exc_info=True)
        child = multiprocessing.get_context("spawn").Process(
            target=self._image_job, args=(self.config, version), name=f"callgate-image-{version}", daemon=True
        )
        try:
            child.start()
        except OSError:
            log.warning("could not start the image builder of version %d", version, exc_info=True)
            if self._image_fingerprint is not None:
                with contextlib.suppress(redis.RedisError):
                    clear_building(self.redis, self.prefix, version, self._image_fingerprint)
            return
        self._image_child = child
        log.info("building the catalogue image of version %d (child process %s)", version, child.pid)

    def _stop_image_child(self) -> None:
        child, self._image_child = self._image_child, None
        if child is None:
            return
        if child.is_alive():
            child.terminate()
        child.join(5)

    def _observe(self, changes: list[pg.LoggedChange], state: SyncState) -> None:
        now = datetime.now(UTC)
        for change in changes:
            self.metrics.lag.observe(max(0.0, (now - change.at).total_seconds()))
        self.metrics.snapshot_version.set(state.version)
        self.metrics.applied_change_version.set(state.change_version)
        self.metrics.last_apply.set(time.time())

    # --- housekeeping ----------------------------------------------------------------------

    def prune(self) -> int:
        state = read_state(self.redis, self.prefix)
        if state is None or state.source != self._source or self._listen is None:
            return 0
        deleted = pg.prune(self._listen, state.pg_snapshot, self.settings.changelog_retention)
        if deleted:
            log.info("change log: pruned %d applied changes", deleted)
        return deleted

    def sweep(self) -> int:
        """Compare every entity in Redis with PostgreSQL; queue the ones that differ for repair.

        Runs beside the catch-ups (its own PostgreSQL connection; the loop runs it in a
        thread): it reads the Redis version first, then one PostgreSQL snapshot, and
        leaves out the entities changed since the Redis state's pg_snapshot (the catch-up
        owns those). What still differs is drift: its keys are handed to the next
        catch-up, which re-reads them and rewrites them through the usual compare-and-set.
        Returns the number of entities found different (0 when the comparison could not
        be made this time: another version, a bulk change on its way).
        """
        state, reason = self._usable_state()
        if state is None or reason:
            return 0
        started = time.monotonic()
        stored = _read_version(self.redis, self.prefix, state.version)
        if stored is None:
            return 0
        with (
            pg.connect(
                self.config.database.url,
                timeout=self.config.database.connect_timeout,
                autocommit=False,
                name="callgate-sync-sweep",
            ) as conn,
            pg.snapshot_transaction(conn),
        ):
            pending = pg.changes_since(conn, state.pg_snapshot, _SWEEP_PENDING_MAX + 1)
            if len(pending) > _SWEEP_PENDING_MAX or any(c.key == "*" for c in pending):
                return 0  # a bulk change is on its way: a whole snapshot follows anyway
            data, _ = ownership.drop_conflicts(load_catalog(conn, self.sip_realm))  # as published
        skip = {(c.entity, c.key) for c in pending}
        suspects = _differences(stored, data, skip)
        del stored, data
        elapsed = time.monotonic() - started
        if not suspects:
            log.info("sweep: Redis matches PostgreSQL (%.2fs)", elapsed)
            return 0
        with self._suspects_lock:
            self._suspects |= suspects
        self._wake = True
        self.metrics.drift_repaired.inc(len(suspects))
        log.warning(
            "sweep: %d entities differed from PostgreSQL, rewriting them (%.2fs), e.g. %s",
            len(suspects),
            elapsed,
            sorted(suspects)[:5],
        )
        return len(suspects)


def _read_version(client: redis.Redis, prefix: str, version: int) -> dict[str, dict[str, Any]] | None:
    """Every entity of ``version`` as stored: name -> key -> encoded value, or decoded entities
    when the version was written with other field lists. None if it is not current (any more)."""
    meta = {_text(k): _text(v) for k, v in client.hgetall(meta_key(prefix, version)).items()}
    if not meta:
        return None
    found: dict[str, dict[str, Any]] = {}
    for name, cls in ENTITY_TYPES.items():
        values = {
            _text(k): v for k, v in client.hscan_iter(entity_hash_key(prefix, version, name), count=10_000)
        }
        written = meta.get(f"schema:{name}")
        if written and written != ",".join(schema(cls)):
            decoded = decode_many(cls, list(values.values()), tuple(written.split(","))) if values else []
            values = {entity_key(obj): obj for obj in decoded}
        found[name] = values
    return found if current_version(client, prefix) == version else None


def _differences(
    stored: dict[str, dict[str, Any]], data: CatalogData, skip: set[tuple[str, str]]
) -> set[tuple[str, str]]:
    """(entity, key) of every entity whose Redis value is not PostgreSQL's, apart from ``skip``."""
    found: set[tuple[str, str]] = set()
    for name in ENTITY_TYPES:
        held = stored[name]
        truth = {entity_key(obj): obj for obj in getattr(data, name)}
        for key, obj in truth.items():
            value = held.get(key)
            same = (
                value == obj if value is None or not isinstance(value, bytes) else value == encode_entity(obj)
            )
            if not same and (name, key) not in skip:
                found.add((name, key))
        found |= {(name, key) for key in held.keys() - truth.keys() if (name, key) not in skip}
    return found


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
