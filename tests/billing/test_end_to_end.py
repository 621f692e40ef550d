"""A decided call, reserved, hung up (the real failover capture's CHANNEL_HANGUP_COMPLETE), settled in
Redis and written to PostgreSQL: CDR and balances exactly as computed by hand, reseller chain included."""

from __future__ import annotations

from decimal import Decimal

import psycopg
import redis

from engine.billing.calls import call_settlement, funds_levels, reject_settlement
from engine.billing.funds import Funds
from engine.billing.pricing import pricing_for
from engine.decision import Accept
from engine.sync.cdrs import CdrWriter
from tests.billing.captures import hangup_complete
from tests.billing.conftest import ledger_mismatches, make_account
from tests.rules.builders import World, run

D = Decimal


def test_failover_call_through_a_reseller_is_billed_exactly(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    world = World()
    b = world.b
    wholesale = b.group("Wholesale", trunks=(world.carrier_a,))
    b.rate(wholesale, "44", "0.06", connect_cost="0.01")
    reseller = b.reseller("2001", balance="50", rate_group=wholesale)
    customer = b.update(world.customer, reseller_id=reseller.id)
    carrier_b = b.trunk("carrier-b", b.gateway("gw-b"), world.provider)
    b.termination(carrier_b, "44", "0.055", connect_cost=D("0.005"))
    b.link(world.retail, carrier_b)
    b.link(wholesale, carrier_b)
    catalog = world.catalog()
    decision = run(catalog)
    assert isinstance(decision, Accept), decision
    assert [r.trunk_name for r in decision.routes] == ["carrier-a", "carrier-b"]

    make_account(db, "2001", "50", kind="reseller", id=reseller.id)
    make_account(db, "1001", "10", reseller_id=reseller.id, id=customer.id)
    funds = Funds(client, key_prefix)
    pricing = pricing_for(decision)
    reservation = funds.reserve("18cc36d6-9646-4b92-83d9-bfbb47c955b6", funds_levels(pricing, catalog), 3600)
    assert reservation.granted and reservation.seconds == 3600  # both can pay an hour

    # The capture: 3 billed seconds, carried by the 2nd leg of the dial string (carrier-b here).
    headers = hangup_complete("answered_gateway_failover_wire.txt")
    item, rated, end = call_settlement(headers, decision, pricing, catalog)
    assert end.carried_leg == 1
    assert rated.gateway == "gw-b"
    assert funds.settle(item) and not funds.settle(item)
    assert funds.account(customer.id).reserved == 0 == funds.account(reseller.id).reserved
    writer = CdrWriter(client, key_prefix, lambda: psycopg.connect(db_url), "w")
    while writer.process_once(0).entries:
        pass

    # by hand: customer 3 s at 0.10/min = 0.005; reseller 0.01 + 3 s at 0.06 = 0.013;
    # carrier-b 0.005 + 3 s at 0.055 = 0.00775; margin 0.013 - 0.00775 = 0.00525
    row = db.execute(
        "SELECT trunk_name, gateway, billsec, customer_debit, carrier_cost, margin, hangup_cause, chain"
        " FROM cdrs"
    ).fetchone()
    assert row == (
        "carrier-b",
        "gw-b",
        3,
        D("0.005"),
        D("0.00775"),
        D("0.00525"),
        "NORMAL_CLEARING",
        [customer.id, reseller.id],
    )
    balances: dict[str, Decimal] = dict(db.execute("SELECT number, balance FROM accounts").fetchall())
    assert balances == {"1001": D("9.995"), "2001": D("49.987")}
    assert ledger_mismatches(db) == []


def test_a_reject_gets_a_cdr_and_no_debit(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    from datetime import UTC, datetime

    account = make_account(db, "1001", "10")
    item = reject_settlement(
        "r-1",
        datetime.now(UTC),
        reason="DESTINATION_BLOCKED",
        sip_code=403,
        account_id=account,
        dialled="4420",
    )
    Funds(client, key_prefix).settle(item)
    writer = CdrWriter(client, key_prefix, lambda: psycopg.connect(db_url), "w")
    while writer.process_once(0).entries:
        pass
    assert db.execute("SELECT reject_reason, sip_code, billsec FROM cdrs").fetchone() == (
        "DESTINATION_BLOCKED",
        403,
        0,
    )
    assert db.execute("SELECT balance FROM accounts").fetchone() == (D("10"),)
