"""Round 5 of issue 18 (the hangup side): the rewritten parse, rating, CDR times, settle
arguments and CDR JSON against the code they replaced (kept here verbatim as the reference),
over seeded random inputs and the FreeSWITCH captures' CHANNEL_HANGUP_COMPLETE bodies.
Same result, same exception; same amounts, CDR and Redis arguments, type for type."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from engine.billing import cdr as cdr_module
from engine.billing.calls import ticket_settlement
from engine.billing.funds import Funds, Settlement, cdr_json
from engine.billing.hangup import CallEnd, parse_hangup, parse_legs
from engine.billing.rating import (
    _EXACT,
    MICROS,
    MONEY_PLACES,
    CallPricing,
    Debit,
    LevelPrice,
    RatedCall,
    RoutePrice,
    Tariff,
    call_cost,
    charged_seconds,
    rate_call,
    round_money,
    to_micros,
)
from engine.billing.ticket import BillingTicket
from tests.billing.captures import CAPTURES, events

# --------------------------------------------------------------------------- the reference (main 046e51c)

_ARRAY = "ARRAY::"


def _old_int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    # main 046e51c used `text.lstrip("-").isdigit()`, which let "--5" and "²" through to int()
    # (a ValueError: the call was logged as not billable); fixed after this round, here too.
    digits = text[1:] if text.startswith("-") else text
    if not digits.isdigit() or not digits.isascii():
        return None
    return int(text)


def _old_moment(headers: Mapping[str, str], name: str, anomalies: list[str]) -> datetime | None:
    micro = _old_int(headers.get(f"variable_{name}_uepoch"))
    if micro is None:
        seconds = _old_int(headers.get(f"variable_{name}_epoch"))
        micro = None if seconds is None else seconds * 1_000_000
    if micro is None:
        if headers.get(f"variable_{name}_uepoch") or headers.get(f"variable_{name}_epoch"):
            anomalies.append(f"{name} time unreadable")
        return None
    if micro <= 0:
        return None
    try:
        return datetime.fromtimestamp(micro / 1_000_000, UTC)
    except (OverflowError, OSError, ValueError):
        anomalies.append(f"{name} time out of range")
        return None


def _old_epoch_seconds(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


# Not in the replaced code: the range rule added on 2026-12-07 (engine.billing.hangup's
# docstring): an integer of more than 18 digits reads as 10^18, and the fields other than billsec
# that a CDR's `integer` columns cannot hold are dropped.
_OLD_INT_MAX = 2**31 - 1


def _old_saturated_int(text: str | None) -> int | None:
    value = _old_int(text)
    if value is not None and abs(value) >= 10**18:
        return 10**18 if value > 0 else -(10**18)
    return value


def _old_stored_int(headers: Mapping[str, str], key: str, anomalies: list[str]) -> int | None:
    raw = headers.get(key)
    value = _old_saturated_int(raw)
    if value is not None and abs(value) > _OLD_INT_MAX:
        anomalies.append(f"{key.removeprefix('variable_')} out of range: {str(raw)[:40]!r}: dropped")
        return None
    return value


def _old_billsec(
    headers: Mapping[str, str], answered_at: datetime | None, ended_at: datetime | None, anomalies: list[str]
) -> int:
    raw = headers.get("variable_billsec")
    value = _old_saturated_int(raw)
    answer_s, end_s = _old_epoch_seconds(answered_at), _old_epoch_seconds(ended_at)
    if value is None:
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


def old_parse_hangup(headers: Mapping[str, str]) -> CallEnd:
    anomalies: list[str] = []
    started = _old_moment(headers, "start", anomalies)
    answered = _old_moment(headers, "answer", anomalies)
    ended = _old_moment(headers, "end", anomalies)
    if answered is not None and ended is not None and answered > ended:
        anomalies.append("answer time after end time")
    if started is not None and ended is not None and started > ended:
        anomalies.append("start time after end time")
    billsec = _old_billsec(headers, answered, ended, anomalies)
    billmsec = _old_stored_int(headers, "variable_billmsec", anomalies)
    duration = _old_stored_int(headers, "variable_duration", anomalies)
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
        q850=_old_stored_int(headers, "variable_hangup_cause_q850", anomalies),
        disposition=headers.get("variable_sip_hangup_disposition", ""),
        sip_term_status=_old_stored_int(headers, "variable_sip_term_status", anomalies),
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


def _old_round_money(amount: Decimal) -> Decimal:
    return amount.quantize(MONEY_PLACES, rounding=ROUND_HALF_UP, context=_EXACT)


def old_to_micros(amount: Decimal) -> int:
    return int(_EXACT.multiply(_old_round_money(amount), Decimal(MICROS)))


def _old_call_cost(tariff: Tariff, billsec: int) -> Decimal:
    if billsec < 1:
        return Decimal(0).quantize(MONEY_PLACES)
    exact = _EXACT.add(
        tariff.connect_cost,
        _EXACT.divide(
            _EXACT.multiply(tariff.cost_per_minute, Decimal(charged_seconds(tariff, billsec))), Decimal(60)
        ),
    )
    return _old_round_money(exact)


def old_rate_call(pricing: CallPricing, billsec: int, carried_leg: int | None) -> RatedCall:
    billsec = max(0, billsec)
    debits = tuple(
        Debit(level.account_id, index, _old_call_cost(level.tariff, billsec))
        for index, level in enumerate(pricing.levels)
    )
    notes: list[str] = []
    found = pricing.target(carried_leg) if carried_leg is not None else None
    if found is None and billsec > 0 and pricing.routes:
        first = pricing.routes[0]
        found = (first, first.gateways[0] if first.gateways else "")
        notes.append(f"carrying leg {carried_leg} not in the dial plan: first route assumed")
    route, gateway = found if found is not None else (None, "")
    carrier = (
        _old_call_cost(route.tariff, billsec) if route is not None else Decimal(0).quantize(MONEY_PLACES)
    )
    return RatedCall(billsec, debits, carrier, route, gateway, tuple(notes))


def old_iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def old_settle_call(funds: Funds, item: Settlement) -> tuple[list[str], list[Any]]:
    prefix = funds._prefix
    keys = [f"{prefix}funds:call:{item.uuid}", f"{prefix}cdrs"]
    for account_id, _, _ in item.debits:
        keys += [
            f"{prefix}funds:acct:{account_id}",
            f"{prefix}funds:res:{account_id}",
            f"{prefix}funds:amt:{account_id}",
        ]
    args: list[Any] = [
        item.uuid,
        funds._keep_ms,
        "",
        json.dumps(dict(item.cdr), separators=(",", ":"), default=str),
        len(item.debits),
    ]
    for account_id, recorded, debit in item.debits:
        args += [account_id, old_to_micros(recorded), old_to_micros(debit)]
    args.append(funds._settled_ms)
    return keys, args


# --------------------------------------------------------------------------- random inputs


def _same(new: Any, old: Any) -> None:
    """Equal, and of the same type all the way down (a Decimal's exponent included)."""
    assert type(new) is type(old), (new, old)
    if isinstance(new, Decimal):
        assert new.as_tuple() == old.as_tuple(), (new, old)
    elif isinstance(new, (list, tuple)):
        assert len(new) == len(old), (new, old)
        for a, b in zip(new, old, strict=True):
            _same(a, b)
    elif isinstance(new, dict):
        assert list(new) == list(old), (new, old)
        for key in new:
            _same(new[key], old[key])
    else:
        assert new == old, (new, old)


def _outcome(function: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", function(*args)
    except Exception as exc:  # the same exception type, for the same input
        return "raised", type(exc)


_CAPTURE_BODIES = [
    event for path in sorted(CAPTURES.glob("*.txt")) for event in events(path.name, "CHANNEL_HANGUP_COMPLETE")
]

_INTEGER_TEXTS = [
    "0",
    "1",
    "16",
    "200",
    "-3",
    " 42 ",
    "",
    "abc",
    "4.5",
    "--5",
    "+7",
    "1_000",
    "\u00b2",
    "\u0663",
    "9" * 25,
]


def _integer_text(rnd: random.Random) -> str | None:
    roll = rnd.random()
    if roll < 0.55:
        return str(rnd.randint(0, 7200))
    if roll < 0.65:
        return None
    return rnd.choice(_INTEGER_TEXTS)


def _epoch_texts(rnd: random.Random, seconds: int) -> tuple[str | None, str | None]:
    roll = rnd.random()
    micro = seconds * 1_000_000 + rnd.randint(0, 999_999)
    if roll < 0.6:
        return str(micro), str(seconds)
    if roll < 0.7:
        return "0", "0"
    if roll < 0.75:
        return None, str(seconds)
    if roll < 0.8:
        return "garbage", rnd.choice([None, "", "x", str(seconds)])
    if roll < 0.85:
        return str(rnd.choice([10**18, 10**25, -5, 253402300800 * 10**6])), None
    if roll < 0.9:
        return None, None
    return rnd.choice(_INTEGER_TEXTS), rnd.choice([None, *_INTEGER_TEXTS])


def random_headers(rnd: random.Random) -> dict[str, str]:
    base = dict(rnd.choice(_CAPTURE_BODIES)) if _CAPTURE_BODIES and rnd.random() < 0.5 else {}
    start = rnd.randint(1_600_000_000, 2_100_000_000)
    moments = {"start": start, "answer": start + rnd.randint(-5, 30), "end": start + rnd.randint(-5, 4000)}
    for name, seconds in moments.items():
        if rnd.random() < 0.7 or not base:
            micro, whole = _epoch_texts(rnd, seconds)
            for suffix, value in (("uepoch", micro), ("epoch", whole)):
                key = f"variable_{name}_{suffix}"
                if value is None:
                    base.pop(key, None)
                else:
                    base[key] = value
    for key in (
        "variable_billsec",
        "variable_billmsec",
        "variable_duration",
        "variable_hangup_cause_q850",
        "variable_sip_term_status",
    ):
        if rnd.random() < 0.7 or not base:
            value = _integer_text(rnd)
            if value is None:
                base.pop(key, None)
            else:
                base[key] = value
    legs = [f"{rnd.getrandbits(64):016x}-leg" for _ in range(rnd.randint(0, 4))]
    if rnd.random() < 0.7 or not base:
        entries = [f"{uuid};Outbound Call;00449" for uuid in legs]
        value = (
            ("ARRAY::" + "|:".join(entries))
            if len(entries) > 1 and rnd.random() < 0.8
            else "|:".join(entries)
        )
        base["variable_originated_legs"] = value
        bridged = rnd.choice([*legs, "", "unknown-leg"]) if legs else rnd.choice(["", "unknown-leg"])
        base["variable_last_bridge_to"] = bridged
        if rnd.random() < 0.3:
            base.pop("variable_last_bridge_to")
            base["variable_bridge_uuid"] = bridged
    base.setdefault("Unique-ID", f"{rnd.getrandbits(128):032x}")
    return base


def _tariff(rnd: random.Random) -> Tariff:
    return Tariff(
        cost_per_minute=Decimal(rnd.randint(0, 10**7)).scaleb(-rnd.randint(0, 9)),
        connect_cost=Decimal(rnd.randint(0, 10**5)).scaleb(-rnd.randint(0, 7))
        if rnd.random() < 0.4
        else Decimal(0),
        included_seconds=rnd.choice([0, 0, 0, 30, 60, -1]),
        init_inc=rnd.choice([0, 1, 6, 30, 60]),
        inc=rnd.choice([0, 1, 6, 30, 60]),
    )


def random_ticket(rnd: random.Random) -> BillingTicket:
    levels = tuple(
        LevelPrice(1000 + i, f"100{i}", rnd.randint(1, 99), "44", _tariff(rnd))
        for i in range(rnd.randint(0, 4))
    )
    routes = tuple(
        RoutePrice(
            i, f"carrier{i}", i, "44", _tariff(rnd), tuple(f"gw{i}{c}" for c in "ab"[: rnd.randint(0, 2)])
        )
        for i in range(rnd.randint(0, 5))
    )
    return BillingTicket(
        account_id=levels[0].account_id if levels else 1000,
        account_number="1000",
        chain=tuple(level.account_id for level in levels),
        direction=rnd.choice(["outbound", "inbound"]),
        caller_id_name=rnd.choice(["", "Alice", "\u00c9lise \u2603"]),
        translated="00441234",
        decided_at=rnd.choice([None, datetime(2026, 12, 6, 23, 53, 18, 955403, tzinfo=UTC)]),
        pricing=CallPricing(levels, routes, rnd.randint(0, 7200)),
    )


# --------------------------------------------------------------------------- the comparisons

SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_parse_hangup_as_before(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(2000):
        headers = random_headers(rnd)
        new, old = _outcome(parse_hangup, headers), _outcome(old_parse_hangup, headers)
        assert new[0] == old[0], headers
        _same(new[1], old[1])


def test_the_captures_parse_as_before() -> None:
    assert len(_CAPTURE_BODIES) >= 5
    for headers in _CAPTURE_BODIES:
        _same(parse_hangup(headers), old_parse_hangup(headers))


@pytest.mark.parametrize("seed", SEEDS)
def test_rating_as_before(seed: int) -> None:
    rnd = random.Random(100 + seed)
    for _ in range(1500):
        pricing = random_ticket(rnd).pricing
        billsec = rnd.choice([0, 0, 1, 5, 59, 60, 61, rnd.randint(-10, 100_000)])
        carried = rnd.choice([None, -1, 0, 1, 2, 3, 9])
        _same(rate_call(pricing, billsec, carried), old_rate_call(pricing, billsec, carried))
        for level in pricing.levels:
            _same(call_cost(level.tariff, billsec), _old_call_cost(level.tariff, billsec))


@pytest.mark.parametrize("seed", SEEDS)
def test_money_conversions_as_before(seed: int) -> None:
    rnd = random.Random(200 + seed)
    for _ in range(3000):
        amount = Decimal(rnd.randint(-(10**15), 10**15)).scaleb(-rnd.randint(0, 12))
        assert to_micros(amount) == old_to_micros(amount)
        _same(round_money(amount), _old_round_money(amount))
    for special in (Decimal("NaN"), Decimal("Infinity"), Decimal(10) ** 70):
        assert _outcome(to_micros, special)[0] == _outcome(old_to_micros, special)[0]


def test_cdr_times_as_before() -> None:
    rnd = random.Random(300)
    zones = [UTC, timezone(timedelta(0)), timezone(timedelta(hours=2))]
    zones.append(timezone(timedelta(hours=-5, minutes=-30)))
    for _ in range(3000):
        moment = datetime.fromtimestamp(rnd.randint(0, 4_000_000_000) + rnd.random(), rnd.choice(zones))
        assert cdr_module._iso(moment) == old_iso(moment)
    assert cdr_module._iso(None) is None


@pytest.mark.parametrize("seed", SEEDS)
def test_settlement_and_redis_arguments_as_before(seed: int) -> None:
    """The whole hangup side: ticket -> settlement -> the settle script's KEYS and ARGV, with
    the old parse and rating feeding the (unchanged) CDR builder as the reference."""
    rnd = random.Random(400 + seed)
    funds = Funds(None, f"cg{seed}:")  # type: ignore[arg-type]  # never talks to Redis here
    recorded_values = [Decimal(0), Decimal("12.5"), Decimal("0.0000005"), Decimal("123456.123456")]
    for _ in range(800):
        headers, ticket = random_headers(rnd), random_ticket(rnd)
        recorded = dict(zip(ticket.chain, rnd.choices(recorded_values, k=len(ticket.chain)), strict=True))
        new = _outcome(ticket_settlement, headers, ticket, recorded.__getitem__)
        end = _outcome(old_parse_hangup, headers)
        assert new[0] == end[0], headers
        if new[0] != "ok":
            continue
        item, rated, parsed = new[1]
        old_end = end[1]
        old_rated = old_rate_call(ticket.pricing, old_end.billsec, old_end.carried_leg)
        _same(parsed, old_end)
        _same(rated, old_rated)
        _same(item.debits, tuple((d.account_id, recorded[d.account_id], d.amount) for d in old_rated.debits))
        assert item.uuid == old_end.uuid
        for key in ("started_at", "answered_at", "ended_at"):
            moment = getattr(old_end, key)
            if moment is not None:
                assert item.cdr[key] == old_iso(moment)
        _same(funds._settle_call(item), old_settle_call(funds, item))


def test_cdr_json_as_json_dumps() -> None:
    """Odd values too: default=str for what JSON has no type for, non-ASCII escaped, floats."""
    records: list[Mapping[Any, Any]] = [
        {"a": Decimal("1.10"), "b": datetime(2026, 1, 2, tzinfo=UTC), "c": [1, "\u2603", None, True, 1.5]},
        {"nan": float("nan"), "inf": float("inf"), "nested": {"x": [[]], "y": {}}, "e": '"\\\n\x00'},
        {},
        {1: "int key", None: "none key", 2.5: "float key"},
    ]
    for record in records:
        assert cdr_json(record) == json.dumps(dict(record), separators=(",", ":"), default=str)
    rnd = random.Random(500)
    for _ in range(500):
        made = _outcome(
            ticket_settlement, random_headers(rnd), random_ticket(rnd), lambda _account: Decimal(0)
        )
        if made[0] != "ok":
            continue  # a header the parse cannot take (as before: see test_parse_hangup_as_before)
        item = made[1][0]
        assert cdr_json(item.cdr) == json.dumps(dict(item.cdr), separators=(",", ":"), default=str)


@pytest.mark.parametrize("odd", ["\u00b2", "--5", "\u0663", "-\u00b2", "- 5", "+7", "4.5"])
def test_a_numeric_header_that_is_not_ascii_digits_never_raises(odd: str) -> None:
    """parse_hangup's contract: bad input never raises. str.isdigit() accepts "²" and "٣", and
    "--5" passed a lstrip("-"): int() then raised, and the call was logged as not billable."""
    headers = dict(_CAPTURE_BODIES[0])
    headers["variable_billsec"] = odd
    headers["variable_duration"] = odd
    headers["variable_answer_epoch"] = odd
    headers.pop("variable_answer_uepoch", None)
    parse_hangup(headers)  # no exception; the odd values read as absent
