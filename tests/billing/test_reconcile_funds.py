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
from loadtest.fsemu import InboundServer, Switch
from tests.support import engine_environment, run_cli

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


def test_a_reservation_whose_slot_is_gone_is_released_when_the_call_is_not_live(
    client: redis.Redis, key_prefix: str
) -> None:
    """An engine killed between its two hangup batches: the limits release was flushed, the settle
    was not. No slot is left for the reconciler to find; the reservation alone is given back (found
    by the chaos suite, loadtest/chaos). A live call's reservation, and a counted call's within the
    grace period, are kept."""
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    levels = [FundsLevel(1, D("10.00"), D(0), PER_MINUTE)]
    for uuid in ("live", "slotless", "recent"):
        assert limiter.acquire(uuid, PLAN, 120, funds.request(levels, cap_seconds=120)).admitted
    assert limiter.release("slotless")  # its hangup's limits release ran, its settle never did
    assert funds.reserved_calls() == {"live", "slotless", "recent"}

    report = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=60, lister=lambda _s: {"live"},
        release_funds=funds.release_calls, reserved_calls=funds.reserved_calls,
    )  # fmt: skip
    assert report.ran and report.released == () and report.kept == 1 and not report.errors
    assert report.funds_only == ("slotless",)
    assert funds.reserved_calls() == {"live", "recent"}
    assert (funds.account(1).reserved, funds.account(1).open_calls) == (D("4.00"), 2)


def test_the_reconcile_command_gives_back_the_reservations_of_the_calls_it_releases(
    client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    """`callgate reconcile` released the slots of dead calls but left their funds reserved until
    their deadline (found by the chaos suite, whose checkpoints run the command)."""
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    levels = [FundsLevel(1, D("10.00"), D(0), PER_MINUTE)]
    for uuid in ("dead", "slotless"):
        assert limiter.acquire(uuid, PLAN, 120, funds.request(levels, cap_seconds=120)).admitted
    assert limiter.release("slotless")
    env = engine_environment("postgresql://unused@127.0.0.1:1/unused", redis_url, key_prefix)
    with InboundServer(Switch(), host="127.0.0.1") as inbound:  # a switch with no channel up
        done = run_cli(["reconcile", "--switch", f"127.0.0.1:{inbound.address[1]}", "--grace", "0"], env)
    assert done.returncode == 0, done.stderr
    assert "released 1" in done.stdout and "1 reservations of calls neither live nor counted" in done.stdout
    assert funds.reserved_calls() == set() and funds.account(1).reserved == D(0)
