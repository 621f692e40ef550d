"""Balance: refills, charges, an account's history, the refill report; and the audit log."""

from __future__ import annotations

from flask import Response
from flask_openapi3.blueprint import APIBlueprint
from flask_openapi3.models.tag import Tag

from engine.admin import schemas as s
from engine.admin.api.http import json_response, service
from engine.admin.api.paths import NumberPath

from . import blueprint

balance = Tag(name="balance", description="refills, charges, the refill report")
audit = Tag(name="audit", description="the audit log")


def routes() -> APIBlueprint:
    api = blueprint("balance")

    @api.post("/customers/<number>/refills", tags=[balance], responses={201: s.LedgerEntryOut},
              summary="Refill (top-up)")  # fmt: skip
    def refill(path: NumberPath, body: s.RefillIn) -> Response:
        return json_response(service().refill(path.number, body), 201)

    @api.get("/customers/<number>/refills", tags=[balance], responses={200: s.LedgerPage},
             summary="The account's refills")  # fmt: skip
    def account_refills(path: NumberPath, query: s.LedgerQuery) -> Response:
        return json_response(service().ledger(path.number, query.model_copy(update={"kind": "refill"})))

    @api.post("/customers/<number>/charges", tags=[balance], responses={201: s.LedgerEntryOut},
              summary="Post a charge (debit)")  # fmt: skip
    def charge(path: NumberPath, body: s.ChargeIn) -> Response:
        return json_response(service().charge(path.number, body), 201)

    @api.get(
        "/customers/<number>/charges",
        tags=[balance],
        responses={200: s.LedgerPage},
        summary="Charge history: every balance change (opening balance, refills, charges)",
    )
    def charge_history(path: NumberPath, query: s.LedgerQuery) -> Response:
        return json_response(service().ledger(path.number, query))

    @api.get("/refills", tags=[balance], responses={200: s.LedgerPage}, summary="Refill report")
    def refill_report(query: s.RefillQuery) -> Response:
        return json_response(service().refill_report(query))

    @api.get("/audit", tags=[audit], responses={200: s.AuditPage}, summary="The audit log, newest first")
    def audit_log(query: s.AuditQuery) -> Response:
        return json_response(service().audit_log(query))

    return api
