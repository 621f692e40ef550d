"""Channel variables: order, values, and safety for a `set` argument."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from engine.decision import Accept, Reason, Reject
from engine.rules import channel_variables, reject_variables
from tests.rules.builders import World, run


def accept() -> Accept:
    world = World()
    decision = run(world.catalog())
    assert isinstance(decision, Accept)
    return decision


def test_variables_in_order() -> None:
    assert channel_variables(accept()) == [
        ("callgate_account", "1001"),
        ("callgate_reseller_chain", ""),
        ("callgate_rate", "44:0.1"),
        ("callgate_max_duration", "6000"),
        ("callgate_routes", "carrier-a"),
        ("callgate_direction", "outbound"),
        ("continue_on_fail", "true"),
        ("hangup_after_bridge", "true"),
        ("execute_on_answer", "sched_hangup +6000 ALLOTTED_TIMEOUT"),
    ]


def test_changed_caller_id_is_set_after_the_routes() -> None:
    decision = dataclasses.replace(
        accept(), caller_id_number="442000000000", caller_id_name="Sales", caller_id_changed=True
    )
    names = [name for name, _ in channel_variables(decision)]
    assert names[4:7] == ["callgate_routes", "effective_caller_id_number", "effective_caller_id_name"]
    assert ("effective_caller_id_name", "Sales") in channel_variables(decision)


def test_values_are_safe_for_set() -> None:
    decision = dataclasses.replace(
        accept(),
        caller_id_number="1\n2",
        caller_id_name="a${system(reboot)}\u2028b\tc",
        caller_id_changed=True,
    )
    for name, value in channel_variables(decision):
        assert value.isprintable() and "$" not in value, name
    assert ("effective_caller_id_number", "12") in channel_variables(decision)
    assert ("effective_caller_id_name", "a{system(reboot)}bc") in channel_variables(decision)


def test_rate_has_no_exponent() -> None:
    base = accept()
    level = dataclasses.replace(base.levels[0], cost_per_minute=Decimal("1E-7"))
    decision = dataclasses.replace(base, levels=(level,))
    assert ("callgate_rate", "44:0.0000001") in channel_variables(decision)


def test_several_routes_are_comma_joined() -> None:
    base = accept()
    second = dataclasses.replace(base.routes[0], trunk_name="carrier-b")
    assert ("callgate_routes", "carrier-a,carrier-b") in channel_variables(
        dataclasses.replace(base, routes=(base.routes[0], second))
    )


def test_reject_variables() -> None:
    assert reject_variables(Reject(Reason.NO_SUFFICIENT_FUND, 7, "x")) == [
        ("callgate_reason", "NO_SUFFICIENT_FUND")
    ]
