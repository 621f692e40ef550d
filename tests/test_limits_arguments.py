"""The acquire script's KEYS and ARGV, built by Limiter.acquire_command, against the layout
written out plainly (the code before the key cache and the inlined loops): the same lists,
element by element and type by type, for random plans, twice over one limiter (the second
time from the cache), and over a cache that overflowed. Pure: no Redis."""

from __future__ import annotations

import random
from typing import Any

import redis

from engine.state import keys as key_names
from engine.state.funds import FundsRequest
from engine.state.limits import WINDOW_MS, LevelKind, Limiter, LimitPlan, Subject
from engine.state.limits import redis as limits_redis

_GROUP = {
    LevelKind.ACCOUNT: "acct",
    LevelKind.RESELLER: "acct",
    LevelKind.DID: "did",
    LevelKind.TRUNK: "trunk",
}


def reference_command(
    limiter: Limiter, call_uuid: str, plan: LimitPlan, hold_seconds: int, funds: FundsRequest | None
) -> tuple[list[str], list[Any], list[Subject], list[Subject]] | None:
    prefix = limiter.prefix
    levels = [s for s in plan.levels if s.limited]
    trunks: list[tuple[Subject, bool]] = []
    fallback = False
    for trunk in plan.trunks:
        if trunk.limited:
            trunks.append((trunk, not fallback))
        else:
            fallback = True
    if not levels and not trunks and funds is None:
        return None

    def pair(s: Subject) -> tuple[str, str]:
        group = _GROUP[s.level]
        return (
            key_names.limits_channels_key(prefix, group, s.id),
            key_names.limits_cps_key(prefix, group, s.id),
        )

    keys = [key_names.limits_registry_key(prefix), key_names.limits_call_key(prefix, call_uuid)]
    args: list[Any] = [
        "" if limiter.clock is None else str(round(limiter.clock() * 1000)),
        (int(hold_seconds) + limiter.margin_seconds) * 1000,
        call_uuid,
        len(levels),
        len(trunks),
        WINDOW_MS,
        limiter.slack_seconds * 1000,
        "1" if fallback else "0",
    ]
    for s in levels:
        keys += pair(s)
        args += (s.max_channels, s.cps)
    for t, candidate in trunks:
        keys += pair(t)
        args += (t.max_channels, t.cps, "1" if candidate else "0", t.id)
    if funds is not None:
        keys += funds.keys(prefix)
        args += (len(funds.levels), funds.cap_seconds, funds.margin_ms, funds.keep_ms, *funds.args())
    return keys, args, levels, [t for t, _ in trunks]


def _limit(rng: random.Random) -> int:
    return rng.choice((0, 0, 1, 2, 50))


def random_plan(rng: random.Random) -> LimitPlan:
    ids = list(range(1, 30))
    levels = [Subject(LevelKind.ACCOUNT, rng.choice(ids), _limit(rng), _limit(rng))]
    for _ in range(rng.randrange(3)):
        levels.append(Subject(LevelKind.RESELLER, rng.choice(ids), _limit(rng), _limit(rng)))
    if rng.random() < 0.3:
        levels.append(Subject(LevelKind.DID, rng.choice(ids), _limit(rng), _limit(rng)))
    trunks = [
        Subject(LevelKind.TRUNK, trunk_id, _limit(rng), _limit(rng))
        for trunk_id in rng.sample(ids, rng.randrange(7))
    ]
    return LimitPlan(tuple(levels), tuple(trunks))


def random_funds(rng: random.Random) -> FundsRequest | None:
    if rng.random() < 0.5:
        return None
    levels = tuple(tuple(rng.randrange(10**9) for _ in range(8)) for _ in range(rng.randrange(1, 3)))
    return FundsRequest(levels, rng.randrange(7200), rng.randrange(10**6), rng.randrange(10**6))


def _typed(values: list[Any]) -> list[tuple[type, Any]]:
    return [(type(v), v) for v in values]


def test_acquire_arguments_are_the_documented_layout() -> None:
    rng = random.Random(18)
    client = redis.Redis(host="127.0.0.1", port=1)  # never connected: nothing is sent
    for clock in (None, lambda: 1_765_000_000.1234):
        limiter = Limiter(client, prefix="cg:test:", clock=clock, margin_seconds=rng.randrange(400))
        for n in range(600):
            plan = random_plan(rng)
            funds = random_funds(rng)
            uuid = f"call-{n}"
            hold = rng.randrange(7200)
            expected = reference_command(limiter, uuid, plan, hold, funds)
            for _ in range(2):  # built, then from the key cache
                got = limiter.acquire_command(uuid, plan, hold, funds)
                if expected is None:
                    assert got is None
                    continue
                assert got is not None
                assert _typed(got[0]) == _typed(expected[0])
                assert _typed(got[1]) == _typed(expected[1])
                assert got[2] == expected[2]
                assert got[3] == expected[3]


def test_the_key_cache_is_bounded_and_still_right_after_a_reset(monkeypatch: Any) -> None:
    monkeypatch.setattr(limits_redis, "_KEY_CACHE_SIZE", 5)
    limiter = Limiter(redis.Redis(host="127.0.0.1", port=1), prefix="p:")
    rng = random.Random(3)
    for n in range(300):
        plan = random_plan(rng)
        expected = reference_command(limiter, str(n), plan, 60, None)
        assert limiter.acquire_command(str(n), plan, 60, None) == expected
        assert len(limiter._account_keys) <= 5 and len(limiter._trunk_keys) <= 5
