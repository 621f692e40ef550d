"""Every Redis client callgate opens is built here: one plain URL, or a Sentinel-managed primary.

``[redis] url`` alone: clients connect to that address. ``[redis] sentinels`` set: clients ask
the sentinels for the current primary of ``service_name`` each time they open a connection
(redis-py's ``SentinelConnectionPool`` / ``SentinelManagedConnection``), so a connection lost in
a failover reconnects to the new primary, with no restart. In that mode the URL still gives
the database number, user name and password of the data nodes; its host and port are unused.

A connection that finds itself on a replica (an old primary demoted by the sentinels) gets a
``READONLY`` reply, which redis-py turns into a ``ConnectionError``: the connection is dropped
and the next one asks the sentinels again. Nothing here retries on its own: a caller that
cannot reach a primary sees ``redis.ConnectionError`` and decides (the engine refuses the call
ENGINE_DEGRADED, or admits it by the fail-open approximation when ``limits.fail_open``).

Users: the engine (its pool and the direct connections of engine.state.direct, which are
built from the pool's connection class and arguments and therefore re-resolve the primary on
reconnect), the snapshot watcher, the sync worker, the CDR writer and event persister, fsxml,
and the CLI commands.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.sentinel

from engine.config import RedisSettings, parse_address

__all__ = ["describe", "redis_client", "sentinel_addresses"]


class SentinelBlockingConnectionPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """A Sentinel-managed pool that makes callers wait for a free connection (like the plain
    engine pool) instead of failing with "Too many connections"."""


def redis_client(
    settings: RedisSettings,
    *,
    socket_timeout: float | None,
    socket_connect_timeout: float | None = None,
    max_connections: int | None = None,
    blocking_timeout: float | None = None,
) -> redis.Redis:
    """A client for the primary named by ``settings``.

    ``blocking_timeout`` set: a bounded pool of ``max_connections`` whose callers wait up to
    that many seconds for a free connection. Otherwise redis-py's ordinary pool.
    """
    connect_timeout = socket_timeout if socket_connect_timeout is None else socket_connect_timeout
    options: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": connect_timeout}
    if max_connections is not None:
        options["max_connections"] = max_connections
    if blocking_timeout is not None:
        options["timeout"] = blocking_timeout
    if not settings.sentinels:
        plain: type[redis.ConnectionPool] = redis.ConnectionPool
        if blocking_timeout is not None:
            plain = redis.BlockingConnectionPool
        return redis.Redis(connection_pool=plain.from_url(settings.url, **options))
    sentinel = redis.sentinel.Sentinel(
        sentinel_addresses(settings.sentinels),
        sentinel_kwargs=_sentinel_options(settings, options),
        **_data_node_options(settings.url),
    )
    managed: type[redis.sentinel.SentinelConnectionPool] = redis.sentinel.SentinelConnectionPool
    if blocking_timeout is not None:
        managed = SentinelBlockingConnectionPool
    client: redis.Redis = sentinel.master_for(settings.service_name, connection_pool_class=managed, **options)
    return client


def sentinel_addresses(entries: tuple[str, ...]) -> list[tuple[str, int]]:
    """'host:port' (or '[v6]:port') entries of ``[redis] sentinels``; a malformed one is a ConfigError."""
    return [parse_address("redis.sentinels", entry) for entry in entries]


def describe(settings: RedisSettings) -> str:
    """Where the clients connect, for logs: never a password."""
    if settings.sentinels:
        return f"Sentinel service {settings.service_name!r} via {', '.join(settings.sentinels)}"
    parts = urlsplit(settings.url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def _sentinel_options(settings: RedisSettings, options: dict[str, Any]) -> dict[str, Any]:
    # Sentinels answer a discovery in microseconds; their socket timeouts are the data nodes'.
    found: dict[str, Any] = {key: value for key, value in options.items() if key.startswith("socket_")}
    if settings.sentinel_password:
        found["password"] = settings.sentinel_password
    return found


def _data_node_options(url: str) -> dict[str, Any]:
    """Database, user name, password and TLS of the data nodes, from ``[redis] url``."""
    parsed: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    keep = {"db", "username", "password"}
    found = {key: value for key, value in parsed.items() if key in keep}
    if parsed.get("connection_class") is redis.SSLConnection:
        found["ssl"] = True
    return found
