"""Read-only tokens (dashboards, support staff): they read what their scope allows, and every
write route answers 403 without doing anything. The write routes are taken from the application's
route table, so a route added later is covered without editing this test."""

from __future__ import annotations

import re

import pytest

from tests.admin.conftest import customer_body, query

SAMPLE = {"number": "5400000001", "username": "5400000001", "entry_id": "1", "caller_id": "1",
          "did": "442071110001", "key": "1", "prefix": "44"}  # fmt: skip
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture(scope="module")
def accounts(api):
    created = api.post("/customers", json=customer_body(number="5400000001", create_sip_device=True))
    assert created.status_code == 201, created.body
    reseller = api.post("/customers", json=customer_body(number="5400000002", reseller="2100000001",
                                                         rate_group="acme-retail"))  # fmt: skip
    assert reseller.status_code == 201, reseller.body
    return "5400000001", "5400000002"


@pytest.fixture(scope="module")
def read_only(service):
    return service.create_token("dashboard", read_only=True)[1]


@pytest.fixture(scope="module")
def reseller_read_only(service):
    return service.create_token("acme-support", reseller="2100000001", read_only=True)[1]


def _write_routes(app):
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods & WRITES):
            path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: SAMPLE[m.group(1)], rule.rule)
            yield method, path


STATE = (
    "SELECT (SELECT count(*) FROM audit_log), (SELECT count(*) FROM balance_changes),"
    " (SELECT count(*) FROM accounts), (SELECT max(updated_at) FROM accounts)"
)


def _state(db_url):
    return query(db_url, STATE)


def test_every_write_route_refuses_a_read_only_token(
    app, api, accounts, read_only, reseller_read_only, db_url
):
    routes = list(_write_routes(app))
    assert len(routes) >= 25  # every POST, PUT, PATCH and DELETE of the API
    before = _state(db_url)
    for token in (read_only, reseller_read_only):
        for method, path in routes:
            response = api.as_token(token).client.open(
                path, method=method, json={}, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 403, (method, path, response.status_code)
            assert response.json == {"error": "forbidden", "message": "this token is read-only", "errors": []}
    assert _state(db_url) == before  # nothing written, nothing audited
    # the same routes do act for a token that may write
    assert api.post(f"/customers/{accounts[0]}/refills", json={"amount": "1"}).status_code == 201


def test_a_read_only_token_reads_everything_its_scope_allows(api, accounts, read_only, reseller_read_only):
    admin_view = api.as_token(read_only)
    assert admin_view.get(f"/customers/{accounts[0]}").status_code == 200
    assert admin_view.get(f"/customers/{accounts[1]}").status_code == 200
    assert admin_view.get("/audit").status_code == 200
    assert admin_view.get("/refills").status_code == 200
    assert admin_view.get("/customers/export").status_code == 200
    assert admin_view.get("/openapi.json").status_code == 200
    support = api.as_token(reseller_read_only)
    assert support.get(f"/customers/{accounts[1]}").status_code == 200
    assert support.get(f"/customers/{accounts[0]}").status_code == 404  # outside the reseller's subtree
    listed = {
        row["number"] for row in support.get("/customers", query_string={"per_page": 1000}).body["items"]
    }
    assert accounts[1] in listed and accounts[0] not in listed


def test_token_create_read_only_on_the_cli(cli):
    result = cli("admin", "token", "create", "--name", "wallboard", "--read-only", "--json")
    assert result.rc == 0, result.err
    assert result.json["read_only"] is True and result.json["scope"] == "admin"
    listed = cli("admin", "token", "list", "--json")
    assert any(t["name"] == "wallboard" and t["read_only"] for t in listed.json)
