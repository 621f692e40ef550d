"""The API's PostgreSQL connections: one bounded pool, and 503 at once when it is exhausted.

A request takes a connection only after its token passed the in-memory pre-check
(:mod:`.auth`), and a route only once its input is validated, so clients without a valid
token, and slow senders of request bodies, never hold a server backend.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests

log = logging.getLogger("callgate.admin.api")


class Unavailable(Exception):
    """No database connection can be had now (the pool is exhausted or the database is down)."""


class Database:
    def __init__(
        self, url: str, *, max_size: int, timeout: float, connect_timeout: int, max_waiting: int
    ) -> None:
        self.timeout = timeout
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            kwargs={"autocommit": True, "connect_timeout": connect_timeout},
            min_size=1,
            max_size=max_size,
            timeout=timeout,
            max_waiting=max_waiting,
            # A connection broken by a database restart is found on checkout, not by a failed request.
            check=ConnectionPool.check_connection,
            name="callgate-admin-api",
            open=False,
        )
        self.pool.open(wait=False)

    def getconn(self) -> psycopg.Connection[Any]:
        """A connection for this request; Unavailable when none frees up within `timeout`."""
        try:
            return self.pool.getconn(timeout=self.timeout)
        except TooManyRequests:
            raise Unavailable("too many requests are waiting for a database connection") from None
        except PoolTimeout:
            raise Unavailable("no database connection is free (or the database is unreachable)") from None

    def putconn(self, conn: psycopg.Connection[Any]) -> None:
        self.pool.putconn(conn)

    def close(self) -> None:
        self.pool.close(timeout=5)
