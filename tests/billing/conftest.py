"""Accounting fixtures: a migrated private database, accounts with an opening balance, CDR producers."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from engine.billing.funds import Funds, Settlement
from engine.db.migrate import migrate


@pytest.fixture
def db_url(fresh_pg_url: str) -> str:
    migrate(fresh_pg_url)
    return fresh_pg_url


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


def make_account(
    db: psycopg.Connection,
    number: str,
    balance: str,
    *,
    kind: str = "customer",
    reseller_id: int | None = None,
    **columns: Any,
) -> int:
    """An account whose opening balance is in the ledger (balance_changes kind 'initial')."""
    names = ["number", "kind", "reseller_id", "balance", *columns]
    values = [number, kind, reseller_id, Decimal(balance), *columns.values()]
    placeholders = ", ".join(["%s"] * len(values))
    overriding = "OVERRIDING SYSTEM VALUE" if "id" in columns else ""
    row = db.execute(
        f"INSERT INTO accounts ({', '.join(names)}) {overriding} VALUES ({placeholders}) RETURNING id", values
    ).fetchone()
    assert row is not None
    (account_id,) = row
    if Decimal(balance) != 0:
        db.execute(
            "INSERT INTO balance_changes (account_id, at, kind, amount, balance_after, currency, actor)"
            " VALUES (%s, %s, 'initial', %s, %s, 'USD', 'test')",
            [account_id, BASE - timedelta(days=1), Decimal(balance), Decimal(balance)],
        )
    return account_id


_counter = itertools.count(1)
BASE = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def cdr(
    uuid: str, debits: list[tuple[int, str]], *, started: datetime | None = None, billsec: int = 60
) -> dict:
    """A CDR record as the engine writes it: ``debits`` = (account id, amount) from the caller up."""
    started = started or BASE + timedelta(seconds=next(_counter))
    return {
        "v": 1,
        "uuid": uuid,
        "started_at": started.isoformat(),
        "answered_at": (started + timedelta(seconds=1)).isoformat(),
        "ended_at": (started + timedelta(seconds=1 + billsec)).isoformat(),
        "account_id": debits[0][0] if debits else None,
        "chain": [a for a, _ in debits],
        "direction": "outbound",
        "billsec": billsec,
        "customer_debit": debits[0][1] if debits else "0",
        "carrier_cost": "0.01",
        "margin": "0",
        "hangup_cause": "NORMAL_CLEARING",
        "notes": [],
        "debits": [[a, level, amount] for level, (a, amount) in enumerate(debits)],
    }


def settlement(uuid: str, debits: list[tuple[int, str]], **kwargs: Any) -> Settlement:
    return Settlement(
        uuid, tuple((a, Decimal(0), Decimal(x)) for a, x in debits), cdr(uuid, debits, **kwargs)
    )


def settle_all(funds: Funds, items: list[Settlement], chunk: int = 500) -> None:
    for i in range(0, len(items), chunk):
        funds.settle_many(items[i : i + chunk])


def ledger_mismatches(db: psycopg.Connection) -> list[tuple]:
    return db.execute("SELECT * FROM ledger_mismatches").fetchall()
