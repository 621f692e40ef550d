"""The customer module through the CLI (`callgate admin ...`), against a real PostgreSQL."""

from __future__ import annotations

import argparse
import csv
import io
import json
from decimal import Decimal
from pathlib import Path

from engine.admin import cli as admin_cli
from engine.db.fixtures import verify_secret
from tests.admin.conftest import query


def test_register_adds_admin_and_api_to_the_callgate_parser():
    parser = argparse.ArgumentParser(prog="callgate")
    parser.add_argument("--config")
    admin_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["admin", "customer", "list", "--json"])
    assert (args.command, args.admin_argv) == ("admin", ["customer", "list", "--json"])
    args = parser.parse_args(["api", "--port", "9999"])
    assert (args.command, args.port, args.host) == ("api", 9999, None)


def test_help_lists_the_admin_commands(cli):
    result = cli("admin", "--help")
    assert result.rc == 0
    for group in (
        "token",
        "customer",
        "provider",
        "sip-device",
        "ip-map",
        "caller-id",
        "forced-caller-id",
        "did",
        "speed-dial",
        "blocked-code",
        "alert",
        "refill",
        "charge",
        "audit",
    ):
        assert group in result.out
    assert cli("admin").rc == 2
    assert cli("admin", "customer", "frobnicate").rc == 2


def test_tokens(cli, db_url):
    created = cli("admin", "token", "create", "--name", "cli-ops")
    assert created.rc == 0 and "shown only now" in created.err
    token = created.out.strip()
    assert token.startswith("cgt_")
    ((digest, scope),) = query(db_url, "SELECT token_sha256, scope FROM api_tokens WHERE name = 'cli-ops'")
    assert token not in digest and scope == "admin"
    reseller = cli(
        "admin", "token", "create", "--name", "cli-acme", "--reseller", "2100000001", "--json"
    ).json
    assert reseller["scope"] == "reseller" and reseller["reseller"] == "2100000001"
    listed = cli("admin", "token", "list", "--json").json
    assert {t["name"] for t in listed} >= {"cli-ops", "cli-acme"} and all("token" not in t for t in listed)
    assert cli("admin", "token", "revoke", str(reseller["id"])).rc == 0
    assert query(db_url, "SELECT revoked_at IS NOT NULL FROM api_tokens WHERE name = 'cli-acme'") == [(True,)]
    assert cli("admin", "token", "revoke", "999999").rc == 1
    table = cli("admin", "token", "list")
    assert "cli-ops" in table.out and token not in table.out


def test_customer_create_show_update_list_delete(cli, db_url):
    created = cli(
        "admin",
        "customer",
        "create",
        "--number",
        "8100000001",
        "--first-name",
        "Cli",
        "--last-name",
        "User",
        "--email",
        "cli@example.com",
        "--rate-group",
        "retail",
        "--account-type",
        "postpaid",
        "--credit-limit",
        "100",
        "--balance",
        "-5",
        "--password",
        "CliPass99",
        "--create-sip-device",
        "--notifications",
        "false",
        "--json",
    )
    assert created.rc == 0, created.err
    body = created.json
    assert body["account"]["account_type"] == "postpaid" and body["account"]["notifications"] is False
    assert body["generated"]["password"] is None and len(body["generated"]["pin"]) == 6
    assert body["sip_username"] == "8100000001"
    ((password_hash,),) = query(db_url, "SELECT password_hash FROM accounts WHERE number = '8100000001'")
    assert verify_secret("CliPass99", password_hash)

    shown = cli("admin", "customer", "show", "8100000001")
    assert shown.rc == 0 and "first_name" in shown.out and "Cli" in shown.out and "CliPass99" not in shown.out
    updated = cli(
        "admin", "customer", "update", "8100000001", "--company", "Cli Ltd", "--localization", "uk", "--json"
    )
    assert updated.rc == 0 and updated.json["company"] == "Cli Ltd" and updated.json["localization"] == "uk"
    cleared = cli("admin", "customer", "update", "8100000001", "--clear", "localization", "--json")
    assert cleared.json["localization"] is None

    listed = cli("admin", "customer", "list", "--number", "8100000001", "--number-op", "eq", "--json").json
    assert listed["total"] == 1 and listed["items"][0]["company"] == "Cli Ltd"
    grid = cli("admin", "customer", "list", "--company", "Cli Ltd", "--company-op", "eq")
    assert grid.rc == 0 and "ENTITY_TYPE" in grid.out and "8100000001" in grid.out and "total: 1" in grid.out

    deleted = cli("admin", "customer", "delete", "8100000001", "--json")
    assert deleted.rc == 0 and deleted.json["deleted"] == ["8100000001"]
    assert query(db_url, "SELECT deleted FROM accounts WHERE number = '8100000001'") == [(True,)]
    assert query(db_url, "SELECT count(*) FROM sip_devices WHERE username = '8100000001'") == [(0,)]
    missing = cli("admin", "customer", "show", "8100000001")
    assert missing.rc == 1 and "account 8100000001 not found" in missing.err


def test_provider_create_and_trunks(cli):
    created = cli(
        "admin",
        "provider",
        "create",
        "--number",
        "8200000001",
        "--first-name",
        "Carrier",
        "--email",
        "carrier@cli.example",
        "--json",
    )
    assert created.rc == 0, created.err
    assert created.json["account"]["entity_type"] == "provider"
    assert cli("admin", "ip-map", "add", "8200000001", "--cidr", "192.0.2.0/29", "--json").json["cidr"] == (
        "192.0.2.0/29"
    )
    trunks = cli("admin", "provider", "trunks", "9100000001", "--json").json
    assert [t["name"] for t in trunks] == ["carrier-one"]


def test_mass_create_writes_numbers_and_pins_with_a_progress_bar(cli, db_url, tmp_path: Path):
    out = tmp_path / "cards.csv"
    result = cli(
        "admin",
        "customer",
        "mass-create",
        "--count",
        "1200",
        "--prefix",
        "83",
        "--account-length",
        "9",
        "--rate-group",
        "retail",
        "--balance",
        "2",
        "--valid-days",
        "90",
        "--output",
        str(out),
        "--progress",
    )
    assert result.rc == 0, result.err
    assert "created 1200 accounts" in result.err and "hashing PINs" in result.err and "100%" in result.err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1200 and all(r["number"].startswith("83") and len(r["number"]) == 9 for r in rows)
    assert query(
        db_url,
        "SELECT count(*), min(balance), max(balance) FROM accounts WHERE number LIKE '83%%'"
        " AND char_length(number) = 9",
    ) == [(1200, Decimal(2), Decimal(2))]
    ((pin_hash,),) = query(db_url, "SELECT pin_hash FROM accounts WHERE number = %s", [rows[0]["number"]])
    assert verify_secret(rows[0]["pin"], pin_hash)
    small = cli(
        "admin",
        "customer",
        "mass-create",
        "--count",
        "2",
        "--prefix",
        "84",
        "--account-length",
        "6",
        "--rate-group",
        "retail",
        "--generate-pin",
        "false",
    )
    assert small.rc == 0 and "hashing" not in small.err
    assert [r["pin"] for r in csv.DictReader(io.StringIO(small.out))] == ["", ""]
    refused = cli(
        "admin",
        "customer",
        "mass-create",
        "--count",
        "2",
        "--prefix",
        "84",
        "--account-length",
        "2",
        "--rate-group",
        "retail",
    )
    assert refused.rc == 1 and "account_length: must be longer than the prefix" in refused.err


def test_sub_resources(cli):
    n = "8300000001"
    assert (
        cli(
            "admin",
            "customer",
            "create",
            "--number",
            n,
            "--first-name",
            "Subs",
            "--email",
            "subs@cli.example",
            "--rate-group",
            "retail",
            "--balance",
            "3",
        ).rc
        == 0
    )
    device = cli("admin", "sip-device", "add", n, "--username", "cli-dev", "--json").json
    assert device["device"]["username"] == "cli-dev" and device["generated_password"]
    assert (
        cli("admin", "sip-device", "update", n, "cli-dev", "--active", "false", "--json").json["active"]
        is False
    )
    assert [d["username"] for d in cli("admin", "sip-device", "list", n, "--json").json] == ["cli-dev"]
    entry = cli("admin", "ip-map", "add", n, "--cidr", "192.0.2.64/28", "--tech-prefix", "12", "--json").json
    assert cli("admin", "ip-map", "update", n, str(entry["id"]), "--name", "office", "--json").json[
        "name"
    ] == ("office")
    assert cli("admin", "ip-map", "delete", n, str(entry["id"])).rc == 0
    assert cli("admin", "caller-id", "add", n, "--number", "4420700000", "--json").json["active"] is True
    assert (
        cli("admin", "caller-id", "update", n, "4420700000", "--description", "hq", "--json").json[
            "description"
        ]
        == "hq"
    )
    assert cli("admin", "caller-id", "delete", n, "4420700000").rc == 0
    assert cli(
        "admin", "forced-caller-id", "set", n, "--number", "4420700001", "--name", "HQ", "--json"
    ).json == {"number": "4420700001", "name": "HQ", "active": True}
    assert cli("admin", "forced-caller-id", "show", n, "--json").json["name"] == "HQ"
    assert cli("admin", "forced-caller-id", "clear", n).rc == 0
    assert (
        cli(
            "admin", "did", "assign", n, "--number", "442071110015", "--destination", "cli-dev", "--json"
        ).json["destination"]
        == "cli-dev"
    )
    assert (
        cli(
            "admin",
            "did",
            "update",
            n,
            "442071110015",
            "--destination-type",
            "uri",
            "--destination",
            "sip:desk@pbx.example",
            "--json",
        ).json["destination_type"]
        == "uri"
    )
    assert [d["number"] for d in cli("admin", "did", "list", n, "--json").json] == ["442071110015"]
    assert cli("admin", "did", "release", n, "442071110015").rc == 0
    assert cli("admin", "speed-dial", "set", n, "5", "--number", "4420700005", "--json").json == {
        "key": "5",
        "number": "4420700005",
    }
    assert cli("admin", "speed-dial", "list", n, "--json").json == [{"key": "5", "number": "4420700005"}]
    assert cli("admin", "speed-dial", "delete", n, "5").rc == 0
    assert cli("admin", "blocked-code", "add", n, "--prefix", "449", "--json").json["prefix"] == "449"
    assert cli("admin", "blocked-code", "list", n, "--json").json == [{"prefix": "449", "description": ""}]
    assert cli("admin", "blocked-code", "delete", n, "449").rc == 0
    alert = cli("admin", "alert", "set", n, "--notify-enabled", "--notify-balance-below", "1", "--json").json
    assert alert == {"notify_enabled": True, "notify_balance_below": "1.00", "notify_email": None}
    assert cli("admin", "alert", "show", n, "--json").json == alert
    off = cli(
        "admin", "alert", "set", n, "--notify-enabled", "false", "--clear", "notify_balance_below", "--json"
    )
    assert off.json["notify_balance_below"] is None


def test_refills_charges_history_report_and_audit(cli):
    n = "8400000001"
    assert (
        cli(
            "admin",
            "customer",
            "create",
            "--number",
            n,
            "--first-name",
            "Money",
            "--email",
            "money@cli.example",
            "--rate-group",
            "retail",
        ).rc
        == 0
    )
    refill = cli(
        "admin", "refill", "add", n, "--amount", "12.5", "--method", "cash", "--reference", "R-9", "--json"
    )
    assert refill.rc == 0 and refill.json["balance_after"] == "12.50"
    assert (
        cli("admin", "charge", "add", n, "--amount", "2", "--description", "fee", "--json").json[
            "balance_after"
        ]
        == "10.50"
    )
    history = cli("admin", "charge", "history", n, "--json").json
    assert [(i["kind"], i["amount"]) for i in history["items"]] == [("charge", "-2.00"), ("refill", "12.50")]
    assert cli("admin", "refill", "list", n, "--json").json["total"] == 1
    report = cli("admin", "refill", "report", "--account", n)
    assert report.rc == 0 and "R-9" in report.out and "total USD: 12.50 (1 entries)" in report.out
    audit = cli("admin", "audit", "list", "--account", n, "--json").json
    assert [e["action"] for e in audit["items"]] == ["balance.charge", "balance.refill", "customer.create"]
    assert all(e["actor"].startswith("cli:") for e in audit["items"])
    bad = cli("admin", "refill", "add", n, "--amount", "abc")
    assert bad.rc == 1 and "amount: 'abc' is not a decimal number" in bad.err
    assert json.loads(cli("admin", "customer", "show", n, "--json").out)["balance"] == "10.50"


def test_secrets_can_be_read_from_stdin_instead_of_the_command_line(cli, db_url, monkeypatch):
    import io as _io

    monkeypatch.setattr("sys.stdin", _io.StringIO("StdinPassw0rd\n4455667788\nStdinSip99x\n"))
    created = cli(
        "admin", "customer", "create", "--number", "6400000071", "--first-name", "In",
        "--email", "in71@example.com", "--rate-group", "retail",
        "--password", "-", "--pin", "-", "--sip-password", "-",
    )  # fmt: skip
    assert created.rc == 0, created.err
    [(password_hash, pin_hash, sip_password)] = query(
        db_url,
        "SELECT a.password_hash, a.pin_hash, d.password FROM accounts a"
        " JOIN sip_devices d ON d.account_id = a.id WHERE a.number = '6400000071'",
    )
    assert verify_secret("StdinPassw0rd", password_hash) and verify_secret("4455667788", pin_hash)
    assert sip_password == "StdinSip99x"
    assert "read it from stdin" in cli("admin", "customer", "create", "--help").out
