"""The reservation taken inside the limits acquire script: one round trip for limits and funds."""

from __future__ import annotations

import threading
from decimal import Decimal

import pytest
import redis

from engine.billing.funds import Funds, FundsLevel, Settlement
from engine.billing.rating import Tariff, call_cost
from engine.decider import limit_reason
from engine.decision import Reason
from engine.state.limits import FailOpenLimiter, LevelKind, LimitPlan, LimitResult, LimitsUnavailable, Subject
from engine.state.limits.redis import Limiter

D = Decimal
PER_MINUTE = Tariff(D("1.00"), init_inc=60, inc=60)


def level(account_id: int = 1, base: str = "3.00") -> FundsLevel:
    return FundsLevel(account_id, D(base), D(0), PER_MINUTE)


def plan(max_channels: int = 0) -> LimitPlan:
    return LimitPlan((Subject(LevelKind.ACCOUNT, 1, max_channels=max_channels),))


def granted_seconds(result: LimitResult) -> int:
    """The seconds a call admitted with a funds request was granted (it always has some)."""
    assert result.granted_seconds is not None, result
    return result.granted_seconds


def test_fifty_concurrent_calls_in_one_round_trip_each_never_exceed_the_funds(
    redis_url: str, key_prefix: str
) -> None:
    results: list[LimitResult] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def call(n: int) -> None:
        client = redis.Redis.from_url(redis_url)
        limiter = Limiter(client, prefix=key_prefix)
        funds = Funds(client, key_prefix)
        start.wait()
        result = limiter.acquire(f"c{n}", plan(), 600, funds.request([level()], cap_seconds=60))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 50  # every call got an answer (a thread that raised would not)
    admitted = [granted_seconds(r) for r in results if r.admitted]
    assert sorted(admitted) == [60, 60, 60]
    assert sum(call_cost(PER_MINUTE, g) for g in admitted) <= D("3.00")


def test_a_funds_refusal_takes_no_limit_and_maps_to_no_sufficient_fund(
    client: redis.Redis, key_prefix: str
) -> None:
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    first = limiter.acquire("a", plan(max_channels=5), 600, funds.request([level()], 600))
    assert (first.admitted, first.granted_seconds) == (True, 180)
    refused = limiter.acquire("b", plan(max_channels=5), 600, funds.request([level()], 600))
    assert (refused.admitted, refused.funds_level) == (False, 0)
    assert limit_reason(refused) is Reason.NO_SUFFICIENT_FUND
    assert limiter.usage(plan(max_channels=5))[0].channels == 1  # "b" took no channel
    again = limiter.acquire("a", plan(max_channels=5), 600, funds.request([level()], 600))
    assert (again.duplicate, again.granted_seconds) == (True, 180)
    # The hangup settles the reservation; the next call has the rest of the funds.
    funds.settle(Settlement("a", ((1, D(0), D("1.00")),), {}))
    limiter.release("a")
    nxt = limiter.acquire("c", plan(max_channels=5), 600, funds.request([level()], 600))
    assert nxt.granted_seconds == 120


def test_without_funds_the_script_answers_as_before(client: redis.Redis, key_prefix: str) -> None:
    result = Limiter(client, prefix=key_prefix).acquire("a", plan(max_channels=1), 60)
    assert (result.admitted, result.granted_seconds, result.funds_level) == (True, None, None)


def test_fail_open_never_approximates_funds() -> None:
    dead = Limiter(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), prefix="x:")
    limiter = FailOpenLimiter(dead)
    request = Funds(dead.client, "x:").request([level()], 60)
    with pytest.raises(LimitsUnavailable):
        limiter.acquire("a", plan(max_channels=1), 60, request)
