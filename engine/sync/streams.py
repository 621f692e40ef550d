"""The Redis stream consumer-group steps the sync's consumers share (engine events in
``persist.py``, CDRs in ``cdrs.py``): each reads its stream in a group, acknowledges after its
PostgreSQL commit, and takes over what a dead consumer left pending."""

from __future__ import annotations

from typing import Any

import redis

Entry = tuple[Any, dict[Any, Any]]


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create ``group`` on ``stream`` (and the stream) unless it exists already."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def claim_stale(
    client: redis.Redis, stream: str, group: str, consumer: str, *, min_idle_ms: int, count: int
) -> list[Entry]:
    """Take over entries another consumer read but did not acknowledge for ``min_idle_ms``
    (it died mid-batch); entries deleted meanwhile (fields None) are left out."""
    reply: Any = client.xautoclaim(
        stream, group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
    )
    return [(entry_id, fields) for entry_id, fields in reply[1] if fields is not None]
