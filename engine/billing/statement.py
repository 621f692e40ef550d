"""CDR queries and account statements (service functions for the CLI and the HTTP API).

Scope, as in the rest of customer management (engine.admin): the admin sees everything; a
reseller sees only the accounts of its subtree, and an account outside the scope is reported
as not found, exactly like one that does not exist. A reseller never sees what the levels
above it paid or what the carrier cost: its CDR rows carry its own cost (``reseller_cost``:
its debit for the call) instead of the carrier cost and margin.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

__all__ = [
    "CdrFilter",
    "CdrPage",
    "EmailLogEntry",
    "NotFound",
    "Scope",
    "Statement",
    "StatementLine",
    "cdr_csv",
    "email_log",
    "list_cdrs",
    "statement",
]

_ZERO = Decimal("0.000000")
MAX_PAGE_SIZE = 1000


class NotFound(LookupError):
    pass


@dataclass(frozen=True, slots=True)
class Scope:
    reseller_id: int | None = None  # None = the admin

    @property
    def is_admin(self) -> bool:
        return self.reseller_id is None

    def accounts(self, column: str) -> sql.Composable:
        """``column IN (the subtree)`` for a reseller; TRUE for the admin."""
        if self.reseller_id is None:
            return sql.SQL("TRUE")
        return sql.SQL(
            "{col} IN (WITH RECURSIVE subtree(id) AS ("
            " SELECT id FROM accounts WHERE reseller_id = {r}"
            " UNION SELECT c.id FROM accounts c JOIN subtree t ON c.reseller_id = t.id)"
            " SELECT id FROM subtree)"
        ).format(col=sql.SQL(column), r=sql.Literal(self.reseller_id))


@dataclass(frozen=True, slots=True)
class CdrFilter:
    account_number: str | None = None
    start: datetime | None = None  # started_at >= start
    end: datetime | None = None  # started_at < end
    direction: str | None = None
    answered: bool | None = None  # True: billsec > 0; False: not
    rejected: bool | None = None  # True: reject_reason set
    destination_prefix: str | None = None  # on the dialled number
    hangup_cause: str | None = None


@dataclass(frozen=True, slots=True)
class CdrPage:
    rows: list[dict[str, Any]]
    page: int
    page_size: int
    total: int
    totals: dict[str, Any] = field(default_factory=dict)


_ADMIN_COLUMNS = (
    "uuid",
    "started_at",
    "answered_at",
    "ended_at",
    "account_number",
    "direction",
    "caller_id_number",
    "dialled",
    "translated",
    "rate_prefix",
    "rate_cost_per_minute",
    "trunk_name",
    "gateway",
    "provider_id",
    "carrier_prefix",
    "carrier_cost_per_minute",
    "billsec",
    "duration",
    "customer_debit",
    "carrier_cost",
    "margin",
    "hangup_cause",
    "sip_code",
    "reject_reason",
    "disposition",
)
_HIDDEN_FROM_RESELLERS = {
    "trunk_name",
    "gateway",
    "provider_id",
    "carrier_prefix",
    "carrier_cost_per_minute",
    "carrier_cost",
    "margin",
}


def columns(scope: Scope) -> tuple[str, ...]:
    if scope.is_admin:
        return _ADMIN_COLUMNS
    return (*(c for c in _ADMIN_COLUMNS if c not in _HIDDEN_FROM_RESELLERS), "reseller_cost")


def _where(scope: Scope, f: CdrFilter) -> tuple[sql.Composable, list[Any]]:
    parts: list[sql.Composable] = [scope.accounts("c.account_id")]
    params: list[Any] = []
    if f.account_number is not None:
        parts.append(sql.SQL("c.account_number = %s"))
        params.append(f.account_number)
    if f.start is not None:
        parts.append(sql.SQL("c.started_at >= %s"))
        params.append(f.start)
    if f.end is not None:
        parts.append(sql.SQL("c.started_at < %s"))
        params.append(f.end)
    if f.direction is not None:
        parts.append(sql.SQL("c.direction = %s"))
        params.append(f.direction)
    if f.answered is not None:
        parts.append(sql.SQL("c.billsec > 0" if f.answered else "c.billsec = 0"))
    if f.rejected is not None:
        parts.append(sql.SQL("c.reject_reason IS NOT NULL" if f.rejected else "c.reject_reason IS NULL"))
    if f.destination_prefix:
        parts.append(sql.SQL("c.dialled LIKE %s"))
        params.append(f.destination_prefix.replace("\\", "").replace("%", "").replace("_", "") + "%")
    if f.hangup_cause is not None:
        parts.append(sql.SQL("c.hangup_cause = %s"))
        params.append(f.hangup_cause)
    return sql.SQL(" AND ").join(parts), params


def _select(scope: Scope) -> sql.Composable:
    cols = [sql.SQL("c.{}").format(sql.Identifier(c)) for c in columns(scope) if c != "reseller_cost"]
    if not scope.is_admin:
        cols.append(
            sql.SQL(
                "(SELECT d.amount FROM call_debits d WHERE d.uuid = c.uuid AND d.started_at = c.started_at"
                " AND d.account_id = {r}) AS reseller_cost"
            ).format(r=sql.Literal(scope.reseller_id))
        )
    return sql.SQL(", ").join(cols)


def list_cdrs(
    conn: psycopg.Connection[Any], scope: Scope, f: CdrFilter, *, page: int = 1, page_size: int = 50
) -> CdrPage:
    """One page of CDRs, newest first, with the count and money totals of the whole selection."""
    page = max(1, page)
    page_size = min(MAX_PAGE_SIZE, max(1, page_size))
    where, params = _where(scope, f)
    money = (
        "coalesce(sum(c.customer_debit), 0) AS customer_debit,"
        " coalesce(sum(c.carrier_cost), 0) AS carrier_cost, coalesce(sum(c.margin), 0) AS margin"
        if scope.is_admin
        else "coalesce(sum(c.customer_debit), 0) AS customer_debit"
    )
    totals_query = sql.SQL(
        "SELECT count(*) AS calls, count(*) FILTER (WHERE c.billsec > 0) AS answered,"
        " coalesce(sum(c.billsec), 0) AS billsec, " + money + " FROM cdrs c WHERE {}"
    ).format(where)
    rows_query = sql.SQL(
        "SELECT {} FROM cdrs c WHERE {} ORDER BY c.started_at DESC, c.uuid LIMIT %s OFFSET %s"
    ).format(_select(scope), where)
    with conn.cursor(row_factory=dict_row) as cur:
        totals = cur.execute(totals_query, params).fetchone() or {}
        rows = cur.execute(rows_query, [*params, page_size, (page - 1) * page_size]).fetchall()
    return CdrPage(rows, page, page_size, int(totals.get("calls", 0)), dict(totals))


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    # Spreadsheet formula injection: a cell starting with = + - @ is read as a formula.
    if text[:1] in ("=", "+", "-", "@") and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        Decimal(text)
    except ArithmeticError:
        return False
    return True


def cdr_csv(conn: psycopg.Connection[Any], scope: Scope, f: CdrFilter, *, chunk: int = 5000) -> Iterator[str]:
    """The whole selection as CSV text, streamed from a server-side cursor (constant memory)."""
    names = columns(scope)
    where, params = _where(scope, f)
    query = sql.SQL("SELECT {} FROM cdrs c WHERE {} ORDER BY c.started_at, c.uuid").format(
        _select(scope), where
    )
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(names)
    yield buffer.getvalue()
    with conn.transaction(), conn.cursor(name="callgate_cdr_export") as cur:
        cur.itersize = chunk
        cur.execute(query, params)
        for row in cur:
            buffer.seek(0)
            buffer.truncate()
            out.writerow([_csv_value(v) for v in row])
            yield buffer.getvalue()


# --------------------------------------------------------------------------- statements


@dataclass(frozen=True, slots=True)
class StatementLine:
    at: datetime
    kind: str  # initial, refill, charge, call
    description: str
    reference: str
    amount: Decimal  # signed from the account's side: + credits it, - debits it
    balance: Decimal  # the running balance after this line


@dataclass(frozen=True, slots=True)
class Statement:
    account_number: str
    currency: str
    opening: Decimal  # the balance before the first line shown
    lines: list[StatementLine]
    closing: Decimal  # after the last line shown
    balance: Decimal  # the account's balance now
    unexplained: Decimal  # balance - (all ledger entries): 0 when the ledger equation holds


_STATEMENT = """
WITH entries AS (
    SELECT b.at, b.kind, b.amount, b.description, b.reference, b.id::text AS ref
      FROM balance_changes b WHERE b.account_id = %(id)s
    UNION ALL
    SELECT coalesce(c.ended_at, d.started_at), 'call', -d.amount,
           concat('call to ', coalesce(c.dialled, '?'), ' (', coalesce(c.billsec, 0), ' s)'),
           d.uuid, d.uuid
      FROM call_debits d LEFT JOIN cdrs c ON c.uuid = d.uuid AND c.started_at = d.started_at
     WHERE d.account_id = %(id)s
)
SELECT at, kind, amount, description, reference,
       sum(amount) OVER (ORDER BY at, ref ROWS UNBOUNDED PRECEDING) AS running
  FROM entries ORDER BY at, ref
"""


def statement(
    conn: psycopg.Connection[Any],
    scope: Scope,
    account_number: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Statement:
    """Refills, charges and call debits of one account as one ledger with its running balance."""
    query = sql.SQL(
        "SELECT a.id, a.number, a.currency, a.balance FROM accounts a"
        " WHERE a.number = %s AND NOT a.deleted AND {}"
    ).format(scope.accounts("a.id"))
    with conn.cursor() as cur:
        account = cur.execute(query, [account_number]).fetchone()
        if account is None:
            raise NotFound(f"account {account_number} not found")
        account_id, number, currency, balance = account
        rows: Sequence[tuple[Any, ...]] = cur.execute(_STATEMENT, {"id": account_id}).fetchall()
    total = rows[-1][5] if rows else _ZERO
    unexplained = balance - total
    lines: list[StatementLine] = []
    opening = unexplained
    for at, kind, amount, description, reference, running in rows:
        if start is not None and at < start:
            opening = unexplained + running
            continue
        if end is not None and at >= end:
            break
        lines.append(StatementLine(at, kind, description, reference, amount, unexplained + running))
    closing = lines[-1].balance if lines else opening
    return Statement(number, currency, opening, lines, closing, balance, unexplained)


# --------------------------------------------------------------------------- the e-mail log


@dataclass(frozen=True, slots=True)
class EmailLogEntry:
    id: int
    created_at: datetime
    kind: str
    recipient: str | None
    subject: str
    status: str
    attempts: int
    sent_at: datetime | None
    error: str


def email_log(
    conn: psycopg.Connection[Any], scope: Scope, account_number: str, *, limit: int = 100
) -> list[EmailLogEntry]:
    """The account's e-mails (the seed's "Emails" list), newest first."""
    query = sql.SQL(
        "SELECT e.id, e.created_at, e.kind, e.recipient, e.subject, e.status, e.attempts, e.sent_at, e.error"
        " FROM account_emails e JOIN accounts a ON a.id = e.account_id"
        " WHERE a.number = %s AND NOT a.deleted AND {} ORDER BY e.id DESC LIMIT %s"
    ).format(scope.accounts("a.id"))
    with conn.cursor() as cur:
        exists = cur.execute(
            sql.SQL("SELECT 1 FROM accounts a WHERE a.number = %s AND NOT a.deleted AND {}").format(
                scope.accounts("a.id")
            ),
            [account_number],
        ).fetchone()
        if exists is None:
            raise NotFound(f"account {account_number} not found")
        rows = cur.execute(query, [account_number, max(1, min(limit, MAX_PAGE_SIZE))]).fetchall()
    return [EmailLogEntry(*row) for row in rows]
