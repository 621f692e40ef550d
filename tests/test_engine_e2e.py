"""End to end: the FreeSWITCH emulator against a real `callgate serve`, PostgreSQL and Redis.

One module-wide catalogue (below) covers each identification method and each
reject reason of the core rules; every assertion is on what FreeSWITCH was told.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import gevent
import pytest

from loadtest.fsemu import CallResult, CallSpec, place_call
from tests.support import (
    EngineProcess,
    engine_environment,
    is_counted,
    prepare_database,
    publish,
    run_cli,
    wait_until,
)

TRUSTED_PROXY = "192.0.2.7"

CATALOGUE = {
    "gateways": [{"name": "gw-a1"}, {"name": "gw-a2"}, {"name": "gw-b1"}],
    "providers": [
        {
            "number": "9000000001",
            "company": "Carrier A",
            "trunks": [
                {
                    "name": "carrier-a",
                    "gateway": "gw-a1",
                    "failover_gateways": ["gw-a2"],
                    "codecs": "PCMA,PCMU",
                    "leg_timeout": 30,
                    "termination_rates": [
                        {"prefix": "44", "cost_per_minute": "0.0050"},
                        {"prefix": "4420", "cost_per_minute": "0.0040"},
                        {"prefix": "33", "cost_per_minute": "0.0200"},
                    ],
                }
            ],
        },
        {
            "number": "9000000002",
            "company": "Carrier B",
            "trunks": [
                {
                    "name": "carrier-b",
                    "gateway": "gw-b1",
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.0045"}],
                }
            ],
        },
    ],
    "rate_groups": [
        {
            "name": "retail",
            "trunks": ["carrier-a", "carrier-b"],
            "rates": [
                {"prefix": "44", "cost_per_minute": "0.0100"},
                {"prefix": "4420", "cost_per_minute": "0.0080"},
                {"prefix": "33", "cost_per_minute": "0.0100"},
                {"prefix": "49", "cost_per_minute": "0.0100"},
            ],
        },
        {"name": "closed", "active": False, "rates": [{"prefix": "44", "cost_per_minute": "0.01"}]},
    ],
    "resellers": [
        {
            "number": "2000000001",
            "email": "ops@reseller.example",
            "password": "Reseller2024",
            "status": "inactive",
            "balance": "100.00",
            "rate_group": "retail",
            "customers": [
                {
                    "number": "2000000101",
                    "email": "resold@example.com",
                    "password": "Resold2024",
                    "balance": "10.00",
                    "rate_group": "retail",
                    "sip_devices": [{"username": "resold", "password": "Secret123x"}],
                }
            ],
        }
    ],
    "customers": [
        {
            "number": "1000000001",
            "email": "alice@example.com",
            "password": "Alice2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "sip_devices": [{"username": "alice", "password": "Secret123x"}],
        },
        {
            "number": "1000000002",
            "email": "pbx@example.com",
            "password": "Pbx2024xx",
            "postpaid": True,
            "balance": "-5.00",
            "credit_limit": "50.00",
            "rate_group": "retail",
            "ip_map": [{"name": "pbx", "cidr": "10.20.0.0/24", "tech_prefix": "55"}],
        },
        {
            "number": "1000000003",
            "email": "broke@example.com",
            "password": "Broke2024x",
            "balance": "0.0050",
            "rate_group": "retail",
            "sip_devices": [{"username": "broke", "password": "Secret123x"}],
        },
        {
            "number": "1000000004",
            "email": "expired@example.com",
            "password": "Expired2024",
            "balance": "10.00",
            "rate_group": "retail",
            "expiry": "2020-01-01T00:00:00Z",
            "sip_devices": [{"username": "expired", "password": "Secret123x"}],
        },
        {
            "number": "1000000005",
            "email": "norate@example.com",
            "password": "Norate2024",
            "balance": "10.00",
            "rate_group": "closed",
            "sip_devices": [{"username": "norate", "password": "Secret123x"}],
        },
        {
            "number": "1000000006",
            "email": "proxied@example.com",
            "password": "Proxied2024",
            "balance": "10.00",
            "rate_group": "retail",
        },
    ],
}

COMMON_VARIABLES = {
    "continue_on_fail": "true",
    "hangup_after_bridge": "true",
}
CARRIER_A = "[leg_timeout=30,absolute_codec_string=^^:PCMA:PCMU]sofia/gateway/{gw}/{number}"
CARRIER_B = "[leg_timeout=60]sofia/gateway/gw-b1/{number}"


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    env = engine_environment(
        module_pg_url,
        redis_url,
        module_key_prefix,
        CALLGATE_RULES__TRUSTED_PROXIES=f"{TRUSTED_PROXY}/32",
        CALLGATE_ENGINE__CONNECT_TIMEOUT="0.5",
    )
    prepare_database(module_pg_url, CATALOGUE)
    publish(env)
    return env


@pytest.fixture(scope="module")
def engine(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineProcess]:
    process = EngineProcess(environment).start(tmp_path_factory.mktemp("engine") / "serve.log")
    yield process
    process.stop()


def call(engine: EngineProcess, **spec: Any) -> CallResult:
    spec.setdefault("hold_seconds", 0.1)
    result = place_call("127.0.0.1", engine.port, CallSpec(**spec), timeout=10)
    assert result.error is None, (result.error, engine.log()[-3000:])
    return result


def assert_bridged(
    result: CallResult, *, account: str, dial_string: str, rate: str, max_duration: int, routes: str
) -> None:
    expected = {
        "callgate_account": account,
        "callgate_rate": rate,
        "callgate_max_duration": str(max_duration),
        "callgate_routes": routes,
        "execute_on_answer": f"sched_hangup +{max_duration} ALLOTTED_TIMEOUT",
        **COMMON_VARIABLES,
    }
    for name, value in expected.items():
        assert result.variables.get(name) == value, (name, result.variables)
    assert result.variables["callgate_reason"] == "ACCEPTED"
    assert result.channel_variables["callgate_reason"] == "ACCEPTED"  # what the CDR records
    assert result.executed[-1] == ("bridge", dial_string)
    assert result.sip_response == (200, "OK")
    assert result.engine_closed


def test_sip_device_call_is_bridged_with_failover_across_both_carriers(engine: EngineProcess) -> None:
    result = call(
        engine, destination="442071234567", sip_auth_username="alice", caller_id_number="442000000001"
    )
    dial = "|".join(
        [
            CARRIER_A.format(gw="gw-a1", number="442071234567"),
            CARRIER_A.format(gw="gw-a2", number="442071234567"),
        ]
    )
    # carrier-b has no 4420 rate; its 44 (shorter prefix) comes after under LCR.
    dial += "|" + CARRIER_B.format(number="442071234567")
    # 10.00 / 0.0080 per minute = 75000 s, capped by call_max_length 6000.
    assert_bridged(
        result,
        account="1000000001",
        dial_string=dial,
        rate="4420:0.008",
        max_duration=6000,
        routes="carrier-a,carrier-b",
    )


def test_freeswitch_sends_only_what_the_engine_reads(engine: EngineProcess) -> None:
    result = call(engine, destination="442071234567", sip_auth_username="alice")
    assert [app for app, _ in result.executed] == ["multiset", "bridge"]
    # the filters leave the bridge's EXECUTE_COMPLETE and the hangup (not multiset's, nor socket's)
    assert result.events == ["CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP_COMPLETE"], result.events
    # the first reply is the connect reply's; then the frozen-engine guard's cancel (api sched_del,
    # answered at once by FreeSWITCH's listener thread), then the decision's commands in order
    assert result.replies[1:] == [
        "api/response",
        "+OK Events Enabled",
        "+OK events nixed",
        "+OK filter added. [Event-Name]=[CHANNEL_HANGUP_COMPLETE]",
        "+OK filter added. [Application]=[bridge]",
        "+OK will linger",
        "+OK",
        "+OK",
    ]


def test_ip_map_call_strips_the_tech_prefix(engine: EngineProcess) -> None:
    result = call(engine, destination="55441234567890", network_ip="10.20.0.9", caller_id_number="441111")
    dial = "|".join(
        [
            CARRIER_B.format(number="441234567890"),
            CARRIER_A.format(gw="gw-a1", number="441234567890"),
            CARRIER_A.format(gw="gw-a2", number="441234567890"),
        ]
    )
    # postpaid: -5.00 + 50.00 = 45.00 available at 0.0100/min -> 270000 s, capped at 6000.
    assert_bridged(
        result,
        account="1000000002",
        dial_string=dial,
        rate="44:0.01",
        max_duration=6000,
        routes="carrier-b,carrier-a",
    )


def test_header_identity_is_trusted_only_from_a_configured_proxy(engine: EngineProcess) -> None:
    header = {"sip_h_P-Accountcode": "1000000006"}
    trusted = call(engine, destination="441234567890", network_ip=TRUSTED_PROXY, extra_variables=header)
    assert trusted.variables.get("callgate_account") == "1000000006"
    spoofed = call(engine, destination="441234567890", network_ip="198.51.100.9", extra_variables=header)
    assert spoofed.variables.get("callgate_reason") == "AUTHENTICATION_FAIL"
    assert spoofed.sip_response == (403, "Forbidden")


@pytest.mark.parametrize(
    ("spec", "reason", "response"),
    [
        (
            {"sip_auth_username": "mallory", "destination": "441234567890"},
            "AUTHENTICATION_FAIL",
            (403, "Forbidden"),
        ),
        (
            {"network_ip": "10.99.0.1", "destination": "55441234567890"},
            "AUTHENTICATION_FAIL",
            (403, "Forbidden"),
        ),
        (
            {"sip_auth_username": "resold", "destination": "441234567890"},
            "ACCOUNT_INACTIVE",
            (403, "Forbidden"),
        ),
        (
            {"sip_auth_username": "expired", "destination": "441234567890"},
            "ACCOUNT_EXPIRED",
            (403, "Forbidden"),
        ),
        (
            {"sip_auth_username": "broke", "destination": "441234567890"},
            "NO_SUFFICIENT_FUND",
            (402, "Payment Required"),
        ),
        (
            {"sip_auth_username": "norate", "destination": "441234567890"},
            "ORIGINATION_RATE_NOT_FOUND",
            (404, "Not Found"),
        ),
        (
            {"sip_auth_username": "alice", "destination": "81312345678"},
            "ORIGINATION_RATE_NOT_FOUND",
            (404, "Not Found"),
        ),
        (
            {"sip_auth_username": "alice", "destination": "4930123456"},
            "TERMINATION_RATE_NOT_FOUND",
            (404, "Not Found"),
        ),
        (
            {"sip_auth_username": "alice", "destination": "33123456789"},
            "TERMINATION_RATE_NOT_FOUND",
            (404, "Not Found"),
        ),
        ({"sip_auth_username": "alice", "destination": "44${x}"}, "NO_ROUTE_DESTINATION", (404, "Not Found")),
    ],
    ids=[
        "unknown-device",
        "ip-outside-map",
        "reseller-inactive",
        "expired",
        "no-funds",
        "inactive-rate-group",
        "no-rate",
        "no-termination-rate",
        "lossless-drops-dearer-route",
        "unroutable-characters",
    ],
)
def test_rejected_call_gets_its_reason_and_exact_sip_response(
    engine: EngineProcess, spec: dict[str, str], reason: str, response: tuple[int, str]
) -> None:
    result = call(engine, **spec)
    assert result.variables == {"callgate_reason": reason}
    assert result.executed == [
        ("set", f"callgate_reason={reason}"),
        ("respond", f"{response[0]} {response[1]}"),
    ]
    assert result.sip_response == response
    assert result.engine_closed


def test_no_snapshot_means_engine_degraded_never_a_bridge(
    environment: dict[str, str], tmp_path: Path
) -> None:
    empty = {
        **environment,
        "CALLGATE_REDIS__KEY_PREFIX": environment["CALLGATE_REDIS__KEY_PREFIX"] + "empty:",
    }
    process = EngineProcess(empty).start(tmp_path / "serve.log")
    try:
        result = call(process, sip_auth_username="alice", destination="442071234567")
    finally:
        process.stop()
    assert result.variables == {"callgate_reason": "ENGINE_DEGRADED"}
    assert result.sip_response == (503, "Service Unavailable")


def test_garbage_from_a_peer_drops_only_that_connection(engine: EngineProcess) -> None:
    garbage = place_call(
        "127.0.0.1",
        engine.port,
        CallSpec(destination="4412", raw_channel_data=b"\x00\xffno colon here\n\n"),
        timeout=5,
    )
    assert garbage.executed == []
    good = call(engine, destination="442071234567", sip_auth_username="alice")
    assert good.executed[-1][0] == "bridge"
    assert "malformed data from FreeSWITCH" in engine.log()


def test_peer_that_never_answers_connect_is_dropped_after_the_deadline(engine: EngineProcess) -> None:
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as silent:
        assert silent.recv(64) == b"connect\n\n"
        started = time.monotonic()
        good = call(engine, destination="442071234567", sip_auth_username="alice")
        assert good.executed[-1][0] == "bridge"
        assert silent.recv(64) == b""  # the engine closed it
        assert time.monotonic() - started < 3
    assert "no channel data within 0.5s" in engine.log()


def test_unknown_config_key_is_a_clear_error(environment: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nlisten_prot = 8084\n")
    result = run_cli(["--config", str(bad), "serve"], environment)
    assert result.returncode == 2
    assert "unknown key(s) in [engine]: listen_prot" in result.stderr


def test_malformed_fixture_names_the_bad_entry(environment: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "customers:\n  - number: '1000000099'\n    email: x@example.com\n    password: Abcdefg123\n"
        "    ip_map: [{name: x, cidr: 10.0.0.300/24}]\n"
    )
    result = run_cli(["load", str(bad)], environment)
    assert result.returncode == 1
    assert "customers[0].ip_map[0].cidr" in result.stderr


def test_explain_shows_the_steps_and_the_engine_s_answer(environment: dict[str, str]) -> None:
    result = run_cli(["explain", "--sip-user", "broke", "--dest", "441234567890"], environment)
    assert result.returncode == 3, result.stderr
    assert "NO_SUFFICIENT_FUND" in result.stdout
    assert "402 Payment Required" in result.stdout
    accepted = run_cli(["explain", "--ip", "10.20.0.9", "--dest", "55441234567890", "--json"], environment)
    assert accepted.returncode == 0, accepted.stderr
    assert '"dial_string": "[leg_timeout=60]sofia/gateway/gw-b1/441234567890|' in accepted.stdout


def test_when_every_route_fails_the_engine_hangs_the_parked_call_up(engine: EngineProcess) -> None:
    result = call(
        engine,
        destination="442071234567",
        sip_auth_username="alice",
        answering_targets=lambda target: "USER_BUSY",
    )
    # One sendmsg per executed app, plus the engine's `call-command: hangup` after the failed bridge,
    # with the bridge's own failure cause (FreeSWITCH answers USER_BUSY as 486); just before it,
    # the engine records ROUTES_FAILED (issue 14 item 2), which the CDR then carries.
    assert result.commands.count("sendmsg") == len(result.executed) + 1
    assert [app for app, _ in result.executed] == ["multiset", "bridge", "set"]
    assert result.executed[-1] == ("set", "callgate_reason=ROUTES_FAILED")
    assert result.channel_variables["callgate_reason"] == "ROUTES_FAILED"
    assert (result.hangup_cause, result.sip_response) == ("USER_BUSY", (486, "Busy Here"))
    assert len(result.attempted_targets) == 3  # every gateway of every route was tried
    assert result.engine_closed


def test_over_capacity_a_call_is_answered_degraded_at_once(
    environment: dict[str, str], tmp_path: Path
) -> None:
    process = EngineProcess({**environment, "CALLGATE_ENGINE__MAX_CONNECTIONS": "1"}).start(
        tmp_path / "serve.log"
    )
    try:
        held_uuid = str(uuid4())
        held = gevent.spawn(
            call,
            process,
            uuid=held_uuid,
            destination="442071234567",
            sip_auth_username="alice",
            hold_seconds=2.0,
        )
        # the first call is admitted and holds the only connection
        wait_until(lambda: is_counted(environment, held_uuid), what="the first call admitted")
        refused = call(process, destination="442071234567", sip_auth_username="alice")
        assert held.get(timeout=10).executed[-1][0] == "bridge"
    finally:
        process.stop()
    assert refused.variables == {"callgate_reason": "ENGINE_DEGRADED"}
    assert refused.sip_response == (503, "Service Unavailable")
