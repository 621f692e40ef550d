"""§6: candidate trunks, LCR/COST order, one route per trunk, loss-less, rewrites, dial strings."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from engine.call.render import codec_option, dial_string, dial_target
from engine.decision import Accept, GatewayLeg
from engine.model import RoutingType
from engine.rules.routing import codec_names, strip_prepend
from tests.call.rendering import targets
from tests.rules.builders import World, call, run

D = Decimal


def accepted(world: World, **kwargs: Any) -> Accept:
    decision = run(world.catalog(), **kwargs)
    assert isinstance(decision, Accept), decision
    return decision


class ThreeCarriers(World):
    """carrier-a 44 @0.05, carrier-b 4420 @0.08, carrier-c 44 @0.03; all linked to Retail (rate 44 @0.10)."""

    def __init__(self) -> None:
        super().__init__()
        b = self.b
        self.gw_b, self.gw_c = b.gateway("gw-b"), b.gateway("gw-c")
        self.carrier_b = b.trunk("carrier-b", self.gw_b, self.provider)
        self.carrier_c = b.trunk("carrier-c", self.gw_c, self.provider)
        b.termination(self.carrier_b, "4420", "0.08")
        b.termination(self.carrier_c, "44", "0.03")
        self.retail = b.link(self.retail, self.carrier_b, self.carrier_c)


@pytest.fixture
def three() -> ThreeCarriers:
    return ThreeCarriers()


def names(decision: Accept) -> list[str]:
    return [route.trunk_name for route in decision.routes]


def test_lcr_orders_by_prefix_length_then_cost(three: ThreeCarriers) -> None:
    assert names(accepted(three)) == ["carrier-b", "carrier-c", "carrier-a"]


def test_cost_orders_by_cost_only(three: ThreeCarriers) -> None:
    three.b.update(three.retail, routing_type=RoutingType.COST)
    assert names(accepted(three)) == ["carrier-c", "carrier-a", "carrier-b"]


@pytest.mark.parametrize("routing_type", list(RoutingType))
def test_equal_cost_goes_by_rate_precedence_then_trunk_precedence(routing_type: RoutingType) -> None:
    world = World()
    b = world.b
    b.update(world.retail, routing_type=routing_type)
    trunks = {}
    for name, trunk_precedence, rate_precedence in [("t1", 2, 1), ("t2", 1, 1), ("t3", 9, 0)]:
        trunks[name] = b.trunk(name, b.gateway(f"gw-{name}"), world.provider, precedence=trunk_precedence)
        b.termination(trunks[name], "44", "0.05", precedence=rate_precedence)
        b.link(world.retail, trunks[name])
    b.update(world.retail, trunk_ids=tuple(t.id for t in trunks.values()))  # carrier-a out
    assert names(accepted(world)) == ["t3", "t2", "t1"]


def test_one_route_per_trunk_with_its_longest_prefix(three: ThreeCarriers) -> None:
    three.b.termination(three.carrier_a, "442071", "0.07")
    three.b.link(three.retail, three.carrier_a, three.carrier_a)  # carrier-a linked thrice
    decision = accepted(three)
    assert names(decision) == ["carrier-a", "carrier-b", "carrier-c"]
    assert decision.routes[0].termination_prefix == "442071"
    assert decision.routes[0].cost_per_minute == D("0.07")


def test_forced_trunks_replace_the_group_links(three: ThreeCarriers) -> None:
    three.b.update(three.rate_44, forced_trunk_ids=(three.carrier_a.id, three.carrier_b.id))
    assert names(accepted(three)) == ["carrier-b", "carrier-a"]


def test_loss_less_drops_only_dearer_routes(three: ThreeCarriers) -> None:
    three.b.update(three.retail, markup_percent=D(0))
    three.b.update(three.rate_44, cost_per_minute=D("0.05"))  # carrier-b (0.08) costs more; a (0.05) equals
    three.b.update(three.customer, balance=D(100))
    decision = accepted(three, explain=True)
    assert names(decision) == ["carrier-c", "carrier-a"]
    assert any("carrier-b dropped" in step.outcome for step in decision.steps)


def test_loss_less_compares_with_the_marked_up_rate(three: ThreeCarriers) -> None:
    three.b.update(three.rate_44, cost_per_minute=D("0.05"))
    three.b.update(three.retail, markup_percent=D(60))  # 0.08 per minute
    assert "carrier-b" in names(accepted(three))


def test_loss_less_off_keeps_dear_routes(three: ThreeCarriers) -> None:
    three.b.update(three.rate_44, cost_per_minute=D("0.01"))
    three.b.update(three.retail, lossless=False)
    assert names(accepted(three)) == ["carrier-b", "carrier-c", "carrier-a"]


def test_unusable_trunks_are_skipped_not_fatal(three: ThreeCarriers) -> None:
    three.b.update(three.carrier_b, active=False)
    three.b.update(three.gw_c, active=False)
    decision = accepted(three, explain=True)
    assert names(decision) == ["carrier-a"]
    outcomes = [step.outcome for step in decision.steps if step.rule == "routing"]
    assert "trunk carrier-b skipped: inactive" in outcomes
    assert "trunk carrier-c skipped: no active gateway" in outcomes


def test_failover_gateways_follow_the_primary() -> None:
    world = World()
    b = world.b
    gw_b, gw_c, gw_off = b.gateway("gw-b"), b.gateway("gw-c"), b.gateway("gw-off", active=False)
    b.update(world.carrier_a, failover_gateway_ids=(gw_off.id, gw_b.id, world.gw_a.id, gw_c.id))
    route = accepted(world).routes[0]
    # The rules return structured legs; engine.call.render writes the dial string.
    assert route.targets == (
        GatewayLeg("gw-a", "442071234567", 60),
        GatewayLeg("gw-b", "442071234567", 60),
        GatewayLeg("gw-c", "442071234567", 60),
    )


def test_inactive_primary_leaves_the_failovers() -> None:
    world = World()
    gw_b = world.b.gateway("gw-b")
    world.b.update(world.carrier_a, failover_gateway_ids=(gw_b.id,))
    world.b.update(world.gw_a, active=False)
    assert targets(accepted(world).routes[0].targets) == ("[leg_timeout=60]sofia/gateway/gw-b/442071234567",)


def test_exact_dial_string_bytes(three: ThreeCarriers) -> None:
    b = three.b
    gw_d = b.gateway("gw-d")
    b.update(three.carrier_b, failover_gateway_ids=(gw_d.id,), leg_timeout=30, codecs="PCMU, PCMA")
    b.update(three.carrier_c, codecs="G729")
    b.update(three.term_a, strip="44", prepend="0044")
    b.update(three.alice, codecs="OPUS,PCMU")
    decision = accepted(three)
    assert dial_string(decision) == (
        "[leg_timeout=30,absolute_codec_string=^^:PCMU:PCMA]sofia/gateway/gw-b/442071234567"
        "|[leg_timeout=30,absolute_codec_string=^^:PCMU:PCMA]sofia/gateway/gw-d/442071234567"
        "|[leg_timeout=60,absolute_codec_string=^^:G729]sofia/gateway/gw-c/442071234567"
        "|[leg_timeout=60,absolute_codec_string=^^:OPUS:PCMU]sofia/gateway/gw-a/00442071234567"
    )


@pytest.mark.parametrize(
    ("trunk", "device", "account", "expected"),
    [
        ("G722", "OPUS", "PCMA", ",absolute_codec_string=^^:G722"),
        ("", "OPUS", "PCMA", ",absolute_codec_string=^^:OPUS"),
        ("", " ", "PCMA,PCMU", ",absolute_codec_string=^^:PCMA:PCMU"),
        ("", "", "", ""),
    ],
)
def test_codecs_from_trunk_then_device_then_account(
    trunk: str, device: str, account: str, expected: str
) -> None:
    world = World()
    world.b.update(world.carrier_a, codecs=trunk)
    world.b.update(world.alice, codecs=device)
    world.b.update(world.customer, codecs=account)
    target = dial_target(accepted(world).routes[0].targets[0])
    assert target == f"[leg_timeout=60{expected}]sofia/gateway/gw-a/442071234567"


def test_ip_map_caller_uses_the_account_codecs() -> None:
    world = World()
    world.b.update(world.customer, codecs="PCMA")
    world.b.ip("203.0.113.0/24", world.customer)
    decision = run(world.catalog(), call(sip_auth_username="", network_ip="203.0.113.1"))
    assert isinstance(decision, Accept)
    assert dial_target(decision.routes[0].targets[0]).startswith(
        "[leg_timeout=60,absolute_codec_string=^^:PCMA]"
    )


def test_configured_default_leg_timeout() -> None:
    assert dial_target(accepted(World(), default_leg_timeout=25).routes[0].targets[0]).startswith(
        "[leg_timeout=25]"
    )


@pytest.mark.parametrize(
    ("strip", "prepend", "expected"),
    [
        ("", "", "442071234567"),
        ("44", "", "2071234567"),
        ("", "1234#", "1234#442071234567"),
        ("44", "0044", "00442071234567"),
        ("33", "0033", "442071234567"),  # strip does not match: nothing changes
    ],
)
def test_strip_prepend(strip: str, prepend: str, expected: str) -> None:
    assert strip_prepend("442071234567", strip, prepend) == expected


def test_route_carries_number_caller_id_and_provider(three: ThreeCarriers) -> None:
    three.b.update(three.term_a, strip="44", prepend="+44")
    route = next(r for r in accepted(three).routes if r.trunk_name == "carrier-a")
    assert route.number == "+442071234567"
    assert (route.caller_id_number, route.caller_id_name) == ("1001", "Alice")
    assert route.provider_id == three.provider.id
    assert route.trunk_id == three.carrier_a.id


def test_codec_names_ignore_empty_items() -> None:
    assert codec_names(" ,PCMU,,") == ("PCMU",)
    assert codec_names("") == ()
    assert codec_option(codec_names(" ,PCMU,,")) == ",absolute_codec_string=^^:PCMU"
    assert codec_option(()) == ""
