"""Measure representations the catalogue could take (issue 19), on a published dataset.

    python -m loadtest.memory_candidates --prefix cgscale100k: --accounts 100000 --rates 100000 [--workers 2]

* ``fork``: load the catalogue once in a parent as the engine does, ``gc.freeze()``, fork
  ``--workers`` children that each decide ``--calls`` random calls of the load-test mix
  (reading objects writes their reference counts: copy-on-write copies those pages), and
  report each child's RSS, PSS and private memory (``smaps_rollup``).
* ``packed``: the origination rate tables as they are (prefix -> ``OriginationRate``)
  against prefix -> ``struct``-packed record (Decimals as indexes into a shared table,
  built back into an ``OriginationRate`` on a hit): bytes per rate, and the time of the
  lookup pattern of ``find_rate`` (longest prefix first) both ways.

Benchmarks, never asserts. The catalogue in use is not changed by this module.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import struct
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from loadtest.memory import process_memory


def smaps_private_mb(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def deep_size(root: Any, seen: set[int]) -> int:
    """Bytes of ``root``'s object graph (objects in ``seen`` are not counted again)."""
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, bool):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            stack.extend(obj)
        else:
            for cls in type(obj).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    stack.append(getattr(obj, name, None))
    return total


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


# id, cost index, connect index, included, init_inc, inc, precedence, active
_PACKED = struct.Struct("<qIIiiiiB")


def measure_packed(catalog: Any, requests: list[Any]) -> dict[str, float]:
    from engine.model import OriginationRate

    decimals: dict[Decimal, int] = {}
    table_of: list[Decimal] = []

    def index(value: Decimal) -> int:
        if value not in decimals:
            decimals[value] = len(table_of)
            table_of.append(value)
        return decimals[value]

    packed_groups: dict[int, dict[str, bytes]] = {}
    for group_id, table in catalog.group_rates.items():
        packed_groups[group_id] = {
            prefix: _PACKED.pack(
                r.id,
                index(r.cost_per_minute),
                index(r.connect_cost),
                r.included_seconds,
                r.init_inc,
                r.inc,
                r.precedence,
                r.active,
            )
            for prefix, r in table.items()
        }
    rates = sum(len(t) for t in catalog.group_rates.values())
    shared: set[int] = set()
    for table in catalog.group_rates.values():  # prefixes and Decimals are shared either way
        shared.update(id(p) for p in table)
    shared.update(id(d) for d in table_of)
    objects = deep_size(catalog.group_rates, set(shared))
    packed = deep_size(packed_groups, set(shared))

    def unpack(group_id: int, prefix: str, raw: bytes) -> OriginationRate:
        rid, cost, connect, included, init_inc, inc, precedence, active = _PACKED.unpack(raw)
        return OriginationRate(
            rid,
            prefix,
            table_of[cost],
            rate_group_id=group_id,
            connect_cost=table_of[connect],
            included_seconds=included,
            init_inc=init_inc,
            inc=inc,
            precedence=precedence,
            active=bool(active),
        )

    longest = catalog.longest_origination_prefix
    lookups = []
    for request in requests:
        device = catalog.devices.get(request.sip_auth_username)
        account = catalog.accounts.get(device.account_id) if device else None
        if account is not None and account.rate_group_id is not None:
            lookups.append((account.rate_group_id, request.destination))

    def with_objects() -> int:
        found = 0
        for group_id, destination in lookups:
            table = catalog.group_rates.get(group_id, {})
            for n in range(min(len(destination), longest), -1, -1):
                if table.get(destination[:n]) is not None:
                    found += 1
                    break
        return found

    def with_packed() -> int:
        found = 0
        for group_id, destination in lookups:
            table = packed_groups.get(group_id, {})
            for n in range(min(len(destination), longest), -1, -1):
                prefix = destination[:n]
                raw = table.get(prefix)
                if raw is not None:
                    unpack(group_id, prefix, raw)
                    found += 1
                    break
        return found

    timings = {}
    for name, fn in (("objects", with_objects), ("packed", with_packed)):
        started = time.perf_counter()
        for _ in range(5):
            fn()
        timings[name] = (time.perf_counter() - started) / (5 * max(1, len(lookups))) * 1e6
    return {
        "rates": rates,
        "objects_bytes_per_rate": objects / rates,
        "packed_bytes_per_rate": packed / rates,
        "find_rate_us_objects": timings["objects"],
        "find_rate_us_packed": timings["packed"],
    }


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
    packed = measure_packed(catalog, requests)
    print(
        f"packed rates: {packed['objects_bytes_per_rate']:.0f} -> {packed['packed_bytes_per_rate']:.0f} "
        f"bytes per rate; find_rate pattern {packed['find_rate_us_objects']:.2f} -> "
        f"{packed['find_rate_us_packed']:.2f} us"
    )
    for n, child in enumerate(measure_fork(catalog, requests, args.workers)):
        print(
            f"forked worker {n} after {args.calls} decisions: RSS {child.get('rss_mb', 0):.0f} MB, "
            f"PSS {child.get('pss_mb', 0):.0f} MB, private {child.get('private_mb', 0):.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
