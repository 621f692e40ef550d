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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import pq

from engine.model import (
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


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


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

    data.localizations = [
        Localization(
            id=row[0], name=row[1], active=row[2], number_originate=row[3], cli_originate=row[4],
            cli_inbound=row[5], number_terminate=row[6], cli_terminate=row[7],
        )
        for row in r.rows(
            "SELECT id, name, active, number_originate, cli_originate, cli_inbound, number_terminate,"
            " cli_terminate, change_version FROM localizations ORDER BY id",
            ["int8", "text", "bool", "text", "text", "text", "text", "text"],
        )
    ]

    data.gateways = [
        Gateway(id=row[0], name=row[1], active=row[2])
        for row in r.rows(
            "SELECT id, name, active, change_version FROM gateways ORDER BY id", ["int8", "text", "bool"]
        )
    ]

    failovers: dict[int, list[int]] = defaultdict(list)
    for trunk_id, gateway_id, _ in r.rows(
        "SELECT trunk_id, gateway_id, change_version FROM trunk_failover_gateways"
        " ORDER BY trunk_id, position",
        ["int8", "int8"],
    ):
        failovers[trunk_id].append(gateway_id)
    data.trunks = [
        Trunk(
            id=row[0], name=row[1], provider_id=row[2], gateway_id=row[3],
            failover_gateway_ids=tuple(failovers.get(row[0], ())), active=row[4], precedence=row[5],
            max_channels=row[6], cps=row[7], codecs=row[8], leg_timeout=row[9], localization_id=row[10],
        )
        for row in r.rows(
            "SELECT id, name, provider_id, gateway_id, active, precedence, max_channels, cps, codecs,"
            " leg_timeout, localization_id, change_version FROM trunks ORDER BY id",
            ["int8", "text", "int8", "int8", "bool", "int4", "int4", "int4", "text", "int4", "int8"],
        )
    ]

    group_trunks: dict[int, list[int]] = defaultdict(list)
    for group_id, trunk_id, _ in r.rows(
        "SELECT rate_group_id, trunk_id, change_version FROM rate_group_trunks"
        " ORDER BY rate_group_id, trunk_id",
        ["int8", "int8"],
    ):
        group_trunks[group_id].append(trunk_id)
    data.rate_groups = [
        RateGroup(
            id=row[0], name=row[1], active=row[2], markup_percent=row[3], routing_type=RoutingType(row[4]),
            init_inc=row[5], inc=row[6], lossless=row[7], trunk_ids=tuple(group_trunks.get(row[0], ())),
        )
        for row in r.rows(
            "SELECT id, name, active, markup_percent, routing_type, init_inc, inc, lossless, change_version"
            " FROM rate_groups ORDER BY id",
            ["int8", "text", "bool", "numeric", "text", "int4", "int4", "bool"],
        )
    ]

    kinds = {k.value: k for k in AccountKind}
    pools = {p.value: p for p in CliPool}
    data.accounts = [
        Account(
            id=row[0], number=row[1], kind=kinds[row[2]], reseller_id=row[3], active=row[4], deleted=row[5],
            postpaid=row[6], balance=row[7], credit_limit=row[8], rate_group_id=row[9],
            expiry=_utc(row[10]), first_used=_utc(row[11]), valid_days=row[12],
            expiry_from_first_use=row[13], non_cli_rate_group_id=row[14], cli_pool=pools[row[15]],
            localization_id=row[16], local_calls_allowed=row[17], local_call_cost_per_minute=row[18],
            max_channels=row[19], cps=row[20], codecs=row[21],
        )
        for row in r.rows(
            "SELECT id, number, kind, reseller_id, status = 'active', deleted, postpaid, balance,"
            " credit_limit, rate_group_id, expiry, first_used, valid_days, expiry_from_first_use,"
            " non_cli_rate_group_id, cli_pool, localization_id, local_calls_allowed,"
            " local_call_cost_per_minute, max_channels, cps, codecs, change_version"
            " FROM accounts ORDER BY id",
            ["int8", "text", "text", "int8", "bool", "bool", "bool", "numeric", "numeric", "int8",
             "timestamptz", "timestamptz", "int4", "bool", "int8", "int2", "int8", "bool", "numeric",
             "int4", "int4", "text"],
        )
    ]

    data.sip_devices = [
        SipDevice(id=row[0], account_id=row[1], username=row[2], active=row[3], codecs=row[4])
        for row in r.rows(
            "SELECT id, account_id, username, active, codecs, change_version FROM sip_devices ORDER BY id",
            ["int8", "int8", "text", "bool", "text"],
        )
    ]

    data.ip_map = [
        IpMapEntry(id=row[0], account_id=row[1], cidr=str(row[2]), tech_prefix=row[3], active=row[4])
        for row in r.rows(
            "SELECT id, account_id, cidr, tech_prefix, active, change_version FROM ip_map ORDER BY id",
            ["int8", "int8", "cidr", "text", "bool"],
        )
    ]

    data.caller_ids = [
        CallerId(id=row[0], account_id=row[1], number=row[2], active=row[3])
        for row in r.rows(
            "SELECT id, account_id, number, active, change_version FROM caller_ids ORDER BY id",
            ["int8", "int8", "text", "bool"],
        )
    ]

    data.forced_caller_ids = [
        ForcedCallerId(account_id=row[0], number=row[1], name=row[2], active=row[3])
        for row in r.rows(
            "SELECT account_id, number, name, active, change_version FROM forced_caller_ids"
            " ORDER BY account_id",
            ["int8", "text", "text", "bool"],
        )
    ]

    destinations = {d.value: d for d in DidDestinationType}
    data.dids = [
        Did(
            id=row[0], number=row[1], account_id=row[2], active=row[3], destination_type=destinations[row[4]],
            destination=row[5], max_channels=row[6], cps=row[7], connect_cost=row[8],
            cost_per_minute=row[9], init_inc=row[10], inc=row[11],
        )
        for row in r.rows(
            "SELECT id, number, account_id, active, destination_type, destination, max_channels, cps,"
            " connect_cost, cost_per_minute, init_inc, inc, change_version FROM dids ORDER BY id",
            ["int8", "text", "int8", "bool", "text", "text", "int4", "int4", "numeric", "numeric",
             "int4", "int4"],
        )
    ]

    data.speed_dials = [
        SpeedDial(account_id=row[0], key=row[1], number=row[2])
        for row in r.rows(
            "SELECT account_id, key, number, change_version FROM speed_dials ORDER BY account_id, key",
            ["int8", "text", "text"],
        )
    ]

    data.blocked_codes = [
        BlockedCode(account_id=row[0], prefix=row[1])
        for row in r.rows(
            "SELECT account_id, prefix, change_version FROM blocked_codes ORDER BY account_id, prefix",
            ["int8", "text"],
        )
    ]

    forced: dict[int, list[int]] = defaultdict(list)
    for rate_id, trunk_id, _ in r.rows(
        "SELECT rate_id, trunk_id, change_version FROM origination_rate_trunks ORDER BY rate_id, trunk_id",
        ["int8", "int8"],
    ):
        forced[rate_id].append(trunk_id)
    no_trunks: tuple[int, ...] = ()
    # Costs, connect costs and descriptions repeat across rates: share one object per value
    # (a million rates hold a few thousand distinct ones), which saves most of the memory.
    shared: dict[Any, Any] = {}
    share = shared.setdefault
    data.origination_rates = [
        OriginationRate(
            id=row[0], prefix=row[1], cost_per_minute=share(row[2], row[2]), rate_group_id=row[3],
            account_id=row[4], connect_cost=share(row[5], row[5]), included_seconds=row[6],
            init_inc=row[7], inc=row[8], precedence=row[9], active=row[10],
            forced_trunk_ids=tuple(forced[row[0]]) if row[0] in forced else no_trunks,
            description=share(row[11], row[11]),
        )
        for row in r.rows(
            "SELECT id, prefix, cost_per_minute, rate_group_id, account_id, connect_cost,"
            " included_seconds, init_inc, inc, precedence, active, description, change_version"
            " FROM origination_rates",
            ["int8", "text", "numeric", "int8", "int8", "numeric", "int4", "int4", "int4", "int4",
             "bool", "text"],
        )
    ]

    data.termination_rates = [
        TerminationRate(
            id=row[0], trunk_id=row[1], prefix=row[2], cost_per_minute=row[3], connect_cost=row[4],
            included_seconds=row[5], init_inc=row[6], inc=row[7], strip=row[8], prepend=row[9],
            precedence=row[10], active=row[11],
        )
        for row in r.rows(
            "SELECT id, trunk_id, prefix, cost_per_minute, connect_cost, included_seconds, init_inc, inc,"
            " strip, prepend, precedence, active, change_version FROM termination_rates",
            ["int8", "int8", "text", "numeric", "numeric", "int4", "int4", "int4", "text", "text",
             "int4", "bool"],
        )
    ]

    data.version = r.version
    return data
