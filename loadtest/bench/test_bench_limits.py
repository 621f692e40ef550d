"""The limits script: one Redis round trip per accepted call (acquire), one at hangup (release)."""

from __future__ import annotations

import itertools

import pytest

from engine.decision import Accept
from engine.model import CallRequest
from engine.rules import decide
from engine.state.limits import Limiter
from loadtest.bench.conftest import SMALL, plans

pytestmark = pytest.mark.benchmark(group="limits")


@pytest.fixture
def plan_cycle(small_catalog, ctx):
    limit_plans = []
    for p in plans(SMALL, n=200):
        decision = decide(
            CallRequest(uuid="x", destination=p.destination, sip_auth_username=p.sip_auth_username),
            small_catalog,
            ctx,
        )
        assert isinstance(decision, Accept), decision  # the dataset's plans are all accepted
        limit_plans.append((Limiter.subjects_for(decision, small_catalog), decision.max_duration))
    return itertools.cycle(limit_plans)


def test_limits_acquire(benchmark, redis_client, key_prefix, plan_cycle) -> None:
    """Acquire on account + reseller + five trunks (every call a new uuid, never released:
    the sets grow during the run, as with held calls)."""
    limiter = Limiter(redis_client, key_prefix)
    counter = itertools.count()

    def run():
        plan, hold = next(plan_cycle)
        return limiter.acquire(f"call-{next(counter)}", plan, hold)

    result = benchmark(run)
    assert result.admitted


def test_limits_acquire_and_release(benchmark, redis_client, key_prefix, plan_cycle) -> None:
    limiter = Limiter(redis_client, key_prefix)
    counter = itertools.count()

    def run():
        plan, hold = next(plan_cycle)
        uuid = f"call-{next(counter)}"
        limiter.acquire(uuid, plan, hold)
        return limiter.release(uuid)

    assert benchmark(run)
