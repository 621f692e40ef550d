"""Rating at hangup: calc_cost semantics, the rounding rule, bad inputs, the real captures,
and a decided call (reseller chain, failover onto the second trunk) rated by hand."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine.billing.hangup import dial_targets, gateway_of, parse_hangup, parse_legs
from engine.billing.pricing import pricing_for
from engine.billing.rating import (
    CallPricing,
    LevelPrice,
    RoutePrice,
    Tariff,
    call_cost,
    charged_seconds,
    from_micros,
    rate_call,
    round_money,
    to_micros,
)
from engine.decision import Accept
from tests.billing.captures import CAPTURES, bridge_data, hangup_complete
from tests.rules.builders import World, run

D = Decimal


# --------------------------------------------------------------------------- calc_cost


@pytest.mark.parametrize(
    ("billsec", "expected"),
    [
        (0, "0"),  # under one second: free, connect included
        (1, "0.15"),  # connect 0.05 + the 30 s initial block whole (30 s at 0.20/min = 0.10)
        (30, "0.15"),
        (31, "0.17"),  # + one whole 6 s increment (0.02)
        (36, "0.17"),
        (37, "0.19"),
    ],
)
def test_calc_cost_connect_initial_block_then_increments(billsec: int, expected: str) -> None:
    tariff = Tariff(cost_per_minute=D("0.20"), connect_cost=D("0.05"), init_inc=30, inc=6)
    assert call_cost(tariff, billsec) == D(expected)


def test_included_seconds_are_free_but_connect_is_charged() -> None:
    tariff = Tariff(
        cost_per_minute=D("0.60"), connect_cost=D("0.01"), included_seconds=10, init_inc=60, inc=60
    )
    assert call_cost(tariff, 10) == D("0.01")
    assert charged_seconds(tariff, 11) == 60  # one second past the included ones buys the initial block
    assert call_cost(tariff, 11) == D("0.61")
    assert call_cost(tariff, 70) == D("0.61")
    assert call_cost(tariff, 71) == D("1.21")


def test_zero_increments_mean_one_second() -> None:
    tariff = Tariff(cost_per_minute=D("0.60"), init_inc=0, inc=0)
    assert charged_seconds(tariff, 7) == 7
    assert call_cost(tariff, 7) == D("0.07")


def test_rounding_is_half_up_to_six_places_once_per_call_not_per_increment() -> None:
    # 1/60 per second: 7 s cost 0.11666666..., one rounding gives 0.116667.
    tariff = Tariff(cost_per_minute=D("1"), init_inc=1, inc=1)
    assert call_cost(tariff, 7) == D("0.116667")
    # Rounded per increment it would be 7 * 0.016667 = 0.116669: not what we do.
    assert call_cost(tariff, 7) != 7 * round_money(D(1) / 60)
    # Exactly half a micro-unit rounds up.
    assert round_money(D("0.0000005")) == D("0.000001")
    assert round_money(D("0.00000049")) == D("0")
    assert round_money(D("2.5000005")) == D("2.500001")
    assert to_micros(D("1.2345675")) == 1_234_568
    assert from_micros(1_234_568) == D("1.234568")


def test_markup_prices_with_many_decimals_are_exact_until_the_one_rounding() -> None:
    tariff = Tariff(cost_per_minute=D("0.0123456789"), init_inc=60, inc=60)
    assert call_cost(tariff, 3600) == D("0.740741")  # 60 * 0.0123456789 = 0.740740734


# --------------------------------------------------------------------------- bad input


def _headers(**variables: str) -> dict[str, str]:
    base = {
        "Unique-ID": "u-1",
        "Hangup-Cause": "NORMAL_CLEARING",
        "variable_start_epoch": "1000",
        "variable_answer_epoch": "1005",
        "variable_end_epoch": "1065",
        "variable_billsec": "60",
    }
    base.update({f"variable_{k}" if not k[0].isupper() else k: v for k, v in variables.items()})
    return {k: v for k, v in base.items() if v != "<absent>"}


def test_billsec_missing_is_recomputed_from_the_epochs() -> None:
    end = parse_hangup(_headers(billsec="<absent>"))
    assert end.billsec == 60
    assert "billsec missing" in end.anomalies


def test_billsec_not_numeric_without_valid_times_is_not_billed() -> None:
    end = parse_hangup(_headers(billsec="sixty", answer_epoch="0"))
    assert end.billsec == 0
    assert any("not an integer" in a for a in end.anomalies)


def test_negative_billsec_is_billed_as_zero() -> None:
    end = parse_hangup(_headers(billsec="-5"))
    assert end.billsec == 0
    assert any("negative" in a for a in end.anomalies)


def test_integers_a_cdr_cannot_hold_are_dropped_and_thousands_of_digits_do_not_raise() -> None:
    many = "9" * 5000  # int() refuses more than 4,300 digits: bad input must still never raise
    end = parse_hangup(
        _headers(billmsec=many, duration="2147483648", hangup_cause_q850="-2147483649", sip_term_status="486")
    )
    assert (end.billmsec, end.duration, end.q850, end.sip_term_status) == (None, None, None, 486)
    assert "duration out of range: '2147483648': dropped" in end.anomalies
    assert len(end.anomalies) == 3
    # A billsec is kept whatever its size (saturated at 10^18): the call is then refused whole
    # (engine.billing.calls.absurd), never billed on a guess.
    assert parse_hangup(_headers(billsec=many)).billsec == 10**18
    assert parse_hangup(_headers(billsec="-" + many)).billsec == 0
    assert parse_hangup(_headers(billsec="0" * 40 + "60")).billsec == 60


def test_answer_after_end_keeps_freeswitch_billsec_and_is_noted() -> None:
    end = parse_hangup(_headers(answer_epoch="2000", billsec="60"))
    assert end.billsec == 60
    assert "answer time after end time" in end.anomalies
    # ... and with no usable billsec nothing is invented from the inconsistent times.
    end = parse_hangup(_headers(answer_epoch="2000", billsec="x"))
    assert end.billsec == 0


def test_rating_never_bills_negative_seconds() -> None:
    pricing = CallPricing((LevelPrice(1, "1", 1, "", Tariff(D("1"))),), (), 60)
    assert rate_call(pricing, -30, None).customer_debit == D("0")


def test_garbage_headers_do_not_raise() -> None:
    end = parse_hangup({"variable_start_uepoch": "1e999", "variable_end_epoch": "99999999999999999999"})
    assert end.billsec == 0
    assert end.uuid == ""
    assert end.anomalies


# --------------------------------------------------------------------------- the captures


def test_failover_capture_names_the_second_target_as_the_carrier() -> None:
    name = "answered_gateway_failover_wire.txt"
    end = parse_hangup(hangup_complete(name))
    assert (end.billsec, end.hangup_cause, end.disposition) == (3, "NORMAL_CLEARING", "recv_bye")
    assert len(end.legs) == 2
    assert end.carried_leg == 1
    targets = dial_targets(bridge_data(name))
    assert [gateway_of(t) for t in targets] == ["beta-gw1", "beta-gw2", "alpha-gw1", "alpha-gw2"]
    assert gateway_of(targets[end.carried_leg]) == "beta-gw2"
    # The B-leg's own event (seen by an inbound socket, never by callgate) confirms it.
    b_legs = (CAPTURES / "b_legs_inbound_socket.txt").read_text()
    section = b_legs.split(f"B-leg {end.bridged_uuid}", 1)[1].split("########", 1)[0]
    assert "variable_sip_gateway_name: beta-gw2" in section


@pytest.mark.parametrize(
    ("name", "billsec", "cause", "answered", "carried"),
    [
        ("allotted_timeout_wire.txt", 63, "ALLOTTED_TIMEOUT", True, 0),
        ("callee_hangs_up_wire.txt", 2, "NORMAL_CLEARING", True, 0),
        ("caller_cancels_wire.txt", 0, "ORIGINATOR_CANCEL", False, None),
        ("all_routes_fail_wire.txt", 0, "NORMAL_TEMPORARY_FAILURE", False, None),
    ],
)
def test_captures_parse_to_their_billing_facts(
    name: str, billsec: int, cause: str, answered: bool, carried: int | None
) -> None:
    end = parse_hangup(hangup_complete(name))
    assert (end.billsec, end.hangup_cause, end.answered, end.carried_leg) == (
        billsec,
        cause,
        answered,
        carried,
    )
    assert end.anomalies == ()
    assert end.uuid and end.started_at and end.ended_at


def test_legs_parse_with_and_without_the_array_wrapper() -> None:
    assert parse_legs("ARRAY::a;Outbound Call;1|:b;Outbound Call;1") == ("a", "b")
    assert parse_legs("a;NONE") == ("a",)
    assert parse_legs("") == ()


def test_allotted_call_costs_exactly_its_allowance() -> None:
    # Lab Tiny: 1.05 at 1.00/min granted 63 s; FreeSWITCH billed 63 s: 1.05 exactly.
    end = parse_hangup(hangup_complete("allotted_timeout_wire.txt"))
    pricing = CallPricing((LevelPrice(13, "1000000013", 1, "98", Tariff(D("1.00"))),), (), 63)
    assert rate_call(pricing, end.billsec, end.carried_leg).customer_debit == D("1.05")


# --------------------------------------------------------------------------- a decided call


def test_reseller_chain_and_failover_rated_by_hand() -> None:
    world = World()
    b = world.b
    # Reseller R buys 44 at 0.06/min (connect 0.01) from its own group; the customer pays 0.10.
    wholesale = b.group("Wholesale", trunks=(world.carrier_a,))
    b.rate(wholesale, "44", "0.06", connect_cost="0.01", init_inc=30, inc=6)
    reseller = b.reseller("2001", balance="50", rate_group=wholesale)
    b.update(world.customer, reseller_id=reseller.id)
    b.update(world.rate_44, init_inc=60, inc=60, included_seconds=5)
    # carrier-a has a failover gateway: its 2nd dial target is gw-a2.
    gw_a2 = b.gateway("gw-a2")
    b.update(world.carrier_a, failover_gateway_ids=(gw_a2.id,))
    b.update(world.term_a, connect_cost=D("0.002"), init_inc=1, inc=1)
    decision = run(world.catalog())
    assert isinstance(decision, Accept), decision
    pricing = pricing_for(decision)
    assert [level.account_id for level in pricing.levels] == [world.customer.id, reseller.id]
    assert pricing.routes[0].gateways == ("gw-a", "gw-a2")

    rated = rate_call(pricing, billsec=65, carried_leg=1)
    # customer: 65 - 5 included = 60 -> one 60 s block at 0.10 = 0.10
    # reseller: 0.01 + 30 s (0.03) + ceil(35/6)=6*6=36 s (0.036) = 0.076
    # carrier:  0.002 + 65 s at 0.05 = 0.054166.. -> 0.056167
    assert [d.amount for d in rated.debits] == [D("0.100000"), D("0.076000")]
    assert rated.carrier_cost == D("0.056167")
    assert rated.gateway == "gw-a2"
    assert rated.route is not None and rated.route.trunk_name == "carrier-a"
    assert rated.margin == D("0.019833")
    assert rated.notes == ()


def test_unknown_carrying_leg_assumes_the_first_route_and_says_so() -> None:
    route = RoutePrice(7, "t", 9, "44", Tariff(D("0.6")), ("gw",))
    pricing = CallPricing((LevelPrice(1, "1", 1, "", Tariff(D("1"))),), (route,), 60)
    rated = rate_call(pricing, 10, None)
    assert rated.carrier_cost == D("0.1")
    assert rated.notes
    assert rate_call(pricing, 0, None).notes == ()  # nothing to assume for an unanswered call
