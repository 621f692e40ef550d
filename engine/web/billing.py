"""The account page's accounting tabs: CDRs (filter, totals, export), the statement, e-mails.

They call the accounting module's service functions (engine.billing.statement) with the
signed-in user's scope, the same scope the rest of customer management uses: a reseller sees its
subtree only, and its CDR rows carry its own cost, never the carrier's. Where the accounting
module is not installed, :data:`AVAILABLE` is False and the tabs say so.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

import psycopg

try:  # the accounting module lands on its own branch; the web admin runs with or without it
    billing: Any = importlib.import_module("engine.billing.statement")
except ImportError:  # pragma: no cover - depends on the installation
    billing = None

AVAILABLE = billing is not None
DIRECTIONS = ("outbound", "inbound", "local")
CDR_PAGE_SIZE = 50
# The CDR columns the tab's table shows (the CSV has them all).
SHOWN_COLUMNS = (
    "started_at", "direction", "caller_id_number", "dialled", "billsec", "customer_debit", "reseller_cost",
    "carrier_cost", "margin", "hangup_cause", "sip_code", "reject_reason",
)  # fmt: skip


@dataclass(frozen=True)
class CdrForm:
    """The CDR tab's filter as typed (shown back), and what is wrong with it."""

    values: Mapping[str, str]
    problem: str = ""


def _day(text: str, name: str) -> datetime | None:
    """A YYYY-MM-DD (or ISO date-time) filter value; ValueError naming the field."""
    text = text.strip()
    if not text:
        return None
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time())
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{name}: expected a date such as 2026-12-01") from None


def _yes_no(text: str) -> bool | None:
    return {"yes": True, "no": False}.get(text)


def cdr_filter(number: str, args: Mapping[str, str]) -> tuple[Any, CdrForm]:
    """The accounting module's CdrFilter for the account `number` from the tab's query string."""
    values = {k: args.get(k, "")[:64] for k in ("since", "until", "direction", "answered", "rejected",
                                                  "prefix", "cause")}  # fmt: skip
    try:
        since = _day(values["since"], "Since")
        until = _day(values["until"], "Until")
    except ValueError as exc:
        return None, CdrForm(values, str(exc))
    if until is not None and len(values["until"].strip()) == 10:
        if until.date() >= date.max - timedelta(days=1):
            return None, CdrForm(values, "Until: expected a date such as 2026-12-01")
        until += timedelta(days=1)  # "until 2026-12-01" includes that day
    prefix = values["prefix"].strip()
    if prefix and not all(c.isdigit() or c in "*#+" for c in prefix):
        return None, CdrForm(values, "Number begins with: digits only")
    found = billing.CdrFilter(
        account_number=number,
        start=since,
        end=until,
        direction=values["direction"] if values["direction"] in DIRECTIONS else None,
        answered=_yes_no(values["answered"]),
        rejected=_yes_no(values["rejected"]),
        destination_prefix=prefix or None,
        hangup_cause=values["cause"].strip().upper() or None,
    )
    return found, CdrForm(values)


def scope(reseller_id: int | None) -> Any:
    return billing.Scope(reseller_id=reseller_id)


def list_cdrs(conn: psycopg.Connection[Any], reseller_id: int | None, f: Any, page: int) -> Any:
    return billing.list_cdrs(conn, scope(reseller_id), f, page=page, page_size=CDR_PAGE_SIZE)


def columns(reseller_id: int | None) -> list[str]:
    shown: tuple[str, ...] = billing.columns(scope(reseller_id))
    return [c for c in SHOWN_COLUMNS if c in shown]


def cdr_csv(conn: psycopg.Connection[Any], reseller_id: int | None, f: Any) -> Any:
    return billing.cdr_csv(conn, scope(reseller_id), f)


def statement(conn: psycopg.Connection[Any], reseller_id: int | None, number: str,
              since: datetime | None, until: datetime | None) -> Any:  # fmt: skip
    return billing.statement(conn, scope(reseller_id), number, start=since, end=until)


def email_log(conn: psycopg.Connection[Any], reseller_id: int | None, number: str) -> Any:
    return billing.email_log(conn, scope(reseller_id), number)


def not_found_type() -> type[Exception]:
    found: type[Exception] = billing.NotFound if AVAILABLE else LookupError
    return found
