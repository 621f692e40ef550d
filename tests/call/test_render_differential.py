"""Round 5 of issue 18 rewrote the accepted call's output (engine.call.render's variables and
batch, engine.billing.ticket's encoding and signature) to cost less: every byte FreeSWITCH
receives must be what the code before it wrote. The code before is kept here, verbatim, and
both are run over many random accepts, hostile text included, byte for byte (pure)."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from engine.billing.live import PricedAccept
from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.billing.ticket import (
    TICKET_VARIABLE,
    BillingTicket,
    decode_ticket,
    encode_ticket,
    ticket_of,
    ticket_signature,
    ticket_value,
    verify_ticket,
)
from engine.call import render
from engine.decision import Accept, Direction, GatewayLeg, LegCallerId, RatedLevel, Route
from engine.esl.commands import Batch, assignments
from engine.esl.protocol import MAX_HEADER_ARG_BYTES, _check_token, _fits_in_header, _sendmsg, sendmsg_execute
from engine.rules.text import safe_text

# --------------------------------------------------------------------------- the code before


def old_tariff(t: Tariff) -> list[Any]:
    return [str(t.cost_per_minute), str(t.connect_cost), t.included_seconds, t.init_inc, t.inc]


def old_micros(moment: datetime | None) -> int | None:
    return None if moment is None else round(moment.timestamp() * 1_000_000)


def old_encode_ticket(ticket: BillingTicket) -> str:
    pricing = ticket.pricing
    document = [
        ticket.account_id,
        ticket.account_number,
        list(ticket.chain),
        ticket.direction,
        ticket.caller_id_name,
        ticket.translated,
        old_micros(ticket.decided_at),
        pricing.max_duration,
        [
            [lv.account_id, lv.account_number, lv.rate_id, lv.prefix, *old_tariff(lv.tariff)]
            for lv in pricing.levels
        ],
        [
            [
                r.trunk_id,
                r.trunk_name,
                r.provider_id,
                r.termination_prefix,
                *old_tariff(r.tariff),
                list(r.gateways),
            ]
            for r in pricing.routes
        ],
    ]
    raw = json.dumps(document, separators=(",", ":")).encode("ascii")
    return "1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def old_ticket_signature(text: str, uuid: str, key: bytes) -> str:
    mac = hmac.digest(key, text.encode("utf-8") + b"\0" + uuid.encode("utf-8"), "sha256")
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def old_ticket_value(accept: Accept, key: bytes | None = None, uuid: str = "") -> str | None:
    ticket = ticket_of(accept)
    if ticket is None:
        return None
    text = old_encode_ticket(ticket)
    return text if key is None else text + "." + old_ticket_signature(text, uuid, key)


def old_channel_variables(
    accept: Accept, ticket_key: bytes | None = None, uuid: str = ""
) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str | None]] = [
        (render.REASON_VARIABLE, render.ACCEPTED),
        ("callgate_account", accept.account_number),
        ("callgate_reseller_chain", ",".join(level.account_number for level in accept.levels[1:])),
        ("callgate_rate", render._rate_value(accept)),
        ("callgate_max_duration", str(accept.max_duration)),
        ("callgate_routes", ",".join(route.trunk_name for route in accept.routes)),
    ]
    if accept.caller_id_changed:
        number = safe_text(accept.caller_id_number)
        pairs.append(("effective_caller_id_number", number))
        pairs.append(("effective_caller_id_name", safe_text(accept.caller_id_name) or number))
    pairs.append(("callgate_direction", accept.direction.value))
    if accept.did_id is not None:
        pairs.append(("callgate_did", str(accept.did_id)))
    pairs.append((TICKET_VARIABLE, old_ticket_value(accept, ticket_key, uuid)))
    pairs.append(("continue_on_fail", "true"))
    pairs.append(("hangup_after_bridge", "true"))
    pairs.append(("execute_on_answer", f"sched_hangup +{accept.max_duration} ALLOTTED_TIMEOUT"))
    clean = [(name, safe_text(value)) for name, value in pairs if value]
    return [(name, value) for name, value in clean if value]


def old_batch(commands: list[bytes]) -> Batch:
    return Batch(b"".join(commands), len(commands))


def old_bridge_batch(variables: list[tuple[str, str]], dial: str, *, guard_uuid: str | None = None) -> Batch:
    commands = [*render._PREAMBLE, *assignments(variables), sendmsg_execute("bridge", dial)]
    return old_batch([*render.guard_cancel(guard_uuid), *commands])


def old_respond_batch(
    variables: list[tuple[str, str]], code: int, text: str, *, guard_uuid: str | None = None
) -> Batch:
    commands = [*render._PREAMBLE, *assignments(variables), sendmsg_execute("respond", f"{code} {text}")]
    return old_batch([*render.guard_cancel(guard_uuid), *commands])


def old_accept_batch(
    accept: Accept, ticket_key: bytes | None = None, uuid: str = "", *, guard_uuid: str | None = None
) -> Batch:
    variables = old_channel_variables(accept, ticket_key, uuid)
    return old_bridge_batch(variables, render.dial_string(accept), guard_uuid=guard_uuid)


# --------------------------------------------------------------------------- random accepts

# Plain text, the characters that matter to FreeSWITCH, JSON and multiset, controls, non-ASCII.
PIECES = [
    "",
    "a",
    "1000475",
    "carrier 7",
    "$",
    "${x}",
    "|",
    "~",
    ",",
    "=",
    "\n",
    "\x00",
    "\x7f",
    '"',
    "\\",
    "é",
    "Zoë",
    "\u2028",
    "\U0001f600",
    "\ud800",
    "^^",
    " ",
    "'",
    "[",
    "]",
    "{",
    "}",
    "/",
    "\t",
    "\ufeff",
]


def text(rng: random.Random, plain: float = 0.6) -> str:
    if rng.random() < plain:
        return rng.choice(["1000475", "carrier035", "Sales", "4420", "", "gw-a"])
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6)))


def amount(rng: random.Random) -> Decimal:
    return rng.choice(
        [
            Decimal("0"),
            Decimal("0.0132"),
            Decimal("1E-7"),
            Decimal("0.33385"),
            Decimal("12.50"),
            Decimal(rng.randint(0, 10**6)) / Decimal(10 ** rng.randint(0, 9)),
        ]
    )


def tariff(rng: random.Random) -> Tariff:
    return Tariff(amount(rng), amount(rng), rng.randint(0, 60), rng.randint(0, 60), rng.randint(0, 60))


def random_accept(rng: random.Random) -> Accept:
    direction = rng.choice(list(Direction))
    levels = tuple(
        RatedLevel(
            rng.randint(1, 10**6),
            text(rng),
            rng.randint(1, 10**6),
            text(rng),
            amount(rng),
            amount(rng),
            rng.randint(0, 60),
            rng.randint(1, 60),
            rng.randint(0, 10**5),
        )
        for _ in range(rng.choice([0, 1, 1, 2, 3]))
    )
    routes = []
    for _ in range(rng.choice([0, 1, 3, 5])):
        number = rng.choice(["442071234567", "364769128458", text(rng)])
        legs = tuple(
            GatewayLeg(
                rng.choice(["gw035a", "gw035b", "gw-x"]),
                number,
                rng.choice([30, 60]),
                rng.choice([(), ("PCMU", "PCMA"), ("G729",)]),
                rng.choice([None, None, LegCallerId(text(rng), text(rng))]),
            )
            for _ in range(rng.randint(1, 3))
        )
        routes.append(
            Route(
                rng.randint(1, 999),
                text(rng),
                rng.randint(1, 99),
                text(rng),
                amount(rng),
                number,
                text(rng),
                text(rng),
                legs,
            )
        )
    account_id = rng.randint(1, 10**6)
    accept = Accept(
        direction=direction,
        account_id=account_id,
        account_number=text(rng),
        chain=(account_id, *(rng.randint(1, 10**6) for _ in range(max(len(levels) - 1, 0)))),
        destination=text(rng),
        caller_id_number=text(rng),
        caller_id_name=text(rng),
        levels=levels,
        max_duration=rng.choice([0, 1, 91, 6000, 86_400]),
        routes=tuple(routes),
        did_id=rng.choice([None, None, 0, 42]),
        caller_id_changed=rng.random() < 0.3,
    )
    if rng.random() < 0.15:
        return accept  # decided without accounting: no ticket
    pricing = CallPricing(
        tuple(
            LevelPrice(lv.account_id, lv.account_number, lv.rate_id, lv.prefix, tariff(rng)) for lv in levels
        ),
        tuple(
            RoutePrice(
                r.trunk_id,
                r.trunk_name,
                r.provider_id,
                r.termination_prefix,
                tariff(rng),
                tuple(leg.gateway for leg in r.targets),
            )
            for r in routes
        ),
        rng.randint(0, 86_400),
    )
    decided_at = rng.choice([None, datetime(2026, 12, 6, 23, 53, 13, 727673, tzinfo=UTC)])
    if decided_at is not None:
        decided_at += timedelta(microseconds=rng.randint(0, 10**12))
    fields = {f.name: getattr(accept, f.name) for f in dataclasses.fields(accept)}
    return PricedAccept(**fields, pricing=pricing, decided_at=decided_at)


def random_key(rng: random.Random) -> bytes | None:
    return rng.choice([None, b"k" * 32, b"", b"x" * 100, rng.randbytes(rng.randint(1, 80))])


def random_uuid(rng: random.Random) -> str:
    # FreeSWITCH's UUIDs are UTF-8 text: no lone surrogate
    return rng.choice(["", "999ad8fa-90be-48ab-8c74-14aff0fe76fa", text(rng, 0.0).replace("\ud800", "")])


# --------------------------------------------------------------------------- the comparisons


def outcome(build: Any, *args: Any, **kwargs: Any) -> Any:
    """What ``build(...)`` returns, or the error it raises (a NUL in a dial string is refused)."""
    try:
        return build(*args, **kwargs)
    except ValueError as exc:
        return type(exc), str(exc)


def test_the_variables_and_the_batch_are_the_bytes_the_code_before_wrote() -> None:
    rng = random.Random(18_5)
    tickets = 0
    for _ in range(3_000):
        accept, key, uuid = random_accept(rng), random_key(rng), random_uuid(rng)
        guard = rng.choice([None, uuid, "not a uuid"])
        before = old_channel_variables(accept, key, uuid)
        assert render.channel_variables(accept, key, uuid) == before
        assert outcome(render.accept_batch, accept, key, uuid, guard_uuid=guard) == outcome(
            old_accept_batch, accept, key, uuid, guard_uuid=guard
        )
        code, reason = rng.choice([(403, "Forbidden"), (503, "Service Unavailable")])
        assert render.respond_batch(before, code, reason, guard_uuid=guard) == old_respond_batch(
            before, code, reason, guard_uuid=guard
        )
        tickets += TICKET_VARIABLE in dict(before)
    assert tickets > 2_000  # most accepts were priced: the ticket was compared


def test_the_ticket_is_the_text_the_code_before_encoded_and_signed_and_fsxml_reads_it() -> None:
    rng = random.Random(18_51)
    for _ in range(3_000):
        accept, key, uuid = random_accept(rng), random_key(rng), random_uuid(rng)
        value = ticket_value(accept, key, uuid)
        assert value == old_ticket_value(accept, key, uuid)
        ticket = ticket_of(accept)
        if ticket is None:
            assert value is None
            continue
        assert encode_ticket(ticket) == old_encode_ticket(ticket)
        assert value is not None and decode_ticket(value) == ticket
        if key is not None:
            assert verify_ticket(value, uuid, (b"other", key)) == old_encode_ticket(ticket)


def test_the_keyed_signature_is_hmac_sha256_for_any_key_and_text() -> None:
    rng = random.Random(18_52)
    keys = [rng.randbytes(rng.randint(0, 200)) for _ in range(40)]  # more keys than are kept keyed
    for _ in range(2_000):
        key = rng.choice(keys)
        message, uuid = text(rng, 0.0).replace("\ud800", "") * rng.randint(1, 50), random_uuid(rng)
        assert ticket_signature(message, uuid, key) == old_ticket_signature(message, uuid, key)


def old_sendmsg_execute(
    app: str, arg: str = "", *, uuid: str | None = None, event_lock: bool = False
) -> bytes:
    _check_token("app name", app)
    if "\x00" in arg:
        raise ValueError("app argument contains NUL")
    fields = [("call-command", "execute"), ("execute-app-name", app)]
    encoded = arg.encode()
    in_header = _fits_in_header(arg, encoded)
    if arg and in_header:
        fields.append(("execute-app-arg", arg))
    if event_lock:
        fields.append(("event-lock", "true"))
    if arg and not in_header:
        fields += [("Content-Type", "text/plain"), ("Content-Length", str(len(encoded)))]
        return _sendmsg(uuid, fields, encoded)
    return _sendmsg(uuid, fields)


def test_sendmsg_execute_writes_the_bytes_it_wrote_before_its_short_path() -> None:
    rng = random.Random(18_53)
    long = "x" * (MAX_HEADER_ARG_BYTES - 2)
    for _ in range(6_000):
        app = rng.choice(
            ["bridge", "multiset", "respond", "set", "hangup", "bad app", "", "a:b", text(rng, 0.0)]
        )
        arg = rng.choice(
            ["", "1", "sofia/gateway/a/1", " lead", "\tx", long, long + "é", long + "ab", text(rng, 0.2)]
        )
        uuid = rng.choice([None, None, "abc-1", "bad uuid"])
        lock = rng.random() < 0.2
        assert outcome(sendmsg_execute, app, arg, uuid=uuid, event_lock=lock) == outcome(
            old_sendmsg_execute, app, arg, uuid=uuid, event_lock=lock
        )


def old_dial_string(accept: Accept) -> str:
    parts: list[str] = []
    head = ""
    shared: tuple[object, ...] = ()
    for route in accept.routes:
        for leg in route.targets:
            if leg[1:] != shared or not head:
                head, shared = render._gateway_head(leg), leg[1:]
            parts.append(f"{head}{leg.gateway}/{leg.number}")
    if not parts:
        parts = [render.dial_target(leg) for leg in accept.bridge_targets]
    return "|".join(parts)


def test_the_dial_string_is_the_one_written_before_with_its_heads_kept_or_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(18_54)
    for limit in (4096, 3):  # kept, then dropped every few legs
        monkeypatch.setattr(render, "_MAX_HEADS", limit)
        render._HEADS.clear()
        for _ in range(2_000):
            accept = random_accept(rng)
            assert render.dial_string(accept) == old_dial_string(accept)
            assert len(render._HEADS) <= limit
