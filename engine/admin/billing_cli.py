"""``callgate admin cdr|statement|email ...``: accounting from the command line (issue 13).

The same queries and validation as the HTTP routes (engine/admin/billing_views.py), as the
CLI's actor (the admin: every account). Wired into engine/admin/cli.py with two lines:
:func:`add_parsers` in the parser, :func:`commands` into its command table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

CDR_COLUMNS = (
    "started_at", "account_number", "direction", "dialled", "billsec", "customer_debit",
    "trunk_name", "hangup_cause", "reject_reason", "sip_code",
)  # fmt: skip
STATEMENT_COLUMNS = ("at", "kind", "description", "amount", "balance")
EMAIL_COLUMNS = ("id", "created_at", "kind", "recipient", "status", "attempts", "sent_at", "error")


def add_parsers(group: Callable[[str, str], Any], number: Any, json_flag: Any, model_options: Any) -> None:
    from engine.admin import billing_views as br

    cdr = group("cdr", "call detail records: one per call attempt, rejects included")
    model_options(json_flag(cdr.add_parser("list", help="CDRs, newest first, with the selection's totals")),
                  br.CdrQuery)  # fmt: skip
    p = cdr.add_parser("export", help="the selected CDRs as CSV, streamed")
    model_options(p, br.CdrExportQuery, skip=("page", "per_page"))
    p.add_argument("--output", help="file (default stdout)")

    statement = group("statement", "an account's statement: refills, charges, call debits")
    model_options(json_flag(number(statement.add_parser("show", help="the ledger with its running balance"))),
                  br.StatementQuery)  # fmt: skip

    email = group("email", "an account's e-mail log (low-balance alerts)")
    model_options(json_flag(number(email.add_parser("list", help="e-mails sent or pending, newest first"))),
                  br.EmailQuery)  # fmt: skip


def commands(
    values: Callable[[argparse.Namespace, Any], dict[str, Any]],
    table: Callable[[list[dict[str, Any]], Any], None],
) -> dict[tuple[str, str], Callable[[Any, argparse.Namespace], int]]:
    from engine.admin import billing_views as br
    from engine.admin import schemas as s
    from engine.billing import statement as st

    def scope(svc: Any) -> st.Scope:
        return st.Scope(svc.actor.reseller_id)

    def show(model: Any, as_json: bool) -> bool:
        if as_json:
            print(
                json.dumps(model.model_dump(mode="json") if hasattr(model, "model_dump") else model, indent=2)
            )
        return as_json

    def cdr_list(svc: Any, args: argparse.Namespace) -> int:
        query = s.parse(br.CdrQuery, values(args, br.CdrQuery))
        page = br.cdr_page(svc.conn, scope(svc), query)
        if not show(page, args.json):
            data = page.model_dump(mode="json")
            table(data["items"], CDR_COLUMNS)
            print(f"page {page.page} of {max(1, -(-page.total // page.per_page))}, {page.total} calls")
            print("totals: " + "  ".join(f"{k} {v}" for k, v in data["totals"].items() if v is not None))
        return 0

    def cdr_export(svc: Any, args: argparse.Namespace) -> int:
        query = s.parse(br.CdrExportQuery, values(args, br.CdrExportQuery))
        out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
        try:
            for line in st.cdr_csv(svc.conn, scope(svc), query.cdr_filter()):
                out.write(line)
        finally:
            if out is not sys.stdout:
                out.close()
        return 0

    def statement_show(svc: Any, args: argparse.Namespace) -> int:
        query = s.parse(br.StatementQuery, values(args, br.StatementQuery))
        found = br.statement_out(svc.conn, scope(svc), args.number, query)
        if not show(found, args.json):
            data = found.model_dump(mode="json")
            print(f"account {found.account_number} ({found.currency}), opening {data['opening']}")
            table(data["lines"], STATEMENT_COLUMNS)
            print(f"closing {data['closing']}, balance now {data['balance']}")
            if found.unexplained:
                print(f"unexplained by the ledger: {data['unexplained']}")
        return 0

    def email_list(svc: Any, args: argparse.Namespace) -> int:
        query = s.parse(br.EmailQuery, values(args, br.EmailQuery))
        entries = br.emails_out(svc.conn, scope(svc), args.number, query.limit)
        if args.json:
            print(json.dumps([e.model_dump(mode="json") for e in entries], indent=2))
        else:
            table([e.model_dump(mode="json") for e in entries], EMAIL_COLUMNS)
        return 0

    return {
        ("cdr", "list"): cdr_list,
        ("cdr", "export"): cdr_export,
        ("statement", "show"): statement_show,
        ("email", "list"): email_list,
    }
