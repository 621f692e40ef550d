"""The SIPp suite's pure parts (loadtest/sipp): no SIPp, no FreeSWITCH.

The real runs are manual (docs/real-switch-lab.md); here: the committed scenarios are the
renderer's output and well-formed, the callers' log lines parse, expectations judge results
as they should, case selection honours hooks and --slow, the lab catalogue keeps the demo's
outcomes while moving its IP maps onto loopback, and the command line SIPp gets.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psycopg
import pytest

from engine.db.fixtures import load_document
from engine.db.migrate import migrate
from loadtest.sipp import cases as cs
from loadtest.sipp import delayproxy, fixture, scenarios
from loadtest.sipp.__main__ import pdd_rows
from loadtest.sipp.results import (
    CallResult,
    metric_deltas,
    parse_line,
    parse_log,
    parse_metrics,
    pdd_summary,
    percentile,
    table,
)
from loadtest.sipp.runner import (
    DEFAULT_CALLEE_PORTS,
    CaseRun,
    RunOptions,
    csv_rows,
    parse_hooks,
    parse_ports,
    sipp_command,
)

# What the caller scenario logs (captured from a real run against FreeSWITCH 1.10.12).
ANSWERED = (
    "CGLAB;1-5296@127.0.0.26;local_bye;SIP/2.0 200;SIP/2.0 180;1796565886.000000;47013.000000;"
    "1796565886.000000;92572.000000;1796565886.000000;195767.000000;1796565888.000000;201401.000000;"
)
TIMED_OUT = (
    "CGLAB;1-8022@127.0.0.64;remote_bye;SIP/2.0 200;SIP/2.0 180;1796565990.000000;761746.000000;"
    "1796565990.000000;807126.000000;1796565990.000000;909714.000000;1796565995.000000;428948.000000;"
    'Reason: SIP;cause=802;text="ALLOTTED_TIMEOUT"'
)
REFUSED = (
    "CGLAB;1-6810@127.0.0.1;refused;SIP/2.0 503;;1796565948.000000;53717.000000;0;0;"
    "1796565948.000000;78000.000000;;;"
)


def test_committed_scenarios_are_the_renderers_output() -> None:
    for name, text in scenarios.rendered().items():
        path = scenarios.SCENARIO_DIR / name
        assert path.read_text() == text, f"{name} is stale: python -m loadtest.sipp scenarios --write"


@pytest.mark.parametrize("name", sorted(scenarios.rendered()))
def test_scenarios_are_well_formed_sipp_xml(name: str) -> None:
    root = ET.fromstring(scenarios.rendered()[name].split("\n", 2)[2])  # after <?xml ..?> and DOCTYPE
    assert root.tag == "scenario"
    labels = {e.get("id") for e in root.iter("label")}
    targets = {e.get(attr) for e in root for attr in ("next", "ontimeout") if e.get(attr)}
    assert targets <= labels, f"jumps to missing labels: {targets - labels}"
    recvs = [e for e in root if e.tag == "recv"]
    # SIPp refuses a run of optional <recv>s not closed by a mandatory one.
    for i, elem in enumerate(list(root)):
        if elem.tag == "recv" and elem.get("optional") == "true":
            following = list(root)[i + 1 :]
            assert any(f.tag == "recv" and f.get("optional") != "true" for f in following)
    assert recvs


def test_caller_accepts_every_final_error_and_acks_it_in_the_invite_transaction() -> None:
    text = scenarios.caller()
    for code in scenarios.FINAL_ERRORS:
        assert f'<recv response="{code}"' in text
    ack = text[text.index('<label id="failed"/>') :]
    assert "ACK sip:" in ack and "[$inv_branch_kv]" in ack  # the INVITE's branch, not a new one


def test_parse_answered_call() -> None:
    result = parse_line(ANSWERED)
    assert result is not None
    assert (result.outcome, result.final_code, result.ring_code) == ("local_bye", "200", "180")
    assert result.pdd_ms == pytest.approx(45.559, abs=0.01)
    assert result.final_ms == pytest.approx(148.754, abs=0.01)
    assert result.talk_seconds == pytest.approx(2.005634, abs=1e-4)


def test_parse_freeswitch_bye_reason() -> None:
    result = parse_line(TIMED_OUT)
    assert result is not None
    assert result.bye_reason == 'SIP;cause=802;text="ALLOTTED_TIMEOUT"'
    assert result.talk_seconds == pytest.approx(4.519, abs=1e-3)


def test_parse_refused_call_has_no_ring_nor_talk() -> None:
    result = parse_line(REFUSED)
    assert result is not None
    assert (result.final_code, result.ring_code, result.pdd_ms, result.talk_seconds) == (
        "503",
        "",
        None,
        None,
    )
    assert result.final_ms == pytest.approx(24.283, abs=0.01)


@pytest.mark.parametrize("line", ["", "CGLAB;x", "OTHER;" + ANSWERED[6:], "garbage;" * 14])
def test_parse_ignores_other_lines(line: str) -> None:
    assert parse_line(line) is None


def test_parse_log_counts_each_call_once() -> None:
    assert len(parse_log([ANSWERED, ANSWERED, "noise", REFUSED])) == 2


def _result(code: str, **kw: object) -> CallResult:
    base: dict[str, object] = dict(
        call_id=f"c{code}{len(kw)}",
        outcome="refused" if code != "200" else "local_bye",
        final_code=code,
        ring_code="",
        t_invite=100.0,
        t_ring=None,
        t_final=100.05,
        t_end=None,
    )
    base.update(kw)
    return CallResult(**base)  # type: ignore[arg-type]


def test_check_counts_codes_exactly() -> None:
    case = cs.Case("x", "limits", "", cs.LAB, "1", cs.Expect({"200": 2, "503": 3}), calls=5)
    calls = [_result("200", call_id=f"a{i}") for i in range(2)] + [
        _result("503", call_id=f"b{i}") for i in range(3)
    ]
    verdict = cs.check(case, calls)
    assert verdict.ok and verdict.observed == "2x200, 3x503"
    assert not cs.check(case, calls[:-1]).ok  # a call missing
    assert not cs.check(case, [*calls[:-1], _result("200", call_id="z")]).ok  # a limit leaked


def test_check_duration_and_bye_reason() -> None:
    expect = cs.Expect({"200": 1}, remote_bye_reason="ALLOTTED_TIMEOUT", answered_seconds=(4.0, 6.5))
    case = cs.Case("d", "duration", "", cs.LAB, "1", expect)
    good = parse_line(TIMED_OUT)
    assert good is not None and cs.check(case, [good]).ok
    early = _result(
        "200", outcome="remote_bye", t_end=101.0, bye_reason='SIP;cause=802;text="ALLOTTED_TIMEOUT"'
    )
    assert not cs.check(case, [early]).ok  # ended after 0.95 s
    caller_hung_up = parse_line(ANSWERED)
    assert caller_hung_up is not None and not cs.check(case, [caller_hung_up]).ok  # no BYE from FreeSWITCH


def test_check_final_time_bound() -> None:
    case = cs.Case("e", "outage", "", cs.LAB, "1", cs.Expect({"503": 1}, max_final_ms=3000))
    assert cs.check(case, [_result("503")]).ok
    assert not cs.check(case, [_result("503", t_final=135.0)]).ok  # a 35 s wait


def test_select_by_name_group_hooks_and_slow() -> None:
    all_cases = cs.demo_cases() + cs.lab_cases(5.0, 10)
    chosen, skipped = cs.select(all_cases, [], set(), slow=False)
    names = {c.name for c in chosen}
    assert "demo-01" in names and "concurrent-limit" in names
    assert {c.name for c, _ in skipped} == {
        "engine-down",
        "engine-frozen",
        "redis-down",
        "slow-replies",
        "abandoned",
        "device-onnet",
        "device-did",
        "ring-timeout",
    }
    why = dict((c.name, why) for c, why in skipped)
    assert why["device-did"] == "needs --register-devices" and why["abandoned"] == "needs --late-prefix"
    hooks = {"engine-down", "engine-up", "engine-freeze", "engine-thaw", "redis-down", "redis-up"}
    chosen, skipped = cs.select(all_cases, ["outage"], hooks, slow=False)
    # The frozen engine costs the dialplan's 4 s guard, no longer ~35 s: not a slow case.
    assert [c.name for c in chosen] == ["engine-down", "engine-frozen", "redis-down"]
    assert skipped == []
    assert why["ring-timeout"] == "slow: needs --slow"  # rings out a 30 s leg timeout
    slow_case = cs.Case("s", "outage", "", cs.LAB, "1", cs.Expect({"503": 1}), slow=True)
    assert cs.select([slow_case], [], set(), slow=False)[1] == [(slow_case, "slow: needs --slow")]
    chosen, _ = cs.select(all_cases, ["demo-05", "limits"], set(), slow=False)
    assert [c.name for c in chosen] == ["demo-05", "concurrent-limit", "cps-limit"]


def test_demo_cases_follow_the_demo_catalogue_header() -> None:
    header = fixture.DEMO_PATH.read_text().split("localizations:")[0]
    by_name = {c.name: c for c in cs.demo_cases()}
    for number, code in (("5", "403"), ("9", "403")):
        assert f"# {number:>2}." in header or f"#  {number}." in header
        assert by_name[f"demo-0{number}"].expect.codes == {code: 1}
    assert "NO_ROUTE_DESTINATION (404)" in header and by_name["demo-12b"].expect.codes == {"404": 1}
    for case in by_name.values():
        assert case.dest.isdigit()


def test_lab_catalogue_moves_ip_maps_to_loopback_and_adds_the_lab() -> None:
    demo = fixture.load_demo()
    lab = fixture.lab_catalogue(demo)
    assert demo["customers"][1]["ip_map"][0]["cidr"] == "203.0.113.0/28"  # the input is untouched
    cidrs = [e["cidr"] for s in ("providers", "customers") for a in lab[s] for e in a.get("ip_map") or []]
    loopback = ipaddress.IPv4Network("127.0.0.0/8")
    assert all(ipaddress.IPv4Network(c).subnet_of(loopback) for c in cidrs)  # an IPv6 net fails to parse
    nets = [ipaddress.ip_network(n) for n in fixture.NO_AUTH_NETWORKS]
    for ip in (fixture.NORTHWIND_IP, fixture.CARRIER_ALPHA_IP, fixture.STRANGER_IP, fixture.LAB_CALLER_IP):
        assert any(ipaddress.ip_address(ip) in n for n in nets)  # FreeSWITCH lets them through unchallenged
    assert ipaddress.ip_address(fixture.NORTHWIND_IP) in ipaddress.ip_network(fixture.NORTHWIND_NET)
    assert not any(ipaddress.ip_address(fixture.STRANGER_IP) in ipaddress.ip_network(c) for c in cidrs)
    assert {g["name"] for g in lab["gateways"]} >= {"alpha-gw1", "beta-gw1", "bye-gw", "ring-gw", "dead-gw"}


def test_lab_catalogue_loads_idempotently(fresh_pg_url: str) -> None:
    migrate(fresh_pg_url)
    doc = fixture.lab_catalogue(fixture.load_demo())
    with psycopg.connect(fresh_pg_url) as conn:
        first = load_document(conn, doc)
        again = load_document(conn, doc)
        cidrs = {row[0] for row in conn.execute("SELECT cidr::text FROM ip_map")}
    assert first.inserted["accounts"] == 11 and again.changed == 0
    assert cidrs == {fixture.NORTHWIND_NET, fixture.CARRIER_ALPHA_NET} | {
        f"{ip}/32" for ip in (fixture.LAB_CALLER_IP, fixture.TWO_CHANNELS_IP, fixture.TWO_CPS_IP)
    }


def test_sipp_command_and_inputs(tmp_path: Path) -> None:
    options = RunOptions(fs_host="10.1.2.3", fs_port=5080)
    alice = cs.Caller("127.0.0.1", "alice", "pw", "442079460001")
    cmd = sipp_command(
        options,
        "caller.xml",
        alice,
        "00442079460123",
        tmp_path / "i",
        tmp_path / "l",
        tmp_path / "e",
        calls=5,
        rate=50,
        timeout=60,
    )
    assert cmd[1] == "10.1.2.3:5080"
    assert cmd[cmd.index("-i") + 1] == "127.0.0.1" and "-bind_local" in cmd
    assert cmd[cmd.index("-auth_uri") + 1] == "00442079460123@10.1.2.3:5080"
    assert cmd[cmd.index("-m") + 1] == "5" and cmd[cmd.index("-l") + 1] == "5"
    no_auth = sipp_command(
        options,
        "caller.xml",
        cs.LAB,
        "1",
        tmp_path / "i",
        tmp_path / "l",
        tmp_path / "e",
        calls=1,
        rate=1,
        timeout=5,
    )
    assert "-au" not in no_auth
    assert csv_rows(alice, "1", 2) == "SEQUENTIAL\n1;alice;;442079460001;\n1;alice;;442079460001;\n"


def test_hook_and_port_parsing() -> None:
    assert parse_hooks(["engine-down=kill 1", "redis-up=a=b"]) == {"engine-down": "kill 1", "redis-up": "a=b"}
    with pytest.raises(ValueError):
        parse_hooks(["engine-down"])
    assert parse_ports("answer=1,bye=2,ring=3") == {"answer": 1, "bye": 2, "ring": 3}
    with pytest.raises(ValueError):
        parse_ports("answer=1,bye=2")
    with pytest.raises(ValueError):
        parse_ports("answer=1,bye=2,ring=3,other=4")


def test_pdd_summary_and_table() -> None:
    a = parse_line(ANSWERED)
    b = parse_line(TIMED_OUT)
    assert a is not None and b is not None
    summary = pdd_summary([a, b, _result("503")])
    assert summary["n"] == 2 and summary["p50"] == pytest.approx(45.38, abs=0.01)
    assert pdd_summary([]) == {"n": 0}
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    rows, raw = pdd_rows({"callgate": [CaseRun("callgate", [a, b], cpu_seconds=0.04)]})
    assert raw["callgate"]["fs_cpu_ms_per_call"] == pytest.approx(20.0)
    assert rows[0][0] == "callgate" and rows[0][-1] == "20.0"
    text = table(rows, ("variant", "calls", "answered", "p50", "mean", "p90", "max", "cpu"))
    assert text.splitlines()[0].startswith("| variant") and text.count("\n") == 2


def _with_reason(code: str, reason: str, call_id: str, **channel: str) -> CallResult:
    return _result(code, call_id=call_id, channel={"callgate_reason": reason, **channel})


def test_channel_checks_reasons_of_refused_calls() -> None:
    case = cs.Case(
        "c",
        "limits",
        "",
        cs.LAB,
        "1",
        cs.Expect({"200": 2, "503": 1}, reasons={"CONCURRENT_LIMIT": 1}),
        calls=3,
    )
    good = [
        _with_reason("200", "", "a", callgate_rate="4420:0.0096"),
        _with_reason("200", "", "b"),
        _with_reason("503", "CONCURRENT_LIMIT", "c"),
    ]
    verdict = cs.check(case, good)
    assert verdict.ok and "callgate_reason 2x(unset), 1xCONCURRENT_LIMIT" in verdict.notes
    wrong = [*good[:2], _with_reason("503", "CPS_LIMIT", "c")]
    assert not cs.check(case, wrong).ok


def test_channel_checks_catch_the_issue_14_defects() -> None:
    case = cs.Case("a", "accept", "", cs.LAB, "1", cs.Expect({"200": 1}))
    stale = _with_reason("200", "ENGINE_UNREACHABLE", "a")  # accepted, CDR says the engine was down
    verdict = cs.check(case, [stale])
    assert not verdict.ok and "1 decided call(s) recorded ENGINE_UNREACHABLE" in verdict.notes
    empty_prefix = _with_reason("200", "", "a", callgate_rate=":0.001")  # an empty multiset value
    assert not cs.check(case, [empty_prefix]).ok
    down = cs.Case("d", "outage", "", cs.LAB, "1", cs.Expect({"503": 1}, reasons={"ENGINE_UNREACHABLE": 1}))
    assert cs.check(down, [_with_reason("503", "ENGINE_UNREACHABLE", "d")]).ok


def test_channel_checks_are_skipped_without_cdrs() -> None:
    case = cs.Case("a", "accept", "", cs.LAB, "1", cs.Expect({"403": 1}, reasons={"DESTINATION_BLOCKED": 1}))
    verdict = cs.check(case, [_result("403")])  # --esl not given: nothing to compare
    assert verdict.ok and not any(n.startswith("callgate_reason") for n in verdict.notes)


def test_metric_deltas_judge_the_abandoned_call() -> None:
    before = parse_metrics(
        '# HELP x\ncallgate_socket_errors_total{kind="gone"} 0.0\n'
        'callgate_socket_errors_total{kind="protocol"} 2.0\nbad line\n'
    )
    after = parse_metrics(
        'callgate_socket_errors_total{kind="gone"} 0.0\ncallgate_socket_errors_total{kind="protocol"} 3.0\n'
    )
    deltas = metric_deltas(before, after)
    assert deltas == {
        'callgate_socket_errors_total{kind="gone"}': 0.0,
        'callgate_socket_errors_total{kind="protocol"}': 1.0,
    }
    case = next(c for c in cs.lab_cases(5.0, 10) if c.name == "abandoned")
    cancelled = _result("487")
    assert not cs.check(case, [cancelled], deltas).ok  # counted as a protocol error (issue 14)
    fixed = {
        'callgate_socket_errors_total{kind="gone"}': 1.0,
        'callgate_socket_errors_total{kind="protocol"}': 0.0,
    }
    assert cs.check(case, [cancelled], fixed).ok
    assert cs.check(case, [cancelled], None).ok  # --metrics not given


def test_delay_proxy_holds_one_direction_only() -> None:
    """Real sockets on loopback (OS-assigned ports): what goes towards the engine waits at least
    the delay; the engine's answer comes straight back."""

    async def scenario() -> tuple[float, float]:
        received: asyncio.Queue[float] = asyncio.Queue()

        async def engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(5)
            await received.put(time.monotonic())
            writer.write(b"+OK\n")
            await writer.drain()

        engine_server = await asyncio.start_server(engine, "127.0.0.1", 0)
        engine_port = engine_server.sockets[0].getsockname()[1]
        proxy = await asyncio.start_server(
            delayproxy.handler(("127.0.0.1", engine_port), 1.0, "engine"), "127.0.0.1", 0
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        sent = time.monotonic()
        writer.write(b"hello")
        await writer.drain()
        arrived = await asyncio.wait_for(received.get(), 10)
        await asyncio.wait_for(reader.readexactly(4), 10)
        back = time.monotonic()
        writer.close()
        proxy.close()
        engine_server.close()
        return arrived - sent, back - arrived

    towards_engine, towards_switch = asyncio.run(scenario())
    assert towards_engine >= 1.0
    assert towards_switch < towards_engine
    with pytest.raises(ValueError):
        delayproxy.handler(("127.0.0.1", 1), 1.0, "sideways")


def test_lab_catalogue_gateways_lead_to_the_lab_callees() -> None:
    lab = fixture.lab_catalogue(fixture.load_demo())
    by_name = {g["name"]: g for g in lab["gateways"]}
    assert set(by_name) == set(fixture.GATEWAY_TARGETS)
    callee_ports = {f"127.0.0.1:{port}" for port in DEFAULT_CALLEE_PORTS.values()}
    assert by_name["beta-gw1"]["proxy"] not in callee_ports and by_name["beta-gw2"]["proxy"] in callee_ports
    assert all(g["register"] is False and g["sip_profile"] == fixture.SIP_PROFILE for g in by_name.values())


def test_alternative_outcomes_for_state_outside_the_catalogue() -> None:
    case = next(c for c in cs.demo_cases() if c.name == "demo-06")  # 480, or 200 if the device is registered
    assert cs.check(case, [_result("480")]).ok and cs.check(case, [_result("200")]).ok
    assert not cs.check(case, [_result("503")]).ok
