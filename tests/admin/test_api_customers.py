"""The customer module through the HTTP API, against a real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg

from engine.admin.service import Actor
from engine.db.fixtures import load_document, verify_secret
from tests.admin.conftest import customer_body, query

FULL_FORM = {
    "number": "3100000001",
    "password": "Secret123",
    "pin": "4321",
    "email": "Full.Form@Example.com",
    "create_sip_device": True,
    "sip_username": "full-form",
    "sip_password": "SipSecret9",
    "status": "active",
    "valid_days": 30,
    "max_channels": 3,
    "cps": 2,
    "localization": "uk",
    "local_calls_allowed": False,
    "local_call_cost_per_minute": "0.0125",
    "codecs": "PCMA,PCMU",
    "notifications": False,
    "paypal_permission": True,
    "is_recording": True,
    "allow_ip_management": True,
    "notify_enabled": True,
    "notify_balance_below": "5",
    "notify_email": "alerts@example.com",
    "first_name": "Full",
    "last_name": "Form",
    "company": "Form Ltd",
    "phone": "+44 20 7946 0000",
    "mobile": "07700 900000",
    "address_1": "1 Road",
    "address_2": "Floor 2",
    "city": "London",
    "province": "Greater London",
    "postal_code": "N1 1AA",
    "country": "GB",
    "timezone": "Europe/London",
    "language": "en-GB",
    "currency": "GBP",
    "account_type": "postpaid",
    "balance": "-12.50",
    "credit_limit": "200",
    "rate_group": "retail",
    "non_cli_rate_group": "noncli",
    "cli_pool": 5,
    "billing_schedule": "weekly",
    "invoice_day": 3,
    "tax_number": "GB123",
    "generate_invoice": False,
    "invoice_note": "net 30",
    "reference": "REF-1",
}


def test_create_customer_with_every_field_of_the_form(api, db_url):
    response = api.post("/customers", json=FULL_FORM)
    assert response.status_code == 201, response.body
    account = response.body["account"]
    expected = {
        k: v
        for k, v in FULL_FORM.items()
        if k not in ("password", "pin", "create_sip_device", "sip_username", "sip_password")
    }
    expected.update(
        local_call_cost_per_minute="0.0125",
        notify_balance_below="5.00",
        credit_limit="200.00",
        balance="-12.50",
    )
    for key, value in expected.items():
        assert account[key] == value, key
    assert account["entity_type"] == "customer"
    assert account["available"] == "187.50"  # balance + credit limit
    assert account["has_password"] and account["has_pin"]
    assert response.body["generated"] == {"password": None, "pin": None, "sip_password": None}
    assert response.body["sip_username"] == "full-form"
    assert "Secret123" not in response.text and "4321" not in json.dumps(account)

    row = query(
        db_url,
        "SELECT password_hash, pin_hash, expiry, postpaid, paypal_permission FROM accounts"
        " WHERE number = '3100000001' AND NOT deleted",
    )[0]
    assert verify_secret("Secret123", row[0]) and verify_secret("4321", row[1])
    assert not row[0].endswith("Secret123") and "4321" not in row[1]
    assert abs(row[2] - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
    assert row[3] is True and row[4] is True
    assert query(
        db_url, "SELECT username, password, caller_id_number FROM sip_devices WHERE username = 'full-form'"
    ) == [("full-form", "SipSecret9", "3100000001")]
    assert query(
        db_url,
        "SELECT b.kind, amount, balance_after, b.currency FROM balance_changes b JOIN accounts a"
        " ON a.id = b.account_id WHERE a.number = '3100000001'",
    ) == [("initial", Decimal("-12.5"), Decimal("-12.5"), "GBP")]
    audit = query(
        db_url,
        "SELECT actor, action, after::text FROM audit_log l JOIN accounts a ON a.id = l.account_id"
        " WHERE a.number = '3100000001' ORDER BY l.id",
    )
    assert [a[1] for a in audit] == ["customer.create", "sip_device.create"]
    assert audit[0][0].startswith("token:") and audit[0][0].endswith(":tests-admin")
    assert (
        "Secret123" not in audit[0][2] and "SipSecret9" not in audit[1][2] and "pin_hash" not in audit[0][2]
    )

    shown = api.get("/customers/3100000001")
    assert shown.status_code == 200 and shown.body == account


def test_omitted_number_password_pin_and_sip_password_are_generated_and_shown_once(api, db_url):
    response = api.post("/customers", json=customer_body(email="gen@example.com", create_sip_device=True))
    assert response.status_code == 201, response.body
    number = response.body["account"]["number"]
    generated = response.body["generated"]
    assert len(number) == 10 and number[0] != "0" and number.isdigit()
    assert len(generated["pin"]) == 6 and generated["pin"].isdigit()
    assert len(generated["password"]) >= 8 and generated["sip_password"]
    row = query(
        db_url, "SELECT password_hash, pin_hash FROM accounts WHERE number = %s AND NOT deleted", [number]
    )
    assert verify_secret(generated["password"], row[0][0]) and verify_secret(generated["pin"], row[0][1])
    assert row[0][1].startswith("scrypt$512$")  # the PIN work factor of [admin] pin_hash_log2_n
    assert query(db_url, "SELECT password FROM sip_devices WHERE username = %s", [number]) == [
        (generated["sip_password"],)
    ]
    again = api.get(f"/customers/{number}")
    assert "generated" not in again.body and generated["password"] not in again.text


def test_generated_numbers_follow_the_configured_length_and_start_digit(service_for):
    from engine.admin import schemas as s

    svc = service_for(account_number_length=8, account_number_start_digit="57")
    created = svc.create_account(s.CustomerCreate(**customer_body(email="digits@example.com")))
    assert created.account.number.startswith("57") and len(created.account.number) == 8


def test_create_provider_which_can_originate_and_owns_trunks(api, db_url):
    response = api.post(
        "/providers",
        json=customer_body(
            number="3300000001", email="carrier@example.com", rate_group=None, company="Carrier Two"
        ),
    )
    assert response.status_code == 201, response.body
    account = response.body["account"]
    assert account["entity_type"] == "provider" and account["reseller"] is None
    assert account["notifications"] is False  # ASTPP's provider default
    ip = api.post(
        "/customers/3300000001/ip-map", json={"cidr": "198.51.100.7", "tech_prefix": "99", "name": "sbc"}
    )
    assert ip.status_code == 201 and ip.body["cidr"] == "198.51.100.7/32"
    with psycopg.connect(db_url) as conn:
        load_document(
            conn,
            {
                "providers": [
                    {"number": "3300000001", "trunks": [{"name": "carrier-two", "gateway": "gw-main"}]}
                ]
            },
        )
    trunks = api.get("/customers/3300000001/trunks")
    assert trunks.body == [
        {
            "name": "carrier-two",
            "gateway": "gw-main",
            "active": True,
            "precedence": 0,
            "max_channels": 0,
            "cps": 0,
        }
    ]
    assert api.get("/customers/9100000001/trunks").body[0]["name"] == "carrier-one"
    listed = api.get("/customers", query_string={"entity_type": "provider", "number": "33000000"}).body
    assert [i["number"] for i in listed["items"]] == ["3300000001"]
    with_reseller = api.post("/providers", json=customer_body(email="c3@example.com", reseller="2100000001"))
    assert with_reseller.status_code == 422
    assert with_reseller.body["errors"][0]["field"] == "reseller"


# --------------------------------------------------------------------------- list, search, export


def _search_accounts(service, db_url):
    from engine.admin import schemas as s

    if query(db_url, "SELECT 1 FROM accounts WHERE number = '3200000001'"):
        return
    service.create_account(
        s.CustomerCreate(
            number="3200000001",
            first_name="Anna",
            last_name="Zed",
            company="Srch Alpha",
            email="anna@srch.example",
            rate_group="retail",
            balance="50",
            localization="uk",
            max_channels=5,
            valid_days=10,
        )
    )
    service.create_account(
        s.CustomerCreate(
            number="3200000002",
            first_name="Bob",
            last_name="Young",
            company="Srch Beta",
            email="bob@srch.example",
            rate_group="noncli",
            account_type="postpaid",
            balance="-20",
            credit_limit="100",
            billing_schedule="daily",
            status="inactive",
        )
    )
    service.create_account(
        s.CustomerCreate(
            number="3200000003",
            first_name="Cara",
            last_name="Xu",
            company="Srch Gamma",
            email="cara@srch.example",
        ),
        "provider",
    )
    service.create_account(
        s.CustomerCreate(
            number="3200000004",
            first_name="Dan",
            last_name="Wu",
            company="Srch Delta",
            email="dan@srch.example",
            reseller="2100000001",
            rate_group="acme-retail",
            balance="5",
        )
    )
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE accounts SET first_used = now() - interval '1 day' WHERE number = '3200000003'")


def _numbers(api, **params):
    response = api.get(
        "/customers", query_string={"company": "Srch", "company_op": "begins", "sort": "number", **params}
    )
    assert response.status_code == 200, response.body
    return [item["number"][-1] for item in response.body["items"]]


def test_list_searches_every_column_pages_and_sorts(api, service, db_url):
    _search_accounts(service, db_url)
    assert _numbers(api) == ["1", "2", "3", "4"]  # customers, providers and the reseller's customer
    now = datetime.now(UTC)
    cases = {
        (("first_name", "ann"),): ["1"],
        (("first_name", "a"), ("first_name_op", "ends")): ["1", "3"],
        (("first_name", "a"), ("first_name_op", "not_contains")): ["2"],
        (("last_name", "young"), ("last_name_op", "eq")): ["2"],
        (("last_name", "Young"), ("last_name_op", "ne")): ["1", "3", "4"],
        (("email", "bob@"),): ["2"],
        (("rate_group", "retail"), ("rate_group_op", "eq")): ["1"],
        (("rate_group", "retail"),): ["1", "4"],
        (("localization", "uk"),): ["1"],
        (("reseller", "2100000001"),): ["4"],
        (("reseller", "admin"),): ["1", "2", "3"],
        (("number", "3200000001"), ("number_op", "ne")): ["2", "3", "4"],
        (("number", "0003"), ("number_op", "ends")): ["3"],
        (("balance_min", "0"),): ["1", "3", "4"],
        (("balance_max", "0"),): ["2", "3"],
        (("credit_limit_min", "50"),): ["2"],
        (("concurrent_calls_min", "5"),): ["1"],
        (("concurrent_calls_max", "4"),): ["2", "3", "4"],
        (("account_type", "postpaid"),): ["2"],
        (("entity_type", "provider"),): ["3"],
        (("entity_type", "customer"),): ["1", "2", "4"],
        (("status", "inactive"),): ["2"],
        (("billing_schedule", "daily"),): ["2"],
        (("expiry_from", now.isoformat()),): ["1"],
        (("expiry_to", (now + timedelta(days=5)).isoformat()),): [],
        (("first_used_from", (now - timedelta(days=2)).isoformat()),): ["3"],
        (("created_from", (now - timedelta(hours=1)).isoformat()),): ["1", "2", "3", "4"],
        (("created_to", (now - timedelta(hours=1)).isoformat()),): [],
    }
    for params, expected in cases.items():
        assert _numbers(api, **dict(params)) == expected, params

    assert _numbers(api, sort="balance") == ["2", "3", "4", "1"]
    assert _numbers(api, sort="-first_name") == ["4", "3", "2", "1"]
    page = api.get(
        "/customers",
        query_string={"company": "Srch", "company_op": "begins", "sort": "number", "per_page": 2, "page": 2},
    ).body
    assert [i["number"] for i in page["items"]] == ["3200000003", "3200000004"]
    assert (page["page"], page["per_page"], page["total"]) == (2, 2, 4)
    row = page["items"][1]
    assert row == {
        "entity_type": "customer",
        "account_type": "prepaid",
        "number": "3200000004",
        "first_name": "Dan",
        "last_name": "Wu",
        "company": "Srch Delta",
        "email": "dan@srch.example",
        "rate_group": "acme-retail",
        "balance": "5.00",
        "credit_limit": "0.00",
        "currency": "USD",
        "first_used": None,
        "expiry": None,
        "concurrent_calls": 0,
        "localization": None,
        "reseller": "2100000001",
        "created": row["created"],
        "status": "active",
        "billing_schedule": "monthly",
    }
    default_order = api.get("/customers", query_string={"company": "Srch", "company_op": "begins"}).body
    assert next(i["number"] for i in default_order["items"]) == "3200000004"  # ASTPP: number descending
    assert api.get("/customers", query_string={"sort": "password"}).status_code == 422
    assert api.get("/customers", query_string={"per_page": 5000}).body["errors"][0]["field"] == "per_page"
    assert api.get("/customers", query_string={"colour": "red"}).status_code == 422


def test_export_streams_the_search_as_csv_and_says_its_balance_convention(api, service, db_url):
    _search_accounts(service, db_url)
    response = api.get(
        "/customers/export", query_string={"company": "Srch", "company_op": "begins", "sort": "number"}
    )
    assert response.status_code == 200 and response.mimetype == "text/csv" and response.is_streamed
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == [
        "Entity Type",
        "Account Type",
        "Account",
        "First Name",
        "Last Name",
        "Company",
        "Email",
        "Rate Group",
        "Balance (held)",
        "Credit Limit",
        "Currency",
        "First Used",
        "Expiry",
        "Concurrent Calls",
        "Localization",
        "Reseller",
        "Created",
        "Status",
        "Billing Schedule",
    ]
    assert [r[2] for r in rows[1:]] == ["3200000001", "3200000002", "3200000003", "3200000004"]
    assert rows[2][:11] == [
        "customer",
        "postpaid",
        "3200000002",
        "Bob",
        "Young",
        "Srch Beta",
        "bob@srch.example",
        "noncli",
        "-20.00",
        "100.00",
        "USD",
    ]
    assert rows[4][15] == "2100000001" and rows[2][17] == "inactive" and rows[1][14] == "uk"
    astpp = api.get(
        "/customers/export",
        query_string={"company": "Srch Beta", "company_op": "eq", "balance_convention": "astpp"},
    )
    lines = list(csv.reader(io.StringIO(astpp.get_data(as_text=True))))
    assert lines[0][8] == "Balance (astpp)" and lines[1][8] == "20.00"  # postpaid debt as ASTPP writes it


# --------------------------------------------------------------------------- delete


def _account_with_everything(api, number):
    assert (
        api.post(
            "/customers",
            json=customer_body(number=number, email=f"d{number}@example.com", create_sip_device=True),
        ).status_code
        == 201
    )
    assert (
        api.post(f"/customers/{number}/ip-map", json={"cidr": f"10.9.{int(number[-2:])}.0/24"}).status_code
        == 201
    )
    assert api.post(f"/customers/{number}/caller-ids", json={"number": "442079460000"}).status_code == 201
    assert (
        api.put(f"/customers/{number}/forced-caller-id", json={"number": "442079460001"}).status_code == 200
    )
    assert api.put(f"/customers/{number}/speed-dials/1", json={"number": "442079460002"}).status_code == 200
    assert api.post(f"/customers/{number}/blocked-codes", json={"prefix": "449"}).status_code == 201
    did = f"4420711100{int(number[-2:]):02d}"
    assert (
        api.post(f"/customers/{number}/dids", json={"number": did, "destination": number}).status_code == 201
    )
    return did


def test_delete_turns_the_account_off_removes_related_data_and_releases_dids(api, db_url):
    did = _account_with_everything(api, "3400000001")
    response = api.delete("/customers/3400000001")
    assert response.status_code == 200, response.body
    assert response.body == {"deleted": ["3400000001"], "released_dids": [did]}
    ((account_id, deleted, status, deleted_at),) = query(
        db_url, "SELECT id, deleted, status, deleted_at FROM accounts WHERE number = '3400000001'"
    )
    assert deleted and status == "inactive" and deleted_at is not None  # the row stays, for history
    for table in ("sip_devices", "ip_map", "caller_ids", "forced_caller_ids", "speed_dials", "blocked_codes"):
        assert query(db_url, f"SELECT count(*) FROM {table} WHERE account_id = %s", [account_id]) == [(0,)], (
            table
        )
    assert query(db_url, "SELECT account_id, destination FROM dids WHERE number = %s", [did]) == [(None, "")]
    assert api.get("/customers/3400000001").status_code == 404
    ((before, after),) = query(
        db_url,
        "SELECT before, after FROM audit_log WHERE action = 'account.delete' AND account_id = %s",
        [account_id],
    )
    assert before["deleted"] is False and after["deleted"] is True
    assert before["related"]["sip_devices"][0]["username"] == "3400000001"
    assert "password" not in before["related"]["sip_devices"][0]
    assert before["related"]["dids"] == [did] and len(before["related"]["blocked_codes"]) == 1
    # the number and e-mail of a deleted account can be used again (as in ASTPP)
    again = api.post("/customers", json=customer_body(number="3400000001", email="d3400000001@example.com"))
    assert again.status_code == 201, again.body


def test_delete_many_is_one_transaction(api, db_url):
    for number in ("3400000002", "3400000003", "3400000004"):
        _account_with_everything(api, number)
    missing = api.post("/customers/delete", json={"numbers": ["3400000002", "3499999999"]})
    assert missing.status_code == 404 and "3499999999" in missing.body["message"]
    assert query(db_url, "SELECT deleted FROM accounts WHERE number = '3400000002'") == [(False,)]
    both = api.post("/customers/delete", json={"numbers": ["3400000002", "3400000003"]})
    assert both.status_code == 200 and both.body["deleted"] == ["3400000002", "3400000003"]
    assert query(
        db_url,
        "SELECT number, deleted FROM accounts WHERE number IN ('3400000002', '3400000003',"
        " '3400000004') ORDER BY 1",
    ) == [
        ("3400000002", True),
        ("3400000003", True),
        ("3400000004", False),
    ]


def test_deleting_a_provider_disables_its_trunks(api, db_url):
    assert (
        api.post("/providers", json=customer_body(number="3400000010", email="p10@example.com")).status_code
        == 201
    )
    with psycopg.connect(db_url) as conn:
        load_document(
            conn,
            {"providers": [{"number": "3400000010", "trunks": [{"name": "doomed", "gateway": "gw-main"}]}]},
        )
    assert api.delete("/customers/3400000010").status_code == 200
    assert query(db_url, "SELECT active FROM trunks WHERE name = 'doomed'") == [(False,)]


# --------------------------------------------------------------------------- mass create


def test_mass_create_all_fields_all_or_nothing(api, db_url):
    body = {
        "count": 50,
        "prefix": "41",
        "account_length": 8,
        "generate_pin": True,
        "valid_days": 30,
        "currency": "EUR",
        "country": "DE",
        "timezone": "Europe/Berlin",
        "account_type": "postpaid",
        "balance": "-1.50",
        "credit_limit": "10",
        "cli_pool": 3,
        "rate_group": "retail",
        "non_cli_rate_group": "noncli",
        "billing_schedule": "weekly",
        "invoice_day": 2,
        "create_sip_devices": True,
    }
    response = api.post("/customers/mass-create", json=body)
    assert response.status_code == 201, response.body
    accounts = response.body["accounts"]
    numbers = [a["number"] for a in accounts]
    assert response.body["count"] == 50 and len(set(numbers)) == 50
    assert all(n.startswith("41") and len(n) == 8 for n in numbers)
    assert all(len(a["pin"]) == 6 and a["sip_password"] for a in accounts)
    rows = query(
        db_url,
        "SELECT number, first_name, currency, country, timezone, postpaid, balance, credit_limit,"
        " cli_pool, billing_schedule, invoice_day, expiry > now() + interval '29 days', pin_hash"
        " FROM accounts WHERE number = ANY(%s) AND NOT deleted ORDER BY number",
        [numbers],
    )
    assert len(rows) == 50
    first = rows[0]
    assert first[1] == first[0]  # ASTPP: first name = number
    assert first[2:12] == (
        "EUR",
        "DE",
        "Europe/Berlin",
        True,
        Decimal("-1.5"),
        Decimal(10),
        3,
        "weekly",
        2,
        True,
    )
    pins = {a["number"]: a["pin"] for a in accounts}
    assert verify_secret(pins[first[0]], first[12])
    assert query(db_url, "SELECT count(*) FROM sip_devices WHERE username = ANY(%s)", [numbers]) == [(50,)]
    assert query(
        db_url,
        "SELECT count(*) FROM balance_changes b JOIN accounts a ON a.id = b.account_id"
        " WHERE a.number = ANY(%s) AND b.kind = 'initial'",
        [numbers],
    ) == [(50,)]
    assert query(
        db_url,
        "SELECT count(*) FROM audit_log WHERE action = 'customer.mass_create' AND entity_key = ANY(%s)",
        [numbers],
    ) == [(50,)]


def test_mass_create_capacity_errors_as_astpp_computes_them(api, db_url):
    base = {"prefix": "4299999", "account_length": 8, "rate_group": "retail", "generate_pin": False}
    too_many = api.post("/customers/mass-create", json={**base, "count": 11})
    assert too_many.status_code == 422
    assert too_many.body["errors"] == [
        {"field": "count", "message": "only 10 free account numbers with prefix 4299999 and 8 digits"}
    ]
    assert api.post("/customers/mass-create", json={**base, "count": 10}).status_code == 201
    full = api.post("/customers/mass-create", json={**base, "count": 1})
    assert full.body["errors"] == [
        {"field": "prefix", "message": "no free account numbers left with prefix 4299999 and 8 digits"}
    ]
    long_prefix = api.post("/customers/mass-create", json={**base, "count": 1, "account_length": 7})
    assert long_prefix.body["errors"][0]["field"] == "account_length"
    assert "prefix is too long" in long_prefix.body["errors"][0]["message"]


def test_mass_create_writes_nothing_when_anything_fails(api, db_url):
    # a SIP device already named like one of the numbers to generate
    assert (
        api.post("/customers", json=customer_body(number="3500000001", email="sip@example.com")).status_code
        == 201
    )
    assert api.post("/customers/3500000001/sip-devices", json={"username": "43000005"}).status_code == 201
    response = api.post(
        "/customers/mass-create",
        json={
            "count": 10,
            "prefix": "4300000",
            "account_length": 8,
            "rate_group": "retail",
            "create_sip_devices": True,
        },
    )
    assert response.status_code == 422 and response.body["errors"][0]["field"] == "create_sip_devices"
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE '4300000%%'") == [(0,)]


# --------------------------------------------------------------------------- import (API)


def test_import_through_the_api_reports_each_row(api, db_url):
    text = (
        "Account,Password,First Name,Last Name,Company,Phone,Mobile,Email,Address,City,Province/State,"
        "Zip/Postal Code,Balance,Credit Limit,SIP Username,SIP Password,Concurrent Calls,CPS\n"
        "3600000001,Import123,Ivy,Imp,Imp Co,,,ivy@imp.example,,,,,7.25,0,ivy-sip,IvySecret1,2,1\n"
        "3600000002,Import123,,Imp,Imp Co,,,bad-email,,,,,1,0,,,2,1\n"
    )
    data = {
        "file": (io.BytesIO(text.encode()), "customers.csv"),
        "options": json.dumps({"defaults": {"rate_group": "retail"}}),
    }
    response = api.post("/customers/import", data=data, content_type="multipart/form-data")
    assert response.status_code == 200, response.body
    assert response.body["summary"] == {"rows": 2, "imported": 1, "failed": 1, "dry_run": False}
    assert response.body["rows"][0] == {"row": 2, "account": "3600000001", "status": "imported", "reason": ""}
    assert (
        response.body["rows"][1]["reason"]
        == "Email: 'bad-email' is not an e-mail address; First Name: required"
    )
    assert query(db_url, "SELECT balance, max_channels FROM accounts WHERE number = '3600000001'") == [
        (Decimal("7.25"), 2)
    ]
    bad_header = {"file": (io.BytesIO(b"Account,Colour\n1,red\n"), "c.csv")}
    rejected = api.post("/customers/import", data=bad_header, content_type="multipart/form-data")
    assert rejected.status_code == 422 and "Colour" in rejected.body["errors"][0]["message"]


# --------------------------------------------------------------------------- edits


def test_profile_edit_changes_only_what_is_given(api, db_url):
    assert (
        api.post("/customers", json=customer_body(number="3700000001", email="edit@example.com")).status_code
        == 201
    )
    response = api.patch("/customers/3700000001", json={"company": "Edited Ltd", "account_type": "postpaid"})
    assert response.status_code == 422 and response.body["errors"][0] == {
        "field": "account_type",
        "message": "unknown field",
    }  # immutable, as in ASTPP
    response = api.patch(
        "/customers/3700000001",
        json={
            "company": "Edited Ltd",
            "valid_days": 7,
            "localization": "uk",
            "password": "NewPass99",
            "status": "inactive",
        },
    )
    assert response.status_code == 200, response.body
    assert response.body["company"] == "Edited Ltd" and response.body["localization"] == "uk"
    assert response.body["status"] == "inactive" and response.body["valid_days"] == 7
    expiry = datetime.fromisoformat(response.body["expiry"])
    assert abs(expiry - (datetime.now(UTC) + timedelta(days=7))) < timedelta(minutes=1)  # restarts now
    cleared = api.patch("/customers/3700000001", json={"localization": None})
    assert cleared.body["localization"] is None and cleared.body["company"] == "Edited Ltd"
    ((hashed,),) = query(
        db_url, "SELECT password_hash FROM accounts WHERE number = '3700000001' AND NOT deleted"
    )
    assert verify_secret("NewPass99", hashed)
    ((before, after),) = query(
        db_url, "SELECT before, after FROM audit_log WHERE action = 'account.update' ORDER BY id LIMIT 1"
    )
    assert before["company"] == "" and after["company"] == "Edited Ltd" and "password_hash" not in after


def test_money_is_exact_decimal_in_and_out(api, db_url):
    response = api.post(
        "/customers",
        data='{"first_name": "M", "email": "money@example.com", "rate_group":'
        ' "retail", "balance": 0.1, "number": "3700000002"}',
        content_type="application/json",
    )
    assert response.status_code == 201, response.body
    assert response.body["account"]["balance"] == "0.10"
    assert query(db_url, "SELECT balance FROM accounts WHERE number = '3700000002'") == [(Decimal("0.1"),)]
    refill = api.post(
        "/customers/3700000002/refills", data='{"amount": 0.2}', content_type="application/json"
    )
    assert refill.body["balance_after"] == "0.30"  # not 0.30000000000000004
    too_precise = api.post("/customers/3700000002/refills", json={"amount": "0.0000001"})
    assert too_precise.status_code == 422 and "6 decimal places" in too_precise.body["errors"][0]["message"]


# --------------------------------------------------------------------------- reseller scope


def test_a_reseller_token_sees_and_changes_only_its_subtree(api, service, db_url):
    token = service.create_token("acme", reseller="2100000001")[1]
    acme = api.as_token(token)
    mine = acme.post(
        "/customers",
        json=customer_body(number="3800000001", email="mine@acme.example", rate_group="acme-retail"),
    )
    assert mine.status_code == 201, mine.body
    assert mine.body["account"]["reseller"] == "2100000001"  # placed under the token's reseller
    sub = acme.post(
        "/customers",
        json=customer_body(
            number="3800000002", email="sub@acme2.example", reseller="2100000002", rate_group="sub-retail"
        ),
    )
    assert sub.status_code == 201, sub.body
    other = api.post("/customers", json=customer_body(number="3800000003", email="admin-own@example.com"))
    assert other.status_code == 201

    listed = acme.get("/customers", query_string={"number": "38000000", "sort": "number"}).body
    assert [i["number"] for i in listed["items"]] == ["3800000001", "3800000002"]
    assert acme.get("/customers", query_string={"entity_type": "provider"}).body["total"] == 0
    assert acme.get("/customers/3800000003").status_code == 404
    assert acme.post("/customers/3800000003/refills", json={"amount": "1"}).status_code == 404
    assert acme.delete("/customers/3800000003").status_code == 404
    assert acme.post("/providers", json=customer_body(email="prov@acme.example")).status_code == 403
    admin_group = acme.post("/customers", json=customer_body(email="x@acme.example", rate_group="retail"))
    assert admin_group.body["errors"] == [
        {"field": "rate_group", "message": "'retail' is not a rate group of the account's reseller"}
    ]
    foreign = acme.post("/customers", json=customer_body(email="y@acme.example", reseller="2200000001"))
    assert foreign.body["errors"][0] == {"field": "reseller", "message": "no reseller with number 2200000001"}
    assert acme.post("/customers/3800000001/dids", json={"number": "442071110020"}).status_code == 403
    assert acme.post("/customers/3800000002/refills", json={"amount": "4"}).status_code == 201
    report = acme.get("/refills").body
    assert {i["account"] for i in report["items"]} == {"3800000002"}
    audit = acme.get("/audit").body
    # entries about its subtree only (3200000004 is ACME's customer the admin created)
    assert {i["account"] for i in audit["items"]} == {"3200000004", "3800000001", "3800000002"}
    assert {i["actor"].rpartition(":")[2] for i in audit["items"]} == {"acme", "admin"}
    # the admin sees the reseller's customers too (resellers' customers are in the list)
    assert (
        api.get("/customers", query_string={"reseller": "2100000002"}).body["items"][0]["number"]
        == "3800000002"
    )


def test_audit_entries_say_who_what_when_before_and_after(api, db_url):
    assert (
        api.post("/customers", json=customer_body(number="3900000001", email="audit@example.com")).status_code
        == 201
    )
    assert (
        api.post("/customers/3900000001/charges", json={"amount": "2", "description": "setup"}).status_code
        == 201
    )
    entries = api.get("/audit", query_string={"account": "3900000001"}).body["items"]
    assert [e["action"] for e in entries] == ["balance.charge", "customer.create"]
    charge = entries[0]
    assert charge["actor"].endswith(":tests-admin") and charge["entity"] == "account"
    assert charge["before"] == {"balance": "0.00"} and charge["after"]["balance"] == "-2.00"
    assert datetime.fromisoformat(charge["at"]) > datetime.now(UTC) - timedelta(minutes=1)
    assert entries[1]["before"] is None and entries[1]["after"]["number"] == "3900000001"
    with psycopg.connect(db_url) as conn:
        try:
            conn.execute("DELETE FROM audit_log")
            raise AssertionError("the audit log must be append-only")
        except psycopg.errors.InsufficientPrivilege:
            pass


def test_service_actor_from_cli_is_the_os_user():
    assert Actor.cli().name.startswith("cli:") and Actor.cli().is_admin
