"""Load the engine's view of the account model from PostgreSQL (engine.model.CatalogData).

Everything is read in one REPEATABLE READ, READ ONLY transaction (one consistent
snapshot) when the connection is idle; inside a caller's transaction the
caller's snapshot is used. Every table is streamed with ``COPY ... TO STDOUT
(FORMAT BINARY)``, so a million origination rates cost one round trip and no
per-row queries; link tables (failover gateways, rate-group trunks, forced
trunks) are read first into small dictionaries and attached while streaming.

All rows are returned, including inactive and soft-deleted ones (flagged): the
rules check ``active``/``usable`` and no reference ever dangles.
``CatalogData.version`` is the highest ``change_version`` among the rows read
(0 for an empty catalogue).

Single entities (the live sync, :func:`load_entities`) are read with the same
column lists and the same row mapping, filtered by entity key (the snapshot's
keys: the id, or ``account_id``, ``account_id:key``, ``account_id:prefix`` for
forced caller IDs, speed dials and blocked codes), in the caller's transaction.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq

from engine.model import (
    ENTITY_TYPES,
    Account,
    AccountKind,
    BlockedCode,
    CallerId,
    CatalogData,
    CliPool,
    Did,
    DidDestinationType,
    ForcedCallerId,
    Gateway,
    IpMapEntry,
    Localization,
    OriginationRate,
    RateGroup,
    RoutingType,
    SipDevice,
    SpeedDial,
    TerminationRate,
    Trunk,
)
from engine.state.snapshot import entity_key  # the snapshot owns the key format

__all__ = ["ENTITY_KEY_COLUMNS", "load_catalog", "load_entities"]

Row = tuple[Any, ...]
Links = dict[int, list[int]]


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


# --- the link tables: parent id -> child ids, in the order the model keeps ------------------


@dataclass(frozen=True)
class _Link:
    table: str
    parent: str
    child: str
    order: str  # the ORDER BY of the children within a parent


_LINKS: dict[str, _Link] = {
    "trunks": _Link("trunk_failover_gateways", "trunk_id", "gateway_id", "trunk_id, position"),
    "rate_groups": _Link("rate_group_trunks", "rate_group_id", "trunk_id", "rate_group_id, trunk_id"),
    "origination_rates": _Link("origination_rate_trunks", "rate_id", "trunk_id", "rate_id, trunk_id"),
}


# --- row mapping, one function per entity: (rows, links) -> entities -----------------------


def _localizations(rows: Iterable[Row], _links: Links) -> list[Localization]:
    return [
        Localization(
            id=row[0],
            name=row[1],
            active=row[2],
            number_originate=row[3],
            cli_originate=row[4],
            cli_inbound=row[5],
            number_terminate=row[6],
            cli_terminate=row[7],
        )
        for row in rows
    ]


def _gateways(rows: Iterable[Row], _links: Links) -> list[Gateway]:
    return [
        Gateway(
            id=row[0],
            name=row[1],
            active=row[2],
            sip_profile=row[3],
            proxy=row[4],
            username=row[5],
            password=row[6],
            register=row[7],
            params=_gateway_params(row[8]),
        )
        for row in rows
    ]


def _gateway_params(text: str) -> tuple[str, ...]:
    """The gateways.params JSON object as sorted "name=value" strings (scalars as JSON writes them)."""
    params = json.loads(text)
    return tuple(
        f"{name}={value if isinstance(value, str) else json.dumps(value)}"
        for name, value in sorted(params.items())
    )


def _trunks(rows: Iterable[Row], failovers: Links) -> list[Trunk]:
    return [
        Trunk(
            id=row[0],
            name=row[1],
            provider_id=row[2],
            gateway_id=row[3],
            failover_gateway_ids=tuple(failovers.get(row[0], ())),
            active=row[4],
            precedence=row[5],
            max_channels=row[6],
            cps=row[7],
            codecs=row[8],
            leg_timeout=row[9],
            localization_id=row[10],
        )
        for row in rows
    ]


def _rate_groups(rows: Iterable[Row], group_trunks: Links) -> list[RateGroup]:
    return [
        RateGroup(
            id=row[0],
            name=row[1],
            active=row[2],
            markup_percent=row[3],
            routing_type=RoutingType(row[4]),
            init_inc=row[5],
            inc=row[6],
            lossless=row[7],
            trunk_ids=tuple(group_trunks.get(row[0], ())),
        )
        for row in rows
    ]


_KINDS = {k.value: k for k in AccountKind}
_POOLS = {p.value: p for p in CliPool}
_DESTINATIONS = {d.value: d for d in DidDestinationType}


def _accounts(rows: Iterable[Row], _links: Links) -> list[Account]:
    kinds, pools = _KINDS, _POOLS
    return [
        Account(
            id=row[0],
            number=row[1],
            kind=kinds[row[2]],
            reseller_id=row[3],
            active=row[4],
            deleted=row[5],
            postpaid=row[6],
            balance=row[7],
            credit_limit=row[8],
            rate_group_id=row[9],
            expiry=_utc(row[10]),
            first_used=_utc(row[11]),
            valid_days=row[12],
            expiry_from_first_use=row[13],
            non_cli_rate_group_id=row[14],
            cli_pool=pools[row[15]],
            localization_id=row[16],
            local_calls_allowed=row[17],
            local_call_cost_per_minute=row[18],
            max_channels=row[19],
            cps=row[20],
            codecs=row[21],
        )
        for row in rows
    ]


def _sip_devices(rows: Iterable[Row], _links: Links) -> list[SipDevice]:
    return [
        SipDevice(
            id=row[0],
            account_id=row[1],
            username=row[2],
            active=row[3],
            codecs=row[4],
            password=row[5],
            caller_id_name=row[6],
            caller_id_number=row[7],
            context=row[8],
        )
        for row in rows
    ]


def _ip_map(rows: Iterable[Row], _links: Links) -> list[IpMapEntry]:
    return [
        IpMapEntry(id=row[0], account_id=row[1], cidr=str(row[2]), tech_prefix=row[3], active=row[4])
        for row in rows
    ]


def _caller_ids(rows: Iterable[Row], _links: Links) -> list[CallerId]:
    return [CallerId(id=row[0], account_id=row[1], number=row[2], active=row[3]) for row in rows]


def _forced_caller_ids(rows: Iterable[Row], _links: Links) -> list[ForcedCallerId]:
    return [ForcedCallerId(account_id=row[0], number=row[1], name=row[2], active=row[3]) for row in rows]


def _dids(rows: Iterable[Row], _links: Links) -> list[Did]:
    destinations = _DESTINATIONS
    return [
        Did(
            id=row[0],
            number=row[1],
            account_id=row[2],
            active=row[3],
            destination_type=destinations[row[4]],
            destination=row[5],
            max_channels=row[6],
            cps=row[7],
            connect_cost=row[8],
            cost_per_minute=row[9],
            init_inc=row[10],
            inc=row[11],
        )
        for row in rows
    ]


def _speed_dials(rows: Iterable[Row], _links: Links) -> list[SpeedDial]:
    return [SpeedDial(account_id=row[0], key=row[1], number=row[2]) for row in rows]


def _blocked_codes(rows: Iterable[Row], _links: Links) -> list[BlockedCode]:
    return [BlockedCode(account_id=row[0], prefix=row[1]) for row in rows]


def _origination_rates(rows: Iterable[Row], forced: Links) -> list[OriginationRate]:
    no_trunks: tuple[int, ...] = ()
    # Costs, connect costs and descriptions repeat across rates: share one object per value
    # (a million rates hold a few thousand distinct ones), which saves most of the memory.
    shared: dict[Any, Any] = {}
    share = shared.setdefault
    return [
        OriginationRate(
            id=row[0],
            prefix=row[1],
            cost_per_minute=share(row[2], row[2]),
            rate_group_id=row[3],
            account_id=row[4],
            connect_cost=share(row[5], row[5]),
            included_seconds=row[6],
            init_inc=row[7],
            inc=row[8],
            precedence=row[9],
            active=row[10],
            forced_trunk_ids=tuple(forced[row[0]]) if row[0] in forced else no_trunks,
            description=share(row[11], row[11]),
        )
        for row in rows
    ]


def _termination_rates(rows: Iterable[Row], _links: Links) -> list[TerminationRate]:
    return [
        TerminationRate(
            id=row[0],
            trunk_id=row[1],
            prefix=row[2],
            cost_per_minute=row[3],
            connect_cost=row[4],
            included_seconds=row[5],
            init_inc=row[6],
            inc=row[7],
            strip=row[8],
            prepend=row[9],
            precedence=row[10],
            active=row[11],
        )
        for row in rows
    ]


# --- the tables ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    """One entity's query: ``SELECT <columns>, change_version FROM <table>`` plus its mapping."""

    columns: str
    table: str
    types: tuple[str, ...]  # binary COPY types of the columns, change_version excluded
    order: str  # ORDER BY of the full load ("" = unordered)
    key: tuple[str, ...]  # the columns of the entity key (snapshot.entity_key)
    key_types: tuple[str, ...]  # their PostgreSQL types, for the by-key filter
    mapper: Callable[[Iterable[Row], Links], list[Any]]

    def select(self) -> str:
        return f"SELECT {self.columns}, change_version FROM {self.table}"


_I8, _T, _B, _N, _I4 = "int8", "text", "bool", "numeric", "int4"

# In load order (the order of the loader's reads, not of ENTITY_TYPES).
_TABLES: dict[str, _Table] = {
    "localizations": _Table(
        "id, name, active, number_originate, cli_originate, cli_inbound, number_terminate, cli_terminate",
        "localizations",
        (_I8, _T, _B, _T, _T, _T, _T, _T),
        "id",
        ("id",),
        ("bigint",),
        _localizations,
    ),
    "gateways": _Table(
        "id, name, active, sip_profile, proxy, username, password, register, params::text",
        "gateways",
        (_I8, _T, _B, _T, _T, _T, _T, _B, _T),
        "id",
        ("id",),
        ("bigint",),
        _gateways,
    ),
    "trunks": _Table(
        "id, name, provider_id, gateway_id, active, precedence, max_channels, cps, codecs, leg_timeout,"
        " localization_id",
        "trunks",
        (_I8, _T, _I8, _I8, _B, _I4, _I4, _I4, _T, _I4, _I8),
        "id",
        ("id",),
        ("bigint",),
        _trunks,
    ),
    "rate_groups": _Table(
        "id, name, active, markup_percent, routing_type, init_inc, inc, lossless",
        "rate_groups",
        (_I8, _T, _B, _N, _T, _I4, _I4, _B),
        "id",
        ("id",),
        ("bigint",),
        _rate_groups,
    ),
    "accounts": _Table(
        "id, number, kind, reseller_id, status = 'active', deleted, postpaid, balance, credit_limit,"
        " rate_group_id, expiry, first_used, valid_days, expiry_from_first_use, non_cli_rate_group_id,"
        " cli_pool, localization_id, local_calls_allowed, local_call_cost_per_minute, max_channels, cps,"
        " codecs",
        "accounts",
        (
            _I8,
            _T,
            _T,
            _I8,
            _B,
            _B,
            _B,
            _N,
            _N,
            _I8,
            "timestamptz",
            "timestamptz",
            _I4,
            _B,
            _I8,
            "int2",
            _I8,
            _B,
            _N,
            _I4,
            _I4,
            _T,
        ),
        "id",
        ("id",),
        ("bigint",),
        _accounts,
    ),
    "sip_devices": _Table(
        "id, account_id, username, active, codecs, password, caller_id_name, caller_id_number, context",
        "sip_devices",
        (_I8, _I8, _T, _B, _T, _T, _T, _T, _T),
        "id",
        ("id",),
        ("bigint",),
        _sip_devices,
    ),
    "ip_map": _Table(
        "id, account_id, cidr, tech_prefix, active",
        "ip_map",
        (_I8, _I8, "cidr", _T, _B),
        "id",
        ("id",),
        ("bigint",),
        _ip_map,
    ),
    "caller_ids": _Table(
        "id, account_id, number, active",
        "caller_ids",
        (_I8, _I8, _T, _B),
        "id",
        ("id",),
        ("bigint",),
        _caller_ids,
    ),
    "forced_caller_ids": _Table(
        "account_id, number, name, active",
        "forced_caller_ids",
        (_I8, _T, _T, _B),
        "account_id",
        ("account_id",),
        ("bigint",),
        _forced_caller_ids,
    ),
    "dids": _Table(
        "id, number, account_id, active, destination_type, destination, max_channels, cps, connect_cost,"
        " cost_per_minute, init_inc, inc",
        "dids",
        (_I8, _T, _I8, _B, _T, _T, _I4, _I4, _N, _N, _I4, _I4),
        "id",
        ("id",),
        ("bigint",),
        _dids,
    ),
    "speed_dials": _Table(
        "account_id, key, number",
        "speed_dials",
        (_I8, _T, _T),
        "account_id, key",
        ("account_id", "key"),
        ("bigint", "text"),
        _speed_dials,
    ),
    "blocked_codes": _Table(
        "account_id, prefix",
        "blocked_codes",
        (_I8, _T),
        "account_id, prefix",
        ("account_id", "prefix"),
        ("bigint", "text"),
        _blocked_codes,
    ),
    "origination_rates": _Table(
        "id, prefix, cost_per_minute, rate_group_id, account_id, connect_cost, included_seconds, init_inc,"
        " inc, precedence, active, description",
        "origination_rates",
        (_I8, _T, _N, _I8, _I8, _N, _I4, _I4, _I4, _I4, _B, _T),
        "",
        ("id",),
        ("bigint",),
        _origination_rates,
    ),
    "termination_rates": _Table(
        "id, trunk_id, prefix, cost_per_minute, connect_cost, included_seconds, init_inc, inc, strip,"
        " prepend, precedence, active",
        "termination_rates",
        (_I8, _I8, _T, _N, _N, _I4, _I4, _I4, _T, _T, _I4, _B),
        "",
        ("id",),
        ("bigint",),
        _termination_rates,
    ),
}
assert set(_TABLES) == set(ENTITY_TYPES)

ENTITY_KEY_COLUMNS: dict[str, tuple[str, ...]] = {name: t.key for name, t in _TABLES.items()}
"""Entity name -> the columns its snapshot key is made of (joined with ":")."""


# --- the whole catalogue ---------------------------------------------------------------------


class _Reader:
    """Streams query results with binary COPY and tracks the highest change_version."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.version = 0

    def rows(self, select: str, types: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """Yield the rows of `select`, whose LAST column must be change_version (int8)."""
        version = self.version
        with self.conn.cursor() as cur, cur.copy(f"COPY ({select}) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types([*types, "int8"])
            for row in copy.rows():
                if row[-1] > version:
                    version = row[-1]
                yield row
        self.version = version

    def links(self, link: _Link) -> Links:
        found: Links = defaultdict(list)
        for parent, child, _ in self.rows(
            f"SELECT {link.parent}, {link.child}, change_version FROM {link.table} ORDER BY {link.order}",
            ["int8", "int8"],
        ):
            found[parent].append(child)
        return found


def load_catalog(conn: psycopg.Connection[Any]) -> CatalogData:
    """Read the whole catalogue the engine decides from (see the module docstring)."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return _load(conn)
    saved = (conn.isolation_level, conn.read_only)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        with conn.transaction():
            return _load(conn)
    finally:
        conn.isolation_level, conn.read_only = saved


def _load(conn: psycopg.Connection[Any]) -> CatalogData:
    r = _Reader(conn)
    data = CatalogData()
    for name, table in _TABLES.items():
        link = _LINKS.get(name)
        links = r.links(link) if link is not None else {}
        select = table.select() + (f" ORDER BY {table.order}" if table.order else "")
        setattr(data, name, table.mapper(r.rows(select, table.types), links))
    data.version = r.version
    return data


# --- single entities -------------------------------------------------------------------------


def load_entities(conn: psycopg.Connection[Any], name: str, keys: Collection[str]) -> dict[str, Any]:
    """The entities of type ``name`` with the given snapshot keys that exist, by key.

    Runs in the caller's transaction (use one REPEATABLE READ transaction to read a
    consistent set). A key that is absent from the result is absent from the database.
    Raises ValueError on an unknown entity name or a malformed key.
    """
    table = _TABLES.get(name)
    if table is None:
        raise ValueError(f"unknown entity type {name!r}")
    if not keys:
        return {}
    columns = _key_arrays(table, keys)
    width = len(table.key)
    if width == 1:
        where = f" WHERE {table.key[0]} = ANY(%s::{table.key_types[0]}[])"
    else:
        arrays = ", ".join(f"%s::{t}[]" for t in table.key_types)
        where = f" WHERE ({', '.join(table.key)}) IN (SELECT * FROM unnest({arrays}))"
    link = _LINKS.get(name)
    links: Links = {}
    with conn.cursor() as cur:
        if link is not None:
            cur.execute(
                f"SELECT {link.parent}, {link.child} FROM {link.table}"
                f" WHERE {link.parent} = ANY(%s::bigint[]) ORDER BY {link.order}",
                [columns[0]],
            )
            links = defaultdict(list)
            for parent, child in cur:
                links[parent].append(child)
        cur.execute(table.select() + where, columns)
        rows = [row[:-1] for row in cur.fetchall()]
    return {entity_key(obj): obj for obj in table.mapper(rows, links)}


def _key_arrays(table: _Table, keys: Collection[str]) -> list[list[Any]]:
    """Split snapshot keys into one array per key column (ints for bigint columns)."""
    width = len(table.key)
    arrays: list[list[Any]] = [[] for _ in range(width)]
    for key in keys:
        parts = str(key).split(":", width - 1) if width > 1 else [str(key)]
        if len(parts) != width:
            raise ValueError(f"{table.table}: malformed key {key!r}")
        for array, part, kind in zip(arrays, parts, table.key_types, strict=True):
            if kind == "bigint":
                try:
                    array.append(int(part))
                except ValueError:
                    raise ValueError(f"{table.table}: malformed key {key!r}") from None
            else:
                array.append(part)
    return arrays
