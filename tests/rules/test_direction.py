"""§1: inbound DID (device, URI, number), on-net local calls, outbound; who may call a DID."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from engine.call.render import channel_variables, dial_string
from engine.decision import Accept, Direction, Reason, Reject, Step
from engine.model import CallRequest, CliPool
from engine.model import DidDestinationType as To
from engine.rules import first_uses
from tests.call.rendering import targets
from tests.rules.builders import NOW, World, call, run

D = Decimal
CARRIER_IP = "198.51.100.10"


class DidWorld(World):
    """World plus: owner 2001 (prepaid 5.00, group Gold: 44 @0.20 over carrier-a) with device
    bob, and a carrier (provider prov-1, no rate group, no funds) delivering DIDs from
    198.51.100.0/24 through the IP map."""

    def __init__(self) -> None:
        super().__init__()
        b = self.b
        self.gold = b.group("Gold", trunks=(self.carrier_a,))
        self.gold_44 = b.rate(self.gold, "44", "0.20")
        self.owner = b.account("2001", balance="5", rate_group=self.gold)
        self.bob = b.device("bob", self.owner)
        b.update(self.provider, balance=D(0))
        b.ip("198.51.100.0/24", self.provider)

    def did(self, kind: To = To.DEVICE, destination: str = "bob", number: str = "442000000001", **extra: Any):
        return self.b.did(number, self.owner, kind, destination, **extra)


def from_carrier(destination: str = "442000000001", **fields: Any) -> CallRequest:
    fields.setdefault("caller_id_number", "447700900123")
    fields.setdefault("caller_id_name", "Caller")
    return call(destination, sip_auth_username="", network_ip=CARRIER_IP, **fields)


def accepted(world: World, request: CallRequest | None = None, **ctx: Any) -> Accept:
    decision = run(world.catalog(), request, **ctx)
    assert isinstance(decision, Accept), decision
    return decision


def rejected(world: World, request: CallRequest | None = None, **ctx: Any) -> Reject:
    decision = run(world.catalog(), request, **ctx)
    assert isinstance(decision, Reject), decision
    return decision


# -- inbound DID ----------------------------------------------------------------------


def test_did_to_a_device() -> None:
    world = DidWorld()
    did = world.did()
    decision = accepted(world, from_carrier())
    assert decision.direction is Direction.INBOUND
    assert (decision.account_id, decision.account_number, decision.chain) == (
        world.owner.id,
        "2001",
        (world.owner.id,),
    )
    assert decision.did_id == did.id
    assert (decision.caller_account_id, decision.callee_account_id) == (world.provider.id, world.owner.id)
    assert decision.destination == "442000000001"
    assert decision.routes == () and decision.levels == ()
    assert targets(decision.bridge_targets) == ("[leg_timeout=60]user/bob@${domain_name}",)
    assert dial_string(decision) == "[leg_timeout=60]user/bob@${domain_name}"
    assert decision.max_duration == 6000
    assert (decision.caller_id_number, decision.caller_id_name, decision.caller_id_changed) == (
        "447700900123",
        "Caller",
        False,
    )


def test_did_device_domain_and_leg_timeout_are_configured() -> None:
    world = DidWorld()
    world.did()
    decision = accepted(world, from_carrier(), local_domain="pbx.example.com", default_leg_timeout=25)
    assert dial_string(decision) == "[leg_timeout=25]user/bob@pbx.example.com"


def test_did_to_a_uri() -> None:
    world = DidWorld()
    world.did(To.URI, "sip:1234@sip.example.com:5080;transport=tcp")
    decision = accepted(world, from_carrier())
    assert decision.direction is Direction.INBOUND
    assert (
        dial_string(decision) == "[leg_timeout=60]sofia/external/sip:1234@sip.example.com:5080;transport=tcp"
    )
    assert dial_string(accepted(world, from_carrier(), uri_profile="carriers")).startswith(
        "[leg_timeout=60]sofia/carriers/sip:1234@"
    )


def test_did_to_a_number_is_an_outbound_call_of_the_owner() -> None:
    """Rated with the owner's group and funds, routed by the owner's chain; the carrier
    that delivered it has no rate group and no money, and needs neither."""
    world = DidWorld()
    did = world.did(To.NUMBER, "442071234567")
    decision = accepted(world, from_carrier())
    assert decision.direction is Direction.INBOUND
    assert decision.did_id == did.id
    assert decision.account_id == world.owner.id and decision.chain == (world.owner.id,)
    assert decision.destination == "442071234567"
    assert [level.account_id for level in decision.levels] == [world.owner.id]
    assert decision.levels[0].rate_id == world.gold_44.id
    assert decision.max_duration == 1500  # 5.00 at 0.20/min
    assert dial_string(decision) == "[leg_timeout=60]sofia/gateway/gw-a/442071234567"
    assert decision.caller_account_id == world.provider.id


def test_did_to_a_number_uses_the_owners_reseller_chain() -> None:
    world = DidWorld()
    wholesale = world.b.group("Wholesale", trunks=(world.carrier_a,))
    world.b.rate(wholesale, "44", "0.06")
    reseller = world.b.reseller("R9", balance="0.6", rate_group=wholesale)
    world.b.update(world.owner, reseller_id=reseller.id)
    world.b.update(world.gold, trunk_ids=())
    world.did(To.NUMBER, "442071234567")
    decision = accepted(world, from_carrier())
    assert decision.chain == (world.owner.id, reseller.id)
    assert [level.max_duration for level in decision.levels] == [1500, 600]
    assert decision.max_duration == 600
    assert first_uses(decision, world.catalog(), NOW)[0].account_id == world.owner.id


def test_did_to_a_number_without_the_owners_funds() -> None:
    world = DidWorld()
    world.b.update(world.owner, balance=D("0.19"))
    world.did(To.NUMBER, "442071234567")
    decision = rejected(world, from_carrier())
    assert decision.reason is Reason.NO_SUFFICIENT_FUND
    assert decision.detail.startswith("account 2001 has 0.19 available")


def test_did_to_a_number_applies_the_owners_number_rules() -> None:
    world = DidWorld()
    uk = world.b.localization("UK", number_originate="0/44", cli_inbound="44/0")
    world.b.update(world.owner, localization_id=uk.id, cli_pool=CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID)
    world.b.blocked(world.owner, "449")
    world.did(To.NUMBER, "02071234567")
    world.did(To.NUMBER, "09123", number="442000000002")
    decision = accepted(world, from_carrier())
    assert decision.destination == "442071234567"
    assert decision.caller_id_number in ("442000000001", "442000000002")  # the owner's CLI pool
    assert rejected(world, from_carrier("442000000002")).reason is Reason.DESTINATION_BLOCKED


def test_did_price_is_paid_by_its_owner() -> None:
    world = DidWorld()
    world.did(cost_per_minute="0.10", connect_cost="0.50")
    assert accepted(world, from_carrier()).max_duration == 2700  # (5 - 0.5) / 0.10 * 60
    world.b.update(world.owner, balance=D("0.59"))
    decision = rejected(world, from_carrier())
    assert decision.reason is Reason.NO_SUFFICIENT_FUND
    assert decision.detail == (
        "DID 442000000001 owner 2001 has 0.59 available, needs 0.6 (connect 0.5 + 1 min at 0.1)"
    )


def test_priced_did_forwarded_to_a_number_adds_both_prices() -> None:
    world = DidWorld()
    world.did(To.NUMBER, "442071234567", cost_per_minute="0.05")
    decision = accepted(world, from_carrier())
    assert decision.levels[0].max_duration == 1200  # 5.00 at 0.20 + 0.05 per minute
    assert decision.max_duration == 1200


@pytest.mark.parametrize(
    ("change", "detail"),
    [
        ({"account_id": None}, "DID 442000000001 is not assigned to an account"),
        ({"active": False}, "DID 442000000001 is inactive"),
        ({"destination": ""}, "DID 442000000001: no SIP device set"),
        ({"destination": "ghost"}, "DID 442000000001: SIP device 'ghost' not found"),
        ({"destination": "alice"}, "DID 442000000001: SIP device alice is not one of account 2001's"),
        ({"destination_type": To.URI, "destination": ""}, "DID 442000000001: no SIP URI set"),
        (
            {"destination_type": To.URI, "destination": "x@h|sofia/gateway/evil/1"},
            "DID 442000000001: SIP URI 'x@h|sofia/gateway/evil/1' cannot be dialled",
        ),
        (
            {"destination_type": To.URI, "destination": "a b@h"},
            "DID 442000000001: SIP URI 'a b@h' cannot be dialled",
        ),
        ({"destination_type": To.NUMBER, "destination": ""}, "DID 442000000001: no number to forward to"),
    ],
)
def test_undeliverable_dids_are_no_route(change: dict, detail: str) -> None:
    world = DidWorld()
    world.b.update(world.did(), **change)
    decision = rejected(world, from_carrier())
    assert (decision.reason, decision.detail) == (Reason.NO_ROUTE_DESTINATION, detail)
    assert decision.account_id == world.provider.id  # the caller that was refused


def test_did_to_an_inactive_device() -> None:
    world = DidWorld()
    world.did()
    world.b.update(world.bob, active=False)
    assert rejected(world, from_carrier()).detail == "DID 442000000001: SIP device bob is inactive"


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        ({"active": False}, Reason.NO_ROUTE_DESTINATION, "DID 442000000001 belongs to inactive account"),
        ({"deleted": True}, Reason.NO_ROUTE_DESTINATION, "DID 442000000001 belongs to deleted account"),
        (
            {"expiry": NOW - timedelta(days=1)},
            Reason.ACCOUNT_EXPIRED,
            "DID 442000000001 owner: account 2001 expired",
        ),
    ],
)
def test_did_owner_must_pass_the_gate(change: dict, reason: Reason, detail: str) -> None:
    world = DidWorld()
    world.did()
    world.b.update(world.owner, **change)
    decision = rejected(world, from_carrier())
    assert decision.reason is reason
    assert decision.detail.startswith(detail)


def test_did_owners_reseller_must_pass_the_gate() -> None:
    world = DidWorld()
    reseller = world.b.reseller("R9", active=False)
    world.b.update(world.owner, reseller_id=reseller.id)
    world.did()
    decision = rejected(world, from_carrier())
    assert (decision.reason, decision.detail) == (
        Reason.ACCOUNT_INACTIVE,
        "DID 442000000001 owner: reseller R9 is inactive",
    )


def test_missing_owner_is_no_route() -> None:
    world = DidWorld()
    world.b.update(world.did(), account_id=4242)
    assert rejected(world, from_carrier()).detail == "DID 442000000001 belongs to missing account 4242"


# -- who may call a DID ------------------------------------------------------------------


def test_the_caller_of_a_did_must_be_identified() -> None:
    world = DidWorld()
    world.did()
    decision = rejected(world, call("442000000001", sip_auth_username="", network_ip="192.0.2.1"))
    assert decision.reason is Reason.AUTHENTICATION_FAIL


def test_the_caller_of_a_did_must_pass_its_own_gate() -> None:
    world = DidWorld()
    world.did()
    world.b.update(world.provider, expiry=NOW - timedelta(seconds=1))
    assert rejected(world, from_carrier()).reason is Reason.ACCOUNT_EXPIRED


def test_an_on_net_customer_may_call_a_did_without_paying() -> None:
    world = DidWorld()
    world.did()
    world.b.update(world.customer, balance=D(0), cli_pool=CliPool.REJECT_UNLESS_IN_DIDS)
    decision = accepted(world, call("442000000001"))  # alice, account 1001
    assert decision.direction is Direction.INBOUND
    assert (decision.account_id, decision.caller_account_id) == (world.owner.id, world.customer.id)
    assert decision.caller_id_number == "1001"  # the caller's own CLI rules do not apply


def test_tech_prefix_is_stripped_before_the_did_lookup() -> None:
    world = DidWorld()
    world.did()
    world.b.ip("203.0.113.0/24", world.provider, tech_prefix="77")
    decision = accepted(world, call("77442000000001", sip_auth_username="", network_ip="203.0.113.1"))
    assert decision.direction is Direction.INBOUND


# -- global DID translation ----------------------------------------------------------------


def test_global_did_translation() -> None:
    world = DidWorld()
    world.did()
    config = {"did_translation": "+/, 00/"}
    for delivered in ("+442000000001", "00442000000001", "442000000001"):
        decision = accepted(world, from_carrier(delivered), **config)
        assert decision.direction is Direction.INBOUND and decision.destination == "442000000001"
    explained = accepted(world, from_carrier("+442000000001"), explain=True, **config)
    assert Step("direction", "DID translation: +442000000001 -> 442000000001 by +/") in explained.steps


def test_without_the_translation_a_foreign_format_is_not_a_did() -> None:
    world = DidWorld()
    world.did()
    decision = rejected(world, from_carrier("+442000000001"))
    assert decision.reason is Reason.ORIGINATION_RATE_NOT_FOUND  # outbound, and the carrier has no rates


def test_inbound_caller_id_rules() -> None:
    world = DidWorld()
    uk = world.b.localization("UK", cli_inbound="44/0", cli_originate="*/9")
    world.b.update(world.owner, localization_id=uk.id)
    world.did()
    decision = accepted(world, from_carrier(caller_id_number="+447700900123"), did_caller_id_translation="+/")
    assert decision.caller_id_number == "07700900123"
    assert decision.caller_id_changed is True
    variables = dict(channel_variables(decision))
    assert variables["effective_caller_id_number"] == "07700900123"
    assert variables["callgate_direction"] == "inbound"
    assert variables["callgate_did"] == str(decision.did_id)


def test_inbound_explanation() -> None:
    world = DidWorld()
    world.did()
    decision = accepted(world, from_carrier(), explain=True)
    assert decision.steps == (
        Step("identify", "account found via IP map 198.51.100.0/24 (account prov-1)"),
        Step("gate", "account prov-1 active, prepaid, available 0"),
        Step("direction", "inbound: DID 442000000001 of account 2001, to SIP device bob"),
        Step("gate", "account 2001 active, prepaid, available 5"),
        Step("rating", "DID 442000000001 is free to its owner, affords 6000s"),
        Step("routing", "bridge to device bob@${domain_name}, ringing up to 60s"),
        Step("decision", "accepted: inbound call, at most 6000s"),
    )


# -- on-net local calls ------------------------------------------------------------------


def test_local_call_to_an_on_net_user() -> None:
    world = DidWorld()
    decision = accepted(world, call("bob"))
    assert decision.direction is Direction.LOCAL
    assert (decision.account_id, decision.chain) == (world.customer.id, (world.customer.id,))
    assert (decision.caller_account_id, decision.callee_account_id) == (world.customer.id, world.owner.id)
    assert decision.did_id is None
    assert decision.levels == () and decision.routes == ()
    assert decision.max_duration == 6000
    assert dial_string(decision) == "[leg_timeout=60]user/bob@${domain_name}"
    assert dict(channel_variables(decision))["callgate_direction"] == "local"


def test_free_local_call_is_capped_and_needs_no_funds() -> None:
    world = DidWorld()
    world.b.update(world.customer, balance=D("-3"))
    decision = accepted(world, call("bob"), max_free_length=600)
    assert decision.max_duration == 600
    assert accepted(world, call("bob"), max_free_length=600, call_max_length=300).max_duration == 300


def test_local_call_rated_at_the_callers_local_price() -> None:
    world = DidWorld()
    world.b.update(world.customer, local_call_cost_per_minute=D("0.05"), balance=D("1"))
    world.b.update(world.retail, init_inc=30, inc=6)
    decision = accepted(world, call("bob"), explain=True)
    assert decision.max_duration == 1200
    (level,) = decision.levels
    assert (level.account_id, level.rate_id, level.prefix, level.cost_per_minute) == (
        world.customer.id,
        0,
        "",
        D("0.05"),
    )
    assert (level.init_inc, level.inc, level.max_duration) == (30, 6, 1200)
    assert Step("rating", "local call at 0.05/min, affords 1200s") in decision.steps


def test_local_call_without_funds() -> None:
    world = DidWorld()
    world.b.update(world.customer, local_call_cost_per_minute=D("0.05"), balance=D("0.04"))
    decision = rejected(world, call("bob"))
    assert decision.reason is Reason.NO_SUFFICIENT_FUND


def test_local_calls_not_allowed_go_outbound() -> None:
    """ASTPP re-routes such calls to the PSTN: a numeric user name is rated and routed."""
    world = DidWorld()
    world.b.device("2071234567", world.owner)
    world.b.rate(world.retail, "2", "0.01")
    world.b.termination(world.carrier_a, "2", "0.005")
    world.b.update(world.customer, local_calls_allowed=False)
    decision = accepted(world, call("2071234567"), explain=True)
    assert decision.direction is Direction.OUTBOUND
    assert dial_string(decision) == "[leg_timeout=60]sofia/gateway/gw-a/2071234567"
    assert (
        Step(
            "direction",
            "outbound: 2071234567 is an on-net SIP user, but account 1001 may not make local calls",
        )
        in decision.steps
    )
    world.b.update(world.customer, local_calls_allowed=True)
    assert accepted(world, call("2071234567")).direction is Direction.LOCAL


def test_a_named_user_is_not_a_number_to_route_out() -> None:
    world = DidWorld()
    world.b.update(world.customer, local_calls_allowed=False)
    world.b.rate(world.retail, "", "0.01")  # even a catch-all rate does not send "bob" to a carrier
    decision = rejected(world, call("bob"))
    assert decision.reason is Reason.NO_ROUTE_DESTINATION
    assert "not a diallable number" in decision.detail


@pytest.mark.parametrize("change", ["device", "account", "deleted"])
def test_unusable_callee_is_not_local(change: str) -> None:
    world = DidWorld()
    if change == "device":
        world.b.update(world.bob, active=False)
    else:
        world.b.update(world.owner, **({"active": False} if change == "account" else {"deleted": True}))
    decision = run(world.catalog(), call("bob"), explain=True)
    assert isinstance(decision, Reject) and decision.reason is Reason.NO_ROUTE_DESTINATION
    assert any(step.rule == "direction" and step.outcome.startswith("outbound") for step in decision.steps)


def test_unknown_names_are_refused_before_anything_else() -> None:
    decision = rejected(DidWorld(), call("ghost"))
    assert decision.reason is Reason.NO_ROUTE_DESTINATION


def test_local_call_skips_destination_rules_and_blocks_but_localizes_the_caller_id() -> None:
    world = DidWorld()
    world.b.device("2071234567", world.owner)
    uk = world.b.localization("UK", number_originate="*/9", cli_originate="1/441")
    world.b.update(world.customer, localization_id=uk.id)
    world.b.blocked(world.customer, "2")
    decision = accepted(world, call("2071234567"))
    assert decision.direction is Direction.LOCAL
    assert targets(decision.bridge_targets) == ("[leg_timeout=60]user/2071234567@${domain_name}",)
    assert decision.caller_id_number == "441001"


def test_local_call_applies_the_callers_cli_pool_and_forced_caller_id() -> None:
    world = DidWorld()
    world.b.update(world.customer, cli_pool=CliPool.REJECT_UNLESS_IN_DIDS)
    assert rejected(world, call("bob")).reason is Reason.CLI_NOT_ALLOWED
    world.b.update(world.customer, cli_pool=CliPool.DISABLED)
    world.b.forced_caller_id(world.customer, "442080000000", "Sales")
    assert accepted(world, call("bob")).caller_id_number == "442080000000"


def test_did_wins_over_a_user_of_the_same_name() -> None:
    world = DidWorld()
    world.b.device("442000000001", world.customer)
    world.did()
    assert accepted(world, call("442000000001")).direction is Direction.INBOUND


def test_outbound_is_everything_else() -> None:
    world = DidWorld()
    decision = accepted(world)
    assert decision.direction is Direction.OUTBOUND
    assert (decision.did_id, decision.caller_account_id, decision.callee_account_id) == (
        None,
        world.customer.id,
        None,
    )
