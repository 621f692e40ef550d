"""§6 per route: trunk localization, then provider localization, then strip/prepend; the
caller ID each carrier is sent, as per-leg variables when it differs from the call's."""

from __future__ import annotations

from typing import Any

from engine.call.render import channel_variables, dial_string, dial_target
from engine.decision import Accept, GatewayLeg, LegCallerId, Reason, Reject, Step
from engine.model import CallRequest, DidDestinationType
from tests.call.rendering import targets
from tests.rules.builders import World, call, run


def accepted(world: World, request: CallRequest | None = None, **ctx: Any) -> Accept:
    decision = run(world.catalog(), request, **ctx)
    assert isinstance(decision, Accept), decision
    return decision


class TwoCarriers(World):
    """carrier-a (provider prov-1, 44 @0.05) and carrier-b (provider prov-2, 44 @0.06)."""

    def __init__(self) -> None:
        super().__init__()
        b = self.b
        self.provider_2 = b.provider("prov-2")
        self.gw_b = b.gateway("gw-b")
        self.carrier_b = b.trunk("carrier-b", self.gw_b, self.provider_2)
        self.term_b = b.termination(self.carrier_b, "44", "0.06")
        b.link(self.retail, self.carrier_b)


def two_carriers() -> TwoCarriers:
    return TwoCarriers()


def test_trunk_then_provider_then_strip_prepend() -> None:
    world = two_carriers()
    b = world.b
    trunk_rules = b.localization("T-A", number_terminate="*/00", cli_terminate="44/0")
    provider_rules = b.localization("P-1", number_terminate="0044/01144", cli_terminate="*/+")
    b.update(world.carrier_a, localization_id=trunk_rules.id)
    b.update(world.provider, localization_id=provider_rules.id)
    b.update(world.term_a, strip="01144", prepend="9#44")
    world.b.update(
        world.customer, localization_id=b.localization("cust", cli_originate="1001/442080000001").id
    )
    decision = accepted(world, explain=True)
    # the A-leg presents the customer's localized caller ID; carrier-a its own rewrite of it
    assert decision.caller_id_number == "442080000001"
    assert dial_string(decision) == (
        "[leg_timeout=60,origination_caller_id_number=+02080000001,origination_caller_id_name=Alice]"
        "sofia/gateway/gw-a/9#442071234567"
        "|[leg_timeout=60]sofia/gateway/gw-b/442071234567"
    )
    route_a, route_b = decision.routes
    assert (route_a.number, route_a.caller_id_number, route_a.caller_id_name) == (
        "9#442071234567",
        "+02080000001",
        "Alice",
    )
    assert (route_b.number, route_b.caller_id_number) == ("442071234567", "442080000001")
    rewrites = [step.outcome for step in decision.steps if step.rule == "routing"]
    assert rewrites[:5] == [
        "localization 'T-A' (trunk carrier-a, destination): 442071234567 -> 00442071234567 by */00",
        "localization 'T-A' (trunk carrier-a, caller ID): 442080000001 -> 02080000001 by 44/0",
        "localization 'P-1' (provider prov-1 of trunk carrier-a, destination): 00442071234567 -> "
        "011442071234567 by 0044/01144",
        "localization 'P-1' (provider prov-1 of trunk carrier-a, caller ID): "
        "02080000001 -> +02080000001 by */+",
        "termination rate 44 of trunk carrier-a (strip/prepend): "
        "011442071234567 -> 9#442071234567 by 01144/9#44",
    ]
    variables = dict(channel_variables(decision))
    assert variables["effective_caller_id_number"] == "442080000001"  # the A-leg's


def test_termination_rate_is_chosen_on_the_customers_number() -> None:
    """Carrier rules change only what is sent: the rate lookup and LCR order do not see them."""
    world = World()
    world.b.update(world.carrier_a, localization_id=world.b.localization("T", number_terminate="44/0").id)
    decision = accepted(world)
    route = decision.routes[0]
    assert (route.termination_prefix, route.number) == ("44", "02071234567")
    assert decision.destination == "442071234567"


def test_same_localization_on_trunk_and_provider_applies_once() -> None:
    world = World()
    shared = world.b.localization("shared", number_terminate="*/0")
    world.b.update(world.carrier_a, localization_id=shared.id)
    world.b.update(world.provider, localization_id=shared.id)
    assert accepted(world).routes[0].number == "0442071234567"


def test_provider_localization_alone() -> None:
    world = World()
    world.b.update(world.provider, localization_id=world.b.localization("P", number_terminate="44/0044").id)
    assert dial_string(accepted(world)) == "[leg_timeout=60]sofia/gateway/gw-a/00442071234567"


def test_inactive_carrier_localizations_are_not_applied() -> None:
    world = World()
    off = world.b.localization("off", number_terminate="*/9", cli_terminate="*/9", active=False)
    world.b.update(world.carrier_a, localization_id=off.id)
    world.b.update(world.provider, localization_id=off.id)
    assert dial_string(accepted(world)) == "[leg_timeout=60]sofia/gateway/gw-a/442071234567"


def test_customer_originate_rules_are_not_carrier_rules() -> None:
    """A provider's localization is read for its terminate side only (and vice versa)."""
    world = World()
    both = world.b.localization("both", number_originate="*/7", number_terminate="*/8")
    world.b.update(world.provider, localization_id=both.id)
    assert accepted(world).routes[0].number == "8442071234567"


def test_per_leg_caller_id_on_every_gateway_of_the_route() -> None:
    world = two_carriers()
    gw_c = world.b.gateway("gw-c")
    world.b.update(world.carrier_b, failover_gateway_ids=(gw_c.id,), codecs="PCMA")
    world.b.update(world.provider_2, localization_id=world.b.localization("P-2", cli_terminate="*/00").id)
    decision = accepted(world)
    assert decision.caller_id_changed is False
    assert targets(decision.routes[1].targets) == (
        "[leg_timeout=60,origination_caller_id_number=001001,origination_caller_id_name=Alice,"
        "absolute_codec_string=^^:PCMA]sofia/gateway/gw-b/442071234567",
        "[leg_timeout=60,origination_caller_id_number=001001,origination_caller_id_name=Alice,"
        "absolute_codec_string=^^:PCMA]sofia/gateway/gw-c/442071234567",
    )
    assert targets(decision.routes[0].targets) == ("[leg_timeout=60]sofia/gateway/gw-a/442071234567",)


def test_per_leg_values_cannot_break_the_dial_string() -> None:
    world = World()
    world.b.forced_caller_id(world.customer, "442080000000", "Evil, Inc]|sofia/gateway/x/1 ${system(id)} 'q'")
    world.b.update(world.carrier_a, localization_id=world.b.localization("T", cli_terminate="44/0").id)
    decision = accepted(world)
    (target,) = targets(decision.routes[0].targets)
    assert target == (
        "[leg_timeout=60,origination_caller_id_number=02080000000,"
        "origination_caller_id_name=Evil Incsofia/gateway/x/1 system(id) q]sofia/gateway/gw-a/442071234567"
    )
    assert dial_string(decision).count("|") == 0
    head = target[: target.index("]") + 1]
    assert head.count("[") == 1 and head.count(",") == 2


def test_leg_caller_id_rendering() -> None:
    def leg(caller_id: LegCallerId | None) -> str:
        return dial_target(GatewayLeg("gw", "1", 5, (), caller_id))

    assert leg(None) == "[leg_timeout=5]sofia/gateway/gw/1"
    assert (
        leg(LegCallerId("+4420", ""))
        == "[leg_timeout=5,origination_caller_id_number=+4420]sofia/gateway/gw/1"
    )
    assert leg(LegCallerId("1,2", "a|b")) == (
        "[leg_timeout=5,origination_caller_id_number=12,origination_caller_id_name=ab]sofia/gateway/gw/1"
    )


def test_number_rules_that_leave_nothing_skip_the_route() -> None:
    world = two_carriers()
    world.b.update(world.carrier_a, localization_id=world.b.localization("T", number_terminate="44/").id)
    world.b.update(world.term_a, strip="2071234567")
    decision = accepted(world, explain=True)
    assert [route.trunk_name for route in decision.routes] == ["carrier-b"]
    assert Step("routing", "trunk carrier-a skipped: its number rules leave no number") in decision.steps


def test_no_route_left_after_the_rewrites() -> None:
    world = World()
    world.b.update(world.term_a, strip="442071234567")
    decision = run(world.catalog())
    assert isinstance(decision, Reject) and decision.reason is Reason.TERMINATION_RATE_NOT_FOUND
    assert (
        decision.detail
        == "no route for 442071234567: trunk carrier-a skipped: its number rules leave no number"
    )


def test_call_without_carrier_rules_is_unchanged() -> None:
    decision = accepted(World(), explain=True)
    assert not any("localization" in step.outcome for step in decision.steps)
    assert dial_string(decision) == "[leg_timeout=60]sofia/gateway/gw-a/442071234567"


def test_forwarded_did_gets_the_carrier_rules_too() -> None:
    world = World()
    owner = world.b.account("2001", balance="5", rate_group=world.retail)
    world.b.did("442000000001", owner, kind=DidDestinationType.NUMBER, destination="442071234567")
    world.b.ip("198.51.100.0/24", world.provider)
    world.b.update(world.carrier_a, localization_id=world.b.localization("T", number_terminate="*/00").id)
    decision = accepted(world, call("442000000001", sip_auth_username="", network_ip="198.51.100.1"))
    assert dial_string(decision) == "[leg_timeout=60]sofia/gateway/gw-a/00442071234567"
