"""One snapshot, indexed for the hot path.

``Catalog.build`` turns the loader's plain entity lists into the lookups a call
decision needs, once per snapshot; after that the catalog is only read. Inactive
rates and IP-map entries are left out of the indexes (they can never match);
entities whose state the explanation must name (devices, accounts, rate groups,
trunks, gateways) are kept whatever their status and checked at decision time.

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
    CatalogData,
    Gateway,
    IpMapEntry,
    OriginationRate,
    RateGroup,
    SipDevice,
    TerminationRate,
    Trunk,
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Row = TypeVar("Row")


@dataclass(frozen=True, slots=True)
class IpMapMatch:
    """An active IP-map entry of a usable account, with its CIDR compiled."""

    entry: IpMapEntry
    network: IpNetwork
    tech_prefix: str


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
        "accounts",
        "accounts_by_number",
        "devices",
        "gateways",
        "group_rates",
        "longest_origination_prefix",
        "longest_termination_prefix",
        "personal_rates",
        "problems",
        "rate_groups",
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
