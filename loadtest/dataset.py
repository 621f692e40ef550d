"""Deterministic account model at load-test scale, and the call mix that exercises it.

``generate(Scale(...))`` builds a :class:`~engine.model.CatalogData` from a seed alone
(same scale and seed -> the same entities, byte for byte once encoded), and
``ensure_published`` writes it into Redis with the engine's own
:func:`~engine.state.snapshot.publish_snapshot` under a private key prefix, so a load run
needs no PostgreSQL. The engine reads it as it reads any snapshot.

The data is laid out so that every call class of the mix is reachable without search:
the role of an account is a function of its index (``index % 100``), so the mix picks a
caller of a given kind in O(1) whatever the number of accounts.

================  ======================================================================
index % 100       role
================  ======================================================================
1                 buys through an inactive reseller  -> ACCOUNT_INACTIVE (an inactive
                  customer is refused earlier, by identification: AUTHENTICATION_FAIL)
2                 expired account                    -> ACCOUNT_EXPIRED
3, 4              balance 0                          -> NO_SUFFICIENT_FUND
5                 max_channels 1, cps 1 ("tight")    -> CONCURRENT_LIMIT / CPS_LIMIT (limits step)
6                 blocks the code ``BLOCKED_CODE``   -> DESTINATION_BLOCKED (number handling)
7..16             identified by IP map (10.x.y.z/32) instead of a SIP device
other             ordinary prepaid customer with a SIP device ``u<number>``
================  ======================================================================

Accounts below ``resellers`` are resellers; every third customer buys through one (a
two-level chain: both levels are rated and counted). Ordinary accounts carry channel and
CPS limits high enough never to refuse, so the limits step does its Redis round trip on
every accepted call (the common case the budget is about).

Numbers: origination rates share one prefix universe (country code + area digits); every
rate group prices the whole universe, so ``rates = groups * prefixes``. Trunks terminate
the routable country codes, plus extra longer prefixes; codes in ``UNROUTED_CODES`` are
rated but terminated by no trunk (TERMINATION_RATE_NOT_FOUND); destinations starting with
``0`` match no origination rate (ORIGINATION_RATE_NOT_FOUND). Termination costs are always
below origination costs, so loss-less groups keep every route.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from engine.model import (
    ENTITY_TYPES,
    Account,
    AccountKind,
    BlockedCode,
    CatalogData,
    Gateway,
    IpMapEntry,
    OriginationRate,
    RateGroup,
    SipDevice,
    TerminationRate,
    Trunk,
)

__all__ = [
    "BLOCKED_CODE",
    "CALL_CLASSES",
    "DEFAULT_MIX",
    "ENTITY_NAMES",
    "UNROUTED_CODES",
    "CallMix",
    "CallPlan",
    "Scale",
    "ensure_published",
    "generate",
    "scale_fingerprint",
]

ENTITY_NAMES = tuple(ENTITY_TYPES)  # the CatalogData lists, in dependency order

# Country codes the universe is built from (E.164 codes; none starts with 0).
ROUTED_CODES = (
    "1",
    "7",
    "20",
    "27",
    "30",
    "31",
    "32",
    "33",
    "34",
    "36",
    "39",
    "40",
    "41",
    "43",
    "44",
    "45",
    "46",
    "47",
    "48",
    "49",
    "51",
    "52",
    "53",
    "54",
    "55",
    "56",
    "57",
    "58",
    "60",
    "61",
    "62",
    "63",
    "64",
    "65",
    "66",
    "81",
    "82",
    "84",
    "86",
    "90",
    "91",
    "92",
    "93",
    "94",
    "95",
    "98",
    "211",
    "212",
    "213",
    "216",
    "218",
    "220",
    "221",
    "222",
    "223",
    "224",
    "225",
    "226",
    "227",
    "228",
    "229",
    "230",
    "231",
    "232",
    "233",
    "234",
    "235",
    "236",
    "237",
    "238",
    "239",
    "240",
    "241",
    "242",
    "243",
    "244",
    "245",
    "246",
    "248",
    "249",
    "250",
    "251",
    "252",
    "253",
    "254",
    "255",
    "256",
    "257",
    "258",
    "260",
    "261",
    "262",
    "263",
    "264",
    "265",
    "266",
    "267",
    "268",
    "269",
    "290",
    "291",
    "297",
    "298",
    "299",
    "350",
    "351",
    "352",
    "353",
    "354",
    "355",
    "356",
    "357",
    "358",
    "359",
    "370",
    "371",
    "372",
    "373",
    "374",
    "375",
    "376",
    "377",
    "378",
    "380",
    "381",
    "382",
    "383",
    "385",
    "386",
    "387",
    "389",
    "420",
    "421",
    "423",
    "852",
    "853",
    "855",
    "856",
    "880",
    "886",
    "960",
    "961",
    "962",
    "963",
    "964",
    "965",
    "966",
    "967",
    "968",
    "970",
    "971",
    "972",
    "973",
    "974",
    "975",
    "976",
    "977",
    "992",
    "993",
    "994",
    "995",
    "996",
    "998",
)
# Rated by every group, terminated by no trunk (global networks): TERMINATION_RATE_NOT_FOUND.
UNROUTED_CODES = ("881", "882", "883")
# Blocked by the accounts with index % 100 == 6.
BLOCKED_CODE = "900"
DESTINATION_LENGTH = 12  # digits of a generated destination
EXPIRED_AT = datetime(2020, 1, 1, tzinfo=UTC)
# A live carrier's accounts have mostly made calls before: all but the ROLE_NEW ones carry a
# first use, so the engine publishes a first-use event for 2 % of accounts, not for every call.
FIRST_USED_AT = datetime(2025, 1, 1, tzinfo=UTC)

# Account roles by index % 100 (see the module docstring).
ROLE_INACTIVE = 1
ROLE_EXPIRED = 2
ROLE_NO_FUNDS = (3, 4)
ROLE_TIGHT = 5
ROLE_BLOCKS = 6
ROLE_IP_MAP = range(7, 17)
ROLE_NEW = (49, 99)  # never used yet: their first authorized call is recorded
_SPECIAL = {ROLE_INACTIVE, ROLE_EXPIRED, *ROLE_NO_FUNDS, ROLE_TIGHT, ROLE_BLOCKS, *ROLE_IP_MAP}
ORDINARY_RESIDUES = tuple(r for r in range(100) if r not in _SPECIAL)

# Distinct money values, shared by every row (a million Decimals would cost ~100 MB).
_ORIGINATION_COSTS = tuple(Decimal(f"0.{n:04d}") for n in range(200, 5000, 7))  # 0.02 .. 0.50
_TERMINATION_COSTS = tuple(Decimal(f"0.{n:04d}") for n in range(10, 150, 3))  # 0.001 .. 0.015
_ZERO = Decimal(0)


@dataclass(frozen=True)
class Scale:
    """How big the generated model is. ``rates`` is rounded to ``groups * prefixes``."""

    accounts: int = 100_000
    rates: int = 1_000_000
    trunks: int = 50
    groups: int = 100
    termination_rates: int = 100_000
    resellers: int = 0  # 0: accounts // 100
    trunks_per_group: int = 5
    seed: int = 1
    limits: bool = True  # False: every channel/CPS limit 0 (unlimited): no limits round trip at all

    @property
    def prefixes(self) -> int:
        """Origination prefixes in the universe (each group rates all of them)."""
        return max(len(ROUTED_CODES) + len(UNROUTED_CODES), self.rates // max(1, self.groups))

    @property
    def reseller_count(self) -> int:
        return self.resellers or max(1, self.accounts // 100)

    def label(self) -> str:
        rates = _short(self.groups * self.prefixes)
        text = f"{_short(self.accounts)} accounts, {rates} rates, {self.trunks} trunks"
        return text if self.limits else text + ", no limits"


def _short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def scale_fingerprint(scale: Scale) -> int:
    """A stable id of (scale, generator version): stored as the snapshot's source version."""
    text = json.dumps({**dataclasses.asdict(scale), "generator": 5}, sort_keys=True)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def account_number(index: int) -> str:
    return str(1_000_000 + index)


def device_username(index: int) -> str:
    return f"u{1_000_000 + index}"


def account_ip(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


def _universe(scale: Scale, rng: random.Random) -> tuple[list[str], list[str]]:
    """(routable prefixes, unrouted prefixes): distinct, none starting with 0."""
    wanted = scale.prefixes
    unrouted = [code for code in UNROUTED_CODES]
    routed = list(ROUTED_CODES)
    seen = set(routed) | set(unrouted)
    unrouted_share = max(len(UNROUTED_CODES), wanted // 50)  # ~2 % of the universe
    while len(unrouted) < unrouted_share:
        prefix = rng.choice(UNROUTED_CODES) + str(rng.randrange(10, 10_000))
        if prefix not in seen:
            seen.add(prefix)
            unrouted.append(prefix)
    while len(routed) + len(unrouted) < wanted:
        code = rng.choice(ROUTED_CODES)
        prefix = code + str(rng.randrange(1, 10 ** rng.randint(1, 5)))
        if prefix not in seen and not prefix.startswith(BLOCKED_CODE):
            seen.add(prefix)
            routed.append(prefix)
    return routed, unrouted


def generate(scale: Scale) -> CatalogData:
    """The whole model for ``scale`` (deterministic in ``scale``)."""
    rng = random.Random(scale.seed)
    ids = _Ids()
    data = CatalogData(version=scale_fingerprint(scale))

    # Providers own the trunks; each trunk has a primary and a failover gateway.
    providers = [
        Account(ids.next(), f"P{n:04d}", AccountKind.PROVIDER, None, True, False, False, _ZERO, _ZERO, None)
        for n in range(max(1, scale.trunks // 5))
    ]
    trunks: list[Trunk] = []
    for n in range(scale.trunks):
        primary = Gateway(ids.next(), f"gw{n:03d}a")
        failover = Gateway(ids.next(), f"gw{n:03d}b")
        data.gateways += [primary, failover]
        trunks.append(
            Trunk(
                ids.next(),
                f"carrier{n:03d}",
                providers[n % len(providers)].id,
                primary.id,
                failover_gateway_ids=(failover.id,),
                precedence=n % 3,
                max_channels=1_000_000 if scale.limits else 0,
                cps=100_000 if scale.limits else 0,
                codecs="PCMU,PCMA" if n % 2 else "",
            )
        )
    data.trunks = trunks

    routed, unrouted = _universe(scale, rng)
    universe = routed + unrouted
    groups = []
    for g in range(scale.groups):
        linked = tuple(
            trunks[(g * 7 + k) % len(trunks)].id for k in range(min(scale.trunks_per_group, len(trunks)))
        )
        groups.append(
            RateGroup(ids.next(), f"group{g:03d}", markup_percent=Decimal(g % 3 * 5), trunk_ids=linked)
        )
    data.rate_groups = groups

    rates: list[OriginationRate] = []
    costs = _ORIGINATION_COSTS
    for group in groups:
        offset = rng.randrange(len(costs))
        for n, prefix in enumerate(universe):
            rates.append(
                OriginationRate(
                    ids.next(), prefix, costs[(offset + n * 31) % len(costs)], rate_group_id=group.id, inc=6
                )
            )
    data.origination_rates = rates

    # Termination: every trunk covers every routed country code, plus longer prefixes.
    per_trunk = max(len(ROUTED_CODES), scale.termination_rates // max(1, scale.trunks))
    extra_pool = routed[len(ROUTED_CODES) :]
    terminations: list[TerminationRate] = []
    tcosts = _TERMINATION_COSTS
    for trunk in trunks:
        prefixes = list(ROUTED_CODES)
        if extra_pool:
            prefixes += rng.sample(extra_pool, min(len(extra_pool), per_trunk - len(ROUTED_CODES)))
        for n, prefix in enumerate(prefixes):
            terminations.append(
                TerminationRate(ids.next(), trunk.id, prefix, tcosts[(trunk.id + n * 13) % len(tcosts)])
            )
    data.termination_rates = terminations

    # Accounts: resellers first, then customers; one extra inactive reseller above the
    # ROLE_INACTIVE customers.
    inactive_reseller = Account(
        ids.next(), "R-inactive", AccountKind.RESELLER, None, False, False, False, _ZERO, _ZERO, groups[0].id
    )
    accounts = [*providers, inactive_reseller]
    devices: list[SipDevice] = []
    ip_map: list[IpMapEntry] = []
    blocked: list[BlockedCode] = []
    base = ids.peek()
    resellers = scale.reseller_count
    for index in range(scale.accounts):
        account_id = base + index
        role = index % 100
        group = groups[index % len(groups)]
        if index < resellers:
            accounts.append(
                Account(
                    account_id,
                    account_number(index),
                    AccountKind.RESELLER,
                    None,
                    True,
                    False,
                    True,
                    Decimal(1_000_000),
                    Decimal(1_000_000),
                    group.id,
                    first_used=FIRST_USED_AT,
                    max_channels=1_000_000 if scale.limits else 0,
                    cps=100_000 if scale.limits else 0,
                )
            )
            continue
        reseller_id = base + (index % resellers) if index % 3 == 0 else None
        if role == ROLE_INACTIVE:
            reseller_id = inactive_reseller.id
        accounts.append(
            Account(
                account_id,
                account_number(index),
                AccountKind.CUSTOMER,
                reseller_id,
                active=True,
                deleted=False,
                postpaid=False,
                balance=_ZERO if role in ROLE_NO_FUNDS else Decimal(100 + index % 900),
                credit_limit=_ZERO,
                rate_group_id=group.id,
                expiry=EXPIRED_AT if role == ROLE_EXPIRED else None,
                first_used=None if role in ROLE_NEW else FIRST_USED_AT,
                max_channels=(1 if role == ROLE_TIGHT else 50) if scale.limits else 0,
                cps=(1 if role == ROLE_TIGHT else 20) if scale.limits else 0,
            )
        )
        if role in ROLE_IP_MAP:
            ip_map.append(IpMapEntry(account_id, account_id, f"{account_ip(index)}/32"))
        else:
            devices.append(SipDevice(account_id, account_id, device_username(index)))
        if role == ROLE_BLOCKS:
            blocked.append(BlockedCode(account_id, BLOCKED_CODE))
    ids.skip(scale.accounts)
    data.accounts = accounts
    data.sip_devices = devices
    data.ip_map = ip_map
    data.blocked_codes = blocked
    return data


class _Ids:
    def __init__(self) -> None:
        self._next = 1

    def next(self) -> int:
        value = self._next
        self._next += 1
        return value

    def peek(self) -> int:
        return self._next

    def skip(self, n: int) -> None:
        self._next += n


# --------------------------------------------------------------------------- the call mix

#: Call classes and the outcome each is built for. The engine decides; the driver only
#: reports what came back, so a class whose rule is not implemented yet (DESTINATION_BLOCKED
#: before number handling, the limits before the limits step) shows up as what the engine
#: answered instead.
CALL_CLASSES: dict[str, str] = {
    "accept": "accepted (SIP device)",
    "accept_ip": "accepted (IP map)",
    "auth_fail": "AUTHENTICATION_FAIL (unknown SIP user)",
    "inactive": "ACCOUNT_INACTIVE",
    "expired": "ACCOUNT_EXPIRED",
    "no_funds": "NO_SUFFICIENT_FUND",
    "no_origination": "ORIGINATION_RATE_NOT_FOUND",
    "no_termination": "TERMINATION_RATE_NOT_FOUND",
    "bad_destination": "NO_ROUTE_DESTINATION (not diallable)",
    "blocked": "DESTINATION_BLOCKED",
    "limited": "CPS_LIMIT / CONCURRENT_LIMIT (accounts with cps 1, max_channels 1)",
}

#: A realistic mix: mostly accepted calls, every reject reason present.
DEFAULT_MIX: dict[str, float] = {
    "accept": 0.78,
    "accept_ip": 0.07,
    "auth_fail": 0.03,
    "inactive": 0.015,
    "expired": 0.01,
    "no_funds": 0.02,
    "no_origination": 0.02,
    "no_termination": 0.015,
    "bad_destination": 0.01,
    "blocked": 0.01,
    "limited": 0.01,
}
ACCEPT_ONLY: dict[str, float] = {"accept": 1.0}
ACCEPTED_CLASSES = frozenset({"accept", "accept_ip"})


@dataclass(frozen=True, slots=True)
class CallPlan:
    """One call to place: what FreeSWITCH's channel data will say."""

    kind: str
    destination: str
    sip_auth_username: str = ""
    network_ip: str = "192.0.2.10"
    caller_id_number: str = ""
    hold: float = 0.0  # seconds an answered call stays up


class CallMix:
    """Deterministic stream of :class:`CallPlan` for a generated model.

    ``weights`` maps call classes to shares; ``hold`` is the talk time of answered
    calls (a number, or ``(low, high)`` for a uniform spread).
    """

    def __init__(
        self,
        scale: Scale,
        weights: dict[str, float] | None = None,
        *,
        hold: float | tuple[float, float] = 0.0,
        seed: int = 7,
    ) -> None:
        weights = DEFAULT_MIX if weights is None else weights
        unknown = set(weights) - set(CALL_CLASSES)
        if unknown:
            raise ValueError(f"unknown call classes: {sorted(unknown)}")
        total = sum(weights.values())
        if total <= 0:
            raise ValueError("the mix has no weight")
        self.scale = scale
        self.weights = {k: v / total for k, v in weights.items() if v > 0}
        self._kinds = list(self.weights)
        self._cum = []
        acc = 0.0
        for kind in self._kinds:
            acc += self.weights[kind]
            self._cum.append(acc)
        self.hold = hold
        self._rng = random.Random(seed)
        rng = random.Random(scale.seed)
        routed, unrouted = _universe(scale, rng)
        self._routed = routed
        self._unrouted = unrouted
        self._customers = scale.accounts - scale.reseller_count
        if self._customers < 100:
            raise ValueError("the call mix needs at least 100 customer accounts")

    def _pick_kind(self) -> str:
        x = self._rng.random()
        for kind, edge in zip(self._kinds, self._cum, strict=True):
            if x < edge:
                return kind
        return self._kinds[-1]

    def _index(self, residues: tuple[int, ...] | range) -> int:
        """A customer index whose role (index % 100) is one of ``residues``."""
        rng = self._rng
        first = self.scale.reseller_count
        while True:
            block = rng.randrange(first // 100, self.scale.accounts // 100 + 1)
            index = block * 100 + rng.choice(residues)
            if first <= index < self.scale.accounts:
                return index

    def _number(self, prefix: str) -> str:
        rest = DESTINATION_LENGTH - len(prefix)
        return prefix + "".join(self._rng.choices("0123456789", k=max(1, rest)))

    def _hold(self) -> float:
        hold = self.hold
        if isinstance(hold, tuple):
            return self._rng.uniform(*hold)
        return float(hold)

    def next(self) -> CallPlan:
        kind = self._pick_kind()
        rng = self._rng
        destination = self._number(rng.choice(self._routed))
        hold = 0.0
        if kind in ACCEPTED_CLASSES:
            hold = self._hold()
        if kind == "accept_ip":
            index = self._index(ROLE_IP_MAP)
            return CallPlan(kind, destination, network_ip=account_ip(index), hold=hold)
        if kind == "auth_fail":
            return CallPlan(kind, destination, sip_auth_username=f"nobody{rng.randrange(10**6)}")
        residues: tuple[int, ...] | range = ORDINARY_RESIDUES
        if kind == "inactive":
            residues = (ROLE_INACTIVE,)
        elif kind == "expired":
            residues = (ROLE_EXPIRED,)
        elif kind == "no_funds":
            residues = ROLE_NO_FUNDS
        elif kind == "limited":
            residues = (ROLE_TIGHT,)
        elif kind == "blocked":
            residues = (ROLE_BLOCKS,)
            destination = self._number(BLOCKED_CODE)
        elif kind == "no_origination":
            destination = self._number("0")
        elif kind == "no_termination":
            destination = self._number(rng.choice(self._unrouted))
        elif kind == "bad_destination":
            destination = "12ab" + destination[4:]
        index = self._index(residues)
        return CallPlan(kind, destination, sip_auth_username=device_username(index), hold=hold)

    def __iter__(self) -> Iterator[CallPlan]:
        while True:
            yield self.next()

    def take(self, n: int) -> list[CallPlan]:
        return [self.next() for _ in range(n)]


# --------------------------------------------------------------------------- Redis


def published_fingerprint(client, prefix: str) -> int | None:
    """The source version of the snapshot current under ``prefix`` (None if none)."""
    from engine.state.snapshot import current_version

    version = current_version(client, prefix)
    if version is None:
        return None
    raw = client.hget(f"{prefix}snapshot:{version}:meta", "source_version")
    return None if raw is None else int(raw)


def ensure_published(client, prefix: str, scale: Scale, *, force: bool = False, log=print) -> int:
    """Publish ``generate(scale)`` under ``prefix`` unless it is already current there.

    Returns the snapshot version. Generation and publication of 1M rates take ~1 min.
    """
    from engine.state.snapshot import current_version, publish_snapshot

    fingerprint = scale_fingerprint(scale)
    if not force and published_fingerprint(client, prefix) == fingerprint:
        return int(current_version(client, prefix) or 0)
    started = time.monotonic()
    data = generate(scale)
    generated = time.monotonic()
    version = publish_snapshot(client, prefix, data, grace_seconds=0, keep_previous=0)
    log(
        f"dataset {scale.label()} under {prefix!r}: generated in {generated - started:.1f}s, "
        f"published as version {version} in {time.monotonic() - generated:.1f}s"
    )
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.dataset", description="Generate and publish a load-test dataset into Redis"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="cgload:")
    parser.add_argument("--accounts", type=int, default=Scale.accounts)
    parser.add_argument("--rates", type=int, default=Scale.rates)
    parser.add_argument("--trunks", type=int, default=Scale.trunks)
    parser.add_argument("--groups", type=int, default=Scale.groups)
    parser.add_argument("--termination-rates", type=int, default=Scale.termination_rates)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="publish even if the same dataset is current")
    parser.add_argument("--drop", action="store_true", help="delete every key under the prefix and exit")
    args = parser.parse_args(argv)
    import redis

    from engine.state.snapshot import delete_prefix

    client = redis.Redis.from_url(args.redis)
    if args.drop:
        print(f"deleted {delete_prefix(client, args.prefix)} keys under {args.prefix!r}")
        return 0
    scale = Scale(
        accounts=args.accounts,
        rates=args.rates,
        trunks=args.trunks,
        groups=args.groups,
        termination_rates=args.termination_rates,
        seed=args.seed,
    )
    version = ensure_published(client, args.prefix, scale, force=args.force)
    print(f"{scale.label()}: snapshot version {version} current under {args.prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
