"""The funds-reservation Lua, shared by the standalone scripts (engine.billing.funds) and the
limits acquire script (engine.state.limits.redis), which includes it so that a call's
reservation is taken in the same atomic step, the same round trip, as its limits.

The design, the formulas and the failure modes are in engine.billing.funds and
docs/accounting.md; this module only holds what the state layer needs: the Lua functions
and the shape of a reservation request (plain values, so the state layer knows nothing of
tariffs or Decimal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.state import keys as key_names

__all__ = ["ARGS_PER_LEVEL", "FUNDS_LUA", "KEYS_PER_LEVEL", "FundsRequest"]

KEYS_PER_LEVEL = 3  # acct hash, reservation zset, amounts hash
ARGS_PER_LEVEL = 8  # account id, base, recorded, connect, cost per minute, included, init, inc


@dataclass(frozen=True, slots=True)
class FundsRequest:
    """A call's reservation: per chain level its 8 integer arguments (micro-units and seconds,
    see FUNDS_LUA), the longest duration wanted, and the reservation's margin and key TTL."""

    levels: tuple[tuple[int, ...], ...]
    cap_seconds: int
    margin_ms: int
    keep_ms: int

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        for level in self.levels:
            account_id = level[0]
            found += [
                key_names.funds_account_key(prefix, account_id),
                key_names.funds_reservations_key(prefix, account_id),
                key_names.funds_amounts_key(prefix, account_id),
            ]
        return found

    def args(self) -> list[int]:
        flat: list[int] = []
        for level in self.levels:
            flat += level
        return flat


def level_args(values: Sequence[int]) -> tuple[int, ...]:
    if len(values) != ARGS_PER_LEVEL:
        raise ValueError(f"a funds level has {ARGS_PER_LEVEL} arguments, not {len(values)}")
    return tuple(int(v) for v in values)


# Functions over three keys per account (acct hash, reservation zset, amounts hash) and
# eight arguments per level: account id, base, recorded, connect, cost per minute
# (micro-units, ceiled), included seconds, initial increment, increment.
FUNDS_LUA = """
local function funds_purge(acct, res, amt, now)
  local old = redis.call('ZRANGEBYSCORE', res, '-inf', now, 'LIMIT', 0, 500)
  if #old == 0 then return end
  local total = 0
  local vals = redis.call('HMGET', amt, unpack(old))
  for _, v in ipairs(vals) do if v then total = total + tonumber(v) end end
  redis.call('HDEL', amt, unpack(old))
  redis.call('ZREM', res, unpack(old))
  redis.call('HINCRBY', acct, 'reserved', -total)
end

local function funds_available(acct, res, amt, now, base, recorded)
  funds_purge(acct, res, amt, now)
  redis.call('HSETNX', acct, 'spent', recorded)
  local f = redis.call('HMGET', acct, 'spent', 'reserved')
  local unrecorded = math.max(0, tonumber(f[1]) - recorded)
  return base - unrecorded - tonumber(f[2] or '0')
end

-- seconds paid at the per-minute price for d billed seconds (ASTPP calc_cost)
local function funds_charged(d, incl, init, inc)
  local rest = d - incl
  if d < 1 or rest <= 0 then return 0 end
  local s = init
  rest = rest - init
  if rest > 0 then s = s + math.ceil(rest / inc) * inc end
  return s
end

local function funds_cost(d, connect, cpm, incl, init, inc)
  if d < 1 then return 0 end
  return connect + math.floor((cpm * funds_charged(d, incl, init, inc) + 59) / 60)
end

-- the longest d a level can pay in full with avail, or -1 when it cannot pay connect + 1 min
local function funds_affordable(avail, connect, cpm, incl, init, inc, cap)
  if cpm <= 0 then
    if avail < connect then return -1 end
    return cap
  end
  if avail < connect + cpm then return -1 end
  local smax = math.floor((avail - connect) * 60 / cpm)
  local d = incl
  if smax >= init then d = incl + init + math.floor((smax - init) / inc) * inc end
  if d < 1 then return -1 end
  return math.min(d, cap)
end

-- kb: index in KEYS of the first level's acct key; ab + 1: index in ARGV of its first argument
-- (the account id; then base, recorded, connect, cost per minute, included, init, inc).
-- Returns d >= 0 (seconds every level can pay), or -i when level i cannot pay.
local function funds_check(kb, ab, nlev, now, cap)
  local d = cap
  for i = 1, nlev do
    local k, a = kb + 3 * (i - 1), ab + 8 * (i - 1)
    local avail = funds_available(KEYS[k], KEYS[k + 1], KEYS[k + 2], now,
      tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]))
    local li = funds_affordable(avail, tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]),
      tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]), cap)
    if li < 0 then return -i end
    if li < d then d = li end
  end
  return d
end

local function funds_take(kb, ab, nlev, uuid, d, deadline, keep)
  for i = 1, nlev do
    local k, a = kb + 3 * (i - 1), ab + 8 * (i - 1)
    local cost = funds_cost(d, tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]),
      tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8]))
    if cost > 0 then
      redis.call('HINCRBY', KEYS[k], 'reserved', cost)
      redis.call('ZADD', KEYS[k + 1], deadline, uuid)
      redis.call('HSET', KEYS[k + 2], uuid, cost)
      for j = 0, 2 do
        if redis.call('PTTL', KEYS[k + j]) < keep then redis.call('PEXPIRE', KEYS[k + j], keep) end
      end
    end
  end
end

local function funds_release(acct, res, amt, uuid)
  local cost = redis.call('HGET', amt, uuid)
  if cost then
    redis.call('HDEL', amt, uuid)
    redis.call('ZREM', res, uuid)
    redis.call('HINCRBY', acct, 'reserved', -tonumber(cost))
  end
end

local function funds_now(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
