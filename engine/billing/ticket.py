"""The billing ticket: what an accepted call is billed on, written on its channel at decision time (pure).

Why it exists. The engine bills a call from its CHANNEL_HANGUP_COMPLETE with the prices frozen
at the decision (:class:`engine.billing.live.PricedAccept`). When the engine never sees that
event (killed with calls up, socket lost), FreeSWITCH's own CDR (mod_json_cdr, posted to
``callgate fsxml``, engine.fsxml.cdrpost) is the backstop, and it must bill the call exactly
as the engine would have: same payers, same prices, same CDR. Those prices exist nowhere but
in the engine's memory, and a rate edited while the call is up must not change them, so the
engine writes them on the channel in one variable, ``callgate_bill``, with the other
variables of its decision. FreeSWITCH keeps it with the channel and hands it back in every
CDR it posts.

Format: ``1.<base64url of a compact JSON array>`` (no padding). base64url has none of the
characters FreeSWITCH expands (``$``, ``{``), none of multiset's separators and no comma, so
the value survives ``multiset``, channel-variable expansion and URL-encoding unchanged, whatever
free text (trunk or caller names) it carries. Amounts travel as decimal strings (exact).

Layout of the array (positional, to keep the variable small: ~350 bytes for two chain levels
and two routes)::

    [account_id, account_number, [chain ids], direction, caller_id_name, translated,
     decided_at (epoch microseconds or null), max_duration,
     [[account_id, account_number, rate_id, prefix, cpm, connect, included, init_inc, inc], ...],
     [[trunk_id, trunk_name, provider_id, termination_prefix, cpm, connect, included, init_inc,
       inc, [gateway, ...]], ...]]

:func:`decode_ticket` checks everything it reads (types, sizes, non-negative finite amounts)
and raises :class:`BadTicket`; it never trusts the text to be what the engine wrote.

Signature. With ``[billing] ticket_keys`` set, the engine appends ``.<base64url of
HMAC-SHA256(key, ticket + NUL + call uuid)>`` (43 characters) with the first key, and ``callgate
fsxml`` bills a ticket only if one of the keys verifies it for the uuid of the CDR carrying it
(:func:`verify_ticket`). Without it, whoever holds fsxml's credentials could post a debit for
any account; binding the uuid stops a genuine ticket being replayed on another call's CDR.
Without keys, tickets are unsigned and a signature is not checked (the log says so at start).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from logging import Logger
from typing import Any

from engine.billing.rating import CallPricing, LevelPrice, RoutePrice, Tariff
from engine.decision import Accept

TICKET_VARIABLE = "callgate_bill"
TICKET_VERSION = "1"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO = timedelta(microseconds=1)
MAX_TICKET_CHARS = 16_384  # a ticket is a few hundred bytes; anything this large is not one
_MAX_TEXT = 2_000  # caller-ID names are caller-supplied: generous, but bounded
_MAX_ITEMS = 64
_MAX_AMOUNT = Decimal(1_000_000_000)
_MAX_SECONDS = 10 * 86_400


class BadTicket(ValueError):
    """The variable is not a ticket this engine wrote (the message is safe to log escaped)."""


class BadSignature(BadTicket):
    """The ticket's signature is missing or verifies under none of the keys (never says which)."""


@dataclass(frozen=True, slots=True)
class BillingTicket:
    """Who pays and at what prices, as decided; everything the CDR of the call needs besides
    FreeSWITCH's hangup facts."""

    account_id: int
    account_number: str
    chain: tuple[int, ...]
    direction: str
    caller_id_name: str
    translated: str
    decided_at: datetime | None
    pricing: CallPricing


def ticket_of(accept: Accept) -> BillingTicket | None:
    """The ticket of a priced decision (a PricedAccept); None for a call decided without
    accounting (no funds configured), which only the engine's own hangup can bill."""
    pricing = getattr(accept, "pricing", None)
    if not isinstance(pricing, CallPricing):
        return None
    decided_at = getattr(accept, "decided_at", None)
    return BillingTicket(
        account_id=accept.account_id,
        account_number=accept.account_number,
        chain=tuple(accept.chain),
        direction=str(accept.direction),
        caller_id_name=accept.caller_id_name,
        translated=accept.destination,
        decided_at=decided_at if isinstance(decided_at, datetime) else None,
        pricing=pricing,
    )


# --------------------------------------------------------------------------- encoding


def _tariff(t: Tariff) -> list[Any]:
    return [str(t.cost_per_minute), str(t.connect_cost), t.included_seconds, t.init_inc, t.inc]


# What json.dumps(document, separators=(",", ":")) builds on every call: the same encoder,
# built once (same class, same options, so the same text; the engine encodes every call's ticket).
_JSON = json.JSONEncoder(separators=(",", ":"))
# base64.urlsafe_b64encode without its two Python wrappers: the same bytes.
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64url(raw: bytes) -> str:
    """base64url without padding (``base64.urlsafe_b64encode(raw).rstrip(b"=")``, as text)."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


def _encode(
    account_id: int,
    account_number: str,
    chain: Any,
    direction: str,
    caller_id_name: str,
    translated: str,
    decided_at: datetime | None,
    pricing: CallPricing,
) -> str:
    document = [
        account_id,
        account_number,
        list(chain),
        direction,
        caller_id_name,
        translated,
        # A float timestamp holds today's epoch microseconds exactly (< 2**53): rounding is
        # exact and 5x cheaper than timedelta arithmetic.
        None if decided_at is None else round(decided_at.timestamp() * 1_000_000),
        pricing.max_duration,
        [
            [lv.account_id, lv.account_number, lv.rate_id, lv.prefix, *_tariff(lv.tariff)]
            for lv in pricing.levels
        ],
        [
            [
                r.trunk_id,
                r.trunk_name,
                r.provider_id,
                r.termination_prefix,
                *_tariff(r.tariff),
                list(r.gateways),
            ]
            for r in pricing.routes
        ],
    ]
    return TICKET_VERSION + "." + _b64url(_JSON.encode(document).encode("ascii"))


def encode_ticket(ticket: BillingTicket) -> str:
    return _encode(
        ticket.account_id,
        ticket.account_number,
        ticket.chain,
        ticket.direction,
        ticket.caller_id_name,
        ticket.translated,
        ticket.decided_at,
        ticket.pricing,
    )


def ticket_value(accept: Accept, key: bytes | None = None, uuid: str = "") -> str | None:
    """The ``callgate_bill`` value for ``accept`` (None: no ticket, the variable is left out),
    signed with ``key`` for the call ``uuid`` when a key is given.

    ``encode_ticket(ticket_of(accept))``, without building the BillingTicket in between (the
    engine writes a ticket for every accepted call)."""
    pricing = getattr(accept, "pricing", None)
    if not isinstance(pricing, CallPricing):
        return None
    decided_at = getattr(accept, "decided_at", None)
    text = _encode(
        accept.account_id,
        accept.account_number,
        accept.chain,
        str(accept.direction),
        accept.caller_id_name,
        accept.destination,
        decided_at if isinstance(decided_at, datetime) else None,
        pricing,
    )
    return text if key is None else text + "." + ticket_signature(text, uuid, key)


# --------------------------------------------------------------------------- signature


def ticket_keys(configured: tuple[str, ...]) -> tuple[bytes, ...]:
    """``[billing] ticket_keys`` as HMAC keys (the first signs)."""
    return tuple(key.encode("utf-8") for key in configured)


# HMAC-SHA256 keyed once per key: copying a keyed HMAC skips OpenSSL's digest lookup and the
# key's two padded blocks, half the cost of the one-shot hmac.digest for a ticket-sized message.
# Bounded (a process has a handful of keys); _hashlib is what the hmac module itself runs on.
_KEYED: dict[bytes, Any] = {}
try:
    import _hashlib

    _HMAC_NEW: Any = _hashlib.hmac_new
except ImportError:  # pragma: no cover  (a Python without OpenSSL: hmac's own, same bytes)
    _HMAC_NEW = hmac.new
_MAX_KEYED = 16


def _keyed_hmac(key: bytes) -> Any:
    try:
        return _KEYED[key].copy()
    except KeyError:
        pass
    if len(_KEYED) >= _MAX_KEYED:
        _KEYED.clear()
    keyed = _HMAC_NEW(key, digestmod="sha256")
    _KEYED[key] = keyed
    return keyed.copy()


def ticket_signature(text: str, uuid: str, key: bytes) -> str:
    """base64url of HMAC-SHA256(key, ticket + NUL + uuid), unpadded."""
    mac = _keyed_hmac(key)
    mac.update(text.encode("utf-8") + b"\0" + uuid.encode("utf-8"))
    return _b64url(mac.digest())


def log_ticket_signing(logger: Logger, keys: tuple[str, ...], who: str) -> None:
    """Once at start: whether callgate_bill tickets are signed (the count of keys, never a key)."""
    if keys:
        logger.info("%s callgate_bill tickets signed with HMAC-SHA256 (%d key(s) configured)", who, len(keys))
    else:
        logger.warning(
            "billing.ticket_keys is empty: %s unsigned callgate_bill tickets; whoever holds callgate"
            " fsxml's credentials can post a CDR debiting any account (docs/accounting.md)",
            who,
        )


def split_signature(text: str) -> tuple[str, str | None]:
    """(the ticket without its signature, the signature or None)."""
    head, dot, signature = text.rpartition(".")
    if dot and head.count(".") == 1:
        return head, signature
    return text, None


def verify_ticket(text: str, uuid: str, keys: tuple[bytes, ...]) -> str:
    """The unsigned ticket of a ``callgate_bill`` value signed for ``uuid`` by one of ``keys``;
    BadSignature otherwise. Without keys nothing is checked (the signature is dropped)."""
    if len(text) > MAX_TICKET_CHARS:
        raise BadTicket("too long")
    unsigned, signature = split_signature(text)
    if not keys:
        return unsigned
    if signature is None:
        raise BadSignature("not signed")
    given = signature.encode("utf-8")  # bytes: compare_digest refuses non-ASCII text
    if not any(hmac.compare_digest(ticket_signature(unsigned, uuid, key).encode(), given) for key in keys):
        raise BadSignature("signature does not verify")
    return unsigned


# --------------------------------------------------------------------------- decoding (checked)


def _int(value: Any, what: str, *, low: int = 0, high: int = 2**63 - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadTicket(f"{what}: not an integer in {low}..{high}")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT:
        raise BadTicket(f"{what}: not a text of at most {_MAX_TEXT} characters")
    return value


def _amount(value: Any, what: str) -> Decimal:
    if not isinstance(value, str) or len(value) > 40:
        raise BadTicket(f"{what}: not a decimal string")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise BadTicket(f"{what}: not a decimal") from None
    if not amount.is_finite() or amount < 0 or amount > _MAX_AMOUNT:
        raise BadTicket(f"{what}: not a finite amount in 0..{_MAX_AMOUNT}")
    return amount


def _list(value: Any, what: str, length: int | None = None) -> list[Any]:
    if (
        not isinstance(value, list)
        or len(value) > _MAX_ITEMS
        or (length is not None and len(value) != length)
    ):
        raise BadTicket(f"{what}: not a list" + ("" if length is None else f" of {length} items"))
    return value


def _read_tariff(items: list[Any], what: str) -> Tariff:
    return Tariff(
        cost_per_minute=_amount(items[0], f"{what} cost per minute"),
        connect_cost=_amount(items[1], f"{what} connect cost"),
        included_seconds=_int(items[2], f"{what} included seconds", high=_MAX_SECONDS),
        init_inc=_int(items[3], f"{what} initial increment", high=_MAX_SECONDS),
        inc=_int(items[4], f"{what} increment", high=_MAX_SECONDS),
    )


def _read_level(value: Any, index: int) -> LevelPrice:
    items = _list(value, f"level {index}", 9)
    return LevelPrice(
        account_id=_int(items[0], f"level {index} account"),
        account_number=_text(items[1], f"level {index} account number"),
        rate_id=_int(items[2], f"level {index} rate"),
        prefix=_text(items[3], f"level {index} prefix"),
        tariff=_read_tariff(items[4:9], f"level {index}"),
    )


def _read_route(value: Any, index: int) -> RoutePrice:
    items = _list(value, f"route {index}", 10)
    gateways = tuple(_text(g, f"route {index} gateway") for g in _list(items[9], f"route {index} gateways"))
    return RoutePrice(
        trunk_id=_int(items[0], f"route {index} trunk"),
        trunk_name=_text(items[1], f"route {index} trunk name"),
        provider_id=_int(items[2], f"route {index} provider"),
        termination_prefix=_text(items[3], f"route {index} termination prefix"),
        tariff=_read_tariff(items[4:9], f"route {index}"),
        gateways=gateways,
    )


def _payload(text: str) -> Any:
    if len(text) > MAX_TICKET_CHARS:
        raise BadTicket("too long")
    version, dot, body = text.partition(".")
    if not dot or version != TICKET_VERSION:
        raise BadTicket("unknown ticket version")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadTicket("not base64url JSON") from None


def decode_ticket(text: str) -> BillingTicket:
    """The ticket in a ``callgate_bill`` value (a signature, if any, is not checked here: see
    :func:`verify_ticket`); BadTicket when it is not one."""
    items = _list(_payload(split_signature(text)[0]), "ticket", 10)
    account_id = _int(items[0], "account")
    chain = tuple(_int(a, "chain member") for a in _list(items[2], "chain"))
    if not chain or chain[0] != account_id:
        raise BadTicket("the chain does not start with the account")
    decided = items[6]
    decided_at = None if decided is None else _EPOCH + _int(decided, "decision time") * _MICRO
    levels = tuple(_read_level(v, i) for i, v in enumerate(_list(items[8], "levels")))
    routes = tuple(_read_route(v, i) for i, v in enumerate(_list(items[9], "routes")))
    return BillingTicket(
        account_id=account_id,
        account_number=_text(items[1], "account number"),
        chain=chain,
        direction=_text(items[3], "direction"),
        caller_id_name=_text(items[4], "caller ID name"),
        translated=_text(items[5], "translated number"),
        decided_at=decided_at,
        pricing=CallPricing(levels, routes, _int(items[7], "max duration", high=_MAX_SECONDS)),
    )
