"""The billing ticket (engine.billing.ticket): written on the channel at the decision, read back from
FreeSWITCH's CDR post; the post's settlement equals the engine's own, to the CDR field (pure)."""

from __future__ import annotations

import base64
import json
import string
from decimal import Decimal

import pytest

from engine.billing.calls import call_settlement, ticket_settlement
from engine.billing.live import PricedAccept, priced
from engine.billing.pricing import pricing_for
from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.billing.ticket import (
    TICKET_VARIABLE,
    BadSignature,
    BadTicket,
    BillingTicket,
    decode_ticket,
    encode_ticket,
    ticket_of,
    ticket_signature,
    ticket_value,
    verify_ticket,
)
from engine.call.render import channel_variables
from engine.decision import Accept
from engine.esl.commands import MULTISET_DELIMITERS
from tests.billing.captures import hangup_complete
from tests.rules.builders import NOW, World, run

D = Decimal
ALPHABET = set(string.ascii_letters + string.digits + "-_.")


def priced_accept(world: World | None = None) -> PricedAccept:
    world = world or World()
    reseller = world.b.reseller("2001", balance="50", rate_group=world.retail)
    world.b.update(world.customer, reseller_id=reseller.id)
    catalog = world.catalog()
    accept = run(catalog)
    assert isinstance(accept, Accept)
    return priced(accept, pricing_for(accept), 91, NOW)


def hostile_ticket() -> BillingTicket:
    tariff = Tariff(D("0.0132"), D("0.02"), 6, 30, 6)
    level = LevelPrice(7, "1000000007", 11, "44", tariff)
    route = RoutePrice(3, 'carrier "$${x}" |,;#', 9, "4420", Tariff(D("1E-3")), ("gw-a", "gw/b{c}"))
    return BillingTicket(
        7,
        "1000000007",
        (7, 2),
        "outbound",
        "Zoë ${hangup} \u2028",
        "442071234567",
        NOW,
        CallPricing((level,), (route,), 91),
    )


def test_a_ticket_round_trips_exactly_and_only_in_a_harmless_alphabet() -> None:
    ticket = ticket_of(priced_accept())
    assert ticket is not None and ticket.chain[0] == ticket.account_id and len(ticket.chain) == 2
    for original in (ticket, hostile_ticket()):
        text = encode_ticket(original)
        # nothing FreeSWITCH expands ($, {), no multiset separator, no comma or space
        assert set(text) <= ALPHABET, text
        assert not set(text) & set(MULTISET_DELIMITERS)
        assert decode_ticket(text) == original
    assert len(encode_ticket(ticket)) < 600


def test_the_engine_writes_the_ticket_with_its_decision_and_only_for_a_priced_call() -> None:
    decided = priced_accept()
    variables = dict(channel_variables(decided))
    assert decode_ticket(variables[TICKET_VARIABLE]) == ticket_of(decided)
    plain = Accept(**{f: getattr(decided, f) for f in Accept.__dataclass_fields__})
    assert ticket_value(plain) is None  # decided without accounting: nothing to bill a post on
    assert TICKET_VARIABLE not in dict(channel_variables(plain))


def test_the_posts_settlement_is_the_engines_to_the_last_field() -> None:
    """Same hangup facts + the ticket = the same debits and the same CDR as the engine's hangup."""
    world = World()
    decided = priced_accept(world)
    catalog = world.catalog()
    for capture in (
        "answered_gateway_failover_wire.txt",
        "allotted_timeout_wire.txt",
        "caller_cancels_wire.txt",
    ):
        headers = hangup_complete(capture)
        assert decided.pricing is not None
        engine, engine_rated, _ = call_settlement(
            headers, decided, decided.pricing, catalog, decided_at=decided.decided_at
        )
        ticket = decode_ticket(ticket_value(decided) or "")
        recorded = {a: catalog.accounts[a].calls_debited for a in decided.chain}
        post, post_rated, _ = ticket_settlement(headers, ticket, recorded.__getitem__)
        assert post == engine, capture
        assert post_rated == engine_rated
    assert engine_rated.debits  # the last one, at least, was rated per level


def _forged(items: object) -> str:
    raw = json.dumps(items, separators=(",", ":")).encode()
    return "1." + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


GOOD = [
    7,
    "1000000007",
    [7],
    "outbound",
    "",
    "44",
    None,
    60,
    [[7, "1000000007", 1, "44", "0.6", "0", 0, 1, 1]],
    [],
]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "version"),
        ("2." + _forged(GOOD)[2:], "version"),
        ("1.!!!!", "base64"),
        ("1." + base64.urlsafe_b64encode(b"\xff\xfe").decode(), "base64"),
        (_forged({"a": 1}), "list"),
        (_forged(GOOD[:9]), "list"),
        (_forged([*GOOD[:8], [[7, "1000000007", 1, "44", "-0.6", "0", 0, 1, 1]], []]), "amount"),
        (_forged([*GOOD[:8], [[7, "1000000007", 1, "44", "NaN", "0", 0, 1, 1]], []]), "amount"),
        (_forged([*GOOD[:8], [[7, "1000000007", 1, "44", "1e99", "0", 0, 1, 1]], []]), "amount"),
        (_forged([*GOOD[:8], [[7, "1000000007", 1, "44", 0.6, "0", 0, 1, 1]], []]), "decimal"),
        (_forged([*GOOD[:8], [[True, "1000000007", 1, "44", "0.6", "0", 0, 1, 1]], []]), "integer"),
        (_forged([*GOOD[:8], [[7, "1000000007", 1, "44", "0.6", "0", 0, 1, -1]], []]), "integer"),
        (_forged([8, *GOOD[1:]]), "chain"),
        (_forged([7, "n", [], *GOOD[3:]]), "chain"),
        (_forged([*GOOD[:6], "yesterday", *GOOD[7:]]), "integer"),
        ("1." + "A" * 20_000, "too long"),
    ],
)
def test_anything_but_a_ticket_is_refused_with_a_reason(text: str, why: str) -> None:
    assert decode_ticket(_forged(GOOD)).account_id == 7
    with pytest.raises(BadTicket, match=why):
        decode_ticket(text)


KEY = b"k" * 32
OLD_KEY = b"o" * 32


def test_a_signed_ticket_verifies_only_for_its_call_under_a_configured_key() -> None:
    decided = priced_accept()
    signed = ticket_value(decided, KEY, "call-1")
    assert signed is not None and set(signed) <= ALPHABET
    unsigned = ticket_value(decided)
    assert unsigned is not None
    assert signed.startswith(unsigned + ".") and len(signed) == len(unsigned) + 44
    assert verify_ticket(signed, "call-1", (KEY,)) == unsigned
    assert decode_ticket(signed) == decode_ticket(unsigned)  # the signature is not part of the ticket
    assert verify_ticket(signed, "call-1", (b"n" * 32, KEY)) == unsigned  # any listed key (rotation)
    signed_before = ticket_value(decided, OLD_KEY, "call-1")
    assert signed_before is not None
    refused = [
        (signed, "call-2"),  # a genuine ticket copied onto another call's CDR
        (unsigned, "call-1"),  # the signature stripped
        (signed_before, "call-1"),  # a key no longer listed
        (unsigned + "." + signed.rpartition(".")[2][:-2] + "AA", "call-1"),  # altered signature
    ]
    body = json.loads(base64.urlsafe_b64decode(unsigned[2:] + "=" * (-len(unsigned[2:]) % 4)))
    body[8][0][4] = "0"  # free calls for the customer, keeping the engine's signature
    forged = "1." + base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    refused.append((forged + "." + signed.rpartition(".")[2], "call-1"))
    refused.append(("1.Zöë.çç", "call-1"))  # not ASCII: refused, not a crash
    for text, uuid in refused:
        with pytest.raises(BadSignature):
            verify_ticket(text, uuid, (KEY,))
    # Without keys nothing is checked: signed and unsigned tickets alike decode.
    assert verify_ticket(signed, "other", ()) == unsigned == verify_ticket(unsigned, "other", ())
    with pytest.raises(BadTicket):
        verify_ticket("1." + "A" * 20_000, "call-1", (KEY,))


def test_the_engine_signs_the_ticket_it_writes_for_the_calls_uuid() -> None:
    decided = priced_accept()
    variables = dict(channel_variables(decided, KEY, "the-call"))
    assert verify_ticket(variables[TICKET_VARIABLE], "the-call", (KEY,)) == ticket_value(decided)
    assert KEY.decode() not in "".join(variables.values())
    assert "." not in dict(channel_variables(decided))[TICKET_VARIABLE][2:]  # no key: unsigned


def test_signing_costs_microseconds_per_call() -> None:
    """Not a timed assert: prints the measurement the docs quote (run with -s)."""
    import timeit

    decided = priced_accept()
    text = ticket_value(decided) or ""
    uuid = "8d3c7d5e-1f0a-4e8b-9a51-6f1c2b3d4e5f"
    runs = 20_000
    for name, call in (
        ("unsigned", lambda: ticket_value(decided)),
        ("signed", lambda: ticket_value(decided, KEY, uuid)),
        ("the signature alone", lambda: ticket_signature(text, uuid, KEY)),
    ):
        best = min(timeit.repeat(call, number=runs, repeat=5)) / runs
        print(f"ticket_value {name}: {best * 1e6:.2f} µs per call (best of 5 x {runs})")


def test_the_call_session_signs_with_the_configured_key_for_the_channels_uuid() -> None:
    import dataclasses
    import re

    from engine.call.session import CallSession, Send
    from engine.config import BillingSettings, Config, rules_config
    from engine.decision import DEFAULT_SIP_RESPONSES
    from engine.metrics import EngineMetrics
    from tests.call.test_session import SETTINGS, channel_data

    session = CallSession(dataclasses.replace(SETTINGS, ticket_key=KEY), DEFAULT_SIP_RESPONSES.__getitem__)
    session.start()
    session.frame(channel_data())
    assert session.request is not None
    [send] = [a for a in session.decided(priced_accept(), holds_slots=True) if isinstance(a, Send)]
    [value] = re.findall(rb"callgate_bill=([A-Za-z0-9_.-]+)", send.data)
    assert verify_ticket(value.decode(), session.request.uuid, (KEY,))
    assert KEY not in send.data

    # The engine takes the first of [billing] ticket_keys; none configured: no key.
    from engine.call.driver import CallHandler

    config = Config(billing=BillingSettings(ticket_keys=("n" * 32, "o" * 32)))
    handler = CallHandler(config, lambda *_: None, EngineMetrics(), rules_config(config.rules))  # type: ignore[arg-type]
    assert handler._settings.ticket_key == b"n" * 32
    plain = CallHandler(Config(), lambda *_: None, EngineMetrics(), rules_config(Config().rules))  # type: ignore[arg-type]
    assert plain._settings.ticket_key is None


def test_ticket_keys_never_appear_in_configuration_output_or_errors(
    tmp_path: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from engine.billing.ticket import log_ticket_signing
    from engine.config import BillingSettings, Config, ConfigError, load_config

    secret = "s3cret-" + "x" * 30
    config = load_config(
        None, {"CALLGATE_CONFIG": "/dev/null", "CALLGATE_BILLING__TICKET_KEYS": f"{secret},{'y' * 32}"}
    )
    assert config.billing.ticket_keys == (secret, "y" * 32)
    assert secret not in repr(config) and secret not in str(config.billing)
    for bad in ({"CALLGATE_BILLING__TICKET_KEYS": "short-" + secret[:10]},):
        with pytest.raises(ConfigError) as raised:
            load_config(None, {"CALLGATE_CONFIG": "/dev/null", **bad})
        assert secret[:10] not in str(raised.value) and "32 characters" in str(raised.value)
    with pytest.raises(ConfigError, match="twice"):
        BillingSettings(ticket_keys=(secret, secret))
    toml = tmp_path / "callgate.toml"  # type: ignore[operator]
    toml.write_text(f'[billing]\nticket_keys = "{secret}"\n')  # a string, not a list
    with pytest.raises(ConfigError) as raised:
        load_config(toml, {})
    assert secret not in str(raised.value) and "not shown" in str(raised.value)
    with caplog.at_level(logging.INFO):
        log_ticket_signing(logging.getLogger("t"), config.billing.ticket_keys, "the engine writes")
        log_ticket_signing(logging.getLogger("t"), Config().billing.ticket_keys, "the engine writes")
    assert "2 key(s)" in caplog.text and "unsigned" in caplog.text and secret not in caplog.text
