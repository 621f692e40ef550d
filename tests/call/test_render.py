"""Rendering a decision: channel variables (order, values, safety), never an empty value."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

from engine.call.render import (
    ACCEPTED,
    accept_batch,
    channel_variables,
    dial_string,
    reject_batch,
    reject_variables,
    routes_failed_batch,
)
from engine.decision import Accept, DeviceLeg, Direction, Reason, Reject, UriLeg
from engine.esl.commands import MYEVENTS_TYPES
from loadtest.fsemu.wire import CommandParser
from tests.rules.builders import World, run


def accept() -> Accept:
    world = World()
    decision = run(world.catalog())
    assert isinstance(decision, Accept)
    return decision


def test_variables_in_order() -> None:
    assert channel_variables(accept()) == [
        ("callgate_reason", ACCEPTED),
        ("callgate_account", "1001"),
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


def test_no_value_is_ever_empty() -> None:
    """An empty value in multiset UNSETS the variable on FreeSWITCH (issue 14, item 5)."""
    base = accept()
    on_net = dataclasses.replace(
        base,
        direction=Direction.LOCAL,
        routes=(),
        bridge_targets=(DeviceLeg("bob", "pbx.example.com", 60),),
        levels=(dataclasses.replace(base.levels[0], prefix=""),),
        caller_id_number="1001",
        caller_id_name="",
        caller_id_changed=True,
    )
    variables = dict(channel_variables(on_net))
    assert all(variables.values()), variables
    assert "callgate_reseller_chain" not in variables and "callgate_routes" not in variables
    assert variables["callgate_rate"] == "local:0.1"  # was ":0.1"
    assert variables["effective_caller_id_name"] == "1001"  # an empty name would unset it
    free = dataclasses.replace(on_net, levels=())
    assert "callgate_rate" not in dict(channel_variables(free))
    catch_all = dataclasses.replace(base, levels=(dataclasses.replace(base.levels[0], prefix=""),))
    assert dict(channel_variables(catch_all))["callgate_rate"] == "*:0.1"


def test_reseller_chain_lists_the_resellers() -> None:
    base = accept()
    reseller = dataclasses.replace(base.levels[0], account_number="2001")
    top = dataclasses.replace(base.levels[0], account_number="3001")
    decision = dataclasses.replace(base, levels=(base.levels[0], reseller, top))
    assert dict(channel_variables(decision))["callgate_reseller_chain"] == "2001,3001"


def test_on_net_legs() -> None:
    base = accept()
    device = dataclasses.replace(base, routes=(), bridge_targets=(DeviceLeg("bob", "pbx.example.com", 25),))
    assert dial_string(device) == "[leg_timeout=25]user/bob@pbx.example.com"
    uri = dataclasses.replace(base, routes=(), bridge_targets=(UriLeg("external", "sip:1@h.example", 60),))
    assert dial_string(uri) == "[leg_timeout=60]sofia/external/sip:1@h.example"


def test_accept_batch_subscribes_only_to_what_the_session_reads() -> None:
    commands = CommandParser().feed(accept_batch(accept()).payload)
    lines = [command.line for command in commands]
    assert lines[:5] == [
        "myevents",
        lines[1],
        "filter Event-Name CHANNEL_HANGUP_COMPLETE",
        "filter Application bridge",
        "linger",
    ]
    nixed = set(lines[1].split()[1:])
    assert set(MYEVENTS_TYPES) - nixed == {"CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE"}
    assert [command.header("execute-app-name") for command in commands[5:]] == ["multiset", "bridge"]


def test_reject_batch_asks_for_the_same_events() -> None:
    accept_lines = [c.line for c in CommandParser().feed(accept_batch(accept()).payload)][:5]
    reject = Reject(Reason.AUTHENTICATION_FAIL)
    commands = CommandParser().feed(reject_batch(reject, 403, "Forbidden", guard_uuid="abc-1").payload)
    assert [c.line for c in commands][:6] == ["api sched_del abc-1", *accept_lines]
    assert [c.header("execute-app-name") for c in commands[6:]] == ["set", "respond"]


def test_routes_failed_batch_records_the_reason_then_hangs_up() -> None:
    batch = routes_failed_batch("user_busy")
    first, second = CommandParser().feed(batch.payload)
    assert batch.replies_expected == 2
    assert (first.header("execute-app-name"), first.header("execute-app-arg")) == (
        "set",
        "callgate_reason=ROUTES_FAILED",
    )
    assert (second.header("call-command"), second.header("hangup-cause")) == ("hangup", "USER_BUSY")
    hostile = CommandParser().feed(routes_failed_batch("X\nY: z").payload)[1]
    assert hostile.header("hangup-cause") == "NORMAL_TEMPORARY_FAILURE"
