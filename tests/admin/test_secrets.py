"""Secret scanning: known secrets, valid and refused, never come back out.

Accounts, providers and SIP devices are created and edited with known passwords, PINs, SIP
passwords and voicemail passwords (and with refused ones); every API endpoint and every CLI
command runs; then every response, every CLI output, the logs, the audit table and the
Redis snapshot are searched for each secret. The snapshot is searched after a full publish and
again after the live sync applied a changed device password and gateway password, with an
active device of a usable account and an active gateway in it (FreeSWITCH's directory is
served from it: devices carry their a1-hash for the configured realm, never the password;
gateway passwords are not in it at all). Secrets the server generates are returned once,
by the call that generates them (by design); they are not among the known secrets here.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import redis

from engine.admin import cli as admin_cli
from engine.config import load_config
from engine.model import CatalogData
from engine.state.snapshot import read_snapshot
from engine.sync import publish_once
from engine.sync.worker import SyncWorker
from tests.admin.conftest import Api, customer_body

SECRETS = {
    "password": "Zq7pLw3xVb9mKd",
    "password 2": "Hy4nRt8sWq2eXc",
    "password 3": "Cv5bNm2kJh8gFd",
    "pin": "9081726354",
    "pin 2": "5647382910",
    "pin 3": "8765098123",
    "sip password": "SipQw8zX3kLm",
    "sip password 2": "SipPo9iU7yTr",
    "sip password 3": "SipAs4dF6gHj",
    "voicemail password": "7381920465",
    "voicemail password 2": "1928374650",
    # refused values are secrets too: a typo of a real one is as good as the real one
    "refused pin": "90817x2635",
    "refused password": "onlylettersnodigitsQ",
    "refused sip password": "Sip Bad Pw 77",
    "refused voicemail password": "73819x0465",
    "refused pin 2": "56473x2910",
    # left in place, active, so that the published snapshot holds them (see _kept_credentials)
    "kept sip password": "SipKp5tL9mQw",
    "kept sip password 2": "SipKn3vB7xZr",
    "gateway password": "GwPx4Lm8Qz2s",
    "gateway password 2": "GwRt6Yk2Hn9d",
}
S = SECRETS

N1, N2, NP = "8700000001", "8700000002", "8700000009"  # a customer, a reseller's customer, a provider
NK = "8700000005"  # a customer kept active to the end, with a device: its credential is published
REALM = "sec.example.net"  # [fsxml] domain: the digest realm the snapshot's a1-hashes are made for


def _leaks(text: str) -> list[str]:
    return [name for name, secret in SECRETS.items() if secret in text]


class ScanningApi:
    """The API client; every response is searched, every route called is recorded."""

    def __init__(self, api: Api, app: Any, seen: set[tuple[str, str]], texts: list[tuple[str, str]]) -> None:
        self.api, self.app, self.seen, self.texts = api, app, seen, texts
        self.adapter = app.url_map.bind("localhost")

    def as_token(self, token: str) -> ScanningApi:
        return ScanningApi(self.api.as_token(token), self.app, self.seen, self.texts)

    def call(self, method: str, path: str, expect: int | None = None, **kwargs: Any) -> Any:
        endpoint, _ = self.adapter.match(f"/api/v1{path.split('?')[0]}", method=method)
        self.seen.add((method, endpoint))
        response = self.api.call(method, path, **kwargs)
        text = response.get_data(as_text=True) + "\n" + str(response.headers)
        self.texts.append((f"{method} {path} -> {response.status_code}", text))
        if expect is not None:
            assert response.status_code == expect, (method, path, response.status_code, text[:500])
        return response


@pytest.fixture(scope="module")
def scan(app: Any, api: Api) -> tuple[ScanningApi, set[tuple[str, str]], list[tuple[str, str]]]:
    seen: set[tuple[str, str]] = set()
    texts: list[tuple[str, str]] = []
    return ScanningApi(api, app, seen, texts), seen, texts


def _exercise_api(api: ScanningApi, reseller: ScanningApi) -> None:
    # accounts: created and edited with known secrets, and with refused ones
    body = customer_body(
        number=N1, email="sec1@example.com", password=S["password"], pin=S["pin"],
        sip_username="sec-dev1", sip_password=S["sip password"], balance="10",
    )  # fmt: skip
    api.call("POST", "/customers", 201, json=body)
    refused = customer_body(
        number="8700000003", email="sec3@example.com", password=S["refused password"], pin=S["refused pin"],
        sip_password=S["refused sip password"],
    )  # fmt: skip
    assert {e["field"] for e in api.call("POST", "/customers", 422, json=refused).body["errors"]} >= {
        "password",
        "pin",
        "sip_password",
    }
    mismatched = customer_body(
        number="8700000004", email="sec4@example.com", pin=S["pin 3"], generate_pin=True
    )
    api.call("POST", "/customers", 422, json=mismatched)  # a PIN and generate_pin: refused, PIN not echoed
    reseller.call(
        "POST",
        "/customers",
        201,
        json=customer_body(number=N2, email="sec2@example.com", rate_group="acme-retail", pin=S["pin 2"]),
    )
    provider = {
        "number": NP,
        "first_name": "Sec",
        "company": "Sec Carrier",
        "email": "secp@example.com",
        "password": S["password 3"],
    }
    api.call("POST", "/providers", 201, json=provider)
    api.call("GET", f"/customers/{N1}", 200)
    api.call("PATCH", f"/customers/{N1}", 200, json={"password": S["password 2"], "pin": S["pin 2"]})
    api.call(
        "PATCH", f"/customers/{N1}", 422, json={"pin": S["refused pin 2"], "password": S["refused password"]}
    )
    api.call("GET", "/customers?number=87", 200)
    api.call("GET", "/customers/export?number=87", 200)
    api.call("POST", "/customers/mass-create", 201, json={"count": 2, "prefix": "871", "account_length": 10,
                                                          "rate_group": "retail"})  # fmt: skip
    csv_text = (
        "Account,Password,First Name,Email,SIP Username,SIP Password,pin\n"
        f"8700000011,{S['password 3']},Imp,imp11@example.com,sec-imp11,{S['sip password 3']},{S['pin 3']}\n"
        f"8700000012,{S['refused password']},Imp,imp12@example.com,sec-imp12,"
        f'"{S["refused sip password"]}",{S["refused pin"]}\n'
    )
    data = {
        "file": (io.BytesIO(csv_text.encode()), "secrets.csv"),
        "options": json.dumps({"defaults": {"rate_group": "retail"}}),
    }
    report = api.call("POST", "/customers/import", 200, data=data, content_type="multipart/form-data")
    assert [r["status"] for r in report.body["rows"]] == ["imported", "failed"]

    # SIP devices, with voicemail passwords
    device = {"username": "sec-dev2", "password": S["sip password 2"], "voicemail_enabled": True,
              "voicemail_password": S["voicemail password"]}  # fmt: skip
    api.call("POST", f"/customers/{N1}/sip-devices", 201, json=device)
    bad_device = {"username": "sec-dev3", "password": S["refused sip password"],
                  "voicemail_password": S["refused voicemail password"]}  # fmt: skip
    api.call("POST", f"/customers/{N1}/sip-devices", 422, json=bad_device)
    api.call("GET", f"/customers/{N1}/sip-devices", 200)
    api.call("PATCH", f"/customers/{N1}/sip-devices/sec-dev2", 200,
             json={"voicemail_password": S["voicemail password 2"],
                   "password": S["sip password 3"]})  # fmt: skip
    api.call("PATCH", f"/customers/{N1}/sip-devices/sec-dev2", 422,
             json={"voicemail_password": S["refused voicemail password"]})  # fmt: skip

    # every other sub-resource
    entry = api.call(
        "POST", f"/customers/{N1}/ip-map", 201, json={"cidr": "203.0.113.77", "tech_prefix": "61"}
    )
    api.call("GET", f"/customers/{N1}/ip-map", 200)
    api.call("PATCH", f"/customers/{N1}/ip-map/{entry.body['id']}", 200, json={"name": "pbx"})
    api.call("DELETE", f"/customers/{N1}/ip-map/{entry.body['id']}", 204)
    api.call("POST", f"/customers/{N1}/caller-ids", 201, json={"number": "442079460555"})
    api.call("GET", f"/customers/{N1}/caller-ids", 200)
    api.call("PATCH", f"/customers/{N1}/caller-ids/442079460555", 200, json={"active": False})
    api.call("DELETE", f"/customers/{N1}/caller-ids/442079460555", 204)
    api.call("PUT", f"/customers/{N1}/forced-caller-id", 200, json={"number": "442079460556"})
    api.call("GET", f"/customers/{N1}/forced-caller-id", 200)
    api.call("DELETE", f"/customers/{N1}/forced-caller-id", 204)
    api.call("POST", f"/customers/{N1}/dids", 201, json={"number": "442071110015", "destination": "sec-dev2"})
    api.call("GET", f"/customers/{N1}/dids", 200)
    api.call("PATCH", f"/customers/{N1}/dids/442071110015", 200, json={"active": False})
    api.call("DELETE", f"/customers/{N1}/dids/442071110015", 204)
    api.call("PUT", f"/customers/{N1}/speed-dials/1", 200, json={"number": "442079460557"})
    api.call("GET", f"/customers/{N1}/speed-dials", 200)
    api.call("DELETE", f"/customers/{N1}/speed-dials/1", 204)
    api.call("POST", f"/customers/{N1}/blocked-codes", 201, json={"prefix": "4490"})
    api.call("GET", f"/customers/{N1}/blocked-codes", 200)
    api.call("DELETE", f"/customers/{N1}/blocked-codes/4490", 204)
    api.call("PUT", f"/customers/{N1}/alert-threshold", 200, json={"notify_enabled": True,
                                                                   "notify_balance_below": "1"})  # fmt: skip
    api.call("GET", f"/customers/{N1}/alert-threshold", 200)
    api.call("GET", f"/customers/{NP}/trunks", 200)
    api.call("POST", f"/customers/{N1}/refills", 201, json={"amount": "5"})
    api.call("GET", f"/customers/{N1}/refills", 200)
    api.call("POST", f"/customers/{N1}/charges", 201, json={"amount": "1"})
    api.call("GET", f"/customers/{N1}/charges", 200)
    api.call("GET", "/refills", 200)
    api.call("GET", "/openapi.json", 200)
    for page in (1, 2, 3):
        api.call("GET", f"/audit?per_page=100&page={page}", 200)
    reseller.call("GET", "/audit?per_page=100", 200)
    api.call("GET", "/audit?entity=sip_device&per_page=100", 200)
    # accounting (engine/admin/api/routes/billing.py): CDRs, their export, the statement, the e-mail log
    api.call("GET", f"/cdrs?account={N1}", 200)
    reseller.call("GET", "/cdrs/export", 200)
    api.call("GET", f"/customers/{N1}/statement", 200)
    api.call("GET", f"/customers/{N1}/emails", 200)
    # deletions carry the removed children in the audit images
    api.call("DELETE", f"/customers/{N1}/sip-devices/sec-dev1", 204)
    api.call("POST", "/customers/delete", 200, json={"numbers": ["8700000011"]})
    api.call("DELETE", f"/customers/{N1}", 200)


def _kept_credentials(api: ScanningApi, db_url: str) -> None:
    """An active customer with an active device, and an active gateway with carrier credentials,
    all still there when the snapshot is published: what FreeSWITCH's directory needs."""
    body = customer_body(number=NK, email="sec5@example.com", sip_username="sec-kept",
                         sip_password=S["kept sip password"], balance="5")  # fmt: skip
    api.call("POST", "/customers", 201, json=body)
    with psycopg.connect(db_url) as conn:  # gateways have no API route: written as an operator would
        conn.execute(
            "INSERT INTO gateways (name, proxy, username, password, register)"
            " VALUES ('sec-gw', 'sip.sec-carrier.example', 'sec-trunk', %s, true)",
            [S["gateway password"]],
        )


def _published(redis_url: str, prefix: str) -> CatalogData:
    client = redis.Redis.from_url(redis_url)
    try:
        return read_snapshot(client, prefix)
    finally:
        client.close()


def _exercise_cli(cli: Any, tmp_path: Path, outputs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    ran: set[tuple[str, str]] = set()

    def run(*argv: str, rc: int = 0) -> Any:
        ran.add((argv[0], argv[1]))
        result = cli("admin", *argv)
        outputs.append(("callgate admin " + " ".join(argv), result.out + "\n" + result.err))
        assert result.rc == rc, (argv, result.rc, result.err)
        return result

    n = "8700000021"
    run("customer", "create", "--number", n, "--first-name", "Cli", "--email", "cli21@example.com",
        "--rate-group", "retail", "--password", S["password"], "--pin", S["pin"],
        "--sip-username", "sec-cli21", "--sip-password", S["sip password"], "--balance", "3")  # fmt: skip
    run("customer", "create", "--number", "8700000022", "--first-name", "Cli", "--email", "cli22@example.com",
        "--rate-group", "retail", "--password", S["refused password"],
        "--pin", S["refused pin"], rc=1)  # fmt: skip
    run("customer", "show", n)
    run("customer", "list", "--number", "87")
    run("customer", "update", n, "--pin", S["pin 2"], "--password", S["password 2"])
    run("customer", "update", n, "--pin", S["refused pin 2"], rc=1)
    run("customer", "mass-create", "--count", "2", "--prefix", "872", "--account-length", "10",
        "--rate-group", "retail", "--output", str(tmp_path / "mass.csv"), "--no-progress")  # fmt: skip
    source = tmp_path / "import.csv"
    source.write_text(
        "Account,Password,First Name,Email,pin\n"
        f"8700000023,{S['password 3']},Imp,cli23@example.com,{S['pin 3']}\n"
        f"8700000024,{S['refused password']},Imp,cli24@example.com,{S['refused pin']}\n"
    )
    run("customer", "import", str(source), "--default", "rate_group=retail", "--no-progress", rc=1)
    run("customer", "export", "--number", "87", "--output", str(tmp_path / "export.csv"))
    outputs.append(("export.csv", (tmp_path / "export.csv").read_text()))
    run("provider", "create", "--number", "8700000029", "--first-name", "Cli", "--company", "Cli Carrier",
        "--email", "clip@example.com", "--password", S["password 3"])  # fmt: skip
    run("provider", "trunks", "8700000029")
    run("sip-device", "add", n, "--username", "sec-cli21b", "--password", S["sip password 2"],
        "--voicemail-password", S["voicemail password"])  # fmt: skip
    run("sip-device", "add", n, "--username", "sec-cli21c",
        "--voicemail-password", S["refused voicemail password"], rc=1)  # fmt: skip
    run("sip-device", "list", n, "--json")
    run("sip-device", "update", n, "sec-cli21b", "--voicemail-password", S["voicemail password 2"])
    run("sip-device", "delete", n, "sec-cli21b")
    entry = json.loads(run("ip-map", "add", n, "--cidr", "203.0.113.78", "--tech-prefix", "62", "--json").out)
    run("ip-map", "list", n)
    run("ip-map", "update", n, str(entry["id"]), "--name", "pbx")
    run("ip-map", "delete", n, str(entry["id"]))
    run("caller-id", "add", n, "--number", "442079460666")
    run("caller-id", "list", n)
    run("caller-id", "update", n, "442079460666", "--active", "false")
    run("caller-id", "delete", n, "442079460666")
    run("forced-caller-id", "set", n, "--number", "442079460667")
    run("forced-caller-id", "show", n)
    run("forced-caller-id", "clear", n)
    run("did", "assign", n, "--number", "442071110016")
    run("did", "list", n)
    run("did", "update", n, "442071110016", "--active", "false")
    run("did", "release", n, "442071110016")
    run("speed-dial", "set", n, "2", "--number", "442079460668")
    run("speed-dial", "list", n)
    run("speed-dial", "delete", n, "2")
    run("blocked-code", "add", n, "--prefix", "4491")
    run("blocked-code", "list", n)
    run("blocked-code", "delete", n, "4491")
    run("alert", "set", n, "--notify-enabled", "true", "--notify-balance-below", "1")
    run("alert", "show", n)
    run("refill", "add", n, "--amount", "2")
    run("refill", "list", n)
    run("refill", "report")
    run("charge", "add", n, "--amount", "1")
    run("charge", "history", n)
    run("audit", "list", "--per-page", "200")
    run("audit", "list", "--per-page", "200", "--json")
    run("cdr", "list", "--account", n, "--json")
    run("cdr", "export", "--output", str(tmp_path / "cdrs.csv"))
    run("statement", "show", n)
    run("email", "list", n, "--json")
    created = run("token", "create", "--name", "sec-cli", "--json")
    run("token", "list")
    run("token", "revoke", str(json.loads(created.out)["id"]))
    run("customer", "delete", n)
    return ran


def _subcommands(parser: argparse.ArgumentParser, dest: str) -> dict[str, argparse.ArgumentParser]:
    """The sub-parsers of ``parser``'s sub-command argument ``dest``, by name."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction) and a.dest == dest)
    return action.choices


def _redis_text(redis_url: str, prefix: str) -> str:
    client = redis.Redis.from_url(redis_url)
    parts: list[str] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = cast(bytes, client.type(key)).decode()  # the client does not decode replies
            if kind == "hash":
                value: Any = client.hgetall(key)
            elif kind == "string":
                value = client.get(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            parts.append(f"{key!r} {value!r}")
    finally:
        client.close()
    assert parts, "the snapshot is in Redis"
    return "\n".join(parts)


@pytest.mark.slow  # every route and command: about 10 s
def test_no_secret_in_responses_cli_logs_audit_or_redis(
    scan, service, cli, tmp_path, caplog, db_url, env, redis_url, module_key_prefix, app
):
    api, seen, texts = scan
    caplog.set_level(logging.DEBUG)
    reseller = api.as_token(service.create_token("sec-reseller", reseller="2100000001")[1])
    _exercise_api(api, reseller)
    outputs: list[tuple[str, str]] = []
    ran = _exercise_cli(cli, tmp_path, outputs)
    outputs.append(("mass.csv", (tmp_path / "mass.csv").read_text()))
    config = load_config(
        environ={
            **env,
            "CALLGATE_REDIS_URL": redis_url,
            "CALLGATE_REDIS__KEY_PREFIX": module_key_prefix,
            "CALLGATE_FSXML__DOMAIN": REALM,
        }
    )
    _kept_credentials(api, db_url)
    publish_once(config)
    published = _published(redis_url, module_key_prefix)
    # the scan covers credentials that are really published: an active device of a usable
    # account (as its a1-hash for the configured realm), and an active gateway
    kept = next(d for d in published.sip_devices if d.username == "sec-kept")
    assert kept.active and next(a for a in published.accounts if a.id == kept.account_id).usable
    assert kept.a1_hash == hashlib.md5(f"sec-kept:{REALM}:{S['kept sip password']}".encode()).hexdigest()
    assert next(g for g in published.gateways if g.name == "sec-gw").active
    redis_after_publish = _redis_text(redis_url, module_key_prefix)
    # the live sync's path (single entities, change events, journal) carries a new password
    api.call(
        "PATCH", f"/customers/{NK}/sip-devices/sec-kept", 200, json={"password": S["kept sip password 2"]}
    )
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE gateways SET password = %s WHERE name = 'sec-gw'", [S["gateway password 2"]])
    worker = SyncWorker(config, worker_id="test-secrets")
    try:
        worker.connect()
        assert worker.catch_up().applied >= 2
    finally:
        worker.close()
        worker.redis.close()
    kept = next(d for d in _published(redis_url, module_key_prefix).sip_devices if d.username == "sec-kept")
    assert kept.a1_hash == hashlib.md5(f"sec-kept:{REALM}:{S['kept sip password 2']}".encode()).hexdigest()

    # every route and every CLI command ran
    routes = {
        (method, rule.endpoint)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods - {"HEAD", "OPTIONS"}
    }
    assert routes - seen == set()
    parser = admin_cli.build_admin_parser()
    commands = {
        (g, a) for g, sub in _subcommands(parser, "group").items() for a in _subcommands(sub, "action")
    }
    assert commands - ran == set()

    with psycopg.connect(db_url) as conn:
        audit = conn.execute("SELECT action, before::text, after::text FROM audit_log").fetchall()
    assert any(a == "sip_device.update" for a, _, _ in audit)
    places = [
        *texts,
        *outputs,
        ("logs", caplog.text),
        ("audit table", "\n".join(f"{a} {b} {c}" for a, b, c in audit)),
        ("redis after the publish", redis_after_publish),
        ("redis after the live sync", _redis_text(redis_url, module_key_prefix)),
    ]
    found = {place: _leaks(text) for place, text in places if _leaks(text)}
    assert found == {}
