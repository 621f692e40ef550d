"""Authentication on every route, the OpenAPI document, and the gevent WSGI server."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from openapi_spec_validator import validate

# a value for each path parameter, so every route can be called
SAMPLE = {
    "number": "9100000001",
    "username": "nobody",
    "entry_id": "1",
    "caller_id": "1",
    "did": "1",
    "key": "1",
    "prefix": "1",
}


def _document(api):
    response = api.get("/openapi.json")
    assert response.status_code == 200
    return json.loads(response.data)


def _operations(document):
    for path, item in document["paths"].items():
        for method in item:
            concrete = re.sub(r"\{(\w+)\}", lambda m: SAMPLE[m.group(1)], path)
            yield method.upper(), path, concrete


def test_the_served_openapi_document_is_valid_and_complete(api, app):
    document = _document(api)
    validate(document)  # raises on an invalid OpenAPI 3.1 document
    assert document["openapi"].startswith("3.1")
    assert document["components"]["securitySchemes"] == {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    documented = {(m, p) for m, p, _ in _operations(document)}
    routed = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.rule.endswith("/openapi.json"):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routed |= {(m, path) for m in rule.methods - {"HEAD", "OPTIONS"}}
    assert routed == documented  # every route is documented, and nothing else
    for method, path, _ in _operations(document):
        operation = document["paths"][path][method.lower()]
        assert operation["security"] == [{"bearerAuth": []}], (method, path)
        assert "401" in operation["responses"] and "422" in operation["responses"], (method, path)
    expected = {
        "/api/v1/customers",
        "/api/v1/providers",
        "/api/v1/customers/mass-create",
        "/api/v1/customers/import",
        "/api/v1/customers/export",
        "/api/v1/customers/delete",
        "/api/v1/customers/{number}",
        "/api/v1/customers/{number}/sip-devices",
        "/api/v1/customers/{number}/ip-map",
        "/api/v1/customers/{number}/caller-ids",
        "/api/v1/customers/{number}/forced-caller-id",
        "/api/v1/customers/{number}/dids",
        "/api/v1/customers/{number}/speed-dials/{key}",
        "/api/v1/customers/{number}/blocked-codes",
        "/api/v1/customers/{number}/alert-threshold",
        "/api/v1/customers/{number}/refills",
        "/api/v1/customers/{number}/charges",
        "/api/v1/refills",
        "/api/v1/audit",
        "/api/v1/customers/{number}/trunks",
    }
    assert expected <= set(document["paths"])
    money = document["components"]["schemas"]["RefillIn"]["properties"]["amount"]
    assert money["type"] == "string" and "pattern" in money


def test_every_route_requires_a_valid_token(api, service):
    document = _document(api)
    revoked_row, revoked = service.create_token("to-revoke")
    service.revoke_token(revoked_row["id"])
    _, expired = service.create_token("expiring", expires_days=1)
    with __import__("psycopg").connect(service.conn.info.dsn) as conn:
        conn.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE name = 'expiring'")
    attempts = {
        "no token": {},
        "not bearer": {"Authorization": f"Basic {api.token}"},
        "unknown token": {"Authorization": "Bearer cgt_" + "x" * 43},
        "garbage": {"Authorization": "Bearer nonsense"},
        "revoked": {"Authorization": f"Bearer {revoked}"},
        "expired": {"Authorization": f"Bearer {expired}"},
    }
    operations = [
        *_operations(document),
        ("GET", "/api/v1/openapi.json", "/api/v1/openapi.json"),
        ("GET", "/api/v1/no-such-route", "/api/v1/no-such-route"),
    ]
    for method, _, concrete in operations:
        for label, headers in attempts.items():
            response = api.client.open(concrete, method=method, headers=headers, json={})
            assert response.status_code == 401, (method, concrete, label, response.status_code)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert json.loads(response.data)["error"] == "unauthorized"
    # the same routes answer (whatever the status) once the token is valid
    assert api.get("/customers").status_code == 200


def test_a_reseller_token_stops_working_when_its_reseller_is_deleted_or_inactive(api, service, db_url):
    from engine.admin import schemas as s

    service.create_account(
        s.CustomerCreate(
            first_name="R", email="tmp-res@example.com", rate_group="retail", number="2300000001"
        )
    )
    with __import__("psycopg").connect(db_url) as conn:
        conn.execute("UPDATE accounts SET kind = 'reseller' WHERE number = '2300000001'")
    token = service.create_token("temp", reseller="2300000001")[1]
    assert api.as_token(token).get("/customers").status_code == 200
    with __import__("psycopg").connect(db_url) as conn:
        conn.execute("UPDATE accounts SET status = 'inactive' WHERE number = '2300000001'")
    assert api.as_token(token).get("/customers").status_code == 401


def test_callgate_api_serves_on_gevent(api_server, admin_token):
    base, log = api_server
    assert "listening on http://127.0.0.1:" in log.read_text()
    with pytest.raises(urllib.error.HTTPError) as denied:
        urllib.request.urlopen(f"{base}/customers", timeout=10)
    assert denied.value.code == 401
    request = urllib.request.Request(
        f"{base}/customers?per_page=1", headers={"Authorization": f"Bearer {admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read())["per_page"] == 1
    request = urllib.request.Request(
        f"{base}/openapi.json", headers={"Authorization": f"Bearer {admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        validate(json.loads(response.read()))
    assert admin_token not in log.read_text()  # the access log never shows a token
