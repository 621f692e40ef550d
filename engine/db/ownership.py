"""Who may claim the data that identifies calls: the ownership rule, pure (no I/O).

A call is identified by its SIP username, its source address and the tech prefix that starts its
destination (the IP map), and its numbers (a DID it is delivered to, the caller IDs a CLI check
accepts). If two tenants could claim the same call, the one that wins the lookup takes the
other's calls and bills them to itself: a reseller adding a /32 with the same tech prefix on an
admin customer's address took over that customer's calls. So:

**Tenants.** An account's tenant is the top-level reseller it sits below (a top-level reseller is
its own tenant); the admin's own accounts (customers and providers with no reseller) are one
tenant, ``None``. Within a tenant its owner settles clashes; between tenants none may exist.

**Conflicts.**

- Two IP map entries conflict when their networks overlap (for CIDR blocks: one holds the other)
  and one tech prefix starts the other ("" starts every prefix). Exactly then some call (an
  address in both networks, a destination starting with both prefixes) matches both, and the
  lookup's tie-breaking (longest tech prefix, then narrowest network) hands it to one of them.
  Entries with prefixes that are not prefixes of one another never match the same call, so
  tenants may share a carrier's address through distinct tech prefixes.
- Two numbers conflict when they are equal: a caller ID on the CLI whitelist, a forced caller
  ID, a DID assigned to an account.
- SIP usernames and DID numbers are unique in the database (one device, one DID row), so they
  cannot be claimed twice; the service still refuses them with a conflict error.

**Enforcement, twice.** The service layer refuses a write that would create a conflict with
another tenant (HTTP 409); a reseller is also refused a conflict with anything outside its own
subtree, and networks wider than /24 (IPv4) or /48 (IPv6), which only the admin may add. The
snapshot build (:func:`drop_conflicts`) enforces the tenant rule again on whatever reached the
database (a fixture load, SQL by hand, a reseller moved, a race): of two conflicting entries of
different tenants the older one (lower id) stays and the newer one is left out of the snapshot,
logged and counted; a DID always stays (the admin assigns it) and a caller ID or forced caller
ID equal to another tenant's DID is left out. Inactive entries count too: ownership is about
the claim, not about today's use.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from engine.model import Account, CallerId, CatalogData, ForcedCallerId, IpMapEntry

Tenant = int | None  # the top-level reseller's account id; None = the admin's own accounts
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The widest networks a reseller may map (prefix length per IP version); wider ones need the admin.
RESELLER_MIN_PREFIXLEN = {4: 24, 6: 48}

# Snapshot entities the rule reads: a change to one of them may change what the snapshot drops.
CHECKED_ENTITIES = frozenset({"ip_map", "caller_ids", "forced_caller_ids", "dids"})


@dataclass(frozen=True, slots=True)
class Conflict:
    """An entry left out of a snapshot because an entry of another tenant claims the same calls."""

    entity: str  # "ip_map", "caller_ids" or "forced_caller_ids"
    key: str  # the dropped entry's snapshot key (ip_map / caller_ids: its id; forced: its account id)
    account_id: int  # the dropped entry's account
    kept_entity: str
    kept_key: str
    kept_account_id: int
    what: str  # the contested claim, e.g. "198.51.100.7/32 tech prefix '99'" or "number 4420..."

    def __str__(self) -> str:
        return (
            f"{self.entity} {self.key} (account id {self.account_id}) dropped from the snapshot: "
            f"{self.what} is claimed by {self.kept_entity} {self.kept_key} of another tenant "
            f"(account id {self.kept_account_id}), which is older"
        )


# --------------------------------------------------------------------------- tenants


def tenant_of_top(top_id: int, top_kind: str) -> Tenant:
    """The tenant of an account whose topmost ancestor (itself included) is `top_id` of `top_kind`."""
    return top_id if top_kind == "reseller" else None


def tenants(accounts: Iterable[Account]) -> dict[int, Tenant]:
    """Every account's tenant (an unknown or cyclic parent ends the walk where it is)."""
    by_id = {a.id: a for a in accounts}
    out: dict[int, Tenant] = {}
    for account in by_id.values():
        top, seen = account, {account.id}
        while top.reseller_id is not None and top.reseller_id in by_id and top.reseller_id not in seen:
            top = by_id[top.reseller_id]
            seen.add(top.id)
        out[account.id] = tenant_of_top(top.id, top.kind)
    return out


# --------------------------------------------------------------------------- the IP map


def network(cidr: str) -> Network:
    """The network of an IP map entry (a bare address is a /32 or /128); ValueError if none."""
    return ipaddress.ip_network(cidr.strip(), strict=False)


def prefixes_comparable(a: str, b: str) -> bool:
    """Whether some destination starts with both tech prefixes."""
    a, b = a.strip(), b.strip()
    return a.startswith(b) or b.startswith(a)


def ip_claims_conflict(cidr_a: str, prefix_a: str, cidr_b: str, prefix_b: str) -> bool:
    """Whether some call (source address, destination) matches both IP map entries."""
    net_a, net_b = network(cidr_a), network(cidr_b)
    return (
        net_a.version == net_b.version
        and prefixes_comparable(prefix_a, prefix_b)
        and (net_a.subnet_of(net_b) or net_b.subnet_of(net_a))  # type: ignore[arg-type]
    )


def too_wide_for_reseller(cidr: str) -> bool:
    net = network(cidr)
    return net.prefixlen < RESELLER_MIN_PREFIXLEN[net.version]


def describe_ip(cidr: str, tech_prefix: str) -> str:
    return f"{network(cidr)} tech prefix {tech_prefix.strip()!r}"


def _span(cidr: str) -> tuple[int, int, int] | None:
    """(IP version, first address, number of addresses) of a network; None if it is not one.

    Plain IPv4 "a.b.c.d/n" is read directly (the ipaddress module costs ~15 µs an entry, which
    a snapshot of 100k entries feels); everything else goes through :func:`network`.
    """
    text = cidr.strip()
    address, _, length = text.partition("/")
    parts = address.split(".")
    if (
        len(parts) == 4
        and all(p.isdigit() and len(p) <= 3 for p in parts)
        and (not length or length.isdigit())
    ):
        octets = [int(p) for p in parts]
        prefixlen = int(length) if length else 32
        if all(o <= 255 for o in octets) and prefixlen <= 32:
            value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
            size = 1 << (32 - prefixlen)
            return 4, value & ~(size - 1), size
    try:
        net = network(text)
    except ValueError:
        return None
    return net.version, int(net.network_address), 1 << (net.max_prefixlen - net.prefixlen)


def _overlapping_pairs(entries: list[IpMapEntry]) -> Iterable[tuple[IpMapEntry, IpMapEntry]]:
    """Pairs of entries whose networks overlap, without comparing every pair.

    CIDR blocks are nested or disjoint. Sorted by (start, size descending), a block's enclosing
    blocks are exactly those still open on a stack when it comes: a sweep, O(n log n + pairs).
    """
    nets: list[tuple[int, int, int, int, IpMapEntry]] = []
    for entry in entries:
        span = _span(entry.cidr)
        if span is None:
            continue  # the catalogue build reports it and ignores the entry
        version, start, size = span
        nets.append((version, start, -size, start + size - 1, entry))
    nets.sort(key=lambda n: (n[0], n[1], n[2], n[4].id))
    stack: list[tuple[int, int, IpMapEntry]] = []  # (version, last address, entry)
    for version, start, _size, last, entry in nets:
        while stack and (stack[-1][0] != version or stack[-1][1] < start):
            stack.pop()
        for _, _, outer in stack:
            yield outer, entry
        stack.append((version, last, entry))


def _drop_ip_conflicts(entries: list[IpMapEntry], tenant: Mapping[int, Tenant]) -> list[Conflict]:
    neighbours: dict[int, list[IpMapEntry]] = defaultdict(list)
    for a, b in _overlapping_pairs(entries):
        if tenant.get(a.account_id) != tenant.get(b.account_id) and prefixes_comparable(
            a.tech_prefix, b.tech_prefix
        ):
            neighbours[a.id].append(b)
            neighbours[b.id].append(a)
    dropped: set[int] = set()
    conflicts: list[Conflict] = []
    for entry in sorted(entries, key=lambda e: e.id):  # the older entry is decided first
        older = [n for n in neighbours.get(entry.id, ()) if n.id < entry.id and n.id not in dropped]
        if older:
            kept = min(older, key=lambda n: n.id)
            dropped.add(entry.id)
            conflicts.append(
                Conflict(
                    "ip_map",
                    str(entry.id),
                    entry.account_id,
                    "ip_map",
                    str(kept.id),
                    kept.account_id,
                    describe_ip(entry.cidr, entry.tech_prefix),
                )
            )
    return conflicts


# --------------------------------------------------------------------------- numbers


def _drop_number_conflicts(data: CatalogData, tenant: Mapping[int, Tenant]) -> list[Conflict]:
    """Caller IDs and forced caller IDs another tenant holds first (its DID, an older caller ID)."""
    # number -> claims kept so far: (tenant, entity, key, account id)
    held: dict[str, list[tuple[Tenant, str, str, int]]] = defaultdict(list)
    for did in data.dids:
        if did.account_id is not None:
            held[did.number.strip()].append((tenant.get(did.account_id), "dids", str(did.id), did.account_id))
    conflicts: list[Conflict] = []

    def claim(entity: str, key: str, account_id: int, number: str) -> None:
        owner = tenant.get(account_id)
        rival = next((h for h in held[number] if h[0] != owner), None)
        if rival is None:
            held[number].append((owner, entity, key, account_id))
        else:
            conflicts.append(
                Conflict(entity, key, account_id, rival[1], rival[2], rival[3], f"number {number}")
            )

    for caller in sorted(data.caller_ids, key=lambda c: c.id):
        claim("caller_ids", str(caller.id), caller.account_id, caller.number.strip())
    for forced in sorted(data.forced_caller_ids, key=lambda f: f.account_id):
        if forced.number.strip():
            claim("forced_caller_ids", str(forced.account_id), forced.account_id, forced.number.strip())
    return conflicts


# --------------------------------------------------------------------------- the snapshot


def find_conflicts(data: CatalogData) -> list[Conflict]:
    """The entries of `data` that :func:`drop_conflicts` leaves out, and why."""
    tenant = tenants(data.accounts)
    return _drop_ip_conflicts(list(data.ip_map), tenant) + _drop_number_conflicts(data, tenant)


def drop_conflicts(data: CatalogData) -> tuple[CatalogData, list[Conflict]]:
    """`data` without the entries that claim another tenant's calls (the older claim stays)."""
    conflicts = find_conflicts(data)
    if not conflicts:
        return data, []
    gone = {(c.entity, c.key) for c in conflicts}
    kept_ip: list[IpMapEntry] = [e for e in data.ip_map if ("ip_map", str(e.id)) not in gone]
    kept_callers: list[CallerId] = [c for c in data.caller_ids if ("caller_ids", str(c.id)) not in gone]
    kept_forced: list[ForcedCallerId] = [
        f for f in data.forced_caller_ids if ("forced_caller_ids", str(f.account_id)) not in gone
    ]
    cleaned = dataclasses.replace(
        data, ip_map=kept_ip, caller_ids=kept_callers, forced_caller_ids=kept_forced
    )
    return cleaned, conflicts


def enforce(data: CatalogData, log: logging.Logger) -> tuple[CatalogData, int]:
    """:func:`drop_conflicts` for a snapshot build: each dropped entry logged as an error."""
    cleaned, conflicts = drop_conflicts(data)
    for conflict in conflicts:
        log.error("ownership conflict: %s", conflict)
    return cleaned, len(conflicts)
