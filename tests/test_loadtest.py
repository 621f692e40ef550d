"""Correctness of the load-test harness itself (loadtest/, not the engine's speed).

The dataset is deterministic and exercises every call class; the floor and greenswitch
baselines answer the FreeSWITCH emulator properly; the lean driver speaks the emulator's
bytes and reaches the same decisions; the lab driver's ESL handling works against an
emulated inbound socket that originates; percentiles are nearest-rank.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
import pytest
import redis

from engine.call.channel import call_request
from engine.call.render import FOLLOWED_EVENTS
from engine.decision import Accept
from engine.esl.protocol import EslParser
from engine.model import CallRequest
from engine.rules import Catalog, DecisionContext, RulesConfig, decide
from engine.state.codec import encode_entity
from engine.state.snapshot import read_snapshot
from loadtest import dataset, driver, lab, stats
from loadtest.dataset import CallMix, CallPlan, Scale, generate
from loadtest.fsemu import CallResult, CallSpec, InboundServer, Switch, place_call
from loadtest.profile import summarize_collapsed
from tests.support import wait_until

TINY = Scale(accounts=1_000, rates=2_000, groups=4, trunks=10, termination_rates=2_000)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def library() -> driver.FsLibrary:
    return driver.record_library()


@pytest.fixture(scope="module")
def tiny_catalog() -> Catalog:
    return Catalog.build(generate(TINY))


# --------------------------------------------------------------------------- dataset


def _encoded(data) -> dict[str, list[bytes]]:
    return {name: [encode_entity(e) for e in getattr(data, name)] for name in dataset.ENTITY_NAMES}


def test_dataset_is_deterministic() -> None:
    first, second = generate(TINY), generate(TINY)
    assert _encoded(first) == _encoded(second)
    assert first.version == second.version == dataset.scale_fingerprint(TINY)
    other = generate(replace(TINY, seed=2))
    assert _encoded(other) != _encoded(first)
    assert dataset.scale_fingerprint(replace(TINY, seed=2)) != dataset.scale_fingerprint(TINY)


def test_dataset_has_the_requested_scale() -> None:
    data = generate(TINY)
    customers = TINY.accounts
    assert len([a for a in data.accounts if a.number.isdigit()]) == customers
    assert len(data.trunks) == TINY.trunks
    assert len(data.origination_rates) == TINY.groups * TINY.prefixes
    assert len({(r.rate_group_id, r.prefix) for r in data.origination_rates}) == len(data.origination_rates)
    assert len(data.ip_map) + len(data.sip_devices) == customers - TINY.reseller_count


def test_dataset_accounts_have_mostly_been_used_before() -> None:
    customers = [a for a in generate(TINY).accounts if a.number.isdigit()]
    new = [a for a in customers if a.first_used is None]
    assert len(new) == len(customers) * len(dataset.ROLE_NEW) // 100
    assert all(a.first_used == dataset.FIRST_USED_AT for a in customers if a not in new)


def test_call_mix_is_deterministic_and_weighted() -> None:
    first = CallMix(TINY, seed=5).take(3000)
    assert first == CallMix(TINY, seed=5).take(3000)
    assert first != CallMix(TINY, seed=6).take(3000)
    kinds = {p.kind for p in first}
    assert kinds == set(dataset.DEFAULT_MIX)
    accepted = sum(p.kind in dataset.ACCEPTED_CLASSES for p in first) / len(first)
    assert 0.80 < accepted < 0.90
    held = CallMix(TINY, {"accept": 1, "no_funds": 1}, hold=(2.0, 4.0), seed=1).take(200)
    assert all(2.0 <= p.hold <= 4.0 for p in held if p.kind == "accept")
    assert all(p.hold == 0 for p in held if p.kind == "no_funds")
    with pytest.raises(ValueError):
        CallMix(TINY, {"nonsense": 1.0})


EXPECTED = {
    "accept": "accept",
    "accept_ip": "accept",
    "auth_fail": "AUTHENTICATION_FAIL",
    "inactive": "ACCOUNT_INACTIVE",
    "expired": "ACCOUNT_EXPIRED",
    "no_funds": "NO_SUFFICIENT_FUND",
    "no_origination": "ORIGINATION_RATE_NOT_FOUND",
    "no_termination": "TERMINATION_RATE_NOT_FOUND",
    "bad_destination": "NO_ROUTE_DESTINATION",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_each_call_class_gets_its_decision_from_the_rules(kind: str, tiny_catalog: Catalog) -> None:
    ctx = DecisionContext(now=datetime.now(UTC), rng=random.Random(1), config=RulesConfig())
    for plan in CallMix(TINY, {kind: 1.0}, seed=3).take(25):
        request = CallRequest(
            uuid="x",
            destination=plan.destination,
            sip_auth_username=plan.sip_auth_username,
            network_ip=plan.network_ip,
        )
        decision = decide(request, tiny_catalog, ctx)
        got = "accept" if isinstance(decision, Accept) else decision.reason.value
        assert got == EXPECTED[kind], (plan, decision)


def test_dataset_published_into_redis_reads_back(redis_url: str, key_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        version = dataset.ensure_published(client, key_prefix, TINY, log=lambda _m: None)
        assert dataset.published_fingerprint(client, key_prefix) == dataset.scale_fingerprint(TINY)
        # A second call finds it current and publishes nothing.
        assert dataset.ensure_published(client, key_prefix, TINY, log=pytest.fail) == version
        back = read_snapshot(client, key_prefix)
        data = generate(TINY)
        for name in dataset.ENTITY_NAMES:
            assert len(getattr(back, name)) == len(getattr(data, name)), name
    finally:
        client.close()


# --------------------------------------------------------------------------- the baselines


@contextlib.contextmanager
def floor_server(kind: str = "accept") -> Iterator[int]:
    from loadtest.floor import make_server

    server = make_server("127.0.0.1", 0, kind=kind)
    server.start()
    try:
        yield server.server_port
    finally:
        server.stop(timeout=1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def greenswitch_server() -> Iterator[int]:
    # greenswitch is a benchmark baseline only (the `bench` and `test` extras), never a dependency.
    pytest.importorskip("greenswitch", reason="greenswitch is in the bench/test extras only")
    from loadtest.greenswitch_app import make_server

    port = _free_port()
    server = make_server("127.0.0.1", port)
    listener = gevent.spawn(server.listen)
    gevent.sleep(0.05)
    try:
        yield port
    finally:
        server.stop()
        listener.join(timeout=2)


def _emulated_call(port: int, **extra: Any) -> CallResult:
    spec = CallSpec(destination="441234567890", sip_auth_username="u1000120", **extra)
    return place_call("127.0.0.1", port, spec, timeout=5)


# as the engine: the frozen-engine guard's cancel (api sched_del) first, then the decision's commands
ENGINE_OPENING = ["connect", "api", "myevents", "nixevent", "filter", "filter", "linger"]


def test_floor_server_answers_the_emulator() -> None:
    from loadtest.floor import DIAL_STRING, VARIABLES

    with floor_server() as port:
        result = _emulated_call(port)
    assert result.error is None, result.error
    assert [c.split(" ")[0] for c in result.commands[:7]] == ENGINE_OPENING
    assert result.variables == dict(VARIABLES)
    assert set(result.events) <= set(FOLLOWED_EVENTS)  # the engine's subscription
    assert result.bridged_target == DIAL_STRING.split("|")[0].split("]", 1)[1]
    assert result.sip_response == (200, "OK")
    assert result.engine_closed and result.decision_latency is not None
    assert "CHANNEL_HANGUP_COMPLETE" in result.events


def test_floor_server_reject_variant() -> None:
    with floor_server("reject") as port:
        result = _emulated_call(port)
    assert result.error is None, result.error
    assert result.sip_response == (403, "Forbidden")
    assert result.variables == {"callgate_reason": "AUTHENTICATION_FAIL"}
    assert result.engine_closed


def test_greenswitch_baseline_answers_the_emulator() -> None:
    from loadtest.floor import VARIABLES

    with greenswitch_server() as port:
        result = _emulated_call(port, hold_seconds=0.05)
    assert result.error is None, result.error
    assert [c.split(" ")[0] for c in result.commands[:7]] == ENGINE_OPENING
    assert result.variables == dict(VARIABLES)
    assert result.bridged_target is not None and result.sip_response == (200, "OK")
    assert "CHANNEL_HANGUP_COMPLETE" in result.events
    assert result.commands[-1] == "exit"  # greenswitch ends the session with exit
    assert result.decision_latency is not None


# --------------------------------------------------------------------------- the lean driver


def test_driver_connect_reply_is_the_emulators_channel_data(library: driver.FsLibrary) -> None:
    plan = CallPlan("accept", "+441234567890", sip_auth_username="u1000120", network_ip="198.51.100.7")
    data = library.connect_reply(plan, "11111111-2222-4333-8444-555555555555")
    frames = EslParser().feed(data)
    assert len(frames) == 1 and frames[0].reply_ok()
    request = call_request(frames[0].channel_data())
    assert request.uuid == "11111111-2222-4333-8444-555555555555"
    assert request.destination == "+441234567890"
    assert request.sip_auth_username == "u1000120"
    assert request.network_ip == "198.51.100.7"
    by_ip = EslParser().feed(
        library.connect_reply(CallPlan("accept_ip", "4412", network_ip="10.0.0.7"), "u" * 36)
    )
    assert call_request(by_ip[0].channel_data()).sip_auth_username == ""
    # Same header names, in the same order, as the emulator writes for such a call.
    emulator = _emulator_channel_data_names()
    assert [n for n in frames[0].headers if not n.startswith("variable_sip_auth")] == [
        n for n in emulator if not n.startswith("variable_sip_auth")
    ]


def _emulator_channel_data_names() -> list[str]:
    seen: list[list[str]] = []

    def engine(sock, _addr) -> None:
        sock.sendall(b"connect\n\n")
        data = b""
        while b"\n\n" not in data:
            data += sock.recv(65536)
        seen.append(list(EslParser().feed(data[: data.index(b"\n\n") + 2])[0].headers))
        sock.close()

    from gevent.server import StreamServer

    server = StreamServer(("127.0.0.1", 0), engine)
    server.start()
    try:
        place_call(
            "127.0.0.1", server.server_port, CallSpec(destination="4412", sip_auth_username="u1"), timeout=2
        )
    finally:
        server.stop()
    return seen[0]


def test_driver_library_parts(library: driver.FsLibrary) -> None:
    assert library.names("bridge_start") == [
        "CHANNEL_EXECUTE:bridge",
        "CHANNEL_PROGRESS",
        "CHANNEL_ANSWER",
        "CHANNEL_BRIDGE",
    ]
    assert library.names("bridge_end")[-2:] == ["CHANNEL_HANGUP_COMPLETE", "text/disconnect-notice"]
    assert library.names("reject")[0] == "CHANNEL_EXECUTE:respond"
    roundtrip = driver.FsLibrary.from_json(json.loads(json.dumps(library.to_json())))
    assert roundtrip.bridge_end == library.bridge_end and roundtrip.connect_auth == library.connect_auth


def test_driver_call_model_replies_and_events(library: driver.FsLibrary) -> None:
    call = driver._Call(library, b"a" * 36)
    batch = (
        b"myevents\n\nlinger\n\n"
        b"sendmsg\ncall-command: execute\nexecute-app-name: set\n"
        b"execute-app-arg: callgate_reason=NO_SUFFICIENT_FUND\n\n"
        b"sendmsg\ncall-command: execute\nexecute-app-name: respond\n"
        b"execute-app-arg: 402 Payment Required\n\n"
    )
    out = call.feed(driver.CommandSplitter().feed(batch))
    frames, rest = driver.split_frames(out)
    assert rest == b""
    replies = [f for f in frames if f.startswith(b"Content-Type: command/reply")]
    assert [r.split(b"Reply-Text: ")[1].split(b"\n")[0] for r in replies] == [
        b"+OK Events Enabled",
        b"+OK will linger",
        b"+OK",
        b"+OK",
    ]
    names = [driver._event_name(f) for f in frames if f not in replies]
    assert names[0] == "CHANNEL_PARK" and "CHANNEL_HANGUP_COMPLETE" in names
    assert call.decided and call.over and call.outcome == "NO_SUFFICIENT_FUND"
    assert b"a" * 36 in out and driver.SENTINEL_UUID.encode() not in out


def test_driver_honours_nixevent(library: driver.FsLibrary) -> None:
    call = driver._Call(library, b"b" * 36)
    unread = "CHANNEL_EXECUTE CHANNEL_PARK CHANNEL_PROGRESS CHANNEL_ANSWER CHANNEL_BRIDGE CHANNEL_STATE"
    batch = (
        f"myevents\n\nlinger\n\nnixevent {unread}\n\n".encode()
        + b"sendmsg\ncall-command: execute\nexecute-app-name: bridge\nexecute-app-arg: sofia/gateway/g/1\n\n"
    )
    out = call.feed(driver.CommandSplitter().feed(batch)) + call.hangup()
    names = [driver._event_name(f) for f in driver.split_frames(out)[0] if b"command/reply" not in f[:40]]
    assert "CHANNEL_PARK" not in names and "CHANNEL_EXECUTE:bridge" not in names
    assert "CHANNEL_EXECUTE_COMPLETE:bridge" in names and "CHANNEL_HANGUP_COMPLETE" in names


def test_command_splitter_and_frame_splitter_across_reads() -> None:
    splitter = driver.CommandSplitter()
    data = b"linger\n\nsendmsg\ncall-command: execute\nContent-Length: 5\n\nhello\n\nexit\n\n"
    blocks = []
    for i in range(len(data)):
        blocks += splitter.feed(data[i : i + 1])
    assert [b.split(b"\n")[0] for b in blocks] == [b"linger", b"sendmsg", b"exit"]
    assert blocks[1].endswith(b"hello")
    stream = b"Content-Type: command/reply\nReply-Text: +OK\n\nContent-Length: 3\nContent-Type: x\n\nabc"
    frames, rest = driver.split_frames(stream[:-1])
    assert len(frames) == 1 and rest.endswith(b"ab")
    frames, rest = driver.split_frames(stream)
    assert len(frames) == 2 and rest == b""


def test_lean_driver_and_emulator_reach_the_same_decisions(library: driver.FsLibrary) -> None:
    with floor_server() as port:
        plan = CallPlan("accept", "441234567890", sip_auth_username="u1000120", hold=0.05)
        latency, outcome, error, _engine = driver.place(("127.0.0.1", port), plan, library, timeout=5)
        assert error is None and outcome == "accept" and latency is not None
        emulated = _emulated_call(port)
        assert emulated.bridged_target and emulated.error is None
    with floor_server("reject") as port:
        latency, outcome, error, _engine = driver.place(("127.0.0.1", port), plan, library, timeout=5)
        assert (outcome, error) == ("AUTHENTICATION_FAIL", None)
    with greenswitch_server() as port:
        latency, outcome, error, _engine = driver.place(("127.0.0.1", port), plan, library, timeout=5)
        assert (outcome, error) == ("accept", None)


def test_driver_counts_a_refused_connection_as_shed_with_its_time_to_refusal(
    library: driver.FsLibrary,
) -> None:
    """A saturated engine stops listening: the refusal is an answer (FreeSWITCH tries its next
    engine), not an error; its latency is connect() -> ECONNREFUSED."""
    latency, outcome, error, engine = driver.place(
        ("127.0.0.1", _free_port()), CallPlan("accept", "44"), library, timeout=1
    )
    assert outcome == driver.REFUSED and error is None
    assert latency is not None and latency >= 0 and engine is None


def test_driver_reads_the_engines_share_of_the_latency_from_the_wire(
    library: driver.FsLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch model's own time to answer `connect` is in the latency, not in the engine's
    share (the kernel's arrival times of `connect` and of the decision)."""
    answer = library.connect_reply

    def slow_switch(plan: CallPlan, call_uuid: str) -> bytes:
        gevent.sleep(0.2)
        return answer(plan, call_uuid)

    monkeypatch.setattr(library, "connect_reply", slow_switch)
    plan = CallPlan("accept", "441234567890", sip_auth_username="u1000120")
    # Linux turns receive timestamps on for the whole stack lazily (a deferred static key):
    # the first packets after the first socket asks may carry none. A socket that asked keeps
    # them on, as the driver's many calls do during a run.
    with socket.socket() as keeper:
        keeper.setsockopt(socket.SOL_SOCKET, driver.SO_TIMESTAMPNS, 1)
        time.sleep(0.05)
        with floor_server() as port:
            placed = driver.place(("127.0.0.1", port), plan, library, timeout=5)
    assert placed.outcome == "accept" and placed.error is None
    assert placed.latency is not None and placed.engine_latency is not None
    assert placed.latency >= 0.2 and placed.engine_latency > 0
    # The 0.2 s is the switch's: left out of the engine's share however slow the machine is
    # (less the few ms connect() may take to return here, which only the latency skips).
    assert placed.latency - placed.engine_latency >= 0.15


def test_report_separates_refused_from_decided_and_counts_both_as_shed() -> None:
    config = driver.LoadConfig(target=("127.0.0.1", 1), cps=10, duration=3, warmup=0)
    records = [
        driver.CallRecord("accept", 0.1, 0.0, 0.002, "accept", None, 0.2),
        driver.CallRecord("accept", 0.2, 0.0, 0.004, "ENGINE_DEGRADED", None, 0.3),
        driver.CallRecord("accept", 0.3, 0.0, 0.0001, driver.REFUSED, None, 0.3),
        driver.CallRecord("accept", 0.4, 0.0, 0.0003, driver.REFUSED, None, 0.4),
    ]
    result = driver.report(records, config)
    assert result["decided"] == 2 and result["degraded"] == 1 and result["errors"] == 0
    assert result["refused"] == 2 and result["shed"] == 3
    assert result["latency_refused"]["count"] == 2 and result["latency_shed"]["count"] == 3
    assert result["latency"]["count"] == 2  # the decisions only
    assert result["latency_not_degraded"]["max_ms"] == pytest.approx(2.0)


def test_open_loop_run_against_the_floor(library: driver.FsLibrary) -> None:
    with floor_server() as port:
        config = driver.LoadConfig(
            target=("127.0.0.1", port),
            cps=200,
            duration=1.0,
            warmup=0.25,
            mix={"accept": 1.0},
            hold=0.1,
            scale=TINY,
        )
        records = driver.run_load(config, lib=library)
    result = driver.report(records, config)
    assert result["calls"] == 150 and result["errors"] == 0
    assert result["outcomes"] == {"accept": 150}
    assert 0 < result["latency"]["p50_ms"] < 50
    assert result["achieved_cps"] == pytest.approx(200, rel=0.01)


def test_callgate_under_the_driver(redis_url: str, key_prefix: str, library: driver.FsLibrary) -> None:
    """The harness end to end: dataset in Redis, `callgate serve`, the driver's mix."""
    client = redis.Redis.from_url(redis_url)
    dataset.ensure_published(client, key_prefix, TINY, log=lambda _m: None)
    client.close()
    port = _free_port()
    env = dict(
        os.environ,
        CALLGATE_REDIS_URL=redis_url,
        CALLGATE_REDIS__KEY_PREFIX=key_prefix,
        CALLGATE_ENGINE__LISTEN_PORT=str(port),
        CALLGATE_METRICS__LISTEN_PORT="0",
        CALLGATE_LOGGING__DECISION_LEVEL="DEBUG",
        # The driver's classification is under test, not latency: no load shedding on a busy machine.
        CALLGATE_ENGINE__SHED_LOOP_LAG="0",
    )
    env.pop("CALLGATE_CONFIG", None)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "callgate"), "serve"],
        env=env,
        cwd="/tmp",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from loadtest.run import probe_call

        def ready() -> bool:
            assert proc.poll() is None, "callgate exited"
            return probe_call(("127.0.0.1", port), library) == "accept"

        wait_until(ready, timeout=30, interval=0.1, what="callgate accepting calls")
        weights = {k: 1.0 for k in EXPECTED}
        config = driver.LoadConfig(
            target=("127.0.0.1", port), cps=150, duration=1.5, warmup=0.0, mix=weights, scale=TINY, seed=3
        )
        records = driver.run_load(config, lib=library)
    finally:
        proc.terminate()
        proc.wait(10)
    result = driver.report(records, config)
    assert result["errors"] == 0, result["error_kinds"]
    for kind, outcomes in result["outcomes_by_class"].items():
        assert set(outcomes) == {EXPECTED[kind]}, (kind, outcomes)


# --------------------------------------------------------------------------- the lab driver


class OriginatingSwitch(Switch):
    """An emulated switch whose inbound socket also runs ``originate``: destinations
    starting with 0 are refused by "callgate" (403), the others answered and held."""

    hold = 0.05

    def api(self, command: str) -> str:
        if not command.startswith("originate "):
            return super().api(command)
        arg = command[len("originate ") :]
        variables = dict(item.split("=", 1) for item in arg[arg.index("{") + 1 : arg.index("}")].split(","))
        dial = arg[arg.index("}") + 1 :].split(" ", 1)[0]
        dest = dial.split("/")[2].split("@")[0]
        uuid = variables["origination_uuid"]
        refused = dest.startswith("0")
        gevent.spawn_later(0.005, self._events, uuid, variables, refused)
        return "-ERR CALL_REJECTED\n" if refused else f"+OK {uuid}\n"

    def _events(self, uuid: str, variables: dict[str, str], refused: bool) -> None:
        created = int(time.time() * 1e6)
        if not refused:
            self.fire(
                "CHANNEL_ANSWER", uuid, lambda seq: [("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", uuid)]
            )
            gevent.sleep(self.hold)
        b_leg = [
            ("Event-Name", "CHANNEL_HANGUP_COMPLETE"),
            ("Unique-ID", "b-" + uuid[2:]),
            ("Hangup-Cause", "CALL_REJECTED" if refused else "NORMAL_CLEARING"),
            ("variable_sip_h_X-Cgload-Call", variables["sip_h_X-Cgload-Call"]),
            (
                "variable_callgate_reason" if refused else "variable_callgate_account",
                "ORIGINATION_RATE_NOT_FOUND" if refused else variables["sip_h_P-Accountcode"],
            ),
        ]
        self.fire("CHANNEL_HANGUP_COMPLETE", "b-" + uuid[2:], lambda seq: b_leg)
        ended = int(time.time() * 1e6)
        a_leg = [
            ("Event-Name", "CHANNEL_HANGUP_COMPLETE"),
            ("Unique-ID", uuid),
            ("Hangup-Cause", "CALL_REJECTED" if refused else "NORMAL_CLEARING"),
            ("Caller-Channel-Created-Time", str(created)),
            ("Caller-Channel-Answered-Time", "0" if refused else str(created + 1500)),
            ("Caller-Channel-Hangup-Time", str(ended)),
            ("variable_sip_term_status", "403" if refused else "200"),
        ]
        self.fire("CHANNEL_HANGUP_COMPLETE", uuid, lambda seq: a_leg)


@contextlib.contextmanager
def originating_inbound() -> Iterator[tuple[str, int]]:
    """The emulated inbound socket in its own thread (and gevent hub): the lab driver's
    clients block in C or in plain sockets."""
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def serve() -> None:
        server = InboundServer(OriginatingSwitch(), password="labpass").start()
        ready.put(server.address)
        while not stop.is_set():
            gevent.sleep(0.02)
        server.stop()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield ready.get(timeout=5)
    finally:
        stop.set()
        thread.join(timeout=5)


CLIENTS = ["pure"]
with contextlib.suppress(ImportError):
    import ESL  # noqa: F401

    CLIENTS.append("python-esl")


@pytest.mark.parametrize("client", CLIENTS)
def test_lab_driver_against_an_emulated_inbound_socket(client: str) -> None:
    plans = iter(
        [
            CallPlan("accept", "441234567890", sip_auth_username="u1000120"),
            CallPlan("no_origination", "0123456789", sip_auth_username="u1000121"),
        ]
        * 20
    )
    options = lab.LabOptions(
        target="sofia/external/{dest}@127.0.0.1:5080", cps=40, duration=0.5, hold=0.05, drain=3
    )
    with originating_inbound() as (host, port):
        with pytest.raises(ConnectionError):
            lab.connect(host, port, "wrong", client)
        conn = lab.connect(host, port, "labpass", client)
        try:
            calls = lab.run_lab(conn, plans, options)
        finally:
            conn.disconnect()
    assert len(calls) == 20
    assert all(c.done for c in calls)
    accepted = [c for c in calls if c.plan.kind == "accept"]
    refused = [c for c in calls if c.plan.kind != "accept"]
    assert {c.outcome for c in accepted} == {"accept"}
    assert all(c.callgate.get("callgate_account") == "1000120" for c in accepted)
    assert all(c.job_result.startswith("+OK") for c in accepted)
    assert {c.outcome for c in refused} == {"ORIGINATION_RATE_NOT_FOUND"}
    assert all(c.sip_status == "403" and c.job_result.startswith("-ERR") for c in refused)
    assert all(c.setup_seconds is not None and c.setup_seconds >= 0 for c in calls)
    summary = lab.report(calls, options)
    assert summary["outcomes"] == {"accept": 10, "ORIGINATION_RATE_NOT_FOUND": 10}


def test_lab_originate_arguments() -> None:
    options = lab.LabOptions(target="sofia/external/{dest}@10.0.0.1:5080", hold=2.5)
    text = lab.originate_args(CallPlan("accept", "4412", sip_auth_username="u1000120"), "U-1", options)
    assert text.startswith("{origination_uuid=U-1,")
    assert "sip_h_X-Cgload-Call=U-1" in text and "sip_h_P-Accountcode=1000120" in text
    assert text.endswith("}sofia/external/4412@10.0.0.1:5080 &playback(silence_stream://2500)")
    assert lab.account_of(CallPlan("accept_ip", "44", network_ip=dataset.account_ip(70_007))) == "1070007"


def test_pure_client_parses_encoded_events_and_bodies() -> None:
    raw = (
        b"Event-Name: BACKGROUND_JOB\nJob-UUID: j1\nJob-Command-Arg: %7Bx%3Dy%7D\n"
        b"Content-Length: 11\n\n+OK abc-def"
    )
    event = lab.PyEslConnection._event({"Content-Type": "text/event-plain"}, raw)
    assert event is not None
    assert event.getHeader("Job-Command-Arg") == "{x=y}"
    assert event.getBody() == "+OK abc-def"
    assert event.getType() == "BACKGROUND_JOB"


# --------------------------------------------------------------------------- statistics


def test_nearest_rank_percentiles() -> None:
    values = list(range(1, 101))
    random.Random(1).shuffle(values)
    got = stats.percentiles(values, (0, 50, 90, 99, 99.9, 100))
    assert got == {"p0": 1, "p50": 50, "p90": 90, "p99": 99, "p99.9": 100, "p100": 100}
    assert stats.percentile([7.0], 99.9) == 7.0
    assert math.isnan(stats.percentile([], 50))
    assert stats.percentile(sorted(range(1, 1001)), 99.9) == 999
    with pytest.raises(ValueError):
        stats.percentile([1], 101)


def test_summary_in_milliseconds() -> None:
    summary = stats.summarize([0.001, 0.002, 0.003, 0.004])
    assert summary["count"] == 4
    assert summary["p50_ms"] == pytest.approx(2.0) and summary["p99_ms"] == pytest.approx(4.0)
    assert summary["mean_ms"] == pytest.approx(2.5) and summary["max_ms"] == pytest.approx(4.0)
    assert stats.summarize([]) == {"count": 0}


def test_report_counts_only_the_window() -> None:
    config = driver.LoadConfig(target=("127.0.0.1", 1), cps=10, duration=3, warmup=1)
    records = [
        driver.CallRecord("accept", due, 0.0, 0.002, "accept", None, due + 0.01)
        for due in (0.5, 1.0, 1.5, 2.9)
    ] + [driver.CallRecord("accept", 2.0, 0.0, None, "", "connect: refused", 2.0)]
    result = driver.report(records, config)
    assert result["calls"] == 4 and result["decided"] == 3 and result["errors"] == 1
    assert result["achieved_cps"] == pytest.approx(1.5)
    assert result["error_kinds"] == {"connect": 1}


def test_held_calls_hold_time() -> None:
    from loadtest.run import held_hold_seconds

    assert held_hold_seconds(1000, 10_000, {"accept": 1.0}) == pytest.approx(10.0)
    assert held_hold_seconds(1000, 10_000, {"accept": 0.5, "no_funds": 0.5}) == pytest.approx(20.0)


def test_the_held_rows_load_measures_once_the_calls_are_up() -> None:
    """targets' and held's row: measured after as long as a call is held, plus 5 s."""
    from loadtest.dataset import ACCEPTED_CLASSES, DEFAULT_MIX
    from loadtest.run import _held_load, held_hold_seconds

    load = _held_load(800, 10_000, 8.0)
    hold = held_hold_seconds(800, 10_000, DEFAULT_MIX)
    assert load.cps == 800.0 and load.hold == pytest.approx(hold) and load.procs == 2
    assert load.warmup == pytest.approx(hold + 5.0) and load.duration == pytest.approx(hold + 13.0)
    accepted = sum(share for kind, share in DEFAULT_MIX.items() if kind in ACCEPTED_CLASSES)
    accepted_share = accepted / sum(DEFAULT_MIX.values())
    assert load.cps * load.hold * accepted_share == pytest.approx(10_000)  # 10,000 calls up once warm


def test_profile_summary_of_collapsed_stacks() -> None:
    text = "a (x.py:1);b (y.py:2) 3\na (x.py:1);c (z.py:3) 1\n"
    summary = summarize_collapsed(text)
    assert summary["samples"] == 4
    assert summary["inclusive"]["a (x.py)"] == 4 and summary["self"]["b (y.py)"] == 3


# --------------------------------------------------------------------------- patched engine, phases


def test_patched_engine_offers_only_the_instrumentation() -> None:
    from loadtest import patched_engine

    assert patched_engine.PATCHES == (
        "timing",
        "yappi",
        "gc-log",
        "hub-lag",
        "slow-runs",
        "acquire-census",
        "alone",  # the baseline of an adopted lever (gathering), for the ab scenario
        "ceiling",  # issue 18, round 10: the most a compiled decision path could give
        "ceiling-no-redis",
    )
    assert set(patched_engine.PATCHES) == set(patched_engine._APPLY)
    assert not set(patched_engine.PATCHES) & set(patched_engine.ADOPTED)
    for name in (*patched_engine.PATCHES, *patched_engine.ADOPTED):
        assert f"``{name}``" in patched_engine.__doc__


@pytest.mark.parametrize("name", ["multiset", "lazy-events", "batch-release"])
def test_patched_engine_refuses_an_adopted_patch(name: str) -> None:
    from loadtest import patched_engine

    with pytest.raises(SystemExit, match=rf"patch '{name}' was adopted: it is part of the engine now"):
        patched_engine.apply([name])


def test_acquire_census_counts_round_trips_per_loop_turn() -> None:
    from loadtest.patched_engine import census_document

    document = census_document([7, 7, 7, 8, 9, 9], [0, 1, 2, 0, 1, 0])
    assert document["round_trips"] == 6 and document["loop_iterations"] == 3
    assert document["per_iteration"] == {"1": 1, "2": 1, "3": 1}
    assert document["mean_per_iteration"] == 2.0
    assert document["share_alone_in_iteration"] == 1 / 6
    assert document["in_flight_when_sent"] == {"0": 3, "1": 2, "2": 1}


def test_hub_lag_document_tells_collections_from_other_pauses() -> None:
    from loadtest.patched_engine import lag_document

    late = [(100.010, 0.008, 0.9), (200.030, 0.030, 0.1), (300.003, 0.003, 0.5)]
    collections = [
        (100.005, 2, 0.004, 0.0035, 12),
        (250.0, 0, 0.001, 0.0005, 3),
        (260.0, 0, 0.002, 0.0015, 0),
    ]  # the first: inside the first pause
    census = [[110.0, 10, 20, 30, 40]]
    out = lag_document(late, collections, census)
    assert out["late_wakeups"][">2ms"] == {"count": 3, "explained_by_gc": 1, "median_own_cpu_share": 0.5}
    assert out["late_wakeups"][">25ms"] == {"count": 1, "explained_by_gc": 0, "median_own_cpu_share": 0.1}
    gen2 = out["collections"]["gen2"]
    assert (gen2["count"], gen2["max_wall_ms"], gen2["max_cpu_ms"]) == (1, 4.0, 3.5)
    assert gen2["cpu_ms"]["p50_ms"] == pytest.approx(3.5)
    assert out["worst"][0] == [200.03, 30.0, 0.1]
    assert gen2["unreachable"] == 12
    gen0 = out["collections"]["gen0"]
    assert (gen0["count"], gen0["unreachable"], gen0["total_cpu_ms"]) == (2, 3, 2.0)
    assert out["collection_rows"] == [[100.005, 2, 4.0, 3.5, 12]]  # short young ones only summarized
    assert out["census"]["rows"] == [[110.0, 10, 20, 30, 40]]
    long_young = lag_document(late, [*collections, (270.0, 0, 0.03, 0.025, 0)], census)
    assert long_young["collection_rows"][-1] == [270.0, 0, 30.0, 25.0, 0]  # over 2 ms: listed


def test_slow_runs_document_ranks_greenlets_by_the_cpu_they_held() -> None:
    from loadtest.patched_engine import slow_runs_document

    runs = [
        (1.0, 40.0, 0.5, "Hub", 0, "hub.py:166:sleep"),  # long wall, little CPU: the hub idled
        (2.0, 9.0, 8.5, "gevent.baseserver._handle_and_close_when_done", 1, "hub.py:647:run"),
        (3.0, 3.0, 2.9, "gevent.baseserver._handle_and_close_when_done", 0, "hub.py:647:run"),
        (4.0, 5.0, 4.0, "engine.billing.settler.Settler.run", 0, "batches.py:80:get"),
    ]
    out = slow_runs_document(runs)
    calls = out["by_kind"]["gevent.baseserver._handle_and_close_when_done"]
    assert calls == {"count": 2, "total_cpu_ms": 11.4, "max_cpu_ms": 8.5, "with_gc": 1}
    assert next(iter(out["by_kind"])) == "gevent.baseserver._handle_and_close_when_done"
    assert [row["cpu_ms"] for row in out["longest"]] == [8.5, 4.0, 2.9, 0.5]
    assert out["longest"][0]["gcs"] == 1 and out["threshold_ms"] == 2.0


def test_slow_runs_names_the_greenlet_by_its_run_function() -> None:
    from loadtest.patched_engine import _greenlet_kind

    def work() -> None:
        pass

    assert _greenlet_kind(gevent.get_hub()) == "Hub"
    assert _greenlet_kind(gevent.Greenlet(work)).endswith(
        "test_slow_runs_names_the_greenlet_by_its_run_function.<locals>.work"
    )


def test_shed_bounds_are_the_recipe_for_the_overload_target() -> None:
    from loadtest.run import ShedBounds

    assert ShedBounds().env() == {
        "CALLGATE_ENGINE__SHED_LOOP_LAG": "0.025",
        "CALLGATE_ENGINE__SHED_ACCEPT_WAIT": "0.025",
        "CALLGATE_ENGINE__SHED_BACKLOG": "16",
        "CALLGATE_ENGINE__SHED_MIN_PAUSE": "0.0",
    }
    earlier = ShedBounds(backlog=1000, min_pause=0.05)  # round 5 and before
    assert earlier.summary() == {
        "shed_bound_seconds": 0.025,
        "shed_backlog": 1000,
        "shed_min_pause_seconds": 0.05,
    }


_CEILING_RUN = """
import json, sys
from collections import Counter
from loadtest import patched_engine
patched_engine.apply([sys.argv[3]])
from engine.state.direct import DirectConnections
gathered = DirectConnections.execute_gathered
replies = []
def counted(self, args, **kwargs):  # every acquire Redis answered, whoever sent it
    reply = gathered(self, args, **kwargs)
    replies.append(reply)
    return reply
DirectConnections.execute_gathered = counted
import redis
from loadtest.dataset import ACCEPT_ONLY, CallMix, ensure_published
from loadtest.driver import record_library
from loadtest.inprocess import SMALL, InProcessEngine, _calls
client = redis.Redis.from_url(sys.argv[1])
ensure_published(client, sys.argv[2], SMALL, log=lambda _m: None)
engine = InProcessEngine(sys.argv[1], sys.argv[2], record_library())
outcomes = Counter(_calls(engine, CallMix(SMALL, dict(ACCEPT_ONLY), seed=3).take(40), 4))
engine.finish_hangups()
template = patched_engine.CEILING
print(json.dumps({"outcomes": outcomes, "settled": engine.engine.settler.settled,
                  "copied": template.copied, "acquires": template.acquires,
                  "answered": sum(isinstance(r, list) for r in replies)}))
engine.close()
"""


@pytest.mark.parametrize("patch", ["ceiling", "ceiling-no-redis"])
def test_the_ceiling_answers_every_call_with_a_copy_and_keeps_its_redis_work(
    redis_url: str, key_prefix: str, patch: str
) -> None:
    """After the first accepted call, the copies are accepted without the rules; ``ceiling``
    still makes each copy's limits round trip and settles each one in Redis (a settle counts
    only when Redis's script settled a call it had not seen), ``ceiling-no-redis`` neither.
    In a subprocess: the patches change the engine's classes for good."""
    run = subprocess.run(
        [sys.executable, "-c", _CEILING_RUN, redis_url, key_prefix, patch],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["outcomes"] == {"accept": 40}
    assert 30 <= result["copied"] <= 39  # the first calls, up to the first hangup, are real
    real = 40 - result["copied"]
    if patch == "ceiling":
        assert result["acquires"] == result["copied"]
        assert result["answered"] == 40  # the acquire script ran for every call
        assert result["settled"] == 40
    else:
        assert result["acquires"] == 0
        assert result["answered"] == result["settled"] == real


def test_patched_engine_refuses_an_unknown_patch_before_applying_any(monkeypatch) -> None:
    from loadtest import patched_engine

    applied = []
    monkeypatch.setitem(patched_engine._APPLY, "timing", lambda: applied.append("timing"))
    with pytest.raises(
        SystemExit, match=r"unknown patch 'no-such'; patches: timing, yappi, gc-log, hub-lag, slow-runs"
    ):
        patched_engine.apply(["timing", "no-such"])
    assert applied == []
    patched_engine.apply(["timing"])
    assert applied == ["timing"]


def test_run_refuses_an_adopted_patch_and_the_removed_scenario(capsys) -> None:
    from loadtest import run

    with pytest.raises(SystemExit) as exc:
        run.main(["--patched", "nixevent"])
    assert exc.value.code == 2
    assert "'nixevent' was adopted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        run.main(["--scenario", "patches"])
    assert exc.value.code == 2
    assert "'phases'" in capsys.readouterr().err


def test_phase_summary_of_a_timing_document() -> None:
    from loadtest.patched_engine import TIMING_PHASES, timing_document
    from loadtest.run import phase_summary

    # 100 calls at wall times 1000.0 .. 1099.0: phase k of call i lasts (i + 1) * k microseconds.
    rows = [(1000.0 + i, *((i + 1) * k * 1e-6 for k in (1, 2, 3, 4))) for i in range(100)]
    acquires = [(1000.0 + i, (i + 1) * 1e-5) for i in range(100)]
    document = json.loads(json.dumps(timing_document(rows, acquires)))  # as read back from the file
    assert document["parse"]["count"] == 100 and document["parse"]["p50_ms"] == pytest.approx(0.1)

    summary = phase_summary(document)
    assert list(summary) == [*TIMING_PHASES, "limits_acquire"]
    for k, name in enumerate(TIMING_PHASES, start=1):
        assert summary[name]["count"] == 100
        assert summary[name]["p50_us"] == pytest.approx(50 * k)
        assert summary[name]["p99_us"] == pytest.approx(99 * k)
    assert summary["limits_acquire"]["p50_us"] == pytest.approx(500)

    # Only the measured attempt's span: calls 0..9 (nearest rank: p50 is the 5th).
    within = phase_summary(document, span=(1000.0, 1009.0))
    assert within["channel_data_wait"] == {
        "count": 10,
        "p50_us": pytest.approx(5),
        "p99_us": pytest.approx(10),
    }
    assert within["limits_acquire"]["count"] == 10
    assert phase_summary(document, span=(0.0, 1.0))["render_and_write"] == {
        "count": 0,
        "p50_us": None,
        "p99_us": None,
    }


def test_phase_summary_of_a_hand_made_timing_json() -> None:
    from loadtest.run import phase_summary

    timing = {
        "samples": {
            "columns": ["wall", "channel_data_wait", "parse", "decide_and_limits", "render_and_write"],
            "rows": [
                [10.0, 0.000200, 0.000020, 0.000900, 0.000100],
                [11.0, 0.000400, 0.000030, 0.001500, 0.000120],
                [12.0, 0.000300, 0.000025, 0.004000, 0.000110],
            ],
            "limits_acquire": [[10.0, 0.0006], [11.0, 0.0007]],
        }
    }
    summary = phase_summary(timing)
    assert summary["channel_data_wait"] == {
        "count": 3,
        "p50_us": pytest.approx(300),
        "p99_us": pytest.approx(400),
    }
    assert summary["decide_and_limits"]["p99_us"] == pytest.approx(4000)
    assert summary["limits_acquire"] == {
        "count": 2,
        "p50_us": pytest.approx(600),
        "p99_us": pytest.approx(700),
    }
    assert phase_summary(timing, span=(10.5, 12.0))["parse"]["p50_us"] == pytest.approx(25)


def test_pauses_variants_parse_into_engine_settings() -> None:
    from loadtest.run import parse_variant

    assert parse_variant("mid0:ENGINE__GC_MIDDLE_THRESHOLD=0, callgate_engine__gc_full_interval=15") == (
        "mid0",
        {"CALLGATE_ENGINE__GC_MIDDLE_THRESHOLD": "0", "CALLGATE_ENGINE__GC_FULL_INTERVAL": "15"},
    )
    for bad in ("no-settings", ":ENGINE__X=1", "label:ENGINE__X", "label:=1"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)


def test_driver_answers_the_guard_cancel_as_the_real_switch(library: driver.FsLibrary) -> None:
    """`api sched_del <uuid>` gets an api/response in order with the replies (not a command
    reply "-ERR command not found", which made the engine warn and log on every call)."""
    from pathlib import Path

    call = driver._Call(library, b"c" * 36)
    out = call.feed(driver.CommandSplitter().feed(f"api sched_del {'c' * 36}\n\nmyevents\n\n".encode()))
    frames = driver.split_frames(out)[0]
    real = (Path(__file__).parent / "fixtures" / "esl_filter" / "filtered-bridged.raw").read_bytes()
    assert frames[0] in real and frames[0].startswith(b"Content-Type: api/response\n")
    assert frames[1] == b"Content-Type: command/reply\nReply-Text: +OK Events Enabled\n\n"
    other = driver.split_frames(call.feed(driver.CommandSplitter().feed(b"api status\n\n")))[0]
    assert other == [b"Content-Type: api/response\nContent-Length: 31\n\n-ERR status Command not found!\n"]


def test_driver_keeps_a_few_messages_of_each_kind_of_error() -> None:
    errors = ["connect: Connection reset by peer"] * 5 + [
        "reset: Broken pipe",
        "reset: Connection reset by peer",
    ]
    errors += [f"timeout: no decision {n}" for n in range(5)]
    examples = driver._error_examples(errors)
    assert examples["connect"] == ["connect: Connection reset by peer"]
    assert examples["reset"] == ["reset: Broken pipe", "reset: Connection reset by peer"]
    assert len(examples["timeout: no decision 0"]) == 1  # unknown kinds are their own message
