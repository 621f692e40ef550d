"""The CDR: one record per call attempt (answered, unanswered, rejected), as it travels from the
engine (JSON in the ``{prefix}cdrs`` stream, written by the settle script) to PostgreSQL.

Pure: building a record from the call's facts, and checking/flattening one for the writer.
Money travels as decimal strings (never floats) and is stored as numeric(20,6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.billing.hangup import CDR_INT_MAX, CallEnd
from engine.billing.rating import CallPricing, RatedCall, round_money

CDR_FORMAT = 1

# Column order of the cdrs table as the writer COPYs it (migration 0005).
CDR_COLUMNS = (
    "uuid",
    "started_at",
    "answered_at",
    "ended_at",
    "account_id",
    "account_number",
    "chain",
    "direction",
    "caller_id_number",
    "caller_id_name",
    "dialled",
    "translated",
    "rate_prefix",
    "rate_cost_per_minute",
    "trunk_id",
    "trunk_name",
    "gateway",
    "provider_id",
    "carrier_prefix",
    "carrier_cost_per_minute",
    "billsec",
    "duration",
    "max_duration",
    "customer_debit",
    "carrier_cost",
    "margin",
    "hangup_cause",
    "q850",
    "sip_code",
    "reject_reason",
    "disposition",
    "notes",
)
DEBIT_COLUMNS = ("uuid", "started_at", "account_id", "level", "amount")


class BadCdr(ValueError):
    """A record the writer cannot store (logged with its stream id, acknowledged, counted)."""


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    # astimezone(UTC) returns a UTC moment itself: skipped for the usual (parse_hangup's) ones
    return moment.isoformat() if moment.tzinfo is UTC else moment.astimezone(UTC).isoformat()


def answered_cdr(
    end: CallEnd,
    pricing: CallPricing,
    rated: RatedCall,
    *,
    account_id: int,
    account_number: str,
    chain: Sequence[int],
    direction: str,
    caller_id_name: str = "",
    translated: str = "",
    fallback_start: datetime | None = None,
) -> dict[str, Any]:
    """The CDR of a call the engine accepted (answered or not), rated at hangup."""
    first = pricing.levels[0] if pricing.levels else None
    route = rated.route
    started = end.started_at or fallback_start or end.ended_at or datetime.now(UTC)
    notes = [*end.anomalies, *rated.notes]
    return {
        "v": CDR_FORMAT,
        "uuid": end.uuid,
        "started_at": _iso(started),
        "answered_at": _iso(end.answered_at),
        "ended_at": _iso(end.ended_at),
        "account_id": account_id,
        "account_number": account_number,
        "chain": list(chain),
        "direction": direction,
        "caller_id_number": end.caller_id_number,
        "caller_id_name": caller_id_name,
        "dialled": end.destination,
        "translated": translated,
        "rate_prefix": first.prefix if first else None,
        "rate_cost_per_minute": str(first.tariff.cost_per_minute) if first else None,
        "trunk_id": route.trunk_id if route else None,
        "trunk_name": route.trunk_name if route else None,
        "gateway": rated.gateway or None,
        "provider_id": route.provider_id if route else None,
        "carrier_prefix": route.termination_prefix if route else None,
        "carrier_cost_per_minute": str(route.tariff.cost_per_minute) if route else None,
        "billsec": rated.billsec,
        "duration": end.duration,
        "max_duration": pricing.max_duration,
        "customer_debit": str(rated.customer_debit),
        "carrier_cost": str(rated.carrier_cost),
        "margin": str(rated.margin),
        "hangup_cause": end.hangup_cause,
        "q850": end.q850,
        "sip_code": end.sip_term_status,
        "reject_reason": None,
        "disposition": end.disposition,
        "notes": notes,
        "debits": [[d.account_id, d.level, str(d.amount)] for d in rated.debits],
    }


def rejected_cdr(
    uuid: str,
    at: datetime,
    *,
    reason: str,
    sip_code: int,
    account_id: int | None = None,
    account_number: str = "",
    caller_id_number: str = "",
    caller_id_name: str = "",
    dialled: str = "",
    direction: str = "",
) -> dict[str, Any]:
    """The CDR of a call the engine refused: no debit, the reason and the SIP code sent."""
    moment = _iso(at)
    return {
        "v": CDR_FORMAT,
        "uuid": uuid,
        "started_at": moment,
        "answered_at": None,
        "ended_at": moment,
        "account_id": account_id,
        "account_number": account_number,
        "chain": [] if account_id is None else [account_id],
        "direction": direction,
        "caller_id_number": caller_id_number,
        "caller_id_name": caller_id_name,
        "dialled": dialled,
        "translated": "",
        "billsec": 0,
        "customer_debit": "0",
        "carrier_cost": "0",
        "margin": "0",
        "hangup_cause": "CALL_REJECTED",
        "sip_code": sip_code,
        "reject_reason": reason,
        "notes": [],
        "debits": [],
    }


# --------------------------------------------------------------------------- for the writer


# The ranges of the columns a record is written to (engine/db/migrations/0005_accounting.sql).
# A value beyond them is refused here, as malformed: PostgreSQL would fail the whole batch's
# COPY, and the batch, retried, would block every CDR behind it.
_BIGINT_MAX = 2**63 - 1
_SMALLINT_MAX = 2**15 - 1
_MONEY_LIMIT = Decimal(10) ** 14  # numeric(20,6): 14 digits before the point


def _out_of_range(name: str, value: Any) -> BadCdr:
    return BadCdr(f"{name} out of range: {str(value)[:40]}")


def _money(value: Any, name: str) -> Decimal:
    try:
        amount = Decimal(str(value if value is not None else "0"))
    except InvalidOperation as exc:
        raise BadCdr(f"{name} is not a number: {value!r}") from exc
    if not amount.is_finite():
        raise BadCdr(f"{name} is not finite: {value!r}")
    amount = round_money(amount)
    if abs(amount) >= _MONEY_LIMIT:
        raise _out_of_range(name, value)
    return amount


def _optional_money(value: Any, name: str) -> Decimal | None:
    return None if value is None else _money(value, name)


def _moment(value: Any, name: str, *, required: bool = False) -> datetime | None:
    if value is None or value == "":
        if required:
            raise BadCdr(f"{name} missing")
        return None
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError as exc:
        raise BadCdr(f"{name} is not a time: {value!r}") from exc
    if moment.tzinfo is None:
        raise BadCdr(f"{name} has no time zone: {value!r}")
    return moment


def _int(value: Any, name: str, limit: int = _BIGINT_MAX) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadCdr(f"{name} is not an integer: {str(value)[:40]!r}")
    try:
        number = int(value)
    except ValueError as exc:  # includes a string of more digits than int() converts
        raise BadCdr(f"{name} is not an integer: {str(value)[:40]!r}") from exc
    if abs(number) > limit:
        raise _out_of_range(name, value)
    return number


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# Each integer column and its largest value: bigint ids, integer seconds and codes.
_INTS = {
    "account_id": _BIGINT_MAX,
    "trunk_id": _BIGINT_MAX,
    "provider_id": _BIGINT_MAX,
    "billsec": CDR_INT_MAX,
    "duration": CDR_INT_MAX,
    "max_duration": CDR_INT_MAX,
    "q850": CDR_INT_MAX,
    "sip_code": CDR_INT_MAX,
}
_MONEY = ("customer_debit", "carrier_cost", "margin")
_OPTIONAL_MONEY = ("rate_cost_per_minute", "carrier_cost_per_minute")


@dataclass(frozen=True, slots=True)
class CdrRows:
    cdr: tuple[Any, ...]
    debits: tuple[tuple[Any, ...], ...]


def cdr_rows(record: Mapping[str, Any]) -> CdrRows:
    """Check one record and flatten it into a cdrs row and its call_debits rows (BadCdr if unusable)."""
    if not isinstance(record, Mapping):
        raise BadCdr("a CDR must be a JSON object")
    uuid = record.get("uuid")
    if not isinstance(uuid, str) or not uuid or len(uuid) > 200:
        raise BadCdr(f"bad uuid: {uuid!r}")
    started = _moment(record.get("started_at"), "started_at", required=True)
    values: dict[str, Any] = {name: _text(record.get(name)) for name in CDR_COLUMNS}
    values["uuid"] = uuid
    values["started_at"] = started
    values["answered_at"] = _moment(record.get("answered_at"), "answered_at")
    values["ended_at"] = _moment(record.get("ended_at"), "ended_at")
    for name, limit in _INTS.items():
        values[name] = _int(record.get(name), name, limit)
    values["billsec"] = max(0, values["billsec"] or 0)
    for name in _MONEY:
        values[name] = _money(record.get(name), name)
    for name in _OPTIONAL_MONEY:
        values[name] = _optional_money(record.get(name), name)
    chain = record.get("chain") or []
    notes = record.get("notes") or []
    if not isinstance(chain, list) or not isinstance(notes, list):
        raise BadCdr("chain and notes must be lists")
    values["chain"] = [_int(v, "chain") for v in chain]
    values["notes"] = [str(n)[:500] for n in notes]
    debits = []
    seen: set[int] = set()
    raw_debits = record.get("debits") or []
    if not isinstance(raw_debits, list):
        raise BadCdr("debits must be a list")
    for item in raw_debits:
        if not isinstance(item, list) or len(item) != 3:
            raise BadCdr(f"bad debit: {item!r}")
        account_id, amount = _int(item[0], "debit account"), item[2]
        level = _int(item[1], "debit level", _SMALLINT_MAX)
        if account_id is None or level is None or level < 0 or level in seen:
            raise BadCdr(f"bad debit: {item!r}")
        seen.add(level)
        debits.append((uuid, started, account_id, level, _money(amount, "debit")))
    return CdrRows(tuple(values[name] for name in CDR_COLUMNS), tuple(debits))
