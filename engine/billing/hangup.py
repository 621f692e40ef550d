"""CHANNEL_HANGUP_COMPLETE -> the facts a call is billed on (pure; decoded headers in, CallEnd out).

Which fields, and why (freeswitch-captures/README.md, "Billing fields"):

* billed seconds: ``variable_billsec`` (FreeSWITCH's ``end_epoch - answer_epoch`` in whole
  seconds; what ASTPP bills and what ``sched_hangup +N`` lands on exactly);
* times: ``variable_{start,answer,end}_uepoch`` (microseconds; 0 = never happened);
* cause: ``Hangup-Cause`` / ``variable_hangup_cause``, ``variable_hangup_cause_q850``,
  ``variable_sip_hangup_disposition`` (who hung up), ``variable_sip_term_status``;
* the leg that carried the call: no A-leg header names its gateway (``bridge_channel`` is
  ``sofia/internal/<number>``; ``sip_gateway_name`` exists only on the B-leg).
  ``variable_last_bridge_to`` is the answered B-leg's UUID, and ``variable_originated_legs``
  lists every leg tried, one entry per dial target, in dial-string order
  (``ARRAY::uuid;name;number|:uuid;name;number`` or a single ``uuid;name;number``). The
  position of the entry whose UUID is ``last_bridge_to`` is the position of the target in
  the dial string, which names the route and gateway. Misleading on a failover:
  ``last_bridge_hangup_cause`` / ``sip_hangup_phrase`` describe the failed first leg.

Bad input never raises: every oddity has a defined outcome, listed in ``CallEnd.anomalies``
(the caller logs them and the CDR keeps them):

* ``billsec`` missing or not an integer: recomputed from ``end_epoch - answer_epoch`` when
  both are valid, else 0 (not billed);
* ``billsec`` negative: 0;
* ``billmsec``, ``duration``, ``q850`` or ``sip_term_status`` beyond :data:`CDR_INT_MAX` (a
  broken or forged header: a CDR could not store it): dropped (None). A ``billsec`` beyond it is
  kept: the call is then not billed at all (engine.billing.calls.absurd), as no call lasts 68
  years;
* an integer of more than 18 digits reads as 10^18 (with its sign): out of every range above,
  without converting thousands of digits (which ``int()`` refuses beyond 4,300);
* answer after end, or end before start: the times are kept as reported, ``billsec`` is 0
  unless FreeSWITCH's own ``billsec`` is a valid non-negative integer (then it is billed:
  it is the switch's figure, the same one its own CDR holds);
* an answered call (``billsec`` > 0) without ``answer_epoch``: billed on ``billsec``, noted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

_ARRAY = "ARRAY::"

#: The largest integer a CDR stores (the PostgreSQL ``integer`` columns of ``cdrs``: billsec,
#: duration, q850, sip_code; engine.billing.cdr refuses a record beyond it).
CDR_INT_MAX = 2**31 - 1

#: Every header :func:`parse_hangup` reads (a CHANNEL_HANGUP_COMPLETE carries ~280): the engine
#: picks only these out of the event (engine.esl.protocol.HeaderPicker) instead of splitting
#: them all. tests/billing/test_hangup.py fails when parse_hangup reads a name not listed here.
HANGUP_HEADERS: tuple[str, ...] = (
    "Unique-ID",
    "variable_uuid",
    "Hangup-Cause",
    "variable_hangup_cause",
    "variable_hangup_cause_q850",
    "variable_sip_hangup_disposition",
    "variable_sip_term_status",
    *(f"variable_{moment}_{unit}" for moment in ("start", "answer", "end") for unit in ("uepoch", "epoch")),
    "variable_billsec",
    "variable_billmsec",
    "variable_duration",
    "variable_originate_disposition",
    "variable_originated_legs",
    "variable_last_bridge_to",
    "variable_bridge_uuid",
    "Caller-Caller-ID-Number",
    "Caller-Destination-Number",
    "variable_callgate_account",
    "variable_callgate_reason",
)


@dataclass(frozen=True, slots=True)
class CallEnd:
    uuid: str
    hangup_cause: str
    q850: int | None
    disposition: str  # sip_hangup_disposition: recv_bye (caller), send_bye, recv_cancel, send_refuse...
    sip_term_status: int | None
    started_at: datetime | None
    answered_at: datetime | None
    ended_at: datetime | None
    billsec: int  # validated: what is billed
    billmsec: int | None
    duration: int | None
    originate_disposition: str
    legs: tuple[str, ...]  # UUIDs of the legs tried, in dial-string order
    bridged_uuid: str  # the B-leg that carried the call ("" if none)
    carried_leg: int | None  # its position in the dial string
    caller_id_number: str
    destination: str
    callgate_account: str
    callgate_reason: str
    anomalies: tuple[str, ...] = ()

    @property
    def answered(self) -> bool:
        return self.answered_at is not None or self.billsec > 0


# More digits than this are out of every range a CDR stores; int() of thousands of digits is
# slow, and refused beyond 4,300 (a ValueError, which bad input must never raise here).
_MAX_DIGITS = 18
_SATURATED = 10**_MAX_DIGITS


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    if text.isdigit() and text.isascii() and len(text) <= _MAX_DIGITS:  # the usual header
        return int(text)
    text = text.strip()
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    # ASCII digits only: str.isdigit also accepts "²" or "٣", which int() refuses or reads
    if not digits.isdigit() or not digits.isascii():
        return None
    if len(digits.lstrip("0")) > _MAX_DIGITS:
        return -_SATURATED if negative else _SATURATED  # out of range, whatever its size
    return int(text)


#: The two headers of each moment (microseconds first, then seconds): built once, not per call.
_MOMENT_HEADERS = {
    name: (f"variable_{name}_uepoch", f"variable_{name}_epoch") for name in ("start", "answer", "end")
}


def _moment(headers: Mapping[str, str], name: str, anomalies: list[str]) -> datetime | None:
    """``variable_<name>_uepoch`` (else ``_epoch``) as a UTC datetime; None for 0 or absent."""
    micro_name, seconds_name = _MOMENT_HEADERS[name]
    micro_text = headers.get(micro_name)
    micro = _int(micro_text)
    if micro is None:
        seconds_text = headers.get(seconds_name)
        seconds = _int(seconds_text)
        micro = None if seconds is None else seconds * 1_000_000
        if micro is None:
            if micro_text or seconds_text:
                anomalies.append(f"{name} time unreadable")
            return None
    if micro <= 0:
        return None
    try:
        return datetime.fromtimestamp(micro / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        anomalies.append(f"{name} time out of range")
        return None


def parse_legs(value: str) -> tuple[str, ...]:
    """The leg UUIDs of ``variable_originated_legs`` (or ``originate_causes``), in order."""
    if not value:
        return ()
    body = value[len(_ARRAY) :] if value.startswith(_ARRAY) else value
    legs = []
    for item in body.split("|:"):
        uuid = item.split(";", 1)[0].strip()
        if uuid:
            legs.append(uuid)
    return tuple(legs)


def _epoch_seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _billsec(
    headers: Mapping[str, str],
    answered_at: datetime | None,
    ended_at: datetime | None,
    anomalies: list[str],
) -> int:
    raw = headers.get("variable_billsec")
    value = _int(raw)
    if value is None:
        answer_s, end_s = _epoch_seconds(answered_at), _epoch_seconds(ended_at)
        if raw is None:
            anomalies.append("billsec missing")
        else:
            anomalies.append(f"billsec not an integer: {raw[:40]!r}")
        if answer_s is not None and end_s is not None and end_s >= answer_s:
            anomalies.append("billsec recomputed from end_epoch - answer_epoch")
            return end_s - answer_s
        return 0
    if value < 0:
        anomalies.append(f"billsec negative ({value}): billed as 0")
        return 0
    if value > 0 and answered_at is None:
        anomalies.append("billsec > 0 without an answer time")
    return value


def _stored_int(headers: Mapping[str, str], key: str, anomalies: list[str]) -> int | None:
    """The integer header ``key``; None when absent, unreadable, or (noted) beyond what a CDR's
    integer column holds."""
    raw = headers.get(key)
    value = _int(raw)
    if value is not None and abs(value) > CDR_INT_MAX:
        anomalies.append(f"{key.removeprefix('variable_')} out of range: {str(raw)[:40]!r}: dropped")
        return None
    return value


def parse_hangup(headers: Mapping[str, str]) -> CallEnd:
    """The billing facts of a decoded CHANNEL_HANGUP_COMPLETE (see the module docstring)."""
    anomalies: list[str] = []
    started = _moment(headers, "start", anomalies)
    answered = _moment(headers, "answer", anomalies)
    ended = _moment(headers, "end", anomalies)
    if answered is not None and ended is not None and answered > ended:
        anomalies.append("answer time after end time")
    if started is not None and ended is not None and started > ended:
        anomalies.append("start time after end time")
    billsec = _billsec(headers, answered, ended, anomalies)
    billmsec = _stored_int(headers, "variable_billmsec", anomalies)
    duration = _stored_int(headers, "variable_duration", anomalies)
    if duration is not None and duration < 0:
        anomalies.append(f"duration negative ({duration})")
        duration = 0
    legs = parse_legs(headers.get("variable_originated_legs", ""))
    bridged = headers.get("variable_last_bridge_to") or headers.get("variable_bridge_uuid") or ""
    carried: int | None = None
    if bridged:
        if bridged in legs:
            carried = legs.index(bridged)
        else:
            anomalies.append("bridged leg not among the originated legs")
    cause = headers.get("variable_hangup_cause") or headers.get("Hangup-Cause") or ""
    return CallEnd(
        uuid=headers.get("Unique-ID") or headers.get("variable_uuid") or "",
        hangup_cause=cause,
        q850=_stored_int(headers, "variable_hangup_cause_q850", anomalies),
        disposition=headers.get("variable_sip_hangup_disposition", ""),
        sip_term_status=_stored_int(headers, "variable_sip_term_status", anomalies),
        started_at=started,
        answered_at=answered,
        ended_at=ended,
        billsec=billsec,
        billmsec=billmsec,
        duration=duration,
        originate_disposition=headers.get("variable_originate_disposition", ""),
        legs=legs,
        bridged_uuid=bridged,
        carried_leg=carried,
        caller_id_number=headers.get("Caller-Caller-ID-Number", ""),
        destination=headers.get("Caller-Destination-Number", ""),
        callgate_account=headers.get("variable_callgate_account", ""),
        callgate_reason=headers.get("variable_callgate_reason", ""),
        anomalies=tuple(anomalies),
    )


def dial_targets(bridge_data: str) -> tuple[str, ...]:
    """The targets of a bridge's ``Application-Data`` (``a|b|c``), e.g. to check a leg's gateway."""
    return tuple(t for t in bridge_data.split("|") if t)


def gateway_of(target: str) -> str:
    """``beta-gw2`` for ``[opts]sofia/gateway/beta-gw2/0044...``; "" for other targets."""
    if target.startswith("["):
        target = target[target.find("]") + 1 :]
    parts = target.split("/")
    if len(parts) >= 3 and parts[0] == "sofia" and parts[1] == "gateway":
        return parts[2]
    return ""
