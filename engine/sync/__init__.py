"""PostgreSQL -> Redis: full snapshots (``publish_once``) and the live sync worker.

``publish_once`` (``callgate sync --once``) loads everything and switches the engines to
a new snapshot version atomically. ``SyncWorker`` (``callgate sync``) keeps that
snapshot in step with every change, within milliseconds: see docs/sync.md and the
modules ``engine.sync.worker`` (the loop), ``engine.sync.pg`` (change log, LISTEN,
transaction snapshots), ``engine.sync.state`` (the Redis side: compare-and-set
application, journal, leader lease), ``engine.sync.persist`` (engine events ->
PostgreSQL) and ``engine.sync.status`` (``callgate sync --status``).
"""

from __future__ import annotations

import logging
from dataclasses import fields

import psycopg
import redis

from engine.config import Config
from engine.db import ownership
from engine.db.loader import load_catalog
from engine.model import CatalogData
from engine.state.snapshot import publish_snapshot
from engine.sync import pg
from engine.sync.state import SyncState, record_publish

__all__ = ["entity_counts", "publish_data", "publish_once"]

log = logging.getLogger("callgate.sync")


def entity_counts(data: CatalogData) -> dict[str, int]:
    return {f.name: len(getattr(data, f.name)) for f in fields(data) if f.name != "version"}


def publish_data(
    client: redis.Redis, prefix: str, data: CatalogData, *, pg_snapshot: str, source: str, sip_realm: str = ""
) -> tuple[int, SyncState | None]:
    """Publish ``data`` (read at ``pg_snapshot``, SIP devices hashed for ``sip_realm``) as a new
    version and record it as the sync state.

    The state is None if another version became current right after the switch (then
    the next catch-up publishes again).
    """
    version = publish_snapshot(client, prefix, data)
    state = record_publish(
        client,
        prefix,
        version,
        pg_snapshot=pg_snapshot,
        source=source,
        change_version=data.version,
        sip_realm=sip_realm,
    )
    return version, state


def publish_once(config: Config) -> tuple[int, dict[str, int]]:
    """Load everything from PostgreSQL and switch the engines to it atomically.

    Also records which PostgreSQL snapshot the new version reflects, so that a sync
    worker started afterwards only catches up on what changed since.
    """
    with psycopg.connect(
        config.database.url, connect_timeout=int(config.database.connect_timeout), autocommit=True
    ) as conn:
        source = pg.source_identity(conn)
        conn.autocommit = False
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with pg.snapshot_transaction(conn) as (snapshot, _):
            # cross-tenant claims left out; SIP devices as a1-hashes for the realm, never passwords
            data, _ = ownership.enforce(load_catalog(conn, config.fsxml.domain), log)
    client = redis.Redis.from_url(config.redis.url)
    try:
        version, _state = publish_data(
            client,
            config.redis.key_prefix,
            data,
            pg_snapshot=snapshot,
            source=source,
            sip_realm=config.fsxml.domain,
        )
    finally:
        client.close()
    counts = entity_counts(data)
    log.info("snapshot %s published: %s", version, counts)
    return version, counts
