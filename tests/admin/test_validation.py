"""Every validation rule answers with a message naming the field, and writes nothing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from engine.admin import schemas as s
from engine.admin.errors import ValidationFailed
from tests.admin.conftest import customer_body, query


@pytest.fixture(scope="module")
def taken(service, db_url):
    """An account whose number, e-mail and SIP username later requests collide with."""
    service.create_account(
        s.CustomerCreate(
            **customer_body(
                number="5000000001",
                email="taken@example.com",
                sip_username="taken-sip",
                sip_password="Secret123x",
            )
        )
    )
    deleted = service.create_account(
        s.CustomerCreate(**customer_body(number="5000000002", email="gone@example.com"))
    )
    service.delete_accounts([deleted.account.number])
    return "5000000001"


OMIT = "<omitted>"
PAST = (datetime.now(UTC) - timedelta(days=1)).isoformat()

# (overrides of a valid request, field named by the error, words of the message)
CREATE_CASES = [
    ({"number": "12ab"}, "number", "not a string of digits"),
    ({"number": "1" * 21}, "number", "more than 20 digits"),
    ({"number": "5000000001"}, "number", "already used by another account"),
    ({"password": "short1"}, "password", "at least 8 characters with letters and digits"),
    ({"password": "lettersonly"}, "password", "letters and digits"),
    ({"pin": "12a4"}, "pin", "a PIN of 4 to 20 digits"),
    ({"pin": "123"}, "pin", "4 to 20 digits"),
    ({"pin": "1234", "generate_pin": True}, "pin", "not both"),
    ({"email": OMIT}, "email", "required"),
    ({"email": "not-an-email"}, "email", "not an e-mail address"),
    ({"email": "TAKEN@example.com"}, "email", "already used by another account"),
    ({"first_name": " "}, "first_name", "must not be empty"),
    ({"first_name": None}, "first_name", "valid string"),
    ({"first_name": OMIT}, "first_name", "required"),
    ({"phone": "call me"}, "phone", "not a phone number"),
    ({"mobile": "07700#"}, "mobile", "not a phone number"),
    ({"currency": "usd"}, "currency", "ISO 4217"),
    ({"country": "GBR"}, "country", "ISO 3166"),
    ({"timezone": "Mars/Olympus"}, "timezone", "not a known IANA time zone"),
    ({"language": "english"}, "language", "language tag"),
    ({"status": "paused"}, "status", "'active' or 'inactive'"),
    ({"account_type": "credit"}, "account_type", "'prepaid' or 'postpaid'"),
    ({"credit_limit": "10"}, "credit_limit", "only postpaid accounts have a credit limit"),
    ({"account_type": "postpaid", "credit_limit": "-1"}, "credit_limit", "must be at least 0"),
    ({"balance": "1.1234567"}, "balance", "more than 6 decimal places"),
    ({"balance": "1e20"}, "balance", "too large"),
    ({"balance": "ten"}, "balance", "not a decimal number"),
    ({"billing_schedule": "yearly"}, "billing_schedule", "'daily', 'weekly' or 'monthly'"),
    ({"billing_schedule": "weekly", "invoice_day": 8}, "invoice_day", "1-7 for a weekly"),
    ({"billing_schedule": "monthly", "invoice_day": 29}, "invoice_day", "1-28 for a monthly"),
    (
        {"billing_schedule": "daily", "invoice_day": 1},
        "invoice_day",
        "daily billing schedule has no invoice day",
    ),
    ({"notify_enabled": True}, "notify_balance_below", "required when notify_enabled"),
    ({"notify_email": "x@y"}, "notify_email", "not an e-mail address"),
    ({"expiry": PAST}, "expiry", "must be in the future"),
    ({"expiry": "someday"}, "expiry", "not an ISO 8601 date/time"),
    ({"expiry_from_first_use": True}, "valid_days", "required when expiry_from_first_use"),
    ({"valid_days": -1}, "valid_days", "greater than or equal to 0"),
    ({"max_channels": -1}, "max_channels", "greater than or equal to 0"),
    ({"cps": "many"}, "cps", "valid integer"),
    ({"cli_pool": 9}, "cli_pool", "less than or equal to 8"),
    ({"cli_pool": 4}, "non_cli_rate_group", "required when cli_pool is 3, 4 or 5"),
    ({"rate_group": OMIT}, "rate_group", "required for a customer"),
    ({"rate_group": "nope"}, "rate_group", "no rate group named 'nope'"),
    ({"rate_group": "closed"}, "rate_group", "'closed' is inactive"),
    ({"rate_group": "acme-retail"}, "rate_group", "not a rate group of the admin"),
    ({"cli_pool": 3, "non_cli_rate_group": "nope"}, "non_cli_rate_group", "no rate group named 'nope'"),
    ({"localization": "nowhere"}, "localization", "no localization named 'nowhere'"),
    ({"reseller": "9999999999"}, "reseller", "no reseller with number 9999999999"),
    ({"reseller": "9100000001"}, "reseller", "no reseller with number 9100000001"),  # a provider
    ({"reseller": "2100000001"}, "rate_group", "not a rate group of the account's reseller"),
    ({"sip_username": "taken-sip"}, "sip_username", "already taken by another SIP device"),
    ({"sip_username": "bad user"}, "sip_username", "not a SIP username"),
    ({"sip_password": "short"}, "sip_password", "at least 8 characters"),
    ({"sip_username": "new-sip", "create_sip_device": False}, "create_sip_device", "is false but"),
    ({"codecs": "PCMA,,PCMU"}, "codecs", "comma list of codecs"),
    ({"local_call_cost_per_minute": "-0.01"}, "local_call_cost_per_minute", "must be at least 0"),
    ({"reference": "r" * 101}, "reference", "longer than 100 characters"),
    ({"invoice_note": "n" * 111}, "invoice_note", "longer than 110 characters"),
    ({"favourite_colour": "blue"}, "favourite_colour", "unknown field"),
]


@pytest.mark.parametrize(
    ("overrides", "field", "words"), CREATE_CASES, ids=[c[1] + ":" + c[2] for c in CREATE_CASES]
)
def test_create_customer_rule(api, db_url, taken, overrides, field, words):
    body = {**customer_body(number="5100000001", email="new@example.com"), **overrides}
    body = {k: v for k, v in body.items() if v != OMIT}
    response = api.post("/customers", json=body)
    assert response.status_code == 422, response.body
    errors = {e["field"]: e["message"] for e in response.body["errors"]}
    assert field in errors, errors
    assert words in errors[field], errors[field]
    assert response.body["error"] == "validation_failed"
    assert query(
        db_url, "SELECT count(*) FROM accounts WHERE number = '5100000001' OR email = 'new@example.com'"
    ) == [(0,)]


def test_a_number_or_email_of_a_deleted_account_is_free_again(api, taken):
    response = api.post("/customers", json=customer_body(number="5000000002", email="gone@example.com"))
    assert response.status_code == 201, response.body


def test_every_problem_is_reported_at_once(api, taken):
    response = api.post(
        "/customers",
        json=customer_body(
            number="5000000001", email="taken@example.com", rate_group="nope", credit_limit="5"
        ),
    )
    assert {e["field"] for e in response.body["errors"]} == {"number", "email", "rate_group", "credit_limit"}


def test_number_generation_never_loops_when_the_space_is_full(service_for):
    svc = service_for(account_number_length=5, account_number_start_digit="98")
    svc.mass_create(
        s.MassCreate(count=1000, prefix="98", account_length=5, rate_group="retail", generate_pin=False)
    )
    with pytest.raises(ValidationFailed) as exc:
        svc.create_account(s.CustomerCreate(**customer_body(email="full@example.com")))
    assert exc.value.errors[0].field == "number"
    assert "no free account number to generate (0 left with 5 digits)" in exc.value.errors[0].message


UPDATE_CASES = [
    ({"number": "5200000009"}, "number", "unknown field"),
    ({"balance": "100"}, "balance", "unknown field"),
    ({"reseller": "2100000001"}, "reseller", "unknown field"),
    ({"credit_limit": "5"}, "credit_limit", "only postpaid accounts have a credit limit"),
    ({"email": "TAKEN@example.com"}, "email", "already used by another account"),
    ({"email": None}, "email", "required"),
    ({"first_name": None}, "first_name", "valid string"),
    ({"rate_group": None}, "rate_group", "required for a customer"),
    ({"status": None}, "status", "'active' or 'inactive'"),
    ({"expiry": PAST}, "expiry", "must be in the future"),
    ({"password": "weak"}, "password", "letters and digits"),
    ({"notify_enabled": True}, "notify_balance_below", "required when notify_enabled"),
]


@pytest.mark.parametrize(
    ("change", "field", "words"), UPDATE_CASES, ids=[c[1] + ":" + c[2] for c in UPDATE_CASES]
)
def test_update_customer_rule(api, taken, change, field, words):
    if api.get("/customers/5200000001").status_code == 404:
        assert (
            api.post(
                "/customers", json=customer_body(number="5200000001", email="upd@example.com")
            ).status_code
            == 201
        )
    response = api.patch("/customers/5200000001", json=change)
    assert response.status_code == 422, response.body
    errors = {e["field"]: e["message"] for e in response.body["errors"]}
    assert words in errors.get(field, ""), errors
    assert api.get("/customers/5200000001").body["email"] == "upd@example.com"


MASS_CASES = [
    ({"count": 0}, "count", "greater than or equal to 1"),
    ({"count": 100001}, "count", "less than or equal to 100000"),
    ({"prefix": ""}, "prefix", "string of digits"),
    ({"account_length": 21}, "account_length", "less than or equal to 20"),
    ({"account_length": 2}, "account_length", "prefix is too long"),
    ({"rate_group": "nope"}, "rate_group", "no rate group named 'nope'"),
    ({"credit_limit": "5"}, "credit_limit", "only postpaid accounts"),
    ({"cli_pool": 5}, "non_cli_rate_group", "required when cli_pool"),
    ({"billing_schedule": "weekly", "invoice_day": 9}, "invoice_day", "1-7 for a weekly"),
    ({"currency": "euro"}, "currency", "ISO 4217"),
]


@pytest.mark.parametrize(("overrides", "field", "words"), MASS_CASES, ids=[c[1] for c in MASS_CASES])
def test_mass_create_rule(api, db_url, overrides, field, words):
    body = {"count": 3, "prefix": "53", "account_length": 8, "rate_group": "retail", **overrides}
    response = api.post("/customers/mass-create", json=body)
    assert response.status_code == 422, response.body
    errors = {e["field"]: e["message"] for e in response.body["errors"]}
    assert words in errors.get(field, ""), errors
    assert query(
        db_url, "SELECT count(*) FROM accounts WHERE number LIKE '53%%' AND char_length(number) = 8"
    ) == [(0,)]


def test_sub_resource_rules(api, taken):
    n = "5000000001"
    checks = [
        (api.post(f"/customers/{n}/ip-map", json={"cidr": "10.1.2.3/8"}), "cidr", "not a valid CIDR"),
        (
            api.post(f"/customers/{n}/ip-map", json={"cidr": "10.0.0.0/8", "tech_prefix": "1a"}),
            "tech_prefix",
            "string of digits",
        ),
        (api.post(f"/customers/{n}/caller-ids", json={"number": "+44"}), "number", "string of digits"),
        (api.put(f"/customers/{n}/speed-dials/1234", json={"number": "44"}), "key", "1 to 3 digits"),
        (api.put(f"/customers/{n}/speed-dials/1", json={"number": ""}), "number", "string of digits"),
        (api.post(f"/customers/{n}/blocked-codes", json={"prefix": "44x"}), "prefix", "string of digits"),
        (api.post(f"/customers/{n}/dids", json={"number": "999"}), "number", "no DID 999"),
        (
            api.post(f"/customers/{n}/dids", json={"number": "442071110019", "destination": "ghost"}),
            "destination",
            "not a SIP device of this account",
        ),
        (
            api.post(
                f"/customers/{n}/dids",
                json={"number": "442071110019", "destination_type": "number", "destination": "abc"},
            ),
            "destination",
            "must be digits",
        ),
        (api.post(f"/customers/{n}/sip-devices", json={"password": "short"}), "password", "at least 8"),
        (api.post(f"/customers/{n}/refills", json={"amount": "0"}), "amount", "greater than 0"),
        (api.post(f"/customers/{n}/refills", json={"amount": "-5"}), "amount", "must be at least 0"),
        (api.post(f"/customers/{n}/charges", json={}), "amount", "required"),
        (
            api.put(f"/customers/{n}/alert-threshold", json={"notify_enabled": True}),
            "notify_balance_below",
            "required when notify_enabled",
        ),
        (api.put(f"/customers/{n}/forced-caller-id", json={"number": "abc"}), "number", "string of digits"),
    ]
    for response, field, words in checks:
        assert response.status_code == 422, (field, response.status_code, response.body)
        errors = {e["field"]: e["message"] for e in response.body["errors"]}
        assert words in errors.get(field, ""), (field, errors)
    # uniqueness rules of the sub-resources: a conflict (409), not a bad field
    taken = api.post(f"/customers/{n}/sip-devices", json={"username": "taken-sip"})
    assert taken.status_code == 409 and taken.body["error"] == "conflict"
    assert taken.body["errors"] == [
        {"field": "username", "message": "taken-sip is already taken by another SIP device"}
    ]
    assert (
        api.post(f"/customers/{n}/ip-map", json={"cidr": "10.77.0.0/16", "tech_prefix": "5"}).status_code
        == 201
    )
    dupe = api.post(f"/customers/{n}/ip-map", json={"cidr": "10.77.0.0/16", "tech_prefix": "5"})
    assert dupe.status_code == 409
    assert dupe.body["errors"][0]["field"] == "cidr" and "already mapped" in dupe.body["errors"][0]["message"]
    assert api.post(f"/customers/{n}/caller-ids", json={"number": "4412"}).status_code == 201
    assert api.post(f"/customers/{n}/caller-ids", json={"number": "4412"}).body["errors"][0] == {
        "field": "number",
        "message": "is already a caller ID of this account",
    }
    assert api.post(f"/customers/{n}/blocked-codes", json={"prefix": "900"}).status_code == 201
    assert api.post(f"/customers/{n}/blocked-codes", json={"prefix": "900"}).body["errors"][0] == {
        "field": "prefix",
        "message": "is already blocked for this account",
    }
    assert api.post(f"/customers/{n}/dids", json={"number": "442071110018"}).status_code == 201
    other = api.post("/customers", json=customer_body(number="5000000003", email="other3@example.com"))
    assert other.status_code == 201
    again = api.post("/customers/5000000003/dids", json={"number": "442071110018"})
    assert again.body["errors"][0] == {"field": "number", "message": "DID 442071110018 is already assigned"}


def test_token_rules(service):
    with pytest.raises(ValidationFailed) as exc:
        service.create_token("x", reseller="9999999999")
    assert str(exc.value) == "reseller: no reseller with number 9999999999"
    with pytest.raises(ValidationFailed) as exc:
        service.create_token(" ")
    assert exc.value.errors[0].field == "name"
    with pytest.raises(ValidationFailed) as exc:
        service.create_token("y", expires_days=0)
    assert exc.value.errors[0].field == "expires_days"


def test_the_cli_prints_each_error_with_its_field(cli, taken):
    result = cli(
        "admin",
        "customer",
        "create",
        "--first-name",
        "C",
        "--email",
        "taken@example.com",
        "--rate-group",
        "retail",
        "--credit-limit",
        "3",
    )
    assert result.rc == 1
    assert "callgate: email: taken@example.com is already used by another account" in result.err
    assert "callgate: credit_limit: only postpaid accounts have a credit limit" in result.err


def test_an_edit_answers_only_for_what_it_changes(api, db_url):
    """Accounts loaded by fixtures may break today's form rules; an edit of other fields still works."""
    import psycopg

    from engine.db.fixtures import load_document

    with psycopg.connect(db_url) as conn:  # no first name, no e-mail, the admin's rate group under a reseller
        load_document(
            conn, {"customers": [{"number": "5300000001", "reseller": "2100000001", "rate_group": "retail"}]}
        )
    edited = api.patch("/customers/5300000001", json={"company": "Legacy Ltd"})
    assert edited.status_code == 200, edited.body
    assert edited.body["company"] == "Legacy Ltd" and edited.body["rate_group"] == "retail"
    regroup = api.patch("/customers/5300000001", json={"rate_group": "retail"})
    assert regroup.body["errors"] == [
        {"field": "rate_group", "message": "'retail' is not a rate group of the account's reseller"}
    ]
    assert (
        api.patch("/customers/5300000001", json={"first_name": ""}).body["errors"][0]["field"] == "first_name"
    )
    assert api.patch("/customers/5300000001", json={"rate_group": "acme-retail"}).status_code == 200


def test_admin_settings_are_checked():
    from engine.admin.settings import AdminSettings, admin_settings
    from engine.config import ConfigError

    assert admin_settings(object()) == AdminSettings()  # until Config has an [admin] section
    with pytest.raises(ConfigError) as exc:
        AdminSettings(pin_length=2, account_number_start_digit="12345678", default_timezone="Nowhere").check()
    assert str(exc.value).startswith("[admin] ")
    for words in ("pin_length", "account_number_start_digit", "default_timezone"):
        assert words in str(exc.value)


@pytest.mark.parametrize(
    ("destination", "ok"),
    [
        ("alice@sip.example.com", True),
        ("sip:alice@198.51.100.9:5080;transport=tcp", True),
        ("[2001:db8::5]", True),
        ("", False),
        ("alice@sip.example.com,sofia/gateway/evil/123", False),  # a second bridge target
        ("{absolute_codec_string=PCMU}alice@host", False),  # channel variables
        ("alice @host", False),
        ("alice@host|other@host", False),
    ],
)
def test_a_did_uri_destination_is_checked_on_save_by_the_call_paths_rule(api, taken, destination, ok):
    from engine.rules.text import is_sip_uri

    assert is_sip_uri(destination) is ok  # the rule the engine refuses a call with
    n = "5000000001"
    body = {"number": "442071110017", "destination_type": "uri", "destination": destination}
    response = api.post(f"/customers/{n}/dids", json=body)
    if ok:
        assert response.status_code == 201, response.body
        assert api.delete(f"/customers/{n}/dids/442071110017").status_code == 204
        return
    assert response.status_code == 422, response.body
    assert response.body["errors"][0]["field"] == "destination"
    # an edit is held to the same rule
    assigned = api.post(f"/customers/{n}/dids", json={"number": "442071110017"})
    assert assigned.status_code == 201, assigned.body
    edit = api.patch(
        f"/customers/{n}/dids/442071110017", json={"destination_type": "uri", "destination": destination}
    )
    assert edit.status_code == 422, edit.body
    assert api.delete(f"/customers/{n}/dids/442071110017").status_code == 204


def test_the_fixture_loader_checks_did_uris_and_never_echoes_a_secret(db_url):
    from engine.db.fixtures import FixtureError, load_document

    document = {
        "dids": [
            {"number": "449990000001", "destination_type": "uri", "destination": "a@b,sofia/gateway/x/1"}
        ],
        "customers": [
            {"number": "5900000001", "pin": "12ab34"},
            {
                "number": "5900000002",
                "sip_devices": [{"username": "fx-dev", "password": "x", "voicemail_password": "98x76"}],
            },
        ],
    }
    with psycopg.connect(db_url) as conn, pytest.raises(FixtureError) as caught:
        load_document(conn, document)
    problems = caught.value.problems
    assert any(
        p.startswith("dids[0].destination: 'a@b,sofia/gateway/x/1' is not a SIP URI") for p in problems
    )
    assert "customers[0].pin: must be a PIN of digits" in problems
    assert (
        "customers[1].sip_devices[0].voicemail_password: must be a voicemail password of digits" in problems
    )
    assert not any("12ab34" in p or "98x76" in p for p in problems)
