"""End to end: PostgreSQL (the demo catalogue) -> snapshot -> a real `callgate fsxml` process -> HTTP.

Requests are made the way mod_xml_curl makes them: a POST of the form, basic auth, one new
connection per request (it creates a curl handle per fetch); keep-alive is checked too.
"""

from __future__ import annotations

import base64
import http.client
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml

from engine.config import load_config
from engine.fsxml.directory import a1_hash
from engine.sync.worker import SyncWorker
from tests.fsxml import forms
from tests.support import (
    CALLGATE,
    ROOT,
    engine_environment,
    free_port,
    prepare_database,
    publish,
    wait_until,
)

DOMAIN = "voice.example.net"
PASSWORD = "xml-curl-S3cret"


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    prepare_database(module_pg_url, yaml.safe_load((ROOT / "config" / "demo.yaml").read_text()))
    env = engine_environment(
        module_pg_url,
        redis_url,
        module_key_prefix,
        CALLGATE_FSXML__DOMAIN=DOMAIN,
        CALLGATE_FSXML__USERNAME="freeswitch",
        CALLGATE_FSXML__PASSWORD=PASSWORD,
        CALLGATE_FSXML__LISTEN_PORT=str(free_port()),
    )
    publish(env)
    return env


@pytest.fixture(scope="module")
def service(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    log_path = tmp_path_factory.mktemp("fsxml") / "fsxml.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CALLGATE, "fsxml"], env=environment, cwd=ROOT, stdout=log, stderr=log)
    port = int(environment["CALLGATE_FSXML__LISTEN_PORT"])
    try:
        _wait_ready(process, port, log_path)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert PASSWORD not in log_path.read_text(errors="replace")


def _wait_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"callgate fsxml exited early:\n{log_path.read_text(errors='replace')}")
        try:  # the directory from the snapshot, the gateways once their passwords were read
            return (
                post(port, forms.sip_auth("alice", DOMAIN))[0]
                == post(port, forms.gateways("external"))[0]
                == 200
            )
        except OSError:
            return False

    try:
        wait_until(answering, timeout=30, what="callgate fsxml answering")
    except AssertionError:
        raise AssertionError(log_path.read_text(errors="replace")) from None


def post(
    port: int, body: str, password: str = PASSWORD, connection: http.client.HTTPConnection | None = None
) -> tuple[int, bytes]:
    own = connection is None
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    credentials = base64.b64encode(f"freeswitch:{password}".encode()).decode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {credentials}"}
    try:
        conn.request("POST", "/fsxml", body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        if own:
            conn.close()


def a1_of(document: bytes, user: str) -> str | None:
    for element in ET.fromstring(document).iter("user"):
        if element.get("id") == user:
            return next(p.get("value") for p in element.iter("param") if p.get("name") == "a1-hash")
    return None


def test_a_demo_device_and_the_demo_gateways(service: int) -> None:
    status, document = post(service, forms.sip_auth("alice", DOMAIN))
    assert status == 200
    assert a1_of(document, "alice") == a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx")
    assert b"Wd3kM9pQs7Vx" not in document
    variables = {v.get("name"): v.get("value") for v in ET.fromstring(document).iter("variable")}
    assert variables["effective_caller_id_name"] == "Alice Carter"
    assert variables["effective_caller_id_number"] == "442079460001"
    status, document = post(service, forms.gateways("external"))
    assert status == 200, document
    gateways = {
        g.get("name"): {p.get("name"): p.get("value") for p in g.iter("param")}
        for g in ET.fromstring(document).iter("gateway")
    }
    assert gateways["alpha-gw1"]["proxy"] == "sip1.alpha-telecom.example"
    assert gateways["alpha-gw1"]["caller-id-in-from"] == "true" and gateways["alpha-gw1"]["ping"] == "30"
    assert gateways["beta-gw1"]["username"] == "callgate"
    # the carrier password, read by the service from PostgreSQL: the snapshot has none
    assert gateways["beta-gw1"]["password"] == "beta-trunk-secret"
    assert "password" not in gateways["alpha-gw1"]


def test_wrong_credentials_are_refused(service: int) -> None:
    status, document = post(service, forms.sip_auth("alice", DOMAIN), password="guess")
    assert status == 401 and b"a1-hash" not in document


def test_keep_alive_serves_several_requests_on_one_connection(service: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", service, timeout=10)
    try:
        for _ in range(3):
            status, document = post(service, forms.sip_auth("alice", DOMAIN), connection=connection)
            assert status == 200 and a1_of(document, "alice") is not None
    finally:
        connection.close()


def test_a_password_changed_in_postgresql_is_seen_after_the_sync(
    service: int, environment: dict[str, str], module_pg_url: str
) -> None:
    with psycopg.connect(module_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE sip_devices SET password = 'R0tated-pw' WHERE username = 'alice'")
    publish(environment)  # what `callgate sync` does continuously
    expected = a1_hash("alice", DOMAIN, "R0tated-pw")
    wait_until(
        lambda: a1_of(post(service, forms.sip_auth("alice", DOMAIN))[1], "alice") == expected,
        timeout=20,
        what="the new password reaching the directory",
    )


def gateway_password(port: int, name: str) -> str | None:
    document = post(port, forms.gateways("external"))[1]
    for gateway in ET.fromstring(document).iter("gateway"):
        if gateway.get("name") == name:
            return next((p.get("value") for p in gateway.iter("param") if p.get("name") == "password"), None)
    return None


def test_the_live_sync_carries_a_new_device_password_and_a_new_gateway_password(
    service: int, environment: dict[str, str], module_pg_url: str
) -> None:
    # Both are changed in PostgreSQL and applied by the live sync's in-place path (change events,
    # not a new snapshot): the device's a1-hash is rewritten in Redis; the gateway's row is
    # republished unchanged (it has no password), and its change event makes the service read
    # the carrier passwords from PostgreSQL again.
    publish(environment)
    worker = SyncWorker(load_config(environ=environment), worker_id="test-fsxml-live")
    try:
        worker.connect()
        worker.catch_up()
        with psycopg.connect(module_pg_url, autocommit=True) as conn:
            conn.execute("UPDATE sip_devices SET password = 'L1ve-rotated' WHERE username = 'alice'")
            conn.execute("UPDATE gateways SET password = 'beta-R0tated' WHERE name = 'beta-gw1'")
        result = worker.catch_up()
        assert not result.full and result.applied == 2
    finally:
        worker.close()
        worker.redis.close()
    expected = a1_hash("alice", DOMAIN, "L1ve-rotated")
    wait_until(
        lambda: a1_of(post(service, forms.sip_auth("alice", DOMAIN))[1], "alice") == expected,
        timeout=20,
        what="the live-synced password reaching the directory",
    )
    wait_until(
        lambda: gateway_password(service, "beta-gw1") == "beta-R0tated",
        timeout=20,
        what="the new gateway password reaching the service",
    )
    assert gateway_password(service, "beta-gw2") == "beta-trunk-secret"
