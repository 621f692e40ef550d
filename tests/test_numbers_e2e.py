"""Number rules and call direction end to end, on the shipped demo catalogue (config/demo.yaml).

Every demo call listed at the top of config/demo.yaml is placed through the
emulator against a real engine, plus a few customers added here for the rules
the demo does not exercise (local calls refused, CLI reject, misconfigured pool).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from engine.db.fixtures import load_document, load_file
from engine.db.migrate import migrate
from loadtest.fsemu import CallSpec, place_call
from tests.support import ROOT, EngineProcess, engine_environment, publish

EXTRA_CUSTOMERS = {
    "customers": [
        # The demo gives alice 1 call per second; these tests call back to back.
        {
            "number": "1000000001",
            "email": "alice@carterdesign.example",
            "password": "AliceDemo2024",
            "cps": 0,
        },
        {
            "number": "1000000010",
            "email": "strict@example.com",
            "password": "Strict2024x",
            "balance": "10.00",
            "rate_group": "retail",
            "cli_pool": 8,
            "local_calls_allowed": False,
            "caller_ids": [{"number": "441111111111"}],
            "sip_devices": [{"username": "strict", "password": "Secret123x"}],
        },
        {
            "number": "1000000011",
            "email": "misconf@example.com",
            "password": "Misconf2024",
            "balance": "10.00",
            "rate_group": "retail",
            "cli_pool": 1,
            "sip_devices": [{"username": "misconf", "password": "Secret123x"}],
        },
    ]
}

ALPHA = "[leg_timeout=30,{cid}absolute_codec_string=^^:PCMA:PCMU:G729]sofia/gateway/{gw}/{number}"
# Alpha's provider rules put a + on the caller ID too, so its legs carry their own caller ID.
ALICE_ON_ALPHA = "origination_caller_id_number=+442079460001,origination_caller_id_name=442079460001,"
BETA = "[leg_timeout=45,absolute_codec_string=^^:PCMA:G729]sofia/gateway/{gw}/{number}"


@pytest.fixture(scope="module")
def engine(module_pg_url: str, redis_url: str, module_key_prefix: str, tmp_path_factory):
    env = engine_environment(module_pg_url, redis_url, module_key_prefix)
    migrate(module_pg_url)
    with psycopg.connect(module_pg_url) as conn:
        load_file(conn, ROOT / "config" / "demo.yaml")
    with psycopg.connect(module_pg_url) as conn:
        load_document(conn, EXTRA_CUSTOMERS)
    publish(env)
    process = EngineProcess(env).start(tmp_path_factory.mktemp("numbers") / "serve.log")
    yield process
    process.stop()


def call(engine: EngineProcess, **spec):
    spec.setdefault("hold_seconds", 0.1)
    result = place_call("127.0.0.1", engine.port, CallSpec(**spec), timeout=10)
    assert result.error is None, (result.error, engine.log()[-2000:])
    return result


def bridged_to(result) -> list[str]:
    assert result.executed[-1][0] == "bridge", result.variables
    return result.executed[-1][1].split("|")


def test_localization_then_routes_with_per_carrier_number_rules(engine) -> None:
    # demo call 1: uk-national maps 00442079460123 -> 442079460123; Beta wants 00, Alpha wants +E.164.
    result = call(
        engine, sip_auth_username="alice", destination="00442079460123", caller_id_number="442079460001"
    )
    assert result.variables["callgate_rate"] == "4420:0.0096"
    assert bridged_to(result) == [
        BETA.format(gw="beta-gw1", number="00442079460123"),
        BETA.format(gw="beta-gw2", number="00442079460123"),
        ALPHA.format(gw="alpha-gw1", number="+442079460123", cid=ALICE_ON_ALPHA),
        ALPHA.format(gw="alpha-gw2", number="+442079460123", cid=ALICE_ON_ALPHA),
    ]


def test_speed_dial_only_on_an_exact_key(engine) -> None:
    speed = call(engine, sip_auth_username="alice", destination="1", caller_id_number="442079460001")
    assert bridged_to(speed)[0] == BETA.format(gw="beta-gw1", number="00442079460000")
    # "01" is not the key "1": it is localized like any number (0/44 gives 441), never speed-dialled.
    not_a_key = call(engine, sip_auth_username="alice", destination="01", caller_id_number="442079460001")
    assert not_a_key.variables["callgate_rate"].startswith("441:")
    assert all(target.endswith("441") for target in bridged_to(not_a_key))


def test_blocked_code_matches_the_localized_number(engine) -> None:
    # 0044 9… escapes a block on 449 only if the block is checked before localization (ASTPP's bug).
    result = call(
        engine, sip_auth_username="alice", destination="00449012345678", caller_id_number="442079460001"
    )
    assert result.variables == {"callgate_reason": "DESTINATION_BLOCKED"}
    assert result.sip_response == (403, "Forbidden")


def test_local_call_bridges_to_the_user_when_allowed(engine) -> None:
    result = call(
        engine, sip_auth_username="alice", destination="2000000101", caller_id_number="442079460001"
    )
    assert result.variables["callgate_direction"] == "local"
    assert bridged_to(result) == ["[leg_timeout=60]user/2000000101@${domain_name}"]


def test_local_call_not_allowed_is_handled_as_outbound(engine) -> None:
    result = call(
        engine, sip_auth_username="strict", destination="2000000101", caller_id_number="441111111111"
    )
    assert result.variables["callgate_direction"] == "outbound"
    assert all("sofia/gateway/" in target for target in bridged_to(result))


def test_cli_pool_non_cli_rate_group_and_forced_caller_id(engine) -> None:
    # demo call 8: Northwind's CLI is neither a DID nor a caller ID -> NON-CLI group retail-noncli;
    # then its forced caller ID replaces what the carrier sees.
    result = call(
        engine, network_ip="203.0.113.10", destination="7788442079460123", caller_id_number="15550001111"
    )
    assert result.variables["callgate_rate"] == "4420:0.018"
    assert result.variables["effective_caller_id_number"] == "12125550100"
    assert result.variables["effective_caller_id_name"] == "Northwind"


def test_cli_pool_keeps_a_whitelisted_cli(engine) -> None:
    result = call(
        engine, network_ip="203.0.113.10", destination="778812125550123", caller_id_number="12125550100"
    )
    assert result.variables["callgate_rate"] == "1212:0.0064"


def test_cli_pool_rejects_an_unlisted_cli(engine) -> None:
    result = call(
        engine, sip_auth_username="strict", destination="441234567890", caller_id_number="449999999"
    )
    assert result.variables == {"callgate_reason": "CLI_NOT_ALLOWED"}
    assert result.sip_response == (403, "Forbidden")


def test_cli_pool_misconfigured_is_refused_with_503(engine) -> None:
    result = call(engine, sip_auth_username="misconf", destination="441234567890", caller_id_number="441111")
    assert result.variables == {"callgate_reason": "CLI_POOL_MISCONFIGURED"}
    assert result.sip_response == (503, "Service Unavailable")


def test_inbound_did_to_a_device(engine) -> None:
    # demo call 12: Carrier Alpha sends alice's DID.
    result = call(
        engine, network_ip="198.51.100.5", destination="442071234567", caller_id_number="447700900555"
    )
    assert result.variables["callgate_direction"] == "inbound"
    assert result.variables["callgate_account"] == "1000000001"  # the DID owner
    assert bridged_to(result) == ["[leg_timeout=60]user/alice@${domain_name}"]


def test_inbound_did_to_a_sip_uri(engine) -> None:
    result = call(
        engine, network_ip="198.51.100.5", destination="12125550100", caller_id_number="447700900555"
    )
    assert result.variables["callgate_direction"] == "inbound"
    assert bridged_to(result)[0].endswith("sofia/external/sip:12125550100@203.0.113.5:5060")


def test_unassigned_did_is_rejected(engine) -> None:
    result = call(
        engine, network_ip="198.51.100.5", destination="442039990000", caller_id_number="447700900555"
    )
    assert result.variables == {"callgate_reason": "NO_ROUTE_DESTINATION"}
    assert result.sip_response == (404, "Not Found")


def test_reseller_chain_pays_at_both_levels(engine) -> None:
    # demo call 10: Bright Dental under ACME; both levels rated, chain variable set.
    result = call(
        engine, sip_auth_username="2000000101", destination="004915112345678", caller_id_number="442079460201"
    )
    assert result.variables["callgate_reseller_chain"] == "2000000001"
    assert result.variables["callgate_rate"] == "4915:0.04"


def test_demo_header_matches_what_the_engine_does(engine, tmp_path: Path) -> None:
    """The demo calls promised at the top of config/demo.yaml are the engine's real answers."""
    header = (ROOT / "config" / "demo.yaml").read_text().split("\nlocalizations:")[0]
    assert "DESTINATION_BLOCKED" in header and "NO_ROUTE_DESTINATION" in header
    unknown_ip = call(engine, network_ip="192.0.2.50", destination="7788442071112222")
    assert unknown_ip.variables == {"callgate_reason": "AUTHENTICATION_FAIL"}
