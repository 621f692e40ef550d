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

No clear secret is read: a SIP device comes with its digest ``a1_hash``,
MD5(username:realm:password), computed by PostgreSQL for the ``realm`` the caller passes
(the sync's ``[fsxml] domain``; "" gives no hash), and a gateway without its password
(``engine.fsxml.credentials`` reads that itself). The snapshot built from these entities
is copied into every engine and Redis replica; the passwords stay in PostgreSQL.

Single entities (the live sync, :func:`load_entities`) are read with the same
column lists and the same row mapping, filtered by entity key
(``engine.model.ENTITY_KEY_FIELDS``: the id, or ``account_id``, ``account_id:key``,
``account_id:prefix`` for forced caller IDs, speed dials and blocked codes), in the
caller's transaction.

Each table is declared once, as a column spec (:class:`_Table` of :class:`_Col`): the
SELECT list, the binary COPY types and the row mapper are all derived from it. The
mapper is compiled from the spec at import into a positional list comprehension, as
fast as the hand-written ones it replaces.
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
    ENTITY_KEY_FIELDS,
    ENTITY_TYPES,
    AccountKind,
    CatalogData,
    CliPool,
    DidDestinationType,
    RoutingType,
)
from engine.state.snapshot import entity_key  # the snapshot owns the key format

__all__ = ["load_catalog", "load_entities", "load_gateway_passwords"]

Row = tuple[Any, ...]
Links = dict[int, list[int]]


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _gateway_params(text: str) -> tuple[str, ...]:
    """The gateways.params JSON object as sorted "name=value" strings (scalars as JSON writes them)."""
    params = json.loads(text)
    return tuple(
        f"{name}={value if isinstance(value, str) else json.dumps(value)}"
        for name, value in sorted(params.items())
    )


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


# --- the tables: one column spec each ------------------------------------------------------


@dataclass(frozen=True)
class _Col:
    """One column read for an entity: the model's field it fills, its binary COPY type, the
    SELECT expression when it is not simply the field's column, and how the value is
    converted (a Python expression around ``{}``, e.g. ``_utc({})``, over _CONVERT)."""

    field: str
    type: str
    sql: str = ""
    convert: str = "{}"
    shared: bool = False  # one object per distinct value (values that repeat across millions of rows)

    @property
    def expression(self) -> str:
        return self.sql or self.field


# Names the conversions may use.
_CONVERT: dict[str, Any] = {
    "_utc": _utc,
    "_gateway_params": _gateway_params,
    "_KINDS": {k.value: k for k in AccountKind},
    "_POOLS": {p.value: p for p in CliPool},
    "_DESTINATIONS": {d.value: d for d in DidDestinationType},
    "_ROUTING": {r.value: r for r in RoutingType},
}

_I8, _T, _B, _N, _I4 = "int8", "text", "bool", "numeric", "int4"

# Digest auth's A1 for the realm given as the query parameter ``realm``; "" without a realm
# or a password (FreeSWITCH's allow-empty-password=false then refuses the device). md5()
# hashes the UTF-8 bytes in a UTF8 database, as FreeSWITCH does.
_A1_HASH = (
    "CASE WHEN password = '' OR %(realm)s::text = '' THEN ''"
    " ELSE md5(username || ':' || %(realm)s::text || ':' || password) END"
)
_KEY_TYPES = {_I8: "bigint", _T: "text"}  # the by-key filter's array types


@dataclass(frozen=True)
class _Table:
    """One entity's query (``SELECT <columns>, change_version FROM <table>``), its COPY types,
    its entity key and its row mapper, all derived from one column spec."""

    name: str  # the CatalogData field / snapshot entity name
    table: str
    columns: tuple[_Col, ...]
    order: str = ""  # ORDER BY of the full load ("" = unordered)
    links_field: str = ""  # the field filled from _LINKS[name] (children of the row's id)

    @property
    def types(self) -> tuple[str, ...]:
        """Binary COPY types of the columns, change_version excluded."""
        return tuple(c.type for c in self.columns)

    @property
    def key(self) -> tuple[str, ...]:
        """The columns of the entity key (engine.model.ENTITY_KEY_FIELDS)."""
        return ENTITY_KEY_FIELDS[self.name]

    @property
    def key_types(self) -> tuple[str, ...]:
        by_field = {c.field: c.type for c in self.columns}
        return tuple(_KEY_TYPES[by_field[f]] for f in self.key)

    @property
    def needs_realm(self) -> bool:
        """Whether the SELECT takes the ``realm`` parameter (the devices' a1-hash)."""
        return any("%(realm)s" in c.sql for c in self.columns)

    def select(self) -> str:
        return f"SELECT {', '.join(c.expression for c in self.columns)}, change_version FROM {self.table}"

    def mapper(self) -> Callable[[Iterable[Row], Links], list[Any]]:
        """``(rows, links) -> entities``, compiled once from the spec: a positional list
        comprehension as fast as a hand-written one (a million rates go through it)."""
        args = []
        for i, col in enumerate(self.columns):
            value = col.convert.format(f"row[{i}]")
            args.append(f"{col.field}=share({value}, {value})" if col.shared else f"{col.field}={value}")
        if self.links_field:
            args.append(f"{self.links_field}=tuple(links[row[0]]) if row[0] in links else ()")
        source = (
            "def mapper(rows, links):\n"
            "    share = {}.setdefault\n"
            f"    return [cls({', '.join(args)}) for row in rows]\n"
        )
        namespace: dict[str, Any] = {**_CONVERT, "cls": ENTITY_TYPES[self.name]}
        exec(compile(source, f"<loader mapper {self.name}>", "exec"), namespace)
        mapper: Callable[[Iterable[Row], Links], list[Any]] = namespace["mapper"]
        return mapper


def _c(field: str, type_: str, **extra: Any) -> _Col:
    return _Col(field, type_, **extra)


# In load order (the order of the loader's reads, not of ENTITY_TYPES).
_SPECS: tuple[_Table, ...] = (
    _Table(
        "localizations",
        "localizations",
        (
            _c("id", _I8), _c("name", _T), _c("active", _B), _c("number_originate", _T),
            _c("cli_originate", _T), _c("cli_inbound", _T), _c("number_terminate", _T),
            _c("cli_terminate", _T),
        ),
        order="id",
    ),
    _Table(
        "gateways",
        "gateways",
        (
            _c("id", _I8), _c("name", _T), _c("active", _B), _c("sip_profile", _T), _c("proxy", _T),
            _c("username", _T), _c("register", _B),
            _c("params", _T, sql="params::text", convert="_gateway_params({})"),
        ),
        order="id",
    ),
    _Table(
        "trunks",
        "trunks",
        (
            _c("id", _I8), _c("name", _T), _c("provider_id", _I8), _c("gateway_id", _I8),
            _c("active", _B), _c("precedence", _I4), _c("max_channels", _I4), _c("cps", _I4),
            _c("codecs", _T), _c("leg_timeout", _I4), _c("localization_id", _I8),
        ),
        order="id",
        links_field="failover_gateway_ids",
    ),
    _Table(
        "rate_groups",
        "rate_groups",
        (
            _c("id", _I8), _c("name", _T), _c("active", _B), _c("markup_percent", _N),
            _c("routing_type", _T, convert="_ROUTING[{}]"), _c("init_inc", _I4), _c("inc", _I4),
            _c("lossless", _B),
        ),
        order="id",
        links_field="trunk_ids",
    ),
    _Table(
        "accounts",
        "accounts",
        (
            _c("id", _I8), _c("number", _T), _c("kind", _T, convert="_KINDS[{}]"),
            _c("reseller_id", _I8), _c("active", _B, sql="status = 'active'"), _c("deleted", _B),
            _c("postpaid", _B), _c("balance", _N), _c("credit_limit", _N), _c("rate_group_id", _I8),
            _c("expiry", "timestamptz", convert="_utc({})"),
            _c("first_used", "timestamptz", convert="_utc({})"), _c("valid_days", _I4),
            _c("expiry_from_first_use", _B), _c("non_cli_rate_group_id", _I8),
            _c("cli_pool", "int2", convert="_POOLS[{}]"), _c("localization_id", _I8),
            _c("local_calls_allowed", _B), _c("local_call_cost_per_minute", _N),
            _c("max_channels", _I4), _c("cps", _I4), _c("codecs", _T), _c("calls_debited", _N),
        ),
        order="id",
    ),
    _Table(
        "sip_devices",
        "sip_devices",
        (
            _c("id", _I8), _c("account_id", _I8), _c("username", _T), _c("active", _B), _c("codecs", _T),
            _c("a1_hash", _T, sql=_A1_HASH), _c("caller_id_name", _T), _c("caller_id_number", _T),
            _c("context", _T),
        ),
        order="id",
    ),
    _Table(
        "ip_map",
        "ip_map",
        (
            _c("id", _I8), _c("account_id", _I8), _c("cidr", "cidr", convert="str({})"),
            _c("tech_prefix", _T), _c("active", _B),
        ),
        order="id",
    ),
    _Table(
        "caller_ids",
        "caller_ids",
        (_c("id", _I8), _c("account_id", _I8), _c("number", _T), _c("active", _B)),
        order="id",
    ),
    _Table(
        "forced_caller_ids",
        "forced_caller_ids",
        (_c("account_id", _I8), _c("number", _T), _c("name", _T), _c("active", _B)),
        order="account_id",
    ),
    _Table(
        "dids",
        "dids",
        (
            _c("id", _I8), _c("number", _T), _c("account_id", _I8), _c("active", _B),
            _c("destination_type", _T, convert="_DESTINATIONS[{}]"), _c("destination", _T),
            _c("max_channels", _I4), _c("cps", _I4), _c("connect_cost", _N),
            _c("cost_per_minute", _N), _c("init_inc", _I4), _c("inc", _I4),
        ),
        order="id",
    ),
    _Table(
        "speed_dials",
        "speed_dials",
        (_c("account_id", _I8), _c("key", _T), _c("number", _T)),
        order="account_id, key",
    ),
    _Table(
        "blocked_codes",
        "blocked_codes",
        (_c("account_id", _I8), _c("prefix", _T)),
        order="account_id, prefix",
    ),
    _Table(
        "origination_rates",
        "origination_rates",
        (
            _c("id", _I8), _c("prefix", _T), _c("cost_per_minute", _N, shared=True),
            _c("rate_group_id", _I8), _c("account_id", _I8), _c("connect_cost", _N, shared=True),
            _c("included_seconds", _I4), _c("init_inc", _I4), _c("inc", _I4), _c("precedence", _I4),
            _c("active", _B), _c("description", _T, shared=True),
        ),
        links_field="forced_trunk_ids",
    ),
    _Table(
        "termination_rates",
        "termination_rates",
        (
            _c("id", _I8), _c("trunk_id", _I8), _c("prefix", _T), _c("cost_per_minute", _N),
            _c("connect_cost", _N), _c("included_seconds", _I4), _c("init_inc", _I4), _c("inc", _I4),
            _c("strip", _T), _c("prepend", _T), _c("precedence", _I4), _c("active", _B),
        ),
    ),
)  # fmt: skip
_TABLES: dict[str, _Table] = {t.name: t for t in _SPECS}
_MAPPERS: dict[str, Callable[[Iterable[Row], Links], list[Any]]] = {t.name: t.mapper() for t in _SPECS}
assert set(_TABLES) == set(ENTITY_TYPES)
assert set(_LINKS) == {t.name for t in _SPECS if t.links_field}


# --- the whole catalogue ---------------------------------------------------------------------


class _Reader:
    """Streams query results with binary COPY and tracks the highest change_version."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.version = 0

    def rows(
        self, select: str, types: Sequence[str], params: dict[str, Any] | None = None
    ) -> Iterator[tuple[Any, ...]]:
        """Yield the rows of `select`, whose LAST column must be change_version (int8)."""
        version = self.version
        statement = f"COPY ({select}) TO STDOUT (FORMAT BINARY)"
        with self.conn.cursor() as cur, cur.copy(statement, params) as copy:
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


def load_catalog(conn: psycopg.Connection[Any], realm: str = "") -> CatalogData:
    """Read the whole catalogue the engine decides from (see the module docstring); SIP devices
    carry their a1-hash for ``realm``."""
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return _load(conn, realm)
    saved = (conn.isolation_level, conn.read_only)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        with conn.transaction():
            return _load(conn, realm)
    finally:
        conn.isolation_level, conn.read_only = saved


def _load(conn: psycopg.Connection[Any], realm: str) -> CatalogData:
    r = _Reader(conn)
    data = CatalogData()
    for name, table in _TABLES.items():
        link = _LINKS.get(name)
        links = r.links(link) if link is not None else {}
        select = table.select() + (f" ORDER BY {table.order}" if table.order else "")
        params = {"realm": realm} if table.needs_realm else None
        setattr(data, name, _MAPPERS[name](r.rows(select, table.types, params), links))
    data.version = r.version
    return data


# --- single entities -------------------------------------------------------------------------


def load_entities(
    conn: psycopg.Connection[Any], name: str, keys: Collection[str], realm: str = ""
) -> dict[str, Any]:
    """The entities of type ``name`` with the given snapshot keys that exist, by key
    (SIP devices with their a1-hash for ``realm``, as :func:`load_catalog`).

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
    params: dict[str, Any] = {f"key{i}": column for i, column in enumerate(columns)}
    if table.needs_realm:
        params["realm"] = realm
    width = len(table.key)
    if width == 1:
        where = f" WHERE {table.key[0]} = ANY(%(key0)s::{table.key_types[0]}[])"
    else:
        arrays = ", ".join(f"%(key{i})s::{t}[]" for i, t in enumerate(table.key_types))
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
        cur.execute(table.select() + where, params)
        rows = [row[:-1] for row in cur.fetchall()]
    return {entity_key(obj): obj for obj in _MAPPERS[name](rows, links)}


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


# --- carrier passwords (engine.fsxml, never the snapshot) -------------------------------------


def load_gateway_passwords(conn: psycopg.Connection[Any]) -> dict[int, str]:
    """gateway id -> carrier password, for the gateways that have one.

    Only ``callgate fsxml`` reads these (sofia needs them in clear to register); they are
    kept out of :func:`load_catalog`, so that the snapshot never holds them.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT id, password FROM gateways WHERE password <> ''")
        return {int(ident): str(password) for ident, password in cur}
