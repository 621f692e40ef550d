"""The CDR writer on real PostgreSQL and Redis: batches, duplicates, PostgreSQL down, kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis

from engine.billing.funds import Funds, FundsLevel, call_key, cdr_stream
from engine.billing.rating import Tariff
from engine.sync.cdrs import GROUP, CdrWriter, stream_backlog
from tests.billing.conftest import cdr, ledger_mismatches, make_account, settle_all, settlement

D = Decimal
ROOT = Path(__file__).resolve().parents[2]


def writer(db_url: str, client: redis.Redis, prefix: str, **kwargs) -> CdrWriter:
    return CdrWriter(client, prefix, lambda: psycopg.connect(db_url), "test-writer", **kwargs)


def drain(w: CdrWriter, limit: int = 200) -> int:
    total = 0
    for _ in range(limit):
        result = w.process_once(0)
        if result.entries == 0:
            return total
        total += result.written
    raise AssertionError("the stream did not drain")


def test_a_batch_writes_cdrs_debits_and_balances_in_one_go(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    reseller = make_account(db, "900", "100", kind="reseller")
    customer = make_account(db, "901", "10", reseller_id=reseller)
    funds = Funds(client, key_prefix)
    items = [settlement(f"u{i}", [(customer, "0.10"), (reseller, "0.06")]) for i in range(50)]
    settle_all(funds, items)
    w = writer(db_url, client, key_prefix)
    assert drain(w) == 50
    balances: dict[int, Decimal] = dict(db.execute("SELECT id, balance FROM accounts").fetchall())
    assert balances == {reseller: D("97.000000"), customer: D("5.000000")}
    assert db.execute("SELECT count(*) FROM call_debits").fetchone() == (100,)
    assert ledger_mismatches(db) == []
    assert stream_backlog(client, cdr_stream(key_prefix))[0] == 0
    assert w.metrics.cdrs_written._value.get() == 50
    assert w.metrics.debits_written._value.get() == 100
    assert client.xlen(cdr_stream(key_prefix)) == 0  # written entries are trimmed


def test_trimming_never_cuts_an_unwritten_entry(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    customer = make_account(db, "901", "10")
    settle_all(Funds(client, key_prefix), [settlement(f"t{i}", [(customer, "0.01")]) for i in range(10)])
    stuck = CdrWriter(
        client, key_prefix, lambda: psycopg.connect(db_url.replace(":5432/", ":1/")), "stuck", batch=4
    )
    with pytest.raises(psycopg.OperationalError):
        stuck.process_once(0)  # took 4 entries, cannot write them: they stay pending
    w = writer(db_url, client, key_prefix, batch=3)
    w.process_once(0)  # writes 3 later entries, acks them, trims
    assert client.xlen(cdr_stream(key_prefix)) == 10  # the 4 pending ones come first: nothing is cut
    w2 = writer(db_url, client, key_prefix, claim_idle_ms=0)
    drain(w2)
    assert db.execute("SELECT count(*) FROM cdrs").fetchone() == (10,)
    assert ledger_mismatches(db) == []


def test_backlog_gauges_show_what_waits_and_for_how_long(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    customer = make_account(db, "901", "10")
    funds = Funds(client, key_prefix)
    funds.reserve("up", [FundsLevel(customer, D("10"), D("0"), Tariff(D("1")))], cap_seconds=60)
    settle_all(funds, [settlement(f"u{i}", [(customer, "0.10")]) for i in range(7)])
    time.sleep(1.1)
    w = writer(db_url, client, key_prefix, batch=3)
    w.process_once(0)  # gauges are read before the batch
    assert w.metrics.backlog._value.get() == 7
    assert w.metrics.lag._value.get() >= 1.0
    assert (w.metrics.reserved._value.get(), w.metrics.open_reservations._value.get()) == (1.0, 1)
    assert stream_backlog(client, cdr_stream(key_prefix))[0] == 4  # 3 written and acknowledged


def test_a_duplicated_hangup_is_written_once(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    customer = make_account(db, "901", "10")
    funds = Funds(client, key_prefix)
    item = settlement("dup", [(customer, "1.25")])
    assert funds.settle(item) is True
    assert funds.settle(item) is False  # the second hangup changes nothing in Redis
    w = writer(db_url, client, key_prefix, batch=2)
    drain(w)
    # Later duplicates, once the settled flag has expired: each adds to Redis's spent and
    # reaches the stream again, in one batch together and in a later one.
    for _ in range(2):
        client.delete(call_key(key_prefix, "dup"))
        assert funds.settle(item) is True
    drain(w)
    client.delete(call_key(key_prefix, "dup"))
    funds.settle(item)
    assert funds.account(customer).spent == D("2.50")  # the first two duplicates were already taken back
    drain(w)
    assert db.execute("SELECT count(*) FROM cdrs").fetchone() == (1,)
    assert db.execute("SELECT count(*) FROM cdr_duplicates").fetchone() == (3,)
    assert db.execute("SELECT balance, calls_debited FROM accounts").fetchone() == (D("8.75"), D("1.25"))
    assert ledger_mismatches(db) == []
    # The writer took the duplicates' debits back: Redis and PostgreSQL agree again.
    assert funds.account(customer).spent == D("1.25")
    assert funds.available(FundsLevel(customer, D("8.75"), D("1.25"), Tariff(D("1")))) == D("8.75")


def test_a_bad_record_is_dropped_and_counted_without_blocking_the_rest(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    customer = make_account(db, "901", "10")
    stream = cdr_stream(key_prefix)
    client.xadd(stream, {"uuid": "x", "cdr": "{not json"})
    client.xadd(stream, {"uuid": "y", "cdr": json.dumps({"uuid": "y", "started_at": "yesterday"})})
    client.xadd(stream, {"uuid": "z", "cdr": json.dumps(cdr("z", [(customer, "NaN")]))})
    client.xadd(stream, {"uuid": "ok", "cdr": json.dumps(cdr("ok", [(customer, "0.50")]))})
    w = writer(db_url, client, key_prefix)
    assert drain(w) == 1
    assert w.metrics.cdrs_bad._value.get() == 3
    assert db.execute("SELECT balance FROM accounts").fetchone() == (D("9.5"),)


def test_rejects_are_recorded_without_debit(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    from datetime import UTC, datetime

    from engine.billing.cdr import rejected_cdr
    from engine.billing.funds import Settlement

    customer = make_account(db, "901", "10")
    record = rejected_cdr(
        "rej-1",
        datetime.now(UTC),
        reason="NO_SUFFICIENT_FUND",
        sip_code=402,
        account_id=customer,
        dialled="44",
    )
    Funds(client, key_prefix).settle(Settlement("rej-1", (), record))
    drain(writer(db_url, client, key_prefix))
    row = db.execute("SELECT reject_reason, sip_code, customer_debit FROM cdrs").fetchone()
    assert row == ("NO_SUFFICIENT_FUND", 402, D("0"))
    assert db.execute("SELECT balance FROM accounts").fetchone() == (D("10"),)


def test_postgres_unreachable_keeps_the_backlog_then_drains_it(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    customer = make_account(db, "901", "100")
    settle_all(Funds(client, key_prefix), [settlement(f"u{i}", [(customer, "0.01")]) for i in range(300)])
    target = {"url": db_url.replace(":5432/", ":1/")}  # nothing listens on port 1
    w = CdrWriter(
        client,
        key_prefix,
        lambda: psycopg.connect(target["url"], connect_timeout=2),
        "test-writer",
        batch=100,
        backoff_max=0.2,
        claim_idle_ms=100,
    )
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), kwargs={"block_ms": 100})
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while w.failures < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.failures >= 3
        assert db.execute("SELECT count(*) FROM cdrs").fetchone() == (0,)
        backlog, _ = stream_backlog(client, cdr_stream(key_prefix))
        assert backlog == 300  # all still in Redis: read but not acknowledged, or not read yet
        target["url"] = db_url
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if db.execute("SELECT count(*) FROM cdrs").fetchone() == (300,):
                break
            time.sleep(0.1)
        while stream_backlog(client, cdr_stream(key_prefix))[0] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(10)
    assert db.execute("SELECT count(*) FROM cdrs").fetchone() == (300,)
    assert db.execute("SELECT balance FROM accounts").fetchone() == (D("97"),)
    assert ledger_mismatches(db) == []
    assert stream_backlog(client, cdr_stream(key_prefix))[0] == 0


def _start_writer(db_url: str, redis_url: str, prefix: str, consumer: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.sync.cdrs",
            "--pg",
            db_url,
            "--redis",
            redis_url,
            "--prefix",
            prefix,
            "--consumer",
            consumer,
            "--batch",
            "200",
            "--claim-idle-ms",
            "500",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.timeout(180)
def test_kill_9_mid_burst_then_restart_loses_and_doubles_nothing(
    db: psycopg.Connection, db_url: str, client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    reseller = make_account(db, "900", "1000", kind="reseller")
    customers = [make_account(db, f"90{i}", "500", reseller_id=reseller) for i in range(1, 4)]
    total = 6000
    items = [settlement(f"k{i}", [(customers[i % 3], "0.07"), (reseller, "0.03")]) for i in range(total)]
    settle_all(Funds(client, key_prefix), items)
    first = _start_writer(db_url, redis_url, key_prefix, "writer-a")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = db.execute("SELECT count(*) FROM cdrs").fetchone()
            assert row is not None
            if row[0] >= 400:
                break
            time.sleep(0.005)
        os.kill(first.pid, signal.SIGKILL)  # mid-burst: some batches committed, one maybe half-done
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    row = db.execute("SELECT count(*) FROM cdrs").fetchone()
    assert row is not None
    (written_before,) = row
    assert 0 < written_before < total, "the kill must land in the middle of the burst"
    assert ledger_mismatches(db) == []
    second = _start_writer(db_url, redis_url, key_prefix, "writer-b")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if stream_backlog(client, cdr_stream(key_prefix))[0] == 0:
                break
            time.sleep(0.2)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(10)
    assert db.execute("SELECT count(*), count(DISTINCT uuid) FROM cdrs").fetchone() == (total, total)
    assert db.execute("SELECT count(*) FROM call_debits").fetchone() == (2 * total,)
    assert ledger_mismatches(db) == []
    balances: dict[int, Decimal] = dict(db.execute("SELECT id, balance FROM accounts").fetchall())
    assert balances[reseller] == D("1000") - D("0.03") * total
    assert sum(balances[c] for c in customers) == D("1500") - D("0.07") * total
    assert client.xpending(cdr_stream(key_prefix), GROUP)["pending"] == 0
    # Replays after the kill were recognised as replays, not duplicates: nothing taken back.
    assert db.execute("SELECT count(*) FROM cdr_duplicates").fetchone() == (0,)
    funds = Funds(client, key_prefix)
    for account_id, recorded in db.execute("SELECT id, calls_debited FROM accounts").fetchall():
        assert funds.account(account_id).spent == recorded


def test_two_writers_in_parallel_share_the_stream_without_deadlock_or_double_write(
    db: psycopg.Connection, db_url: str, client: redis.Redis, redis_url: str, key_prefix: str
) -> None:
    accounts = [make_account(db, f"80{i}", "1000") for i in range(6)]
    items = [
        settlement(f"p{i}", [(accounts[i % 6], "0.01"), (accounts[(i + 3) % 6], "0.02")]) for i in range(3000)
    ]
    settle_all(Funds(client, key_prefix), items)
    writers = [
        CdrWriter(
            redis.Redis.from_url(redis_url), key_prefix, lambda: psycopg.connect(db_url), f"w{n}", batch=150
        )
        for n in range(2)
    ]
    errors: list[BaseException] = []

    def work(w: CdrWriter) -> None:
        try:
            while w.process_once(100).entries:
                pass
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert db.execute("SELECT count(*), count(DISTINCT uuid) FROM cdrs").fetchone() == (3000, 3000)
    assert all(w.metrics.cdrs_written._value.get() > 0 for w in writers)  # both took part
    assert ledger_mismatches(db) == []


def test_each_month_gets_its_own_partition_old_or_future(
    db: psycopg.Connection, db_url: str, client: redis.Redis, key_prefix: str
) -> None:
    from datetime import UTC, datetime

    customer = make_account(db, "901", "10")
    funds = Funds(client, key_prefix)
    for uuid, when in [
        ("jan", datetime(2027, 1, 15, tzinfo=UTC)),
        ("old", datetime(1999, 12, 31, 23, tzinfo=UTC)),
    ]:
        funds.settle(settlement(uuid, [(customer, "1")], started=when))
    drain(writer(db_url, client, key_prefix))
    rows: dict[str, str] = dict(db.execute("SELECT uuid, tableoid::regclass::text FROM cdrs").fetchall())
    assert rows == {"jan": "cdrs_y2027m01", "old": "cdrs_y1999m12"}
    assert ledger_mismatches(db) == []
