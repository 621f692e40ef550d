"""A PostgreSQL restart loses no change and no CDR: a real `callgate sync` against a private
PostgreSQL cluster that is stopped (pg_ctl -m fast) while CDRs keep arriving in the Redis stream,
then started again. Afterwards every CDR is in PostgreSQL exactly once, the account's balance
moved by exactly its debits, and a change made after the restart reaches the Redis snapshot."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis

from engine.billing.funds import Funds
from engine.state.snapshot import SnapshotUnavailable, read_snapshot
from tests.billing.conftest import settle_all, settlement
from tests.ha.private_pg import PrivatePostgres
from tests.support import CALLGATE, ROOT, engine_environment, prepare_database, wait_until
from tests.test_limits_e2e import CATALOGUE

pytestmark = pytest.mark.slow


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().init()
    server.start()
    yield server
    server.destroy()


def count(url: str, sql: str) -> int | None:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute(sql).fetchone()
            return None if row is None else int(row[0])
    except psycopg.OperationalError:
        return None


def max_channels(client: redis.Redis, prefix: str, number: str) -> int | None:
    try:
        data = read_snapshot(client, prefix)
    except SnapshotUnavailable:
        return None
    return next((a.max_channels for a in data.accounts if a.number == number), None)


def test_a_postgres_restart_loses_no_cdr_and_no_change(
    private_pg: PrivatePostgres, redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    prepare_database(private_pg.url, CATALOGUE)
    env = engine_environment(
        private_pg.url,
        redis_url,
        key_prefix,
        CALLGATE_SYNC__METRICS_PORT="0",
        CALLGATE_SYNC__RECONNECT_MAX_DELAY="1",
        CALLGATE_DATABASE__CONNECT_TIMEOUT="2",
    )
    client = redis.Redis.from_url(redis_url)
    with psycopg.connect(private_pg.url) as conn:
        row = conn.execute("SELECT id FROM accounts WHERE number = '1000000050'").fetchone()
        assert row is not None
        (account,) = row
    log = (tmp_path / "sync.log").open("wb")
    worker = subprocess.Popen([*CALLGATE, "sync"], env=env, cwd=ROOT, stdout=log, stderr=log)
    try:
        wait_until(lambda: max_channels(client, key_prefix, "1000000050") == 50, timeout=30,
                   what="the first snapshot")  # fmt: skip
        funds = Funds(client, key_prefix)
        settle_all(funds, [settlement(f"before-{i}", [(account, "0.10")]) for i in range(20)])
        cdrs = "SELECT count(*) FROM cdrs"
        wait_until(lambda: count(private_pg.url, cdrs) == 20, timeout=30, what="20 CDRs written")
        private_pg.stop()
        settle_all(funds, [settlement(f"during-{i}", [(account, "0.10")]) for i in range(30)])
        time.sleep(3)  # the CDR writer fails and retries meanwhile
        private_pg.start()
        wait_until(lambda: count(private_pg.url, cdrs) == 50, timeout=60, what="all 50 CDRs written")
        with psycopg.connect(private_pg.url, autocommit=True) as conn:
            # The ledger for this account (the fixture loader writes opening balances without an
            # 'initial' balance change, so the view's full equation is checked as a difference):
            # 50 debits of 0.10, each once, moved balance and calls_debited by exactly 5.00.
            ledger = conn.execute(
                "SELECT balance, calls_debited FROM accounts WHERE id = %s", (account,)
            ).fetchone()
            assert ledger is not None
            balance, debited = ledger
            summed = conn.execute(
                "SELECT sum(amount) FROM call_debits WHERE account_id = %s", (account,)
            ).fetchone()
            assert summed is not None
            (debits,) = summed
            assert (balance, debited, debits) == (Decimal("995"), Decimal("5"), Decimal("5"))
            assert conn.execute("SELECT count(DISTINCT uuid) FROM cdrs").fetchone() == (50,)
            conn.execute("UPDATE accounts SET max_channels = 7 WHERE number = '1000000050'")
        wait_until(lambda: max_channels(client, key_prefix, "1000000050") == 7, timeout=30,
                   what="the change after the restart in the snapshot")  # fmt: skip
        assert worker.poll() is None, "the sync worker exited"
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        client.close()
