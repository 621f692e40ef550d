"""Concurrent-call and CPS limits shared by every engine process and host (decision-rules §7).

One Lua script per call checks and takes every limit atomically in one round trip;
release is one more (:meth:`Limiter.release_many` pipelines the releases of many calls
into a single round trip). Counters heal themselves: each counted call carries a deadline
after which it stops counting, every key has a TTL, and :mod:`engine.reconcile`
removes calls that no FreeSWITCH still has.

Subjects and levels
-------------------
A call is counted against its *mandatory levels* (the account, every reseller up its
chain, the DID of an inbound DID call) and against *one trunk*: the first candidate
trunk, in route order, that has room. A full mandatory level refuses the call and
takes nothing (all-or-nothing). A full trunk is skipped and dropped from the route
list (§6); when every candidate trunk is full the call is refused with
``TERMINATION_RATE_NOT_FOUND`` ("no route left", as §6 says; the detail names the
limits). A subject whose limits are both 0 (unlimited) is never sent to Redis, and a
plan without any limit costs no round trip at all. An unlimited trunk always has room:
trunks after it in the route order are checked (full ones are still dropped from the
failover list) but never counted.

Trade-off: the call is counted on the trunk it is *expected* to leave by. Failover legs
that end up on a later trunk are not counted there unless the engine calls
:meth:`Limiter.move_trunk` when ``CHANNEL_BRIDGE`` shows which trunk carried the call.

An account's own calls and the calls of its customers share one counter: an account
id is one subject whether it appears as the calling account or as a reseller.

Channel limit
-------------
``max_channels`` N: at most N counted calls at once. A call counts from the moment it is
admitted until it is released, or until its deadline ``admission + hold_seconds +
margin_seconds`` passes (the engine passes the call's maximum duration as
``hold_seconds``; the margin covers ringing and failover). A subject only counts the
calls admitted while its channel limit was non-zero.

CPS limit (definition)
----------------------
``cps`` N: a sliding-window log. A call admitted at time t is allowed when fewer than N
calls were admitted on that subject in the half-open window ``(t - 1000 ms, t]``; so no
interval of 1000 ms ever holds more than N admissions, and there is no 2x burst at a
window edge as with a fixed one-second window: N calls at t=0.999 s use the whole budget
until t=1.999 s, when the window no longer contains them. Times are whole milliseconds.
Released calls keep counting in the CPS window (it counts admissions, not live calls).
Only admitted calls are logged; refused attempts do not consume CPS budget.

Clock
-----
By default the script reads Redis's own clock (``TIME``), so engines on several hosts
with skewed clocks agree. A ``clock`` (seconds since the epoch) may be injected instead,
for tests or for a deployment that trusts its hosts' time; then it is passed to the script.

Key layout (``P`` = the configured key prefix)
----------------------------------------------
::

    P limits:ch:acct:{id}      zset   member = call uuid, score = deadline (ms); the live calls
    P limits:ch:did:{id}       zset     of an account (as customer or reseller), a DID, a trunk
    P limits:ch:trunk:{id}     zset
    P limits:cps:acct:{id}     zset   member = call uuid, score = admission time (ms): the
    P limits:cps:did:{id}      zset     CPS log; PEXPIRE 1 s + slack after each admission
    P limits:cps:trunk:{id}    zset
    P limits:calls             zset   registry: every counted call, uuid -> deadline (ms)
    P limits:call:{uuid}       hash   at (admission ms), dl (deadline ms), trunk (id or ""),
                                      tk (the trunk channel key held, if any), and one field
                                      "k:<key>" per channel zset the call is counted in

Every key carries a TTL of at least its latest deadline plus ``slack_seconds``, so idle
subjects leave nothing behind. Expired members are purged by the next acquire on that
subject. The client must be a plain (non-cluster) ``redis.Redis``: the release scripts
touch keys named in the call record.

Failures
--------
Every Redis error (connection refused, timeout, OOM, read-only replica, ...) raises
:class:`LimitsUnavailable`; the engine then rejects with ``ENGINE_DEGRADED`` (fail
closed, §9). :class:`FailOpenLimiter` is the opt-in fail-open for limits only: a local,
per-process approximation while Redis is unreachable, each such decision counted, and
:meth:`FailOpenLimiter.resync` re-registering the locally admitted calls still up once
Redis is back.

Acquire is idempotent per call uuid (a retried acquire whose first attempt did run
returns the first admission), so a client-side retry after a timeout is harmless.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import hashlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from engine.decision import Accept, Decision, Reason, Reject, Step
from engine.state.direct import DirectConnections

__all__ = [
    "WINDOW_MS",
    "FailOpenLimiter",
    "LevelKind",
    "LevelUsage",
    "LimitKind",
    "LimitPlan",
    "LimitResult",
    "Limiter",
    "LimitsUnavailable",
    "SkippedTrunk",
    "Subject",
    "apply_limits",
]

WINDOW_MS = 1000
"""The CPS window: at most ``cps`` admissions in any 1000 ms."""


class LimitsUnavailable(Exception):
    """Redis could not be asked (down, too slow, refusing writes): no limit decision."""


class LevelKind(enum.StrEnum):
    ACCOUNT = "account"
    RESELLER = "reseller"
    DID = "did"
    TRUNK = "trunk"


class LimitKind(enum.StrEnum):
    CHANNELS = "channels"
    CPS = "cps"


_KIND_CODES = {1: LimitKind.CHANNELS, 2: LimitKind.CPS}
_KEY_GROUP = {
    LevelKind.ACCOUNT: "acct",
    LevelKind.RESELLER: "acct",  # one counter per account id, whatever its role in the call
    LevelKind.DID: "did",
    LevelKind.TRUNK: "trunk",
}


@dataclass(frozen=True, slots=True)
class Subject:
    """One counted thing and its limits (0 = unlimited)."""

    level: LevelKind
    id: int
    max_channels: int = 0
    cps: int = 0

    @property
    def limited(self) -> bool:
        return self.max_channels > 0 or self.cps > 0

    @property
    def label(self) -> str:
        return f"{self.level} {self.id}"


@dataclass(frozen=True, slots=True)
class LimitPlan:
    """What one call is counted against: the mandatory levels, then the candidate trunks
    in route order. Unlimited subjects are kept (``explain`` shows them) but never sent."""

    levels: tuple[Subject, ...] = ()
    trunks: tuple[Subject, ...] = ()

    @property
    def limited(self) -> bool:
        return any(s.limited for s in self.levels) or any(t.limited for t in self.trunks)

    @property
    def trunk_ids(self) -> tuple[int, ...]:
        return tuple(t.id for t in self.trunks)


@dataclass(frozen=True, slots=True)
class SkippedTrunk:
    trunk_id: int
    kind: LimitKind


@dataclass(frozen=True, slots=True)
class LimitResult:
    """The outcome of :meth:`Limiter.acquire`.

    Admitted: ``trunk_ids`` is the route order to dial (candidates minus the trunks found
    full; its first trunk is the one the call is counted on when that trunk is limited,
    ``counted_trunk_id``). Refused: ``level``/``subject_id``/``kind`` name the full
    mandatory level, or ``skipped`` lists every trunk and why when no trunk had room.
    """

    admitted: bool
    trunk_ids: tuple[int, ...] = ()
    counted_trunk_id: int | None = None
    skipped: tuple[SkippedTrunk, ...] = ()
    level: LevelKind | None = None
    subject_id: int | None = None
    kind: LimitKind | None = None
    degraded: bool = False  # decided by FailOpenLimiter's local approximation
    duplicate: bool = False  # this uuid was already admitted; that admission is returned

    @property
    def reason(self) -> Reason | None:
        """The reject reason for a refused call (None when admitted)."""
        if self.admitted:
            return None
        if self.level is None:
            return Reason.TERMINATION_RATE_NOT_FOUND  # every candidate trunk is full (§6)
        return Reason.CPS_LIMIT if self.kind is LimitKind.CPS else Reason.CONCURRENT_LIMIT

    @property
    def detail(self) -> str:
        skipped = ", ".join(f"trunk {s.trunk_id} ({s.kind})" for s in self.skipped)
        if self.admitted:
            text = "within limits"
            if self.counted_trunk_id is not None:
                text += f", counted on trunk {self.counted_trunk_id}"
            if skipped:
                text += f"; skipped full {skipped}"
            return text + (" [local approximation: Redis unreachable]" if self.degraded else "")
        if self.level is None:
            return f"every candidate trunk is at its limit: {skipped}"
        limit = "channel" if self.kind is LimitKind.CHANNELS else "CPS"
        text = f"{self.level} {self.subject_id} is at its {limit} limit"
        return text + (" [local approximation: Redis unreachable]" if self.degraded else "")


@dataclass(frozen=True, slots=True)
class LevelUsage:
    """Current use of one subject, for ``callgate explain``. ``None`` = not counted (unlimited)."""

    level: LevelKind
    id: int
    channels: int | None
    max_channels: int
    calls_last_second: int | None
    cps: int


def apply_limits(accept: Accept, result: LimitResult) -> Decision:
    """The decision after the limits: the Accept with full trunks dropped, or a Reject."""
    if result.admitted:
        routes = accept.routes
        if result.trunk_ids != tuple(r.trunk_id for r in routes):
            keep = set(result.trunk_ids)
            routes = tuple(r for r in routes if r.trunk_id in keep)
        steps = (*accept.steps, Step("limits", result.detail))
        return dataclasses.replace(accept, routes=routes, steps=steps)
    reason = result.reason
    assert reason is not None
    return Reject(
        reason=reason,
        account_id=accept.account_id,
        detail=result.detail,
        steps=(*accept.steps, Step("limits", result.detail)),
    )


# --------------------------------------------------------------------------- Lua

# Shared helpers, prepended to every script.
_LUA_COMMON = """
local function clock_ms(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
local function drop_holdings(rec, uuid)
  local fields = redis.call('HKEYS', rec)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 2) == 'k:' then redis.call('ZREM', string.sub(f, 3), uuid) end
  end
  if #fields > 0 then redis.call('DEL', rec) end
  return #fields > 0
end
"""

# KEYS: registry, call record, then per subject (levels first, then limited trunks):
#   channel zset, cps zset.
# ARGV: now_ms or '', hold_ms, uuid, n_levels, n_trunks, window_ms, slack_ms,
#   fallback ('1': an unlimited trunk exists, so the call has a route even if every
#   limited trunk is full), then per level: max_channels, cps; per trunk: max_channels,
#   cps, candidate ('1' when no unlimited trunk precedes it), trunk id.
# Returns {1, chosen trunk index or 0, skipped...} admitted; {0, level index, kind} a
#   level is full; {2, 0, skipped...} no trunk has room; {3, trunk id or ''} already
#   admitted. skipped = pairs (trunk index, kind); kind 1 = channels, 2 = cps.
_ACQUIRE = (
    _LUA_COMMON
    + """
local now = clock_ms(ARGV[1])
local hold = tonumber(ARGV[2])
local uuid = ARGV[3]
local nlev = tonumber(ARGV[4])
local ntr = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local slack = tonumber(ARGV[7])
local reg, rec = KEYS[1], KEYS[2]

local prior = redis.call('HMGET', rec, 'at', 'trunk')
if prior[1] then return {3, prior[2] or ''} end

local function arg_at(i)
  if i <= nlev then return 9 + 2 * (i - 1) end
  return 9 + 2 * nlev + 4 * (i - nlev - 1)
end

local function full(i)
  local a = arg_at(i)
  local ch, cps = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  if ch > 0 then
    local k = KEYS[1 + 2 * i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
    if redis.call('ZCARD', k) >= ch then return 1 end
  end
  if cps > 0 then
    local k = KEYS[2 + 2 * i]
    redis.call('ZREMRANGEBYSCORE', k, '-inf', now - window)
    if redis.call('ZCARD', k) >= cps then return 2 end
  end
  return 0
end

for i = 1, nlev do
  local f = full(i)
  if f > 0 then return {0, i, f} end
end
local chosen = 0
local skipped = {}
for j = 1, ntr do
  local f = full(nlev + j)
  if f > 0 then
    skipped[#skipped + 1] = j
    skipped[#skipped + 1] = f
  elseif chosen == 0 and ARGV[arg_at(nlev + j) + 2] == '1' then
    chosen = j
  end
end
if ntr > 0 and chosen == 0 and ARGV[8] ~= '1' then
  return {2, 0, unpack(skipped)}
end

local deadline = now + hold
local keep = hold + slack
local fields = {'at', now, 'dl', deadline, 'trunk', ''}
local function take(i)
  local a = arg_at(i)
  if tonumber(ARGV[a]) > 0 then
    local k = KEYS[1 + 2 * i]
    redis.call('ZADD', k, deadline, uuid)
    extend(k, keep)
    fields[#fields + 1] = 'k:' .. k
    fields[#fields + 1] = '1'
  end
  if tonumber(ARGV[a + 1]) > 0 then
    local k = KEYS[2 + 2 * i]
    redis.call('ZADD', k, now, uuid)
    redis.call('PEXPIRE', k, window + slack)
  end
end
for i = 1, nlev do take(i) end
if chosen > 0 then
  local i = nlev + chosen
  take(i)
  fields[6] = ARGV[arg_at(i) + 3]
  if tonumber(ARGV[arg_at(i)]) > 0 then
    fields[#fields + 1] = 'tk'
    fields[#fields + 1] = KEYS[1 + 2 * i]
  end
end
redis.call('HSET', rec, unpack(fields))
redis.call('PEXPIRE', rec, keep)
redis.call('ZREMRANGEBYSCORE', reg, '-inf', now)
redis.call('ZADD', reg, deadline, uuid)
extend(reg, keep)
return {1, chosen, unpack(skipped)}
"""
)

# KEYS: registry, call record. ARGV: uuid. Returns 1 if the call was counted, else 0.
_RELEASE = (
    _LUA_COMMON
    + """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if drop_holdings(KEYS[2], ARGV[1]) then return 1 end
return removed
"""
)

# KEYS: call record, the new trunk's channel zset.
# ARGV: now_ms or '', uuid, new trunk id, counted ('1' when the new trunk has a channel
#   limit), slack_ms. Returns 1 when the call was found, else 0.
_MOVE_TRUNK = (
    _LUA_COMMON
    + """
local rec, uuid = KEYS[1], ARGV[2]
local r = redis.call('HMGET', rec, 'dl', 'tk')
if not r[1] then return 0 end
local now = clock_ms(ARGV[1])
local dl = tonumber(r[1])
if r[2] and r[2] ~= '' then
  redis.call('ZREM', r[2], uuid)
  redis.call('HDEL', rec, 'k:' .. r[2], 'tk')
end
redis.call('HSET', rec, 'trunk', ARGV[3])
if ARGV[4] == '1' and dl > now then
  redis.call('ZADD', KEYS[2], dl, uuid)
  extend(KEYS[2], dl - now + tonumber(ARGV[5]))
  redis.call('HSET', rec, 'k:' .. KEYS[2], '1', 'tk', KEYS[2])
end
return 1
"""
)

# Re-register a call that is up without checking limits (fail-open resync).
# KEYS: registry, call record, then the channel zsets to count it in.
# ARGV: now_ms or '', hold_ms (remaining), uuid, slack_ms, trunk id or '', index in KEYS
#   of the trunk's channel zset (0 = none).
_REGISTER = (
    _LUA_COMMON
    + """
local now = clock_ms(ARGV[1])
local hold = tonumber(ARGV[2])
local uuid = ARGV[3]
local reg, rec = KEYS[1], KEYS[2]
drop_holdings(rec, uuid)
local deadline = now + hold
local keep = hold + tonumber(ARGV[4])
local fields = {'at', now, 'dl', deadline, 'trunk', ARGV[5]}
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], deadline, uuid)
  extend(KEYS[i], keep)
  fields[#fields + 1] = 'k:' .. KEYS[i]
  fields[#fields + 1] = '1'
end
local ti = tonumber(ARGV[6])
if ti > 0 then
  fields[#fields + 1] = 'tk'
  fields[#fields + 1] = KEYS[ti]
end
redis.call('HSET', rec, unpack(fields))
redis.call('PEXPIRE', rec, keep)
redis.call('ZADD', reg, deadline, uuid)
extend(reg, keep)
return 1
"""
)

# Release orphans found by reconciliation, except calls admitted within the grace period.
# KEYS: registry, then one call record per uuid. ARGV: now_ms or '', grace_ms, uuids...
# Returns {released uuids...}; young ones are left alone.
_RELEASE_ORPHANS = (
    _LUA_COMMON
    + """
local now = clock_ms(ARGV[1])
local grace = tonumber(ARGV[2])
local released = {}
for i = 2, #KEYS do
  local uuid = ARGV[i + 1]
  local at = redis.call('HGET', KEYS[i], 'at')
  if (not at) or now - tonumber(at) >= grace then
    local was = redis.call('ZREM', KEYS[1], uuid)
    if drop_holdings(KEYS[i], uuid) or was == 1 then released[#released + 1] = uuid end
  end
end
return released
"""
)

# KEYS: per subject, channel zset and cps zset. ARGV: now_ms or '', window_ms.
# Returns per subject: live calls, admissions in the current window.
_USAGE = (
    _LUA_COMMON
    + """
local now = clock_ms(ARGV[1])
local window = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS, 2 do
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i], string.format('(%d', now), '+inf')
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i + 1], string.format('(%d', now - window), '+inf')
end
return out
"""
)


class _Script:
    """EVALSHA, falling back to EVAL (which also caches the script) on NOSCRIPT."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(
        self,
        client: redis.Redis,
        keys: Sequence[str],
        args: Sequence[Any],
        direct: DirectConnections | None = None,
    ) -> Any:
        """Run the script through ``direct`` when given (the engine's hot path: the scripts
        are idempotent per call uuid, so a stale connection is retried once), else ``client``."""
        try:
            try:
                if direct is not None:
                    return direct.execute(("EVALSHA", self.sha, len(keys), *keys, *args), retry_once=True)
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                if direct is not None:
                    return direct.execute(("EVAL", self.source, len(keys), *keys, *args), retry_once=True)
                return client.eval(self.source, len(keys), *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise LimitsUnavailable(f"{type(exc).__name__}: {exc}") from exc


_ACQUIRE_SCRIPT = _Script(_ACQUIRE)
_RELEASE_SCRIPT = _Script(_RELEASE)
_MOVE_TRUNK_SCRIPT = _Script(_MOVE_TRUNK)
_REGISTER_SCRIPT = _Script(_REGISTER)
_RELEASE_ORPHANS_SCRIPT = _Script(_RELEASE_ORPHANS)
_USAGE_SCRIPT = _Script(_USAGE)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _find_did(catalog: Any, did_id: int) -> Any:
    """The catalog's DID with ``did_id``, whichever way the catalog indexes DIDs."""
    for name in ("dids_by_id", "dids"):
        index = getattr(catalog, name, None)
        if isinstance(index, Mapping):
            did = index.get(did_id)
            if did is not None and getattr(did, "id", None) == did_id:
                return did
            for did in index.values():
                if getattr(did, "id", None) == did_id:
                    return did
    return None


# --------------------------------------------------------------------------- Limiter


class Limiter:
    """Shared limits in Redis. Thread- and greenlet-safe (it holds no mutable state).

    ``client``: a plain ``redis.Redis`` (bytes or decoded responses); its socket timeout
    is the limits' deadline. ``clock``: seconds since the epoch, or None for Redis's
    clock. ``margin_seconds``: added to every call's hold before it stops counting.
    ``slack_seconds``: extra TTL on keys beyond their last deadline. ``direct``: the
    connections the per-call acquire uses instead of ``client`` (engine processes only,
    see :mod:`engine.state.direct`).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "callgate:",
        *,
        clock: Callable[[], float] | None = None,
        margin_seconds: int = 300,
        slack_seconds: int = 60,
        timer: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
        direct: DirectConnections | None = None,
    ) -> None:
        if margin_seconds < 0 or slack_seconds < 1:
            raise ValueError("margin_seconds must be >= 0 and slack_seconds >= 1")
        self.client = client
        self.direct = direct
        # Times each round trip by operation (the engine passes its metrics' redis_call).
        self.timer = timer or (lambda _operation: contextlib.nullcontext())
        self.prefix = prefix
        self.clock = clock
        self.margin_seconds = margin_seconds
        self.slack_seconds = slack_seconds
        self.registry_key = f"{prefix}limits:calls"

    # -- keys ------------------------------------------------------------------

    def channels_key(self, subject: Subject) -> str:
        return f"{self.prefix}limits:ch:{_KEY_GROUP[subject.level]}:{subject.id}"

    def cps_key(self, subject: Subject) -> str:
        return f"{self.prefix}limits:cps:{_KEY_GROUP[subject.level]}:{subject.id}"

    def call_key(self, call_uuid: str) -> str:
        return f"{self.prefix}limits:call:{call_uuid}"

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1000))

    def hold_ms(self, hold_seconds: int) -> int:
        if hold_seconds < 0:
            raise ValueError(f"hold_seconds must be >= 0, not {hold_seconds}")
        return (int(hold_seconds) + self.margin_seconds) * 1000

    # -- planning --------------------------------------------------------------

    @staticmethod
    def subjects_for(accept: Accept, catalog: Any) -> LimitPlan:
        """The levels (account, resellers, DID) and candidate trunks of an accepted call."""
        levels: list[Subject] = []
        seen: set[int] = set()
        for position, account_id in enumerate(accept.chain):
            if account_id in seen:  # a malformed chain: count each account once
                continue
            seen.add(account_id)
            account = catalog.accounts.get(account_id)
            kind = LevelKind.ACCOUNT if position == 0 else LevelKind.RESELLER
            if account is None:
                levels.append(Subject(kind, account_id))
            else:
                levels.append(Subject(kind, account_id, account.max_channels, account.cps))
        if accept.did_id is not None:
            did = _find_did(catalog, accept.did_id)
            levels.append(
                Subject(LevelKind.DID, accept.did_id, did.max_channels, did.cps)
                if did is not None
                else Subject(LevelKind.DID, accept.did_id)
            )
        trunks: list[Subject] = []
        seen_trunks: set[int] = set()
        for route in accept.routes:
            if route.trunk_id in seen_trunks:
                continue
            seen_trunks.add(route.trunk_id)
            trunk = catalog.trunks.get(route.trunk_id)
            trunks.append(
                Subject(LevelKind.TRUNK, route.trunk_id, trunk.max_channels, trunk.cps)
                if trunk is not None
                else Subject(LevelKind.TRUNK, route.trunk_id)
            )
        return LimitPlan(tuple(levels), tuple(trunks))

    # -- the hot path ----------------------------------------------------------

    def acquire(self, call_uuid: str, plan: LimitPlan, hold_seconds: int) -> LimitResult:
        """Check and take every limit of ``plan`` for ``call_uuid`` in one round trip."""
        levels = [s for s in plan.levels if s.limited]
        trunks: list[tuple[Subject, bool]] = []
        fallback = False
        for trunk in plan.trunks:
            if trunk.limited:
                trunks.append((trunk, not fallback))
            else:
                fallback = True
        if not levels and not trunks:
            return LimitResult(admitted=True, trunk_ids=plan.trunk_ids)
        hold_ms = self.hold_ms(hold_seconds)
        keys = [self.registry_key, self.call_key(call_uuid)]
        args: list[Any] = [
            self._now_arg(),
            hold_ms,
            call_uuid,
            len(levels),
            len(trunks),
            WINDOW_MS,
            self.slack_seconds * 1000,
            "1" if fallback else "0",
        ]
        for s in levels:
            keys += (self.channels_key(s), self.cps_key(s))
            args += (s.max_channels, s.cps)
        for t, candidate in trunks:
            keys += (self.channels_key(t), self.cps_key(t))
            args += (t.max_channels, t.cps, "1" if candidate else "0", t.id)
        with self.timer("limits"):
            reply = _ACQUIRE_SCRIPT(self.client, keys, args, self.direct)
        return self._result(reply, plan, levels, [t for t, _ in trunks])

    @staticmethod
    def _result(reply: list, plan: LimitPlan, levels: list[Subject], trunks: list[Subject]) -> LimitResult:
        status = int(reply[0])
        if status == 0:
            subject = levels[int(reply[1]) - 1]
            return LimitResult(
                admitted=False, level=subject.level, subject_id=subject.id, kind=_KIND_CODES[int(reply[2])]
            )
        if status == 3:
            held = _text(reply[1])
            counted = int(held) if held else None
            order = plan.trunk_ids
            if counted is not None and counted in order:
                order = (counted, *(t for t in order if t != counted))
            return LimitResult(admitted=True, trunk_ids=order, counted_trunk_id=counted, duplicate=True)
        pairs = reply[2:]
        skipped = tuple(
            SkippedTrunk(trunks[int(pairs[n]) - 1].id, _KIND_CODES[int(pairs[n + 1])])
            for n in range(0, len(pairs), 2)
        )
        if status == 2:
            return LimitResult(admitted=False, skipped=skipped)
        full = {s.trunk_id for s in skipped}
        chosen = int(reply[1])
        return LimitResult(
            admitted=True,
            trunk_ids=tuple(t for t in plan.trunk_ids if t not in full),
            counted_trunk_id=trunks[chosen - 1].id if chosen else None,
            skipped=skipped,
        )

    def release(self, call_uuid: str) -> bool:
        """Stop counting ``call_uuid`` everywhere. True if it was counted; a repeat is a no-op."""
        keys = (self.registry_key, self.call_key(call_uuid))
        with self.timer("release"):
            return bool(_RELEASE_SCRIPT(self.client, keys, (call_uuid,)))

    def release_many(self, call_uuids: Sequence[str]) -> int:
        """:meth:`release` for each call, in one pipelined round trip. Returns how many were
        counted. Releases are idempotent, so the batch is simply resent after a NOSCRIPT."""
        if not call_uuids:
            return 0
        with self.timer("release"):
            try:
                try:
                    replies = self._release_pipeline(call_uuids, load_script=False)
                except redis.exceptions.NoScriptError:
                    replies = self._release_pipeline(call_uuids, load_script=True)[1:]
            except redis.exceptions.RedisError as exc:
                raise LimitsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return sum(1 for reply in replies if int(reply))

    def _release_pipeline(self, call_uuids: Sequence[str], *, load_script: bool) -> list[Any]:
        if self.direct is not None:
            return self._release_direct(call_uuids, load_script=load_script)
        with self.client.pipeline(transaction=False) as pipe:
            if load_script:
                pipe.script_load(_RELEASE_SCRIPT.source)
            for call_uuid in call_uuids:
                pipe.evalsha(_RELEASE_SCRIPT.sha, 2, self.registry_key, self.call_key(call_uuid), call_uuid)
            return pipe.execute()

    def _release_direct(self, call_uuids: Sequence[str], *, load_script: bool) -> list[Any]:
        assert self.direct is not None
        commands: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", _RELEASE_SCRIPT.source)] if load_script else []
        commands += [
            ("EVALSHA", _RELEASE_SCRIPT.sha, 2, self.registry_key, self.call_key(call_uuid), call_uuid)
            for call_uuid in call_uuids
        ]
        replies = self.direct.execute_many(commands, retry_once=True)  # releases are idempotent
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply  # as a redis-py pipeline raises its first error
        return replies

    def move_trunk(self, call_uuid: str, trunk: Subject) -> bool:
        """Count the call on ``trunk`` instead of the trunk chosen at admission (call it
        when CHANNEL_BRIDGE shows that a failover leg carried the call). The new trunk's
        limit is not checked: the call is up, and counting it there is the truth."""
        keys = (self.call_key(call_uuid), self.channels_key(trunk))
        args = (
            self._now_arg(),
            call_uuid,
            trunk.id,
            "1" if trunk.max_channels > 0 else "0",
            self.slack_seconds * 1000,
        )
        return bool(_MOVE_TRUNK_SCRIPT(self.client, keys, args))

    # -- explain ---------------------------------------------------------------

    def usage(self, plan: LimitPlan) -> list[LevelUsage]:
        """Current channels and CPS of every subject in ``plan``, limited or not."""
        subjects = [*plan.levels, *plan.trunks]
        counted = [s for s in subjects if s.limited]
        values: dict[Subject, tuple[int, int]] = {}
        if counted:
            keys: list[str] = []
            for s in counted:
                keys += (self.channels_key(s), self.cps_key(s))
            reply = _USAGE_SCRIPT(self.client, keys, (self._now_arg(), WINDOW_MS))
            for n, s in enumerate(counted):
                values[s] = (int(reply[2 * n]), int(reply[2 * n + 1]))
        out = []
        for s in subjects:
            channels, recent = values.get(s, (None, None))
            out.append(
                LevelUsage(
                    level=s.level,
                    id=s.id,
                    channels=channels if s.max_channels > 0 else None,
                    max_channels=s.max_channels,
                    calls_last_second=recent if s.cps > 0 else None,
                    cps=s.cps,
                )
            )
        return out

    # -- reconciliation and resync ---------------------------------------------

    def counted_calls(self) -> dict[str, float]:
        """Every call the registry holds: uuid -> deadline (ms, in the limiter's clock)."""
        try:
            rows = self.client.zrange(self.registry_key, 0, -1, withscores=True)
        except redis.exceptions.RedisError as exc:
            raise LimitsUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return {_text(member): float(score) for member, score in rows}

    def release_orphans(self, call_uuids: Iterable[str], grace_seconds: float, batch: int = 500) -> list[str]:
        """Release the given calls, except those admitted less than ``grace_seconds`` ago
        (checked atomically per batch). Returns the uuids released."""
        uuids = list(call_uuids)
        released: list[str] = []
        grace_ms = round(grace_seconds * 1000)
        for start in range(0, len(uuids), batch):
            part = uuids[start : start + batch]
            keys = [self.registry_key, *(self.call_key(u) for u in part)]
            reply = _RELEASE_ORPHANS_SCRIPT(self.client, keys, (self._now_arg(), grace_ms, *part))
            released += [_text(u) for u in reply]
        return released

    def register(
        self,
        call_uuid: str,
        channel_subjects: Sequence[Subject],
        remaining_ms: int,
        trunk: Subject | None = None,
    ) -> None:
        """Count a call that is already up in ``channel_subjects`` (and ``trunk``) without
        checking any limit, replacing whatever Redis held for it (fail-open resync)."""
        keys = [self.registry_key, self.call_key(call_uuid)]
        keys += [self.channels_key(s) for s in channel_subjects if s.max_channels > 0]
        trunk_index = 0
        if trunk is not None and trunk.max_channels > 0:
            keys.append(self.channels_key(trunk))
            trunk_index = len(keys)
        args = (
            self._now_arg(),
            max(1, int(remaining_ms)),
            call_uuid,
            self.slack_seconds * 1000,
            "" if trunk is None else trunk.id,
            trunk_index,
        )
        _REGISTER_SCRIPT(self.client, keys, args)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.exceptions.RedisError:
            return False


# --------------------------------------------------------------------------- fail-open


@dataclass(slots=True)
class _LocalCall:
    levels: tuple[Subject, ...]  # limited mandatory levels
    trunk: Subject | None  # the trunk the call is counted on, if limited
    deadline: float  # monotonic seconds
    local: bool  # admitted by the approximation: not in Redis until resync


class FailOpenLimiter:
    """Opt-in fail-open for limits only (§9): Redis decides while it answers; while it does
    not, a per-process approximation does, and every such decision is counted.

    The approximation counts this process's own live calls per subject (every call it
    admitted, through Redis or locally, until released or past its deadline) and its own
    admissions per subject in the last 1000 ms, against each limit times ``local_share``
    (set it to 1/N with N engine processes to split the limits; rounded up, at least 1).
    Calls counted by other processes or hosts are invisible to it.

    After a Redis failure, Redis is not asked again for ``retry_after`` seconds (so an
    outage costs one timeout per interval, not one per call). When Redis answers again,
    the engine calls :meth:`resync` off the hot path: the calls admitted locally that
    are still up are registered in Redis (one script call each), and the releases that
    failed during the outage are replayed. ``pending_resync`` says when that is needed.

    ``degraded_decisions`` counts decisions taken locally; ``on_degraded(outcome)`` is
    called with "admitted" or "refused" for each, for the metrics.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        retry_after: float = 1.0,
        local_share: float = 1.0,
        on_degraded: Callable[[str], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < local_share <= 1:
            raise ValueError("local_share must be in (0, 1]")
        self.limiter = limiter
        self.retry_after = retry_after
        self.local_share = local_share
        self.on_degraded = on_degraded
        self.degraded_decisions = 0
        self._monotonic = monotonic
        self._lock = threading.Lock()  # a gevent lock once monkey-patched
        self._down_until = 0.0
        self._calls: dict[str, _LocalCall] = {}
        self._live: dict[str, dict[str, float]] = {}  # channel key -> uuid -> deadline
        self._admissions: dict[str, collections.deque[float]] = {}  # cps key -> times
        self._pending_releases: set[str] = set()

    # -- delegation ------------------------------------------------------------

    def subjects_for(self, accept: Accept, catalog: Any) -> LimitPlan:
        return self.limiter.subjects_for(accept, catalog)

    def usage(self, plan: LimitPlan) -> list[LevelUsage]:
        return self.limiter.usage(plan)

    def counted_calls(self) -> dict[str, float]:
        return self.limiter.counted_calls()

    def move_trunk(self, call_uuid: str, trunk: Subject) -> bool:
        with self._lock:
            call = self._calls.get(call_uuid)
            if call is not None:
                if call.trunk is not None:
                    self._live.get(self.limiter.channels_key(call.trunk), {}).pop(call_uuid, None)
                call.trunk = trunk if trunk.max_channels > 0 else None
                if call.trunk is not None:
                    self._live.setdefault(self.limiter.channels_key(trunk), {})[call_uuid] = call.deadline
                if call.local:
                    return True
        if self.degraded:
            return False
        try:
            return self.limiter.move_trunk(call_uuid, trunk)
        except LimitsUnavailable:
            self._trip()
            return False

    def release_orphans(self, call_uuids: Iterable[str], grace_seconds: float) -> list[str]:
        released = self.limiter.release_orphans(call_uuids, grace_seconds)
        with self._lock:
            for call_uuid in released:
                if call_uuid in self._calls and not self._calls[call_uuid].local:
                    self._forget(call_uuid)
        return released

    # -- state -----------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True while Redis is considered down (decisions are local)."""
        return self._monotonic() < self._down_until

    @property
    def pending_resync(self) -> int:
        """Locally admitted calls and failed releases waiting for :meth:`resync`."""
        with self._lock:
            return sum(1 for c in self._calls.values() if c.local) + len(self._pending_releases)

    def _trip(self) -> None:
        self._down_until = self._monotonic() + self.retry_after

    # -- hot path --------------------------------------------------------------

    def acquire(self, call_uuid: str, plan: LimitPlan, hold_seconds: int) -> LimitResult:
        if not plan.limited:
            return LimitResult(admitted=True, trunk_ids=plan.trunk_ids)
        if not self.degraded:
            try:
                result = self.limiter.acquire(call_uuid, plan, hold_seconds)
            except LimitsUnavailable:
                self._trip()
            else:
                if result.admitted and not result.duplicate:
                    self._record(call_uuid, plan, result, hold_seconds, local=False)
                return result
        result = self._decide_locally(call_uuid, plan, hold_seconds)
        with self._lock:
            self.degraded_decisions += 1
        if self.on_degraded is not None:
            self.on_degraded("admitted" if result.admitted else "refused")
        return result

    def release(self, call_uuid: str) -> bool:
        with self._lock:
            call = self._forget(call_uuid)
        if call is not None and call.local:
            return True
        if self.degraded:
            with self._lock:
                self._pending_releases.add(call_uuid)
            return call is not None
        try:
            return self.limiter.release(call_uuid)
        except LimitsUnavailable:
            self._trip()
            with self._lock:
                self._pending_releases.add(call_uuid)
            return call is not None

    def release_many(self, call_uuids: Sequence[str]) -> int:
        """:meth:`release` for each call (returns how many were counted), with the calls
        Redis must hear about sent in one :meth:`Limiter.release_many` round trip."""
        counted = 0
        remote: list[str] = []
        known = 0  # calls in ``remote`` that this process admitted through Redis
        with self._lock:
            for call_uuid in call_uuids:
                call = self._forget(call_uuid)
                if call is not None and call.local:
                    counted += 1
                    continue
                remote.append(call_uuid)
                known += call is not None
        if not remote:
            return counted
        if not self.degraded:
            try:
                return counted + self.limiter.release_many(remote)
            except LimitsUnavailable:
                self._trip()
        with self._lock:
            self._pending_releases.update(remote)
        return counted + known

    def resync(self, live_calls: Iterable[str] | None = None) -> int:
        """Register in Redis the locally admitted calls still up (all of them, or only
        those in ``live_calls``) and replay failed releases. Raises LimitsUnavailable if
        Redis is still down (what was not done stays pending). Returns the number of
        calls registered."""
        live = None if live_calls is None else set(live_calls)
        now = self._monotonic()
        with self._lock:
            pending = sorted(self._pending_releases)
            local = [(u, c) for u, c in self._calls.items() if c.local]
        if not pending and not local:
            return 0
        try:
            for call_uuid in pending:
                self.limiter.release(call_uuid)
                with self._lock:
                    self._pending_releases.discard(call_uuid)
            registered = 0
            for call_uuid, call in local:
                if (live is not None and call_uuid not in live) or call.deadline <= now:
                    with self._lock:
                        self._forget(call_uuid)
                    continue
                remaining_ms = (call.deadline - now) * 1000
                self.limiter.register(call_uuid, call.levels, remaining_ms, call.trunk)
                with self._lock:
                    if call_uuid in self._calls:
                        self._calls[call_uuid].local = False
                registered += 1
        except LimitsUnavailable:
            self._trip()
            raise
        self._down_until = 0.0
        return registered

    # -- the local approximation -----------------------------------------------

    def _local_limit(self, limit: int) -> int:
        return max(1, math.ceil(limit * self.local_share))

    def _full_locally(self, subject: Subject, now: float) -> LimitKind | None:
        if subject.max_channels > 0:
            calls = self._live.get(self.limiter.channels_key(subject))
            if calls:
                for call_uuid in [u for u, d in calls.items() if d <= now]:
                    del calls[call_uuid]
                if len(calls) >= self._local_limit(subject.max_channels):
                    return LimitKind.CHANNELS
        if subject.cps > 0:
            times = self._admissions.get(self.limiter.cps_key(subject))
            if times:
                while times and times[0] <= now - WINDOW_MS / 1000:
                    times.popleft()
                if len(times) >= self._local_limit(subject.cps):
                    return LimitKind.CPS
        return None

    def _decide_locally(self, call_uuid: str, plan: LimitPlan, hold_seconds: int) -> LimitResult:
        now = self._monotonic()
        with self._lock:
            if call_uuid in self._calls:
                call = self._calls[call_uuid]
                counted = call.trunk.id if call.trunk else None
                return LimitResult(
                    admitted=True,
                    trunk_ids=plan.trunk_ids,
                    counted_trunk_id=counted,
                    degraded=True,
                    duplicate=True,
                )
            for subject in plan.levels:
                if subject.limited and (kind := self._full_locally(subject, now)) is not None:
                    return LimitResult(
                        admitted=False, level=subject.level, subject_id=subject.id, kind=kind, degraded=True
                    )
            chosen: Subject | None = None
            skipped: list[SkippedTrunk] = []
            for trunk in plan.trunks:
                kind = self._full_locally(trunk, now) if trunk.limited else None
                if kind is not None:
                    skipped.append(SkippedTrunk(trunk.id, kind))
                elif chosen is None:
                    chosen = trunk
            if plan.trunks and chosen is None:
                return LimitResult(admitted=False, skipped=tuple(skipped), degraded=True)
            full = {s.trunk_id for s in skipped}
            result = LimitResult(
                admitted=True,
                trunk_ids=tuple(t for t in plan.trunk_ids if t not in full),
                counted_trunk_id=chosen.id if chosen is not None and chosen.limited else None,
                skipped=tuple(skipped),
                degraded=True,
            )
            self._record_locked(call_uuid, plan, result, hold_seconds, local=True, now=now)
            return result

    def _record(
        self, call_uuid: str, plan: LimitPlan, result: LimitResult, hold_seconds: int, *, local: bool
    ) -> None:
        with self._lock:
            self._record_locked(call_uuid, plan, result, hold_seconds, local=local, now=self._monotonic())

    def _record_locked(
        self,
        call_uuid: str,
        plan: LimitPlan,
        result: LimitResult,
        hold_seconds: int,
        *,
        local: bool,
        now: float,
    ) -> None:
        deadline = now + self.limiter.hold_ms(hold_seconds) / 1000
        levels = tuple(s for s in plan.levels if s.limited)
        trunk = next((t for t in plan.trunks if t.id == result.counted_trunk_id), None)
        for subject in (*levels, *((trunk,) if trunk is not None else ())):
            if subject.max_channels > 0:
                self._live.setdefault(self.limiter.channels_key(subject), {})[call_uuid] = deadline
            if subject.cps > 0:
                times = self._admissions.setdefault(self.limiter.cps_key(subject), collections.deque())
                times.append(now)
                while times and times[0] <= now - WINDOW_MS / 1000:
                    times.popleft()
        channel_trunk = trunk if trunk is not None and trunk.max_channels > 0 else None
        self._calls[call_uuid] = _LocalCall(levels, channel_trunk, deadline, local)
        if len(self._calls) % 1024 == 0:
            self._sweep(now)

    def _forget(self, call_uuid: str) -> _LocalCall | None:
        call = self._calls.pop(call_uuid, None)
        if call is None:
            return None
        for subject in (*call.levels, *((call.trunk,) if call.trunk is not None else ())):
            key = self.limiter.channels_key(subject)
            calls = self._live.get(key)
            if calls is not None:
                calls.pop(call_uuid, None)
                if not calls:
                    del self._live[key]
        return call

    def _sweep(self, now: float) -> None:
        """Drop calls past their deadline (their release was never seen)."""
        for call_uuid in [u for u, c in self._calls.items() if c.deadline <= now]:
            self._forget(call_uuid)
        for key in [k for k, times in self._admissions.items() if not times or times[-1] <= now - 1]:
            del self._admissions[key]
