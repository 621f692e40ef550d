"""CSV import (ASTPP's sample header, mappings, defaults, dry run, conventions) and export."""

from __future__ import annotations

import csv
import io
from decimal import Decimal
from pathlib import Path

import pytest

from engine.admin import schemas as s
from engine.admin.errors import ValidationFailed
from engine.admin.service import AdminService
from engine.db.fixtures import verify_secret
from tests.admin.conftest import customer_body, query

HEADER = (
    "Account,Password,First Name,Last Name,Company,Phone,Mobile,Email,Address,City,Province/State,"
    "Zip/Postal Code,Balance,Credit Limit,SIP Username,SIP Password,Concurrent Calls,CPS"
)

# line -> (CSV line, expected status, expected reason)
ROWS = {
    2: (
        "6100000001,Import123,Ivy,Imp,Imp Co,+44 20 7946 0001,07700 900001,ivy@imp.example,1 High St,London,"
        "Greater London,N1 1AA,12.50,0,ivy-sip,IvySecret1,3,2",
        "imported",
        "",
    ),
    3: ("6100000002,,Jon,,,,,jon@imp.example,,,,,,,,,,", "imported", ""),
    4: ("6100000003,,Kim,,,,,,,,,,,,,,,", "failed", "Email: required"),
    5: ("6100000004,,Lou,,,,,nope,,,,,,,,,,", "failed", "Email: 'nope' is not an e-mail address"),
    6: (
        "6100000005,,Max,,,,,IVY@imp.example,,,,,,,,,,",
        "failed",
        "Email: IVY@imp.example repeats the one on line 2",
    ),
    7: (
        "6100000006,,Ned,,,,,existing@imp.example,,,,,,,,,,",
        "failed",
        "Email: existing@imp.example is already used by another account",
    ),
    8: (
        "6100000001,,Oda,,,,,oda@imp.example,,,,,,,,,,",
        "failed",
        "Account: 6100000001 repeats the one on line 2",
    ),
    9: (
        "6100009999,,Pat,,,,,pat@imp.example,,,,,,,,,,",
        "failed",
        "Account: 6100009999 is already used by another account",
    ),
    10: (
        "61000abc,,Quin,,,,,quin@imp.example,,,,,,,,,,",
        "failed",
        "Account: '61000abc' is not a string of digits",
    ),
    11: (
        "6100000011,weak,Rae,,,,,rae@imp.example,,,,,,,,,,",
        "failed",
        "Password: must be a password of at least 8 characters with letters and digits",
    ),
    12: (
        '6100000012,,Sam,,,,,sam@imp.example,,,,,"12,50",,,,,',
        "failed",
        "Balance: '12,50' is not a decimal number",
    ),
    13: (
        "6100000013,,Tia,,,,,tia@imp.example,,,,,5,50,,,,",
        "failed",
        "Credit Limit: only postpaid accounts have a credit limit",
    ),
    14: (
        "6100000014,,Uma,,,,,uma@imp.example,,,,,,,,,,,extra",
        "failed",
        "the row has 19 cells, the header 18",
    ),
    15: (
        "6100000015,,Vic,,,,,vic@imp.example,,,,,,,existing-sip,VicSecret1,,",
        "failed",
        "SIP Username: existing-sip is already taken by another SIP device",
    ),
    16: (
        "6100000016,,Wes,,,,,wes@imp.example,,,,,,,wes-sip,,,",
        "failed",
        "SIP Password: required to create a SIP device here",
    ),
    17: ("6100000017,,,,,,,xan@imp.example,,,,,,,,,,", "failed", "First Name: required"),
    18: ("", None, None),  # a blank line is not a record
    19: (",,Yas,,,,,yas@imp.example,,,,,,,,,,", "imported", ""),  # no number: one is generated
    20: (
        "6100000020,,Zoe,,,,,zoe@imp.example,,,,,,,,,-1,",
        "failed",
        "Concurrent Calls: Input should be greater than or equal to 0",
    ),
    21: (
        "6100000021,,Abe,,,call me,,abe@imp.example,,,,,,,,,,",
        "failed",
        "Phone: 'call me' is not a phone number",
    ),
    22: ("  6100000022 ,,Bea, Bee ,,,,  BEA@Imp.Example ,,,,,0.10,,,,,", "imported", ""),
}


def _file(rows: dict[int, tuple]) -> str:
    return HEADER + "\n" + "\n".join(r[0] for _, r in sorted(rows.items())) + "\n"


@pytest.fixture(scope="module")
def existing(service):
    service.create_account(
        s.CustomerCreate(
            **customer_body(
                number="6100009999",
                email="existing@imp.example",
                sip_username="existing-sip",
                sip_password="Secret123x",
            )
        )
    )


def test_import_of_astpp_sample_file_reports_every_row_and_writes_only_good_ones(service, db_url, existing):
    options = s.ImportOptions(defaults={"rate_group": "retail"})
    results = list(service.import_csv(io.StringIO(_file(ROWS)), options))
    assert [r.row for r in results] == [n for n, r in sorted(ROWS.items()) if r[1]]
    for result in results:
        _line, status, reason = ROWS[result.row]
        assert (result.status, result.reason) == (status, reason), result.row
    generated = next(r.account for r in results if r.row == 19)
    assert generated and len(generated) == 10 and generated.isdigit()
    assert next(r.account for r in results if r.row == 22) == "6100000022"

    row = query(
        db_url,
        "SELECT first_name, last_name, company, phone, mobile, email, address_1, city, province,"
        " postal_code, balance, max_channels, cps, password_hash, pin_hash FROM accounts"
        " WHERE number = '6100000001' AND NOT deleted",
    )[0]
    assert row[:13] == (
        "Ivy",
        "Imp",
        "Imp Co",
        "+44 20 7946 0001",
        "07700 900001",
        "ivy@imp.example",
        "1 High St",
        "London",
        "Greater London",
        "N1 1AA",
        Decimal("12.5"),
        3,
        2,
    )
    assert verify_secret("Import123", row[13]) and row[14] is None  # an import generates no PIN nobody sees
    assert query(db_url, "SELECT password FROM sip_devices WHERE username = 'ivy-sip'") == [("IvySecret1",)]
    assert query(db_url, "SELECT password_hash FROM accounts WHERE number = '6100000002'") == [(None,)]
    assert query(db_url, "SELECT last_name, email, balance FROM accounts WHERE number = '6100000022'") == [
        ("Bee", "BEA@Imp.Example", Decimal("0.1"))
    ]  # cells are trimmed
    imported = ["6100000001", "6100000002", "6100000022", generated]
    assert query(
        db_url, "SELECT count(*) FROM accounts WHERE number = ANY(%s) AND NOT deleted", [imported]
    ) == [(4,)]
    failed_emails = [
        "kim@imp.example",
        "lou@imp.example",
        "max@imp.example",
        "oda@imp.example",
        "pat@imp.example",
        "quin@imp.example",
        "rae@imp.example",
        "sam@imp.example",
        "tia@imp.example",
        "uma@imp.example",
        "vic@imp.example",
        "wes@imp.example",
        "xan@imp.example",
        "zoe@imp.example",
        "abe@imp.example",
    ]
    assert query(db_url, "SELECT count(*) FROM accounts WHERE lower(email) = ANY(%s)", [failed_emails]) == [
        (0,)
    ]
    assert query(db_url, "SELECT count(*) FROM sip_devices WHERE username = 'wes-sip'") == [(0,)]
    assert query(
        db_url,
        "SELECT count(*) FROM audit_log WHERE action = 'account.import' AND entity = 'account'"
        " AND entity_key = ANY(%s)",
        [imported],
    ) == [(4,)]
    assert query(
        db_url,
        "SELECT b.amount FROM balance_changes b JOIN accounts a ON a.id = b.account_id"
        " WHERE a.number = '6100000001'",
    ) == [(Decimal("12.5"),)]


def test_duplicates_across_chunks_are_caught_by_the_database(service_for, db_url, existing):
    svc = service_for(import_chunk_size=2)
    text = (
        HEADER
        + "\n"
        + "\n".join(
            [
                "6200000001,,A,,,,,a@chunk.example,,,,,,,,,,",
                "6200000002,,B,,,,,b@chunk.example,,,,,,,,,,",
                "6200000001,,C,,,,,c@chunk.example,,,,,,,,,,",
                "6200000004,,D,,,,,A@CHUNK.example,,,,,,,,,,",
            ]
        )
        + "\n"
    )
    results = list(svc.import_csv(io.StringIO(text), s.ImportOptions(defaults={"rate_group": "retail"})))
    assert [(r.row, r.status, r.reason) for r in results] == [
        (2, "imported", ""),
        (3, "imported", ""),
        (4, "failed", "Account: 6200000001 is already used by another account"),
        (5, "failed", "Email: A@CHUNK.example is already used by another account"),
    ]


def test_a_row_failing_at_insert_time_is_rolled_back_alone(service, db_url, existing, monkeypatch):
    # a concurrent writer took a SIP username after the checks: the chunk is redone row by row
    monkeypatch.setattr(AdminService, "_taken_usernames", lambda self, names: set())
    text = (
        HEADER
        + "\n"
        + "\n".join(
            [
                "6300000001,,A,,,,,a@race.example,,,,,,,race-a,RaceSecret1,,",
                "6300000002,,B,,,,,b@race.example,,,,,5,,existing-sip,RaceSecret1,,",
                "6300000003,,C,,,,,c@race.example,,,,,,,race-c,RaceSecret1,,",
            ]
        )
        + "\n"
    )
    results = list(service.import_csv(io.StringIO(text), s.ImportOptions(defaults={"rate_group": "retail"})))
    assert [(r.row, r.status) for r in results] == [(2, "imported"), (3, "failed"), (4, "imported")]
    assert results[1].reason == "SIP Username: is already taken by another SIP device"
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number = '6300000002'") == [(0,)]
    assert query(
        db_url,
        "SELECT count(*) FROM balance_changes b JOIN accounts a ON a.id = b.account_id"
        " WHERE a.email = 'b@race.example'",
    ) == [(0,)]
    assert query(db_url, "SELECT count(*) FROM sip_devices WHERE username IN ('race-a', 'race-c')") == [(2,)]


def test_dry_run_checks_every_row_and_writes_nothing(service, db_url):
    text = HEADER + "\n6400000001,,Dry,,,,,dry@run.example,,,,,3,,,,,\n6400000002,,Bad,,,,,bad,,,,,,,,,,\n"
    options = s.ImportOptions(defaults={"rate_group": "retail"}, dry_run=True)
    results = list(service.import_csv(io.StringIO(text), options))
    assert [(r.status, r.reason) for r in results] == [
        ("would_import", ""),
        ("failed", "Email: 'bad' is not an e-mail address"),
    ]
    assert query(db_url, "SELECT count(*) FROM accounts WHERE number LIKE '64000%%'") == [(0,)]
    assert query(db_url, "SELECT count(*) FROM audit_log WHERE entity_key = '6400000001'") == [(0,)]
    real = list(service.import_csv(io.StringIO(text), options.model_copy(update={"dry_run": False})))
    assert [r.status for r in real] == ["imported", "failed"]


def test_column_mapping_ignored_columns_and_defaults(service, db_url):
    text = (
        "Customer No,Mail,Given Name,Plan,Notes,Tariff\n"
        "6500000001,map@example.com,Mapped,postpaid,hello,noncli\n"
    )
    options = s.ImportOptions(
        mapping={
            "Customer No": "number",
            "Mail": "email",
            "Given Name": "first_name",
            "Plan": "account_type",
            "Notes": None,
            "tariff": "rate_group",
        },
        defaults={"currency": "EUR", "credit_limit": "25", "billing_schedule": "Daily", "max_channels": 4},
    )
    results = list(service.import_csv(io.StringIO(text), options))
    assert [(r.status, r.reason) for r in results] == [("imported", "")]
    assert query(
        db_url,
        "SELECT first_name, postpaid, rate_group_id IS NOT NULL, currency, credit_limit,"
        " billing_schedule, invoice_day, max_channels FROM accounts WHERE number = '6500000001'",
    ) == [("Mapped", True, True, "EUR", Decimal(25), "daily", None, 4)]


@pytest.mark.parametrize(
    ("header", "options", "field", "words"),
    [
        ("Account,Colour", {}, "header", "column 'Colour' is not a customer field"),
        ("Account,Email", {"mapping": {"Phone": "phone"}}, "mapping.phone", "no such column"),
        ("Account,Mail", {"mapping": {"Mail": "e_mail"}}, "mapping.Mail", "'e_mail' is not a customer field"),
        ("Account,Email,E-mail", {"mapping": {"E-mail": "email"}}, "header", "both give email"),
        ("Account,Account", {}, "header", "appears 2 times"),
        ("Account", {"defaults": {"max_channels": "many"}}, "defaults.max_channels", "valid integer"),
        ("Account", {"defaults": {"password": "Secret123"}}, "defaults.password", "no default"),
        ("Account", {"defaults": {"shoe_size": "9"}}, "defaults.shoe_size", "not a customer field"),
        ("Account,Balance (held)", {"balance_convention": "astpp"}, "balance_convention", "says held"),
        ("", {}, "file", "header"),
    ],
)
def test_a_bad_header_mapping_or_default_is_refused_before_any_row(service, header, options, field, words):
    with pytest.raises(ValidationFailed) as exc:
        service.import_csv(io.StringIO(header + "\n1,2\n"), s.ImportOptions(**options))
    errors = [(e.field, e.message) for e in exc.value.errors]
    assert any(f == field and words in m for f, m in errors), errors


def test_postpaid_balances_need_a_convention(service, db_url):
    text = (
        "Account,First Name,Email,Account Type,Balance,Credit Limit\n"
        "6600000001,P,p1@conv.example,postpaid,20,100\n"
        "6600000002,Q,q1@conv.example,prepaid,20,\n"
    )
    options = s.ImportOptions(defaults={"rate_group": "retail"})
    results = list(service.import_csv(io.StringIO(text), options))
    assert results[0].status == "failed" and results[0].reason.startswith(
        "Balance: a postpaid balance needs the file's convention"
    )
    assert results[1].status == "imported"  # prepaid: both conventions agree
    astpp = text.replace("6600000002,Q,q1", "6600000003,Q,q3").replace("p1@", "p2@")
    results = list(
        service.import_csv(io.StringIO(astpp), options.model_copy(update={"balance_convention": "astpp"}))
    )
    assert [r.status for r in results] == ["imported", "imported"]
    assert query(db_url, "SELECT balance FROM accounts WHERE number = '6600000001'") == [
        (Decimal(-20),)
    ]  # owed 20
    held = (
        "Account,First Name,Email,Account Type,Balance (held),Credit Limit\n"
        "6600000004,R,r@conv.example,Postpaid,-7.5,100\n"
    )
    assert [r.status for r in service.import_csv(io.StringIO(held), options)] == ["imported"]
    assert query(db_url, "SELECT balance FROM accounts WHERE number = '6600000004'") == [(Decimal("-7.5"),)]


def test_export_then_import_round_trips(api, service, db_url):
    made = [
        customer_body(
            number="6700000001",
            email="rt1@example.com",
            first_name="Round",
            last_name="Trip",
            company="RT Co",
            account_type="postpaid",
            balance="-30",
            credit_limit="90",
            currency="EUR",
            localization="uk",
            max_channels=7,
            billing_schedule="weekly",
            invoice_day=1,
            valid_days=40,
            status="inactive",
        ),
        customer_body(
            number="6700000002",
            email="rt2@example.com",
            reseller="2100000001",
            rate_group="acme-retail",
            balance="12.345",
        ),
    ]
    for body in made:
        assert api.post("/customers", json=body).status_code == 201
    before = api.get("/customers", query_string={"number": "67000000", "sort": "number"}).body["items"]
    exported = api.get("/customers/export", query_string={"number": "67000000", "sort": "number"}).get_data(
        as_text=True
    )
    assert api.post("/customers/delete", json={"numbers": ["6700000001", "6700000002"]}).status_code == 200
    results = list(service.import_csv(io.StringIO(exported), s.ImportOptions()))
    assert [(r.status, r.reason) for r in results] == [("imported", ""), ("imported", "")]
    after = api.get("/customers", query_string={"number": "67000000", "sort": "number"}).body["items"]
    ignore = {"created", "first_used"}
    assert [{k: v for k, v in r.items() if k not in ignore} for r in after] == [
        {k: v for k, v in r.items() if k not in ignore} for r in before
    ]


def test_cli_import_writes_the_report_shows_progress_and_fails_when_a_row_fails(cli, db_url, tmp_path: Path):
    source = tmp_path / "customers.csv"
    source.write_text(
        HEADER + "\n6800000001,,Cli,,,,,cli1@imp.example,,,,,,,,,,\n6800000002,,Cli,,,,,broken,,,,,,,,,,\n",
        encoding="utf-8",
    )
    report = tmp_path / "report.csv"
    result = cli(
        "admin",
        "customer",
        "import",
        str(source),
        "--default",
        "rate_group=retail",
        "--report",
        str(report),
        "--progress",
    )
    assert result.rc == 1
    assert "2 rows: imported 1, failed 1" in result.err
    assert "importing" in result.err and "100%" in result.err  # the progress bar
    assert list(csv.reader(report.open())) == [
        ["row", "account", "status", "reason"],
        ["2", "6800000001", "imported", ""],
        ["3", "6800000002", "failed", "Email: 'broken' is not an e-mail address"],
    ]
    dry = cli(
        "admin",
        "customer",
        "import",
        str(source),
        "--default",
        "rate_group=retail",
        "--dry-run",
        "--map",
        "Password=",
    )
    assert dry.rc == 1 and "would import 0" in dry.err  # 6800000001 exists now
    rows = list(csv.reader(io.StringIO(dry.out)))
    assert rows[1][3].startswith("Account: 6800000001 is already used by another account")
    bad = cli("admin", "customer", "import", str(source), "--map", "Colour=x")
    assert bad.rc == 1 and "mapping.colour: no such column in the file" in bad.err
    ok = tmp_path / "ok.csv"
    ok.write_text("Account,First Name,Email\n6800000003,Fine,fine@imp.example\n", encoding="utf-8")
    assert cli("admin", "customer", "import", str(ok), "--default", "rate_group=retail").rc == 0


def test_cli_export(cli, api, tmp_path: Path):
    assert (
        api.post(
            "/customers",
            json=customer_body(number="6900000001", email="exp@example.com", company="=HYPERLINK(1)"),
        ).status_code
        == 201
    )
    out = tmp_path / "export.csv"
    result = cli(
        "admin", "customer", "export", "--number", "6900000001", "--number-op", "eq", "--output", str(out)
    )
    assert result.rc == 0
    rows = list(csv.reader(out.open()))
    assert rows[0][8] == "Balance (held)" and rows[1][2] == "6900000001"
    assert rows[1][5] == "'=HYPERLINK(1)"  # never a formula in a spreadsheet
    stdout = cli("admin", "customer", "export", "--number", "6900000001", "--balance-convention", "astpp")
    assert "Balance (astpp)" in stdout.out.splitlines()[0]


def test_latin1_bytes_fail_their_row_and_a_latin1_header_refuses_the_file(api):
    data = {
        "file": (
            io.BytesIO(
                b"Account,First Name,Email\n6900000009,J\xe9r\xf4me,j@example.com\n"
                b"6900000010,Jo,jo10@example.com\n"
            ),
            "latin1.csv",
        ),
        "options": '{"defaults": {"rate_group": "retail"}}',
    }
    response = api.post("/customers/import", data=data, content_type="multipart/form-data")
    assert response.status_code == 200
    rows = [(r["row"], r["status"], r["reason"]) for r in response.body["rows"]]
    assert rows == [
        (2, "failed", "the line is not UTF-8 text (byte 0xE9 at byte 13)"),
        (3, "imported", ""),
    ]
    header = {"file": (io.BytesIO(b"Acc\xf4unt,Email\n1,a@b.example\n"), "latin1.csv")}
    response = api.post("/customers/import", data=header, content_type="multipart/form-data")
    assert response.status_code == 422
    assert response.body["errors"] == [{"field": "file", "message": "is not UTF-8 text"}]
