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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from engine.model import (
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
)
from engine.rules.localization import CompiledLocalization, compile_localization

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Row = TypeVar("Row")


@dataclass(frozen=True, slots=True)
class IpMapMatch:
    """An active IP-map entry of a usable account, with its CIDR compiled."""

    entry: IpMapEntry
    network: IpNetwork
    tech_prefix: str


@dataclass(frozen=True, slots=True)
class NumberPool:
    """An account's active DIDs or whitelisted caller IDs, for the CLI pool (§4.4)."""

    numbers: tuple[str, ...]  # as stored, in id order: the candidates a random pick chooses from
    compare: frozenset[str]  # the same numbers without a leading "+", for membership

    def __contains__(self, caller_id: str) -> bool:
        return caller_id.lstrip("+") in self.compare


EMPTY_POOL = NumberPool((), frozenset())


# One bucket per (IP version, netmask length): the masked address -> the entries of
# that network, longest tech prefix first.
_IpBuckets = tuple[tuple[int, int, dict[int, tuple[IpMapMatch, ...]]], ...]


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
    """The row of the longest prefix of ``number`` present in ``table``."""
    for n in range(min(len(number), longest), -1, -1):
        row = table.get(number[:n])
        if row is not None:
            return row
    return None


class Catalog:
    """Read-only indexes over one snapshot. Build with ``Catalog.build(data)``."""

    __slots__ = (
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
        "localizations",
        "longest_blocked_prefix",
        "longest_origination_prefix",
        "longest_termination_prefix",
        "personal_rates",
        "problems",
        "rate_groups",
        "speed_dials",
        "termination_rates",
        "trunk_gateways",
        "trunks",
        "version",
    )

    def __init__(self) -> None:
        self.version = 0
        self.accounts: dict[int, Account] = {}
        self.accounts_by_number: dict[str, Account] = {}
        self.devices: dict[str, SipDevice] = {}
        self.rate_groups: dict[int, RateGroup] = {}
        self.group_rates: dict[int, dict[str, OriginationRate]] = {}
        self.personal_rates: dict[int, dict[str, OriginationRate]] = {}
        self.trunks: dict[int, Trunk] = {}
        self.gateways: dict[int, Gateway] = {}
        self.trunk_gateways: dict[int, tuple[str, ...]] = {}  # active gateway names, primary then failovers
        self.termination_rates: dict[int, dict[str, TerminationRate]] = {}
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
        self._ip_buckets: dict[int, _IpBuckets] = {4: (), 6: ()}

    @classmethod
    def build(cls, data: CatalogData) -> Catalog:
        catalog = cls()
        problems: list[str] = []
        catalog.version = data.version
        catalog.accounts = {account.id: account for account in data.accounts}
        catalog.accounts_by_number = _accounts_by_number(data.accounts)
        catalog.devices = _devices_by_username(data.sip_devices)
        catalog.rate_groups = {group.id: group for group in data.rate_groups}
        catalog.trunks = {trunk.id: trunk for trunk in data.trunks}
        catalog.gateways = {gateway.id: gateway for gateway in data.gateways}
        catalog.trunk_gateways = {trunk.id: catalog._active_gateways(trunk) for trunk in data.trunks}
        catalog._index_origination_rates(data.origination_rates, problems)
        catalog._index_termination_rates(data.termination_rates)
        catalog._index_ip_map(data.ip_map, problems)
        catalog._index_numbers(data, problems)
        catalog.problems = tuple(problems)
        return catalog

    # -- lookups ---------------------------------------------------------------

    def ip_map_match(self, address: IpAddress, destination: str) -> IpMapMatch | None:
        """The entry whose CIDR holds ``address`` and whose tech prefix starts the
        destination: longest tech prefix first, then the narrowest network, then
        the lowest entry id."""
        best: IpMapMatch | None = None
        value = int(address)
        for _, mask, table in self._ip_buckets[address.version]:
            matches = table.get(value & mask)
            if matches is None:
                continue
            for match in matches:  # longest tech prefix first
                if best is not None and len(match.tech_prefix) <= len(best.tech_prefix):
                    break
                if destination.startswith(match.tech_prefix):
                    best = match
                    break
        return best

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
        for rate in rates:
            if not rate.active:
                continue
            prefix = rate.prefix.strip()
            if rate.account_id is not None:
                table = self.personal_rates.setdefault(rate.account_id, {})
            elif rate.rate_group_id is not None:
                table = self.group_rates.setdefault(rate.rate_group_id, {})
            else:
                problems.append(f"origination rate {rate.id}: neither rate group nor account")
                continue
            current = table.get(prefix)
            # Two rows for one prefix: the dearer wins (the spec's tie rule), then precedence, then id.
            if current is None or _origination_rank(rate) < _origination_rank(current):
                table[prefix] = rate
            longest = max(longest, len(prefix))
        self.longest_origination_prefix = longest

    def _index_termination_rates(self, rates: Iterable[TerminationRate]) -> None:
        longest = 0
        for rate in rates:
            if not rate.active:
                continue
            prefix = rate.prefix.strip()
            table = self.termination_rates.setdefault(rate.trunk_id, {})
            current = table.get(prefix)
            # Two rows for one prefix on one trunk: the cheaper wins, as LCR would pick it.
            if current is None or _termination_rank(rate) < _termination_rank(current):
                table[prefix] = rate
            longest = max(longest, len(prefix))
        self.longest_termination_prefix = longest

    def _index_ip_map(self, entries: Iterable[IpMapEntry], problems: list[str]) -> None:
        buckets: dict[tuple[int, int], dict[int, list[IpMapMatch]]] = {}
        for entry in entries:
            if not entry.active:
                continue
            account = self.accounts.get(entry.account_id)
            if account is None or not account.usable:
                continue  # identification only ever yields a usable account
            try:
                network = ipaddress.ip_network(entry.cidr.strip(), strict=False)
            except ValueError:
                problems.append(f"ip map entry {entry.id}: {entry.cidr!r} is not an IP network")
                continue
            match = IpMapMatch(entry, network, entry.tech_prefix.strip())
            key = (network.version, network.prefixlen)
            buckets.setdefault(key, {}).setdefault(int(network.network_address), []).append(match)
        for version in (4, 6):
            ordered = sorted(
                ((prefixlen, table) for (v, prefixlen), table in buckets.items() if v == version),
                key=lambda item: -item[0],
            )
            width = 32 if version == 4 else 128
            self._ip_buckets[version] = tuple(
                (
                    prefixlen,
                    ((1 << width) - 1) ^ ((1 << (width - prefixlen)) - 1),
                    {
                        address: tuple(sorted(matches, key=lambda m: (-len(m.tech_prefix), m.entry.id)))
                        for address, matches in table.items()
                    },
                )
                for prefixlen, table in ordered
            )


def _origination_rank(rate: OriginationRate) -> tuple:
    return (-rate.cost_per_minute, rate.precedence, rate.id)


def _termination_rank(rate: TerminationRate) -> tuple:
    return (rate.cost_per_minute, rate.precedence, rate.id)


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
