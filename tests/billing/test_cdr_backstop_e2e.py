"""FreeSWITCH's CDR as the billing backstop, end to end: a real `callgate serve` killed -9 with an
answered call up, the emulated switch ending the call and posting its mod_json_cdr CDR to a real
`callgate fsxml` process, the CDR writer draining the stream into PostgreSQL.

The catalogue is test_live_e2e's (prices per second), so every amount is computed by hand from
the billed seconds: a call through the reseller, failing over from carrier-a (gw-a) to carrier-b
(gw-b), costs the customer 0.01/s, the reseller 0.02 + 0.006/s, carrier-b 0.01 + 0.005/s.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import gevent
import psycopg
import pytest
import redis

from engine.billing.funds import Funds
from engine.state.keys import funds_call_key
from engine.state.limits import Limiter
from engine.sync.cdrs import CdrWriter
from loadtest.fsemu import CallSpec, Switch, place_call
from loadtest.fsemu.json_cdr import CdrSettings, cdr_document, post_cdr
from tests.billing.test_live_e2e import CATALOGUE, RESELLER, RESOLD, balance, drain_until, only_gateway
from tests.support import (
    CALLGATE,
    ROOT,
    EngineProcess,
    engine_environment,
    free_port,
    prepare_database,
    publish,
    wait_until,
)
from tests.test_observability_e2e import scrape

D = Decimal
SECRET = "json-cdr-S3cret"
TICKET_KEY = "ticket-key-" + "k" * 32  # the engines sign, fsxml verifies: the whole path signed


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    env = engine_environment(
        module_pg_url,
        redis_url,
        module_key_prefix,
        CALLGATE_RULES__CALL_MAX_LENGTH="60",  # small reservations: calls follow each other
        CALLGATE_ENGINE__DECISION_DEADLINE="10",
        CALLGATE_REDIS__SOCKET_TIMEOUT="5",
        CALLGATE_FSXML__USERNAME="freeswitch",
        CALLGATE_FSXML__PASSWORD=SECRET,
        CALLGATE_FSXML__LISTEN_PORT=str(free_port()),
        CALLGATE_FSXML__METRICS_PORT=str(free_port()),
        CALLGATE_BILLING__TICKET_KEYS=TICKET_KEY,
    )
    prepare_database(module_pg_url, CATALOGUE)
    with psycopg.connect(module_pg_url, autocommit=True) as conn:  # the opening balances of the ledger
        conn.execute(
            "INSERT INTO balance_changes"
            " (account_id, kind, amount, balance_after, currency, description, actor)"
            " SELECT id, 'initial', balance, balance, currency, 'opening balance', 'test'"
            " FROM accounts WHERE balance <> 0"
            " AND NOT EXISTS (SELECT 1 FROM balance_changes b WHERE b.account_id = accounts.id)"
        )
    publish(env)
    return env


@pytest.fixture(scope="module")
def fsxml(environment: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real `callgate fsxml` process; its /cdr URL."""
    log_path = tmp_path_factory.mktemp("fsxml") / "fsxml.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*CALLGATE, "fsxml"], env=environment, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: b"listening on" in log_path.read_bytes() or process.poll() is not None, 60, what="fsxml"
        )
        assert process.poll() is None, log_path.read_text(errors="replace")
        yield f"http://127.0.0.1:{environment['CALLGATE_FSXML__LISTEN_PORT']}/cdr"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    logged = log_path.read_text(errors="replace")
    assert SECRET not in logged and TICKET_KEY not in logged
    assert "tickets signed with HMAC-SHA256 (1 key(s) configured)" in logged


@pytest.fixture(scope="module")
def db(module_pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(module_pg_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def writer(client: redis.Redis, module_pg_url: str, module_key_prefix: str) -> CdrWriter:
    return CdrWriter(client, module_key_prefix, lambda: psycopg.connect(module_pg_url), "test-writer")


def settings(url: str) -> CdrSettings:
    # retries as the shipped json_cdr.conf.xml has them, quicker: the service may still be
    # loading its snapshot when the first post comes (503, retried)
    return CdrSettings(urls=[url], cred=f"freeswitch:{SECRET}", retries=20, delay=0.25, timeout=5.0)


def account_id(db: psycopg.Connection, number: str) -> int:
    row = db.execute("SELECT id FROM accounts WHERE number = %s", (number,)).fetchone()
    assert row is not None
    return int(row[0])


def assert_billed_by_hand(db: psycopg.Connection, uuid: str, billsec: int) -> tuple[Decimal, Decimal]:
    customer_debit = D("0.01") * billsec
    reseller_debit = D("0.02") + D("0.006") * billsec
    carrier_cost = D("0.01") + D("0.005") * billsec
    rows = db.execute(
        "SELECT trunk_name, gateway, billsec, customer_debit, carrier_cost, margin FROM cdrs WHERE uuid = %s",
        (uuid,),
    ).fetchall()
    assert rows == [
        ("carrier-b", "gw-b", billsec, customer_debit, carrier_cost, reseller_debit - carrier_cost)
    ]
    debits: dict[str, Decimal] = dict(
        db.execute(
            "SELECT a.number, d.amount FROM call_debits d JOIN accounts a ON a.id = d.account_id"
            " WHERE d.uuid = %s",
            (uuid,),
        ).fetchall()
    )
    assert debits == {RESOLD: customer_debit, RESELLER: reseller_debit}
    return customer_debit, reseller_debit


def resold_call(hold: float) -> CallSpec:
    return CallSpec(
        destination="441234567890",
        sip_auth_username="resold",
        hold_seconds=hold,
        answering_targets=only_gateway("gw-b"),  # the first trunk fails: carried by the second
    )


def test_engine_killed_with_an_answered_call_up_is_billed_once_from_freeswitchs_cdr(
    environment: dict[str, str],
    fsxml: str,
    writer: CdrWriter,
    db: psycopg.Connection,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    prefix = environment["CALLGATE_REDIS__KEY_PREFIX"]
    funds = Funds(client, prefix)
    customer_before, reseller_before = balance(db, RESOLD), balance(db, RESELLER)
    engine = EngineProcess(environment).start(tmp_path / "serve.log", wait=60)
    switch = Switch()
    spec = resold_call(hold=3.0)
    try:
        call = gevent.spawn(place_call, "127.0.0.1", engine.port, spec, timeout=60, switch=switch)
        wait_until(
            lambda: spec.uuid in switch.channels and switch.channels[spec.uuid].bridged,
            30,
            what="call answered",
        )
        assert engine.process is not None
        engine.process.kill()  # SIGKILL: no hangup, no settle, no flush
        engine.process.wait()
        result = call.get(timeout=60)
    finally:
        engine.stop()
    assert result.answered and result.bridged_target is not None and "/gateway/gw-b/" in result.bridged_target
    assert result.attempted_targets[0].startswith("sofia/gateway/gw-a/")
    assert result.billsec in (3, 4), result.billsec
    # The engine never settled the call: its reservation still holds the funds.
    assert client.hget(funds_call_key(prefix, spec.uuid), "st") is None
    assert funds.account(account_id(db, RESOLD)).reserved > 0
    limiter = Limiter(client, prefix)
    assert spec.uuid in limiter.counted_calls()  # and its concurrent-call slot

    posted = post_cdr(cdr_document(result, spec, switch), settings(fsxml))
    assert posted.delivered, posted.statuses
    drain_until(writer, db, [spec.uuid])
    customer_debit, reseller_debit = assert_billed_by_hand(db, spec.uuid, result.billsec)
    assert balance(db, RESOLD) == customer_before - customer_debit
    assert balance(db, RESELLER) == reseller_before - reseller_debit
    assert funds.account(account_id(db, RESOLD)).reserved == 0  # the settle released the reservation
    assert spec.uuid not in limiter.counted_calls()  # the post released the slot too

    # FreeSWITCH posting again (a retry whose 200 was lost, a replay of the err-log-dir): no-op.
    assert post_cdr(cdr_document(result, spec, switch), settings(fsxml)).statuses == [200]
    gevent.sleep(0.5)
    while writer.process_once(0).entries:
        pass
    assert_billed_by_hand(db, spec.uuid, result.billsec)
    assert balance(db, RESOLD) == customer_before - customer_debit
    assert db.execute("SELECT count(*) FROM cdr_duplicates").fetchone() == (0,)
    assert db.execute("SELECT * FROM ledger_mismatches").fetchall() == []
    # Prometheus sees it: the signed ticket verified and billed, the repeat already billed.
    scraped = scrape(int(environment["CALLGATE_FSXML__METRICS_PORT"]))
    assert scraped.get("callgate_fsxml_cdr_posts_total", outcome="billed") >= 1
    assert scraped.get("callgate_fsxml_cdr_posts_total", outcome="bad_signature") == 0


def test_a_live_engine_and_freeswitchs_post_racing_bill_the_call_once(
    environment: dict[str, str], fsxml: str, writer: CdrWriter, db: psycopg.Connection, tmp_path: Path
) -> None:
    """The post leaves as soon as the call ends, while the engine settles its hangup in a batch:
    whichever comes first bills, the other is a no-op. Then a late post, after the CDR is in
    PostgreSQL."""
    engine = EngineProcess(environment).start(tmp_path / "serve.log", wait=60)
    switch = Switch()
    try:
        specs = [resold_call(hold=1.0) for _ in range(4)]
        before = balance(db, RESOLD), balance(db, RESELLER)
        results = [place_call("127.0.0.1", engine.port, spec, timeout=30, switch=switch) for spec in specs]
        assert all(r.answered for r in results), [
            (r.error, r.variables.get("callgate_reason")) for r in results
        ]
        posts = [
            gevent.spawn(post_cdr, cdr_document(r, s, switch), settings(fsxml))
            for r, s in zip(results, specs, strict=True)
        ]
        gevent.joinall(posts, timeout=30)
        assert all(p.get(block=False).delivered for p in posts)
        uuids = [s.uuid for s in specs]
        drain_until(writer, db, uuids)
        spent = [assert_billed_by_hand(db, r.uuid, r.billsec) for r in results]
        late = [
            post_cdr(cdr_document(r, s, switch), settings(fsxml)) for r, s in zip(results, specs, strict=True)
        ]
        assert all(p.statuses == [200] for p in late)
        gevent.sleep(0.5)
        while writer.process_once(0).entries:
            pass
        assert db.execute("SELECT count(*) FROM cdrs WHERE uuid = ANY(%s)", (uuids,)).fetchone() == (4,)
        assert balance(db, RESOLD) == before[0] - sum(c for c, _ in spent)
        assert balance(db, RESELLER) == before[1] - sum(r for _, r in spent)
        assert db.execute("SELECT count(*) FROM cdr_duplicates").fetchone() == (0,)
        assert db.execute("SELECT * FROM ledger_mismatches").fetchall() == []
    finally:
        engine.stop()
