"""PostgreSQL -> Redis: publish the account model as a new snapshot version."""

from __future__ import annotations

import logging
from dataclasses import fields

import psycopg
import redis

from engine.config import Config
from engine.db.loader import load_catalog
from engine.model import CatalogData
from engine.state.snapshot import publish_snapshot

log = logging.getLogger("callgate.sync")


def entity_counts(data: CatalogData) -> dict[str, int]:
    return {f.name: len(getattr(data, f.name)) for f in fields(data) if f.name != "version"}


def publish_once(config: Config) -> tuple[int, dict[str, int]]:
    """Load everything from PostgreSQL and switch the engines to it atomically."""
    with psycopg.connect(config.database.url, connect_timeout=int(config.database.connect_timeout)) as conn:
        data = load_catalog(conn)
    client = redis.Redis.from_url(config.redis.url)
    try:
        version = publish_snapshot(client, config.redis.key_prefix, data)
    finally:
        client.close()
    counts = entity_counts(data)
    log.info("snapshot %s published: %s", version, counts)
    return version, counts
