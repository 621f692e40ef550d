"""§5: longest prefix, personal vs group, ties, markup, increments, funds, durations, resellers."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine.call.render import channel_variables
from engine.decision import Accept, Reason, Reject
from engine.rules import RulesConfig
from engine.rules.rating import Rating, affordable_seconds, find_rate, rate_level, with_markup
from engine.rules.refusal import Refusal
from tests.rules.builders import World, run

D = Decimal


def rated(world: World, destination: str = "442071234567", **config) -> Rating:
    catalog = world.catalog()
    rating = rate_level(catalog.accounts[world.customer.id], destination, catalog, RulesConfig(**config))
    assert isinstance(rating, Rating), rating
    return rating


def test_markup_applies_to_the_per_minute_cost_only() -> None:
    world = World()
    world.b.update(world.retail, markup_percent=D(10))
    world.b.update(world.rate_44, cost_per_minute=D("0.012"), connect_cost=D("0.05"))
    level = rated(world).level
    assert level.cost_per_minute == D("0.0132")
    assert level.connect_cost == D("0.05")


@pytest.mark.parametrize(
    ("cost", "markup", "expected"),
    [("0.012", "10", "0.0132"), ("0.1", "33.333", "0.133333"), ("1", "0", "1"), ("0.07", "-50", "0.035")],
)
def test_markup_is_exact(cost: str, markup: str, expected: str) -> None:
    assert with_markup(D(cost), D(markup)) == D(expected)


def test_callgate_rate_shows_the_marked_up_cost() -> None:
    world = World()
    world.b.update(world.retail, markup_percent=D(10))
    world.b.update(world.rate_44, prefix="4420", cost_per_minute=D("0.012"))
    world.b.update(world.term_a, cost_per_minute=D("0.004"))
    decision = run(world.catalog())
    assert isinstance(decision, Accept)
    assert ("callgate_rate", "4420:0.0132") in channel_variables(decision)


@pytest.mark.parametrize(
    ("group_prefix", "personal_prefix", "winner"),
    [
        ("44", "44", "personal"),  # same length: personal beats group
        ("4420", "44", "group"),  # a longer group rate beats a shorter personal one (ASTPP fix)
        ("44", "4420", "personal"),
        ("", "", "personal"),
    ],
)
def test_personal_against_group(group_prefix: str, personal_prefix: str, winner: str) -> None:
    world = World()
    world.b.update(world.rate_44, prefix=group_prefix)
    personal = world.b.rate(world.customer, personal_prefix, "0.09")
    rate = find_rate(world.catalog(), world.customer.id, world.retail.id, "442071234567")
    assert rate is not None
    assert rate.id == (personal.id if winner == "personal" else world.rate_44.id)


def test_personal_rates_of_other_accounts_are_ignored() -> None:
    world = World()
    other = world.b.account("2002", rate_group=world.retail)
    world.b.rate(other, "4420", "0.01")
    assert rated(world).rate.id == world.rate_44.id


def test_longest_group_prefix_wins() -> None:
    world = World()
    long = world.b.rate(world.retail, "442071", "0.2")
    world.b.rate(world.retail, "4420", "0.3")
    world.b.rate(world.retail, "", "0.5")
    assert rated(world).rate.id == long.id
    assert rated(world, "33123").level.cost_per_minute == D("0.5")  # the catch-all


@pytest.mark.parametrize("personal", [False, True])
def test_ties_go_to_the_higher_cost(personal: bool) -> None:
    world = World()
    owner = world.customer if personal else world.retail
    world.b.rate(owner, "4420", "0.10")
    dear = world.b.rate(owner, "4420", "0.30")
    world.b.rate(owner, "4420", "0.20")
    assert rated(world).rate.id == dear.id


def test_inactive_rate_yields_to_a_shorter_active_one() -> None:
    world = World()
    world.b.rate(world.retail, "4420", "0.5", active=False)
    assert rated(world).rate.id == world.rate_44.id


@pytest.mark.parametrize(
    ("rate_inc", "group_inc", "expected"),
    [
        ((30, 6), (60, 60), (30, 6)),
        ((0, 0), (60, 6), (60, 6)),
        ((0, 0), (0, 0), (1, 1)),
        ((0, 10), (0, 0), (1, 10)),
    ],
)
def test_increments_fall_back_to_the_group_then_one(rate_inc, group_inc, expected) -> None:
    world = World()
    world.b.update(world.rate_44, init_inc=rate_inc[0], inc=rate_inc[1])
    world.b.update(world.retail, init_inc=group_inc[0], inc=group_inc[1])
    level = rated(world).level
    assert (level.init_inc, level.inc) == expected


@pytest.mark.parametrize(
    ("available", "connect", "cost", "expected"),
    [
        ("1", "0", "0.07", 857),  # floor(857.14...)
        ("1", "0.3", "0.07", 600),  # exactly 600
        ("0.17", "0.1", "0.07", 60),  # exactly one minute
        ("1", "0", "0.06", 1000),
        ("0.1", "0", "0.03", 200),
        ("1000000", "0", "0.01", 6000),  # capped by call_max_length
        ("5", "0", "0", 6000),  # free rate: max_free_length
    ],
)
def test_affordable_seconds(available: str, connect: str, cost: str, expected: int) -> None:
    assert affordable_seconds(D(available), D(connect), D(cost), RulesConfig()) == expected


def test_duration_is_capped_by_call_max_length() -> None:
    world = World()
    assert rated(world, call_max_length=300).level.max_duration == 300
    assert rated(world).level.max_duration == 6000  # 10 / 0.10 = 100 min, exactly the default cap


def test_free_rate_gets_max_free_length_within_the_cap() -> None:
    world = World()
    world.b.update(world.rate_44, cost_per_minute=D(0))
    world.b.update(world.term_a, cost_per_minute=D(0))
    assert rated(world, max_free_length=120).level.max_duration == 120
    assert rated(world, max_free_length=9000, call_max_length=3000).level.max_duration == 3000


def test_free_rate_with_zero_balance_is_allowed() -> None:
    world = World()
    world.b.update(world.customer, balance=D(0))
    world.b.update(world.rate_44, cost_per_minute=D(0))
    world.b.update(world.term_a, cost_per_minute=D(0))
    decision = run(world.catalog(), max_free_length=900)
    assert isinstance(decision, Accept) and decision.max_duration == 900


@pytest.mark.parametrize("postpaid", [False, True])
@pytest.mark.parametrize(("delta", "accepted"), [("0", True), ("-0.000001", False), ("0.000001", True)])
def test_funds_boundary(postpaid: bool, delta: str, accepted: bool) -> None:
    """avail == connect + cost is enough; one micro-unit less is not."""
    world = World()
    world.b.update(world.rate_44, cost_per_minute=D("0.10"), connect_cost=D("0.25"))
    available = D("0.35") + D(delta)
    if postpaid:  # the same availability as balance + credit limit, with debt
        world.b.update(world.customer, postpaid=True, balance=available - D(50), credit_limit=D(50))
    else:
        world.b.update(world.customer, balance=available)
    decision = run(world.catalog())
    if accepted:
        assert isinstance(decision, Accept), decision
        assert decision.max_duration == 60
    else:
        assert isinstance(decision, Reject) and decision.reason is Reason.NO_SUFFICIENT_FUND


def test_postpaid_available_is_balance_plus_credit_limit() -> None:
    world = World()
    world.b.update(world.customer, postpaid=True, balance=D(-40), credit_limit=D(50))
    assert rated(world).level.max_duration == 6000  # 10 available at 0.10/min = 100 min
    world.b.update(world.customer, postpaid=True, balance=D(-49), credit_limit=D(50))
    assert rated(world).level.max_duration == 600


def test_duration_uses_the_marked_up_cost() -> None:
    world = World()
    world.b.update(world.retail, markup_percent=D(25))
    world.b.update(world.customer, balance=D(1))
    world.b.update(world.term_a, cost_per_minute=D("0.01"))
    assert rated(world).level.max_duration == 480  # 1 / 0.125 * 60


def test_nonzero_duration_whenever_funds_suffice() -> None:
    world = World()
    world.b.update(world.customer, balance=D("0.1"))
    assert rated(world).level.max_duration == 60


def test_rate_group_override_is_used() -> None:
    """The NON-CLI group of §4.4 arrives as an override of the account's group."""
    world = World()
    non_cli = world.b.group("NON-CLI", trunks=(world.carrier_a,))
    world.b.rate(non_cli, "44", "0.5")
    rating = rate_level(world.customer, "442071234567", world.catalog(), RulesConfig(), non_cli.id)
    assert isinstance(rating, Rating) and rating.group.name == "NON-CLI"
    assert rating.level.cost_per_minute == D("0.5")


def test_missing_rate_group_is_origination_not_found() -> None:
    world = World()
    world.b.update(world.customer, rate_group_id=4242)
    catalog = world.catalog()
    refusal = rate_level(catalog.accounts[world.customer.id], "44", catalog, RulesConfig())
    assert isinstance(refusal, Refusal) and refusal.reason is Reason.ORIGINATION_RATE_NOT_FOUND


# -- reseller chains ---------------------------------------------------------------


def chain_world(middle_balance: str = "0.8") -> tuple[World, dict]:
    """Customer 1001 -> reseller R1 -> reseller R2 (top); each rates 44 in its own group.
    1001: 10 at 0.10/min (6000s), R1: middle_balance at 0.08/min, R2: 100 at 0.05/min (capped).
    Only R2's group is linked to trunks."""
    world = World()
    b = world.b
    top_group = b.group("Wholesale", trunks=(world.carrier_a,))
    b.rate(top_group, "44", "0.05")
    mid_group = b.group("Reseller-R1")
    b.rate(mid_group, "44", "0.08")
    b.update(world.retail, trunk_ids=())  # the customer's group (made by R1) owns no trunks
    top = b.reseller("R2", balance="100", rate_group=top_group)
    middle = b.reseller("R1", balance=middle_balance, rate_group=mid_group, reseller=top)
    b.update(world.customer, reseller_id=middle.id)
    b.update(world.term_a, cost_per_minute=D("0.04"))
    return world, {"top": top, "middle": middle}


def test_middle_reseller_binds_the_duration() -> None:
    world, resellers = chain_world("0.8")
    decision = run(world.catalog(), explain=True)
    assert isinstance(decision, Accept), decision
    assert decision.chain == (world.customer.id, resellers["middle"].id, resellers["top"].id)
    assert [level.max_duration for level in decision.levels] == [6000, 600, 6000]
    assert [level.cost_per_minute for level in decision.levels] == [D("0.10"), D("0.08"), D("0.05")]
    assert decision.max_duration == 600
    assert ("duration", "max duration 600s, set by reseller R1") in [
        (s.rule, s.outcome) for s in decision.steps
    ]
    variables = dict(channel_variables(decision))
    assert variables["callgate_reseller_chain"] == "R1,R2"
    assert variables["callgate_rate"] == "44:0.1"
    assert variables["execute_on_answer"] == "sched_hangup +600 ALLOTTED_TIMEOUT"


def test_middle_reseller_without_funds_rejects() -> None:
    world, _ = chain_world("0.079999")
    decision = run(world.catalog())
    assert isinstance(decision, Reject) and decision.reason is Reason.NO_SUFFICIENT_FUND
    assert decision.account_id == world.customer.id
    assert decision.detail.startswith("reseller R1 has 0.079999 available")


def test_routing_follows_the_top_of_the_chain() -> None:
    """Trunks come from the top reseller's rate group; loss-less compares with its rate."""
    world, _ = chain_world()
    world.b.update(world.term_a, cost_per_minute=D("0.06"))  # below the customer's 0.10, above R2's 0.05
    decision = run(world.catalog())
    assert isinstance(decision, Reject) and decision.reason is Reason.TERMINATION_RATE_NOT_FOUND
