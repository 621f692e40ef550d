"""The decision's pipelined write: what is sent, and that FreeSWITCH reads it back as meant."""

from __future__ import annotations

import pytest

from engine.call.render import FOLLOWED_EVENTS, UNREAD_EVENTS, bridge_batch, respond_batch
from engine.esl.commands import MULTISET_DELIMITERS, MULTISET_MAX_VARIABLES, MYEVENTS_TYPES, assignments
from loadtest.fsemu.outbound import MYEVENTS
from loadtest.fsemu.wire import Command, CommandParser


def commands_of(payload: bytes) -> list[Command]:
    return CommandParser().feed(payload)


def app_and_arg(command: Command) -> tuple[str, str]:
    app, arg = command.header("execute-app-name"), command.header("execute-app-arg")
    assert app is not None, command
    return app, command.body_text() if arg is None else arg


def multiset_pairs(arg: str) -> list[tuple[str, str]]:
    """mod_dptools' reading: ``^^<c>`` names the separator, each part is ``name=value``."""
    assert arg.startswith("^^")
    separator, rest = arg[2], arg[3:]
    return [(name, value) for name, value in (part.split("=", 1) for part in rest.split(separator))]


VARIABLES = [
    ("callgate_account", "1001"),
    ("callgate_routes", "carrier-a,carrier-b"),
    ("execute_on_answer", "sched_hangup +600 ALLOTTED_TIMEOUT"),
    ("callgate_reseller_chain", ""),
    ("callgate_rate", "44:0.0100=x|y"),
]


def test_several_variables_travel_in_one_multiset_that_reads_back_exactly() -> None:
    [command] = commands_of(b"".join(assignments(VARIABLES)))
    app, arg = app_and_arg(command)
    assert app == "multiset"
    assert arg[2] != "|"  # a value holds "|": another separator was chosen
    assert multiset_pairs(arg) == VARIABLES


def test_a_single_variable_is_a_plain_set() -> None:
    [command] = commands_of(b"".join(assignments([("callgate_reason", "NO_ROUTE_DESTINATION")])))
    assert app_and_arg(command) == ("set", "callgate_reason=NO_ROUTE_DESTINATION")
    assert assignments([]) == []


def test_without_a_free_separator_each_variable_gets_its_own_set() -> None:
    variables = [("a", MULTISET_DELIMITERS), ("b", "2")]
    sent = [app_and_arg(c) for c in commands_of(b"".join(assignments(variables)))]
    assert sent == [("set", f"a={MULTISET_DELIMITERS}"), ("set", "b=2")]


def test_many_variables_are_split_below_mod_dptools_limit_of_256_parts() -> None:
    variables = [(f"v{n}", str(n)) for n in range(MULTISET_MAX_VARIABLES * 2 + 1)]
    sent = [app_and_arg(c) for c in commands_of(b"".join(assignments(variables)))]
    assert [app for app, _ in sent] == ["multiset"] * 3
    assert [pair for _, arg in sent for pair in multiset_pairs(arg)] == variables


def test_a_bad_variable_name_is_refused_even_inside_a_multiset() -> None:
    with pytest.raises(ValueError):
        assignments([("ok", "1"), ("bad name", "2")])
    with pytest.raises(ValueError):
        assignments([("ok", "1"), ("a=b", "2")])


def test_nixevent_drops_exactly_what_myevents_adds_and_callgate_never_reads() -> None:
    assert set(MYEVENTS_TYPES) == MYEVENTS  # the library's list is the emulator's (FreeSWITCH's)
    assert set(UNREAD_EVENTS) | set(FOLLOWED_EVENTS) == MYEVENTS
    assert not set(UNREAD_EVENTS) & set(FOLLOWED_EVENTS)


def test_accept_and_reject_batches_in_order() -> None:
    accept = bridge_batch(VARIABLES, "sofia/gateway/a/44123|sofia/gateway/b/44123")
    lines = [c.line.split(" ")[0] for c in commands_of(accept.payload)]
    assert lines == ["myevents", "nixevent", "filter", "filter", "linger", "sendmsg", "sendmsg"]
    assert accept.replies_expected == 7
    reject = respond_batch([("callgate_reason", "CPS_LIMIT")], 503, "Service Unavailable")
    sent = [app_and_arg(c) for c in commands_of(reject.payload)[5:]]
    assert sent == [("set", "callgate_reason=CPS_LIMIT"), ("respond", "503 Service Unavailable")]
    assert reject.replies_expected == 7
