"""The packed tables (engine.rules.packed) answer as the dicts they replace, overlay included."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from engine.model import (
    ENTITY_TYPES,
    Account,
    AccountKind,
    CatalogData,
    CliPool,
    OriginationRate,
    RoutingType,
    SipDevice,
    TerminationRate,
)
from engine.rules.catalog import Catalog, longest_prefix
from engine.rules.packed import (
    PackedTable,
    RankedView,
    entity_cache,
    packed_by_id,
    packed_rates,
    recent_limit,
    record_codec,
    set_entity_cache,
)


def account(id: int, number: str, **changes: object) -> Account:
    base = Account(id, number, AccountKind.CUSTOMER, None, True, False, False, Decimal("1.50"), Decimal(0), 7)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_every_entity_type_round_trips_equal() -> None:
    odd = account(
        3,
        "0044",
        kind=AccountKind.RESELLER,
        reseller_id=2,
        balance=Decimal("-1.10"),  # the exponent is kept: "1.10" stays "1.10"
        expiry=datetime(2027, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        first_used=datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        cli_pool=CliPool.REJECT_UNLESS_IN_EITHER,
        codecs="PCMA,PCMU",
        calls_debited=Decimal("1E+2"),
    )
    codec = record_codec(Account)
    back = codec.decode(codec.encode(odd))
    assert back == odd and str(back.balance) == "-1.10" and str(back.calls_debited) == "1E+2"
    assert back.cli_pool is CliPool.REJECT_UNLESS_IN_EITHER and back.kind is AccountKind.RESELLER
    # a raw value, as the codec accepts it (deliberately not a CliPool)
    raw_enum = dataclasses.replace(odd, cli_pool=3)  # type: ignore[arg-type]
    assert codec.decode(codec.encode(raw_enum)).cli_pool is CliPool.NON_CLI_RATES_UNLESS_IN_DIDS
    for cls in ENTITY_TYPES.values():
        record_codec(cls)  # every entity type has a record codec (no field type without one)
    rate = OriginationRate(9, "44", Decimal("0.0100"), 3, None, forced_trunk_ids=(4, 5), description="é")
    assert record_codec(OriginationRate).decode(record_codec(OriginationRate).encode(rate)) == rate


def test_table_by_id_is_a_mapping_with_an_overlay() -> None:
    accounts = [account(i, str(1000 + i)) for i in (5, 1, 3)]
    table = packed_by_id(Account, accounts)
    reference = {a.id: a for a in accounts}
    assert table == reference and len(table) == 3 and list(table) == [1, 3, 5]
    assert table.get(2) is None and 2 not in table
    assert table.get("1") is None  # type: ignore[arg-type]  # a key of the wrong type is absent
    with pytest.raises(KeyError):
        table[2]
    changed = account(3, "1003", balance=Decimal(9))
    table[3] = reference[3] = changed
    table[7] = reference[7] = account(7, "1007")
    assert table.pop(1) == reference.pop(1)
    assert table.pop(1, None) is None
    del table[7], reference[7]
    with pytest.raises(KeyError):
        del table[7]
    assert table == reference and len(table) == 2 and table[3].balance == 9
    table[1] = reference[1] = account(1, "1001")  # back after a delete
    assert table == reference and len(table) == 3


def test_ranked_view_chooses_among_candidates_at_lookup_time() -> None:
    devices = [SipDevice(1, 10, "alice"), SipDevice(2, 11, "alice", active=False), SipDevice(3, 12, "bob")]

    def first_active(candidates: list[SipDevice]) -> SipDevice | None:
        return min(candidates, key=lambda d: (not d.active, d.id))

    table = packed_by_id(SipDevice, devices, {"username": lambda d: d.username})
    view = RankedView(table, "username", first_active)
    assert view["alice"].id == 1 and view.get("carol") is None and "bob" in view
    table[1] = dataclasses.replace(devices[0], active=False)  # now device 2 and 1 are both inactive
    assert view["alice"].id == 1
    del table[1]
    assert view["alice"].id == 2
    table[4] = SipDevice(4, 13, "alice")
    table[3] = dataclasses.replace(devices[2], username="carol")
    assert view["alice"].id == 4 and "bob" not in view and view["carol"].id == 3
    assert dict(view.items()) == {"alice": table[4], "carol": table[3]}


@pytest.mark.parametrize("seed", range(60))
def test_longest_match_equals_the_dict_lookup_after_changes(seed: int) -> None:
    rng = random.Random(seed)
    digits = "0123" if seed % 2 else "0123456789"

    def prefix() -> str:
        return "".join(rng.choice(digits) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 3, 4, 5, 6])))

    def rate(n: int, p: str) -> TerminationRate:
        return TerminationRate(n, 1, p, Decimal(rng.randrange(100)) / 1000)

    reference = {p: rate(n, p) for n, p in enumerate({prefix() for _ in range(rng.randrange(1, 80))})}
    table = packed_rates(TerminationRate, reference)
    for round_ in range(4):
        numbers = [prefix() + prefix() for _ in range(150)]
        for number in numbers:
            for longest in (0, 2, 4, 12):
                expected = longest_prefix(reference, number, longest)
                assert longest_prefix(table, number, longest) == expected, (number, longest)
                assert table.longest_match(number, longest) == expected
        for _ in range(rng.randrange(0, 25)):  # live changes: new, replaced and deleted prefixes
            p = prefix()
            if p in reference and rng.random() < 0.5:
                del reference[p], table[p]
            else:
                reference[p] = table[p] = rate(1000 * (round_ + 1) + rng.randrange(1000), p)
        assert table == reference


def test_mixed_types_in_one_table_are_kept_apart() -> None:
    rates = {"44": OriginationRate(1, "44", Decimal(1), rate_group_id=1)}
    table: PackedTable[str, OriginationRate] = packed_rates(OriginationRate, rates)
    assert table.get(44) is None  # type: ignore[arg-type]  # a key of the wrong type is absent
    assert table.longest_match("4412", 10) == rates["44"] and table.longest_match("4", 10) is None
    assert RoutingType.LCR == "lcr"  # (enums are stored by value)


def test_recent_cache_bound_is_a_quarter_of_the_table_between_the_floor_and_the_setting() -> None:
    assert recent_limit(0, 65536) == 1024  # a small table: the floor
    assert recent_limit(4000, 65536) == 1024
    assert recent_limit(100_000, 65536) == 25_000  # a quarter
    assert recent_limit(100_000, 8192) == 8192  # the setting bounds it
    assert recent_limit(1_000_000, 65536) == 65536
    assert recent_limit(10**9, 65536) == 65536
    assert recent_limit(100_000, 100) == 100  # a setting below the floor wins


def test_tables_of_a_group_share_the_bound_by_size() -> None:
    # 100 rate tables of 10,000 (1M rates): each its part of 16,384, at least 256
    assert recent_limit(10_000, 16_384, 1_000_000) == 256
    assert recent_limit(2_000, 16_384, 100_000) == 327  # 50 trunks of 2,000
    assert recent_limit(500_000, 16_384, 1_000_000) == 8_192  # a large table: its share
    assert recent_limit(100, 16_384, 1_000_000) == 256  # never below the floor ...
    assert recent_limit(1_000_000, 16_384, 1_000_000) == 16_384  # ... nor above the table alone
    assert recent_limit(100_000, 100, 200_000) == 100  # nor above the setting


def cached_counts(tables: Iterable[object]) -> list[int]:
    """How many entities each table's recent cache holds; every table must be packed."""
    counts = []
    for table in tables:
        assert isinstance(table, PackedTable)
        counts.append(table.cached())
    return counts


def test_a_catalogue_shares_one_bound_among_its_origination_tables() -> None:
    rates = [OriginationRate(n, str(n), Decimal(1), rate_group_id=n % 4) for n in range(4000)]
    terminations = [TerminationRate(n, n % 2, str(n), Decimal(1)) for n in range(600)]
    previous = entity_cache()
    set_entity_cache(1000)
    try:
        catalog = Catalog.build(CatalogData(origination_rates=rates, termination_rates=terminations))
        image = pickle.loads(pickle.dumps(catalog, protocol=5))
        for built in (catalog, image):
            for tables, total in ((built.group_rates, 4000), (built.termination_rates, 0)):
                for table in tables.values():
                    assert isinstance(table, PackedTable)
                    for key in table:
                        assert table[key] is not None
                    limit = recent_limit(len(table), 1000, total)
                    assert min(len(table), limit) <= table.cached() <= min(len(table), 2 * limit)
            # 4 tables of 1,000 share 1,000: 256 each (the floor), two generations at most;
            # termination tables are sized alone: all of their 300
            assert 4 * 256 < sum(cached_counts(built.group_rates.values())) <= 4 * 2 * 256
            assert sum(cached_counts(built.termination_rates.values())) == 600
    finally:
        set_entity_cache(previous)


def test_a_table_caches_at_most_two_generations_of_its_bound() -> None:
    previous = entity_cache()
    set_entity_cache(16)
    try:
        table = packed_by_id(Account, (account(n, f"n{n}") for n in range(1, 201)))
        for n in range(1, 201):
            assert table[n] == account(n, f"n{n}")
            assert table.cached() <= 2 * 16
        assert table.cached() > 16  # both generations in use
        table.reset_cache()
        assert table.cached() == 0 and table[7] == account(7, "n7")
    finally:
        set_entity_cache(previous)
    with pytest.raises(ValueError):
        set_entity_cache(0)
