"""Engine events -> PostgreSQL: the sync worker's consumer of the ``{prefix}events`` stream.

Every worker (leader or not) reads the stream in the consumer group ``callgate-sync``,
so each entry goes to one worker; entries a crashed worker had taken are claimed by
another after ``CLAIM_IDLE_MS``. A batch is written in one transaction and only then
acknowledged, and every write is idempotent, so a batch written twice (a crash between
commit and XACK) changes nothing:

* ``first_use``: sets ``accounts.first_used`` (and ``expiry`` when the account's
  validity starts at first use) only while ``first_used`` is still NULL: the first
  event persisted wins. The update flows back to the engines through the live sync,
  which stops them reporting it.
* ``call_record``: one ``call_records`` row per call UUID (``ON CONFLICT DO NOTHING``).

An entry that cannot be read is logged, counted (``callgate_sync_errors_total{kind="events"}``)
and acknowledged, so it never blocks the stream.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, cast

import psycopg
import redis
from psycopg.types.json import Jsonb

from engine.state.keys import events_stream
from engine.sync.metrics import SyncMetrics
from engine.sync.streams import claim_stale, ensure_group

log = logging.getLogger("callgate.sync.events")

GROUP = "callgate-sync"
CLAIM_IDLE_MS = 60_000
_CLAIM_EVERY = 30.0


class BadEvent(ValueError):
    pass


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise BadEvent(f"time without a zone: {text!r}")
    return moment


def parse_event(fields: dict[Any, Any]) -> tuple[str, tuple[Any, ...]]:
    """(type, SQL parameters) of one stream entry; BadEvent if it cannot be persisted."""
    values = {_str(k): _str(v) for k, v in fields.items()}
    kind = values.get("type", "")
    try:
        if kind == "first_use":
            expiry = values.get("expiry") or None
            return kind, (
                _when(values["first_used"]),
                None if expiry is None else _when(expiry),
                int(values["account_id"]),
            )
        if kind == "call_record":
            data = json.loads(values.get("data") or "{}")
            if not isinstance(data, dict) or not values.get("uuid"):
                raise BadEvent("a call record needs a uuid and a JSON object")
            account = values.get("account_id") or None
            return kind, (
                values["uuid"],
                None if account is None else int(account),
                _when(values["at"]),
                Jsonb(data),
            )
    except (KeyError, ValueError) as exc:
        raise BadEvent(f"{kind}: {exc!r}") from exc
    raise BadEvent(f"unknown event type {kind!r}")


_SQL = {
    "first_use": "UPDATE accounts SET first_used = %s, expiry = coalesce(%s, expiry)"
    " WHERE id = %s AND first_used IS NULL",
    "call_record": "INSERT INTO call_records (uuid, account_id, recorded_at, data) VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (uuid) DO NOTHING",
}


class EventPersister:
    """Reads the events stream in the consumer group and writes PostgreSQL (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        connect: Callable[[], psycopg.Connection],
        consumer: str,
        *,
        batch: int = 500,
        metrics: SyncMetrics | None = None,
        backoff_max: float = 10.0,
    ) -> None:
        self._client = client
        self._stream = events_stream(prefix)
        self._connect = connect
        self._consumer = consumer
        self._batch = batch
        self._metrics = metrics
        self._backoff_max = backoff_max
        self._conn: psycopg.Connection | None = None
        self._group_ready = False
        self._next_claim = 0.0
        self.failures = 0

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Persist events until ``stop`` is set. Never raises."""
        while not stop.is_set():
            try:
                self.process_once(block_ms)
                if self.failures:
                    log.info("events: persisting again after %d failures", self.failures)
                    self.failures = 0
            except Exception as exc:  # the loop must survive anything
                self.failures += 1
                self._count_error()
                if self.failures == 1:
                    log.warning("events: persisting failed: %r", exc, exc_info=True)
                self._close()
                stop.wait(
                    min(self._backoff_max, 0.1 * 2 ** min(self.failures, 10)) * random.uniform(0.8, 1.2)
                )
        self._close()

    def process_once(self, block_ms: int = 0) -> int:
        """Claim stale entries, read new ones (blocking up to ``block_ms``), persist, ack; the count."""
        self._ensure_group()
        entries = self._claim_stale()
        if not entries:
            entries = self._read(block_ms)
        if not entries:
            return 0
        self._persist(entries)
        self._client.xack(self._stream, GROUP, *[entry_id for entry_id, _ in entries])
        return len(entries)

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        ensure_group(self._client, self._stream, GROUP)
        self._group_ready = True

    def _claim_stale(self) -> list[tuple[Any, dict[Any, Any]]]:
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + _CLAIM_EVERY
        return claim_stale(
            self._client, self._stream, GROUP, self._consumer, min_idle_ms=CLAIM_IDLE_MS, count=self._batch
        )

    def _read(self, block_ms: int) -> list[tuple[Any, dict[Any, Any]]]:
        try:
            reply = self._client.xreadgroup(
                GROUP, self._consumer, {self._stream: ">"}, count=self._batch, block=block_ms or None
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc):  # the stream was deleted (Redis flushed)
                self._group_ready = False
                return []
            raise
        return [entry for _, stream_entries in cast(list[Any], reply or []) for entry in stream_entries]

    def _persist(self, entries: list[tuple[Any, dict[Any, Any]]]) -> None:
        parsed: list[tuple[str, tuple[Any, ...]]] = []
        for entry_id, fields in entries:
            try:
                parsed.append(parse_event(fields))
            except BadEvent as exc:
                log.error("events: entry %s dropped: %s", _str(entry_id), exc)
                self._count_error()
        if not parsed:
            return
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        conn = self._conn
        with conn.transaction(), conn.cursor() as cur:
            for kind in _SQL:
                params = [p for k, p in parsed if k == kind]
                if params:
                    cur.executemany(_SQL[kind], params)
        if self._metrics is not None:
            for kind in _SQL:
                count = sum(1 for k, _ in parsed if k == kind)
                if count:
                    self._metrics.events_persisted.labels(kind).inc(count)

    def _count_error(self) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels("events").inc()

    def _close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the events connection failed", exc_info=True)
            self._conn = None
