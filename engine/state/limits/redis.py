"""The shared limits in Redis: the Lua scripts and :class:`Limiter`, their client.

One script per call checks and takes every limit atomically in one round trip
(:data:`_ACQUIRE`, the rule of ``engine.state.limits.plan`` written in Lua); release is
one more (:meth:`Limiter.release_many` pipelines the releases of many calls into a
single round trip). Counters heal themselves: each counted call carries a deadline
after which it stops counting, every key has a TTL, and :mod:`engine.reconcile` removes
calls that no FreeSWITCH still has.

Key layout (``P`` = the configured key prefix; names built in ``engine.state.keys``)
-----------------------------------------------------------------------------------------
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
Every Redis error raises :class:`LimitsUnavailable`. An error that leaves it unknown
whether an acquire ran (a timeout or a connection lost after the request was written)
raises :class:`LimitsAmbiguous`: the caller rejects the call but must release it, since
the script may have taken its slots. Acquire is idempotent per call uuid (a retried
acquire whose first attempt did run returns the first admission), and release of a
call that holds nothing is a no-op.

(About 600 lines, a third of them Lua: the scripts and the client that builds their
KEYS/ARGV are kept together so that each argument layout is read next to its script.)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import redis

from engine.decision import Accept
from engine.state import keys as key_names
from engine.state.direct import DirectConnections
from engine.state.funds import FUNDS_LUA, FundsRequest
from engine.state.limits.backend import LimitsAmbiguous, LimitsUnavailable
from engine.state.limits.plan import (
    WINDOW_MS,
    LevelKind,
    LevelUsage,
    LimitKind,
    LimitPlan,
    LimitResult,
    LimitsCatalog,
    SkippedTrunk,
    Subject,
    decide,
    plan_for,
)

__all__ = ["Limiter"]

_KIND_CODES = {1: LimitKind.CHANNELS, 2: LimitKind.CPS}
#: Entries per counter group in a Limiter's cache of subject keys (~1.5 MB per group when full).
_KEY_CACHE_SIZE = 4096
_KEY_GROUP = {
    LevelKind.ACCOUNT: "acct",
    LevelKind.RESELLER: "acct",  # one counter per account id, whatever its role in the call
    LevelKind.DID: "did",
    LevelKind.TRUNK: "trunk",
}


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
local function hold_in(fields, first, last, trunk_index, deadline, keep, uuid)
  -- count the call in KEYS[first..last] until deadline, and list them in its record's fields
  for i = first, last do
    redis.call('ZADD', KEYS[i], deadline, uuid)
    extend(KEYS[i], keep)
    fields[#fields + 1] = 'k:' .. KEYS[i]
    fields[#fields + 1] = '1'
  end
  if trunk_index > 0 then
    fields[#fields + 1] = 'tk'
    fields[#fields + 1] = KEYS[trunk_index]
  end
end
"""

# KEYS: registry, call record, then per subject (levels first, then limited trunks):
#   channel zset, cps zset; then, for a funds reservation (engine.state.funds), 3 per
#   paying chain level.
# ARGV: now_ms or '', hold_ms, uuid, n_levels, n_trunks, window_ms, slack_ms,
#   fallback ('1': an unlimited trunk exists, so the call has a route even if every
#   limited trunk is full), then per level: max_channels, cps; per trunk: max_channels,
#   cps, candidate ('1' when no unlimited trunk precedes it), trunk id; then (optional)
#   n_funds, cap seconds, margin ms, keep ms, and 8 per funds level (FUNDS_LUA).
# Returns {1, chosen trunk index or 0, granted seconds or -1, skipped...} admitted;
#   {0, level index, kind} a level is full; {2, 0, -1, skipped...} no trunk has room;
#   {3, trunk id or '', granted seconds or ''} already admitted; {4, funds level index}
#   that chain level cannot pay (nothing taken). skipped = pairs (trunk index, kind);
#   kind 1 = channels, 2 = cps.
_ACQUIRE = (
    _LUA_COMMON
    + FUNDS_LUA
    + """
local now = clock_ms(ARGV[1])
local hold = tonumber(ARGV[2])
local uuid = ARGV[3]
local nlev = tonumber(ARGV[4])
local ntr = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
local slack = tonumber(ARGV[7])
local reg, rec = KEYS[1], KEYS[2]

local prior = redis.call('HMGET', rec, 'at', 'trunk', 'fd')
if prior[1] then return {3, prior[2] or '', prior[3] or ''} end
local fa = 9 + 2 * nlev + 4 * ntr  -- ARGV index of n_funds (absent: no reservation)
local nf = tonumber(ARGV[fa] or '0')
local fk = 3 + 2 * (nlev + ntr)  -- KEYS index of the first funds key

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
  return {2, 0, -1, unpack(skipped)}
end
local granted = -1
if nf > 0 then
  granted = funds_check(fk, fa + 3, nf, now, tonumber(ARGV[fa + 1]))
  if granted < 0 then return {4, -granted} end
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
if nf > 0 then
  funds_take(fk, fa + 3, nf, uuid, granted, now + granted * 1000 + tonumber(ARGV[fa + 2]),
    tonumber(ARGV[fa + 3]))
  fields[#fields + 1] = 'fd'
  fields[#fields + 1] = granted
end
redis.call('HSET', rec, unpack(fields))
redis.call('PEXPIRE', rec, keep)
redis.call('ZREMRANGEBYSCORE', reg, '-inf', now)
redis.call('ZADD', reg, deadline, uuid)
extend(reg, keep)
return {1, chosen, granted, unpack(skipped)}
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
hold_in(fields, 3, #KEYS, tonumber(ARGV[6]), deadline, keep, uuid)
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

# Re-count a call FreeSWITCH has up that the registry lacks (an acquire lost in a failover),
# without checking any limit: the call is already up (engine.reconcile, "Re-counting").
# KEYS: registry, call record, funds call record, then the channel zsets to count it in, then
#   (funds) 3 per chain level (FUNDS_LUA).
# ARGV: now_ms or '', uuid, decided_ms or '', grace_ms, hold_ms, slack_ms, n channel zsets,
#   index in KEYS of the trunk's zset (0 = none), trunk id or '', then (optional) n_funds,
#   granted seconds, funds margin ms, keep ms, and 8 per funds level.
# Returns 1 re-counted; 0 already counted (the registry is the guard: two reconcilers, or a
#   run racing an acquire, never count a call twice); 2 already settled (it has hung up);
#   3 decided within the grace period (left to its acquire).
_RECOUNT = (
    _LUA_COMMON
    + FUNDS_LUA
    + """
local now = clock_ms(ARGV[1])
local reg, rec, fcall = KEYS[1], KEYS[2], KEYS[3]
local uuid = ARGV[2]
if redis.call('EXISTS', rec) == 1 or redis.call('ZSCORE', reg, uuid) then return 0 end
if redis.call('HGET', fcall, 'st') == '1' then return 2 end
local since = now
if ARGV[3] ~= '' then
  since = math.min(now, tonumber(ARGV[3]))
  if now - since < tonumber(ARGV[4]) then return 3 end
end
local slack = tonumber(ARGV[6])
-- counted until the acquire's own deadline (from the decision), never one already past
local deadline = math.max(since + tonumber(ARGV[5]), now + slack)
local keep = deadline - now + slack
local nch = tonumber(ARGV[7])
local fields = {'at', since, 'dl', deadline, 'trunk', ARGV[9], 'rc', now}
hold_in(fields, 4, 3 + nch, tonumber(ARGV[8]), deadline, keep, uuid)
local nf = tonumber(ARGV[10] or '0')
local fk = 4 + nch
-- a reservation still held (written by the same acquire, so normally lost with it) is kept
if nf > 0 and redis.call('HEXISTS', KEYS[fk + 2], uuid) == 0 then
  local d = tonumber(ARGV[11])
  local fdl = math.max(since + d * 1000 + tonumber(ARGV[12]), now + slack)
  funds_take(fk, 13, nf, uuid, d, fdl, tonumber(ARGV[13]))  -- ARGV[14]: first level's account id
  fields[#fields + 1] = 'fd'
  fields[#fields + 1] = d
end
redis.call('HSET', rec, unpack(fields))
redis.call('PEXPIRE', rec, keep)
redis.call('ZADD', reg, deadline, uuid)
extend(reg, keep)
return 1
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
        are idempotent per call uuid, so a stale connection is retried once, and the calls of
        one turn of the event loop share a round trip), else ``client``."""
        try:
            try:
                if direct is not None:
                    command = ("EVALSHA", self.sha, len(keys), *keys, *args)
                    return direct.execute_gathered(command, retry_once=True)
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                if direct is not None:
                    return direct.execute(("EVAL", self.source, len(keys), *keys, *args), retry_once=True)
                return client.eval(self.source, len(keys), *keys, *args)
        except redis.exceptions.RedisError as exc:
            raise _unavailable(exc) from exc


def _unavailable(exc: redis.exceptions.RedisError) -> LimitsUnavailable:
    """The error to raise for ``exc``: :class:`LimitsAmbiguous` when the script may have run.

    A timeout, or a connection lost while waiting for the reply, may come after Redis
    received the request (and ran it). A failure to connect, an error reply or a busy
    pool means the request was never run.
    """
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, redis.exceptions.TimeoutError):
        return LimitsAmbiguous(text)
    if isinstance(exc, redis.exceptions.ConnectionError) and not isinstance(
        exc, redis.exceptions.BusyLoadingError
    ):
        never_sent = "connecting to" in str(exc) or "no free Redis connection" in str(exc)
        return LimitsUnavailable(text) if never_sent else LimitsAmbiguous(text)
    return LimitsUnavailable(text)


_ACQUIRE_SCRIPT = _Script(_ACQUIRE)
_RELEASE_SCRIPT = _Script(_RELEASE)
_REGISTER_SCRIPT = _Script(_REGISTER)
_RELEASE_ORPHANS_SCRIPT = _Script(_RELEASE_ORPHANS)
_RECOUNT_SCRIPT = _Script(_RECOUNT)
_USAGE_SCRIPT = _Script(_USAGE)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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
        self._prefix = prefix  # read-only: the key cache below is built from it
        self.clock = clock
        self.margin_seconds = margin_seconds
        self.slack_seconds = slack_seconds
        self.registry_key = key_names.limits_registry_key(prefix)
        self._account_keys: dict[int, tuple[str, str]] = {}
        self._did_keys: dict[int, tuple[str, str]] = {}
        self._trunk_keys: dict[int, tuple[str, str]] = {}

    # -- keys ------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self._prefix

    def channels_key(self, subject: Subject) -> str:
        return key_names.limits_channels_key(self.prefix, _KEY_GROUP[subject.level], subject.id)

    def cps_key(self, subject: Subject) -> str:
        return key_names.limits_cps_key(self.prefix, _KEY_GROUP[subject.level], subject.id)

    def call_key(self, call_uuid: str) -> str:
        return key_names.limits_call_key(self.prefix, call_uuid)

    def _now_arg(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1000))

    def hold_ms(self, hold_seconds: int) -> int:
        if hold_seconds < 0:
            raise ValueError(f"hold_seconds must be >= 0, not {hold_seconds}")
        return (int(hold_seconds) + self.margin_seconds) * 1000

    # -- planning --------------------------------------------------------------

    @staticmethod
    def subjects_for(accept: Accept, catalog: LimitsCatalog) -> LimitPlan:
        """The levels (account, resellers, DID) and candidate trunks of an accepted call."""
        return plan_for(accept, catalog)

    # -- the hot path ----------------------------------------------------------

    def acquire(
        self, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None = None
    ) -> LimitResult:
        """Check and take every limit of ``plan`` for ``call_uuid`` in one round trip, and the
        call's funds reservation with them when ``funds`` is given (engine.state.funds)."""
        command = self.acquire_command(call_uuid, plan, hold_seconds, funds)
        if command is None:
            return LimitResult(admitted=True, trunk_ids=plan.trunk_ids)
        keys, args, levels, trunks = command
        with self.timer("limits"):
            reply = _ACQUIRE_SCRIPT(self.client, keys, args, self.direct)
        return self._result(reply, plan, levels, trunks)

    def acquire_command(
        self, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None = None
    ) -> tuple[list[str], list[Any], list[Subject], list[Subject]] | None:
        """The acquire script's KEYS and ARGV for the call (layout: ``_ACQUIRE``), with the
        limited levels and trunks they name; None when nothing is counted.

        Built once per call, so written for the interpreter: the subjects' key pairs come
        from a cache (:meth:`_subject_keys`), ``limited`` is tested inline."""
        keys: list[str] = []
        level_args: list[Any] = []
        levels: list[Subject] = []
        subject_keys = self._subject_keys
        for s in plan.levels:
            max_channels, cps = s.max_channels, s.cps
            if max_channels > 0 or cps > 0:
                levels.append(s)
                keys += subject_keys(s)
                level_args += (max_channels, cps)
        trunks: list[Subject] = []
        fallback = False
        for t in plan.trunks:
            max_channels, cps = t.max_channels, t.cps
            if max_channels > 0 or cps > 0:
                trunks.append(t)
                keys += subject_keys(t)
                level_args += (max_channels, cps, "0" if fallback else "1", t.id)
            else:
                fallback = True
        if not keys and funds is None:
            return None
        keys[:0] = (self.registry_key, key_names.limits_call_key(self.prefix, call_uuid))
        args: list[Any] = [
            "" if self.clock is None else str(round(self.clock() * 1000)),
            self.hold_ms(hold_seconds),
            call_uuid,
            len(levels),
            len(trunks),
            WINDOW_MS,
            self.slack_seconds * 1000,
            "1" if fallback else "0",
        ]
        args += level_args
        if funds is not None:
            keys += funds.keys(self.prefix)
            args += (len(funds.levels), funds.cap_seconds, funds.margin_ms, funds.keep_ms, *funds.args())
        return keys, args, levels, trunks

    def _subject_keys(self, subject: Subject) -> tuple[str, str]:
        """(channel zset, cps zset) of ``subject``, cached per counter group and id: a call
        names ~7 subjects, the same trunks call after call. The cache is dropped whole when
        it reaches :data:`_KEY_CACHE_SIZE` (accounts are many; trunks come back at once)."""
        level = subject.level
        # Per-group dicts chosen by identity: an enum member's hash is a Python-level call.
        if level is LevelKind.TRUNK:
            cache = self._trunk_keys
        elif level is LevelKind.DID:
            cache = self._did_keys
        else:
            cache = self._account_keys
        pair = cache.get(subject.id)
        if pair is None:
            if len(cache) >= _KEY_CACHE_SIZE:
                cache.clear()
            pair = cache[subject.id] = (self.channels_key(subject), self.cps_key(subject))
        return pair

    @staticmethod
    def _result(
        reply: list[Any], plan: LimitPlan, levels: list[Subject], trunks: list[Subject]
    ) -> LimitResult:
        status = int(reply[0])
        if status == 1 and len(reply) == 3:  # admitted, no trunk skipped: the usual answer
            chosen = int(reply[1])
            granted = int(reply[2])
            return LimitResult(
                admitted=True,
                trunk_ids=plan.trunk_ids,
                counted_trunk_id=trunks[chosen - 1].id if chosen else None,
                granted_seconds=granted if granted >= 0 else None,
            )
        if status == 4:
            return LimitResult(admitted=False, funds_level=int(reply[1]) - 1)
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
            granted_text = _text(reply[2]) if len(reply) > 2 else ""
            return LimitResult(
                admitted=True,
                trunk_ids=order,
                counted_trunk_id=counted,
                duplicate=True,
                granted_seconds=int(granted_text) if granted_text else None,
            )
        pairs = reply[3:]
        skipped = tuple(
            SkippedTrunk(trunks[int(pairs[n]) - 1].id, _KIND_CODES[int(pairs[n + 1])])
            for n in range(0, len(pairs), 2)
        )
        if status == 2:
            return LimitResult(admitted=False, skipped=skipped)
        full = {s.trunk_id for s in skipped}
        chosen = int(reply[1])
        granted = int(reply[2])
        return LimitResult(
            admitted=True,
            trunk_ids=tuple(t for t in plan.trunk_ids if t not in full),
            counted_trunk_id=trunks[chosen - 1].id if chosen else None,
            skipped=skipped,
            granted_seconds=granted if granted >= 0 else None,
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

    # -- explain ---------------------------------------------------------------

    def peek(self, plan: LimitPlan) -> LimitResult:
        """What :meth:`acquire` would answer now, taking nothing: the same rule
        (``plan.decide``) over the counts the acquire script would see, read by a
        script that writes nothing (one round trip; none when nothing is limited)."""
        usage = {(u.level, u.id): u for u in self.usage(plan)}
        return decide(plan, lambda subject: usage[(subject.level, subject.id)].full())

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
            rows = cast(
                list[tuple[bytes, float]], self.client.zrange(self.registry_key, 0, -1, withscores=True)
            )
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

    def recount(
        self,
        call_uuid: str,
        channel_subjects: Sequence[Subject],
        hold_seconds: int,
        *,
        trunk: Subject | None = None,
        decided_ms: int | None = None,
        grace_seconds: float = 5,
        funds: FundsRequest | None = None,
    ) -> int:
        """Count a live call the registry lacks in ``channel_subjects`` (and ``trunk``), and take
        its funds reservation (``funds``: ``cap_seconds`` is the duration granted), without
        checking any limit, in one script. ``hold_seconds`` as for :meth:`acquire`, from
        ``decided_ms``. Returns what the script did: 1 re-counted, 0 already counted, 2 already
        settled, 3 decided less than ``grace_seconds`` ago (see ``_RECOUNT``)."""
        keys = [self.registry_key, self.call_key(call_uuid), key_names.funds_call_key(self.prefix, call_uuid)]
        keys += list(dict.fromkeys(self.channels_key(s) for s in channel_subjects))
        trunk_index = 0
        if trunk is not None:
            keys.append(self.channels_key(trunk))
            trunk_index = len(keys)
        args: list[Any] = [
            self._now_arg(),
            call_uuid,
            "" if decided_ms is None else int(decided_ms),
            round(grace_seconds * 1000),
            self.hold_ms(hold_seconds),
            self.slack_seconds * 1000,
            len(keys) - 3,
            trunk_index,
            "" if trunk is None else trunk.id,
        ]
        if funds is not None and funds.levels:
            keys += funds.keys(self.prefix)
            args += (len(funds.levels), funds.cap_seconds, funds.margin_ms, funds.keep_ms, *funds.args())
        return int(_RECOUNT_SCRIPT(self.client, keys, args))

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.exceptions.RedisError:
            return False
