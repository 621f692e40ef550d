"""Redis round trips for the per-call scripts, without redis-py's per-command machinery.

Under gevent, ``Redis.execute_command`` spends about 60 us of CPU per command above the
socket work (pool checkout with a readiness poll, the retry wrapper, response callbacks):
as much as the round trip itself, and a call makes one or two. The limit scripts therefore
run on redis-py ``Connection`` objects held here: the same wire code, hiredis parser,
timeouts and error types, minus the pool and wrappers (measured: 86 -> 38 us of CPU per
EVALSHA; ``loadtest/bench``).

For one gevent hub: the engine process. Other users of the limits keep the plain client.
Built from a pool (``like``), the connections follow the pool's kind: with ``[redis] sentinels``
(engine.state.redisconn) each new connection asks the sentinels for the current primary, so a
connection lost in a failover reconnects to the new primary on its next use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from gevent.lock import BoundedSemaphore

try:  # a dependency of callgate; guarded so that a missing wheel costs speed, not the engine
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is installed wherever callgate is
    _hiredis_pack = None  # type: ignore[assignment]

__all__ = ["DirectConnections"]

# Argument types hiredis packs exactly as redis-py's encoder does (UTF-8 text, bytes as they
# are, ints in decimal); anything else (float, bool, None, memoryview...) goes through redis-py,
# which raises its own errors for what Redis cannot take.
_PLAIN_ARGS = frozenset({str, bytes, int})


class DirectConnections:
    """At most ``size`` connections, opened on demand and kept open for reuse.

    A caller finding all of them busy waits up to ``checkout_timeout`` seconds, then gets
    ``redis.ConnectionError``. A connection that failed in any way is closed (its reply
    stream can no longer be trusted) and reconnects on its next use.
    """

    def __init__(
        self,
        connection_class: type[redis.Connection],
        connection_kwargs: dict[str, Any],
        size: int,
        checkout_timeout: float,
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, not {size}")
        self._connection_class = connection_class
        self._kwargs = dict(connection_kwargs)
        # The limits acquire has ~50 arguments: redis-py encodes each in Python (~1 us apiece)
        # before hiredis packs them; hiredis alone packs them in C. Only for the default
        # encoding, where the bytes are provably the same (tests/test_direct_redis.py).
        encoding = (self._kwargs.get("encoding", "utf-8"), self._kwargs.get("encoding_errors", "strict"))
        self._hiredis_pack = _hiredis_pack if encoding == ("utf-8", "strict") else None
        self._slots = BoundedSemaphore(size)
        self._idle: list[redis.Connection] = []
        self._checkout_timeout = checkout_timeout

    @classmethod
    def like(cls, pool: redis.ConnectionPool, size: int, checkout_timeout: float) -> DirectConnections:
        """Connections with ``pool``'s address, timeouts and protocol settings."""
        return cls(pool.connection_class, pool.connection_kwargs, size, checkout_timeout)

    def execute(self, args: Sequence[Any], *, retry_once: bool = False) -> Any:
        """Send one command and return its reply; Redis errors raise as redis-py raises them.

        ``retry_once``: after a connection error (a connection that Redis closed while it
        was idle, typically after a restart), try once more on a fresh connection. Only for
        commands that are safe to repeat.
        """
        return _attempt(lambda: self._execute(args), retry_once)

    def execute_many(self, commands: Sequence[Sequence[Any]], *, retry_once: bool = False) -> list[Any]:
        """Pipeline ``commands`` in one round trip; their replies in order, an error reply as
        its ``redis.ResponseError`` instance (not raised). ``retry_once`` as for ``execute``."""
        replies: list[Any] = _attempt(lambda: self._pipeline(commands), retry_once)
        return replies

    # redis-py's Connection methods carry no annotations: connections are handled as Any.
    def _pack(self, connection: Any, args: Sequence[Any]) -> list[bytes]:
        """The command's bytes (as pieces): hiredis straight from the arguments when they are
        plain, else redis-py's packer (which also splits the first argument at whitespace:
        "SCRIPT LOAD" is two arguments, "" none; a command name of letters is left as it is)."""
        pack = self._hiredis_pack
        name = args[0] if args else None
        if (
            pack is not None
            and type(name) is str
            and name.isalpha()
            and _PLAIN_ARGS.issuperset(map(type, args))
        ):
            return [pack(tuple(args))]
        pieces: list[bytes] = connection.pack_command(*args)
        return pieces

    def _execute(self, args: Sequence[Any]) -> Any:
        def exchange(connection: Any) -> Any:
            connection.send_packed_command(self._pack(connection, args), check_health=False)
            return connection.read_response()

        return self._on_a_connection(exchange)

    def _pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        def exchange(connection: Any) -> list[Any]:
            # One write for the whole pipeline (redis-py's pack_commands also joins small pieces).
            packed = b"".join(piece for args in commands for piece in self._pack(connection, args))
            connection.send_packed_command([packed], check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(connection.read_response())
                except redis.ResponseError as error:
                    replies.append(error)
            return replies

        replies: list[Any] = self._on_a_connection(exchange)
        return replies

    def _on_a_connection(self, exchange: Callable[[Any], Any]) -> Any:
        if not self._slots.acquire(timeout=self._checkout_timeout):
            raise redis.ConnectionError(f"no free Redis connection within {self._checkout_timeout:g}s")
        connection: Any = self._idle.pop() if self._idle else self._connection_class(**self._kwargs)
        try:
            if connection._sock is None:
                # Connect through the class's own connect(): a Sentinel-managed connection asks
                # the sentinels for the primary there. send_packed_command's implicit connect
                # would skip that and dial the default address (localhost:6379).
                connection.connect()
            return exchange(connection)
        except redis.ResponseError:  # an error reply (NOSCRIPT...): the stream is in step
            raise
        except BaseException:  # includes gevent.Timeout: a reply may still be on its way
            connection.disconnect()
            raise
        finally:
            self._idle.append(connection)
            self._slots.release()

    def close(self) -> None:
        while self._idle:
            connection: Any = self._idle.pop()
            connection.disconnect()


def _attempt(exchange: Callable[[], Any], retry_once: bool) -> Any:
    try:
        return exchange()
    except redis.ConnectionError:
        if not retry_once:
            raise
        return exchange()
