"""Decision CPU with the packed catalogue against the plain one it replaced, in one process.

    python -m loadtest.decide_bench [--accounts 100000] [--rates 100000] [--calls 20000] [--rounds 5]
        [--entity-cache 8192,65536]

Builds one generated dataset twice: as the engine holds it (``Catalog.build``: accounts,
devices and large rate tables packed, entities built on each hit) and as it was held before
issue 19 (:func:`plain_catalog`: dicts of entity objects). Then decides the same random calls
of the load-test mix with each, alternating the two ``--rounds`` times so that the machine's
load falls on both alike (with the engine's garbage-collector policy, ``engine.gcpolicy``), and
prints the median microseconds per decision of each and their ratio. ``--entity-cache``: one
packed catalogue per bound of the recent-entity caches (``engine.entity_cache``), all in the
same alternation, with how many entities their caches hold at the end. A benchmark, never an
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
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import engine.rules.catalog as catalog_module
from engine import gcpolicy
from engine.config import EngineSettings
from engine.decision import Decision
from engine.model import CallRequest, CatalogData
from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import DecisionContext, decide
from engine.rules.packed import ENTITY_CACHE_DEFAULT, PackedTable, set_entity_cache
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


def cached_entities(catalog: Catalog) -> int:
    """Built entities held by the recent caches of every packed table of ``catalog``."""
    tables: list[object] = [catalog.accounts, catalog.sip_devices]
    for group in (catalog.group_rates, catalog.personal_rates, catalog.termination_rates):
        tables.extend(group.values())
    return sum(t.cached() for t in tables if isinstance(t, PackedTable))


def cache_bytes(catalog: Catalog, requests: list[CallRequest]) -> tuple[int, float]:
    """(entities cached, bytes per cached entity): the packed caches emptied, one pass of
    ``requests`` decided under ``tracemalloc``, the memory still allocated after it divided
    by the entities the caches then hold (a cached entity's object, its share of the cache
    dicts, and the values not shared with other entities)."""
    tables: list[PackedTable[Any, Any]] = [catalog.accounts, catalog.sip_devices]
    for group in (catalog.group_rates, catalog.personal_rates, catalog.termination_rates):
        tables.extend(t for t in group.values() if isinstance(t, PackedTable))
    for table in tables:
        table.reset_cache()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    timed(catalog, requests)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    held = cached_entities(catalog)
    return held, grown / max(1, held)


def timed(catalog: Catalog, requests: list[CallRequest]) -> tuple[float, list[Decision]]:
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
    parser.add_argument(
        "--entity-cache",
        default=str(ENTITY_CACHE_DEFAULT),
        help="comma-separated bounds of the recent-entity caches (engine.entity_cache): one "
        "packed catalogue each",
    )
    args = parser.parse_args(argv)
    bounds = [int(text) for text in args.entity_cache.split(",")]
    scale = Scale(accounts=args.accounts, rates=args.rates)
    data = generate(scale)
    catalogs: dict[str, Catalog] = {"plain": plain_catalog(data)}
    for bound in bounds:
        set_entity_cache(bound)
        catalogs[f"packed {bound}"] = Catalog.build(data)
    set_entity_cache(ENTITY_CACHE_DEFAULT)
    requests = requests_of(scale, args.calls, seed=7)
    gc.freeze()  # as the engine does after a load: collections do not walk the catalogues
    # and with the engine's collector policy (no automatic full collection): CPython's
    # defaults would walk the recently decoded entities the packed tables keep, a cost the
    # engine does not pay
    gcpolicy.apply(EngineSettings().gc_young_threshold)
    times: dict[str, list[float]] = {name: [] for name in catalogs}
    for _ in range(args.rounds):
        for name, catalog in catalogs.items():
            micros, decisions = timed(catalog, requests)
            times[name].append(micros)
            if name == "plain":
                expected = decisions
            elif decisions != expected:
                print(f"the {name} catalogue decided differently", file=sys.stderr)
                return 1
    plain_us = statistics.median(times["plain"])
    print(
        f"{args.accounts} accounts, {args.rates} rates, {args.calls} calls x {args.rounds} rounds "
        f"(load average {os.getloadavg()[0]:.1f}): plain {plain_us:.1f} us/decision"
    )
    for name, catalog in catalogs.items():
        if name != "plain":
            median = statistics.median(times[name])
            print(
                f"  {name}: {median:.1f} us/decision, ratio {median / plain_us:.2f}, "
                f"{cached_entities(catalog)} entities cached"
            )
    for name, values in times.items():
        print(f"  per round: {name} " + ", ".join(f"{t:.1f}" for t in values))
    held, per_entity = cache_bytes(catalogs[f"packed {max(bounds)}"], requests)
    print(f"  memory of the caches (bound {max(bounds)}): {held} entities, {per_entity:.0f} bytes each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
