"""The PostgreSQL side of the live sync: LISTEN, the change log, transaction snapshots.

See engine/db/migrations/0004_sync.sql for the log and the notifications. A catch-up
reads, in one REPEATABLE READ transaction: its own snapshot (``pg_current_snapshot()``),
the log rows of the transactions the previous snapshot did not see, and the current
state of the entities they name (engine.db.loader.load_entities). Everything read is
then exactly the database at the new snapshot, whatever order the transactions
committed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

CHANNEL = "callgate_changes"
APPLICATION_NAME = "callgate-sync"


@dataclass(frozen=True, slots=True)
class LoggedChange:
    entity: str
    key: str  # "*" = the whole table (TRUNCATE)
    version: int
    at: datetime  # when the change was written (clock_timestamp() in the trigger)


def connect(
    url: str, *, timeout: float, autocommit: bool, name: str = APPLICATION_NAME
) -> psycopg.Connection:
    conn = psycopg.connect(
        url, connect_timeout=max(1, int(timeout)), autocommit=autocommit, application_name=name
    )
    if not autocommit:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    return conn


def listen(conn: psycopg.Connection) -> None:
    """LISTEN on an autocommit connection; notifications are queued from the moment it returns."""
    conn.execute(f"LISTEN {CHANNEL}")


def source_identity(conn: psycopg.Connection) -> str:
    """Which database this is: cluster system identifier (when readable), database oid and name.

    Transaction ids of another cluster (a restored dump) are not comparable with the
    stored pg_snapshot: a different identity forces a full publish.
    """
    row = conn.execute(
        "SELECT current_database(), (SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()
    assert row is not None
    system = "?"
    try:
        with conn.transaction():
            found = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
            system = str(found[0]) if found else "?"
    except psycopg.errors.InsufficientPrivilege:
        pass
    return f"{system}/{row[1]}/{row[0]}"


@contextmanager
def snapshot_transaction(conn: psycopg.Connection, since: str | None = None) -> Iterator[tuple[str, bool]]:
    """A REPEATABLE READ, READ ONLY transaction: yields (its snapshot as pg_snapshot text, pruned).

    ``pruned``: the log was pruned into what a catch-up from the snapshot ``since`` would
    need (``callgate_sync_state.pruned_through`` at or past its xmin); False without ``since``.
    """
    with conn.transaction():
        if since is None:
            row = conn.execute("SELECT pg_current_snapshot()::text, false").fetchone()
        else:
            row = conn.execute(
                "SELECT pg_current_snapshot()::text, pruned_through >= pg_snapshot_xmin(%s::pg_snapshot)"
                " FROM callgate_sync_state",
                [since],
            ).fetchone()
        assert row is not None
        yield row[0], bool(row[1])


def parse_snapshot(text: str) -> tuple[int, int, list[int]]:
    """(xmin, xmax, in-progress txids) of a pg_snapshot's text form "xmin:xmax:xip,xip"."""
    xmin, xmax, xip = text.split(":")
    return int(xmin), int(xmax), [int(x) for x in xip.split(",") if x]


# The transactions a snapshot did not see: txid >= its xmax, or in its in-progress list. Written
# as two index scans with literal bounds (an OR over functions of the snapshot is planned as a
# sequential scan of the whole log).
_UNSEEN = (
    "SELECT {columns} FROM callgate_changes WHERE txid >= %(xmax)s::xid8"
    " UNION ALL"
    " SELECT {columns} FROM callgate_changes WHERE txid = ANY(%(xip)s::xid8[])"
)


def _unseen(since: str) -> dict[str, Any]:
    _xmin, xmax, xip = parse_snapshot(since)
    return {"xmax": str(xmax), "xip": [str(x) for x in xip]}


def changes_since(conn: psycopg.Connection, since: str, limit: int) -> list[LoggedChange]:
    """The log rows of transactions not visible in ``since`` (and visible now), at most ``limit``.

    Both parts are index ranges, so a transaction that stays open for hours costs one probe.
    """
    query = _UNSEEN.format(columns="entity, key, version, at") + " LIMIT %(limit)s"
    rows = conn.execute(query, {**_unseen(since), "limit": limit}).fetchall()
    return [LoggedChange(*row) for row in rows]


def oldest_pending(conn: psycopg.Connection, since: str) -> tuple[int, datetime | None, int]:
    """(pending changes, the write time of the oldest, the highest version) after ``since``."""
    unseen = _UNSEEN.format(columns="version, at")
    row = conn.execute(
        f"SELECT count(*), min(at), coalesce(max(version), 0) FROM ({unseen}) pending", _unseen(since)
    ).fetchone()
    assert row is not None
    return int(row[0]), row[1], int(row[2])


def last_change_version(conn: psycopg.Connection) -> int:
    row = conn.execute(
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM callgate_change_seq"
    ).fetchone()
    return int(row[0]) if row else 0


def prune(conn: Any, applied: str, retention_seconds: float, batch: int = 50_000) -> int:
    """Delete log rows that ``applied`` has seen and that are older than the retention.

    ``conn`` must be in autocommit mode: one statement per batch, each recording how far
    it pruned (``callgate_sync_state.pruned_through``). Returns the rows deleted.
    """
    total = 0
    while True:
        row = conn.execute(
            "WITH gone AS ("
            "  DELETE FROM callgate_changes WHERE ctid = ANY(ARRAY("
            "    SELECT ctid FROM callgate_changes"
            "     WHERE txid < pg_snapshot_xmin(%(s)s::pg_snapshot)"
            "       AND at < clock_timestamp() - %(keep)s * interval '1 second'"
            "     LIMIT %(batch)s))"
            "  RETURNING txid),"
            " marked AS ("
            "  UPDATE callgate_sync_state"
            "     SET pruned_through = greatest(pruned_through, (SELECT max(txid) FROM gone))"
            "   WHERE EXISTS (SELECT 1 FROM gone) RETURNING 1)"
            " SELECT count(*) FROM gone",
            {"s": applied, "keep": retention_seconds, "batch": batch},
        ).fetchone()
        deleted = int(row[0]) if row else 0
        total += deleted
        if deleted < batch:
            return total
