"""The account model as the engine sees it: immutable, decision-relevant facts.

These dataclasses are the contract between the PostgreSQL loader, the Redis
snapshot and the pure decision rules. PostgreSQL holds many more columns (the
whole ASTPP customer form); only what a call decision needs is mirrored here.

Conventions (deliberately not ASTPP's 0=yes/1=no):
- booleans are booleans, "unlimited" limits are 0, optional links are None;
- money is ``Decimal``; durations and increments are whole seconds;
- prefixes are digit strings ("" matches everything).
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any


class AccountKind(enum.StrEnum):
    CUSTOMER = "customer"
    RESELLER = "reseller"
    PROVIDER = "provider"


class RoutingType(enum.StrEnum):
    LCR = "lcr"  # longest prefix, then cost, then rate precedence, then trunk precedence
    COST = "cost"  # cost, then precedence


class DidDestinationType(enum.StrEnum):
    DEVICE = "device"  # one of the owner's SIP devices (destination = its username)
    URI = "uri"  # a SIP URI, bridged as sofia/external/<uri>
    NUMBER = "number"  # an external number, rated and routed as the owner's outbound call


class CliPool(enum.IntEnum):
    """Caller-ID rule values, decision-rules §4.4 (ASTPP's 0-8)."""

    DISABLED = 0
    KEEP_IF_IN_DIDS_ELSE_RANDOM_DID = 1
    KEEP_IF_IN_CALLER_IDS_ELSE_RANDOM_CALLER_ID = 2
    NON_CLI_RATES_UNLESS_IN_DIDS = 3
    NON_CLI_RATES_UNLESS_IN_CALLER_IDS = 4
    NON_CLI_RATES_UNLESS_IN_EITHER = 5
    REJECT_UNLESS_IN_DIDS = 6
    REJECT_UNLESS_IN_CALLER_IDS = 7
    REJECT_UNLESS_IN_EITHER = 8


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    number: str
    kind: AccountKind
    reseller_id: int | None  # None = owned by the admin (top of the chain)
    active: bool
    deleted: bool
    postpaid: bool
    balance: Decimal  # what the customer holds; negative = debt (postpaid)
    credit_limit: Decimal  # postpaid only; prepaid accounts carry 0
    rate_group_id: int | None
    expiry: datetime | None = None  # None = never expires (UTC)
    first_used: datetime | None = None
    valid_days: int | None = None  # with expiry_from_first_use: expiry = first_used + valid_days
    expiry_from_first_use: bool = False
    non_cli_rate_group_id: int | None = None
    cli_pool: CliPool = CliPool.DISABLED
    localization_id: int | None = None
    local_calls_allowed: bool = True
    local_call_cost_per_minute: Decimal = Decimal(0)
    max_channels: int = 0  # 0 = unlimited
    cps: int = 0  # 0 = unlimited
    codecs: str = ""  # comma list used when the trunk has none; "" = FreeSWITCH default
    # The call debits PostgreSQL has applied to ``balance`` (same row version): what Redis
    # settled beyond this is not in ``balance`` yet (engine.billing.funds).
    calls_debited: Decimal = Decimal(0)

    @property
    def usable(self) -> bool:
        return self.active and not self.deleted

    @property
    def available_credit(self) -> Decimal:
        return self.balance + self.credit_limit if self.postpaid else self.balance


@dataclass(frozen=True, slots=True)
class SipDevice:
    id: int
    account_id: int
    username: str
    active: bool = True
    codecs: str = ""
    # For FreeSWITCH's directory (engine.fsxml), not for the decision: digest auth's A1,
    # MD5(username:realm:password), made by the loader for the realm the sync is configured
    # with ([fsxml] domain); "" without a realm or a password. The clear password stays in
    # PostgreSQL: the snapshot is copied into every engine process and Redis replica.
    a1_hash: str = field(default="", repr=False)
    caller_id_name: str = ""
    caller_id_number: str = ""
    context: str = "default"


@dataclass(frozen=True, slots=True)
class IpMapEntry:
    id: int
    account_id: int
    cidr: str  # "203.0.113.0/24" or "2001:db8::/32"; a bare address means /32 or /128
    tech_prefix: str = ""
    active: bool = True


@dataclass(frozen=True, slots=True)
class CallerId:
    """A whitelisted caller ID of an account (the CLI pool's "caller IDs")."""

    id: int
    account_id: int
    number: str
    active: bool = True


@dataclass(frozen=True, slots=True)
class ForcedCallerId:
    account_id: int
    number: str
    name: str = ""
    active: bool = True


@dataclass(frozen=True, slots=True)
class Did:
    id: int
    number: str
    account_id: int | None  # None = unassigned
    active: bool = True
    destination_type: DidDestinationType = DidDestinationType.DEVICE
    destination: str = ""
    max_channels: int = 0
    cps: int = 0
    connect_cost: Decimal = Decimal(0)
    cost_per_minute: Decimal = Decimal(0)
    init_inc: int = 0
    inc: int = 0


@dataclass(frozen=True, slots=True)
class SpeedDial:
    account_id: int
    key: str
    number: str


@dataclass(frozen=True, slots=True)
class BlockedCode:
    account_id: int
    prefix: str


@dataclass(frozen=True, slots=True)
class Localization:
    """Number-translation rule sets, each 'match/replace,match/replace' (decision-rules §4.2)."""

    id: int
    name: str
    active: bool = True
    number_originate: str = ""  # destination, customer side
    cli_originate: str = ""  # caller ID of outbound/local calls, customer side
    cli_inbound: str = ""  # caller ID of inbound DID calls
    number_terminate: str = ""  # destination, trunk/provider side
    cli_terminate: str = ""  # caller ID, trunk/provider side


@dataclass(frozen=True, slots=True)
class RateGroup:
    id: int
    name: str
    active: bool = True
    markup_percent: Decimal = Decimal(0)
    routing_type: RoutingType = RoutingType.LCR
    init_inc: int = 0
    inc: int = 0
    lossless: bool = True
    trunk_ids: tuple[int, ...] = ()  # the rate group <-> trunk links


@dataclass(frozen=True, slots=True)
class OriginationRate:
    id: int
    prefix: str
    cost_per_minute: Decimal
    rate_group_id: int | None = None  # exactly one of rate_group_id / account_id is set
    account_id: int | None = None  # personal rate
    connect_cost: Decimal = Decimal(0)
    included_seconds: int = 0
    init_inc: int = 0
    inc: int = 0
    precedence: int = 0
    active: bool = True
    forced_trunk_ids: tuple[int, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class Gateway:
    id: int
    name: str  # the sofia gateway name: sofia/gateway/<name>/<number>
    active: bool = True
    # The sofia gateway definition served to FreeSWITCH (engine.fsxml), not used by the decision.
    # The carrier password is not here: engine.fsxml reads it from PostgreSQL itself, so that
    # no clear secret is ever in the snapshot (docs/freeswitch.md, "Credentials").
    sip_profile: str = "external"
    proxy: str = ""
    username: str = ""
    register: bool = False
    params: tuple[str, ...] = ()  # "name=value" sofia gateway params, sorted by name


@dataclass(frozen=True, slots=True)
class Trunk:
    id: int
    name: str
    provider_id: int
    gateway_id: int
    failover_gateway_ids: tuple[int, ...] = ()
    active: bool = True
    precedence: int = 0
    max_channels: int = 0
    cps: int = 0
    codecs: str = ""
    leg_timeout: int = 0  # 0 = the configured default
    localization_id: int | None = None


@dataclass(frozen=True, slots=True)
class TerminationRate:
    id: int
    trunk_id: int
    prefix: str
    cost_per_minute: Decimal
    connect_cost: Decimal = Decimal(0)
    included_seconds: int = 0
    init_inc: int = 0
    inc: int = 0
    strip: str = ""  # leading digits removed from the number sent to the carrier
    prepend: str = ""
    precedence: int = 0
    active: bool = True


@dataclass(slots=True)
class CatalogData:
    """Everything one snapshot holds, as plain entity lists (the loader's output)."""

    version: int = 0
    accounts: list[Account] = field(default_factory=list)
    sip_devices: list[SipDevice] = field(default_factory=list)
    ip_map: list[IpMapEntry] = field(default_factory=list)
    caller_ids: list[CallerId] = field(default_factory=list)
    forced_caller_ids: list[ForcedCallerId] = field(default_factory=list)
    dids: list[Did] = field(default_factory=list)
    speed_dials: list[SpeedDial] = field(default_factory=list)
    blocked_codes: list[BlockedCode] = field(default_factory=list)
    localizations: list[Localization] = field(default_factory=list)
    rate_groups: list[RateGroup] = field(default_factory=list)
    origination_rates: list[OriginationRate] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    trunks: list[Trunk] = field(default_factory=list)
    termination_rates: list[TerminationRate] = field(default_factory=list)
    # Rows of some entity types as the tuples of their packed records (engine.rules.packed)
    # instead of entities, for Catalog.build (the type's list above is then empty): a full load
    # packs them without building a million objects (engine.state.snapshot, RawSnapshot.decode).
    # In the order read; a key read twice comes twice, the last read is the row.
    records: dict[str, Iterable[tuple[Any, ...]]] = field(default_factory=dict)


ENTITY_TYPES: dict[str, type] = {
    "accounts": Account,
    "sip_devices": SipDevice,
    "ip_map": IpMapEntry,
    "caller_ids": CallerId,
    "forced_caller_ids": ForcedCallerId,
    "dids": Did,
    "speed_dials": SpeedDial,
    "blocked_codes": BlockedCode,
    "localizations": Localization,
    "rate_groups": RateGroup,
    "origination_rates": OriginationRate,
    "gateways": Gateway,
    "trunks": Trunk,
    "termination_rates": TerminationRate,
}
"""CatalogData field name -> entity class, in dependency order."""

ENTITY_KEY_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: ("id",) for name in ENTITY_TYPES},
    # Entities without an id are keyed by their natural key:
    "forced_caller_ids": ("account_id",),
    "speed_dials": ("account_id", "key"),
    "blocked_codes": ("account_id", "prefix"),
}
"""Entity name -> the fields of its key, the one declaration of entity keys: the snapshot's
hash fields, the live sync's change events, the catalogue's change tracking and the
loader's by-key reads all use it (:func:`entity_key_of`, fields joined with ":")."""


def _key_getter(fields: tuple[str, ...]) -> Callable[[Any], str]:
    if len(fields) == 1:
        getter = operator.attrgetter(fields[0])
        return lambda obj: str(getter(obj))
    getters = operator.attrgetter(*fields)
    return lambda obj: ":".join(map(str, getters(obj)))


_KEY_GETTERS: dict[str, Callable[[Any], str]] = {
    name: _key_getter(f) for name, f in ENTITY_KEY_FIELDS.items()
}


def entity_key_getter(name: str) -> Callable[[Any], str]:
    """The function giving the key of an entity of type ``name`` (fast: built once)."""
    return _KEY_GETTERS[name]


def entity_key_of(name: str, obj: Any) -> str:
    """The key of entity ``obj`` of type ``name`` (see :data:`ENTITY_KEY_FIELDS`)."""
    return _KEY_GETTERS[name](obj)


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What the engine learns of a call from FreeSWITCH's channel data."""

    uuid: str
    destination: str
    caller_id_number: str = ""
    caller_id_name: str = ""
    sip_auth_username: str = ""  # present only after digest auth
    network_ip: str = ""  # packet source (variable_sip_network_ip)
    account_code_header: str = ""  # e.g. P-Accountcode; trusted only from configured proxies
    switch_hostname: str = ""
