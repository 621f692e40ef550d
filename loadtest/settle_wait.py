"""What ``WAIT 1 <ms>`` after each settle batch would cost (issue 17: settles lost in a failover).

A private primary and replica (redis-server, AOF everysec, loopback), then batches of settles as
the engine's settler sends them (``Funds.settle_many``: one pipelined round trip per batch), each
batch timed alone and followed by ``WAIT 1 100`` (the replica has acknowledged it) in the same
run, alternating, so both see the same machine load::

    python -m loadtest.settle_wait [--batches 200] [--batch 50]

Prints the median and p99 wall time of a batch without and with the WAIT, and what the WAIT adds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal

import redis

from engine.billing.funds import Funds, Settlement
from loadtest.chaos.cluster import answers, tool, wait_for
from loadtest.chaos.proxy import free_port


def _server(directory: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    command = [
        tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
        "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", *extra,
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: answers(port), 15, f"redis on {port}")
    return process


def _settlement(uuid: str) -> Settlement:
    now = datetime.now(UTC).isoformat()
    cdr = {"v": 1, "uuid": uuid, "started_at": now, "answered_at": now, "ended_at": now, "account_id": 1,
           "chain": [1], "billsec": 30, "debits": ["0.300000"]}  # fmt: skip
    return Settlement(uuid, ((1, Decimal(0), Decimal("0.30")),), cdr)


def measure(batches: int, batch: int) -> dict[str, float]:
    base = tempfile.mkdtemp(prefix="cg-settle-wait-")
    primary_port, replica_port = free_port(), free_port()
    processes = [_server(f"{base}", primary_port)]
    try:
        replica_dir = f"{base}/replica"
        subprocess.run(["mkdir", "-p", replica_dir], check=True)
        processes.append(_server(replica_dir, replica_port, "--replicaof", "127.0.0.1", str(primary_port)))
        client = redis.Redis(port=primary_port)
        replica = redis.Redis(port=replica_port)
        wait_for(
            lambda: replica.info("replication").get("master_link_status") == "up", 30, "the replica in sync"
        )
        client.set("warm", 1)
        wait_for(lambda: client.wait(1, 1000) == 1, 30, "a first acknowledgement")
        funds = Funds(client, "wait:")
        plain: list[float] = []
        waited: list[float] = []
        timeouts = 0
        for n in range(batches):
            items = [_settlement(f"{n}-{i}") for i in range(batch)]
            started = time.perf_counter()
            funds.settle_many(items)
            if n % 2:
                timeouts += client.wait(1, 100) < 1
                waited.append(time.perf_counter() - started)
            else:
                plain.append(time.perf_counter() - started)
        return {
            "plain_median_ms": statistics.median(plain) * 1000,
            "plain_p99_ms": statistics.quantiles(plain, n=100)[98] * 1000,
            "wait_median_ms": statistics.median(waited) * 1000,
            "wait_p99_ms": statistics.quantiles(waited, n=100)[98] * 1000,
            "wait_timeouts": timeouts,
        }
    finally:
        for process in processes:
            process.kill()
            process.wait()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.settle_wait", description=__doc__)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument(
        "--batch", type=int, default=50, help="settles per batch (the settler batches up to 500)"
    )
    args = parser.parse_args(argv)
    result = measure(args.batches, args.batch)
    print(
        f"batch of {args.batch} settles, {args.batches // 2} batches each: "
        f"plain median {result['plain_median_ms']:.2f} ms (p99 {result['plain_p99_ms']:.2f}); "
        f"with WAIT 1 100 median {result['wait_median_ms']:.2f} ms (p99 {result['wait_p99_ms']:.2f}); "
        f"the WAIT adds {result['wait_median_ms'] - result['plain_median_ms']:.2f} ms a batch (median); "
        f"{result['wait_timeouts']:.0f} WAITs timed out"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
