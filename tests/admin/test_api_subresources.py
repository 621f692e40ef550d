"""The customer edit sub-resources through the HTTP API (real PostgreSQL)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.admin.conftest import customer_body, query

N = "7100000001"


@pytest.fixture(scope="module")
def account(api):
    response = api.post("/customers", json=customer_body(number=N, email="subs@example.com", balance="10"))
    assert response.status_code == 201, response.body
    return N


def _actions(db_url, entity):
    return [
        r[0]
        for r in query(
            db_url,
            "SELECT l.action FROM audit_log l JOIN accounts a ON a.id = l.account_id"
            " WHERE a.number = %s AND l.entity = %s ORDER BY l.id",
            [N, entity],
        )
    ]


def test_sip_devices(api, account, db_url):
    created = api.post(
        f"/customers/{N}/sip-devices",
        json={"username": "subs-1", "password": "DevSecret1", "codecs": "PCMA", "caller_id_number": "4420"},
    )
    assert created.status_code == 201, created.body
    assert created.body == {
        "device": {
            "username": "subs-1",
            "active": True,
            "codecs": "PCMA",
            "caller_id_name": "",
            "caller_id_number": "4420",
            "context": "default",
            "voicemail_enabled": False,
        },
        "generated_password": None,
    }
    generated = api.post(f"/customers/{N}/sip-devices", json={"username": "subs-2"}).body[
        "generated_password"
    ]
    assert len(generated) == 16
    updated = api.patch(
        f"/customers/{N}/sip-devices/subs-1", json={"active": False, "password": "NewSecret2"}
    )
    assert updated.status_code == 200 and updated.body["active"] is False
    assert query(db_url, "SELECT password FROM sip_devices WHERE username = 'subs-1'") == [("NewSecret2",)]
    listed = api.get(f"/customers/{N}/sip-devices").body
    assert [d["username"] for d in listed] == ["subs-1", "subs-2"] and "password" not in listed[0]
    assert api.delete(f"/customers/{N}/sip-devices/subs-2").status_code == 204
    assert api.delete(f"/customers/{N}/sip-devices/subs-2").status_code == 404
    assert api.patch(f"/customers/{N}/sip-devices/nobody", json={"active": True}).status_code == 404
    assert _actions(db_url, "sip_device") == [
        "sip_device.create",
        "sip_device.create",
        "sip_device.update",
        "sip_device.delete",
    ]
    images = query(db_url, "SELECT before::text, after::text FROM audit_log WHERE entity = 'sip_device'")
    assert not any("Secret" in (b or "") + (a or "") for b, a in images)


def test_ip_settings(api, account):
    created = api.post(
        f"/customers/{N}/ip-map", json={"cidr": "203.0.113.0/28", "tech_prefix": "77", "name": "pbx"}
    )
    assert created.status_code == 201
    entry = created.body
    assert entry["cidr"] == "203.0.113.0/28" and entry["tech_prefix"] == "77"
    updated = api.patch(
        f"/customers/{N}/ip-map/{entry['id']}", json={"active": False, "cidr": "203.0.113.16/28"}
    )
    assert (
        updated.status_code == 200
        and updated.body["cidr"] == "203.0.113.16/28"
        and not updated.body["active"]
    )
    assert api.get(f"/customers/{N}/ip-map").body == [updated.body]
    assert api.delete(f"/customers/{N}/ip-map/{entry['id']}").status_code == 204
    assert api.get(f"/customers/{N}/ip-map").body == []
    assert api.delete(f"/customers/{N}/ip-map/{entry['id']}").status_code == 404


def test_caller_ids_and_forced_caller_id(api, account):
    assert (
        api.post(
            f"/customers/{N}/caller-ids", json={"number": "442079460100", "description": "main"}
        ).status_code
        == 201
    )
    changed = api.patch(f"/customers/{N}/caller-ids/442079460100", json={"active": False})
    assert changed.body == {"number": "442079460100", "description": "main", "active": False}
    assert api.get(f"/customers/{N}/caller-ids").body == [changed.body]
    assert api.delete(f"/customers/{N}/caller-ids/442079460100").status_code == 204
    assert api.get(f"/customers/{N}/forced-caller-id").status_code == 404
    forced = api.put(f"/customers/{N}/forced-caller-id", json={"number": "442079460199", "name": "Subs Ltd"})
    assert forced.body == {"number": "442079460199", "name": "Subs Ltd", "active": True}
    replaced = api.put(f"/customers/{N}/forced-caller-id", json={"number": "442079460198"})
    assert replaced.body["number"] == "442079460198"
    assert api.get(f"/customers/{N}/forced-caller-id").body == replaced.body
    assert api.delete(f"/customers/{N}/forced-caller-id").status_code == 204
    assert api.delete(f"/customers/{N}/forced-caller-id").status_code == 404


def test_dids(api, account, db_url):
    assert api.post(f"/customers/{N}/sip-devices", json={"username": "subs-did"}).status_code == 201
    assigned = api.post(f"/customers/{N}/dids", json={"number": "442071110010", "destination": "subs-did"})
    assert assigned.status_code == 201, assigned.body
    assert assigned.body["destination"] == "subs-did" and assigned.body["destination_type"] == "device"
    moved = api.patch(
        f"/customers/{N}/dids/442071110010",
        json={"destination_type": "number", "destination": "442079460555"},
    )
    assert moved.body["destination"] == "442079460555"
    assert [d["number"] for d in api.get(f"/customers/{N}/dids").body] == ["442071110010"]
    assert api.delete(f"/customers/{N}/dids/442071110010").status_code == 204
    assert query(db_url, "SELECT account_id, destination FROM dids WHERE number = '442071110010'") == [
        (None, "")
    ]
    assert api.delete(f"/customers/{N}/dids/442071110010").status_code == 404
    assert _actions(db_url, "did") == ["did.assign", "did.update", "did.release"]


def test_speed_dials_and_blocked_codes(api, account):
    assert api.put(f"/customers/{N}/speed-dials/1", json={"number": "442079460001"}).body == {
        "key": "1",
        "number": "442079460001",
    }
    assert (
        api.put(f"/customers/{N}/speed-dials/1", json={"number": "442079460002"}).body["number"]
        == "442079460002"
    )
    assert api.put(f"/customers/{N}/speed-dials/12", json={"number": "33123"}).status_code == 200
    assert api.get(f"/customers/{N}/speed-dials").body == [
        {"key": "1", "number": "442079460002"},
        {"key": "12", "number": "33123"},
    ]
    assert api.delete(f"/customers/{N}/speed-dials/12").status_code == 204
    assert api.post(
        f"/customers/{N}/blocked-codes", json={"prefix": "449", "description": "premium"}
    ).body == {"prefix": "449", "description": "premium"}
    assert api.get(f"/customers/{N}/blocked-codes").body == [{"prefix": "449", "description": "premium"}]
    assert api.delete(f"/customers/{N}/blocked-codes/449").status_code == 204
    assert api.get(f"/customers/{N}/blocked-codes").body == []


def test_alert_threshold(api, account):
    assert api.get(f"/customers/{N}/alert-threshold").body == {
        "notify_enabled": False,
        "notify_balance_below": None,
        "notify_email": None,
    }
    set_ = api.put(
        f"/customers/{N}/alert-threshold",
        json={"notify_enabled": True, "notify_balance_below": "2.5", "notify_email": "low@example.com"},
    )
    assert set_.body == {
        "notify_enabled": True,
        "notify_balance_below": "2.50",
        "notify_email": "low@example.com",
    }
    assert api.put(f"/customers/{N}/alert-threshold", json={"notify_enabled": False}).body[
        "notify_balance_below"
    ] == ("2.50")  # only the fields given change
    assert api.get(f"/customers/{N}").body["notify_enabled"] is False


def test_refills_report_and_charge_history(api, account, db_url):
    first = api.post(
        f"/customers/{N}/refills",
        json={"amount": "5", "method": "bank transfer", "reference": "TX-1", "description": "top-up"},
    )
    assert first.status_code == 201
    assert {
        k: first.body[k] for k in ("kind", "amount", "balance_after", "currency", "method", "reference")
    } == {
        "kind": "refill",
        "amount": "5.00",
        "balance_after": "15.00",
        "currency": "USD",
        "method": "bank transfer",
        "reference": "TX-1",
    }
    charge = api.post(f"/customers/{N}/charges", json={"amount": "1.25", "description": "DID setup"})
    assert charge.body["amount"] == "-1.25" and charge.body["balance_after"] == "13.75"
    assert api.post(f"/customers/{N}/refills", json={"amount": "0.25"}).body["balance_after"] == "14.00"
    assert api.get(f"/customers/{N}").body["balance"] == "14.00"
    assert query(db_url, "SELECT balance FROM accounts WHERE number = %s AND NOT deleted", [N]) == [
        (Decimal(14),)
    ]

    history = api.get(f"/customers/{N}/charges").body
    assert [(i["kind"], i["amount"]) for i in history["items"]] == [
        ("refill", "0.25"),
        ("charge", "-1.25"),
        ("refill", "5.00"),
        ("initial", "10.00"),
    ]
    assert history["totals"] == [{"currency": "USD", "count": 4, "amount": "14.00"}]
    only_charges = api.get(f"/customers/{N}/charges", query_string={"kind": "charge"}).body
    assert [i["amount"] for i in only_charges["items"]] == ["-1.25"]
    refills = api.get(f"/customers/{N}/refills").body
    assert [i["amount"] for i in refills["items"]] == ["0.25", "5.00"]

    report = api.get("/refills", query_string={"account": N}).body
    assert report["total"] == 2 and report["totals"] == [{"currency": "USD", "count": 2, "amount": "5.25"}]
    assert (
        api.get("/refills", query_string={"account": N, "since": "2999-01-01T00:00:00Z"}).body["total"] == 0
    )
    everyone = api.get("/refills", query_string={"per_page": 1000}).body
    assert {i["account"] for i in everyone["items"]} >= {N}
    assert api.get("/refills", query_string={"reseller": "2100000001"}).status_code == 200
    assert api.get("/refills", query_string={"reseller": "9999999999"}).status_code == 404
    actions = [
        r[0]
        for r in query(
            db_url,
            "SELECT action FROM audit_log l JOIN accounts a ON a.id = l.account_id"
            " WHERE a.number = %s AND l.action LIKE 'balance.%%' ORDER BY l.id",
            [N],
        )
    ]
    assert actions == ["balance.refill", "balance.charge", "balance.refill"]


def test_a_postpaid_refill_reduces_the_debt(api):
    assert (
        api.post(
            "/customers",
            json=customer_body(
                number="7100000002",
                email="post@example.com",
                account_type="postpaid",
                credit_limit="50",
                balance="-30",
            ),
        ).status_code
        == 201
    )
    refill = api.post("/customers/7100000002/refills", json={"amount": "20"})
    assert refill.body["balance_after"] == "-10.00"
    assert api.get("/customers/7100000002").body["available"] == "40.00"
