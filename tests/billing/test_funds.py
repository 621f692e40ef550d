"""Funds reservations and the Redis-side debit, against the real Redis."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
import redis

from engine.billing.funds import (
    Funds,
    FundsLevel,
    FundsUnavailable,
    Settlement,
    cdr_stream,
)
from engine.billing.rating import Tariff, call_cost

D = Decimal
PER_MINUTE = Tariff(cost_per_minute=D("1.00"), init_inc=60, inc=60)


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def funds(client: redis.Redis, key_prefix: str) -> Funds:
    return Funds(client, key_prefix)


def level(
    account_id: int = 1, base: str = "3.00", recorded: str = "0", tariff: Tariff = PER_MINUTE
) -> FundsLevel:
    return FundsLevel(account_id, D(base), D(recorded), tariff)


def test_fifty_concurrent_reservations_never_exceed_the_funds(redis_url: str, key_prefix: str) -> None:
    """Funds for 3 minutes; 50 calls at once, each asking for up to 10 minutes."""
    results: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def call(n: int) -> None:
        own = Funds(redis.Redis.from_url(redis_url), key_prefix)
        start.wait()
        r = own.reserve(f"call-{n}", [level()], cap_seconds=600)
        with lock:
            results.append(r.seconds if r.granted else -1)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    granted = [s for s in results if s >= 0]
    assert len(results) == 50
    assert granted == [180]  # one call takes all 3 minutes, 49 are refused
    total = sum(call_cost(PER_MINUTE, s) for s in granted)
    assert total <= D("3.00")


def test_fifty_concurrent_capped_calls_share_the_funds(redis_url: str, key_prefix: str) -> None:
    """With each call capped at 60 s, three calls fit in 3 minutes of funds, the rest are refused."""
    results: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def call(n: int) -> None:
        own = Funds(redis.Redis.from_url(redis_url), key_prefix)
        start.wait()
        r = own.reserve(f"call-{n}", [level()], cap_seconds=60)
        with lock:
            results.append(r.seconds if r.granted else -1)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    granted = [s for s in results if s >= 0]
    assert sorted(granted) == [60, 60, 60]
    assert sum(call_cost(PER_MINUTE, s) for s in granted) == D("3.00")


def test_a_second_call_is_possible_while_the_first_is_up(funds: Funds) -> None:
    first = funds.reserve("a", [level(base="5.00")], cap_seconds=120)
    second = funds.reserve("b", [level(base="5.00")], cap_seconds=600)
    assert (first.granted, first.seconds) == (True, 120)
    assert (second.granted, second.seconds) == (True, 180)  # 5.00 - 2.00 reserved = 3 minutes
    assert not funds.reserve("c", [level(base="5.00")], cap_seconds=600).granted
    assert funds.available(level(base="5.00")) == D("0")


def test_reserve_is_idempotent_per_uuid(funds: Funds) -> None:
    first = funds.reserve("a", [level()], cap_seconds=60)
    again = funds.reserve("a", [level()], cap_seconds=60)
    assert again.duplicate and again.seconds == first.seconds == 60
    assert funds.account(1).reserved == D("1.00")


def test_settle_replaces_the_reservation_by_the_real_cost_and_twice_is_once(
    funds: Funds, client: redis.Redis, key_prefix: str
) -> None:
    funds.reserve("a", [level()], cap_seconds=180)
    assert funds.available(level()) == D("0")
    item = Settlement("a", ((1, D("0"), D("1.00")),), {"uuid": "a", "billsec": 42})
    assert funds.settle(item) is True
    assert funds.settle(item) is False
    assert funds.settle_many([item, item]) == [False, False]
    state = funds.account(1)
    assert (state.spent, state.reserved, state.open_calls) == (D("1.00"), D("0"), 0)
    assert funds.available(level()) == D("2.00")
    assert client.xlen(cdr_stream(key_prefix)) == 1  # one CDR queued, not three


def test_spent_not_yet_recorded_counts_until_the_snapshot_records_it(funds: Funds) -> None:
    funds.settle(Settlement("a", ((1, D("0"), D("1.50")),), {}))
    # The snapshot still shows the old balance (3.00, nothing recorded): 1.50 is unrecorded.
    assert funds.available(level(base="3.00", recorded="0")) == D("1.50")
    # PostgreSQL applied it: balance 1.50, calls_debited 1.50 -> nothing unrecorded.
    assert funds.available(level(base="1.50", recorded="1.50")) == D("1.50")
    r = funds.reserve("b", [level(base="3.00", recorded="0")], cap_seconds=600)
    assert (r.granted, r.seconds) == (True, 60)


def test_redis_without_state_starts_from_the_snapshot(funds: Funds) -> None:
    """After a Redis restart spent is unknown: it is initialised to what PostgreSQL recorded."""
    r = funds.reserve("a", [level(base="2.00", recorded="7.00")], cap_seconds=600)
    assert (r.granted, r.seconds) == (True, 120)
    assert funds.account(1).spent == D("7.00")


def test_every_reseller_pays_at_its_own_price_and_the_poorest_sets_the_duration(funds: Funds) -> None:
    customer = level(1, base="10.00", tariff=Tariff(D("1.00")))
    reseller = level(2, base="1.00", tariff=Tariff(D("0.50"), connect_cost=D("0.10")))
    r = funds.reserve("a", [customer, reseller], cap_seconds=3600)
    assert (r.granted, r.seconds) == (True, 108)  # (1.00 - 0.10) / 0.50 * 60
    assert funds.account(2).reserved == call_cost(reseller.tariff, 108) == D("1.00")
    assert funds.account(1).reserved == D("1.80")
    broke = level(2, base="0.55", tariff=Tariff(D("0.50"), connect_cost=D("0.10")))
    refused = funds.reserve("b", [customer, broke], cap_seconds=3600)
    assert (refused.granted, refused.refused_level) == (False, 1)


def test_increments_are_reserved_whole(funds: Funds) -> None:
    tariff = Tariff(D("0.60"), connect_cost=D("0.05"), init_inc=30, inc=30)
    r = funds.reserve("a", [level(base="1.00", tariff=tariff)], cap_seconds=3600)
    # 0.95 buys 95 s at 0.01/s; whole 30 s blocks: 90 s.
    assert r.seconds == 90
    assert funds.account(1).reserved == call_cost(tariff, 90) == D("0.95")


def test_a_reservation_whose_hangup_is_never_seen_expires(funds: Funds, key_prefix: str) -> None:
    f = Funds(funds._client, key_prefix, margin_seconds=0)
    f.reserve("lost", [level()], cap_seconds=60, now_ms=1_000_000)
    assert f.account(1).reserved == D("1.00")
    later = f.reserve("next", [level()], cap_seconds=600, now_ms=1_000_000 + 60_001)
    assert later.seconds == 180  # the lost call's minute is free again


def test_release_gives_an_unused_reservation_back(funds: Funds) -> None:
    funds.reserve("a", [level()], cap_seconds=180)
    funds.release("a", [1])
    assert funds.account(1).reserved == D("0")


def test_redis_down_is_an_error_not_a_decision() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(FundsUnavailable):
        Funds(dead, "x:").reserve("a", [level()], cap_seconds=60)


def test_totals_add_every_open_reservation(funds: Funds) -> None:
    funds.reserve("a", [level(1, base="5.00")], cap_seconds=60)
    funds.reserve("b", [level(2, base="5.00")], cap_seconds=120)
    funds.reserve("c", [level(2, base="5.00")], cap_seconds=60)
    funds.settle(Settlement("c", ((2, D("0"), D("0.50")),), {}))
    assert funds.totals(count=1) == (D("3.00"), 2)


def test_the_lua_functions_compose_into_another_script(client: redis.Redis, key_prefix: str) -> None:
    """The integration contract for the limits script: FUNDS_LUA included, its keys and arguments
    after the host script's own, funds_check before any write, funds_take with the writes."""
    from engine.billing.funds import FUNDS_LUA, amounts_key, funds_key, reservations_key

    host = (
        FUNDS_LUA
        + """
-- the host's own key and argument first (standing in for the limits' ones)
redis.call('INCR', KEYS[1])
local now, cap, nlev = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local d = funds_check(2, 4, nlev, now, cap)
if d < 0 then return {0, -d} end
funds_take(2, 4, nlev, ARGV[1], d, now + d * 1000, 60000)
return {1, d}
"""
    )
    lv = level(7, base="2.50")
    keys = [
        f"{key_prefix}host",
        funds_key(key_prefix, 7),
        reservations_key(key_prefix, 7),
        amounts_key(key_prefix, 7),
    ]
    assert client.eval(host, len(keys), *keys, "x", 1_000, 600, 1, *lv.args()) == [1, 120]
    assert Funds(client, key_prefix).account(7).reserved == D("2.00")
    assert client.eval(host, len(keys), *keys, "y", 1_000, 600, 1, *lv.args()) == [0, 1]
