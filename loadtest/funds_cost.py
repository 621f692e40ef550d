"""Benchmark: what a funds reservation and a settle cost Redis, per call, against a trivial script.

Redis CPU (INFO cpu, user + sys) per call is the number that matters: the reservation rides in
the limits script's round trip, so it adds Redis work, not a round trip. Each figure is reported
next to a baseline (an EVALSHA that only returns), as a ratio, on the same Redis in the same run.

    nice .venv/bin/python -m loadtest.funds_cost --calls 20000

By default a private redis-server is started on a free port (the shared one carries other
traffic, which INFO cpu would count); ``--redis URL`` measures an existing server instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import redis

from engine.billing.funds import Funds, FundsLevel, Settlement
from engine.billing.rating import Tariff
from engine.state.snapshot import delete_prefix


def _redis_cpu(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(client: redis.Redis, calls: int, one: Any) -> tuple[float, float]:
    """(Redis CPU µs per call, client wall µs per call) of ``one(i)`` run ``calls`` times."""
    cpu = _redis_cpu(client)
    began = time.perf_counter()
    for i in range(calls):
        one(i)
    wall = time.perf_counter() - began
    return (_redis_cpu(client) - cpu) / calls * 1e6, wall / calls * 1e6


@contextlib.contextmanager
def _private_redis() -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="cg-funds-bench-")
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--dir", workdir, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        probe_client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                probe_client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        probe_client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.funds_cost")
    parser.add_argument("--redis", default="", help="an existing Redis (default: a private redis-server)")
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--accounts", type=int, default=1000)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.redis or stack.enter_context(_private_redis())
        return _run(url, args)


def _run(url: str, args: argparse.Namespace) -> int:
    client = redis.Redis.from_url(url)
    prefix = f"cgbench:{secrets.token_hex(3)}:"
    funds = Funds(client, prefix)
    tariff = Tariff(Decimal("0.10"), connect_cost=Decimal("0.01"), init_inc=30, inc=6)
    trivial = client.register_script("return 1")
    report: dict[str, Any] = {"calls": args.calls}
    try:
        base_cpu, base_wall = _measure(client, args.calls, lambda i: trivial(keys=[f"{prefix}x"], args=[i]))
        report["baseline_evalsha"] = {"redis_cpu_us": round(base_cpu, 2), "wall_us": round(base_wall, 1)}
        for depth in (1, 3):

            def levels(i: int, depth: int = depth) -> list[FundsLevel]:
                return [
                    FundsLevel(
                        (i + n * 7919) % args.accounts + n * args.accounts, Decimal(1000), Decimal(0), tariff
                    )
                    for n in range(depth)
                ]

            def reserve(i: int, depth: int = depth) -> None:
                funds.reserve(f"c{depth}-{i}", levels(i), cap_seconds=3600)

            def settle(i: int, depth: int = depth) -> None:
                debits = tuple((lv.account_id, Decimal(0), Decimal("0.05")) for lv in levels(i))
                funds.settle(Settlement(f"c{depth}-{i}", debits, {"uuid": f"c{depth}-{i}", "billsec": 30}))

            r_cpu, r_wall = _measure(client, args.calls, reserve)
            s_cpu, s_wall = _measure(client, args.calls, settle)
            report[f"chain_{depth}"] = {
                "reserve_redis_cpu_us": round(r_cpu, 2),
                "reserve_vs_baseline": round(r_cpu / base_cpu, 1),
                "settle_redis_cpu_us": round(s_cpu, 2),
                "settle_vs_baseline": round(s_cpu / base_cpu, 1),
                "reserve_wall_us": round(r_wall, 1),
                "settle_wall_us": round(s_wall, 1),
            }
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0
    finally:
        delete_prefix(client, prefix)
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
