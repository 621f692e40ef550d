"""CDR list / CSV export / statements: filters, pagination, totals, reseller scope, running balance."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
import redis

from engine.billing.funds import Funds
from engine.billing.statement import CdrFilter, NotFound, Scope, cdr_csv, list_cdrs, statement
from engine.sync.cdrs import CdrWriter
from tests.billing.conftest import BASE, make_account, settle_all, settlement

D = Decimal


@pytest.fixture
def world(db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str) -> dict[str, int]:
    reseller = make_account(db, "700", "100", kind="reseller")
    mine = make_account(db, "701", "20", reseller_id=reseller)
    other = make_account(db, "702", "30")
    items = [
        settlement(f"m{i}", [(mine, "0.50"), (reseller, "0.20")], started=BASE + timedelta(minutes=i))
        for i in range(5)
    ]
    items += [
        settlement(f"o{i}", [(other, "1.00")], started=BASE + timedelta(minutes=10 + i)) for i in range(3)
    ]
    for item in items:
        record = dict(item.cdr)
        record["account_number"] = "701" if item.uuid.startswith("m") else "702"
        record["dialled"] = "=HYPERLINK(1)" if item.uuid == "m0" else "4420"
        object.__setattr__(item, "cdr", record)
    settle_all(Funds(client, key_prefix), items)
    writer = CdrWriter(client, key_prefix, lambda: psycopg.connect(db_url), "w")
    while writer.process_once(0).entries:
        pass
    return {"reseller": reseller, "mine": mine, "other": other}


def test_admin_sees_every_cdr_with_totals_and_pages(db: psycopg.Connection, world: dict[str, int]) -> None:
    page = list_cdrs(db, Scope(), CdrFilter(), page=1, page_size=3)
    assert page.total == 8
    assert len(page.rows) == 3
    assert page.rows[0]["uuid"] == "o2"  # newest first
    assert page.totals["customer_debit"] == D("5.50")
    assert page.totals["carrier_cost"] == D("0.08")
    assert list_cdrs(db, Scope(), CdrFilter(), page=3, page_size=3).rows[-1]["uuid"] == "m0"
    only = list_cdrs(db, Scope(), CdrFilter(account_number="702", start=BASE + timedelta(minutes=11)))
    assert [r["uuid"] for r in only.rows] == ["o2", "o1"]


def test_a_reseller_sees_its_subtree_and_its_own_cost_only(
    db: psycopg.Connection, world: dict[str, int]
) -> None:
    scope = Scope(world["reseller"])
    page = list_cdrs(db, scope, CdrFilter())
    assert page.total == 5
    assert {r["uuid"][0] for r in page.rows} == {"m"}
    assert all(r["reseller_cost"] == D("0.20") for r in page.rows)
    assert not {"carrier_cost", "margin", "gateway", "trunk_name"} & set(page.rows[0])
    assert "carrier_cost" not in page.totals
    assert list_cdrs(db, scope, CdrFilter(account_number="702")).total == 0
    with pytest.raises(NotFound):
        statement(db, scope, "702")


def test_csv_export_streams_every_row_and_defuses_formulas(
    db: psycopg.Connection, world: dict[str, int]
) -> None:
    text = "".join(cdr_csv(db, Scope(world["reseller"]), CdrFilter(), chunk=2))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["uuid"] for r in rows] == ["m0", "m1", "m2", "m3", "m4"]
    assert rows[0]["dialled"] == "'=HYPERLINK(1)"
    assert "carrier_cost" not in rows[0]
    assert rows[0]["customer_debit"] == "0.500000"


def test_statement_is_one_ledger_with_a_running_balance(
    db: psycopg.Connection, world: dict[str, int]
) -> None:
    with db.transaction():
        db.execute("UPDATE accounts SET balance = balance + 5 WHERE id = %s", [world["mine"]])
        db.execute(
            "INSERT INTO balance_changes (account_id, at, kind, amount, balance_after, currency, actor)"
            " VALUES (%s, %s, 'refill', 5, 22.5, 'USD', 'test')",
            [world["mine"], BASE + timedelta(minutes=2, seconds=30)],
        )
    s = statement(db, Scope(world["reseller"]), "701")
    assert [line.kind for line in s.lines] == ["initial", "call", "call", "refill", "call", "call", "call"]
    assert s.unexplained == 0
    assert s.closing == s.balance == D("22.5")
    running = s.opening
    for line in s.lines:
        running += line.amount
        assert line.balance == running
    later = statement(db, Scope(), "701", start=BASE + timedelta(minutes=3))
    assert [line.kind for line in later.lines] == ["call", "call", "call"]  # calls end 61 s after they start
    assert later.opening == D("24")  # 20 + 5 - 2 calls x 0.50
