"""CDR stream -> PostgreSQL: CDR rows, call debits and balances, in one transaction per batch.

The engines' settle script (engine.billing.funds) appends one entry per ended call to the
stream ``{prefix}cdrs``, atomically with the Redis-side debit. Every sync worker runs a
:class:`CdrWriter` in the consumer group ``callgate-cdr``: it reads a batch, COPYs it into
temporary staging tables, then in the same transaction

1. creates the months' partitions it needs (cached per process),
2. locks the debited accounts in id order (writers never deadlock each other),
3. ``INSERT INTO cdrs ... ON CONFLICT DO NOTHING`` (key: uuid, started_at),
4. inserts the call debits of the CDRs really inserted, and
5. moves ``balance`` and ``calls_debited`` of those accounts by exactly those debits,

commits, and only then acknowledges the entries (XACK). A crash before the commit leaves
the entries pending: another worker (or this one restarted) claims them after
``CLAIM_IDLE_MS`` and writes them; a crash between the commit and the XACK makes the
batch come again, and step 3 turns it into nothing. So a CDR is never lost or doubled,
and the ledger equation (migration 0005) holds after any crash.

A record that cannot be stored (not JSON, a field of the wrong type) is logged with its
stream id, counted (``callgate_cdrs_bad_total``) and acknowledged, so it never blocks
the stream. PostgreSQL unreachable: the batch stays pending and is retried with backoff;
the backlog waits in Redis (``callgate_cdr_backlog``).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, date
from decimal import Decimal
from typing import Any

import psycopg
import redis

from engine.billing.cdr import CDR_COLUMNS, DEBIT_COLUMNS, BadCdr, CdrRows, cdr_rows
from engine.billing.funds import Funds, cdr_stream
from engine.billing.metrics import BillingMetrics
from engine.sync.streams import claim_stale, ensure_group

log = logging.getLogger("callgate.sync.cdrs")

GROUP = "callgate-cdr"
CLAIM_IDLE_MS = 60_000
_CLAIM_EVERY = 15.0
_GAUGES_EVERY = 5.0
_TOTALS_EVERY = 30.0
_TRIM_EVERY = 10.0  # the reserved-funds gauges SCAN every account's funds hash

_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS cdr_staging (LIKE cdrs INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE IF NOT EXISTS debit_staging (LIKE call_debits, stream_id text) ON COMMIT DELETE ROWS",
)
_COPY_CDRS = "COPY cdr_staging ({}, stream_id) FROM STDIN".format(", ".join(CDR_COLUMNS))
_COPY_DEBITS = "COPY debit_staging ({}, stream_id) FROM STDIN".format(", ".join(DEBIT_COLUMNS))
_LOCK_ACCOUNTS = (
    "SELECT id FROM accounts WHERE id IN (SELECT DISTINCT account_id FROM debit_staging)"
    " ORDER BY id FOR UPDATE"
)
_INSERT = """
WITH new_cdrs AS (
    INSERT INTO cdrs ({cols}, stream_id)
    SELECT DISTINCT ON (uuid, started_at) {cols}, stream_id FROM cdr_staging
     ORDER BY uuid, started_at, stream_id
    ON CONFLICT DO NOTHING
    RETURNING uuid, started_at, stream_id
), new_debits AS (
    INSERT INTO call_debits ({dcols})
    SELECT DISTINCT ON (d.uuid, d.started_at, d.level) {dcols_d}
      FROM debit_staging d JOIN new_cdrs n ON n.stream_id = d.stream_id
     ORDER BY d.uuid, d.started_at, d.level
    ON CONFLICT DO NOTHING
    RETURNING account_id, amount
), totals AS (
    SELECT account_id, sum(amount) AS total, count(*) AS n FROM new_debits GROUP BY account_id
), moved AS (
    UPDATE accounts a SET balance = a.balance - t.total, calls_debited = a.calls_debited + t.total
      FROM totals t
     WHERE a.id = t.account_id AND t.total <> 0
    RETURNING a.id
), duplicates AS (
    -- entries not stored now, and not the entry their stored row came from (that is a replay)
    INSERT INTO cdr_duplicates (stream_id, uuid, started_at)
    SELECT DISTINCT ON (s.stream_id) s.stream_id, s.uuid, s.started_at FROM cdr_staging s
     WHERE NOT EXISTS (SELECT 1 FROM new_cdrs n WHERE n.stream_id = s.stream_id)
       AND NOT EXISTS (SELECT 1 FROM cdrs c
                        WHERE c.uuid = s.uuid AND c.started_at = s.started_at AND c.stream_id = s.stream_id)
    ON CONFLICT DO NOTHING
    RETURNING stream_id
)
SELECT (SELECT count(*) FROM new_cdrs), (SELECT coalesce(sum(n), 0) FROM totals),
       (SELECT coalesce(sum(total), 0) FROM totals), (SELECT count(*) FROM moved),
       (SELECT coalesce(json_agg(json_build_array(account_id, total)), '[]')
          FROM (SELECT d.account_id, sum(d.amount)::text AS total
                  FROM debit_staging d JOIN duplicates x ON x.stream_id = d.stream_id
                 GROUP BY d.account_id) back)
""".format(
    cols=", ".join(CDR_COLUMNS),
    dcols=", ".join(DEBIT_COLUMNS),
    dcols_d=", ".join(f"d.{c}" for c in DEBIT_COLUMNS),
)


def _str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BatchResult:
    __slots__ = ("bad", "debits", "entries", "written")

    def __init__(self, entries: int = 0, written: int = 0, debits: int = 0, bad: int = 0) -> None:
        self.entries, self.written, self.debits, self.bad = entries, written, debits, bad

    def __repr__(self) -> str:
        return (
            f"BatchResult(entries={self.entries}, written={self.written}, "
            f"debits={self.debits}, bad={self.bad})"
        )


class CdrWriter:
    """Consumes ``{prefix}cdrs`` in the group ``callgate-cdr`` (see the module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        connect: Callable[[], psycopg.Connection[Any]],
        consumer: str,
        *,
        batch: int = 2000,
        metrics: BillingMetrics | None = None,
        after_commit: Callable[[psycopg.Connection[Any]], object] | None = None,
        backoff_max: float = 10.0,
        claim_idle_ms: int = CLAIM_IDLE_MS,
    ) -> None:
        """``after_commit``: run with the connection after each committed batch (the mailer)."""
        self._client = client
        self._stream = cdr_stream(prefix)
        self._connect = connect
        self._consumer = consumer
        self._batch = batch
        self.metrics = metrics or BillingMetrics()
        self._after_commit = after_commit
        self._backoff_max = backoff_max
        self._claim_idle_ms = claim_idle_ms
        self._conn: psycopg.Connection[Any] | None = None
        self._months: set[date] = set()
        self._group_ready = False
        self._next_claim = 0.0
        self._next_gauges = 0.0
        self._next_totals = 0.0
        self._next_trim = 0.0
        self._own_pending = True  # entries delivered to this consumer name and not acknowledged
        self._funds = Funds(client, prefix)
        self.failures = 0

    # --- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event, block_ms: int = 1000) -> None:
        """Write CDRs until ``stop`` is set. Never raises."""
        while not stop.is_set():
            try:
                self.process_once(block_ms)
                if self.failures:
                    log.info("cdrs: writing again after %d failures", self.failures)
                    self.failures = 0
            except Exception as exc:  # the loop must survive anything
                self.failures += 1
                self._own_pending = True
                self.metrics.batch_failures.inc()
                if self.failures == 1:
                    log.warning("cdrs: writing failed, the batch stays pending: %r", exc)
                self.close()
                stop.wait(
                    min(self._backoff_max, 0.1 * 2 ** min(self.failures, 10)) * random.uniform(0.8, 1.2)
                )
        self.close()

    def process_once(self, block_ms: int = 0) -> BatchResult:
        """Claim stale entries or read new ones, write them, acknowledge them."""
        self._ensure_group()
        self._refresh_gauges()
        entries = self._claim_stale()
        if not entries:
            entries = self._read(block_ms)
        if not entries:
            return BatchResult()
        result = self.write(entries)
        self._client.xack(self._stream, GROUP, *[entry_id for entry_id, _ in entries])
        self._trim()
        return result

    def _trim(self) -> None:
        """Drop the entries every writer has committed: those before the oldest unacknowledged one.
        (The settle script never trims: an unwritten CDR must not be cut.)"""
        now = time.monotonic()
        if now < self._next_trim:
            return
        self._next_trim = now + _TRIM_EVERY
        oldest = oldest_unwritten(self._client, self._stream)
        if oldest is not None:
            self._client.xtrim(self._stream, minid=oldest, approximate=False)
        else:
            last = self._last_delivered()
            if last is not None:
                # everything up to the last delivered id is acknowledged: keep only later entries
                ms, seq = (int(x) for x in last.split("-", 1))
                self._client.xtrim(self._stream, minid=f"{ms}-{seq + 1}", approximate=False)

    def _last_delivered(self) -> str | None:
        try:
            groups: Any = self._client.xinfo_groups(self._stream)
        except redis.ResponseError:
            return None
        for group in groups:
            if _str(group.get("name", b"")) == GROUP:
                last = group.get("last-delivered-id")
                return _str(last) if last else None
        return None

    # --- Redis ---------------------------------------------------------------------------------

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
            self._client,
            self._stream,
            GROUP,
            self._consumer,
            min_idle_ms=self._claim_idle_ms,
            count=self._batch,
        )

    def _read(self, block_ms: int) -> list[tuple[Any, dict[Any, Any]]]:
        """This consumer's own unacknowledged entries first (after a failure: retry them at once,
        not after CLAIM_IDLE_MS), then new ones."""
        if self._own_pending:
            own = self._read_from("0", 0)
            if own:
                return own
            self._own_pending = False
        return self._read_from(">", block_ms)

    def _read_from(self, start: str, block_ms: int) -> list[tuple[Any, dict[Any, Any]]]:
        try:
            reply: Any = self._client.xreadgroup(
                GROUP, self._consumer, {self._stream: start}, count=self._batch, block=block_ms or None
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # the stream was deleted (Redis flushed or restarted empty)
                self._group_ready = False
                return []
            raise
        entries: list[tuple[Any, dict[Any, Any]]] = []
        for _, stream_entries in reply or []:
            entries += [(entry_id, fields) for entry_id, fields in stream_entries if fields]
        return entries

    def _refresh_gauges(self) -> None:
        now = time.monotonic()
        if now < self._next_gauges:
            return
        self._next_gauges = now + _GAUGES_EVERY
        backlog, lag = stream_backlog(self._client, self._stream)
        self.metrics.backlog.set(backlog)
        self.metrics.lag.set(lag)
        if now >= self._next_totals:
            self._next_totals = now + _TOTALS_EVERY
            reserved, open_calls = self._funds.totals()
            self.metrics.reserved.set(float(reserved))
            self.metrics.open_reservations.set(open_calls)

    # --- PostgreSQL ----------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
            self._conn.autocommit = False
            with self._conn.transaction():
                self._conn.execute("SET TIME ZONE 'UTC'")
                for statement in _STAGING:
                    self._conn.execute(statement)
        return self._conn

    def write(self, entries: Iterable[tuple[Any, dict[Any, Any]]]) -> BatchResult:
        """Write one batch in one transaction (see the module docstring); the entries are not acked."""
        rows: list[tuple[str, CdrRows]] = []
        result = BatchResult()
        for entry_id, fields in entries:
            result.entries += 1
            try:
                values = {_str(k): _str(v) for k, v in fields.items()}
                rows.append((_str(entry_id), cdr_rows(json.loads(values.get("cdr", "")))))
            except (BadCdr, ValueError) as exc:
                result.bad += 1
                self.metrics.cdrs_bad.inc()
                log.error("cdrs: entry %s cannot be stored and is dropped: %s", _str(entry_id), exc)
        if not rows:
            return result
        conn = self._connection()
        with conn.transaction(), conn.cursor() as cur:
            self._ensure_months(cur, {r.cdr[1].astimezone(UTC).date().replace(day=1) for _, r in rows})
            with cur.copy(_COPY_CDRS) as copy:
                for stream_id, r in rows:
                    copy.write_row((*r.cdr, stream_id))
            with cur.copy(_COPY_DEBITS) as copy:
                for stream_id, r in rows:
                    for debit in r.debits:
                        copy.write_row((*debit, stream_id))
            cur.execute(_LOCK_ACCOUNTS)
            written, debits, amount, _moved, back = cur.execute(_INSERT).fetchone() or (0, 0, 0, 0, [])
        result.written, result.debits = int(written), int(debits)
        if back:
            # Committed: now take back from Redis's spent what the duplicate entries added. A crash
            # right here leaves spent too high by that amount (conservative: fewer funds available).
            self._funds.take_back({int(account): Decimal(total) for account, total in back})
            self.metrics.duplicates_taken_back.inc(len(back))
        self.metrics.cdrs_written.inc(result.written)
        self.metrics.cdrs_duplicate.inc(len(rows) - result.written)
        self.metrics.debits_written.inc(result.debits)
        self.metrics.debited_amount.inc(float(amount))
        if self._after_commit is not None:
            try:
                self._after_commit(conn)
            except Exception:  # the CDRs are committed: a mailer failure must not replay them
                log.warning("cdrs: after-commit hook failed", exc_info=True)
        return result

    def _ensure_months(self, cur: psycopg.Cursor[Any], months: set[date]) -> None:
        for month in sorted(months - self._months):
            cur.execute("SELECT callgate_cdr_month(%s)", [month])
        self._months |= months

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                log.debug("closing the CDR connection failed", exc_info=True)
            self._conn = None


def oldest_unwritten(client: redis.Redis, stream: str) -> str | None:
    """The id of the oldest entry not yet acknowledged by the group (pending or undelivered), or None."""
    try:
        groups: Any = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    group: Any = next((g for g in groups if _str(g.get("name", b"")) == GROUP), None)
    if group is None:
        return None
    if int(group.get("pending") or 0):
        summary: dict[str, Any] = client.xpending(stream, GROUP)
        smallest = summary.get("min")
        if smallest:
            return _str(smallest)
    last = _str(group.get("last-delivered-id") or b"0-0")
    after: Any = client.xrange(stream, min=f"({last}", count=1)
    return _str(after[0][0]) if after else None


def stream_backlog(client: redis.Redis, stream: str) -> tuple[int, float]:
    """(entries not yet written, age in seconds of the oldest of them) for the group ``callgate-cdr``."""
    try:
        groups: Any = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0, 0.0
    group: Any = next((g for g in groups if _str(g.get("name", b"")) == GROUP), None)
    if group is None:
        return int(client.xlen(stream)), 0.0
    lag = group.get("lag")
    backlog = int(group.get("pending") or 0) + (int(lag) if lag is not None else 0)
    if backlog == 0:
        return 0, 0.0
    oldest = oldest_unwritten(client, stream)
    if oldest is None:
        return backlog, 0.0
    millis = int(oldest.split("-", 1)[0])
    return backlog, max(0.0, time.time() - millis / 1000)


def main(argv: list[str] | None = None) -> int:
    """Run one CDR writer alone (tests, or a deployment that separates it from the sync worker)."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m engine.sync.cdrs")
    parser.add_argument("--pg", required=True, help="PostgreSQL URL")
    parser.add_argument("--redis", required=True, help="Redis URL")
    parser.add_argument("--prefix", required=True, help="Redis key prefix")
    parser.add_argument("--consumer", default="cdr-writer")
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--claim-idle-ms", type=int, default=CLAIM_IDLE_MS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = redis.Redis.from_url(args.redis, socket_timeout=30, socket_connect_timeout=5)
    writer = CdrWriter(
        client,
        args.prefix,
        lambda: psycopg.connect(args.pg, connect_timeout=5),
        args.consumer,
        batch=args.batch,
        claim_idle_ms=args.claim_idle_ms,
    )
    try:
        writer.run(stop, block_ms=200)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
