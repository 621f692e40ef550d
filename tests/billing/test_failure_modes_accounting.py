"""The rows of docs/accounting.md "Failure modes and their outcomes" that no other test proved.

Each test takes one documented outcome and checks it on real parts (PostgreSQL, Redis, the CDR
writer, the fsxml endpoint over HTTP, a real `callgate serve` killed -9), at the cheapest level
that shows it. The other rows are proven elsewhere (tests/billing/test_cdr_backstop_e2e.py,
test_cdr_post.py, test_cdr_writer.py, test_funds.py, test_redis_restart.py, test_reconcile_funds.py,
test_alerts.py, tests/call/test_session.py). What is here:

* hangup never seen, no post: the reservation expires at the granted duration plus
  ``limits.margin_seconds``, not before (the limits acquire the engine runs, on a fake clock);
* engine killed with calls up: a call whose settle ran is billed all the same, the call that was
  up is not billed and keeps its reservation until that deadline;
* the post of a call more than ``settled_seconds`` after the engine billed it (a replay of the
  err-log-dir): queued again, one row, the debit taken back;
* a duplicate's take-back: exactly once per entry when its batch is replayed, and a crash between
  the commit and the take-back leaves ``spent`` too high, never too low;
* a malformed CDR record: logged with its stream id, counted, acknowledged; and a record that
  PostgreSQL could not store (a column's range) is dropped, and a billsec no call can have is
  not billed;
* SMTP down: pending, retried after each batch, ``failed`` after 5 attempts, in the e-mail log;
* FreeSWITCH's ``queue-capacity`` (drops queued CDRs at shutdown) is not set in the shipped file.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import gevent
import psycopg
import pytest
import redis

from engine.billing.alerts import Mailer, SmtpSettings
from engine.billing.cdr import cdr_rows
from engine.billing.funds import Funds, FundsLevel, call_key, cdr_stream
from engine.billing.live import LiveBilling, PricedAccept
from engine.billing.metrics import BillingMetrics
from engine.billing.rating import Tariff
from engine.billing.statement import Scope, email_log
from engine.decision import DEFAULT_SIP_RESPONSES
from engine.model import CallRequest
from engine.state.keys import funds_reservations_key, limits_call_key
from engine.state.limits import LevelKind, LimitPlan, Subject
from engine.state.limits.redis import Limiter
from engine.sync.cdrs import GROUP, CdrWriter, stream_backlog
from engine.sync.streams import ensure_group
from loadtest.fsemu import CallSpec, Switch, place_call
from loadtest.fsemu.json_cdr import CdrSettings, post_cdr, replay_file
from tests.billing.conftest import cdr, ledger_mismatches, make_account, settlement
from tests.billing.test_cdr_post import Service, a_leg, engine_settles
from tests.billing.test_live_e2e import CATALOGUE, RESELLER, RESOLD
from tests.billing.test_ticket import priced_accept
from tests.rules.builders import World
from tests.support import (
    ROOT,
    EngineProcess,
    engine_environment,
    free_port,
    prepare_database,
    publish,
    wait_until,
)

D = Decimal
PER_MINUTE = Tariff(D("1.00"), init_inc=60, inc=60)


def writer(db_url: str, client: redis.Redis, prefix: str, consumer: str = "w", **kwargs: Any) -> CdrWriter:
    return CdrWriter(client, prefix, lambda: psycopg.connect(db_url), consumer, **kwargs)


def drain(w: CdrWriter, limit: int = 200) -> None:
    for _ in range(limit):
        if w.process_once(0).entries == 0:
            return
    raise AssertionError("the stream did not drain")


def pending(client: redis.Redis, prefix: str) -> int:
    summary: dict[str, Any] = client.xpending(cdr_stream(prefix), GROUP)
    return int(summary["pending"])


def one(db: psycopg.Connection, query: str, params: list[Any] | tuple[Any, ...] = ()) -> tuple[Any, ...]:
    row = db.execute(query, params).fetchone()
    assert row is not None, query
    return tuple(row)


def spent(funds: Funds, account_id: int) -> Decimal | None:
    return funds.account(account_id).spent


# --------------------------------------------------------------------------- hangup never seen


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_reservation_whose_hangup_never_comes_holds_until_granted_plus_margin(
    client: redis.Redis, key_prefix: str
) -> None:
    """Row "hangup never seen", without the post: the reservation expires at its deadline, the
    granted duration + ``limits.margin_seconds``, taken in the limits acquire as the engine does."""
    clock = FakeClock(5_000.0)
    limiter = Limiter(client, key_prefix, clock=clock, margin_seconds=30)
    funds = Funds(client, key_prefix, margin_seconds=30)
    plan = LimitPlan((Subject(LevelKind.ACCOUNT, 1),))
    level = FundsLevel(1, D("3.00"), D("0"), PER_MINUTE)  # 3 minutes of funds

    lost = limiter.acquire("lost", plan, 60, funds.request([level], cap_seconds=60))
    assert lost.admitted and lost.granted_seconds == 60  # its hangup will never be seen

    def probe(uuid: str) -> int | None:
        """What a new call on the account is granted now (then it is given back)."""
        result = limiter.acquire(uuid, plan, 600, funds.request([level], cap_seconds=600))
        funds.release(uuid, [1])
        limiter.release(uuid)
        return result.granted_seconds

    clock.t += 60 + 30 - 0.001  # one millisecond before granted + margin
    assert probe("before") == 120  # the lost call's minute is still held
    clock.t += 0.002
    assert probe("after") == 180  # past its deadline: the whole funds again
    assert funds.account(1).reserved == 0


@pytest.fixture
def serve_env(fresh_pg_url: str, redis_url: str, key_prefix: str) -> dict[str, str]:
    env = engine_environment(
        fresh_pg_url,
        redis_url,
        key_prefix,
        CALLGATE_RULES__CALL_MAX_LENGTH="60",
        CALLGATE_ENGINE__DECISION_DEADLINE="10",  # a loaded machine must not turn calls away
        CALLGATE_REDIS__SOCKET_TIMEOUT="5",
    )
    prepare_database(fresh_pg_url, CATALOGUE)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # the opening balances of the ledger
        conn.execute(
            "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency, actor)"
            " SELECT id, 'initial', balance, balance, currency, 'test' FROM accounts WHERE balance <> 0"
            " AND NOT EXISTS (SELECT 1 FROM balance_changes b WHERE b.account_id = accounts.id)"
        )
    publish(env)
    return env


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_an_engine_killed_with_calls_up_keeps_what_it_settled_and_bills_nothing_it_did_not_see(
    serve_env: dict[str, str], client: redis.Redis, tmp_path: Path
) -> None:
    """Row "engine killed with calls up": a call whose settle ran is safe (its CDR is in the stream
    and reaches PostgreSQL after the kill); the call that was up, with no CDR post, is not billed,
    has no CDR, and its reservation holds until granted + margin (300 s, config/callgate.toml)."""
    prefix = serve_env["CALLGATE_REDIS__KEY_PREFIX"]
    database = serve_env["CALLGATE_DATABASE_URL"]
    db = psycopg.connect(database, autocommit=True)
    w = writer(database, client, prefix)
    engine = EngineProcess(serve_env).start(tmp_path / "serve.log", wait=60)
    switch = Switch()
    try:
        ended = CallSpec(destination="441234567890", sip_auth_username="resold", hold_seconds=1.1)
        first = place_call("127.0.0.1", engine.port, ended, timeout=30, switch=switch)
        assert first.answered and first.billsec >= 1, (first.error, first.variables.get("callgate_reason"))
        wait_until(
            lambda: client.hget(call_key(prefix, ended.uuid), "st") == b"1", 15, what="the first call settled"
        )

        held = CallSpec(destination="441234567890", sip_auth_username="resold", hold_seconds=2.0)
        before_ms = redis_ms(client)
        call = gevent.spawn(place_call, "127.0.0.1", engine.port, held, timeout=30, switch=switch)
        wait_until(
            lambda: held.uuid in switch.channels and switch.channels[held.uuid].bridged, 30, what="call up"
        )
        after_ms = redis_ms(client)
        assert engine.process is not None
        engine.process.kill()  # SIGKILL: nothing flushed, no hangup of the held call ever seen
        engine.process.wait()
        second = call.get(timeout=30)
        assert second.answered

        # Nothing of the first call was lost with the engine: written from the stream, by hand.
        drain(w)
        customer, reseller = (
            one(db, "SELECT id FROM accounts WHERE number = %s", [n])[0] for n in (RESOLD, RESELLER)
        )
        debits: dict[int, Decimal] = dict(
            db.execute("SELECT account_id, amount FROM call_debits WHERE uuid = %s", [ended.uuid]).fetchall()
        )
        assert debits == {
            customer: D("0.01") * first.billsec,
            reseller: D("0.02") + D("0.006") * first.billsec,
        }
        # The held call: no CDR, no debit (no post came), its reservation held until its deadline.
        assert one(db, "SELECT count(*) FROM cdrs WHERE uuid = %s", [held.uuid]) == (0,)
        assert client.hget(call_key(prefix, held.uuid), "st") is None
        granted = int(cast(bytes, client.hget(limits_call_key(prefix, held.uuid), "fd")))
        assert granted == 61  # call_max_length + 1 (docs/accounting.md, "At the decision")
        deadline = client.zscore(funds_reservations_key(prefix, customer), held.uuid)
        assert deadline is not None
        decided_ms = deadline - (granted + 300) * 1000
        assert before_ms - 5 <= decided_ms <= after_ms + 5
        assert Funds(client, prefix).account(customer).reserved > 0
        assert ledger_mismatches(db) == []
    finally:
        engine.stop()
        w.close()
        db.close()


# --------------------------------------------------------------------------- late post, duplicates


def test_a_post_replayed_after_settled_seconds_is_queued_again_and_the_writer_keeps_one_row(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """Row "FreeSWITCH's CDR post and the engine's hangup both arrive": a post more than
    ``settled_seconds`` after the engine billed the call (a replay of the err-log-dir) is queued
    again; the CDR writer keeps one row and takes the debit back (``cdr_duplicates``)."""
    world = World()
    decided: PricedAccept = priced_accept(world)
    customer, reseller = decided.chain
    make_account(db, "2001", "50", kind="reseller", id=reseller)
    make_account(db, "1001", "10", reseller_id=reseller, id=customer)
    document, event = a_leg(decided, "late-post")

    # FreeSWITCH could not post (fsxml down): the CDR waits in its err-log-dir.
    dead = CdrSettings(urls=[f"http://127.0.0.1:{free_port()}/cdr"], err_log_dir=str(tmp_path))
    saved = post_cdr(document, dead).backup
    assert saved is not None
    # The engine saw the hangup and billed the call; it reaches PostgreSQL.
    engine_funds = Funds(client, key_prefix, settled_seconds=1)
    settled, item = engine_settles(decided, world, engine_funds, event)
    assert settled
    debits = {account: amount for account, _recorded, amount in item.debits}
    w = writer(db_url, client, key_prefix)
    drain(w)
    balances: dict[int, Decimal] = dict(db.execute("SELECT id, balance FROM accounts").fetchall())
    assert balances == {customer: D("10") - debits[customer], reseller: D("50") - debits[reseller]}
    wait_until(
        lambda: not client.exists(call_key(key_prefix, "late-post")), 10, what="the settled flag expired"
    )

    service = Service(Funds(client, key_prefix), world.catalog())
    try:
        assert replay_file(saved, service.settings()) == 200
        assert service.receiver.counts == {"billed": 1}  # queued again: the flag was gone
    finally:
        service.stop()
    assert spent(Funds(client, key_prefix), customer) == 2 * debits[customer]
    drain(w)
    assert one(db, "SELECT count(*) FROM cdrs WHERE uuid = 'late-post'") == (1,)
    assert one(db, "SELECT count(*) FROM cdr_duplicates WHERE uuid = 'late-post'") == (1,)
    assert dict(db.execute("SELECT id, balance FROM accounts").fetchall()) == balances
    assert ledger_mismatches(db) == []
    funds = Funds(client, key_prefix)
    assert (spent(funds, customer), spent(funds, reseller)) == (debits[customer], debits[reseller])


def late_duplicate(db_url: str, client: redis.Redis, prefix: str, customer: int) -> Funds:
    """A call billed and written, then settled again once its settled flag expired (Redis ``spent``
    counts it twice until the writer takes the second debit back)."""
    funds = Funds(client, prefix)
    item = settlement("twice", [(customer, "1.25")])
    assert funds.settle(item)
    drain(writer(db_url, client, prefix, "first"))
    client.delete(call_key(prefix, "twice"))  # what settled_seconds does
    assert funds.settle(item)
    assert spent(funds, customer) == D("2.50")
    return funds


def test_a_duplicate_replayed_after_its_take_back_is_taken_back_once(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    """Row "hangup seen twice": the writer takes a duplicate's debit back exactly once per entry,
    even when the batch comes again (a writer killed after the take-back, before its XACK)."""
    customer = make_account(db, "901", "10")
    funds = late_duplicate(db_url, client, key_prefix, customer)
    stream = cdr_stream(key_prefix)
    ensure_group(client, stream, GROUP)
    reply = cast(list[Any], client.xreadgroup(GROUP, "killed", {stream: ">"}, count=100))
    entries = [(entry_id, fields) for _, stream_entries in reply for entry_id, fields in stream_entries]
    assert len(entries) == 1
    killed = writer(db_url, client, key_prefix, "killed")
    killed.write(entries)  # committed and taken back; the XACK never comes (killed)
    killed.close()
    assert spent(funds, customer) == D("1.25")
    assert pending(client, key_prefix) == 1

    drain(writer(db_url, client, key_prefix, "restarted", claim_idle_ms=0))
    assert pending(client, key_prefix) == 0
    assert spent(funds, customer) == D("1.25")  # not taken back a second time
    assert one(db, "SELECT count(*) FROM cdr_duplicates") == (1,)
    assert one(db, "SELECT count(*) FROM cdrs") == (1,)
    assert one(db, "SELECT balance, calls_debited FROM accounts") == (D("8.75"), D("1.25"))
    assert ledger_mismatches(db) == []


class Crash(Exception):
    """The CDR writer's process dying at this very point."""


def test_a_crash_between_the_commit_and_the_take_back_leaves_spent_too_high_never_too_low(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row "hangup seen twice": a crash between the writer's commit and its take-back leaves Redis
    ``spent`` too high by that call's debit: fewer funds available, never more; the ledger holds."""
    customer = make_account(db, "901", "10")
    funds = late_duplicate(db_url, client, key_prefix, customer)
    crashing = writer(db_url, client, key_prefix, "crashing")

    def crash(amounts: object) -> None:
        raise Crash

    monkeypatch.setattr(crashing._funds, "take_back", crash)
    with pytest.raises(Crash):
        crashing.process_once(0)
    crashing.close()
    assert one(db, "SELECT count(*) FROM cdr_duplicates") == (1,)  # the batch was committed
    assert pending(client, key_prefix) == 1  # but not acknowledged

    drain(writer(db_url, client, key_prefix, "restarted", claim_idle_ms=0))
    assert pending(client, key_prefix) == 0
    assert one(db, "SELECT count(*) FROM cdrs") == (1,)
    assert one(db, "SELECT balance, calls_debited FROM accounts") == (D("8.75"), D("1.25"))
    assert ledger_mismatches(db) == []
    assert spent(funds, customer) == D("2.50")  # too high by the call's 1.25
    snapshot = FundsLevel(customer, D("8.75"), D("1.25"), PER_MINUTE)
    assert funds.available(snapshot) == D("7.50")  # less than the 8.75 PostgreSQL holds


# --------------------------------------------------------------------------- malformed records


def test_a_malformed_record_is_logged_with_its_stream_id_counted_and_acknowledged(
    db: psycopg.Connection,
    db_url: str,
    client: redis.Redis,
    key_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Row "a CDR record is malformed": logged with its stream id, counted, acknowledged (never
    blocks the stream), whether its batch holds good records or none."""
    customer = make_account(db, "901", "10")
    stream = cdr_stream(key_prefix)
    alone = client.xadd(stream, {"uuid": "x", "cdr": "{not json"})
    w = writer(db_url, client, key_prefix, batch=2)
    with caplog.at_level(logging.ERROR, "callgate.sync.cdrs"):
        assert w.process_once(0).bad == 1  # a batch of nothing but a bad record
        wrong_type = client.xadd(stream, {"uuid": "y", "cdr": json.dumps({**cdr("y", []), "billsec": "abc"})})
        client.xadd(stream, {"uuid": "ok", "cdr": json.dumps(cdr("ok", [(customer, "0.50")]))})
        result = w.process_once(0)
    assert (result.entries, result.bad, result.written) == (2, 1, 1)
    assert w.metrics.cdrs_bad._value.get() == 2
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for entry_id in (alone, wrong_type):
        assert any(cast(bytes, entry_id).decode() in message for message in logged), logged
    assert pending(client, key_prefix) == 0
    assert stream_backlog(client, stream)[0] == 0
    restarted = writer(db_url, client, key_prefix, "restarted", claim_idle_ms=0)
    assert restarted.process_once(0).entries == 0  # nothing comes back
    assert one(db, "SELECT balance FROM accounts") == (D("9.5"),)


def test_a_billsec_a_cdr_cannot_hold_is_not_billed(
    client: redis.Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Row "a CDR record the writer cannot store", at its source: a billsec over the CDR's
    ``integer`` column (3e9 s: 95 years; its debit at this price, 5e6, is under the 10^9 cap) is
    not billed, as a debit over the cap is not: its CDR would stop the CDR writer. Logged whole."""
    world = World()
    decided = priced_accept(world)
    catalog = world.catalog()
    billing = LiveBilling(None, lambda: catalog, DEFAULT_SIP_RESPONSES.__getitem__)  # type: ignore[arg-type]  # settlement() uses no settler
    _, forged = a_leg(decided, "centuries", billsec="3000000000")
    _, normal = a_leg(decided, "normal", billsec="3000")
    request = CallRequest(uuid="centuries", destination="442071234567")
    with caplog.at_level(logging.ERROR, "callgate.billing"):
        assert billing.settlement(request, decided, forged) is None
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "not billed: billsec over 2147483647 (billsec 3000000000)" in line, line
    item = billing.settlement(CallRequest(uuid="normal", destination="442071234567"), decided, normal)
    assert item is not None and item.cdr["billsec"] == 3000
    cdr_rows(item.cdr)  # what is billed, the writer stores (BadCdr otherwise)


def test_a_record_postgresql_could_not_store_is_dropped_and_never_blocks_the_stream(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    """Rows "a CDR record is malformed" and, in "Bad input", "a CDR record the writer cannot store",
    for records from another producer: a value beyond its column's range (an ``integer``, a
    ``bigint``, a ``smallint`` level, a ``numeric(20,6)`` amount, an integer of more digits than
    Python converts) is dropped as malformed, counted and acknowledged, and the CDR behind it is
    written: PostgreSQL would have failed the whole batch, retried forever."""
    customer = make_account(db, "901", "10")
    stream = cdr_stream(key_prefix)
    bad: dict[str, dict[str, Any]] = {
        "billsec": {"billsec": 3_000_000_000},
        "q850": {"q850": -(2**31) - 1},
        "duration": {"duration": "9" * 5000},
        "trunk": {"trunk_id": 2**63},
        "level": {"debits": [[customer, 2**15, "0.10"]]},
        "amount": {"debits": [[customer, 0, "1e14"]]},
    }
    for uuid, change in bad.items():
        client.xadd(stream, {"uuid": uuid, "cdr": json.dumps({**cdr(uuid, [(customer, "0.10")]), **change})})
    client.xadd(stream, {"uuid": "ok", "cdr": json.dumps(cdr("ok", [(customer, "0.50")]))})
    result = writer(db_url, client, key_prefix, batch=10).process_once(0)
    assert (result.entries, result.bad, result.written) == (len(bad) + 1, len(bad), 1)
    assert pending(client, key_prefix) == 0
    assert one(db, "SELECT count(*) FROM cdrs") == (1,)
    assert one(db, "SELECT balance FROM accounts") == (D("9.5"),)


# --------------------------------------------------------------------------- e-mail


def test_smtp_down_keeps_the_email_pending_retries_it_after_each_batch_and_fails_it_after_five(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    """Row "SMTP server down": the e-mail stays ``pending``, is retried after the next batch, and is
    ``failed`` after 5 attempts, recorded in the account's e-mail log. The mailer is built as
    ``callgate sync`` builds it (engine/sync/worker.py: default attempts)."""
    account = make_account(
        db, "901", "10", notify_enabled=True, notify_balance_below=D("5"), email="owner@example.test"
    )
    metrics = BillingMetrics()
    down = SmtpSettings(host="127.0.0.1", port=free_port(), timeout=2)  # nothing listens there
    mailer = Mailer(down, metrics=metrics)
    w = writer(db_url, client, key_prefix, metrics=metrics, after_commit=mailer.send_pending)
    funds = Funds(client, key_prefix)

    def batch(n: int, amount: str) -> tuple[Any, ...]:
        funds.settle(settlement(f"c{n}", [(account, amount)]))
        drain(w)
        return one(db, "SELECT status, attempts FROM account_emails")

    assert batch(0, "6") == ("pending", 1)  # 10 -> 4: crossed, queued, the first attempt failed
    error = one(db, "SELECT error FROM account_emails")[0]
    assert "Connection refused" in error or "Errno" in error, error
    for n in range(1, 4):
        assert batch(n, "0.01") == ("pending", n + 1)
    assert batch(4, "0.01") == ("failed", 5)
    assert batch(5, "0.01") == ("failed", 5)  # never tried again
    entries = email_log(db, Scope(), "901")
    assert [(e.kind, e.status, e.attempts, e.recipient) for e in entries] == [
        ("low_balance", "failed", 5, "owner@example.test")
    ]
    assert (metrics.emails.labels("retry")._value.get(), metrics.emails.labels("failed")._value.get()) == (
        4,
        1,
    )


# --------------------------------------------------------------------------- FreeSWITCH dies


def test_the_shipped_json_cdr_conf_does_not_queue_cdrs_that_a_shutdown_would_drop() -> None:
    """Row "FreeSWITCH itself dies with calls up": mod_json_cdr's ``queue-capacity`` would drop
    queued CDRs at shutdown, so it is not used (only in a comment of the shipped file)."""
    path = ROOT / "config" / "freeswitch" / "json_cdr.conf.xml"
    names = {(param.get("name") or "").lower() for param in ET.parse(path).getroot().iter("param")}
    assert "url" in names and "err-log-dir" in names  # the file is read
    assert "queue-capacity" not in names
    assert "queue-capacity" in path.read_text()  # the decision is explained next to it
