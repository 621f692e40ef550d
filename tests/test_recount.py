"""Re-counting lost acquires, the pure parts: which live calls are candidates, and what a call's
channel variables say it counted and reserved (engine.recount; docs/high-availability.md)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.billing.ticket import BadSignature, BadTicket, BillingTicket, encode_ticket, ticket_signature
from engine.reconcile import LiveChannels, parse_live_channels, parse_show_channels
from engine.recount import CallVariables, RecountRequest, recount_candidates, recount_request

D = Decimal
KEY = b"k" * 32
DECIDED = datetime(2026, 12, 6, 18, 0, 0, 250_000, tzinfo=UTC)
CUSTOMER = Tariff(D("1.20"), D("0.05"), 0, 60, 6)
RESELLER = Tariff(D("0.90"), init_inc=30, inc=6)


def ticket_text(
    *, chain: tuple[int, ...] = (11, 4), trunks: tuple[int, ...] = (7, 8), decided: datetime | None = DECIDED
) -> str:
    levels = tuple(
        LevelPrice(account_id, f"100000{account_id}", 90 + n, "44", (CUSTOMER, RESELLER)[min(n, 1)])
        for n, account_id in enumerate(chain)
    )
    routes = tuple(
        RoutePrice(trunk_id, f"trunk-{trunk_id}", 3, "", Tariff(D("0.10")), ("gw-a",)) for trunk_id in trunks
    )
    ticket = BillingTicket(
        account_id=chain[0],
        account_number=f"100000{chain[0]}",
        chain=chain,
        direction="outbound",
        caller_id_name="Alice",
        translated="441234567890",
        decided_at=decided,
        pricing=CallPricing(levels, routes, 3600),
    )
    return encode_ticket(ticket)


# --------------------------------------------------------------------------- candidates


def test_candidates_are_the_inbound_legs_the_registry_does_not_count() -> None:
    counted = {"a-counted": 1.0, "gone": 2.0}
    assert recount_candidates({"a-counted", "a-lost", "b-lost"}, counted) == ["a-lost", "b-lost"]
    assert recount_candidates({"a-counted"}, counted) == []
    assert recount_candidates(set(), {}) == []


def test_the_listing_sets_the_inbound_legs_apart() -> None:
    text = (
        "uuid|direction|created|name|state\n"
        "a-1|inbound|2026-12-06 18:00:00|sofia/internal/1000|CS_EXECUTE\n"
        "b-1|outbound|2026-12-06 18:00:01|sofia/gateway/gw-a/44|CS_EXCHANGE_MEDIA\n"
        "a-2|inbound|2026-12-06 18:00:02|sofia/internal/1001|CS_EXECUTE\n"
        "\n3 total.\n"
    )
    live = parse_live_channels(text)
    assert live == {"a-1", "b-1", "a-2"} == parse_show_channels(text)
    assert live.inbound == {"a-1", "a-2"}
    # A listing without a direction column: every leg is a candidate (the ticket decides).
    bare = parse_live_channels("uuid,name\nx,sofia/internal/1\ny,sofia/gateway/g/2\n\n2 total.\n")
    assert bare.inbound == {"x", "y"}
    empty = parse_live_channels("\n0 total.\n")
    assert empty == LiveChannels() and not empty.inbound


# --------------------------------------------------------------------------- the request


def test_the_request_is_what_the_acquire_counted_and_reserved() -> None:
    request = recount_request("a-lost", CallVariables(ticket_text(), "21"))
    assert request == RecountRequest(
        uuid="a-lost",
        chain=(11, 4),
        did_id=21,
        trunk_id=7,  # the first route's trunk: the one the acquire counted when it is limited
        max_duration=3600,
        decided_ms=round(DECIDED.timestamp() * 1000),
        tariffs=(CUSTOMER, RESELLER),
    )


def test_a_request_without_did_routes_or_decision_time() -> None:
    request = recount_request("u", CallVariables(ticket_text(chain=(5,), trunks=(), decided=None), None))
    assert request is not None
    assert (request.chain, request.did_id, request.trunk_id, request.decided_ms) == ((5,), None, None, None)


def test_a_call_without_a_ticket_cannot_be_recounted() -> None:
    assert recount_request("u", CallVariables(None, "21")) is None


def test_signed_tickets_are_verified_for_the_call_they_were_signed_for() -> None:
    text = ticket_text()
    signed = text + "." + ticket_signature(text, "a-lost", KEY)
    assert recount_request("a-lost", CallVariables(signed, None), (KEY,)) is not None
    with pytest.raises(BadSignature):  # a genuine ticket copied onto another channel
        recount_request("other", CallVariables(signed, None), (KEY,))
    with pytest.raises(BadSignature):
        recount_request("a-lost", CallVariables(text, None), (KEY,))


@pytest.mark.parametrize(
    ("variables", "error"),
    [
        (CallVariables("1.bm90IGEgdGlja2V0", None), BadTicket),
        (CallVariables("garbage", None), BadTicket),
        (CallVariables(ticket_text(), "21; DROP"), ValueError),
        (CallVariables(ticket_text(), "-3"), ValueError),
    ],
)
def test_unusable_variables_are_refused(variables: CallVariables, error: type[Exception]) -> None:
    with pytest.raises(error):
        recount_request("u", variables)
