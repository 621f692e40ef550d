"""FreeSWITCH's CDR post as the billing backstop (engine.fsxml.cdrpost), over real HTTP and a real Redis.

`callgate fsxml`'s WSGI application is served by gevent's server on loopback; the emulator's
mod_json_cdr (loadtest.fsemu.json_cdr) posts to it exactly as FreeSWITCH 1.10.12 does
(`?uuid=`, basic auth, retries, err-log-dir). The engine's side is the engine's own code
(LiveBilling.settlement + Funds.settle) on the same hangup facts, so "whoever settles first
bills once, the same amounts" is checked on the very Redis records. The whole path with
engine processes, kill -9 and PostgreSQL is in test_cdr_backstop_e2e.py.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from gevent import socket as gsocket
from gevent.pywsgi import WSGIServer

from engine.billing.funds import Funds
from engine.billing.live import LiveBilling, PricedAccept
from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.billing.ticket import TICKET_VARIABLE, BillingTicket, encode_ticket, ticket_value
from engine.config import FsxmlSettings
from engine.decision import DEFAULT_SIP_RESPONSES
from engine.fsxml.cdrpost import CdrReceiver
from engine.fsxml.directory import Answers, Directory
from engine.fsxml.server import FsxmlApp
from engine.model import CallRequest
from engine.rules.catalog import Catalog
from engine.state.keys import cdr_stream
from loadtest.fsemu.json_cdr import (
    CdrSettings,
    b_leg_document,
    json_text,
    post_cdr,
    replay_file,
    settings_from_conf,
    switch_url_encode,
)
from tests.billing.test_ticket import priced_accept
from tests.fsxml.test_jsoncdr import emulated
from tests.rules.builders import World
from tests.support import ROOT

D = Decimal
SECRET = "cdr-S3cret!"
CRED = f"freeswitch:{SECRET}"


class _Directory:
    def __init__(self, catalog: Catalog | None) -> None:
        self.catalog = catalog

    def __call__(self) -> Directory | None:
        if self.catalog is None:
            return None
        return Directory(accounts=self.catalog.accounts.values())


class Service:
    """The fsxml application with its /cdr endpoint on a loopback port."""

    def __init__(
        self,
        funds: Funds,
        catalog: Catalog | None,
        allowed: tuple[str, ...] = ("127.0.0.1/32",),
        release_limits: Any = None,
        ticket_keys: tuple[bytes, ...] = (),
    ) -> None:
        settings = FsxmlSettings(
            allowed_networks=allowed, username="freeswitch", password=SECRET, max_body_bytes=65536
        )
        self.snapshot = _Directory(catalog)
        self.receiver = CdrReceiver(
            funds, self.snapshot, release_limits=release_limits, ticket_keys=ticket_keys
        )
        self.app = FsxmlApp(settings, Answers(""), None, cdr=self.receiver)  # type: ignore[arg-type]
        self.server = WSGIServer(("127.0.0.1", 0), self.app, log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/cdr"

    def settings(self, **kwargs: Any) -> CdrSettings:
        return CdrSettings(**{"urls": [self.url], "cred": CRED, "timeout": 5.0, **kwargs})

    def stop(self) -> None:
        self.server.stop(timeout=1)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def decided(world: World) -> PricedAccept:
    return priced_accept(world)


@pytest.fixture
def funds(client: redis.Redis, key_prefix: str) -> Funds:
    return Funds(client, key_prefix)


@pytest.fixture
def service(funds: Funds, world: World, decided: PricedAccept) -> Iterator[Service]:
    running = Service(funds, world.catalog())
    yield running
    running.stop()


def a_leg(
    decided: PricedAccept, uuid: str, capture: str = "answered_gateway_failover_wire.txt", **changes: str
):
    """The A-leg's JSON CDR of a call the engine decided (its ticket on the channel), and its event."""
    document, event = emulated(capture)
    event = {**event, "Unique-ID": uuid, "variable_uuid": uuid}
    variables = {name[9:]: value for name, value in event.items() if name.startswith("variable_")}
    variables[TICKET_VARIABLE] = ticket_value(decided) or ""
    variables.update(changes)
    for name, value in changes.items():
        event[f"variable_{name}"] = value
    event[f"variable_{TICKET_VARIABLE}"] = variables[TICKET_VARIABLE]
    document["variables"] = {name: switch_url_encode(value) for name, value in variables.items() if value}
    document["callflow"][0]["caller_profile"]["uuid"] = uuid
    return document, event


def signed_ticket(decided: PricedAccept, key: bytes, uuid: str) -> str:
    """The decided call's ticket signed with ``key`` for the call ``uuid`` (a priced accept has one)."""
    text = ticket_value(decided, key, uuid)
    assert text is not None
    return text


def engine_settles(
    decided: PricedAccept, world: World, funds: Funds, event: dict[str, str]
) -> tuple[bool, Any]:
    """What the engine does at CHANNEL_HANGUP_COMPLETE (LiveBilling.settlement, then the settle script)."""
    catalog = world.catalog()
    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)  # type: ignore[arg-type]
    item = billing.settlement(
        CallRequest(uuid=event["Unique-ID"], destination="442071234567"), decided, event
    )
    assert item is not None
    return funds.settle(item), item


def stream(client: redis.Redis, key_prefix: str) -> list[dict[str, Any]]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(cdr_stream(key_prefix)))
    return [json.loads(fields[b"cdr"]) for _, fields in entries]


def test_the_post_first_bills_and_the_engines_later_hangup_is_a_no_op_with_the_same_amounts(
    service: Service, decided: PricedAccept, world: World, funds: Funds, client: redis.Redis, key_prefix: str
) -> None:
    document, event = a_leg(decided, "post-first")
    reserved_before = funds.account(world.customer.id)
    result = post_cdr(document, service.settings())
    assert result.statuses == [200] and result.backup is None
    assert service.receiver.counts == {"billed": 1}
    (record,) = stream(client, key_prefix)
    settled_now, engine_item = engine_settles(decided, world, funds, event)
    assert settled_now is False  # the engine's own settle finds the call settled
    assert engine_item.cdr == record  # ... and would have written exactly this CDR
    assert record["uuid"] == "post-first" and record["billsec"] == 3
    debits = {a: D(amount) for a, _level, amount in record["debits"]}
    assert debits == {d[0]: d[2] for d in engine_item.debits} and sum(debits.values()) > 0
    after = funds.account(world.customer.id)
    assert after.spent == (reserved_before.spent or 0) + debits[world.customer.id]
    assert len(stream(client, key_prefix)) == 1


def test_a_post_after_the_engines_settle_and_a_duplicate_post_change_nothing(
    service: Service, decided: PricedAccept, world: World, funds: Funds, client: redis.Redis, key_prefix: str
) -> None:
    document, event = a_leg(decided, "engine-first")
    settled_now, _ = engine_settles(decided, world, funds, event)
    assert settled_now
    spent = funds.account(world.customer.id).spent
    assert post_cdr(document, service.settings()).statuses == [200]
    assert post_cdr(document, service.settings(encode="base64")).statuses == [200]
    assert service.receiver.counts == {"duplicate": 2}
    assert funds.account(world.customer.id).spent == spent
    assert len(stream(client, key_prefix)) == 1


def test_legs_and_calls_with_nothing_to_bill_are_acknowledged_and_ignored(
    service: Service,
    decided: PricedAccept,
    client: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    document, _ = a_leg(decided, "ignored-a")
    b_leg = b_leg_document(document, "ignored-b", "gw-b", billsec="3")
    rejected, _ = a_leg(decided, "ignored-r", "caller_cancels_wire.txt", callgate_reason="NO_SUFFICIENT_FUND")
    del rejected["variables"][TICKET_VARIABLE]
    undecided, _ = a_leg(decided, "ignored-u", callgate_reason="ENGINE_UNREACHABLE")
    del undecided["variables"][TICKET_VARIABLE]
    foreign, _ = a_leg(decided, "ignored-f")
    for name in (TICKET_VARIABLE, "callgate_reason"):
        foreign["variables"].pop(name, None)
    with caplog.at_level(logging.WARNING, "callgate.fsxml.cdr"):
        for doc in (b_leg, rejected, undecided, foreign):
            assert post_cdr(doc, service.settings()).statuses == [200]
    assert service.receiver.counts == {
        "ignored_b_leg": 1,
        "ignored_rejected": 1,
        "ignored_no_decision": 1,
        "ignored_not_callgate": 1,
    }
    assert stream(client, key_prefix) == []
    # answered calls callgate never priced are named in the log (the cancelled reject was not answered)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "'ignored-u'" in logged and "'ignored-f'" in logged and "ignored-r" not in logged


def test_hostile_and_malformed_posts_get_4xx_and_bill_nothing(
    service: Service,
    decided: PricedAccept,
    client: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    document, _ = a_leg(decided, "hostile\n<x>")
    forged, _ = a_leg(decided, "forged")
    ticket = forged["variables"][TICKET_VARIABLE]
    forged["variables"][TICKET_VARIABLE] = ticket[:-8] + "AAAAAAAA"  # tampered: no longer a ticket
    negative, _ = a_leg(decided, "negative")
    raw = json.loads(base64.urlsafe_b64decode(ticket[2:] + "=" * (-len(ticket[2:]) % 4)))
    raw[8][0][4] = "-100"  # a credit instead of a debit
    negative["variables"][TICKET_VARIABLE] = (
        "1." + base64.urlsafe_b64encode(json.dumps(raw).encode()).rstrip(b"=").decode()
    )
    centuries, _ = a_leg(decided, "centuries", billsec="999999999999999")
    cases = [
        (centuries, "false", 400),  # Redis's counters would overflow: refused, not retried forever
        (forged, "false", 400),
        (negative, "false", 400),
        (document, "false", 400),  # the uuid cannot be logged raw: not a usable uuid
    ]
    with caplog.at_level(logging.WARNING):
        for doc, encode, status in cases:
            assert post_cdr(doc, service.settings(encode=encode)).statuses == [status]
        good, _ = a_leg(decided, "mismatch")
        assert _raw_post(service, json_text(good).encode(), "application/json", "?uuid=other") == 400
        assert _raw_post(service, b"{not json", "application/json") == 400
        assert _raw_post(service, b"<cdr/>", "text/xml") == 415
        assert _raw_post(service, b"{}" * 40_000, "application/json") == 413
        assert _raw_post(service, b"", "application/json", method="GET") == 405
        assert post_cdr(good, service.settings(cred="freeswitch:wrong")).statuses == [401]
    assert stream(client, key_prefix) == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and "wrong" not in logged
    assert "\n<x>" not in logged  # caller-supplied text only escaped


def _raw_post(service: Service, body: bytes, content_type: str, query: str = "", method: str = "POST") -> int:
    """One request on a gevent socket (the server runs in this process's hub)."""
    auth = base64.b64encode(CRED.encode()).decode()
    head = (
        f"{method} /cdr{query} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        f"Authorization: Basic {auth}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock = gsocket.create_connection(("127.0.0.1", service.server.server_port), timeout=5)
    try:
        sock.sendall(head.encode() + body)
        reply = sock.recv(4096)
    finally:
        sock.close()
    return int(reply.split()[1])


def test_a_source_outside_the_allow_list_is_refused(
    funds: Funds, world: World, decided: PricedAccept
) -> None:
    other = Service(funds, world.catalog(), allowed=("10.0.0.0/8",))
    try:
        document, _ = a_leg(decided, "outsider")
        assert post_cdr(document, other.settings()).statuses == [403]
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("changes", "billsec", "note"),
    [
        ({"billsec": "abc"}, 3, "billsec not an integer"),  # recomputed from the epochs
        ({"billsec": "-5"}, 0, "billsec negative"),
        (
            {"answer_uepoch": "1796562999000000", "answer_epoch": "1796562999"},
            3,
            "answer time after end time",
        ),
    ],
)
def test_bad_hangup_facts_follow_the_engines_rules(
    service: Service,
    decided: PricedAccept,
    world: World,
    funds: Funds,
    client: redis.Redis,
    key_prefix: str,
    changes: dict[str, str],
    billsec: int,
    note: str,
) -> None:
    document, event = a_leg(decided, "bad-" + note.replace(" ", "-"), **changes)
    assert post_cdr(document, service.settings()).statuses == [200]
    (record,) = stream(client, key_prefix)
    assert record["billsec"] == billsec
    assert any(n.startswith(note) for n in record["notes"]), record["notes"]
    settled_now, engine_item = engine_settles(decided, world, funds, event)
    assert not settled_now and engine_item.cdr == record


def test_redis_away_answers_503_then_freeswitch_retries_backs_up_and_the_replay_bills(
    client: redis.Redis, key_prefix: str, world: World, decided: PricedAccept, tmp_path: Path
) -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    away = Service(Funds(dead, key_prefix), world.catalog())
    document, _ = a_leg(decided, "redis-away")
    try:
        result = post_cdr(document, away.settings(retries=1, delay=0.05, err_log_dir=str(tmp_path)))
        assert result.statuses == [503, 503]
        assert result.backup == tmp_path / "redis-away.cdr.json"
        assert stream(client, key_prefix) == []
    finally:
        away.stop()
    # The snapshot not loaded yet: 503 too.
    cold = Service(Funds(client, key_prefix), None)
    try:
        assert post_cdr(document, cold.settings()).statuses == [503]
    finally:
        cold.stop()
    back = Service(Funds(client, key_prefix), world.catalog())
    try:
        assert replay_file(result.backup, back.settings()) == 200
        assert replay_file(result.backup, back.settings()) == 200  # a second replay: already billed
        assert back.receiver.counts == {"billed": 1, "duplicate": 1}
    finally:
        back.stop()
    (record,) = stream(client, key_prefix)
    assert record["uuid"] == "redis-away"


def test_the_endpoint_dead_leaves_the_cdr_in_the_err_log_dir_in_each_encoding(
    decided: PricedAccept, tmp_path: Path, service: Service, client: redis.Redis, key_prefix: str
) -> None:
    for encode in ("false", "base64"):
        document, _ = a_leg(decided, f"dead-{encode}")
        settings = CdrSettings(
            urls=["http://127.0.0.1:1/cdr"], cred=CRED, encode=encode, err_log_dir=str(tmp_path)
        )
        result = post_cdr(document, settings)
        assert result.statuses == [0] and result.backup is not None
        assert replay_file(result.backup, service.settings(encode=encode)) == 200
    assert sorted(r["uuid"] for r in stream(client, key_prefix)) == ["dead-base64", "dead-false"]


def test_the_shipped_json_cdr_conf_posts_what_callgate_bills(
    service: Service, decided: PricedAccept, client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    shipped = settings_from_conf(ROOT / "config" / "freeswitch" / "json_cdr.conf.xml")
    assert shipped.encode == "false" and not shipped.disable_100_continue and shipped.cred
    assert (shipped.retries, shipped.delay, shipped.timeout) == (2, 1.0, 3)
    assert shipped.err_log_dir.startswith("/") and shipped.urls == ["http://127.0.0.1:8087/cdr"]
    document, _ = a_leg(decided, "shipped-conf")
    here = settings_from_conf(
        ROOT / "config" / "freeswitch" / "json_cdr.conf.xml",
        urls=[service.url],
        cred=CRED,
        err_log_dir=str(tmp_path),
    )
    assert post_cdr(document, here).statuses == [200]
    assert [r["uuid"] for r in stream(client, key_prefix)] == ["shipped-conf"]


def test_a_settled_post_releases_the_calls_limit_slots_and_a_failed_release_does_not_fail_it(
    funds: Funds, world: World, decided: PricedAccept, client: redis.Redis, key_prefix: str
) -> None:
    released: list[str] = []
    service = Service(funds, world.catalog(), release_limits=released.append)
    try:
        document, _ = a_leg(decided, "slots")
        assert post_cdr(document, service.settings()).statuses == [200]
        assert post_cdr(document, service.settings()).statuses == [200]  # already billed: released again
        assert released == ["slots", "slots"]
    finally:
        service.stop()

    def broken(uuid: str) -> None:
        raise redis.exceptions.ConnectionError("limits Redis away")

    service = Service(funds, world.catalog(), release_limits=broken)
    try:
        document, _ = a_leg(decided, "slots-broken")
        assert post_cdr(document, service.settings()).statuses == [200]  # the debit is queued
        assert service.receiver.counts == {"billed": 1}
    finally:
        service.stop()


# --------------------------------------------------------------------------- real posts

REAL = Path(__file__).resolve().parent / "json_cdr_lab"


def real_post(prefix: str) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a request recorded from the lab's FreeSWITCH 1.10.12."""
    (path,) = REAL.glob(f"{prefix}-*.http")
    head, _, body = path.read_bytes().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    headers["Target"] = lines[0].split()[1]
    return headers, body


def replay_real(service: Service, headers: dict[str, str], body: bytes) -> int:
    """The recorded request as FreeSWITCH sent it (its target, type, agent), plus our credentials."""
    auth = base64.b64encode(CRED.encode()).decode()
    head = (
        f"POST {headers['Target']} HTTP/1.1\r\nHost: x\r\nUser-Agent: {headers['User-Agent']}\r\n"
        "Accept: */*\r\n"
        f"Content-Type: {headers['Content-Type']}\r\nAuthorization: Basic {auth}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    sock = gsocket.create_connection(("127.0.0.1", service.server.server_port), timeout=5)
    try:
        sock.sendall(head.encode() + body)
        return int(sock.recv(4096).split()[1])
    finally:
        sock.close()


def test_real_posts_without_a_ticket_are_read_and_ignored_for_what_they_are(
    service: Service, client: redis.Redis, key_prefix: str
) -> None:
    expected = {
        "001": "ignored_no_ticket",  # recorded before the engine wrote tickets
        "005": "ignored_rejected",
        "006": "ignored_no_ticket",
        "015": "ignored_no_ticket",
        "017": "ignored_no_ticket",
        "029": "ignored_no_decision",
        "061": "ignored_not_callgate",
    }
    for prefix, kind in expected.items():
        headers, body = real_post(prefix)
        assert headers["Content-Type"] == "application/x-www-form-urlencoded" and body[:1] == b"{"
        assert replay_real(service, headers, body) == 200
        assert service.receiver.counts.get(kind), (prefix, service.receiver.counts)
    assert stream(client, key_prefix) == []


def test_a_real_post_carrying_a_ticket_is_billed_on_the_leg_that_carried_it(
    service: Service, client: redis.Redis, key_prefix: str, world: World
) -> None:
    """The real failover call (beta-gw1 failed, beta-gw2 answered, 2 s) as if its engine had written
    its ticket: billed on beta's price, the second gateway named, the switch's own figures."""
    headers, body = real_post("001")
    document = json.loads(body)
    tariff = Tariff(D("0.60"))
    customer = world.customer
    pricing = CallPricing(
        (LevelPrice(customer.id, customer.number, 1, "44", tariff),),
        (
            RoutePrice(5, "beta", 3, "44", Tariff(D("0.30"), D("0.01")), ("beta-gw1", "beta-gw2")),
            RoutePrice(6, "alpha", 4, "44", Tariff(D("0.24")), ("alpha-gw1", "alpha-gw2")),
        ),
        61,
    )
    ticket = BillingTicket(
        customer.id, customer.number, (customer.id,), "outbound", "Alice", "442079460123", None, pricing
    )
    document["variables"][TICKET_VARIABLE] = encode_ticket(ticket)
    assert replay_real(service, headers, json.dumps(document, separators=(",", ":")).encode()) == 200
    (record,) = stream(client, key_prefix)
    variables = document["variables"]
    assert record["uuid"] == variables["uuid"] and record["billsec"] == int(variables["billsec"]) == 2
    assert (record["trunk_name"], record["gateway"]) == ("beta", "beta-gw2")
    assert record["customer_debit"] == "0.020000" and record["carrier_cost"] == "0.020000"
    assert record["started_at"].startswith("2026-12-06T") and record["hangup_cause"] == "NORMAL_CLEARING"
    assert record["dialled"] == document["callflow"][0]["caller_profile"]["destination_number"]
    assert record["notes"] == []


def test_the_emulators_document_has_the_real_documents_shape() -> None:
    """Same keys at every level FreeSWITCH writes (values differ: another call, another switch)."""
    _, body = real_post("017")
    real = json.loads(body)
    emulated_doc, _ = emulated("allotted_timeout_wire.txt")
    assert list(emulated_doc) == list(real)
    assert list(emulated_doc["channel_data"]) == list(real["channel_data"])
    assert set(emulated_doc["callStats"]["audio"]["inbound"]) == set(real["callStats"]["audio"]["inbound"])
    assert set(emulated_doc["callStats"]["audio"]["outbound"]) == set(real["callStats"]["audio"]["outbound"])
    ours, theirs = emulated_doc["callflow"][0], real["callflow"][0]
    assert list(ours) == list(theirs)
    assert list(ours["times"]) == list(theirs["times"])
    profile = [k for k in theirs["caller_profile"] if k != "originatee"]
    assert [k for k in ours["caller_profile"] if k != "originatee"] == profile
    assert list(real["app_log"]["applications"][0]) == list(emulated_doc["app_log"]["applications"][0])


def test_one_summary_line_a_minute_and_no_line_per_post(
    funds: Funds, world: World, decided: PricedAccept, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    receiver = CdrReceiver(funds, _Directory(world.catalog()), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "callgate.fsxml.cdr"):
        for i in range(3):
            document, _ = a_leg(decided, f"summary-{i}")
            assert receiver.receive(json_text(document).encode(), "application/json", None).kind == "billed"
        assert receiver.receive(json_text(document).encode(), "application/json", None).kind == "duplicate"
        assert [r for r in caplog.records if r.levelno == logging.INFO] == []
        now[0] += 61
        document, _ = a_leg(decided, "summary-3")
        receiver.receive(json_text(document).encode(), "application/json", None)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert line == "cdr posts since the last report: billed 4, duplicate 1"


def cdr_posts_counted(service: Service) -> dict[str, float]:
    registry = service.app.metrics.registry
    return {
        outcome: registry.get_sample_value("callgate_fsxml_cdr_posts_total", {"outcome": outcome}) or 0.0
        for outcome in ("billed", "already_billed", "ignored", "malformed", "refused", "unavailable", "other")
    }


def test_cdr_posts_are_counted_by_outcome_for_prometheus(
    service: Service,
    decided: PricedAccept,
    client: redis.Redis,
    key_prefix: str,
    world: World,
    tmp_path: Path,
) -> None:
    document, _ = a_leg(decided, "counted")
    assert post_cdr(document, service.settings()).statuses == [200]
    assert post_cdr(document, service.settings()).statuses == [200]
    b_leg = b_leg_document(document, "counted-b", "gw-b", billsec="3")
    assert post_cdr(b_leg, service.settings()).statuses == [200]
    assert _raw_post(service, b"{not json", "application/json") == 400
    assert post_cdr(document, service.settings(cred="freeswitch:wrong")).statuses == [401]
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    away = Service(Funds(dead, key_prefix), world.catalog())
    try:
        other, _ = a_leg(decided, "counted-away")
        assert post_cdr(other, away.settings()).statuses == [503]
        assert cdr_posts_counted(away)["unavailable"] == 1
    finally:
        away.stop()
    assert cdr_posts_counted(service) == {
        "billed": 1,
        "already_billed": 1,
        "ignored": 1,
        "malformed": 1,
        "refused": 1,
        "unavailable": 0,
        "other": 0,
    }
    count = service.app.metrics.registry.get_sample_value(
        "callgate_fsxml_request_duration_seconds_count", {"endpoint": "cdr"}
    )
    assert count == 5


def test_the_fsxml_metrics_pass_promtool_check_metrics(service: Service, decided: PricedAccept) -> None:
    import shutil
    import subprocess

    from prometheus_client import generate_latest

    from tests.test_metrics import promtool_binary

    document, _ = a_leg(decided, "linted")
    assert post_cdr(document, service.settings()).statuses == [200]
    text = generate_latest(service.app.metrics.registry).decode()
    promtool = shutil.which("promtool") or promtool_binary()
    run = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert not [line for line in (run.stdout + run.stderr).splitlines() if "callgate_" in line], run.stdout


TICKET_KEY = "t" * 40
OLD_TICKET_KEY = "o" * 40


def test_with_ticket_keys_only_a_ticket_signed_for_the_cdrs_own_call_bills(
    funds: Funds,
    world: World,
    decided: PricedAccept,
    client: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    new, old = TICKET_KEY.encode(), OLD_TICKET_KEY.encode()
    signing = Service(funds, world.catalog(), ticket_keys=(new, old))  # rotating: both accepted
    try:
        signed = signed_ticket(decided, new, "signed")
        by_old_key = signed_ticket(decided, old, "old-key")
        by_other_key = signed_ticket(decided, b"x" * 40, "other-key")
        good = [a_leg(decided, "signed", **{TICKET_VARIABLE: signed})[0]]
        good.append(a_leg(decided, "old-key", **{TICKET_VARIABLE: by_old_key})[0])
        forged = [
            a_leg(decided, "copied", **{TICKET_VARIABLE: signed})[0],  # another call's genuine ticket
            a_leg(decided, "unsigned")[0],  # what anyone can write
            a_leg(decided, "other-key", **{TICKET_VARIABLE: by_other_key})[0],
        ]
        with caplog.at_level(logging.DEBUG):
            assert [post_cdr(d, signing.settings()).statuses for d in good] == [[200], [200]]
            assert [post_cdr(d, signing.settings()).statuses for d in forged] == [[400]] * 3
        assert signing.receiver.counts == {"billed": 2, "bad_signature": 3}
        registry = signing.app.metrics.registry
        assert registry.get_sample_value("callgate_fsxml_cdr_posts_total", {"outcome": "bad_signature"}) == 3
        assert sorted(r["uuid"] for r in stream(client, key_prefix)) == ["old-key", "signed"]
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "signature" in logged and TICKET_KEY not in logged and OLD_TICKET_KEY not in logged
        # Without keys the endpoint does not check: a signed ticket bills like an unsigned one.
        unchecked = Service(funds, world.catalog())
        try:
            late = a_leg(decided, "unchecked", **{TICKET_VARIABLE: signed_ticket(decided, new, "x")})[0]
            assert post_cdr(late, unchecked.settings()).statuses == [200]
            assert unchecked.receiver.counts == {"billed": 1}
        finally:
            unchecked.stop()
    finally:
        signing.stop()


def test_the_engines_hangup_refuses_a_debit_over_the_cap_and_the_calls_batched_with_it_settle(
    decided: PricedAccept,
    world: World,
    funds: Funds,
    client: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """FreeSWITCH reporting a billsec of centuries to the engine: the settle script would fail on
    Redis's 64-bit counters and the settler would retry its whole batch forever."""
    import threading

    from engine.billing.settler import Settler

    catalog = world.catalog()
    settler = Settler(funds)
    billing = LiveBilling(settler, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)
    _, absurd = a_leg(decided, "centuries", billsec="999999999999999")
    _, normal = a_leg(decided, "normal")
    spent = funds.account(world.customer.id).spent or D(0)
    with caplog.at_level(logging.ERROR, "callgate.billing"):
        for event in (absurd, normal):
            request = CallRequest(uuid=event["Unique-ID"], destination="442071234567")
            billing.bill(request, decided, event)
    assert settler.pending == 1  # the absurd call was never queued
    stop = threading.Event()
    stop.set()
    settler.run(stop)  # drains what is queued, one attempt
    assert settler.settled == 1 and settler.failures == 0
    assert [r["uuid"] for r in stream(client, key_prefix)] == ["normal"]
    assert funds.account(world.customer.id).spent == spent + D(stream(client, key_prefix)[0]["debits"][0][2])
    [line] = [r.getMessage() for r in caplog.records if "centuries" in r.getMessage()]
    assert "not billed: debit over 1000000000" in line and '"uuid": "centuries"' in line
