"""The reconciler gives back the funds reservations of the calls no switch knows (an engine killed
with calls up: their hangups are never seen), and keeps those of live calls."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import cast

import redis

from engine.billing.funds import Funds, FundsLevel, Settlement
from engine.billing.rating import Tariff, from_micros
from engine.esl.inbound import InboundError
from engine.reconcile import LiveChannels, SwitchAddress, reconcile
from engine.recount import (
    ALREADY_COUNTED,
    ALREADY_SETTLED,
    RECOUNTED,
    TOO_RECENT,
    CallVariables,
    Recounter,
    RecountRequest,
    recount_request,
)
from engine.state.keys import funds_amounts_key, limits_channels_key
from engine.state.limits import LevelKind, LimitPlan, Subject
from engine.state.limits.redis import Limiter
from loadtest.fsemu import InboundServer, Switch
from tests.support import engine_environment, run_cli
from tests.test_recount import CUSTOMER, RESELLER, ticket_text

D = Decimal
PER_MINUTE = Tariff(D("1.00"), init_inc=60, inc=60)
PLAN = LimitPlan((Subject(LevelKind.ACCOUNT, 1, max_channels=10),))


def held(client: redis.Redis, key: str) -> set[str]:
    return {member.decode() for member in cast(list[bytes], client.zrange(key, 0, -1))}


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


# --------------------------------------------------------------------------- re-counting lost acquires

ACCOUNT, RESELLER_ID, DID, TRUNK = 11, 4, 21, 7
LOST_PLAN = LimitPlan(
    (
        Subject(LevelKind.ACCOUNT, ACCOUNT, max_channels=2),
        Subject(LevelKind.RESELLER, RESELLER_ID, max_channels=10),
        Subject(LevelKind.DID, DID, max_channels=10),
    ),
    (Subject(LevelKind.TRUNK, TRUNK, max_channels=5), Subject(LevelKind.TRUNK, 8, max_channels=5)),
)


def lost_ticket(decided_ago: float = 60.0) -> str:
    """The ticket the engine wrote on a call of LOST_PLAN decided ``decided_ago`` seconds ago."""
    decided = datetime.now(UTC) - timedelta(seconds=decided_ago)
    return ticket_text(chain=(ACCOUNT, RESELLER_ID), trunks=(TRUNK, 8), decided=decided)


def recounter_with(limiter: Limiter, funds: Funds, variables: dict[str, CallVariables]) -> Recounter:
    """A Recounter reading channel variables from ``variables`` instead of a switch."""
    return Recounter(limiter, funds, fetch=lambda _h, _p, _pw, uuids, _t: {u: variables[u] for u in uuids})


def funds_levels() -> list[FundsLevel]:
    return [FundsLevel(ACCOUNT, D(1000), D(0), CUSTOMER), FundsLevel(RESELLER_ID, D(1000), D(0), RESELLER)]


def test_live_calls_whose_acquire_was_lost_are_counted_and_reserved_again(
    client: redis.Redis, key_prefix: str
) -> None:
    """A failover lost the acquire of ``lost`` (neither counted nor reserved on the new primary)
    while ``kept``'s survived. One reconciliation counts ``lost`` again where its acquire counted
    it, and reserves what its acquire reserved (the same as ``kept``, same ticket); a second run
    changes nothing; the account is then full and a new call is refused."""
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    kept = limiter.acquire("kept", LOST_PLAN, 3600, funds.request(funds_levels(), cap_seconds=3600))
    assert kept.admitted and kept.granted_seconds == 3600 and kept.counted_trunk_id == TRUNK
    live = LiveChannels({"kept", "lost", "lost-b", "no-ticket"}, inbound={"kept", "lost", "no-ticket"})
    variables = {"lost": CallVariables(lost_ticket(), str(DID)), "no-ticket": CallVariables(None, None)}
    recounter = recounter_with(limiter, funds, variables)

    report = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=5, lister=lambda _s: live,
        release_funds=funds.release_calls, reserved_calls=funds.reserved_calls, recounter=recounter,
    )  # fmt: skip
    assert report.ran and report.recounted == ("lost",) and report.unrecountable == 1, report
    assert report.released == () and report.funds_only == () and not report.errors
    assert set(limiter.counted_calls()) == {"kept", "lost"}
    for group, subject in (("acct", ACCOUNT), ("acct", RESELLER_ID), ("did", DID), ("trunk", TRUNK)):
        assert held(client, limits_channels_key(key_prefix, group, subject)) == {"kept", "lost"}, group
    assert held(client, limits_channels_key(key_prefix, "trunk", 8)) == set()  # counted on the first only
    for account_id in (ACCOUNT, RESELLER_ID):
        amounts = client.hgetall(funds_amounts_key(key_prefix, account_id))
        assert amounts[b"lost"] == amounts[b"kept"] and int(amounts[b"lost"]) > 0
        assert funds.account(account_id).open_calls == 2

    again = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=5, lister=lambda _s: live, recounter=recounter
    )
    kept_amount = client.hget(funds_amounts_key(key_prefix, ACCOUNT), "kept")
    assert kept_amount is not None
    assert (
        again.ran
        and again.recounted == ()
        and funds.account(ACCOUNT).reserved == 2 * from_micros(int(kept_amount))
    )
    refused = limiter.acquire("third", LOST_PLAN, 60, funds.request(funds_levels(), cap_seconds=60))
    assert not refused.admitted and (refused.level, refused.subject_id) == (LevelKind.ACCOUNT, ACCOUNT)

    # Its hangup releases the re-counted call like any other: the slots, then the reservation.
    assert limiter.release("lost")
    assert held(client, limits_channels_key(key_prefix, "acct", ACCOUNT)) == {"kept"}
    assert held(client, limits_channels_key(key_prefix, "did", DID)) == {"kept"}
    funds.release("lost", [ACCOUNT, RESELLER_ID])
    assert funds.account(ACCOUNT).open_calls == 1


def test_recount_leaves_young_settled_and_already_counted_calls_alone(
    client: redis.Redis, key_prefix: str
) -> None:
    limiter = Limiter(client, prefix=key_prefix)
    funds = Funds(client, key_prefix)
    recounter = Recounter(limiter, funds)

    def request(uuid: str, decided_ago: float) -> RecountRequest:
        made = recount_request(uuid, CallVariables(lost_ticket(decided_ago), None))
        assert made is not None
        return made

    # Decided within the grace period: its acquire may not be visible yet; left alone.
    assert recounter.apply(request("young", 1.0), grace_seconds=5) == TOO_RECENT
    # Hung up and settled between the listing and the script: not counted again.
    assert funds.settle(Settlement("ended", ((ACCOUNT, D(0), D("0.10")),), {"uuid": "ended"}))
    assert recounter.apply(request("ended", 60.0), grace_seconds=5) == ALREADY_SETTLED
    # Two reconcilers (or two runs) on one lost call: the registry lets only one count it.
    assert recounter.apply(request("twice", 60.0), grace_seconds=5) == RECOUNTED
    assert recounter.apply(request("twice", 60.0), grace_seconds=5) == ALREADY_COUNTED
    assert set(limiter.counted_calls()) == {"twice"}
    assert held(client, limits_channels_key(key_prefix, "acct", ACCOUNT)) == {"twice"}
    assert funds.account(ACCOUNT).open_calls == 1 and funds.account(RESELLER_ID).open_calls == 1


def test_recount_is_skipped_for_a_switch_whose_variables_cannot_be_read(
    client: redis.Redis, key_prefix: str
) -> None:
    """Re-counting only adds calls a switch showed: a switch that cannot be read delays its own
    calls' recount to the next run; the rest of the reconciliation stands."""
    limiter = Limiter(client, prefix=key_prefix)

    def unreachable(*_args: object) -> dict[str, CallVariables]:
        raise InboundError("switch:8021: connect failed")

    report = reconcile(
        limiter, [SwitchAddress("switch")], grace_seconds=0, lister=lambda _s: LiveChannels({"x"}, {"x"}),
        recounter=Recounter(limiter, None, fetch=unreachable),
    )  # fmt: skip
    assert report.ran and report.recounted == ()
    assert report.errors == ("recount: switch:8021: connect failed",)
    assert limiter.counted_calls() == {}
