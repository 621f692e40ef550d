"""Funds reserved while calls are up, and the Redis-side debit at hangup (docs/accounting.md, "Funds").

Scheme: the WHOLE allowed duration is reserved at decision time, for every level of the
chain at the price that level pays, in the same atomic Redis step as the limits; nothing
is sent while the call is up; at hangup one script releases the reservation, adds the
real debit and queues the CDR for PostgreSQL, atomically and once per call UUID.

Available funds of one account (all amounts integer micro-units, 1e-6)::

    available = base - unrecorded - reserved
    base        = balance (+ credit_limit when postpaid), from the engine's snapshot
    unrecorded  = max(0, spent - recorded)
    spent       = Redis: every debit ever settled for the account (HSETNX-initialised
                  to ``recorded`` when Redis has none, e.g. after a restart)
    recorded    = the snapshot's ``accounts.calls_debited``: the debits PostgreSQL had
                  applied to the very balance the snapshot holds
    reserved    = Redis: what the account's open calls may still cost

``balance`` and ``calls_debited`` come from the same PostgreSQL row version, so
``spent - recorded`` is exactly the settled debits that balance does not include yet,
however far the CDR writer or the live sync lag, and in whatever order batches commit.

The duration granted is the longest ``d <= cap`` that every level can pay in full at its
own tariff (connect + initial block + whole increments): so the debit at hangup never
exceeds what was reserved, and all of an account's open calls together never cost more
than its available funds. A level that cannot pay its connect cost plus one minute
refuses the call (NO_SUFFICIENT_FUND), as the rules do.

The Lua is written as functions (``FUNDS_LUA``) so that the limits script can include it
and keep one round trip per call: call ``funds_check`` before taking any limit, and
``funds_take`` together with the limits (see docs/accounting.md, "Integration").

Key layout (``P`` = the configured key prefix)::

    P funds:acct:{id}   hash   spent, reserved (micro-units)
    P funds:res:{id}    zset   member = call uuid, score = the reservation's deadline (ms)
    P funds:amt:{id}    hash   call uuid -> micro-units it reserved on this account
    P funds:call:{uuid} hash   d (granted s), st ('1' once settled): idempotency per call
    P cdrs              stream one entry per settled call: the CDR for PostgreSQL
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import redis

from engine.billing.rating import MICROS, Tariff, from_micros, to_micros
from engine.state.direct import DirectConnections
from engine.state.funds import FUNDS_LUA, FundsRequest
from engine.state.keys import (
    cdr_stream,
    funds_account_key,
    funds_account_pattern,
    funds_amounts_key,
    funds_call_key,
    funds_reservations_key,
)

__all__ = [
    "FUNDS_LUA",
    "Funds",
    "FundsLevel",
    "FundsUnavailable",
    "Reservation",
    "Settlement",
    "cdr_stream",
]


funds_key = funds_account_key
reservations_key = funds_reservations_key
amounts_key = funds_amounts_key
call_key = funds_call_key


def cdr_json(cdr: Mapping[str, Any]) -> str:
    """A CDR as the settle script queues it: ``json.dumps(dict(cdr), separators=(",", ":"),
    default=str)``, character for character (tests/billing/test_hangup_side.py), without
    building a ``JSONEncoder`` and its C encoder for every call (json.dumps does, when given
    any option). The C encoder is built once, without the circular-reference check (a CDR
    is a flat record of scalars and lists of scalars)."""
    record = cdr if type(cdr) is dict else dict(cdr)
    if _CDR_CHUNKS is None:  # pragma: no cover - CPython always has the C encoder
        return json.dumps(record, separators=(",", ":"), default=str)
    return "".join(_CDR_CHUNKS(record, 0))


# markers, default, encoder, indent, key separator, item separator, sort_keys, skipkeys, allow_nan:
# what JSONEncoder.iterencode gives the C encoder for separators=(",", ":"), default=str.
_C_MAKE_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)  # untyped in typeshed
_CDR_CHUNKS: Callable[[dict[str, Any], int], Any] | None = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
)
_KEYS_CACHE_MAX = 4096


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class FundsUnavailable(Exception):
    """Redis could not be asked: no funds decision (the engine answers ENGINE_DEGRADED)."""


# --------------------------------------------------------------------------- Lua

# KEYS: call record, then per level: acct, res, amt.
# ARGV: now_ms or '', uuid, cap seconds, margin ms (ringing/failover before the answer),
#   keep ms (TTL of the account keys), n levels, then 8 per level (see FUNDS_LUA).
# Returns {1, d} reserved, {0, level} refused, {2, d} already reserved (same uuid).
_RESERVE = (
    FUNDS_LUA
    + """
local rec = KEYS[1]
local prior = redis.call('HGET', rec, 'd')
if prior then return {2, tonumber(prior)} end
local now = funds_now(ARGV[1])
local uuid, cap, margin, keep, nlev = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), tonumber(ARGV[6])
local d = funds_check(2, 6, nlev, now, cap)
if d < 0 then return {0, -d} end
local deadline = now + d * 1000 + margin
funds_take(2, 6, nlev, uuid, d, deadline, keep)
redis.call('HSET', rec, 'd', d)
redis.call('PEXPIRE', rec, d * 1000 + margin + keep)
return {1, d}
"""
)

# KEYS: call record, cdr stream, then per level: acct, res, amt.
# ARGV: uuid, keep ms (TTL of the account keys), (unused), CDR JSON, n levels, then 3 per
#   level: account id, recorded (snapshot), debit (micro-units); last: how long (ms) the
#   settled call is remembered.
# Returns 1 settled now, 0 already settled (nothing done).
_SETTLE = (
    FUNDS_LUA
    + """
local rec = KEYS[1]
if redis.call('HGET', rec, 'st') == '1' then return 0 end
local uuid, keep, nlev = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
for i = 1, nlev do
  local k, a = 3 + 3 * (i - 1), 5 + 3 * (i - 1)
  funds_release(KEYS[k], KEYS[k + 1], KEYS[k + 2], uuid)
  redis.call('HSETNX', KEYS[k], 'spent', ARGV[a + 2])
  local debit = tonumber(ARGV[a + 3])
  if debit ~= 0 then redis.call('HINCRBY', KEYS[k], 'spent', debit) end
  if redis.call('PTTL', KEYS[k]) < keep then redis.call('PEXPIRE', KEYS[k], keep) end
end
-- never trimmed here: an unwritten CDR must not be cut; the writer trims what it has committed
redis.call('XADD', KEYS[2], '*', 'uuid', uuid, 'cdr', ARGV[4])
redis.call('HSET', rec, 'st', '1')
redis.call('PEXPIRE', rec, tonumber(ARGV[6 + 3 * nlev]))
return 1
"""
)

# KEYS: acct hashes. ARGV: micro-units to take back from each one's spent (only where spent exists:
# a restarted Redis starts spent from PostgreSQL's figure, which never counted the duplicate).
_TAKE_BACK = """
for i = 1, #KEYS do
  if redis.call('HEXISTS', KEYS[i], 'spent') == 1 then
    redis.call('HINCRBY', KEYS[i], 'spent', -tonumber(ARGV[i]))
  end
end
return 1
"""

# KEYS: call record, then per level: acct, res, amt. ARGV: uuid. Drop an unused reservation
# (the call was refused by a later check, or never answered and is settled by a CDR anyway).
_RELEASE = (
    FUNDS_LUA
    + """
for k = 2, #KEYS, 3 do funds_release(KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[1]) end
redis.call('HDEL', KEYS[1], 'd')
return 1
"""
)


class _Script:
    """EVALSHA, falling back to EVAL (which caches the script) on NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def run(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            try:
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                return client.eval(self.source, len(keys), *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc


_RESERVE_SCRIPT = _Script(_RESERVE)
_SETTLE_SCRIPT = _Script(_SETTLE)
_RELEASE_SCRIPT = _Script(_RELEASE)
_TAKE_BACK_SCRIPT = _Script(_TAKE_BACK)


# --------------------------------------------------------------------------- Python side


def _ceil_micros(amount: Decimal) -> int:
    """A price as micro-units, rounded UP: a reservation is never smaller than the real cost."""
    return math.ceil(amount * MICROS)


@dataclass(frozen=True, slots=True)
class FundsLevel:
    """One chain member as the snapshot shows it, with the tariff it pays for this call."""

    account_id: int
    base: Decimal  # balance (+ credit_limit when postpaid): Account.available_credit
    recorded: Decimal  # accounts.calls_debited in the same snapshot
    tariff: Tariff

    def args(self) -> list[int]:
        t = self.tariff
        return [
            self.account_id,
            to_micros(self.base),
            to_micros(self.recorded),
            _ceil_micros(t.connect_cost),
            _ceil_micros(t.cost_per_minute),
            max(0, t.included_seconds),
            t.initial,
            t.increment,
        ]


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    seconds: int = 0  # the duration every level can pay (<= the cap asked for)
    refused_level: int | None = None  # 0-based chain position that cannot pay
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Settlement:
    """One call's Redis-side debit: per level (account id, recorded, debit), and its CDR."""

    uuid: str
    debits: tuple[tuple[int, Decimal, Decimal], ...]
    cdr: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AccountFunds:
    spent: Decimal | None  # None: Redis has nothing for the account yet
    reserved: Decimal
    open_calls: int


class Funds:
    """Reservations and Redis-side debits (thread-safe: holds no mutable state)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        *,
        margin_seconds: int = 300,
        keep_seconds: int = 7 * 86400,
        settled_seconds: int = 3600,
        direct: DirectConnections | None = None,
    ) -> None:
        """``margin_seconds``: how long a reservation outlives its duration (ringing, failover
        before the answer) when its hangup is never seen; ``keep_seconds``: how long an idle
        account's funds keys live; ``settled_seconds``: how long a settled call is remembered
        (a duplicate hangup within it does nothing; a later one is corrected by the CDR writer,
        :meth:`take_back`). One small hash per call for that long: ~2000 calls/s x 3600 s = 7.2 M
        hashes, size it to the Redis memory.

        ``direct``: the engine's direct connections (engine.state.direct, one gevent hub):
        :meth:`settle_many` then runs on them, without redis-py's pipeline machinery and its
        argument encoder (the same bytes on the wire, tests/billing/test_funds_direct.py).
        Everything else keeps ``client``."""
        self._client = client
        self._direct = direct
        self._prefix = prefix
        self._margin_ms = margin_seconds * 1000
        self._keep_ms = keep_seconds * 1000
        self._settled_ms = settled_seconds * 1000
        self._cdr_stream = cdr_stream(prefix)
        self._keys_cache: dict[int, tuple[str, str, str]] = {}

    def _level_keys(self, account_ids: Sequence[int]) -> list[str]:
        keys: list[str] = []
        for account_id in account_ids:
            keys += [
                funds_key(self._prefix, account_id),
                reservations_key(self._prefix, account_id),
                amounts_key(self._prefix, account_id),
            ]
        return keys

    def request(self, levels: Sequence[FundsLevel], cap_seconds: int) -> FundsRequest:
        """The reservation as the limits acquire script takes it (one round trip with the limits)."""
        return FundsRequest(
            levels=tuple(tuple(level.args()) for level in levels),
            cap_seconds=max(0, cap_seconds),
            margin_ms=self._margin_ms,
            keep_ms=self._keep_ms,
        )

    def reserve(
        self, uuid: str, levels: Sequence[FundsLevel], cap_seconds: int, *, now_ms: int | None = None
    ) -> Reservation:
        keys = [call_key(self._prefix, uuid), *self._level_keys([lv.account_id for lv in levels])]
        args: list[Any] = [
            "" if now_ms is None else now_ms,
            uuid,
            max(0, cap_seconds),
            self._margin_ms,
            self._keep_ms,
            len(levels),
        ]
        for level in levels:
            args += level.args()
        status, value = _RESERVE_SCRIPT.run(self._client, keys, args)
        if int(status) == 0:
            return Reservation(False, refused_level=int(value) - 1)
        return Reservation(True, int(value), duplicate=int(status) == 2)

    def release(self, uuid: str, account_ids: Sequence[int]) -> None:
        keys = [call_key(self._prefix, uuid), *self._level_keys(account_ids)]
        _RELEASE_SCRIPT.run(self._client, keys, [uuid])

    def reserved_calls(self, *, count: int = 1000) -> set[str]:
        """Every call holding a reservation on any account (a SCAN of the funds hashes: for the
        reconciler, never a call)."""
        prefix = funds_account_key(self._prefix, 0)[:-1]
        try:
            accounts = [
                int(_text(k)[len(prefix) :])
                for k in self._client.scan_iter(match=funds_account_pattern(self._prefix), count=count)
            ]
            members: set[str] = set()
            for account_id in accounts:
                listed = self._client.zrange(reservations_key(self._prefix, account_id), 0, -1)
                members.update(_text(member) for member in cast("list[bytes]", listed))
            return members
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def release_calls(self, call_uuids: Sequence[str], *, count: int = 1000) -> list[str]:
        """Release the reservations of these calls on whatever accounts hold them, no debit (the
        reconciler's orphans: calls no switch knows, whose hangup was never seen). A SCAN of the
        accounts' funds hashes: O(accounts with funds state), for a periodic job, never a call.
        Returns the uuids that held a reservation."""
        wanted = list(dict.fromkeys(call_uuids))
        if not wanted:
            return []
        prefix = funds_account_key(self._prefix, 0)[:-1]
        found: dict[str, list[int]] = {}
        try:
            accounts = [
                int(_text(k)[len(prefix) :])
                for k in self._client.scan_iter(match=funds_account_pattern(self._prefix), count=count)
            ]
            for account_id in accounts:
                scores = self._client.zmscore(reservations_key(self._prefix, account_id), wanted)
                for uuid, score in zip(wanted, scores, strict=True):
                    if score is not None:
                        found.setdefault(uuid, []).append(account_id)
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for uuid, account_ids in found.items():
            self.release(uuid, account_ids)
        return list(found)

    def _account_keys(self, account_id: int) -> tuple[str, str, str]:
        """An account's three funds keys, from a cache: the same accounts settle call after
        call, and three f-strings per level and call were ~2 % of a settlement's cost."""
        keys = self._keys_cache.get(account_id)
        if keys is None:
            if len(self._keys_cache) >= _KEYS_CACHE_MAX:
                self._keys_cache.clear()  # bounded: dropped whole (rebuilt in microseconds)
            prefix = self._prefix
            keys = self._keys_cache[account_id] = (
                funds_key(prefix, account_id),
                reservations_key(prefix, account_id),
                amounts_key(prefix, account_id),
            )
        return keys

    def _settle_call(self, item: Settlement) -> tuple[list[str], list[Any]]:
        """The settle script's KEYS and ARGV for one call (the layout of ``_SETTLE``)."""
        keys = [call_key(self._prefix, item.uuid), self._cdr_stream]
        args: list[Any] = [item.uuid, self._keep_ms, "", cdr_json(item.cdr), len(item.debits)]
        account_keys = self._account_keys
        for account_id, recorded, debit in item.debits:
            keys += account_keys(account_id)
            args += (account_id, to_micros(recorded), to_micros(debit))
        args.append(self._settled_ms)
        return keys, args

    def settle(self, item: Settlement) -> bool:
        """Release the reservation, add the debit, queue the CDR; False if already settled."""
        keys, args = self._settle_call(item)
        return int(_SETTLE_SCRIPT.run(self._client, keys, args)) == 1

    def take_back(self, amounts: Mapping[int, Decimal]) -> None:
        """Undo the ``spent`` increments of hangups that were settled twice (the CDR writer found
        their CDR already stored from another stream entry)."""
        if amounts:
            keys = [funds_key(self._prefix, account_id) for account_id in amounts]
            _TAKE_BACK_SCRIPT.run(self._client, keys, [to_micros(a) for a in amounts.values()])

    def settle_many(self, items: Sequence[Settlement]) -> list[bool]:
        """``settle`` for many calls in one round trip (hangups are batched).

        The script is loaded first (``SCRIPT LOAD``: a Redis restarted since the last batch
        has no script cache), then one EVALSHA per call. An error reply fails the batch like a
        lost connection (FundsUnavailable; the settler sends it again: a call settled by the
        first attempt answers "already settled", nothing is debited twice)."""
        if not items:
            return []
        if self._direct is not None:
            return self._settle_direct(items, self._direct)
        try:
            self._client.script_load(_SETTLE)
            with self._client.pipeline(transaction=False) as pipe:
                for item in items:
                    keys, args = self._settle_call(item)
                    pipe.evalsha(_SETTLE_SCRIPT.sha, len(keys), *keys, *args)
                return [int(r) == 1 for r in pipe.execute()]
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _settle_direct(self, items: Sequence[Settlement], direct: DirectConnections) -> list[bool]:
        # The same commands as the redis-py path, in one write instead of two round trips: the
        # SCRIPT LOAD leads the pipeline, so every EVALSHA after it finds the script.
        commands: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", _SETTLE)]
        sha = _SETTLE_SCRIPT.sha
        settle_call = self._settle_call
        for item in items:
            keys, args = settle_call(item)
            commands.append(("EVALSHA", sha, len(keys), *keys, *args))
        try:
            # Safe to repeat after a lost connection: the script settles a call once.
            replies = direct.execute_many(commands, retry_once=True)
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        for reply in replies:
            if isinstance(reply, redis.exceptions.RedisError):
                raise FundsUnavailable(f"{type(reply).__name__}: {reply}") from reply
        return [int(reply) == 1 for reply in replies[1:]]

    def account(self, account_id: int) -> AccountFunds:
        """What Redis holds for one account (``callgate explain``, metrics)."""
        try:
            with self._client.pipeline(transaction=False) as pipe:
                pipe.hmget(funds_key(self._prefix, account_id), "spent", "reserved")
                pipe.zcard(reservations_key(self._prefix, account_id))
                (spent, reserved), count = pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return AccountFunds(
            None if spent is None else from_micros(int(spent)),
            from_micros(int(reserved or 0)),
            int(count),
        )

    def totals(self, *, count: int = 1000) -> tuple[Decimal, int]:
        """(funds reserved by all open calls, number of open reservations), for the metrics.

        A SCAN over the accounts' funds hashes: O(accounts with funds state); run it every
        few seconds at most, never on the call path."""
        reserved = 0
        open_calls = 0
        prefix = funds_account_key(self._prefix, 0)[:-1]  # the hashes' common start
        try:
            keys = [
                _text(k)
                for k in self._client.scan_iter(match=funds_account_pattern(self._prefix), count=count)
            ]
            for start in range(0, len(keys), count):
                chunk = keys[start : start + count]
                with self._client.pipeline(transaction=False) as pipe:
                    for key in chunk:
                        pipe.hget(key, "reserved")
                        pipe.zcard(reservations_key(self._prefix, int(key[len(prefix) :])))
                    replies = pipe.execute()
                reserved += sum(int(r or 0) for r in replies[0::2])
                open_calls += sum(int(n) for n in replies[1::2])
        except redis.exceptions.RedisError as exc:
            raise FundsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return from_micros(reserved), open_calls

    def available(self, level: FundsLevel) -> Decimal:
        """base - unrecorded - reserved as the next reservation would see it (reads only)."""
        state = self.account(level.account_id)
        spent = level.recorded if state.spent is None else state.spent
        unrecorded = max(Decimal(0), spent - level.recorded)
        return level.base - unrecorded - state.reserved
