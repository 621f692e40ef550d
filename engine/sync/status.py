"""`callgate sync --status`: how far Redis is behind PostgreSQL, and who is syncing.

The lag is the age of the oldest change committed in PostgreSQL that the Redis
snapshot does not reflect yet (0 when nothing is pending): with a healthy worker it
stays in the milliseconds; it grows while the worker is stopped or cut off.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis

from engine.config import Config
from engine.state.keys import events_stream, sync_journal_key, sync_leader_key
from engine.state.redisconn import redis_client
from engine.state.snapshot import current_stamp
from engine.sync import pg
from engine.sync.persist import GROUP
from engine.sync.state import read_state


def _age(now_ms: int, then_ms: int) -> float | None:
    return None if not then_ms else max(0.0, (now_ms - then_ms) / 1000)


def sync_status(config: Config) -> dict[str, Any]:
    """The status as a dictionary (see ``render``); raises on an unreachable Redis or PostgreSQL."""
    prefix = config.redis.key_prefix
    client = redis_client(config.redis, socket_timeout=10, socket_connect_timeout=5)
    try:
        state = read_state(client, prefix)
        stamp = current_stamp(client, prefix)
        with client.pipeline(transaction=False) as pipe:
            pipe.get(sync_leader_key(prefix))
            pipe.pttl(sync_leader_key(prefix))
            pipe.xlen(sync_journal_key(prefix))
            pipe.time()
            leader, leader_ttl, journal, (seconds, micros) = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        try:
            groups = {
                g["name"].decode() if isinstance(g["name"], bytes) else g["name"]: g
                for g in client.xinfo_groups(events_stream(prefix))
            }
            group = groups.get(GROUP)
            events_waiting = (
                None if group is None else int(group.get("lag") or 0) + int(group.get("pending") or 0)
            )
        except redis.ResponseError:  # no stream yet
            events_waiting = 0
    finally:
        client.close()
    report: dict[str, Any] = {
        "snapshot_version": None if stamp is None else stamp.version,
        "snapshot_changes": None if stamp is None else stamp.changes,
        "state_matches_snapshot": bool(
            state and stamp and (state.version, state.token) == (stamp.version, stamp.token)
        ),
        "pg_snapshot": None if state is None else state.pg_snapshot,
        "applied_change_version": None if state is None else state.change_version,
        "last_apply_age_seconds": None if state is None else _age(now_ms, state.applied_at_ms),
        "last_change_lag_seconds": None
        if state is None or not state.change_at_ms
        else max(0.0, (state.applied_at_ms - state.change_at_ms) / 1000),
        "last_full_publish_age_seconds": None if state is None else _age(now_ms, state.published_at_ms),
        "leader": None if leader is None else (leader.decode() if isinstance(leader, bytes) else leader),
        "leader_lease_seconds": None if leader is None else max(0, int(leader_ttl)) / 1000,
        "journal_entries": int(journal),
        "events_waiting": events_waiting,
    }
    with psycopg.connect(
        config.database.url, connect_timeout=max(1, int(config.database.connect_timeout)), autocommit=True
    ) as conn:
        report["database_change_version"] = pg.last_change_version(conn)
        report["same_database"] = state is not None and state.source == pg.source_identity(conn)
        if state is not None and report["same_database"]:
            count, oldest, newest = pg.oldest_pending(conn, state.pg_snapshot)
            now = datetime.now(UTC)
            report["pending_changes"] = count
            report["pending_change_version"] = newest
            report["lag_seconds"] = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        else:
            report["pending_changes"] = None
            report["lag_seconds"] = None
    report["healthy"] = bool(
        report["state_matches_snapshot"] and report["same_database"] and report["lag_seconds"] is not None
    )
    return report


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def render(report: dict[str, Any]) -> str:
    if report["snapshot_version"] is None:
        head = "no snapshot in Redis (run `callgate sync` or `callgate sync --once`)"
    else:
        version, changes = report["snapshot_version"], report["snapshot_changes"]
        head = f"snapshot version {version} ({changes} changes applied in place)"
    lines = [head]
    if report["lag_seconds"] is None:
        why = (
            "no sync state"
            if report["pg_snapshot"] is None
            else "the state is not this snapshot's or database's"
        )
        lines.append(f"lag unknown: {why}; the worker will publish a full snapshot")
    else:
        lines.append(
            f"lag {_seconds(report['lag_seconds'])}: {report['pending_changes']} changes pending"
            f" (change version: database {report['database_change_version']},"
            f" applied {report['applied_change_version']})"
        )
        lines.append(f"PostgreSQL snapshot applied: {report['pg_snapshot']}")
        lines.append(
            f"last apply {_seconds(report['last_apply_age_seconds'])} ago (its change took"
            f" {_seconds(report['last_change_lag_seconds'])} to reach Redis); last full publish"
            f" {_seconds(report['last_full_publish_age_seconds'])} ago"
        )
    if report["leader"] is None:
        lines.append("leader: none (no sync worker running)")
    else:
        lines.append(f"leader: {report['leader']} (lease {report['leader_lease_seconds']:.1f} s left)")
    waiting = report["events_waiting"]
    lines.append(f"engine events waiting to be persisted: {'-' if waiting is None else waiting}")
    return "\n".join(lines)


def print_status(config: Config, *, as_json: bool = False) -> int:
    """Print the status; exit status 0 if the lag is known (a worker can catch up), else 1."""
    try:
        report = sync_status(config)
    except (redis.RedisError, psycopg.Error) as exc:
        print(f"callgate: sync status unavailable: {exc}", file=sys.stderr)
        return 1
    report["checked_at"] = time.time()
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0 if report["healthy"] else 1
