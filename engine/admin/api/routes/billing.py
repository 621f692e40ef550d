"""HTTP routes of accounting (issue 13): CDRs (list, filter, page, totals, streamed CSV), the
statement of an account and its e-mail log; the models and queries are in
engine/admin/billing_views.py (shared with the CLI).

Scope as in the rest of the API: the admin sees everything; a reseller sees the calls of its
subtree only, with its own cost for each (``reseller_cost``) but never the carrier, the gateway
or the margin; an account outside the scope is 404. Every query parameter is validated (digits,
cause names, dates), so no input reaches PostgreSQL that it would refuse.
"""

from __future__ import annotations

from typing import Any

from flask import Response, g
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag
from pydantic import BaseModel

from engine.admin.api.http import service, streamed
from engine.admin.billing_views import (
    RESELLER_HIDDEN,
    CdrExportQuery,
    CdrPageOut,
    CdrQuery,
    EmailOut,
    EmailQuery,
    NumberPath,
    StatementOut,
    StatementQuery,
    cdr_page,
    emails_out,
    statement_out,
)
from engine.billing import statement as st

from . import blueprint

CSV_RESPONSE = {"description": "CSV (UTF-8)", "content": {"text/csv": {"schema": {"type": "string"}}}}


def _scope() -> st.Scope:
    return st.Scope(g.actor.reseller_id)


def _json(model: BaseModel) -> Response:
    return Response(model.model_dump_json(exclude_none=False), mimetype="application/json")


def routes() -> APIBlueprint:
    cdrs = Tag(name="cdrs", description="call detail records: list, totals, CSV export")
    ledger = Tag(name="statement", description="an account's statement and e-mail log")
    api = blueprint("billing")

    @api.get(
        "/cdrs",
        tags=[cdrs],
        responses={200: CdrPageOut},
        summary="CDRs, newest first: filters, pages, and the totals of the whole selection",
    )
    def list_cdrs(query: CdrQuery) -> Response:
        scope = _scope()
        page = cdr_page(service().conn, scope, query)
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
        scope = _scope()
        # the stream owns the pooled connection (Flask tears the request down first)
        lines = streamed(lambda svc: st.cdr_csv(svc.conn, scope, query.cdr_filter()))
        return Response(
            lines,
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
        return _json(statement_out(service().conn, _scope(), path.number, query))

    @api.get(
        "/customers/<number>/emails",
        tags=[ledger],
        responses={200: EmailOut},
        summary="The account's e-mail log (low-balance alerts), newest first",
    )
    def account_emails(path: NumberPath, query: EmailQuery) -> Response:
        entries = emails_out(service().conn, _scope(), path.number, query.limit)
        body = "[" + ",".join(e.model_dump_json() for e in entries) + "]"
        return Response(body, mimetype="application/json")

    return api
