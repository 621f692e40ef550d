"""Measure representations the catalogue could take (issue 19), on a published dataset.

    python -m loadtest.memory_candidates --prefix cgscale100k: --accounts 100000 --rates 100000 [--workers 2]

* ``fork``: load the catalogue once in a parent as the engine does, ``gc.freeze()``, fork
  ``--workers`` children that each decide ``--calls`` random calls of the load-test mix
  (reading objects writes their reference counts: copy-on-write copies those pages), and
  report each child's RSS, PSS and private memory (``smaps_rollup``).

(The other candidate measured here, struct-packed rate records, became the catalogue's
representation: ``engine.rules.packed``; its decision cost is measured by
``loadtest.decide_bench``.)

Benchmarks, never asserts. The catalogue in use is not changed by this module.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from datetime import UTC, datetime
from typing import Any

from loadtest.memory import process_memory


def smaps_private_mb(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def load(prefix: str, redis_url: str) -> Any:
    import redis

    from engine.rules.catalog import Catalog
    from engine.state.snapshot import read_snapshot

    data = read_snapshot(redis.Redis.from_url(redis_url), prefix)
    catalog = Catalog.build(data)
    catalog.track_changes(data)
    return catalog


def requests_for(accounts: int, rates: int, calls: int) -> list[Any]:
    from engine.model import CallRequest
    from loadtest.dataset import CallMix, Scale

    mix = CallMix(Scale(accounts=accounts, rates=rates), seed=3)
    return [
        CallRequest(
            uuid=f"c{n}",
            destination=p.destination,
            sip_auth_username=p.sip_auth_username,
            network_ip=p.network_ip,
            caller_id_number=p.caller_id_number,
        )
        for n, p in enumerate(mix.take(calls))
    ]


def measure_fork(catalog: Any, requests: list[Any], workers: int) -> list[dict[str, float]]:
    from engine.rules.config import RulesConfig
    from engine.rules.decide import DecisionContext, decide

    gc.collect()
    gc.freeze()  # the catalogue goes to the permanent generation: no collection touches it
    children = []
    for _ in range(workers):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: decide, then report memory through the pipe
            os.close(read_fd)
            ctx = DecisionContext(now=datetime.now(UTC), rng=random.Random(1), config=RulesConfig())
            for request in requests:
                decide(request, catalog, ctx)
            gc.collect()  # a full collection, as the engine's GC policy runs periodically
            memory = process_memory(os.getpid())
            memory["private_mb"] = smaps_private_mb(os.getpid())
            os.write(write_fd, json.dumps(memory).encode())
            os._exit(0)
        os.close(write_fd)
        children.append((pid, read_fd))
    results = []
    for pid, read_fd in children:
        with os.fdopen(read_fd) as handle:
            results.append(json.loads(handle.read()))
        os.waitpid(pid, 0)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.memory_candidates", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--accounts", type=int, required=True)
    parser.add_argument("--rates", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    gc.disable()
    started = time.monotonic()
    catalog = load(args.prefix, args.redis)
    gc.enable()
    parent = process_memory(os.getpid())
    print(f"loaded in {time.monotonic() - started:.1f}s: parent RSS {parent.get('rss_mb', 0):.0f} MB")
    requests = requests_for(args.accounts, args.rates, args.calls)
    for n, child in enumerate(measure_fork(catalog, requests, args.workers)):
        print(
            f"forked worker {n} after {args.calls} decisions: RSS {child.get('rss_mb', 0):.0f} MB, "
            f"PSS {child.get('pss_mb', 0):.0f} MB, private {child.get('private_mb', 0):.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
