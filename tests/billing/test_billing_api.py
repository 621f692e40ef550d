"""The accounting routes of the admin API (engine/admin/api/routes/billing.py): CDRs, their CSV export,
statements and e-mail logs, through the real Flask app, PostgreSQL and tokens; reseller scope."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import redis

from engine.admin.api import create_app
from engine.admin.service import AdminService
from engine.admin.service.base import Actor
from engine.admin.settings import AdminSettings
from engine.billing.funds import Funds
from engine.config import load_config
from engine.sync.cdrs import CdrWriter
from tests.billing.conftest import BASE, make_account, settle_all, settlement

D = Decimal


class Client:
    def __init__(self, app: Any, token: str) -> None:
        self.client = app.test_client()
        self.token = token

    def get(self, path: str) -> Any:
        response = self.client.get(f"/api/v1{path}", headers={"Authorization": f"Bearer {self.token}"})
        response.body = json.loads(response.data) if response.mimetype == "application/json" else None
        return response


@pytest.fixture
def clients(db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str) -> dict[str, Client]:
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
        record["trunk_name"] = "carrier-a"
        object.__setattr__(item, "cdr", record)
    settle_all(Funds(client, key_prefix), items)
    writer = CdrWriter(client, key_prefix, lambda: psycopg.connect(db_url), "w")
    while writer.process_once(0).entries:
        pass
    db.execute(
        "INSERT INTO account_emails (account_id, kind, recipient, subject, body, status)"
        " VALUES (%s, 'low_balance', 'a@example.com', 'Low balance', 'x', 'pending')",
        [mine],
    )
    service = AdminService(db, AdminSettings(), Actor(name="test:admin"))
    app = create_app(load_config(environ={"CALLGATE_DATABASE_URL": db_url}))
    return {
        "admin": Client(app, service.create_token("admin")[1]),
        "reseller": Client(app, service.create_token("reseller", reseller="700")[1]),
    }


def test_the_admin_lists_every_cdr_with_pages_and_totals(clients: dict[str, Client]) -> None:
    response = clients["admin"].get("/cdrs?per_page=3")
    assert response.status_code == 200, response.data
    page = response.body
    assert (page["total"], page["page"], page["per_page"], len(page["items"])) == (8, 1, 3, 3)
    assert page["items"][0]["uuid"] == "o2"  # newest first
    assert page["totals"]["customer_debit"] == "5.50" and page["totals"]["carrier_cost"] == "0.08"
    assert page["items"][0]["trunk_name"] == "carrier-a"
    filtered = clients["admin"].get("/cdrs?account=702&since=2026-12-06T12:11:00Z").body
    assert [row["uuid"] for row in filtered["items"]] == ["o2", "o1"]
    assert clients["admin"].get("/cdrs?page=3&per_page=3").body["items"][-1]["uuid"] == "m0"


def test_a_reseller_sees_its_subtree_with_its_own_cost_and_never_the_carrier(
    clients: dict[str, Client],
) -> None:
    page = clients["reseller"].get("/cdrs").body
    assert page["total"] == 5 and {row["account_number"] for row in page["items"]} == {"701"}
    row = page["items"][0]
    assert row["reseller_cost"] == "0.20" and row["customer_debit"] == "0.50"
    for hidden in ("trunk_name", "gateway", "carrier_cost", "margin", "provider_id"):
        assert hidden not in row
    assert "margin" not in page["totals"] and "carrier_cost" not in page["totals"]
    assert clients["reseller"].get("/cdrs?account=702").body["total"] == 0
    assert clients["reseller"].get("/customers/702/statement").status_code == 404
    assert clients["reseller"].get("/customers/702/emails").status_code == 404


def test_the_csv_export_is_streamed_and_safe_for_spreadsheets(clients: dict[str, Client]) -> None:
    response = clients["admin"].get("/cdrs/export?account=701")
    assert response.status_code == 200 and response.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(response.data.decode())))
    assert len(rows) == 5
    assert {row["dialled"] for row in rows} == {"'=HYPERLINK(1)", "4420"}
    reseller_rows = list(csv.DictReader(io.StringIO(clients["reseller"].get("/cdrs/export").data.decode())))
    assert len(reseller_rows) == 5 and "margin" not in reseller_rows[0]


def test_the_statement_is_one_ledger_with_its_running_balance(clients: dict[str, Client]) -> None:
    response = clients["reseller"].get("/customers/701/statement")
    assert response.status_code == 200, response.data
    statement = response.body
    kinds = [line["kind"] for line in statement["lines"]]
    assert kinds == ["initial", "call", "call", "call", "call", "call"]
    assert statement["lines"][0]["balance"] == "20.00"
    assert statement["closing"] == statement["balance"] == "17.50"
    assert statement["unexplained"] == "0.00"


def test_the_email_log_is_listed_newest_first(clients: dict[str, Client]) -> None:
    [entry] = clients["reseller"].get("/customers/701/emails").body
    assert (entry["kind"], entry["status"], entry["recipient"]) == ("low_balance", "pending", "a@example.com")
    assert clients["admin"].get("/customers/999/emails").status_code == 404


@pytest.mark.parametrize(
    "query",
    [
        "hangup_cause=%00",
        "hangup_cause=normal",
        "prefix=12a",
        "page=0",
        "per_page=100000",
        "direction=sideways",
        "since=yesterday",
        "answered=perhaps",
        "account=%00",
        "unknown=1",
    ],
)
def test_bad_queries_are_422_never_a_server_error(clients: dict[str, Client], query: str) -> None:
    response = clients["admin"].get(f"/cdrs?{query}")
    assert response.status_code == 422, (query, response.data)


def test_the_openapi_document_describes_the_routes(clients: dict[str, Client]) -> None:
    paths = clients["admin"].get("/openapi.json").body["paths"]
    for path in ("/api/v1/cdrs", "/api/v1/cdrs/export", "/api/v1/customers/{number}/statement",
                 "/api/v1/customers/{number}/emails"):  # fmt: skip
        assert "get" in paths[path], path
    assert "text/csv" in paths["/api/v1/cdrs/export"]["get"]["responses"]["200"]["content"]


def test_the_cli_lists_exports_and_shows_statements_and_emails(
    clients: dict[str, Client], db_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    from engine.admin import cli as admin_cli

    env = {"CALLGATE_DATABASE_URL": db_url}

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = admin_cli.main(list(argv), environ=env)
        return rc, capsys.readouterr().out

    rc, out = run("admin", "cdr", "list", "--account", "701", "--per-page", "2", "--json")
    page = json.loads(out)
    assert rc == 0 and page["total"] == 5 and len(page["items"]) == 2
    assert page["totals"]["customer_debit"] == "2.50"
    rc, out = run("admin", "cdr", "list", "--rejected", "false")
    assert rc == 0 and "8 calls" in out and "STARTED_AT" in out
    target = tmp_path / "cdrs.csv"
    assert run("admin", "cdr", "export", "--account", "702", "--output", str(target))[0] == 0
    assert len(list(csv.DictReader(target.open()))) == 3
    rc, out = run("admin", "statement", "show", "701", "--json")
    assert rc == 0 and json.loads(out)["closing"] == "17.50"
    rc, out = run("admin", "statement", "show", "701")
    assert rc == 0 and "closing 17.50" in out
    rc, out = run("admin", "email", "list", "701", "--json")
    assert rc == 0 and json.loads(out)[0]["status"] == "pending"
    assert run("admin", "email", "list", "999")[0] == 1  # not found
    assert run("admin", "cdr", "list", "--prefix", "x1")[0] == 1  # refused by validation
