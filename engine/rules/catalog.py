"""One snapshot, indexed for the hot path.

``Catalog.build`` turns the loader's plain entity lists into the lookups a call
decision needs, once per snapshot; after that the catalog is only read. Inactive
rates and IP-map entries are left out of the indexes (they can never match);
entities whose state the explanation must name (devices, accounts, rate groups,
trunks, gateways) are kept whatever their status and checked at decision time.

Number handling (§1, §4) gets its indexes here too: DIDs by number, each account's
active DIDs and whitelisted caller IDs (the CLI pool's lists, in id order so a
random pick is reproducible), forced caller IDs, speed dials (keys with a number
only), blocked codes, and the active localizations with their rule sets parsed
once (a set that does not parse is left out and listed in ``problems``).

Longest-prefix tables are ``dict[prefix, row]``: a lookup tries ``number[:n]``
from the longest useful ``n`` down to 0, so its cost grows with the length of the
number, not with the number of rates.

(Why one module of about 900 lines: every index here is built in one pass by
``Catalog.build`` and updated in place by the same live-sync code, and the indexes
reference each other (an account's DIDs, its devices, its rate group's trunks). Split
by entity, each part would need the others' private structures.)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import marshal
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Generic, TypeVar, cast

from engine.model import (
    ENTITY_KEY_FIELDS,
    ENTITY_TYPES,
    Account,
    BlockedCode,
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
    entity_key_of,
)
from engine.rules.localization import CompiledLocalization, compile_localization
from engine.rules.packed import (
    PackedTable,
    RankedView,
    entity_of,
    packed_by_id,
    packed_rates,
    packed_records_by_id,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Row = TypeVar("Row")


@dataclass(frozen=True, slots=True)
class IpMapMatch:
    """An active IP-map entry of a usable account, with its CIDR compiled."""

    entry: IpMapEntry
    # The network as ipaddress writes it ("203.0.113.0/24"), for the explanation only: an
    # ipaddress object per entry (with, for a /32, a closure of its own) was ~1 KB at 99k entries.
    network: str
    tech_prefix: str


@dataclass(frozen=True, slots=True)
class NumberPool:
    """An account's active DIDs or whitelisted caller IDs, for the CLI pool (§4.4)."""

    numbers: tuple[str, ...]  # as stored, in id order: the candidates a random pick chooses from
    compare: frozenset[str]  # the same numbers without a leading "+", for membership

    def __contains__(self, caller_id: str) -> bool:
        return caller_id.lstrip("+") in self.compare


EMPTY_POOL = NumberPool((), frozenset())


@dataclass(frozen=True, slots=True)
class IpCell:
    """The usable entries of one network (IP version, netmask length, masked address):
    (entry id, tech prefix stripped) pairs, longest tech prefix first, then lowest id."""

    matches: tuple[tuple[int, str], ...]


# One bucket per (IP version, netmask length): the masked address -> its cell. An IPv4 bucket
# of PACK_RATES_FROM cells or more is a PackedTable (IPv6 addresses do not fit its int keys).
_IpBucket = MutableMapping[int, IpCell]
_IpBuckets = tuple[tuple[int, int, _IpBucket], ...]


def parse_ip(text: str) -> IpAddress | None:
    """A source address as FreeSWITCH reports it; IPv4-mapped IPv6 becomes IPv4."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def longest_prefix(table: Mapping[str, Row], number: str, longest: int) -> Row | None:
    """The row of the longest prefix of ``number`` (at most ``longest`` long) in ``table``."""
    if type(table) is PackedTable:
        return cast(PackedTable[str, Row], table).longest_match(number, longest)
    for n in range(min(len(number), longest), -1, -1):
        row = table.get(number[:n])
        if row is not None:
            return row
    return None


class Catalog:
    """Read-only indexes over one snapshot. Build with ``Catalog.build(data)``."""

    __slots__ = (
        "_changes",
        "_ip_buckets",
        "account_caller_ids",
        "account_dids",
        "accounts",
        "accounts_by_number",
        "blocked_codes",
        "devices",
        "dids",
        "dids_by_id",
        "forced_caller_ids",
        "gateways",
        "group_rates",
        "ip_entries",
        "localizations",
        "longest_blocked_prefix",
        "longest_origination_prefix",
        "longest_termination_prefix",
        "personal_rates",
        "problems",
        "rate_groups",
        "sip_devices",
        "speed_dials",
        "termination_rates",
        "trunk_gateways",
        "trunks",
        "version",
    )

    def __init__(self) -> None:
        self.version = 0
        # The large tables are packed (engine.rules.packed): an entity is built on each hit.
        self.accounts: PackedTable[int, Account] = packed_by_id(Account, ())
        self.accounts_by_number: Mapping[str, Account] = {}
        self.sip_devices: PackedTable[int, SipDevice] = packed_by_id(SipDevice, ())
        self.devices: Mapping[str, SipDevice] = {}  # by username
        self.rate_groups: dict[int, RateGroup] = {}
        # prefix -> rate; a table of PACK_RATES_FROM rates or more is a PackedTable
        self.group_rates: dict[int, RateTable[OriginationRate]] = {}
        self.personal_rates: dict[int, RateTable[OriginationRate]] = {}
        self.trunks: dict[int, Trunk] = {}
        self.gateways: dict[int, Gateway] = {}
        self.trunk_gateways: dict[int, tuple[str, ...]] = {}  # active gateway names, primary then failovers
        self.termination_rates: dict[int, RateTable[TerminationRate]] = {}
        self.longest_origination_prefix = 0
        self.longest_termination_prefix = 0
        # §1 and §4 (number handling):
        self.dids: dict[str, Did] = {}  # by number, whatever its state (unassigned/inactive are refused)
        self.dids_by_id: dict[int, Did] = {}  # for the engine's per-DID limits (Accept.did_id)
        self.account_dids: dict[int, NumberPool] = {}  # an account's active DIDs
        self.account_caller_ids: dict[int, NumberPool] = {}  # its active whitelisted caller IDs
        self.forced_caller_ids: dict[int, ForcedCallerId] = {}  # active only
        self.speed_dials: dict[int, dict[str, str]] = {}  # account -> key -> number (non-empty only)
        self.blocked_codes: dict[int, dict[str, BlockedCode]] = {}  # account -> prefix -> row
        self.longest_blocked_prefix = 0
        self.localizations: dict[int, CompiledLocalization] = {}  # active only, rule sets parsed
        self.problems: tuple[str, ...] = ()  # data the build had to ignore, for the loader's log
        # Every IP-map entry by id, active or not (packed: 99k entries as objects, with the
        # reverse links the live changes need, were ~80 MB per process at 1M/1M), indexed by
        # account and by network cell for the live changes.
        self.ip_entries: PackedTable[int, IpMapEntry] = _packed_ip_entries(())
        self._ip_buckets: dict[int, _IpBuckets] = {4: (), 6: ()}
        self._changes: _ChangeIndex | None = None  # set by track_changes (live sync)

    @classmethod
    def build(cls, data: CatalogData) -> Catalog:
        catalog = cls()
        problems: list[str] = []
        catalog.version = data.version
        records = data.records
        catalog.accounts = _packed_by_id(
            Account, data.accounts, records.get("accounts"), {"number": _number_of}
        )
        catalog.accounts_by_number = RankedView(catalog.accounts, "number", _owner_of_number)
        catalog.sip_devices = _packed_by_id(
            SipDevice, data.sip_devices, records.get("sip_devices"), {"username": _username_of}
        )
        catalog.devices = RankedView(catalog.sip_devices, "username", _device_of_username)
        catalog.rate_groups = {group.id: group for group in data.rate_groups}
        catalog.trunks = {trunk.id: trunk for trunk in data.trunks}
        catalog.gateways = {gateway.id: gateway for gateway in data.gateways}
        catalog.trunk_gateways = {trunk.id: catalog._active_gateways(trunk) for trunk in data.trunks}
        catalog._index_origination_rates(data.origination_rates, problems)
        if "origination_rates" in records:
            catalog._index_origination_records(records["origination_rates"], problems)
        catalog._index_termination_rates(data.termination_rates)
        if "termination_rates" in records:
            catalog._index_termination_records(records["termination_rates"])
        catalog._index_ip_map(data.ip_map, problems)
        catalog._index_numbers(data, problems)
        catalog.problems = tuple(problems)
        # The origination tables share one recent-cache bound (engine.rules.packed.recent_limit):
        # sized alone, 100 rate groups of 10,000 could hold 500,000 built rates at 1M/1M, for one
        # lookup per call. The termination tables keep theirs: a call looks up every trunk of its
        # routing, and their misses cost more decision CPU than their bound costs memory
        # (docs/performance.md, "Private memory, traffic and the first load").
        packed = [
            t
            for tables in (catalog.group_rates, catalog.personal_rates)
            for t in tables.values()
            if isinstance(t, PackedTable)
        ]
        total = sum(len(t) for t in packed)
        for table in packed:
            table.share_cache(total)
        return catalog

    # -- lookups ---------------------------------------------------------------

    def ip_map_match(self, address: IpAddress, destination: str) -> IpMapMatch | None:
        """The entry whose CIDR holds ``address`` and whose tech prefix starts the
        destination: longest tech prefix first, then the narrowest network, then
        the lowest entry id."""
        best: tuple[int, str, int, int] | None = None  # entry id, tech prefix, netmask length, mask
        value = int(address)
        for prefixlen, mask, table in self._ip_buckets[address.version]:
            cell = table.get(value & mask)
            if cell is None:
                continue
            for entry_id, tech_prefix in cell.matches:  # longest tech prefix first
                if best is not None and len(tech_prefix) <= len(best[1]):
                    break
                if destination.startswith(tech_prefix):
                    best = (entry_id, tech_prefix, prefixlen, mask)
                    break
        if best is None:
            return None
        entry_id, tech_prefix, prefixlen, mask = best
        network = _NETWORKS[address.version]((value & mask, prefixlen))
        return IpMapMatch(self.ip_entries[entry_id], str(network), tech_prefix)

    # -- building --------------------------------------------------------------

    def _active_gateways(self, trunk: Trunk) -> tuple[str, ...]:
        names: list[str] = []
        for gateway_id in (trunk.gateway_id, *trunk.failover_gateway_ids):
            gateway = self.gateways.get(gateway_id)
            if gateway is not None and gateway.active and gateway.name not in names:
                names.append(gateway.name)
        return tuple(names)

    def _index_numbers(self, data: CatalogData, problems: list[str]) -> None:
        self.dids = _dids_by_number(data.dids, problems)
        self.dids_by_id = {did.id: did for did in data.dids}
        self.account_dids = _pools(
            (did.id, did.account_id, did.number)
            for did in data.dids
            if did.active and did.account_id is not None and did.number.strip()
        )
        self.account_caller_ids = _pools(
            (caller.id, caller.account_id, caller.number)
            for caller in data.caller_ids
            if caller.active and caller.number.strip()
        )
        self.forced_caller_ids = _forced_caller_ids(data.forced_caller_ids)
        self.speed_dials = _speed_dials(data.speed_dials)
        self.blocked_codes, self.longest_blocked_prefix = _blocked_codes(data.blocked_codes, problems)
        self.localizations = _localizations(data.localizations, problems)

    def _index_origination_rates(self, rates: Iterable[OriginationRate], problems: list[str]) -> None:
        longest = 0
        personal: dict[int, dict[str, OriginationRate]] = {}
        group: dict[int, dict[str, OriginationRate]] = {}
        for rate in rates:
            if not rate.active:
                continue
            prefix = rate.prefix.strip()
            if rate.account_id is not None:
                table = personal.setdefault(rate.account_id, {})
            elif rate.rate_group_id is not None:
                table = group.setdefault(rate.rate_group_id, {})
            else:
                problems.append(f"origination rate {rate.id}: neither rate group nor account")
                continue
            current = table.get(prefix)
            # Two rows for one prefix: the dearer wins (the spec's tie rule), then precedence, then id.
            if current is None or _origination_rank(rate) < _origination_rank(current):
                table[prefix] = rate
            longest = max(longest, len(prefix))
        self.personal_rates = _packed_tables(OriginationRate, personal)
        self.group_rates = _packed_tables(OriginationRate, group)
        self.longest_origination_prefix = longest

    def _index_termination_rates(self, rates: Iterable[TerminationRate]) -> None:
        longest = 0
        by_trunk: dict[int, dict[str, TerminationRate]] = {}
        for rate in rates:
            if not rate.active:
                continue
            prefix = rate.prefix.strip()
            table = by_trunk.setdefault(rate.trunk_id, {})
            current = table.get(prefix)
            # Two rows for one prefix on one trunk: the cheaper wins, as LCR would pick it.
            if current is None or _termination_rank(rate) < _termination_rank(current):
                table[prefix] = rate
            longest = max(longest, len(prefix))
        self.termination_rates = _packed_tables(TerminationRate, by_trunk)
        self.longest_termination_prefix = longest

    # The same two, from record tuples (CatalogData.records, in the order read, a row read
    # twice comes twice): the same choices, read by position, each record packed as it comes.

    def _index_origination_records(self, records: Iterable[tuple[Any, ...]], problems: list[str]) -> None:
        at = _positions(OriginationRate)
        active, prefix_at, account_at, group_at, id_at = (
            at["active"],
            at["prefix"],
            at["account_id"],
            at["rate_group_id"],
            at["id"],
        )
        rank = _record_rank(OriginationRate, -1)
        dumps, longest = marshal.dumps, 0
        personal: dict[int, dict[str, bytes]] = {}
        group: dict[int, dict[str, bytes]] = {}
        orphans: dict[int, str] = {}  # the problems, listed in id order as the entity build lists them
        for record in records:
            if not record[active]:
                continue
            prefix = record[prefix_at].strip()
            if record[account_at] is not None:
                table = personal.setdefault(record[account_at], {})
            elif record[group_at] is not None:
                table = group.setdefault(record[group_at], {})
            else:
                orphans[record[id_at]] = f"origination rate {record[id_at]}: neither rate group nor account"
                continue
            current = table.get(prefix)
            if current is None or rank(record) < rank(marshal.loads(current)):
                table[prefix] = dumps(record)
            longest = max(longest, len(prefix))
        problems.extend(orphans[row_id] for row_id in sorted(orphans))
        self.personal_rates = _packed_record_tables(OriginationRate, personal)
        self.group_rates = _packed_record_tables(OriginationRate, group)
        self.longest_origination_prefix = longest

    def _index_termination_records(self, records: Iterable[tuple[Any, ...]]) -> None:
        at = _positions(TerminationRate)
        active, prefix_at, trunk_at = at["active"], at["prefix"], at["trunk_id"]
        rank = _record_rank(TerminationRate, 1)
        dumps, longest = marshal.dumps, 0
        by_trunk: dict[int, dict[str, bytes]] = {}
        for record in records:
            if not record[active]:
                continue
            prefix = record[prefix_at].strip()
            table = by_trunk.setdefault(record[trunk_at], {})
            current = table.get(prefix)
            if current is None or rank(record) < rank(marshal.loads(current)):
                table[prefix] = dumps(record)
            longest = max(longest, len(prefix))
        self.termination_rates = _packed_record_tables(TerminationRate, by_trunk)
        self.longest_termination_prefix = longest

    def _index_ip_map(self, entries: Iterable[IpMapEntry], problems: list[str]) -> None:
        self.ip_entries = _packed_ip_entries(entries)
        cells: dict[tuple[int, int], dict[int, list[tuple[int, str]]]] = {}
        for entry in entries:
            if not self._ip_usable(entry):
                continue  # identification only ever yields a usable account
            cell = _ip_cell(entry)
            if cell is None:
                problems.append(f"ip map entry {entry.id}: {entry.cidr!r} is not an IP network")
                continue
            version, prefixlen, address = cell
            cells.setdefault((version, prefixlen), {}).setdefault(address, []).append(
                (entry.id, entry.tech_prefix.strip())
            )
        for version in (4, 6):
            ordered = sorted(
                ((prefixlen, table) for (v, prefixlen), table in cells.items() if v == version),
                key=lambda item: -item[0],
            )
            self._ip_buckets[version] = tuple(
                (
                    prefixlen,
                    _ip_mask(version, prefixlen),
                    _ip_bucket(
                        version, ((address, _ip_cell_of(matches)) for address, matches in table.items())
                    ),
                )
                for prefixlen, table in ordered
            )

    def _ip_usable(self, entry: IpMapEntry) -> bool:
        """An entry identification may yield: active, of a usable account."""
        if not entry.active:
            return False
        account = self.accounts.get(entry.account_id)
        return account is not None and account.usable

    # -- live changes (engine.state.watcher) -----------------------------------

    def track_changes(self, data: CatalogData) -> None:
        """Prepare :meth:`apply_changes`: keep the rows the derived indexes come from.

        Call once, right after ``build(data)`` with the same data, before the catalog
        is shared (it walks every table but the rate tables once, so run it where the
        build runs). The rate tables are not kept: a rate's change brings its previous
        value (``before``) instead.
        """
        self._changes = _ChangeIndex(self, data)

    def apply_changes(
        self,
        upserts: Iterable[Any],
        deletes: Iterable[tuple[str, str]],
        before: Mapping[tuple[str, str], Any] | None = None,
    ) -> list[str]:
        """Apply single-entity changes in place, as ``build`` would index the changed data.

        ``upserts`` are entities (new or changed), ``deletes`` ``(entity name, snapshot
        key)`` pairs (the keys of ``engine.state.snapshot.entity_key``). Every changed
        origination or termination rate needs its previous value in ``before``, keyed
        ``(name, key)``: the entity as the catalog had it, or None if it had none.

        Nothing here yields, so under gevent the update is atomic for the decisions
        (run it in the hub thread); it is not safe against reader *threads*. Checks its
        input before changing anything (ValueError, the catalog untouched). Returns the
        problems met (data ignored, as ``build`` lists them in ``problems``, which is
        left as built). Two differences from a fresh build, neither visible to a
        decision: the longest-prefix lengths only grow, and a rate's slot is given up,
        not handed to a duplicate (the database allows one rate per slot).
        """
        index = self._changes
        if index is None:
            raise RuntimeError("track_changes() was not called on this catalog")
        changes = _collect_changes(upserts, deletes, before or {})
        problems: list[str] = []
        index.apply(changes, problems)
        return problems


def _origination_rank(rate: OriginationRate) -> tuple[Any, ...]:
    return (-rate.cost_per_minute, rate.precedence, rate.id)


def _termination_rank(rate: TerminationRate) -> tuple[Any, ...]:
    return (rate.cost_per_minute, rate.precedence, rate.id)


# The entity types Catalog.build can take as record tuples (CatalogData.records): the large ones,
# packed straight from the snapshot's rows without an object per row.
RECORD_TYPES = ("accounts", "sip_devices", "origination_rates", "termination_rates")

# A rate table: a dict while small (a PackedTable object costs more than a few rates), packed
# from this many rates on.
PACK_RATES_FROM = 32
RateTable = dict[str, Row] | PackedTable[str, Row]


def _packed_tables(cls: type, tables: dict[int, dict[str, Row]]) -> dict[int, RateTable[Row]]:
    return {
        owner: packed_rates(cls, table) if len(table) >= PACK_RATES_FROM else table
        for owner, table in tables.items()
    }


def _packed_record_tables(cls: type, tables: dict[int, dict[str, bytes]]) -> dict[int, RateTable[Any]]:
    return {
        owner: PackedTable.from_encoded(cls, table.items(), int_keys=False)
        if len(table) >= PACK_RATES_FROM
        else {prefix: entity_of(cls, record) for prefix, record in table.items()}
        for owner, table in tables.items()
    }


def _packed_by_id(
    cls: type,
    entities: Iterable[Any],
    records: Iterable[tuple[Any, ...]] | None,
    indexes: Mapping[str, Callable[[Any], Any]],
) -> PackedTable[int, Any]:
    if records is None:
        return packed_by_id(cls, entities, indexes)
    return packed_records_by_id(cls, records, indexes)


def _positions(cls: type) -> dict[str, int]:
    return {f.name: at for at, f in enumerate(dataclasses.fields(cls))}


def _record_rank(cls: type, cost_sign: int) -> Callable[[tuple[Any, ...]], tuple[Any, ...]]:
    """``_origination_rank`` (cost_sign -1) or ``_termination_rank`` (1) of a record tuple."""
    at = _positions(cls)
    cost, precedence, row_id = at["cost_per_minute"], at["precedence"], at["id"]

    def rank(record: tuple[Any, ...]) -> tuple[Any, ...]:
        return (cost_sign * Decimal(record[cost]), record[precedence], record[row_id])

    return rank


def _number_of(account: Account) -> str:
    return account.number


def _username_of(device: SipDevice) -> str:
    return device.username


def _owner_of_number(candidates: list[Account]) -> Account | None:
    """Among the accounts with one number, the one ``build`` indexed (see ``_accounts_by_number``)."""
    return next(iter(_accounts_by_number(candidates).values()), None)


def _device_of_username(candidates: list[SipDevice]) -> SipDevice | None:
    return next(iter(_devices_by_username(candidates).values()), None)


def _accounts_by_number(accounts: Iterable[Account]) -> dict[str, Account]:
    """Numbers of deleted accounts may be reused: the undeleted account owns the number."""
    index: dict[str, Account] = {}
    for account in accounts:
        current = index.get(account.number)
        if current is None or (account.deleted, account.id) < (current.deleted, current.id):
            index[account.number] = account
    return index


def _devices_by_username(devices: Iterable[SipDevice]) -> dict[str, SipDevice]:
    """Usernames are unique in practice; if not, the active device with the lowest id wins."""
    index: dict[str, SipDevice] = {}
    for device in devices:
        current = index.get(device.username)
        if current is None or (not device.active, device.id) < (not current.active, current.id):
            index[device.username] = device
    return index


def _dids_by_number(dids: Iterable[Did], problems: list[str]) -> dict[str, Did]:
    """Numbers are unique in the database; if a snapshot holds two, the lowest id wins."""
    index: dict[str, Did] = {}
    for did in sorted(dids, key=lambda d: d.id):
        number = did.number.strip()
        if number in index:
            problems.append(f"DID {did.id}: number {number} already held by DID {index[number].id}; ignored")
            continue
        index[number] = did
    return index


def _pools(rows: Iterable[tuple[int, int, str]]) -> dict[int, NumberPool]:
    """(row id, account id, number) -> account id -> its pool, numbers in row-id order."""
    numbers: dict[int, list[tuple[int, str]]] = {}
    for row_id, account_id, number in rows:
        numbers.setdefault(account_id, []).append((row_id, number.strip()))
    pools = {}
    for account_id, rows_of_account in numbers.items():
        ordered = tuple(dict.fromkeys(number for _, number in sorted(rows_of_account)))
        pools[account_id] = NumberPool(ordered, frozenset(n.lstrip("+") for n in ordered))
    return pools


def _forced_caller_ids(rows: Iterable[ForcedCallerId]) -> dict[int, ForcedCallerId]:
    """One per account in the database; should a snapshot hold more, the choice is stable."""
    index: dict[int, ForcedCallerId] = {}
    for row in rows:
        if not row.active or not row.number.strip():
            continue
        current = index.get(row.account_id)
        if current is None or (row.number, row.name) < (current.number, current.name):
            index[row.account_id] = row
    return index


def _speed_dials(rows: Iterable[SpeedDial]) -> dict[int, dict[str, str]]:
    """Only keys with a number: an empty slot never rewrites a call (ASTPP's empty-destination bug)."""
    index: dict[int, dict[str, str]] = {}
    for row in rows:
        key, number = row.key.strip(), row.number.strip()
        if key and number:
            table = index.setdefault(row.account_id, {})
            table[key] = min(number, table.get(key, number))  # duplicates: a stable choice
    return index


def _blocked_codes(
    rows: Iterable[BlockedCode], problems: list[str]
) -> tuple[dict[int, dict[str, BlockedCode]], int]:
    index: dict[int, dict[str, BlockedCode]] = {}
    longest = 0
    for row in rows:
        prefix = row.prefix.strip()
        if not prefix:  # the database refuses it; it would block every call of the account
            problems.append(f"blocked code of account {row.account_id}: empty prefix ignored")
            continue
        index.setdefault(row.account_id, {}).setdefault(prefix, row)
        longest = max(longest, len(prefix))
    return index, longest


def _localizations(rows: Iterable[Localization], problems: list[str]) -> dict[int, CompiledLocalization]:
    """Active localizations only: an inactive one translates nothing (ASTPP's status check)."""
    return {row.id: compile_localization(row, problems) for row in rows if row.active}


# -- live changes ------------------------------------------------------------------

_ENTITY_NAMES: dict[type, str] = {cls: name for name, cls in ENTITY_TYPES.items()}
_RATE_TYPES = ("origination_rates", "termination_rates")
# The rows kept for the derived indexes, by snapshot key (accounts, DIDs, rate groups,
# gateways, trunks and IP-map entries are kept by the catalog itself, all of them, by id).
_KEPT = (
    "caller_ids",
    "forced_caller_ids",
    "speed_dials",
    "blocked_codes",
    "localizations",
)
# Rows whose key is one int field are kept under that int (the entity's own object), not under
# its snapshot key string: at 891k SIP devices the key strings alone were ~50 MB.
_INT_KEYED = frozenset(name for name, fields in ENTITY_KEY_FIELDS.items() if len(fields) == 1)
_RowKey = int | str


def _row_key(name: str, obj: Any) -> _RowKey:
    if name in _INT_KEYED:
        value: int = getattr(obj, ENTITY_KEY_FIELDS[name][0])
        return value
    return entity_key_of(name, obj)


_BY_ID = ("accounts", "dids", "rate_groups", "gateways", "trunks")


@dataclass(slots=True)
class _Change:
    new: Any  # None = deleted
    before: Any = None  # rates only: the value the catalog had, None = none
    has_before: bool = False


def _collect_changes(
    upserts: Iterable[Any], deletes: Iterable[tuple[str, str]], before: Mapping[tuple[str, str], Any]
) -> dict[str, dict[str, _Change]]:
    """name -> key -> change, checked: known types, ints where ids are, before-images of rates."""
    changes: dict[str, dict[str, _Change]] = {}
    for obj in upserts:
        name = _ENTITY_NAMES.get(type(obj))
        if name is None:
            raise ValueError(f"not an entity of engine.model: {type(obj).__name__}")
        changes.setdefault(name, {})[entity_key_of(name, obj)] = _Change(obj)
    for name, raw_key in deletes:
        if name not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {name!r}")
        key = str(raw_key)
        if key in changes.get(name, {}):
            raise ValueError(f"{name} {key!r} is both upserted and deleted")
        if name not in ("speed_dials", "blocked_codes") and not key.lstrip("-").isdigit():
            raise ValueError(f"{name}: malformed key {key!r}")
        changes.setdefault(name, {})[key] = _Change(None)
    for name in _RATE_TYPES:
        for key, change in changes.get(name, {}).items():
            if (name, key) not in before:
                raise ValueError(f"{name} {key}: the previous value is needed (before)")
            old = before[(name, key)]
            if old is not None and (_ENTITY_NAMES.get(type(old)) != name or entity_key_of(name, old) != key):
                raise ValueError(f"{name} {key}: before-image {old!r} is not that entity")
            change.before, change.has_before = old, True
    return changes


def _ip_cell(entry: IpMapEntry) -> tuple[int, int, int] | None:
    """(IP version, prefix length, network address) of an entry's CIDR; None if it does not parse."""
    try:
        network = ipaddress.ip_network(entry.cidr.strip(), strict=False)
    except ValueError:
        return None
    return network.version, network.prefixlen, int(network.network_address)


def _cell_text(cell: tuple[int, int, int]) -> str:
    version, prefixlen, address = cell
    return f"{version}/{prefixlen}/{address}"


def _cell_of_entry(entry: IpMapEntry) -> str:
    """The IP-map table's "cell" index: the entry's network as text ("" if its CIDR does not parse)."""
    cell = _ip_cell(entry)
    return "" if cell is None else _cell_text(cell)


def _account_of_entry(entry: IpMapEntry) -> str:
    return str(entry.account_id)


def _packed_ip_entries(entries: Iterable[IpMapEntry]) -> PackedTable[int, IpMapEntry]:
    return packed_by_id(IpMapEntry, entries, {"account": _account_of_entry, "cell": _cell_of_entry})


def _ip_mask(version: int, prefixlen: int) -> int:
    width = 32 if version == 4 else 128
    return ((1 << width) - 1) ^ ((1 << (width - prefixlen)) - 1)


def _ip_cell_of(matches: list[tuple[int, str]]) -> IpCell:
    """The cell of (entry id, tech prefix) pairs: longest tech prefix first, then lowest id."""
    return IpCell(tuple(sorted(matches, key=lambda m: (-len(m[1]), m[0]))))


def _ip_bucket(version: int, cells: Iterable[tuple[int, IpCell]]) -> _IpBucket:
    table = dict(cells)
    if version == 4 and len(table) >= PACK_RATES_FROM:
        return PackedTable(IpCell, table.items(), int_keys=True)
    return table


_NETWORKS: dict[int, Callable[[tuple[int, int]], IpNetwork]] = {
    4: ipaddress.IPv4Network,
    6: ipaddress.IPv6Network,
}


class _ChangeIndex:
    """The rows behind a catalog's derived indexes, and the reverse links to find them."""

    def __init__(self, catalog: Catalog, data: CatalogData) -> None:
        self.catalog = catalog
        self.rows: dict[str, MutableMapping[_RowKey, Any]] = {
            name: {_row_key(name, obj): obj for obj in getattr(data, name)} for name in _KEPT
        }
        # The IP map's rows are the catalog's packed table, indexed by account and by cell (its
        # overlay indexes follow the live changes: no reverse links to keep here).
        self.rows["ip_map"] = cast(MutableMapping[_RowKey, Any], catalog.ip_entries)
        self.did_ids_by_number: _Links[str, int] = _Links()
        self.did_ids_by_account: _Links[int, int] = _Links()
        for did in data.dids:
            self._link_did(did)
        self.keys_by_account: dict[str, _Links[int, _RowKey]] = {
            name: _Links() for name in ("caller_ids", "speed_dials", "blocked_codes")
        }
        for name, by_account in self.keys_by_account.items():
            for key, obj in self.rows[name].items():
                by_account.link(obj.account_id, key)
        self.trunks_by_gateway: _Links[int, int] = _Links()
        for trunk in data.trunks:
            self._link_trunk(trunk, add=True)

    # -- reverse links --------------------------------------------------------

    def _link_did(self, did: Did, add: bool = True) -> None:
        number = did.number.strip()
        pairs: list[tuple[_Links[Any, int], Any]] = [(self.did_ids_by_number, number)]
        if did.account_id is not None:
            pairs.append((self.did_ids_by_account, did.account_id))
        for table, slot in pairs:
            if add:
                table.link(slot, did.id)
            else:
                table.unlink(slot, did.id)

    def _link_trunk(self, trunk: Trunk, add: bool) -> None:
        for gateway_id in (trunk.gateway_id, *trunk.failover_gateway_ids):
            if add:
                self.trunks_by_gateway.link(gateway_id, trunk.id)
            else:
                self.trunks_by_gateway.unlink(gateway_id, trunk.id)

    # -- applying ---------------------------------------------------------------

    def apply(self, changes: dict[str, dict[str, _Change]], problems: list[str]) -> None:
        """Phase 1 stores every new row and notes what it dirties; phase 2 re-derives that."""
        c = self.catalog
        dirty = _Dirty()
        for name, by_key in changes.items():
            store = getattr(self, f"_store_{name}")
            as_row_key = int if name in _INT_KEYED else str
            for key, change in by_key.items():
                store(as_row_key(key), change, dirty)
        for gateway_id in dirty.gateways:
            dirty.trunks.update(self.trunks_by_gateway.of(gateway_id))
        for trunk_id in dirty.trunks:
            trunk = c.trunks.get(trunk_id)
            if trunk is None:
                c.trunk_gateways.pop(trunk_id, None)
            else:
                c.trunk_gateways[trunk_id] = c._active_gateways(trunk)
        for account_id in dirty.ip_accounts:
            for entry in c.ip_entries.having("account", str(account_id)):
                cell = _ip_cell(entry)
                if cell is not None:
                    dirty.ip_cells.add(cell)
        if dirty.ip_cells:
            self._rederive_ip_cells(dirty.ip_cells)
        for account_id in dirty.caller_id_accounts:
            _set_or_pop(c.account_caller_ids, account_id, self._caller_id_pool(account_id))
        for number in dirty.did_numbers:
            self._rederive_did_number(number, problems)
        for account_id in dirty.did_accounts:
            _set_or_pop(c.account_dids, account_id, self._did_pool(account_id))
        for account_id in dirty.speed_dial_accounts:
            rows = self._account_rows("speed_dials", account_id)
            _set_or_pop(c.speed_dials, account_id, _speed_dials(rows).get(account_id))
        for account_id in dirty.blocked_accounts:
            rows = self._account_rows("blocked_codes", account_id)
            table, longest = _blocked_codes(rows, problems)
            _set_or_pop(c.blocked_codes, account_id, table.get(account_id))
            c.longest_blocked_prefix = max(c.longest_blocked_prefix, longest)
        for name, rank in (
            ("origination_rates", _origination_rank),
            ("termination_rates", _termination_rank),
        ):
            by_key = changes.get(name, {})
            if by_key:
                for change in by_key.values():  # every removal first: two rates may swap slots
                    if change.before is not None:
                        self._unplace_rate(name, change.before)
                for change in by_key.values():
                    if change.new is not None:
                        self._place_rate(name, change.new, rank, problems)

    # phase 1, one method per entity type: store the row, note what it dirties

    def _store_accounts(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        c, new = self.catalog, change.new
        old = c.accounts.pop(int(key), None)
        if new is not None:
            c.accounts[new.id] = new  # accounts_by_number chooses at lookup time: nothing to re-derive
        if (old is not None and old.usable) != (new is not None and new.usable):
            dirty.ip_accounts.add(int(key))

    def _store_sip_devices(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        _set_or_pop(self.catalog.sip_devices, int(key), change.new)  # devices chooses at lookup time

    def _store_ip_map(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        old, new = self._swap_row("ip_map", key, change.new)  # the table's indexes follow
        for entry in (old, new):
            if entry is not None and (cell := _ip_cell(entry)) is not None:
                dirty.ip_cells.add(cell)

    def _store_caller_ids(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        old, new = self._swap_row("caller_ids", key, change.new)
        dirty.caller_id_accounts.update(row.account_id for row in (old, new) if row is not None)

    def _store_forced_caller_ids(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        c = self.catalog
        _, new = self._swap_row("forced_caller_ids", key, change.new)
        account_id = int(key)
        _set_or_pop(c.forced_caller_ids, account_id, _forced_caller_ids([new] if new else []).get(account_id))

    def _store_dids(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        c, new = self.catalog, change.new
        old = c.dids_by_id.pop(int(key), None)
        if new is not None:
            c.dids_by_id[new.id] = new
        for did, add in ((old, False), (new, True)):
            if did is not None:
                self._link_did(did, add)
                dirty.did_numbers.add(did.number.strip())
                if did.account_id is not None:
                    dirty.did_accounts.add(did.account_id)

    def _store_speed_dials(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        old, new = self._swap_row("speed_dials", key, change.new)
        dirty.speed_dial_accounts.update(row.account_id for row in (old, new) if row is not None)

    def _store_blocked_codes(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        old, new = self._swap_row("blocked_codes", key, change.new)
        dirty.blocked_accounts.update(row.account_id for row in (old, new) if row is not None)

    def _store_localizations(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        _, new = self._swap_row("localizations", key, change.new)
        problems: list[str] = []
        compiled = compile_localization(new, problems) if new is not None and new.active else None
        _set_or_pop(self.catalog.localizations, int(key), compiled)

    def _store_rate_groups(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        _set_or_pop(self.catalog.rate_groups, int(key), change.new)

    def _store_gateways(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        _set_or_pop(self.catalog.gateways, int(key), change.new)
        dirty.gateways.add(int(key))

    def _store_trunks(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        c, new = self.catalog, change.new
        old = c.trunks.pop(int(key), None)
        if old is not None:
            self._link_trunk(old, add=False)
        if new is not None:
            c.trunks[new.id] = new
            self._link_trunk(new, add=True)
        dirty.trunks.add(int(key))

    def _store_origination_rates(self, key: _RowKey, change: _Change, dirty: _Dirty) -> None:
        pass  # placed in phase 2, from before and new

    _store_termination_rates = _store_origination_rates

    def _swap_row(self, name: str, key: _RowKey, new: Any) -> tuple[Any, Any]:
        rows = self.rows[name]
        old = rows.pop(key, None)
        if new is not None:
            rows[key] = new
        by_account = self.keys_by_account.get(name)
        if by_account is not None:
            if old is not None:
                by_account.unlink(old.account_id, key)
            if new is not None:
                by_account.link(new.account_id, key)
        return old, new

    def _account_rows(self, name: str, account_id: int) -> list[Any]:
        rows = self.rows[name]
        return [rows[key] for key in self.keys_by_account[name].of(account_id)]

    # phase 2: re-derive as build does, from the candidates only

    def _rederive_did_number(self, number: str, problems: list[str]) -> None:
        c = self.catalog
        candidates = [c.dids_by_id[i] for i in self.did_ids_by_number.of(number)]
        _set_or_pop(c.dids, number, _dids_by_number(candidates, problems).get(number))

    def _caller_id_pool(self, account_id: int) -> NumberPool | None:
        rows = self._account_rows("caller_ids", account_id)
        pools = _pools((r.id, r.account_id, r.number) for r in rows if r.active and r.number.strip())
        return pools.get(account_id)

    def _did_pool(self, account_id: int) -> NumberPool | None:
        dids = self.catalog.dids_by_id
        rows = [dids[i] for i in self.did_ids_by_account.of(account_id)]
        pools = _pools((d.id, account_id, d.number) for d in rows if d.active and d.number.strip())
        return pools.get(account_id)

    def _rederive_ip_cells(self, cells: set[tuple[int, int, int]]) -> None:
        c = self.catalog
        for version in (4, 6):
            mine = [cell for cell in cells if cell[0] == version]
            if not mine:
                continue
            # changed in place: nothing here yields, so a decision sees the buckets before or after
            buckets = {prefixlen: (mask, table) for prefixlen, mask, table in c._ip_buckets[version]}
            for _, prefixlen, address in mine:
                matches = [
                    (entry.id, entry.tech_prefix.strip())
                    for entry in c.ip_entries.having("cell", _cell_text((version, prefixlen, address)))
                    if c._ip_usable(entry)
                ]
                _, table = buckets.setdefault(prefixlen, (_ip_mask(version, prefixlen), {}))
                if matches:
                    table[address] = _ip_cell_of(matches)
                else:
                    table.pop(address, None)
            c._ip_buckets[version] = tuple(
                (prefixlen, mask, table)
                for prefixlen, (mask, table) in sorted(buckets.items(), key=lambda item: -item[0])
                if table
            )

    def _rate_table(self, name: str, rate: Any, create: bool) -> MutableMapping[str, Any] | None:
        c = self.catalog
        tables: Mapping[int, MutableMapping[str, Any]]
        if name == "termination_rates":
            tables, owner = c.termination_rates, rate.trunk_id
        elif rate.account_id is not None:
            tables, owner = c.personal_rates, rate.account_id
        elif rate.rate_group_id is not None:
            tables, owner = c.group_rates, rate.rate_group_id
        else:
            return None
        if create:
            return cast(dict[int, MutableMapping[str, Any]], tables).setdefault(owner, {})
        return tables.get(owner)

    def _unplace_rate(self, name: str, rate: Any) -> None:
        if not rate.active:
            return
        table = self._rate_table(name, rate, create=False)
        prefix = rate.prefix.strip()
        if table is not None and (held := table.get(prefix)) is not None and held.id == rate.id:
            del table[prefix]
            if not table:
                self._drop_empty_rate_table(name, rate)

    def _drop_empty_rate_table(self, name: str, rate: Any) -> None:
        c = self.catalog
        if name == "termination_rates":
            c.termination_rates.pop(rate.trunk_id, None)
        elif rate.account_id is not None:
            c.personal_rates.pop(rate.account_id, None)
        else:
            c.group_rates.pop(rate.rate_group_id, None)

    def _place_rate(
        self, name: str, rate: Any, rank: Callable[[Any], tuple[Any, ...]], problems: list[str]
    ) -> None:
        if not rate.active:
            return
        table = self._rate_table(name, rate, create=True)
        if table is None:
            problems.append(f"origination rate {rate.id}: neither rate group nor account")
            return
        prefix = rate.prefix.strip()
        held = table.get(prefix)
        if held is None or held.id == rate.id or rank(rate) < rank(held):
            table[prefix] = rate
        c = self.catalog
        if name == "termination_rates":
            c.longest_termination_prefix = max(c.longest_termination_prefix, len(prefix))
        else:
            c.longest_origination_prefix = max(c.longest_origination_prefix, len(prefix))


@dataclass(slots=True)
class _Dirty:
    """What phase 1 touched and phase 2 must re-derive."""

    ip_accounts: set[int] = field(default_factory=set)
    ip_cells: set[tuple[int, int, int]] = field(default_factory=set)
    caller_id_accounts: set[int] = field(default_factory=set)
    did_numbers: set[str] = field(default_factory=set)
    did_accounts: set[int] = field(default_factory=set)
    speed_dial_accounts: set[int] = field(default_factory=set)
    blocked_accounts: set[int] = field(default_factory=set)
    gateways: set[int] = field(default_factory=set)
    trunks: set[int] = field(default_factory=set)


K = TypeVar("K")
V = TypeVar("V")


class _Many(set[Any]):
    """Two or more items linked to one slot (a plain set would be ambiguous with a set item)."""

    __slots__ = ()


class _Links(dict[K, Any], Generic[K, V]):
    """slot -> the items linked to it, for the reverse links of :class:`_ChangeIndex`.

    Almost every slot (an account number, a device username, an IP cell) has exactly
    one item: it is held as itself, not in a one-item set (a set costs ~216 bytes; at a
    million accounts and devices the sets alone were ~400 MB). Two or more go in a set.
    """

    def link(self, slot: K, item: V) -> None:
        held = self.get(slot, _ABSENT)
        if held is _ABSENT:
            self[slot] = item
        elif type(held) is _Many:
            held.add(item)
        elif held != item:
            self[slot] = _Many((held, item))

    def unlink(self, slot: K, item: V) -> None:
        held = self.get(slot, _ABSENT)
        if type(held) is _Many:
            held.discard(item)
            if len(held) == 1:
                self[slot] = next(iter(held))
        elif held is not _ABSENT and held == item:
            del self[slot]

    def of(self, slot: K) -> tuple[V, ...]:
        held = self.get(slot, _ABSENT)
        if held is _ABSENT:
            return ()
        if type(held) is _Many:
            return tuple(held)
        return (held,)


_ABSENT: Any = object()


def _set_or_pop(table: MutableMapping[Any, Any], key: Any, value: Any) -> None:
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
