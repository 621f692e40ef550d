"""The reconciler gives back the funds reservations of the calls no switch knows (an engine killed
with calls up: their hangups are never seen), and keeps those of live calls."""

from __future__ import annotations

from decimal import Decimal

import redis

from engine.billing.funds import Funds, FundsLevel
from engine.billing.rating import Tariff
from engine.reconcile import SwitchAddress, reconcile
from engine.state.limits import LevelKind, LimitPlan, Subject
from engine.state.limits.redis import Limiter

D = Decimal
PER_MINUTE = Tariff(D("1.00"), init_inc=60, inc=60)
PLAN = LimitPlan((Subject(LevelKind.ACCOUNT, 1, max_channels=10),))


def test_reservations_of_calls_no_switch_knows_are_released_live_ones_kept(
    client: redis.Redis, key_prefix: str
) -> None:
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    levels = [FundsLevel(1, D("10.00"), D(0), PER_MINUTE), FundsLevel(2, D("50.00"), D(0), PER_MINUTE)]
    for uuid in ("live", "dead-1", "dead-2"):
        result = limiter.acquire(uuid, PLAN, 120, funds.request(levels, cap_seconds=120))
        assert result.admitted and result.granted_seconds == 120
    assert funds.account(1).reserved == D("6.00") and funds.account(2).open_calls == 3

    report = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=0, lister=lambda _s: {"live"},
        release_funds=funds.release_calls,
    )  # fmt: skip
    assert report.ran and sorted(report.released) == ["dead-1", "dead-2"] and not report.errors
    for account_id in (1, 2):
        state = funds.account(account_id)
        assert (state.reserved, state.open_calls) == (D("2.00"), 1)
    assert funds.release_calls(["dead-1", "never-reserved"]) == []  # nothing left to release


def test_a_redis_failure_while_releasing_funds_is_reported_not_raised(
    client: redis.Redis, key_prefix: str
) -> None:
    limiter = Limiter(client, prefix=key_prefix)
    assert limiter.acquire("dead", PLAN, 120).admitted

    def broken(_uuids: list[str]) -> None:
        raise redis.exceptions.ConnectionError("gone")

    report = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=0, lister=lambda _s: set(), release_funds=broken
    )
    assert report.ran and report.released == ("dead",) and report.errors == ("funds: gone",)
