"""Decision CPU with the packed catalogue against the plain one it replaced, in one process.

    python -m loadtest.decide_bench [--accounts 100000] [--rates 100000] [--calls 20000] [--rounds 5]

Builds one generated dataset twice: as the engine holds it (``Catalog.build``: accounts,
devices and large rate tables packed, entities built on each hit) and as it was held before
issue 19 (:func:`plain_catalog`: dicts of entity objects). Then decides the same random calls
of the load-test mix with each, alternating the two ``--rounds`` times so that the machine's
load falls on both alike (with the engine's garbage-collector policy, ``engine.gcpolicy``), and
prints the median microseconds per decision of each and their ratio. A benchmark, never an
assert; the decisions are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime

import engine.rules.catalog as catalog_module
from engine import gcpolicy
from engine.config import EngineSettings
from engine.model import CallRequest, CatalogData
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from loadtest.dataset import CallMix, Scale, generate

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def plain_catalog(data: CatalogData) -> Catalog:
    """The catalogue as it was before packing: every large table a dict of entity objects."""
    saved = catalog_module.PACK_RATES_FROM
    catalog_module.PACK_RATES_FROM = 10**12  # no rate table is packed
    try:
        catalog = Catalog.build(data)
    finally:
        catalog_module.PACK_RATES_FROM = saved
    catalog.accounts = {a.id: a for a in data.accounts}  # type: ignore[assignment]
    catalog.accounts_by_number = catalog_module._accounts_by_number(data.accounts)
    catalog.sip_devices = {d.id: d for d in data.sip_devices}  # type: ignore[assignment]
    catalog.devices = catalog_module._devices_by_username(data.sip_devices)
    return catalog


def requests_of(scale: Scale, count: int, seed: int) -> list[CallRequest]:
    rng = random.Random(seed)
    return [
        CallRequest(
            uuid=f"call-{n}",
            destination=plan.destination,
            sip_auth_username=plan.sip_auth_username,
            network_ip=plan.network_ip,
            caller_id_number=plan.caller_id_number or str(rng.randrange(10**10, 10**11)),
        )
        for n, plan in enumerate(CallMix(scale, seed=seed).take(count))
    ]


def timed(catalog: Catalog, requests: list[CallRequest]) -> tuple[float, list[object]]:
    """(CPU microseconds per decision, the decisions)."""
    ctx = DecisionContext(now=NOW, rng=random.Random(1), config=RulesConfig())
    started = time.process_time()
    decisions = [decide(request, catalog, ctx) for request in requests]
    return (time.process_time() - started) / len(requests) * 1e6, decisions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.decide_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--rates", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    scale = Scale(accounts=args.accounts, rates=args.rates)
    data = generate(scale)
    packed, plain = Catalog.build(data), plain_catalog(data)
    requests = requests_of(scale, args.calls, seed=7)
    gc.freeze()  # as the engine does after a load: collections do not walk the catalogues
    # and with the engine's collector policy (no automatic full collection): CPython's
    # defaults would walk the recently decoded entities the packed tables keep, a cost the
    # engine does not pay
    gcpolicy.apply(EngineSettings().gc_young_threshold)
    times: dict[str, list[float]] = {"plain": [], "packed": []}
    for _ in range(args.rounds):
        for name, catalog in (("plain", plain), ("packed", packed)):
            micros, decisions = timed(catalog, requests)
            times[name].append(micros)
            if name == "plain":
                expected = decisions
            elif decisions != expected:
                print("the packed catalogue decided differently", file=sys.stderr)
                return 1
    plain_us, packed_us = statistics.median(times["plain"]), statistics.median(times["packed"])
    print(
        f"{args.accounts} accounts, {args.rates} rates, {args.calls} calls x {args.rounds} rounds "
        f"(load average {os.getloadavg()[0]:.1f}): plain {plain_us:.1f} us/decision, "
        f"packed {packed_us:.1f} us/decision, ratio {packed_us / plain_us:.2f}"
    )
    print("  per round: plain " + ", ".join(f"{t:.1f}" for t in times["plain"]))
    print("  per round: packed " + ", ".join(f"{t:.1f}" for t in times["packed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
