"""A structured decision as FreeSWITCH commands: dial strings, channel variables, the one batch.

The rules return structured legs (gateway, number, timeout, codecs, caller ID) and a
maximum duration (engine.decision); everything FreeSWITCH-specific is written here,
the way CGRateS' agent renders what its session decided.

The write is shaped to keep FreeSWITCH's output small, because reading it is most of an
engine's work per call: ``nixevent`` drops the channel events callgate never reads (each
carries every channel variable, ~4 KiB), two ``filter`` commands drop the EXECUTE_COMPLETE of
every application but ``bridge`` (EVENT_FILTERS), and the variables travel in one ``multiset``
(one reply instead of one per ``set``). ``linger`` and ``nixevent`` need the socket's ``full``
flag (dialplan/callgate.xml); ``filter`` does not.

Values are never empty: an empty value in ``set``/``multiset`` UNSETS the variable on
FreeSWITCH, so a variable without a value is left out (docs/call-session.md lists them).
"""

from __future__ import annotations

import functools
import re

from engine.billing.ticket import TICKET_VARIABLE, ticket_value
from engine.decision import Accept, DeviceLeg, Direction, GatewayLeg, Leg, Reject
from engine.esl.commands import MYEVENTS_TYPES, Batch, assignments
from engine.esl.protocol import command, sendmsg_execute, sendmsg_hangup
from engine.rules.text import plain_decimal, safe_text

#: The events callgate reads once it has answered (engine.call.session).
FOLLOWED_EVENTS = ("CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE")

#: What ``myevents`` subscribes to, less FOLLOWED_EVENTS: dropped with ``nixevent``.
UNREAD_EVENTS = tuple(name for name in MYEVENTS_TYPES if name not in FOLLOWED_EVENTS)

# ``callgate_reason`` on the channel (in the CDR) says how callgate left the call:
REASON_VARIABLE = "callgate_reason"
ENGINE_UNREACHABLE = "ENGINE_UNREACHABLE"  # set by the dialplan before `socket`; kept if no engine decides
ACCEPTED = "ACCEPTED"  # the call was bridged, or is being tried on its routes
ROUTES_FAILED = "ROUTES_FAILED"  # accepted, but every leg failed: callgate hung the call up
# ... and each engine.decision.Reason for a rejected call.

#: The hangup cause after a failed bridge when FreeSWITCH names none usable.
BRIDGE_FAILED_CAUSE = "NORMAL_TEMPORARY_FAILURE"

# Characters that end or restructure a `[name=value,...]` block in a dial string, or that
# FreeSWITCH would expand: dropped from per-leg values.
_LEG_UNSAFE = frozenset(",[]|$'\\\"{}")


def leg_value(value: str) -> str:
    """``value`` made safe inside a dial target's ``[...]`` variables."""
    if value.isprintable() and not any(ch in _LEG_UNSAFE for ch in value):
        return value
    return "".join(ch for ch in value if ch.isprintable() and ch not in _LEG_UNSAFE)


@functools.lru_cache(maxsize=4096)  # a pure memo: a snapshot holds few distinct codec lists
def codec_option(codecs: tuple[str, ...]) -> str:
    """``,absolute_codec_string=^^:A:B`` ('' for none). Inside ``[...]`` a comma separates
    variables, so the list uses FreeSWITCH's ``^^:`` custom-delimiter form."""
    names = [leg_value(name) for name in codecs]
    names = [name for name in names if name]
    return ",absolute_codec_string=^^:" + ":".join(names) if names else ""


def _caller_id_option(leg: GatewayLeg) -> str:
    """The leg's own caller ID as ``origination_caller_id_*`` (FreeSWITCH takes those per
    leg, over the A-leg's ``effective_caller_id_*``); an empty value is left out."""
    if leg.caller_id is None:
        return ""
    number = leg_value(leg.caller_id.number)
    name = leg_value(leg.caller_id.name)
    option = ",origination_caller_id_number=" + number if number else ""
    return option + (",origination_caller_id_name=" + name if name else "")


def _gateway_head(leg: GatewayLeg) -> str:
    caller_id = "" if leg.caller_id is None else _caller_id_option(leg)
    return f"[leg_timeout={leg.timeout}{caller_id}{codec_option(leg.codecs)}]sofia/gateway/"


def dial_target(leg: Leg) -> str:
    """One leg of a dial string, e.g. ``[leg_timeout=30]sofia/gateway/gw-a/4420...``."""
    if isinstance(leg, GatewayLeg):
        return f"{_gateway_head(leg)}{leg.gateway}/{leg.number}"
    if isinstance(leg, DeviceLeg):
        return f"[leg_timeout={leg.timeout}]user/{leg.username}@{leg.domain}"
    return f"[leg_timeout={leg.timeout}]sofia/{leg.profile}/{leg.uri}"


# The head of a gateway leg by what it is written from (timeout, codecs, caller ID): the same
# few trunk settings call after call. Bounded; dropped whole when full.
_HEADS: dict[tuple[object, ...], str] = {}
_MAX_HEADS = 4096


def dial_string(accept: Accept) -> str:
    """Sequential failover across every leg (``|``), for ``bridge`` (and `callgate explain`).

    The hot path renders every leg of every call: a leg's head (``[...]sofia/gateway/``)
    comes from _HEADS, so each leg costs a lookup and a concatenation."""
    parts: list[str] = []
    heads = _HEADS
    for route in accept.routes:
        for leg in route.targets:
            shape = leg[2:]
            head = heads.get(shape)
            if head is None:
                if len(heads) >= _MAX_HEADS:
                    heads.clear()
                head = heads[shape] = _gateway_head(leg)
            parts.append(head + leg.gateway + "/" + leg.number)
    if not parts:
        parts = [dial_target(leg) for leg in accept.bridge_targets]
    return "|".join(parts)


def _rate_value(accept: Accept) -> str | None:
    """``<prefix>:<cost per minute>`` of the customer's rate; ``local:<cost>`` for an on-net
    call at the local-call price, ``*:<cost>`` for a catch-all (empty) prefix."""
    if not accept.levels:
        return None
    customer = accept.levels[0]
    prefix = customer.prefix or ("local" if accept.direction is Direction.LOCAL else "*")
    return f"{prefix}:{plain_decimal(customer.cost_per_minute)}"


def channel_variables(
    accept: Accept, ticket_key: bytes | None = None, uuid: str = ""
) -> list[tuple[str, str]]:
    """The variables an accepted call carries, in order, none of them empty.

    Text that comes from data (account numbers, prefixes, trunk and caller names) goes through
    ``safe_text`` and is left out when nothing remains; what the engine writes itself (the
    constants, numbers, the direction, the base64url ticket) is safe and never empty as it is."""
    variables = [(REASON_VARIABLE, ACCEPTED)]
    _put(variables, "callgate_account", accept.account_number)
    levels = accept.levels
    if len(levels) > 1:
        _put(variables, "callgate_reseller_chain", ",".join(level.account_number for level in levels[1:]))
    if levels:
        _put(variables, "callgate_rate", _rate_value(accept))
    variables.append(("callgate_max_duration", str(accept.max_duration)))
    _put(variables, "callgate_routes", ",".join(route.trunk_name for route in accept.routes))
    if accept.caller_id_changed:
        number = safe_text(accept.caller_id_number)
        # An empty name would unset the variable and show the caller's original name:
        # present the number instead, as a From without display name does.
        name = safe_text(accept.caller_id_name) or number
        if number:
            variables.append(("effective_caller_id_number", number))
        if name:
            variables.append(("effective_caller_id_name", name))
    variables.append(("callgate_direction", accept.direction.value))
    if accept.did_id is not None:
        variables.append(("callgate_did", str(accept.did_id)))
    # What FreeSWITCH's own CDR is billed on when the engine never sees the hangup
    # (engine.billing.ticket; docs/accounting.md, "FreeSWITCH's CDR as the backstop").
    # Signed for this call's uuid when [billing] ticket_keys is set.
    ticket = ticket_value(accept, ticket_key, uuid)
    if ticket:
        variables.append((TICKET_VARIABLE, ticket))
    variables.append(("continue_on_fail", "true"))
    variables.append(("hangup_after_bridge", "true"))
    # FreeSWITCH matches cause names exactly (case aside): the common spelling "alloted_timeout"
    # is no cause at all, so the CDR would not say why the call ended.
    variables.append(("execute_on_answer", f"sched_hangup +{accept.max_duration} ALLOTTED_TIMEOUT"))
    return variables


def _put(variables: list[tuple[str, str]], name: str, value: str | None) -> None:
    """``(name, safe_text(value))`` appended unless nothing is left of the value."""
    if value:
        value = safe_text(value)
        if value:
            variables.append((name, value))


def reject_variables(reject: Reject) -> list[tuple[str, str]]:
    return [(REASON_VARIABLE, reject.reason.value)]


#: ``filter <header> <value>`` commands after ``nixevent``: of the events still subscribed,
#: FreeSWITCH sends only those matching one of them (mod_event_socket.c, ``event_handler``:
#: OR over the filters, values compared case-insensitively). The session reads the bridge's
#: CHANNEL_EXECUTE_COMPLETE and CHANNEL_HANGUP_COMPLETE; the EXECUTE_COMPLETE of ``multiset``,
#: ``respond`` and of ``socket`` itself (6-9 KiB each) are no longer written.
#: Verified on FreeSWITCH 1.10.12 (tests/fixtures/esl_filter/, docs/real-switch-lab.md).
EVENT_FILTERS = (("Event-Name", "CHANNEL_HANGUP_COMPLETE"), ("Application", "bridge"))


# myevents: CHANNEL_HANGUP_COMPLETE reaches us; linger: it is delivered before FreeSWITCH closes.
# The same bytes for every call: built once.
_PREAMBLE: tuple[bytes, ...] = (
    command("myevents"),
    command("nixevent " + " ".join(UNREAD_EVENTS)),
    *(command(f"filter {name} {value}") for name, value in EVENT_FILTERS),
    command("linger"),
)


_PREAMBLE_BYTES = b"".join(_PREAMBLE)


# A channel UUID as FreeSWITCH writes it: a scheduler group name that is one command word.
_UUID_SHAPE = re.compile(r"[0-9A-Za-z-]{1,64}")


def guard_cancel(uuid: str | None) -> list[bytes]:
    """``api sched_del <uuid>``: cancels the dialplan's frozen-engine guard
    (``sched_hangup +N NETWORK_OUT_OF_ORDER`` before ``socket``, dialplan/callgate.xml).

    FreeSWITCH files a channel's scheduled hangups under its UUID, and ``api`` runs at once in
    the socket's listener thread (a ``sendmsg`` waits for the park loop), so this goes first
    in the batch: every scheduled task of the channel is gone before the decision's messages
    are even queued. The max-duration ``sched_hangup`` (``execute_on_answer``) is filed later,
    at the answer, and survives it. FreeSWITCH answers ``+OK Deleted: <count>`` in an
    ``api/response``, in order with the command replies. [] when there is no usable UUID:
    then the guard fires and the caller gets 503 (fail closed)."""
    if uuid is None or not _UUID_SHAPE.fullmatch(uuid):
        return []
    return [command("api sched_del " + uuid)]


def _batch(commands: list[bytes]) -> Batch:
    return Batch(b"".join(commands), len(commands))


def _decision_batch(variables: list[tuple[str, str]], message: bytes, guard_uuid: str | None) -> Batch:
    """The guard's cancel, the preamble (joined once), the variables, then ``message``: one
    reply expected per command."""
    sets = assignments(variables)
    commands = [*guard_cancel(guard_uuid), _PREAMBLE_BYTES, *sets, message]
    return Batch(b"".join(commands), len(commands) - 1 + len(_PREAMBLE))


def bridge_batch(variables: list[tuple[str, str]], dial: str, *, guard_uuid: str | None = None) -> Batch:
    return _decision_batch(variables, sendmsg_execute("bridge", dial), guard_uuid)


def respond_batch(
    variables: list[tuple[str, str]], code: int, text: str, *, guard_uuid: str | None = None
) -> Batch:
    return _decision_batch(variables, sendmsg_execute("respond", f"{code} {text}"), guard_uuid)


def accept_batch(
    accept: Accept, ticket_key: bytes | None = None, uuid: str = "", *, guard_uuid: str | None = None
) -> Batch:
    variables = channel_variables(accept, ticket_key, uuid)
    return bridge_batch(variables, dial_string(accept), guard_uuid=guard_uuid)


def reject_batch(reject: Reject, code: int, text: str, *, guard_uuid: str | None = None) -> Batch:
    return respond_batch(reject_variables(reject), code, text, guard_uuid=guard_uuid)


def hangup_cause(text: str) -> str:
    """A cause FreeSWITCH reported, usable in ``hangup-cause`` (else BRIDGE_FAILED_CAUSE)."""
    cause = text.strip().upper()
    return cause if cause and cause.replace("_", "").isalnum() and cause.isascii() else BRIDGE_FAILED_CAUSE


def routes_failed_batch(cause: str) -> Batch:
    """After a bridge whose every leg failed: record ROUTES_FAILED, then hang the parked
    call up with the bridge's own cause (it would otherwise stay parked)."""
    return _batch([*assignments([(REASON_VARIABLE, ROUTES_FAILED)]), sendmsg_hangup(hangup_cause(cause))])
