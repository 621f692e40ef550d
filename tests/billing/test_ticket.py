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
    BadTicket,
    BillingTicket,
    decode_ticket,
    encode_ticket,
    ticket_of,
    ticket_value,
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
    return priced(accept, pricing_for(accept, catalog), 91, catalog, NOW)


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


def _forged(items: list) -> str:
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
