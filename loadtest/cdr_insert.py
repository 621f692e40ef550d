"""Benchmark: CDR insertion into PostgreSQL through the real path (docs/accounting.md, "Numbers").

Creates a private database and Redis prefix, N customers under R resellers, settles CALLS calls
in Redis with the engines' settle script (pipelined, as the hangup side batches them), then lets
one CdrWriter drain the stream: stream read, COPY into staging, INSERT ... ON CONFLICT into cdrs
and call_debits, balance updates, XACK. Reports calls/s of both phases and checks the ledger.

    nice .venv/bin/python -m loadtest.cdr_insert --calls 50000
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import psycopg
import redis

from engine.billing.funds import Funds, Settlement
from engine.db.migrate import migrate
from engine.state.snapshot import delete_prefix
from engine.sync.cdrs import CdrWriter


def _scalar(conn: psycopg.Connection, query: str, params: list[object] | None = None) -> int:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def _accounts(conn: psycopg.Connection, customers: int, resellers: int) -> list[tuple[int, int]]:
    pairs = []
    reseller_ids = []
    for r in range(resellers):
        rid = _scalar(
            conn,
            "INSERT INTO accounts (number, kind, balance) VALUES (%s, 'reseller', 1000000) RETURNING id",
            [f"8{r:08d}"],
        )
        reseller_ids.append(rid)
    for c in range(customers):
        rid = reseller_ids[c % resellers]
        cid = _scalar(
            conn,
            "INSERT INTO accounts (number, reseller_id, balance) VALUES (%s, %s, 100000) RETURNING id",
            [f"9{c:08d}", rid],
        )
        pairs.append((cid, rid))
    for account_id, amount in [(rid, 1000000) for rid in reseller_ids] + [(cid, 100000) for cid, _ in pairs]:
        conn.execute(
            "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency, actor)"
            " VALUES (%s, 'initial', %s, %s, 'USD', 'bench')",
            [account_id, amount, amount],
        )
    return pairs


def _settlements(pairs: list[tuple[int, int]], calls: int) -> list[Settlement]:
    start = datetime.now(UTC) - timedelta(hours=1)
    items = []
    for i in range(calls):
        customer, reseller = pairs[i % len(pairs)]
        began = start + timedelta(milliseconds=i)
        uuid = f"bench-{i:08d}-{secrets.token_hex(4)}"
        record = {
            "v": 1,
            "uuid": uuid,
            "started_at": began.isoformat(),
            "answered_at": (began + timedelta(seconds=2)).isoformat(),
            "ended_at": (began + timedelta(seconds=62)).isoformat(),
            "account_id": customer,
            "account_number": "",
            "chain": [customer, reseller],
            "direction": "outbound",
            "caller_id_number": "442071234567",
            "dialled": "0044207946" + f"{i % 10000:04d}",
            "translated": "44207946" + f"{i % 10000:04d}",
            "rate_prefix": "44",
            "rate_cost_per_minute": "0.10",
            "trunk_id": 1,
            "trunk_name": "carrier-a",
            "gateway": "gw-a",
            "provider_id": 1,
            "carrier_prefix": "44",
            "carrier_cost_per_minute": "0.05",
            "billsec": 60,
            "duration": 62,
            "max_duration": 3600,
            "customer_debit": "0.100000",
            "carrier_cost": "0.050000",
            "margin": "0.010000",
            "hangup_cause": "NORMAL_CLEARING",
            "q850": 16,
            "disposition": "recv_bye",
            "notes": [],
            "debits": [[customer, 0, "0.100000"], [reseller, 1, "0.060000"]],
        }
        debits = ((customer, Decimal(0), Decimal("0.10")), (reseller, Decimal(0), Decimal("0.06")))
        items.append(Settlement(uuid, debits, record))
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.cdr_insert")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--resellers", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args(argv)

    name = f"callgate_bench_cdr_{secrets.token_hex(3)}"
    base = args.pg_admin.rpartition("/")[0]
    url = f"{base}/{name}"
    prefix = f"cgbench:{secrets.token_hex(3)}:"
    client = redis.Redis.from_url(args.redis)
    with psycopg.connect(args.pg_admin, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            pairs = _accounts(conn, args.customers, args.resellers)
        items = _settlements(pairs, args.calls)
        funds = Funds(client, prefix)
        began = time.perf_counter()
        for i in range(0, len(items), 500):
            funds.settle_many(items[i : i + 500])
        settle_s = time.perf_counter() - began
        writer = CdrWriter(client, prefix, lambda: psycopg.connect(url), "bench", batch=args.batch)
        began = time.perf_counter()
        written = 0
        while True:
            result = writer.process_once(0)
            if not result.entries:
                break
            written += result.written
        write_s = time.perf_counter() - began
        writer.close()
        with psycopg.connect(url) as conn:
            mismatches = _scalar(conn, "SELECT count(*) FROM ledger_mismatches")
            rows = _scalar(conn, "SELECT count(*) FROM cdrs")
        report = {
            "calls": args.calls,
            "accounts": args.customers + args.resellers,
            "batch": args.batch,
            "redis_settle_calls_per_s": round(args.calls / settle_s),
            "cdr_write_calls_per_s": round(written / write_s),
            "cdr_write_seconds": round(write_s, 2),
            "cdr_rows": rows,
            "ledger_mismatches": mismatches,
        }
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0 if rows == args.calls and mismatches == 0 else 1
    finally:
        delete_prefix(client, prefix)
        client.close()
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    raise SystemExit(main())
