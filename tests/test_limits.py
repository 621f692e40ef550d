"""Shared concurrent-call and CPS limits against a real Redis (engine/state/limits.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from types import SimpleNamespace
from typing import TypeVar, cast

import gevent
import gevent.event
import gevent.queue
import pytest
import redis

from engine.config import Config
from engine.decider import Decider, apply_limits, limit_reason
from engine.decision import Accept, Direction, GatewayLeg, Reason, Reject, Route
from engine.explain import explain_request
from engine.limits_runtime import ReleaseBatcher
from engine.model import Account, AccountKind, Did, Trunk
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.packed import packed_by_id
from engine.state.direct import DirectConnections
from engine.state.keys import limits_call_key, limits_channels_key, limits_cps_key, limits_registry_key
from engine.state.limits import (
    FailOpenLimiter,
    LevelKind,
    Limiter,
    LimitKind,
    LimitPlan,
    LimitsAmbiguous,
    LimitsUnavailable,
    Subject,
)
from tests.private_redis import PrivateRedis, free_port, private_redis_fixture, quick_client  # noqa: F401
from tests.rules.builders import World, call
from tests.support import wait_until

# --------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def account(id: int, max_channels: int = 0, cps: int = 0, reseller_id: int | None = None) -> Account:
    return Account(
        id=id,
        number=f"acct{id}",
        kind=AccountKind.RESELLER if reseller_id is None else AccountKind.CUSTOMER,
        reseller_id=reseller_id,
        active=True,
        deleted=False,
        postpaid=False,
        balance=Decimal(10),
        credit_limit=Decimal(0),
        rate_group_id=None,
        max_channels=max_channels,
        cps=cps,
    )


def trunk(id: int, max_channels: int = 0, cps: int = 0) -> Trunk:
    return Trunk(id=id, name=f"t{id}", provider_id=1, gateway_id=1, max_channels=max_channels, cps=cps)


def route(trunk_id: int) -> Route:
    return Route(
        trunk_id=trunk_id,
        trunk_name=f"t{trunk_id}",
        provider_id=1,
        termination_prefix="",
        cost_per_minute=Decimal("0.01"),
        number="15551234567",
        caller_id_number="100",
        caller_id_name="",
        targets=(GatewayLeg(f"gw{trunk_id}", "15551234567", 60),),
    )


def accept(chain: tuple[int, ...], trunk_ids: tuple[int, ...] = (), did_id: int | None = None) -> Accept:
    return Accept(
        direction=Direction.OUTBOUND,
        account_id=chain[0],
        account_number=f"acct{chain[0]}",
        chain=chain,
        destination="15551234567",
        caller_id_number="100",
        caller_id_name="",
        levels=(),
        max_duration=3600,
        routes=tuple(route(t) for t in trunk_ids),
        did_id=did_id,
    )


def catalog(accounts: list[Account], trunks: Sequence[Trunk] = ()) -> Catalog:
    cat = Catalog()
    cat.accounts = packed_by_id(Account, accounts)
    cat.trunks = {t.id: t for t in trunks}
    return cat


def acct(id: int, max_channels: int = 0, cps: int = 0) -> Subject:
    return Subject(LevelKind.ACCOUNT, id, max_channels, cps)


def tr(id: int, max_channels: int = 0, cps: int = 0) -> Subject:
    return Subject(LevelKind.TRUNK, id, max_channels, cps)


def keys_of(client: redis.Redis, prefix: str) -> dict[str, int]:
    """Every key under ``prefix`` -> its PTTL."""
    return {k.decode(): client.pttl(k) for k in client.scan_iter(match=f"{prefix}*", count=1000)}


def members(client: redis.Redis, key: str) -> set[str]:
    return {m.decode() for m in cast(list[bytes], client.zrange(key, 0, -1))}


# --------------------------------------------------------------------------- planning


def test_subjects_for_lists_chain_did_and_trunks_in_route_order() -> None:
    cat = SimpleNamespace(
        accounts={1: account(1, 5, 2, reseller_id=2), 2: account(2, 50), 3: account(3)},
        trunks={10: trunk(10, 3), 11: trunk(11), 12: trunk(12, 0, 7)},
        dids_by_id={7: Did(id=7, number="15550001", account_id=1, max_channels=4, cps=1)},
    )
    plan = Limiter.subjects_for(accept((1, 2, 3), (12, 10, 11, 10), did_id=7), cat)
    assert plan.levels == (
        Subject(LevelKind.ACCOUNT, 1, 5, 2),
        Subject(LevelKind.RESELLER, 2, 50, 0),
        Subject(LevelKind.RESELLER, 3, 0, 0),
        Subject(LevelKind.DID, 7, 4, 1),
    )
    assert plan.trunks == (tr(12, 0, 7), tr(10, 3), tr(11))
    assert plan.limited


def test_subjects_for_unknown_did_and_nothing_limited() -> None:
    plan = Limiter.subjects_for(accept((1,), (10,), did_id=9), catalog([account(1)], [trunk(10)]))
    assert plan.levels == (acct(1), Subject(LevelKind.DID, 9))
    assert not plan.limited


def test_nothing_limited_costs_no_round_trip() -> None:
    limiter = Limiter(quick_client(free_port()), "x:")  # nothing listens there
    plan = LimitPlan((acct(1),), (tr(10), tr(11)))
    result = limiter.acquire("u1", plan, 60)
    assert result.admitted and result.trunk_ids == (10, 11) and result.counted_trunk_id is None


# --------------------------------------------------------------------------- atomicity under concurrency


def _hammer(redis_url, prefix, worker, count, max_channels, cps, fixed_clock, barrier, results) -> None:
    client = redis.Redis.from_url(redis_url, max_connections=32)
    limiter = Limiter(client, prefix, clock=(lambda: fixed_clock) if fixed_clock else None)
    plan = LimitPlan((Subject(LevelKind.ACCOUNT, 1, max_channels, cps),))
    limiter.acquire(f"warmup-{worker}", LimitPlan(), 1)  # no-op: nothing limited
    client.ping()
    barrier.wait()
    with ThreadPoolExecutor(max_workers=16) as pool:
        outcomes = list(pool.map(lambda n: limiter.acquire(f"w{worker}-{n}", plan, 300), range(count)))
    results.put([(r.admitted, str(r.level), str(r.kind), r.subject_id) for r in outcomes])
    client.close()


@pytest.mark.parametrize("kind", ["channels", "cps"])
def test_two_processes_admit_exactly_the_limit(redis_url: str, key_prefix: str, client, kind: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    max_channels, cps = (50, 0) if kind == "channels" else (0, 50)
    fixed = 5_000.0 if kind == "cps" else None  # one instant: the whole burst is in one window
    procs = [
        ctx.Process(
            target=_hammer,
            args=(redis_url, key_prefix, w, 100, max_channels, cps, fixed, barrier, results),
        )
        for w in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = results.get(timeout=60) + results.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    admitted = [o for o in outcomes if o[0]]
    refused = [o for o in outcomes if not o[0]]
    assert len(outcomes) == 200
    assert len(admitted) == 50
    assert len(refused) == 150
    assert set(refused) == {(False, "account", kind, 1)}
    if kind == "channels":
        assert client.zcard(limits_channels_key(key_prefix, "acct", 1)) == 50
    else:
        assert client.zcard(limits_cps_key(key_prefix, "acct", 1)) == 50
    assert client.zcard(limits_registry_key(key_prefix)) == 50


# --------------------------------------------------------------------------- levels


def test_reseller_limit_binds_below_its_customers(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    cat = catalog([account(1, 5, reseller_id=9), account(2, 5, reseller_id=9), account(9, 3)])
    plan_a = limiter.subjects_for(accept((1, 9)), cat)
    plan_b = limiter.subjects_for(accept((2, 9)), cat)
    outcomes = [limiter.acquire(f"c{n}", plan_a if n % 2 else plan_b, 60) for n in range(6)]
    assert [o.admitted for o in outcomes] == [True, True, True, False, False, False]
    refused = outcomes[3]
    assert (refused.level, refused.subject_id, refused.kind) == (LevelKind.RESELLER, 9, LimitKind.CHANNELS)
    assert limit_reason(refused) is Reason.CONCURRENT_LIMIT
    assert client.zcard(limits_channels_key(key_prefix, "acct", 9)) == 3
    # The reseller's own calls count against the same counter as its customers'.
    own = limiter.acquire("own", limiter.subjects_for(accept((9,)), cat), 60)
    assert not own.admitted and own.level is LevelKind.ACCOUNT and own.subject_id == 9


def test_a_full_later_level_takes_nothing(client, key_prefix: str) -> None:
    clock = FakeClock()
    limiter = Limiter(client, key_prefix, clock=clock)
    did = Subject(LevelKind.DID, 7, 1, 0)
    plan = LimitPlan((acct(1, 10, 10), Subject(LevelKind.RESELLER, 2, 10, 10), did), (tr(10, 10, 10),))
    assert limiter.acquire("first", plan, 60).admitted
    before = {
        k: client.zrange(k, 0, -1, withscores=True) for k in keys_of(client, key_prefix) if "call:" not in k
    }
    refused = limiter.acquire("second", plan, 60)
    assert not refused.admitted
    assert (refused.level, refused.subject_id, refused.kind) == (LevelKind.DID, 7, LimitKind.CHANNELS)
    after = {
        k: client.zrange(k, 0, -1, withscores=True) for k in keys_of(client, key_prefix) if "call:" not in k
    }
    assert after == before  # no counter moved, CPS logs included
    assert not client.exists(limits_call_key(key_prefix, "second"))


def test_cps_refusal_names_the_level_and_kind(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix, clock=FakeClock())
    plan = LimitPlan((acct(1, 0, 1),))
    assert limiter.acquire("a", plan, 60).admitted
    refused = limiter.acquire("b", plan, 60)
    assert (refused.level, refused.kind, limit_reason(refused)) == (
        LevelKind.ACCOUNT,
        LimitKind.CPS,
        Reason.CPS_LIMIT,
    )


# --------------------------------------------------------------------------- trunks


def test_full_trunks_are_skipped_and_the_call_counted_on_the_first_with_room(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix, clock=FakeClock())
    cat = catalog([account(1, 100)], [trunk(10, 1), trunk(11, 1), trunk(12, 0, 1)])
    acc = accept((1,), (10, 11, 12))
    plan = limiter.subjects_for(acc, cat)
    first = limiter.acquire("c1", plan, 60)
    assert (first.counted_trunk_id, first.trunk_ids, first.skipped) == (10, (10, 11, 12), ())
    second = limiter.acquire("c2", plan, 60)
    assert (second.counted_trunk_id, second.trunk_ids) == (11, (11, 12))
    assert [(s.trunk_id, s.kind) for s in second.skipped] == [(10, LimitKind.CHANNELS)]
    decision = apply_limits(acc, second)
    assert isinstance(decision, Accept)
    assert [r.trunk_id for r in decision.routes] == [11, 12]
    assert len(decision.legs) == 2
    assert [leg.gateway for leg in decision.legs if isinstance(leg, GatewayLeg)] == ["gw11", "gw12"]
    third = limiter.acquire("c3", plan, 60)
    assert (third.counted_trunk_id, third.trunk_ids) == (12, (12,))
    fourth = limiter.acquire("c4", plan, 60)
    assert not fourth.admitted
    assert [(s.trunk_id, s.kind) for s in fourth.skipped] == [
        (10, LimitKind.CHANNELS),
        (11, LimitKind.CHANNELS),
        (12, LimitKind.CPS),
    ]
    assert limit_reason(fourth) is Reason.TERMINATION_RATE_NOT_FOUND
    reject = apply_limits(acc, fourth)
    assert isinstance(reject, Reject) and reject.reason is Reason.TERMINATION_RATE_NOT_FOUND
    assert "trunk 12 (cps)" in reject.detail
    # Nothing was taken for the refused call: the account still holds three calls.
    assert members(client, limits_channels_key(key_prefix, "acct", 1)) == {"c1", "c2", "c3"}


def test_an_unlimited_trunk_always_has_room_and_is_not_counted(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix, clock=FakeClock())
    plan = LimitPlan((), (tr(10, 1), tr(11), tr(12, 1)))
    assert limiter.acquire("c1", plan, 60).counted_trunk_id == 10
    second = limiter.acquire("c2", plan, 60)
    assert second.admitted and second.counted_trunk_id is None and second.trunk_ids == (11, 12)
    # trunk 12 comes after the unlimited trunk 11: never counted
    assert not client.exists(limits_channels_key(key_prefix, "trunk", 12))
    client.zadd(limits_channels_key(key_prefix, "trunk", 12), {"elsewhere": 10**15})
    third = limiter.acquire("c3", plan, 60)
    assert third.trunk_ids == (11,)  # a full trunk after it is still dropped from the failover list


# --------------------------------------------------------------------------- release and self-healing


def test_release_exactly_once(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    plan = LimitPlan((acct(1, 2), Subject(LevelKind.RESELLER, 2, 2)), (tr(10, 2),))
    assert limiter.acquire("a", plan, 60).admitted
    assert limiter.acquire("b", plan, 60).admitted
    assert not limiter.acquire("c", plan, 60).admitted
    assert limiter.release("a") is True
    assert limiter.release("a") is False
    assert limiter.release("never-seen") is False
    for group, subject in (("acct", 1), ("acct", 2), ("trunk", 10)):
        assert members(client, limits_channels_key(key_prefix, group, subject)) == {"b"}
    assert limiter.counted_calls().keys() == {"b"}
    assert not client.exists(limits_call_key(key_prefix, "a"))
    assert limiter.acquire("c", plan, 60).admitted  # the freed slot is usable once


def test_acquire_is_idempotent_per_call(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    plan = LimitPlan((acct(1, 1),), (tr(10, 1), tr(11, 1)))
    client.zadd(limits_channels_key(key_prefix, "trunk", 10), {"other": 10**15})
    first = limiter.acquire("a", plan, 60)
    again = limiter.acquire("a", plan, 60)  # e.g. a client retry after a timeout
    assert first.counted_trunk_id == 11
    assert again.admitted and again.duplicate and again.counted_trunk_id == 11 and again.trunk_ids[0] == 11
    assert client.zcard(limits_channels_key(key_prefix, "acct", 1)) == 1


def test_a_lost_release_stops_counting_at_the_deadline(client, key_prefix: str) -> None:
    clock = FakeClock(2_000.0)
    limiter = Limiter(client, key_prefix, clock=clock, margin_seconds=30)
    plan = LimitPlan((acct(1, 1),))
    assert limiter.acquire("lost", plan, 60).admitted  # its hangup is never seen
    clock.t += 89.999
    assert not limiter.acquire("next", plan, 60).admitted
    clock.t += 0.001  # hold 60 s + margin 30 s
    assert limiter.acquire("next", plan, 60).admitted
    assert members(client, limits_channels_key(key_prefix, "acct", 1)) == {"next"}
    assert limiter.counted_calls().keys() == {"next"}


def test_a_lost_release_expires_on_the_redis_clock(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix, margin_seconds=0)
    plan = LimitPlan((acct(1, 1),))
    assert limiter.acquire("lost", plan, 1).admitted
    assert not limiter.acquire("next", plan, 1).admitted
    time.sleep(1.05)
    assert limiter.acquire("next", plan, 1).admitted


def test_every_key_has_a_ttl(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix, margin_seconds=30, slack_seconds=60)
    plan = LimitPlan((acct(1, 5, 5), Subject(LevelKind.DID, 3, 5, 5)), (tr(10, 5, 5),))
    assert limiter.acquire("a", plan, 120).admitted
    ttls = keys_of(client, key_prefix)
    subjects = (("acct", 1), ("did", 3), ("trunk", 10))
    cps_keys = {limits_cps_key(key_prefix, group, subject) for group, subject in subjects}
    assert set(ttls) == {
        limits_registry_key(key_prefix),
        limits_call_key(key_prefix, "a"),
        *(limits_channels_key(key_prefix, group, subject) for group, subject in subjects),
        *cps_keys,
    }
    for key, ttl in ttls.items():
        if ":cps:" in key:
            assert 0 < ttl <= 61_000, key  # window + slack
        else:
            assert 200_000 < ttl <= 210_000, key  # hold 120 + margin 30 + slack 60
    limiter.release("a")
    assert set(keys_of(client, key_prefix)) == cps_keys  # only the CPS logs stay; they expire within a minute


# --------------------------------------------------------------------------- CPS edges


def test_cps_is_a_sliding_window_without_edge_bursts(client, key_prefix: str) -> None:
    clock = FakeClock(10_000.999)
    limiter = Limiter(client, key_prefix, clock=clock)
    plan = LimitPlan((acct(1, 0, 5),))
    n = iter(range(100))

    def burst(count: int) -> list[bool]:
        return [limiter.acquire(f"c{next(n)}", plan, 60).admitted for _ in range(count)]

    assert burst(6) == [True] * 5 + [False]  # 5 calls at t=0.999
    clock.t = 10_001.001  # a fixed 1 s window would open a fresh budget here: not this one
    assert burst(5) == [False] * 5
    clock.t = 10_001.998  # (0.998, 1.998] still holds the five calls of t=0.999
    assert burst(1) == [False]
    clock.t = 10_001.999  # (0.999, 1.999] no longer does
    assert burst(6) == [True] * 5 + [False]
    usage = limiter.usage(plan)
    assert usage[0].calls_last_second == 5 and usage[0].channels is None


def test_cps_spread_admissions(client, key_prefix: str) -> None:
    clock = FakeClock(20_000.0)
    limiter = Limiter(client, key_prefix, clock=clock)
    plan = LimitPlan((acct(1, 0, 2),))
    assert limiter.acquire("a", plan, 60).admitted  # t=0.0
    clock.t += 0.5
    assert limiter.acquire("b", plan, 60).admitted  # t=0.5
    assert not limiter.acquire("c", plan, 60).admitted
    clock.t += 0.5  # t=1.0: "a" left the window (0.0, 1.0]
    assert limiter.acquire("c", plan, 60).admitted
    assert not limiter.acquire("d", plan, 60).admitted


# --------------------------------------------------------------------------- explain


def test_usage_reports_each_level(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    plan = LimitPlan((acct(1, 10, 5), Subject(LevelKind.RESELLER, 2)), (tr(10, 3), tr(11)))
    for u in ("a", "b"):
        assert limiter.acquire(u, plan, 60).admitted
    usage = {(u.level, u.id): u for u in limiter.usage(plan)}
    assert (usage[(LevelKind.ACCOUNT, 1)].channels, usage[(LevelKind.ACCOUNT, 1)].calls_last_second) == (2, 2)
    assert usage[(LevelKind.RESELLER, 2)].channels is None
    assert (usage[(LevelKind.TRUNK, 10)].channels, usage[(LevelKind.TRUNK, 10)].max_channels) == (2, 3)
    assert usage[(LevelKind.TRUNK, 11)].channels is None


# --------------------------------------------------------------------------- failure policy


def test_redis_unreachable_raises_limits_unavailable() -> None:
    limiter = Limiter(quick_client(free_port()), "x:")
    plan = LimitPlan((acct(1, 5),))
    with pytest.raises(LimitsUnavailable):
        limiter.acquire("a", plan, 60)
    with pytest.raises(LimitsUnavailable):
        limiter.release("a")
    with pytest.raises(LimitsUnavailable):
        limiter.usage(plan)
    with pytest.raises(LimitsUnavailable):
        limiter.counted_calls()


def test_fail_closed_when_redis_stops(private_redis: PrivateRedis) -> None:
    limiter = Limiter(quick_client(private_redis.port), "cg:")
    plan = LimitPlan((acct(1, 5),))
    assert limiter.acquire("a", plan, 60).admitted
    private_redis.stop()
    with pytest.raises(LimitsUnavailable):
        limiter.acquire("b", plan, 60)
    private_redis.start()
    assert limiter.acquire("b", plan, 60).admitted  # no restart of the engine needed


def test_fail_open_approximates_locally_then_resyncs(private_redis: PrivateRedis) -> None:
    client = quick_client(private_redis.port)
    outcomes: list[str] = []
    limiter = FailOpenLimiter(Limiter(client, "cg:"), retry_after=0.0, on_degraded=outcomes.append)
    plan = LimitPlan((acct(1, 5),), (tr(10, 2), tr(11, 10)))
    channels = "cg:limits:ch:acct:1"

    for u in ("r1", "r2"):  # admitted through Redis
        result = limiter.acquire(u, plan, 600)
        assert result.admitted and not result.degraded
    assert limiter.degraded_decisions == 0

    private_redis.stop()
    local = [limiter.acquire(u, plan, 600) for u in ("l1", "l2", "l3", "l4")]
    assert [r.admitted for r in local] == [True, True, True, False]
    assert all(r.degraded for r in local)
    assert [r.counted_trunk_id for r in local[:3]] == [11, 11, 11]  # trunk 10 already holds r1, r2
    assert (local[3].level, local[3].kind) == (LevelKind.ACCOUNT, LimitKind.CHANNELS)
    assert limiter.degraded_decisions == 4
    assert outcomes == ["admitted", "admitted", "admitted", "refused"]

    assert limiter.release("r1") is True  # a Redis call hung up during the outage: replayed later
    assert limiter.release("l3") is True  # a local call hung up: just forgotten
    assert limiter.pending_resync == 3  # r1's release, l1 and l2
    with pytest.raises(LimitsUnavailable):
        limiter.resync()
    assert limiter.pending_resync == 3

    private_redis.start()  # Redis is back with what it held before the outage
    assert members(client, channels) == {"r1", "r2"}
    registered = limiter.resync(live_calls={"r2", "l1", "l2"})
    assert registered == 2
    assert limiter.pending_resync == 0
    assert members(client, channels) == {"r2", "l1", "l2"}
    assert members(client, "cg:limits:ch:trunk:11") == {"l1", "l2"}
    assert set(limiter.counted_calls()) == {"r2", "l1", "l2"}
    assert all(client.pttl(k) > 0 for k in client.scan_iter(match="cg:*"))

    # Redis decides again, with the consistent count: 3 of 5 held.
    after = [limiter.acquire(u, plan, 600) for u in ("n1", "n2", "n3")]
    assert [r.admitted for r in after] == [True, True, False]
    assert not any(r.degraded for r in after)
    assert limiter.degraded_decisions == 4
    assert limiter.release("l1") is True  # a resynced call is released in Redis
    assert "l1" not in members(client, channels)


def test_fail_open_circuit_skips_redis_until_retry_after(private_redis: PrivateRedis) -> None:
    now = FakeClock(0.0)
    inner = Limiter(quick_client(private_redis.port), "cg:")
    limiter = FailOpenLimiter(inner, retry_after=5.0, monotonic=now)
    plan = LimitPlan((acct(1, 0, 2),))
    private_redis.stop()
    assert limiter.acquire("a", plan, 60).degraded
    private_redis.start()
    now.t = 0.3  # within retry_after: still local, Redis not asked
    assert limiter.acquire("b", plan, 60).degraded
    assert not limiter.acquire("c", plan, 60).admitted  # local CPS window: 2 in the last second
    now.t = 6.0
    result = limiter.acquire("d", plan, 60)
    assert result.admitted and not result.degraded
    assert limiter.resync() == 2  # a and b, still within their hold
    assert set(inner.counted_calls()) == {"a", "b", "d"}


def test_local_share_splits_limits_between_processes(private_redis: PrivateRedis) -> None:
    limiter = FailOpenLimiter(Limiter(quick_client(private_redis.port), "cg:"), local_share=0.25)
    plan = LimitPlan((acct(1, 10),))
    private_redis.stop()
    assert [limiter.acquire(f"c{n}", plan, 60).admitted for n in range(4)] == [True, True, True, False]
    private_redis.start()


# --------------------------------------------------------------------------- batched release


def direct_for(client: redis.Redis, via: str) -> DirectConnections | None:
    """The engine's hot-path connections (engine.state.direct) when ``via`` says so."""
    if via == "client":
        return None
    return DirectConnections.like(client.connection_pool, size=2, checkout_timeout=1.0)


VIA = pytest.mark.parametrize("via", ["client", "direct"])


@VIA
def test_release_many_releases_the_counted_calls_in_one_batch(client, key_prefix: str, via: str) -> None:
    timed: list[str] = []

    @contextlib.contextmanager
    def timer(operation: str) -> Iterator[None]:
        timed.append(operation)
        yield

    limiter = Limiter(client, key_prefix, timer=timer, direct=direct_for(client, via))
    plan = LimitPlan((acct(1, 5),), (tr(10, 5),))
    for u in ("a", "b", "c"):
        assert limiter.acquire(u, plan, 60).admitted
    timed.clear()
    assert limiter.release_many(["a", "never-seen", "b", "a"]) == 2  # a repeat in the batch counts once
    assert timed == ["release"]
    for group, subject in (("acct", 1), ("trunk", 10)):
        assert members(client, limits_channels_key(key_prefix, group, subject)) == {"c"}
    assert limiter.counted_calls().keys() == {"c"}
    assert not client.exists(limits_call_key(key_prefix, "a"), limits_call_key(key_prefix, "b"))
    assert limiter.release_many(["a", "b"]) == 0  # repeats are no-ops
    assert limiter.release_many([]) == 0
    assert limiter.counted_calls().keys() == {"c"}


@VIA
def test_limit_scripts_survive_a_script_flush(private_redis: PrivateRedis, via: str) -> None:
    client = quick_client(private_redis.port)
    limiter = Limiter(client, "cg:", direct=direct_for(client, via))
    plan = LimitPlan((acct(1, 5),))
    for u in ("a", "b", "c"):
        assert limiter.acquire(u, plan, 60).admitted
    assert limiter.release("c")  # the release script is now cached...
    client.script_flush()  # ...and no longer (a Redis restart does the same)
    assert limiter.release_many(["a", "b"]) == 2
    assert limiter.counted_calls() == {}
    assert members(client, "cg:limits:ch:acct:1") == set()
    assert limiter.acquire("d", plan, 60).admitted
    assert limiter.release_many(["d"]) == 1  # the script was loaded again
    client.script_flush()
    assert limiter.acquire("e", plan, 60).admitted  # acquire loads its script again too
    assert limiter.counted_calls().keys() == {"e"}


def test_the_calls_of_one_loop_turn_share_a_round_trip_and_admit_exactly_the_limit(
    client, key_prefix: str
) -> None:
    """The engine's acquires from one turn of the event loop leave as one pipeline
    (engine.state.direct): each script still runs atomically, in order, and each call gets its
    own answer."""
    sends: list[int] = []

    class Counting(redis.Connection):
        def send_packed_command(self, command: object, check_health: bool = True) -> None:
            sends.append(1)
            super().send_packed_command(command, check_health)

    kwargs = client.connection_pool.connection_kwargs
    direct = DirectConnections(Counting, kwargs, size=4, checkout_timeout=1.0)
    limiter = Limiter(client, key_prefix, direct=direct)
    assert limiter.acquire("warm-up", LimitPlan((acct(2, 1),)), 60).admitted  # connected, script loaded
    sends.clear()
    plan = LimitPlan((acct(1, 3),), (tr(10, 2), tr(11, 5)))
    calls = [gevent.spawn(limiter.acquire, f"turn-{n}", plan, 60) for n in range(8)]
    gevent.joinall(calls, timeout=10, raise_error=True)
    results = [call.value for call in calls]
    assert [r.admitted for r in results] == [True] * 3 + [False] * 5  # in the order they asked
    assert [r.counted_trunk_id for r in results[:3]] == [10, 10, 11]
    assert all(r.level is LevelKind.ACCOUNT and r.kind is LimitKind.CHANNELS for r in results[3:])
    assert len(sends) == 1  # one round trip carried them all
    assert limiter.counted_calls().keys() == {"warm-up", "turn-0", "turn-1", "turn-2"}
    direct.close()


@VIA
def test_unreachable_redis_raises_limits_unavailable_on_both_paths(via: str) -> None:
    client = quick_client(free_port())
    limiter = Limiter(client, "x:", direct=direct_for(client, via))
    with pytest.raises(LimitsUnavailable):
        limiter.release_many(["a", "b"])
    with pytest.raises(LimitsUnavailable):
        limiter.acquire("a", LimitPlan((acct(1, 5),)), 60)


def _fail_open_pair(port: int, retry_after: float) -> tuple[FailOpenLimiter, FailOpenLimiter]:
    """Two fail-open limiters on one Redis (separate prefixes), each with two Redis calls
    r1, r2 admitted while Redis answers."""
    pair = (
        FailOpenLimiter(Limiter(quick_client(port), "one:"), retry_after=retry_after),
        FailOpenLimiter(Limiter(quick_client(port), "many:"), retry_after=retry_after),
    )
    plan = LimitPlan((acct(1, 5),))
    for limiter in pair:
        for u in ("r1", "r2"):
            assert not limiter.acquire(u, plan, 600).degraded
    return pair


def test_fail_open_release_many_is_release_one_by_one(private_redis: PrivateRedis) -> None:
    one, many = _fail_open_pair(private_redis.port, retry_after=60.0)
    uuids = ["r1", "ghost", "r1"]
    assert sum(one.release(u) for u in uuids) == many.release_many(uuids) == 1
    assert one.pending_resync == many.pending_resync == 0
    assert set(one.counted_calls()) == set(many.counted_calls()) == {"r2"}


@pytest.mark.parametrize("retry_after", [0.0, 60.0], ids=["redis-fails", "circuit-open"])
def test_fail_open_release_many_while_degraded(private_redis: PrivateRedis, retry_after: float) -> None:
    one, many = _fail_open_pair(private_redis.port, retry_after)
    private_redis.stop()
    plan = LimitPlan((acct(1, 5),))
    for limiter in (one, many):
        assert [limiter.acquire(u, plan, 600).degraded for u in ("l1", "l2")] == [True, True]
    uuids = ["r1", "l1", "ghost"]  # a Redis call, a local one, one never seen
    assert sum(one.release(u) for u in uuids) == many.release_many(uuids) == 2
    assert one.pending_resync == many.pending_resync == 3  # l2, and the releases of r1 and ghost
    private_redis.start()
    assert one.resync() == many.resync() == 1  # l2
    assert set(one.counted_calls()) == set(many.counted_calls()) == {"r2", "l2"}


class RecordingLimiter(Limiter):
    """The real limiter, with each release_many batch recorded (a spy, Redis is real)."""

    def __init__(self, client: redis.Redis, prefix: str, failures: list[Exception] | None = None) -> None:
        super().__init__(client, prefix)
        self.failures = failures or []  # raised by the first batches, in order
        self.batches: gevent.queue.Queue[list[str]] = gevent.queue.Queue()

    def release_many(self, call_uuids: Sequence[str]) -> int:
        self.batches.put(list(call_uuids))
        if self.failures:
            raise self.failures.pop(0)
        return super().release_many(call_uuids)


AnyLimiter = TypeVar("AnyLimiter", bound=Limiter)


def _acquired(limiter: AnyLimiter, uuids: list[str]) -> AnyLimiter:
    for u in uuids:
        assert limiter.acquire(u, LimitPlan((acct(1, 100),)), 60).admitted
    return limiter


def test_release_batcher_sends_the_releases_of_a_window_together(client, key_prefix: str) -> None:
    spy = _acquired(RecordingLimiter(client, key_prefix), ["a", "b", "c", "d"])
    batcher = ReleaseBatcher(spy, window=0.5)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    batcher.release("a")
    gevent.sleep(0.01)  # the loop is now gathering
    batcher.release("b")
    batcher.release("c")
    assert spy.batches.get(timeout=5) == ["a", "b", "c"]
    assert spy.batches.empty()
    gevent.sleep(0)
    assert batcher.queued == 0
    assert spy.counted_calls().keys() == {"d"}
    stop.set()
    loop.join(timeout=5)
    assert loop.dead


def test_release_batcher_sends_a_full_batch_without_waiting(client, key_prefix: str) -> None:
    spy = _acquired(RecordingLimiter(client, key_prefix), ["a", "b", "c"])
    batcher = ReleaseBatcher(spy, window=60.0, max_batch=3)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    for u in ("a", "b", "c"):
        batcher.release(u)
    assert spy.batches.get(timeout=5) == ["a", "b", "c"]  # not after the 60 s window
    stop.set()
    loop.join(timeout=5)
    assert spy.counted_calls() == {}


def test_release_batcher_flush_releases_what_is_queued_at_stop(client, key_prefix: str) -> None:
    spy = _acquired(RecordingLimiter(client, key_prefix), ["a", "b", "c", "d"])
    batcher = ReleaseBatcher(spy, window=60.0, max_batch=2)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    batcher.release("a")
    gevent.sleep(0)  # the loop is gathering for 60 s
    stop.set()
    loop.join(timeout=5)
    assert loop.dead
    for u in ("b", "c"):
        batcher.release(u)  # e.g. calls ending during the drain
    batcher.flush()
    assert batcher.queued == 0
    assert [spy.batches.get(timeout=1) for _ in range(2)] == [["a", "b"], ["c"]]
    assert spy.counted_calls().keys() == {"d"}


def test_a_failing_release_batch_does_not_stop_the_loop(client, key_prefix: str, caplog) -> None:
    failures: list[Exception] = [LimitsUnavailable("down"), RuntimeError("a bug")]
    spy = _acquired(RecordingLimiter(client, key_prefix, failures), ["a", "b", "c"])
    batcher = ReleaseBatcher(spy, window=0.001, retry_delay=0.2)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    with caplog.at_level(logging.WARNING, logger="callgate.limits"):
        for u in ("a", "b", "c"):
            batcher.release(u)
            assert spy.batches.get(timeout=5) == [u]
    gevent.sleep(0)
    assert not loop.dead
    assert spy.counted_calls().keys() == {"a", "b"}
    assert "limits release of 1 calls failed (down); retrying" in caplog.text
    assert "a bug" in caplog.text
    assert spy.batches.get(timeout=5) == ["a"]  # Redis did not answer: sent again
    gevent.sleep(0)
    assert spy.counted_calls().keys() == {"b"}  # a bug is not retried: left to the deadline
    assert batcher.retrying == 0
    stop.set()
    loop.join(timeout=5)


def test_release_batcher_retries_while_redis_is_down_then_gives_up(private_redis: PrivateRedis) -> None:
    client = quick_client(private_redis.port)
    limiter = _acquired(Limiter(client, "cg:"), ["a", "b"])
    now = FakeClock(0.0)
    batcher = ReleaseBatcher(limiter, window=0.001, retry_delay=0.05, retry_for=10.0, monotonic=now)
    stop = gevent.event.Event()
    loop = gevent.spawn(batcher.run, stop)
    private_redis.stop()
    batcher.release("a")
    wait_until(lambda: batcher.retrying == 1)
    now.t = 1.0  # retried (and failing) while Redis is down
    gevent.sleep(0.3)
    assert batcher.retrying == 1
    private_redis.start()
    now.t = 2.0
    wait_until(lambda: batcher.retrying == 0)  # queued again: sent after the batch window
    wait_until(lambda: limiter.counted_calls().keys() == {"b"})  # released once Redis answered
    private_redis.stop()
    batcher.release("b")
    wait_until(lambda: batcher.retrying == 1)
    now.t = 20.0  # past retry_for: given up, left to the slot's deadline
    wait_until(lambda: batcher.retrying == 0)
    stop.set()
    loop.join(timeout=5)
    assert loop.dead


# --------------------------------------------------------------------------- cost


def test_measure_acquire_release_cost(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    cat = catalog(
        [account(1, 1000, 100_000, reseller_id=2), account(2, 10000)],
        [trunk(10, 500, 100_000), trunk(11, 500)],
    )
    plan = limiter.subjects_for(accept((1, 2), (10, 11)), cat)
    for n in range(200):  # warm the script cache and the connection
        limiter.acquire(f"w{n}", plan, 60)
        limiter.release(f"w{n}")
    rounds = 3000
    acquire_s = release_s = 0.0
    for n in range(rounds):
        t0 = time.perf_counter()
        result = limiter.acquire(f"m{n}", plan, 60)
        t1 = time.perf_counter()
        limiter.release(f"m{n}")
        t2 = time.perf_counter()
        assert result.admitted
        acquire_s += t1 - t0
        release_s += t2 - t1
    t0 = time.perf_counter()
    for _ in range(rounds):
        limiter.subjects_for(accept((1, 2), (10, 11)), cat)
    plan_s = time.perf_counter() - t0
    print(
        f"\nlimits cost per call (account + reseller + 2 trunks, local Redis): "
        f"acquire {acquire_s / rounds * 1e6:.0f} us, release {release_s / rounds * 1e6:.0f} us, "
        f"subjects_for {plan_s / rounds * 1e6:.1f} us"
    )


# --------------------------------------------------------------------------- a timeout after sending


class _Source:
    """A catalogue source confirmed just now (what the watcher gives the decider)."""

    loaded = True

    def __init__(self, catalog: Catalog) -> None:
        self.current = (1, catalog)

    def confirmed_age(self) -> float:
        return 0.0

    switching_since = None


def _limited_world(max_channels: int) -> tuple[World, Catalog]:
    world = World()
    world.b.update(world.customer, max_channels=max_channels)
    return world, world.catalog()


@VIA
def test_a_timeout_after_the_acquire_was_sent_is_ambiguous(private_redis: PrivateRedis, via: str) -> None:
    """Redis receives the acquire but answers after the client gave up: the slot *was*
    taken. The error says so (LimitsAmbiguous), and a release frees it."""
    client = quick_client(private_redis.port, timeout=0.3)
    limiter = Limiter(client, "cg:", direct=direct_for(client, via))
    plan = LimitPlan((acct(1, 1),))
    assert limiter.acquire("warm-up", LimitPlan((acct(99, 5),)), 60).admitted  # script cached
    private_redis.freeze()  # the kernel still accepts the request; Redis runs it when thawed
    try:
        with pytest.raises(LimitsAmbiguous):
            limiter.acquire("late", plan, 60)
    finally:
        private_redis.thaw()
    observer = quick_client(private_redis.port, timeout=5)
    wait_until(lambda: observer.zcard("cg:limits:ch:acct:1") == 1)  # the script did run
    refused = limiter.acquire("next", plan, 60)
    assert not refused.admitted  # 1/1: the ambiguous call holds the slot until released
    assert limiter.release_many(["late"]) == 1
    assert limiter.acquire("next", plan, 60).admitted


def test_a_refused_connection_is_not_ambiguous() -> None:
    limiter = Limiter(quick_client(free_port()), "x:")  # nothing listens: nothing was sent
    with pytest.raises(LimitsUnavailable) as raised:
        limiter.acquire("a", LimitPlan((acct(1, 5),)), 60)
    assert not isinstance(raised.value, LimitsAmbiguous)


def test_the_decider_releases_a_call_whose_acquire_timed_out(private_redis: PrivateRedis) -> None:
    """Issue 12: the call is refused ENGINE_DEGRADED and its release is queued, so the slot
    the script took is freed at once instead of being held until its deadline."""
    world, cat = _limited_world(max_channels=1)
    client = quick_client(private_redis.port, timeout=0.3)
    limiter = Limiter(client, "cg:")
    released: list[str] = []
    decider = Decider(_Source(cat), RulesConfig(), max_age=5, limiter=limiter, release_later=released.append)
    assert limiter.acquire("warm-up", LimitPlan((acct(99, 5),)), 60).admitted  # script cached
    private_redis.freeze()
    try:
        decision = decider(call())
    finally:
        private_redis.thaw()
    assert isinstance(decision, Reject) and decision.reason is Reason.ENGINE_DEGRADED
    assert "limits unavailable" in decision.detail
    assert released == [call().uuid]
    observer = quick_client(private_redis.port, timeout=5)
    key = f"cg:limits:ch:acct:{world.customer.id}"
    wait_until(lambda: observer.zcard(key) == 1)  # taken although the call was refused
    batcher = ReleaseBatcher(limiter)
    for uuid in released:
        batcher.release(uuid)
    batcher.flush()
    assert observer.zcard(key) == 0
    assert isinstance(decider(call()), Accept)  # the slot is free again


def test_the_decider_queues_no_release_when_nothing_was_sent() -> None:
    _world, cat = _limited_world(max_channels=1)
    released: list[str] = []
    limiter = Limiter(quick_client(free_port()), "x:")
    decider = Decider(_Source(cat), RulesConfig(), max_age=5, limiter=limiter, release_later=released.append)
    decision = decider(call())
    assert isinstance(decision, Reject) and decision.reason is Reason.ENGINE_DEGRADED
    assert released == []


def test_fail_open_releases_an_ambiguous_acquire_once_redis_answers(private_redis: PrivateRedis) -> None:
    client = quick_client(private_redis.port, timeout=0.3)
    limiter = FailOpenLimiter(Limiter(client, "cg:"), retry_after=0.0)
    plan = LimitPlan((acct(1, 2),))
    assert limiter.acquire("warm-up", LimitPlan((acct(99, 5),)), 60).admitted  # script cached
    private_redis.freeze()
    try:
        local = limiter.acquire("late", plan, 60)  # decided locally; Redis got it too
    finally:
        private_redis.thaw()
    assert local.admitted and local.degraded
    observer = quick_client(private_redis.port, timeout=5)
    wait_until(lambda: observer.zcard("cg:limits:ch:acct:1") == 1)
    assert limiter.release("late")  # ends before the resync: Redis must still hear of it
    limiter.resync()
    assert observer.zcard("cg:limits:ch:acct:1") == 0


# --------------------------------------------------------------------------- peek (explain)


def test_peek_answers_as_acquire_would_and_takes_nothing(client, key_prefix: str) -> None:
    limiter = Limiter(client, key_prefix)
    plan = LimitPlan((acct(1, 2),), (tr(10, 1), tr(11, 0, 5)))
    assert limiter.peek(plan) == limiter.acquire("a", plan, 60)  # counted on trunk 10
    assert limiter.peek(plan) == limiter.acquire("b", plan, 60)  # 10 full: on 11, unlimited channels
    assert limit_reason(limiter.peek(plan)) is Reason.CONCURRENT_LIMIT  # account at 2/2
    before = keys_of(client, key_prefix)
    for _ in range(5):
        limiter.peek(plan)
    assert {k: members(client, k) for k in before if ":ch:" in k or ":cps:" in k} == {
        k: members(client, k) for k in keys_of(client, key_prefix) if ":ch:" in k or ":cps:" in k
    }
    refused = limiter.acquire("c", plan, 60)
    assert limit_reason(refused) is Reason.CONCURRENT_LIMIT
    cps_only = LimitPlan((acct(2, 0, 1),))
    limiter.acquire("d", cps_only, 60)
    assert limit_reason(limiter.peek(cps_only)) is Reason.CPS_LIMIT


def test_explain_says_concurrent_limit_at_2_of_2_and_takes_nothing(client, key_prefix: str) -> None:
    """Issue 15 item 10: explain runs the engine's steps, limits included, peeked."""
    world, cat = _limited_world(max_channels=2)
    limiter = Limiter(client, key_prefix)
    engine = Decider(_Source(cat), RulesConfig(), max_age=5, limiter=limiter)
    assert isinstance(engine(dataclasses.replace(call(), uuid="up-1")), Accept)
    assert isinstance(engine(dataclasses.replace(call(), uuid="up-2")), Accept)  # 2/2 channels
    key = limits_channels_key(key_prefix, "acct", world.customer.id)
    held = members(client, key)
    registry = members(client, limits_registry_key(key_prefix))
    explained = explain_request(Config(), call(), cat, limiter)
    assert isinstance(explained, Reject) and explained.reason is Reason.CONCURRENT_LIMIT
    assert explained.steps[-1].rule == "limits"
    assert members(client, key) == held == {"up-1", "up-2"}  # nothing taken
    assert members(client, limits_registry_key(key_prefix)) == registry
    limiter.release("up-1")
    assert isinstance(explain_request(Config(), call(), cat, limiter), Accept)
    assert members(client, key) == {"up-2"}
