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

Gathering (:meth:`DirectConnections.execute_gathered`): at saturation the event loop resumes many
calls in one turn, and each used to send its acquire on a connection of its own, then wait for
its own reply: a send, a failed read, a wait and a read per call (~60 us of CPU under gevent,
the largest part of a round trip). Commands issued in the same turn of the loop are instead
sent together, as one pipeline on one connection, when the turn ends; the first of them sends
and reads for all and hands each its reply. Measured before building (``acquire-census`` in
``loadtest.patched_engine``): 8.9 acquires per loop turn at saturation, 1 at 150 CPS. A lone
command waits only for the rest of its turn, which is otherwise spent running other calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from gevent import get_hub
from gevent.hub import Waiter
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

# What a gathered command's waiter receives when the turn ends and it is the one to send.
_SEND = object()


class _Gathered:
    """One command waiting for its turn's pipeline. ``gone``: its caller stopped waiting (an
    exception thrown into it, such as the call's deadline) before the pipeline was sent, so
    the command is left out of it."""

    __slots__ = ("args", "gone", "waiter")

    def __init__(self, args: Sequence[Any], waiter: Waiter[Any]) -> None:
        self.args = args
        self.waiter = waiter
        self.gone = False


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
        # Gathering belongs to the first hub that gathers (the engine's); others execute alone.
        self._hub: Any = None
        self._turn: list[_Gathered] | None = None

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

    def execute_gathered(self, args: Sequence[Any], *, retry_once: bool = False) -> Any:
        """``execute``, with the other commands issued in the same turn of the event loop: all
        are sent as one pipeline when the turn ends (see the module's docstring).

        Each caller gets its own reply, or its own error reply raised, as from ``execute``. A
        failure of the shared round trip (connection lost, timeout) raises in every caller. If
        the caller that sends is interrupted meanwhile (an exception thrown into it, such as its
        call's deadline), the others raise ``redis.TimeoutError``: their commands may have run.
        A caller interrupted before the turn ends is left out of the pipeline. ``retry_once``
        applies to the whole pipeline: only for commands that are safe to repeat.
        """
        hub = get_hub()
        if self._hub is not hub:
            if self._hub is not None:  # another thread's hub: nothing to gather with
                return self.execute(args, retry_once=retry_once)
            self._hub = hub
        turn = self._turn
        if turn is None:
            turn = self._turn = []
            hub.loop.run_callback(self._end_turn, turn)
        me = _Gathered(args, Waiter(hub))
        turn.append(me)
        try:
            outcome = me.waiter.get()
        except BaseException:
            me.gone = True  # the pipeline, if not sent yet, leaves this command out
            raise
        if outcome is _SEND:
            return self._send_turn(turn, me, retry_once)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def _end_turn(self, turn: list[_Gathered]) -> None:
        """In the hub, once the loop's turn is over: the first caller still waiting sends."""
        if self._turn is turn:
            self._turn = None
        for member in turn:
            if not member.gone:
                member.waiter.switch(_SEND)
                return

    def _send_turn(self, turn: list[_Gathered], me: _Gathered, retry_once: bool) -> Any:
        members = [member for member in turn if not member.gone]
        try:
            replies = self.execute_many([member.args for member in members], retry_once=retry_once)
        except BaseException as exc:
            for member in members:
                if member is not me:
                    self._hub.loop.run_callback(member.waiter.switch, _shared_failure(exc))
            raise
        mine: Any = None
        for member, reply in zip(members, replies, strict=True):
            if member is me:
                mine = reply
            else:
                self._hub.loop.run_callback(member.waiter.switch, reply)
        if isinstance(mine, redis.ResponseError):
            raise mine
        return mine

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


def _shared_failure(exc: BaseException) -> BaseException:
    """What the other callers of a failed pipeline raise: a copy of ``exc`` (one exception
    object raised in several greenlets would gather all their tracebacks), or, when the sender
    was interrupted rather than failed, a timeout: the pipeline may have been sent."""
    if isinstance(exc, redis.RedisError):
        try:
            return type(exc)(*exc.args)
        except Exception:  # a subclass with another signature: keep its meaning, not its type
            return redis.ConnectionError(str(exc))
    interrupted = type(exc).__name__
    return redis.TimeoutError(f"the pipeline's sender was interrupted ({interrupted}); it may have run")


def _attempt(exchange: Callable[[], Any], retry_once: bool) -> Any:
    try:
        return exchange()
    except redis.ConnectionError:
        if not retry_once:
            raise
        return exchange()
