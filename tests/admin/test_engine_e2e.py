"""Admin changes reach the engine: a real `callgate serve`, PostgreSQL, Redis and the FreeSWITCH emulator.

Changes are made through the API and the CLI; a live `callgate sync` worker carries them to
the engine, and the tests call until the engine answers as expected (within the sync bound).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from engine.config import load_config
from engine.sync import publish_once
from loadtest.fsemu import CallSpec, place_call
from tests.admin.conftest import ROOT, customer_body
from tests.support import wait_until

CALLGATE = Path(sys.executable).with_name("callgate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def engine_env(env: dict[str, str], redis_url: str, module_key_prefix: str) -> dict[str, str]:
    return {
        **env,
        "CALLGATE_REDIS_URL": redis_url,
        "CALLGATE_REDIS__KEY_PREFIX": module_key_prefix,
        "CALLGATE_ENGINE__LISTEN_PORT": str(_free_port()),
        "CALLGATE_METRICS__LISTEN_PORT": "0",
        "CALLGATE_SYNC__METRICS_PORT": "0",
    }


@pytest.fixture(scope="module")
def sync_worker(engine_env: dict[str, str], tmp_path_factory) -> Iterator[None]:
    """A live sync worker carries PostgreSQL's changes to the engines; the callers wait for them."""
    publish_once(load_config(environ=engine_env))  # the engine starts from a published snapshot
    log = tmp_path_factory.mktemp("sync") / "sync.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")} | engine_env
    with log.open("wb") as out:
        worker = subprocess.Popen([str(CALLGATE), "sync"], env=environment, cwd=ROOT, stdout=out, stderr=out)
    try:
        yield
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


@pytest.fixture(scope="module")
def engine(engine_env: dict[str, str], sync_worker, tmp_path_factory) -> Iterator[int]:
    log = tmp_path_factory.mktemp("engine") / "serve.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")} | engine_env
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CALLGATE), "serve"], env=environment, cwd=ROOT, stdout=out, stderr=out
        )

    def listening() -> bool:
        assert process.poll() is None, log.read_text(errors="replace")
        return "callgate listening on" in log.read_text(errors="replace")

    wait_until(listening, timeout=20, interval=0.05, what="callgate serve listening")
    try:
        yield int(engine_env["CALLGATE_ENGINE__LISTEN_PORT"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _call(port: int, username: str) -> Any:
    result = place_call(
        "127.0.0.1",
        port,
        CallSpec(
            destination="442071234567",
            sip_auth_username=username,
            caller_id_number="442000000001",
            hold_seconds=0.2,
        ),
        timeout=10,
    )
    assert result.error is None, result.error
    return result


def _accepted(result: Any) -> bool:
    return result.variables.get("callgate_reason") == "ACCEPTED" and result.executed[-1][0] == "bridge"


def _call_until(port: int, username: str, wanted: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """The engine switches snapshots asynchronously: call until `wanted` or the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = _call(port, username)
        if wanted(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)


def test_a_deleted_customer_is_rejected(api, engine, sync_worker):
    created = api.post(
        "/customers",
        json=customer_body(
            number="8800000001",
            email="e2e-del@example.com",
            balance="10",
            sip_username="e2e-del",
            sip_password="E2eSecret1",
        ),
    )
    assert created.status_code == 201, created.body
    before = _call_until(engine, "e2e-del", _accepted)
    assert _accepted(before), before.variables
    assert before.sip_response == (200, "OK") and before.variables["callgate_account"] == "8800000001"

    assert api.delete("/customers/8800000001").status_code == 200
    after = _call_until(engine, "e2e-del", lambda r: not _accepted(r))
    assert after.variables.get("callgate_reason") == "AUTHENTICATION_FAIL"  # its SIP device is gone
    assert after.sip_response[0] == 403
    assert not any(app == "bridge" for app, _ in after.executed)


def test_a_top_up_turns_no_sufficient_fund_into_an_accepted_call(cli, api, engine, sync_worker):
    created = api.post(
        "/customers",
        json=customer_body(
            number="8800000002",
            email="e2e-topup@example.com",
            balance="0",
            sip_username="e2e-topup",
            sip_password="E2eSecret2",
        ),
    )
    assert created.status_code == 201, created.body
    broke = _call_until(
        engine, "e2e-topup", lambda r: r.variables.get("callgate_reason") == "NO_SUFFICIENT_FUND"
    )
    assert broke.variables.get("callgate_reason") == "NO_SUFFICIENT_FUND"
    assert broke.sip_response[0] == 402

    refill = cli("admin", "refill", "add", "8800000002", "--amount", "5", "--reference", "e2e")
    assert refill.rc == 0, refill.err
    funded = _call_until(engine, "e2e-topup", _accepted)
    assert _accepted(funded), funded.variables
    assert funded.sip_response == (200, "OK") and funded.variables["callgate_account"] == "8800000002"


def _ip_call(port: int, address: str, destination: str) -> Any:
    spec = CallSpec(
        destination=destination, network_ip=address, caller_id_number="442000000001", hold_seconds=0.2
    )
    result = place_call("127.0.0.1", port, spec, timeout=10)
    assert result.error is None, result.error
    return result


def test_a_hijacking_ip_map_entry_never_reaches_the_engine(api, engine, sync_worker, db_url):
    """The reported hijack, written around the service (as a fixture load or SQL would): the sync
    leaves the newer, conflicting entry out, and the customer's calls stay the customer's."""
    created = api.post(
        "/customers", json=customer_body(number="8800000003", email="e2e-ip@example.com", balance="10")
    )
    assert created.status_code == 201, created.body
    entry = api.post("/customers/8800000003/ip-map", json={"cidr": "198.51.100.0/24", "tech_prefix": "99"})
    assert entry.status_code == 201, entry.body
    owner = api.post(
        "/customers",
        json=customer_body(
            number="8800000004", email="e2e-ip-r@example.com", reseller="2200000001", balance="10"
        ),
    )
    if owner.status_code != 201:  # the other reseller has no rate group in the base catalogue
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "INSERT INTO rate_groups (name, reseller_id) SELECT 'e2e-other', id FROM accounts"
                " WHERE number = '2200000001' ON CONFLICT DO NOTHING"
            )
        owner = api.post(
            "/customers",
            json=customer_body(
                number="8800000004",
                email="e2e-ip-r@example.com",
                reseller="2200000001",
                rate_group="e2e-other",
            ),
        )
    assert owner.status_code == 201, owner.body
    first = _call_until_ip(engine, lambda r: r.variables.get("callgate_account") == "8800000003")
    assert first.variables.get("callgate_account") == "8800000003", first.variables
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO ip_map (account_id, cidr, tech_prefix) SELECT id, '198.51.100.7/32', '99'"
            " FROM accounts WHERE number = '8800000004'"
        )
        # a later, harmless change proves the sync has moved past the hijacking row
        conn.execute("UPDATE accounts SET balance = 11 WHERE number = '8800000003'")
    time.sleep(2.0)  # several sync rounds (milliseconds each)
    for _ in range(5):
        result = _ip_call(engine, "198.51.100.7", "99442071234567")
        assert result.variables.get("callgate_account") == "8800000003", result.variables


def _call_until_ip(port: int, wanted: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = _ip_call(port, "198.51.100.7", "99442071234567")
        if wanted(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.2)
