"""Catalog.apply_changes (live sync, in the engine): in place, it must index exactly as a fresh build.

Random catalogues with many collisions (shared account numbers, SIP usernames, IP
networks, DID numbers, rate prefixes), random batches of inserts, updates and
deletes of every entity type: the catalogue updated in place must equal
``Catalog.build`` of the changed data, index by index.
"""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal
from typing import Any

import pytest

import engine.rules.catalog as catalog_module
from engine.model import (
    ENTITY_TYPES,
    Account,
    AccountKind,
    BlockedCode,
    CallerId,
    CatalogData,
    Did,
    ForcedCallerId,
    Gateway,
    IpMapEntry,
    Localization,
    OriginationRate,
    RateGroup,
    SipDevice,
    SpeedDial,
    TerminationRate,
    Trunk,
)
from engine.rules.catalog import Catalog
from engine.state.snapshot import entity_key

ACCOUNTS = range(1, 9)
GROUPS = range(1, 4)
TRUNKS = range(1, 4)
GATEWAYS = range(1, 5)
PREFIXES = ["", "4", "44", "442", "4420", "33", "331", "1"]


def _account(rng: random.Random, i: int) -> Account:
    return Account(
        id=i,
        number=rng.choice(["100", "101", "102", f"10{i}"]),
        kind=AccountKind.CUSTOMER,
        reseller_id=None,
        active=rng.random() < 0.8,
        deleted=rng.random() < 0.3,
        postpaid=False,
        balance=Decimal(rng.randint(0, 9)),
        credit_limit=Decimal(0),
        rate_group_id=rng.choice([None, *GROUPS]),
    )


def _gen(name: str, rng: random.Random, i: int) -> Any:
    """A random entity of type ``name`` with id / natural key drawn from small ranges."""
    account = rng.choice(ACCOUNTS)
    if name == "accounts":
        return _account(rng, i)
    if name == "sip_devices":
        return SipDevice(i, account, rng.choice(["alice", "bob", "carol", f"u{i}"]), rng.random() < 0.7)
    if name == "ip_map":
        cidr = rng.choice(["10.0.0.0/24", "10.0.0.7", "10.0.0.0/16", "2001:db8::/32", "bad", "10.0.1.0/24"])
        return IpMapEntry(i, account, cidr, rng.choice(["", "55", "5"]), rng.random() < 0.8)
    if name == "caller_ids":
        return CallerId(i, account, rng.choice(["441", "+441", "442", "", " 443 "]), rng.random() < 0.8)
    if name == "forced_caller_ids":
        return ForcedCallerId(i, rng.choice(["1", "2", ""]), rng.choice(["", "x"]), rng.random() < 0.8)
    if name == "dids":
        return Did(
            i,
            rng.choice(["5551", "5552", " 5551", f"55{i}"]),
            rng.choice([None, account]),
            rng.random() < 0.8,
        )
    if name == "speed_dials":
        return SpeedDial(account, str(i % 4), rng.choice(["", "123", "124"]))
    if name == "blocked_codes":
        return BlockedCode(account, rng.choice(["44", "4", "449", "1", "12"]))
    if name == "localizations":
        return Localization(
            i, f"l{i}", rng.random() < 0.7, number_originate=rng.choice(["", "00/", "bad rule"])
        )
    if name == "rate_groups":
        return RateGroup(i, f"g{i}", rng.random() < 0.8, trunk_ids=tuple(rng.sample(list(TRUNKS), 2)))
    if name == "gateways":
        return Gateway(i, rng.choice(["gw-a", "gw-b", f"gw{i}"]), rng.random() < 0.7)
    if name == "trunks":
        gateways = rng.sample(list(GATEWAYS), 3)
        return Trunk(i, f"t{i}", 1, gateways[0], tuple(gateways[1:]), rng.random() < 0.8)
    if name == "origination_rates":
        personal = rng.random() < 0.3
        return OriginationRate(
            i,
            rng.choice(PREFIXES),
            Decimal(rng.randint(1, 5)) / 100,
            rate_group_id=None if personal else rng.choice(GROUPS),
            account_id=account if personal else None,
            precedence=rng.randint(0, 2),
            active=rng.random() < 0.8,
        )
    if name == "termination_rates":
        return TerminationRate(i, rng.choice(TRUNKS), rng.choice(PREFIXES), Decimal(rng.randint(1, 5)) / 100)
    raise AssertionError(name)


def _unique(name: str, rows: dict[str, Any]) -> bool:
    """The database's one-rate-per-slot rule (the only uniqueness the incremental index relies on)."""
    slots: list[tuple[object, ...]]
    if name == "origination_rates":
        slots = [(r.rate_group_id, r.account_id, r.prefix) for r in rows.values()]
    elif name == "termination_rates":
        slots = [(r.trunk_id, r.prefix) for r in rows.values()]
    else:
        return True
    return len(slots) == len(set(slots))


def random_catalog(rng: random.Random, size: int) -> dict[str, dict[str, Any]]:
    tables: dict[str, dict[str, Any]] = {}
    for name in ENTITY_TYPES:
        rows: dict[str, Any] = {}
        ids = ACCOUNTS if name == "accounts" else GATEWAYS if name == "gateways" else range(1, size)
        for i in ids:
            obj = _gen(name, rng, i)
            rows[entity_key(obj)] = obj
            if not _unique(name, rows):
                del rows[entity_key(obj)]
        tables[name] = rows
    return tables


def as_data(tables: dict[str, dict[str, Any]]) -> CatalogData:
    data = CatalogData(version=7)
    for name, rows in tables.items():
        setattr(data, name, list(rows.values()))
    return data


def mutate(
    rng: random.Random, tables: dict[str, dict[str, Any]], size: int, intensity: float
) -> tuple[dict[str, dict[str, Any]], list[Any], list[tuple[str, str]], dict[tuple[str, str], Any]]:
    after = {name: dict(rows) for name, rows in tables.items()}
    upserts: list[Any] = []
    deletes: list[tuple[str, str]] = []
    for name, rows in after.items():
        if rng.random() > intensity * 2:
            continue
        for _ in range(rng.randint(1, 4)):
            if rows and rng.random() < 0.35:
                key = rng.choice(sorted(rows))
                if name == "accounts":  # accounts stay (children point at them); soft delete instead
                    rows[key] = dataclasses.replace(rows[key], deleted=True)
                else:
                    del rows[key]
                continue
            limit = 8 if name == "accounts" else 4 if name == "gateways" else size + 3
            obj = _gen(name, rng, rng.randint(1, limit))
            if name == "accounts" and obj.id not in ACCOUNTS:
                continue
            key = entity_key(obj)
            previous = rows.get(key)
            rows[key] = obj
            if not _unique(name, rows):
                if previous is None:
                    del rows[key]
                else:
                    rows[key] = previous
    for name, rows in after.items():
        old = tables[name]
        for key in old.keys() - rows.keys():
            deletes.append((name, key))
        for key, obj in rows.items():
            if old.get(key) != obj:
                upserts.append(obj)
    before = {
        (name, key): tables[name].get(key)
        for name in ("origination_rates", "termination_rates")
        for key in {entity_key(o) for o in upserts if type(o) is ENTITY_TYPES[name]}
        | {k for n, k in deletes if n == name}
    }
    return after, upserts, deletes, before


INDEXES = [
    "accounts",
    "accounts_by_number",
    "devices",
    "rate_groups",
    "group_rates",
    "personal_rates",
    "trunks",
    "gateways",
    "trunk_gateways",
    "termination_rates",
    "dids",
    "dids_by_id",
    "account_dids",
    "account_caller_ids",
    "forced_caller_ids",
    "speed_dials",
    "blocked_codes",
    "localizations",
    "_ip_buckets",
]


def assert_same_indexes(updated: Catalog, built: Catalog) -> None:
    for name in INDEXES:
        assert getattr(updated, name) == getattr(built, name), name
    # the longest-prefix bounds only grow (a longer bound only costs a few dict lookups)
    assert updated.longest_origination_prefix >= built.longest_origination_prefix
    assert updated.longest_termination_prefix >= built.longest_termination_prefix
    assert updated.longest_blocked_prefix >= built.longest_blocked_prefix


@pytest.mark.parametrize("seed", range(300))
def test_apply_changes_equals_a_fresh_build(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Half of the seeds pack every rate table (the live changes then go to the packed
    # tables' overlays), half keep the small tables as dicts, as production does.
    monkeypatch.setattr(catalog_module, "PACK_RATES_FROM", 1 if seed % 2 else 32)
    rng = random.Random(seed)
    size = rng.choice([4, 8, 16])
    tables = random_catalog(rng, size)
    catalog = Catalog.build(as_data(tables))
    catalog.track_changes(as_data(tables))
    for _round in range(5):  # several batches in a row on the same catalogue
        after, upserts, deletes, before = mutate(rng, tables, size, intensity=rng.choice([0.1, 0.3, 1.0]))
        catalog.apply_changes(upserts, deletes, before)
        assert_same_indexes(catalog, Catalog.build(as_data(after)))
        tables = after


def test_rates_may_swap_slots_in_one_batch() -> None:
    a = OriginationRate(1, "44", Decimal("0.01"), rate_group_id=1)
    b = OriginationRate(2, "33", Decimal("0.02"), rate_group_id=1)
    data = CatalogData(origination_rates=[a, b])
    catalog = Catalog.build(data)
    catalog.track_changes(data)
    a2, b2 = dataclasses.replace(a, prefix="33"), dataclasses.replace(b, prefix="44")
    before = {("origination_rates", "1"): a, ("origination_rates", "2"): b}
    catalog.apply_changes([a2, b2], [], before)
    assert catalog.group_rates == {1: {"33": a2, "44": b2}}


def test_a_stale_before_image_never_removes_another_rate() -> None:
    """The engine may hold a rate newer than the change's before-image (read while changing)."""
    newer = OriginationRate(1, "44", Decimal("0.03"), rate_group_id=1)
    data = CatalogData(origination_rates=[newer])
    catalog = Catalog.build(data)
    catalog.track_changes(data)
    stale = dataclasses.replace(newer, prefix="33", cost_per_minute=Decimal("0.01"))
    catalog.apply_changes([newer], [], {("origination_rates", "1"): stale})
    assert catalog.group_rates == {1: {"44": newer}}


def test_bad_input_changes_nothing() -> None:
    account = Account(1, "100", AccountKind.CUSTOMER, None, True, False, False, Decimal(1), Decimal(0), None)
    rate = OriginationRate(5, "44", Decimal("0.01"), rate_group_id=1)
    data = CatalogData(accounts=[account], origination_rates=[rate])
    catalog = Catalog.build(data)
    with pytest.raises(RuntimeError, match="track_changes"):
        catalog.apply_changes([], [("accounts", "1")])
    catalog.track_changes(data)
    emptied = dataclasses.replace(account, balance=Decimal(0))
    cases: list[tuple[list[Any], list[tuple[str, str]], dict[tuple[str, str], Any]]] = [
        ([emptied, dataclasses.replace(rate, cost_per_minute=Decimal(1))], [], {}),  # no before-image
        ([emptied], [("nope", "1")], {}),
        ([emptied], [("accounts", "1")], {}),  # both
        ([emptied], [("accounts", "x")], {}),
        ([emptied, "not an entity"], [], {}),
        ([emptied], [("origination_rates", "5")], {("origination_rates", "5"): account}),
    ]
    for upserts, deletes, before in cases:
        with pytest.raises(ValueError):
            catalog.apply_changes(upserts, deletes, before)
        assert catalog.accounts[1] == account and catalog.group_rates == {1: {"44": rate}}


def test_soft_deleted_account_leaves_the_ip_map_and_its_number() -> None:
    owner = Account(1, "100", AccountKind.CUSTOMER, None, True, False, False, Decimal(1), Decimal(0), None)
    reuser = dataclasses.replace(owner, id=2, deleted=True)
    entry = IpMapEntry(1, 1, "10.0.0.0/24")
    data = CatalogData(accounts=[owner, reuser], ip_map=[entry])
    catalog = Catalog.build(data)
    catalog.track_changes(data)
    assert catalog.ip_map_match(__import__("ipaddress").ip_address("10.0.0.9"), "44") is not None
    deleted = dataclasses.replace(owner, deleted=True)
    catalog.apply_changes([deleted], [])
    assert catalog.ip_map_match(__import__("ipaddress").ip_address("10.0.0.9"), "44") is None
    assert catalog.accounts_by_number["100"] == deleted  # (deleted, id) ranks: the lower id wins
    assert catalog._ip_buckets == {4: (), 6: ()}
