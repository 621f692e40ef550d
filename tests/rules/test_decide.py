"""decide(): the explanation, determinism, caller-ID hygiene, first use, the §4 hook."""

from __future__ import annotations

import dataclasses
import random
from datetime import timedelta
from decimal import Decimal

from engine.decision import Accept, Direction, Reject, Step
from engine.model import CatalogData
from engine.rules import NUMBER_HANDLING, Catalog, DecisionContext, RulesConfig, decide, first_use, first_uses
from tests.rules.builders import NOW, World, call, run

D = Decimal


def explained_world() -> World:
    world = World()
    world.b.update(world.retail, markup_percent=D(10))
    world.b.update(world.rate_44, prefix="4420", cost_per_minute=D("0.012"))
    world.b.update(world.term_a, cost_per_minute=D("0.004"))
    return world


def test_explain_true_lists_every_step() -> None:
    decision = run(explained_world().catalog(), explain=True)
    assert isinstance(decision, Accept)
    assert decision.steps == (
        Step("identify", "account found via SIP device alice (account 1001)"),
        Step("gate", "account 1001 active, prepaid, available 10"),
        Step("direction", "outbound: 442071234567 is neither a DID nor an on-net user"),
        Step("rating", "rate 4420 at 0.012/min (group Retail, markup 10%: 0.0132/min), affords 6000s"),
        Step("duration", "max duration 6000s, set by account 1001"),
        Step("routing", "route 1: trunk carrier-a via gw-a, 0.004/min, prefix 44, dials 442071234567"),
        Step("decision", "accepted: 1 route(s), at most 6000s"),
    )


def test_explain_false_builds_no_steps() -> None:
    world = explained_world()
    assert run(world.catalog()).steps == ()
    world.b.update(world.customer, balance=D(0))
    rejected = run(world.catalog())
    assert isinstance(rejected, Reject) and rejected.steps == ()


def test_explain_does_not_change_the_decision() -> None:
    catalog = explained_world().catalog()
    plain, explained = run(catalog), run(catalog, explain=True)
    assert isinstance(plain, Accept) and isinstance(explained, Accept)
    assert plain == dataclasses.replace(explained, steps=())


def test_explained_reject_keeps_the_steps_before_it() -> None:
    world = World()
    world.b.update(world.customer, balance=D("0.05"))
    decision = run(world.catalog(), explain=True)
    assert isinstance(decision, Reject)
    assert [step.rule for step in decision.steps] == ["identify", "gate", "direction", "rating"]
    assert decision.steps[-1].outcome.startswith("NO_SUFFICIENT_FUND: account 1001 has 0.05 available")


def test_explain_mentions_personal_rates_and_connect_cost() -> None:
    world = World()
    world.b.rate(world.customer, "44", "0.09", connect_cost="0.2")
    decision = run(world.catalog(), explain=True)
    assert isinstance(decision, Accept)
    assert (
        Step(
            "rating", "rate 44 at 0.09/min + 0.2 connect (personal rate of 1001, group Retail), affords 6000s"
        )
        in decision.steps
    )


def test_accept_fields() -> None:
    world = World()
    decision = run(world.catalog())
    assert isinstance(decision, Accept)
    assert decision.direction is Direction.OUTBOUND
    assert (decision.account_id, decision.account_number, decision.chain) == (
        world.customer.id,
        "1001",
        (world.customer.id,),
    )
    assert decision.destination == "442071234567"
    assert decision.levels[0].rate_id == world.rate_44.id
    assert decision.routes[0].trunk_id == world.carrier_a.id
    assert decision.caller_id_changed is False


def shuffled(data: CatalogData, seed: int) -> CatalogData:
    rng = random.Random(seed)
    fields = {}
    for name in CatalogData.__slots__:
        value = getattr(data, name)
        if isinstance(value, list):
            value = value[:]
            rng.shuffle(value)
        fields[name] = value
    return CatalogData(**fields)


def test_decisions_are_deterministic() -> None:
    """Same inputs, same decision: whatever the rng seed or the order of the loader's rows."""
    world = World()
    b = world.b
    for name in ("x", "y", "z"):  # equal-cost trunks: only the tie-breaks order them
        trunk = b.trunk(name, b.gateway(f"gw-{name}"), world.provider)
        b.termination(trunk, "44", "0.05")
        b.link(world.retail, trunk)
    b.rate(world.retail, "4420", "0.08")
    b.rate(world.retail, "4420", "0.09")  # duplicate prefix: the dearer, whatever the order
    data = b.data()
    request = call()
    reference = decide(request, Catalog.build(data), DecisionContext(NOW, random.Random(1), explain=True))
    for seed in range(20):
        catalog = Catalog.build(shuffled(data, seed))
        ctx = DecisionContext(NOW, random.Random(seed), RulesConfig(), explain=True)
        assert decide(request, catalog, ctx) == reference
    assert isinstance(reference, Accept)
    assert reference.levels[0].cost_per_minute == D("0.09")


def test_naive_clock_is_taken_as_utc() -> None:
    world = World()
    world.b.update(world.customer, expiry=NOW + timedelta(seconds=1))
    ctx = DecisionContext(NOW.replace(tzinfo=None), random.Random(0))
    assert ctx.now == NOW
    assert isinstance(decide(call(), world.catalog(), ctx), Accept)


def test_expiry_boundary_and_naive_expiry() -> None:
    world = World()
    world.b.update(world.customer, expiry=NOW)  # not in the past yet
    assert isinstance(run(world.catalog()), Accept)
    world.b.update(world.customer, expiry=(NOW - timedelta(microseconds=1)).replace(tzinfo=None))
    assert isinstance(run(world.catalog()), Reject)


def test_caller_id_is_made_safe() -> None:
    world = World()
    request = call(caller_id_number="1001\r\n", caller_id_name="Eve\nsendmsg ${system(id)}\x00")
    decision = run(world.catalog(), request)
    assert isinstance(decision, Accept)
    assert decision.caller_id_number == "1001"
    assert decision.caller_id_name == "Evesendmsg {system(id)}"
    assert decision.routes[0].caller_id_name == "Evesendmsg {system(id)}"
    assert decision.caller_id_changed is False  # cleaning is not a rule's rewrite


def test_number_handling_pipeline_follows_section_4() -> None:
    assert [step.__name__ for step in NUMBER_HANDLING] == [
        "speed_dial",
        "localize",
        "block_codes",
        "cli_pool",
        "force_caller_id",
    ]


def test_first_use_is_reported_not_written() -> None:
    world = World()
    reseller = world.b.reseller(
        "R1", balance="50", rate_group=world.retail, first_used=NOW - timedelta(days=3)
    )
    world.b.update(world.customer, reseller_id=reseller.id, expiry_from_first_use=True, valid_days=30)
    catalog = world.catalog()
    decision = run(catalog)
    assert isinstance(decision, Accept)
    records = first_uses(decision, catalog, NOW)
    assert len(records) == 1
    assert (records[0].account_id, records[0].first_used, records[0].expiry) == (
        world.customer.id,
        NOW,
        NOW + timedelta(days=30),
    )
    assert catalog.accounts[world.customer.id].first_used is None  # nothing was written


def test_first_use_without_validity_from_first_use() -> None:
    world = World()
    record = first_use(world.catalog().accounts[world.customer.id], NOW)
    assert record is not None and record.expiry is None
    assert first_use(world.b.update(world.customer, first_used=NOW), NOW) is None
