"""Accounting's queries as the admin front ends show them (issue 13): the validated query models and
the response models of CDRs, statements and e-mail logs, and the functions both front ends call
(the HTTP routes in engine/admin/api/routes/billing.py, the CLI in engine/admin/billing_cli.py).
The work is done by engine.billing.statement.

Scope as in the rest of the API: the admin sees everything; a reseller sees the calls of its
subtree only, with its own cost for each (``reseller_cost``) but never the carrier, the gateway
or the margin; an account outside the scope is 404. Every query parameter is validated (digits,
cause names, dates), so no input reaches PostgreSQL that it would refuse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.admin import schemas as s
from engine.admin.errors import NotFound
from engine.billing import statement as st

CauseName = Field(None, pattern=r"^[A-Z0-9_]{1,64}$", description="a FreeSWITCH hangup cause")


class CdrQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: s.AccountNumber | None = None
    since: s.Timestamp | None = Field(None, description="calls started at or after")
    until: s.Timestamp | None = Field(None, description="calls started before")
    direction: Literal["outbound", "local", "inbound"] | None = None
    answered: bool | None = Field(None, description="true: billed calls only; false: unbilled only")
    rejected: bool | None = Field(None, description="true: refused attempts only; false: decided calls only")
    prefix: str | None = Field(None, pattern=r"^[0-9]{1,20}$", description="dialled number prefix")
    hangup_cause: str | None = CauseName
    page: int = Field(1, ge=1, le=1_000_000)
    per_page: int = Field(50, ge=1, le=st.MAX_PAGE_SIZE)

    def cdr_filter(self) -> st.CdrFilter:
        return st.CdrFilter(
            account_number=self.account,
            start=self.since,
            end=self.until,
            direction=self.direction,
            answered=self.answered,
            rejected=self.rejected,
            destination_prefix=self.prefix,
            hangup_cause=self.hangup_cause,
        )


class CdrExportQuery(CdrQuery):
    page: int = Field(1, ge=1, le=1, description="ignored: the export holds the whole selection")


class CdrOut(BaseModel):
    """One call attempt. The carrier fields (trunk, gateway, provider, carrier price and cost,
    margin) are shown to the admin only; a reseller gets ``reseller_cost`` instead."""

    uuid: str
    started_at: datetime
    answered_at: datetime | None = None
    ended_at: datetime | None = None
    account_number: str | None = None
    direction: str | None = None
    caller_id_number: str | None = None
    dialled: str | None = None
    translated: str | None = None
    rate_prefix: str | None = None
    rate_cost_per_minute: s.SignedMoney | None = None
    trunk_name: str | None = None
    gateway: str | None = None
    provider_id: int | None = None
    carrier_prefix: str | None = None
    carrier_cost_per_minute: s.SignedMoney | None = None
    billsec: int | None = None
    duration: int | None = None
    customer_debit: s.SignedMoney | None = None
    carrier_cost: s.SignedMoney | None = None
    margin: s.SignedMoney | None = None
    reseller_cost: s.SignedMoney | None = None
    hangup_cause: str | None = None
    sip_code: int | None = None
    reject_reason: str | None = None
    disposition: str | None = None


RESELLER_HIDDEN = {
    "trunk_name",
    "gateway",
    "provider_id",
    "carrier_prefix",
    "carrier_cost_per_minute",
    "carrier_cost",
    "margin",
}


class CdrTotals(BaseModel):
    calls: int
    answered: int
    billsec: int
    customer_debit: s.SignedMoney
    carrier_cost: s.SignedMoney | None = None  # admin only
    margin: s.SignedMoney | None = None  # admin only


class CdrPageOut(BaseModel):
    items: list[CdrOut]
    page: int
    per_page: int
    total: int
    totals: CdrTotals


class StatementQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: s.Timestamp | None = None
    until: s.Timestamp | None = None


class StatementLineOut(BaseModel):
    at: datetime
    kind: Literal["initial", "refill", "charge", "call"]
    description: str
    reference: str
    amount: s.SignedMoney = Field(description="+ credits the account, - debits it")
    balance: s.SignedMoney = Field(description="the running balance after this line")


class StatementOut(BaseModel):
    account_number: str
    currency: str
    opening: s.SignedMoney
    lines: list[StatementLineOut]
    closing: s.SignedMoney
    balance: s.SignedMoney
    unexplained: s.SignedMoney = Field(description="non-zero only where the ledger equation fails")


class EmailQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(100, ge=1, le=st.MAX_PAGE_SIZE)


class EmailOut(BaseModel):
    id: int
    created_at: datetime
    kind: str
    recipient: str | None
    subject: str
    status: str
    attempts: int
    sent_at: datetime | None
    error: str


class NumberPath(BaseModel):
    number: s.AccountNumber = Field(description="the account number")


def cdr_page(conn: Any, scope: st.Scope, query: CdrQuery) -> CdrPageOut:
    page = st.list_cdrs(conn, scope, query.cdr_filter(), page=query.page, page_size=query.per_page)
    totals = {k: v for k, v in page.totals.items() if k in CdrTotals.model_fields}
    return CdrPageOut(
        items=[CdrOut(**row) for row in page.rows],
        page=page.page,
        per_page=page.page_size,
        total=page.total,
        totals=CdrTotals(**totals),
    )


def statement_out(conn: Any, scope: st.Scope, number: str, query: StatementQuery) -> StatementOut:
    try:
        found = st.statement(conn, scope, number, start=query.since, end=query.until)
    except st.NotFound as exc:
        raise NotFound(str(exc)) from None
    return StatementOut(
        account_number=found.account_number,
        currency=found.currency,
        opening=found.opening,
        lines=[_line(line) for line in found.lines],
        closing=found.closing,
        balance=found.balance,
        unexplained=found.unexplained,
    )


def _line(line: st.StatementLine) -> StatementLineOut:
    return StatementLineOut(
        at=line.at,
        kind=line.kind,
        description=line.description,
        reference=line.reference,
        amount=line.amount,
        balance=line.balance,
    )


def emails_out(conn: Any, scope: st.Scope, number: str, limit: int) -> list[EmailOut]:
    try:
        entries = st.email_log(conn, scope, number, limit=limit)
    except st.NotFound as exc:
        raise NotFound(str(exc)) from None
    return [EmailOut(**{name: getattr(e, name) for name in EmailOut.model_fields}) for e in entries]
