"""A terse way to build catalogs for rule tests: defaults for everything, ids handed out."""

from __future__ import annotations

import dataclasses
import itertools
import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from engine.decision import Decision
from engine.model import (
    Account,
    AccountKind,
    BlockedCode,
    CallerId,
    CallRequest,
    CatalogData,
    Did,
    DidDestinationType,
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
from engine.rules import Catalog, DecisionContext, RulesConfig, decide

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
Entity = TypeVar("Entity", bound="DataclassInstance")  # every catalog entity is a dataclass


def money(value: str | int | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


class CatalogBuilder:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._rows: dict[str, dict[int, Any]] = {name: {} for name in _KINDS}

    def _add(self, kind: str, entity: Entity) -> Entity:
        key = getattr(entity, "id", None)
        self._rows[kind][self._next() if key is None else key] = entity  # rows without an id: any key
        return entity

    def _next(self) -> int:
        return next(self._ids)

    def update(self, entity: Entity, **changes: Any) -> Entity:
        """Change the stored row with ``entity``'s id (the latest version of it) and
        return the changed copy; earlier copies held by a test are not changed."""
        for rows in self._rows.values():
            current = rows.get(entity.id)  # type: ignore[attr-defined]
            if current is not None and type(current) is type(entity):
                changed = dataclasses.replace(current, **changes)
                rows[entity.id] = changed  # type: ignore[attr-defined]
                return changed
        raise KeyError(entity)

    def account(
        self,
        number: str,
        *,
        balance: str | int = "10",
        credit_limit: str | int = "0",
        postpaid: bool = False,
        rate_group: RateGroup | None = None,
        reseller: Account | None = None,
        kind: AccountKind = AccountKind.CUSTOMER,
        **extra: Any,
    ) -> Account:
        return self._add(
            "accounts",
            Account(
                id=self._next(),
                number=number,
                kind=kind,
                reseller_id=reseller.id if reseller else None,
                active=extra.pop("active", True),
                deleted=extra.pop("deleted", False),
                postpaid=postpaid,
                balance=money(balance),
                credit_limit=money(credit_limit),
                rate_group_id=rate_group.id if rate_group else None,
                **extra,
            ),
        )

    def reseller(self, number: str, **kwargs: Any) -> Account:
        return self.account(number, kind=AccountKind.RESELLER, **kwargs)

    def provider(self, number: str = "prov", **kwargs: Any) -> Account:
        return self.account(number, kind=AccountKind.PROVIDER, **kwargs)

    def device(self, username: str, account: Account, **extra: Any) -> SipDevice:
        return self._add("sip_devices", SipDevice(self._next(), account.id, username, **extra))

    def ip(self, cidr: str, account: Account, tech_prefix: str = "", **extra: Any) -> IpMapEntry:
        return self._add("ip_map", IpMapEntry(self._next(), account.id, cidr, tech_prefix, **extra))

    def group(
        self, name: str, *, markup: str | int = "0", trunks: tuple[Trunk, ...] = (), **extra: Any
    ) -> RateGroup:
        return self._add(
            "rate_groups",
            RateGroup(
                self._next(),
                name,
                markup_percent=money(markup),
                trunk_ids=tuple(t.id for t in trunks),
                **extra,
            ),
        )

    def link(self, group: RateGroup, *trunks: Trunk) -> RateGroup:
        current = self._rows["rate_groups"][group.id]
        return self.update(group, trunk_ids=current.trunk_ids + tuple(t.id for t in trunks))

    def rate(
        self,
        owner: RateGroup | Account,
        prefix: str,
        cost: str | int | Decimal,
        *,
        forced: tuple[Trunk, ...] = (),
        **extra: Any,
    ) -> OriginationRate:
        personal = isinstance(owner, Account)
        if "connect_cost" in extra:
            extra["connect_cost"] = money(extra["connect_cost"])
        return self._add(
            "origination_rates",
            OriginationRate(
                self._next(),
                prefix,
                money(cost),
                rate_group_id=None if personal else owner.id,
                account_id=owner.id if personal else None,
                forced_trunk_ids=tuple(t.id for t in forced),
                **extra,
            ),
        )

    def gateway(self, name: str, **extra: Any) -> Gateway:
        return self._add("gateways", Gateway(self._next(), name, **extra))

    def trunk(
        self,
        name: str,
        gateway: Gateway,
        provider: Account,
        *,
        failover: tuple[Gateway, ...] = (),
        **extra: Any,
    ) -> Trunk:
        return self._add(
            "trunks",
            Trunk(
                self._next(),
                name,
                provider.id,
                gateway.id,
                failover_gateway_ids=tuple(g.id for g in failover),
                **extra,
            ),
        )

    def termination(
        self, trunk: Trunk, prefix: str, cost: str | int | Decimal, **extra: Any
    ) -> TerminationRate:
        return self._add(
            "termination_rates", TerminationRate(self._next(), trunk.id, prefix, money(cost), **extra)
        )

    # -- §1 and §4: DIDs, caller IDs, speed dials, blocked codes, localizations -------

    def did(
        self,
        number: str,
        owner: Account | None,
        kind: DidDestinationType = DidDestinationType.DEVICE,
        destination: str = "",
        **extra: Any,
    ) -> Did:
        for name in ("connect_cost", "cost_per_minute"):
            if name in extra:
                extra[name] = money(extra[name])
        return self._add(
            "dids",
            Did(
                self._next(),
                number,
                owner.id if owner else None,
                destination_type=kind,
                destination=destination,
                **extra,
            ),
        )

    def caller_id(self, number: str, account: Account, **extra: Any) -> CallerId:
        return self._add("caller_ids", CallerId(self._next(), account.id, number, **extra))

    def forced_caller_id(self, account: Account, number: str, name: str = "", **extra: Any) -> ForcedCallerId:
        return self._add("forced_caller_ids", ForcedCallerId(account.id, number, name, **extra))

    def speed_dial(self, account: Account, key: str, number: str) -> SpeedDial:
        return self._add("speed_dials", SpeedDial(account.id, key, number))

    def blocked(self, account: Account, prefix: str) -> BlockedCode:
        return self._add("blocked_codes", BlockedCode(account.id, prefix))

    def localization(self, name: str, **rule_sets: Any) -> Localization:
        return self._add("localizations", Localization(self._next(), name, **rule_sets))

    def data(self) -> CatalogData:
        # one list per entity field of CatalogData, each of its own entity type
        lists: dict[str, Any] = {kind: list(rows.values()) for kind, rows in self._rows.items()}
        return CatalogData(version=1, **lists)

    def build(self) -> Catalog:
        return Catalog.build(self.data())


_KINDS = (
    "accounts",
    "sip_devices",
    "ip_map",
    "caller_ids",
    "forced_caller_ids",
    "dids",
    "speed_dials",
    "blocked_codes",
    "localizations",
    "rate_groups",
    "origination_rates",
    "gateways",
    "trunks",
    "termination_rates",
)


class World:
    """One customer 1001 (prepaid, 10.00, device alice) in group Retail with a rate for
    44 at 0.10/min, routed over trunk carrier-a (gateway gw-a) at 0.05/min for 44."""

    def __init__(self) -> None:
        b = self.b = CatalogBuilder()
        self.provider = b.provider("prov-1")
        self.gw_a = b.gateway("gw-a")
        self.carrier_a = b.trunk("carrier-a", self.gw_a, self.provider)
        self.retail = b.group("Retail", trunks=(self.carrier_a,))
        self.customer = b.account("1001", balance="10", rate_group=self.retail)
        self.alice = b.device("alice", self.customer)
        self.rate_44 = b.rate(self.retail, "44", "0.10")
        self.term_a = b.termination(self.carrier_a, "44", "0.05")

    def catalog(self) -> Catalog:
        return self.b.build()


def call(destination: str = "442071234567", **fields: Any) -> CallRequest:
    fields.setdefault("sip_auth_username", "alice")
    fields.setdefault("caller_id_number", "1001")
    fields.setdefault("caller_id_name", "Alice")
    return CallRequest(uuid="call-1", destination=destination, **fields)


def context(*, explain: bool = False, now: datetime = NOW, **config: Any) -> DecisionContext:
    return DecisionContext(now=now, rng=random.Random(7), config=RulesConfig(**config), explain=explain)


def run(catalog: Catalog, request: CallRequest | None = None, **ctx: Any) -> Decision:
    return decide(request or call(), catalog, context(**ctx))
