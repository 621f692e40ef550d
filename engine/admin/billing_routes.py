"""HTTP routes of accounting (issue 13): CDRs (list, filter, page, totals, streamed CSV), the
statement of an account and its e-mail log. Registered on the admin API with one line
(``app.register_api(billing_routes())``); the work is done by engine.billing.statement.

Scope as in the rest of the API: the admin sees everything; a reseller sees the calls of its
subtree only, with its own cost for each (``reseller_cost``) but never the carrier, the gateway
or the margin; an account outside the scope is 404. Every query parameter is validated (digits,
cause names, dates), so no input reaches PostgreSQL that it would refuse.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from flask import Response, g
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field

from engine.admin import schemas as s
from engine.admin.errors import NotFound
from engine.billing import statement as st

PREFIX = "/api/v1"
SECURITY: list[dict[str, list[str]]] = [{"bearerAuth": []}]
CSV_RESPONSE = {"description": "CSV (UTF-8)", "content": {"text/csv": {"schema": {"type": "string"}}}}

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


def _scope() -> st.Scope:
    return st.Scope(g.actor.reseller_id)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=False), mimetype="application/json")


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


def billing_routes() -> APIBlueprint:
    cdrs = Tag(name="cdrs", description="call detail records: list, totals, CSV export")
    ledger = Tag(name="statement", description="an account's statement and e-mail log")
    api = APIBlueprint(
        "billing", __name__, url_prefix=PREFIX, abp_security=SECURITY,
        abp_responses={401: s.ErrorOut, 404: s.ErrorOut, 422: s.ErrorOut},
    )  # fmt: skip

    @api.get(
        "/cdrs",
        tags=[cdrs],
        responses={200: CdrPageOut},
        summary="CDRs, newest first: filters, pages, and the totals of the whole selection",
    )
    def list_cdrs(query: CdrQuery) -> Response:
        scope = _scope()
        page = cdr_page(g.conn, scope, query)
        if scope.is_admin:
            return _json(page)
        # the carrier side is never shown to a reseller, not even as null
        hidden: dict[str, Any] = {"items": {"__all__": RESELLER_HIDDEN}, "totals": {"carrier_cost", "margin"}}
        return Response(page.model_dump_json(exclude=hidden), mimetype="application/json")

    @api.get(
        "/cdrs/export",
        tags=[cdrs],
        responses={200: CSV_RESPONSE},
        summary="The selected CDRs as CSV, streamed",
    )
    def export_cdrs(query: CdrExportQuery) -> Response:
        conn = g.pop("conn")  # the stream owns the connection (Flask tears the request down first)
        scope = _scope()
        lines = st.cdr_csv(conn, scope, query.cdr_filter())

        def body() -> Any:
            try:
                yield from lines
            finally:
                conn.close()

        return Response(
            body(),
            mimetype="text/csv",
            headers={"Content-Disposition": 'attachment; filename="cdrs.csv"'},
        )

    @api.get(
        "/customers/<number>/statement",
        tags=[ledger],
        responses={200: StatementOut},
        summary="The account's statement: refills, charges and call debits with the running balance",
    )
    def account_statement(path: NumberPath, query: StatementQuery) -> Response:
        return _json(statement_out(g.conn, _scope(), path.number, query))

    @api.get(
        "/customers/<number>/emails",
        tags=[ledger],
        responses={200: EmailOut},
        summary="The account's e-mail log (low-balance alerts), newest first",
    )
    def account_emails(path: NumberPath, query: EmailQuery) -> Response:
        entries = emails_out(g.conn, _scope(), path.number, query.limit)
        body = "[" + ",".join(e.model_dump_json() for e in entries) + "]"
        return Response(body, mimetype="application/json")

    return api
