"""Declarative fixture documents -> PostgreSQL, idempotently.

(Why one module of about 1,100 lines: it is one ordered walk over the document, section
by section, where each section's upsert needs the ids the earlier ones wrote; the field
validators it shares with the admin service are in ``engine.db.fields``.)

A document (YAML or JSON, see ``config/demo.yaml``) has these top-level sections,
all optional::

    localizations, rate_groups (with nested ``rates``), origination_rates,
    gateways, providers (with ``trunks``, each with ``termination_rates``),
    resellers (with nested ``customers`` and ``resellers``), customers, dids

and every account (provider, reseller, customer) may carry ``sip_devices``,
``ip_map``, ``caller_ids``, ``forced_caller_id``, ``dids``, ``speed_dials``,
``blocked_codes`` and ``personal_rates``.

Semantics:

- Rows are upserted by natural key (names; account numbers among non-deleted
  accounts; SIP usernames; (cidr, tech prefix); DID numbers; (rate group,
  prefix); (account, prefix); (trunk, prefix); (account, speed-dial key)...).
  Loading the same document twice changes nothing, not even ``change_version``.
- A key written in an entry is enforced; a key left out keeps the database's
  value on an existing row (a new row gets the column default). So a document
  that omits ``balance`` never resets balances that billing has moved. Nesting is
  always enforced: a customer listed at the top level is owned by the admin
  unless it names a ``reseller``.
- Link lists (``trunks`` of a rate group, ``forced_trunks`` of a rate,
  ``failover_gateways`` of a trunk) are replaced by the listed set when written.
  Nothing else is ever deleted.
- Everything happens in one transaction (a savepoint inside a caller's
  transaction); any problem raises ``FixtureError`` naming the entry by path,
  e.g. ``customers[2].sip_devices[0].username: duplicate 'alice' (first at
  customers[0].sip_devices[0].username)``, and nothing is written.
- Account passwords and PINs are stored hashed (scrypt, salted); a reload keeps
  the stored hash when it still matches. SIP device passwords are stored as
  given (FreeSWITCH needs them for digest authentication).
- Digit strings (numbers, prefixes) should be quoted in YAML; ``load_file``
  also keeps an unquoted ``0044`` as written and reads unquoted decimals exactly.
  Money must never be a binary float: give strings, ints or Decimals.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, ClassVar

import psycopg
import yaml
from psycopg import errors, sql
from psycopg.types.json import Jsonb

from engine.db import fields
from engine.db.hashing import hash_secret, verify_secret
from engine.rules.text import is_sip_uri, show

__all__ = ["FixtureError", "LoadReport", "hash_secret", "load_document", "load_file", "verify_secret"]

FIXTURE_LOCK_KEY = 0x63616C6C66697874  # pg_advisory_xact_lock key: one fixture load at a time


class FixtureError(ValueError):
    """The document is invalid; ``problems`` lists every ``path: message`` found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            message = f"{len(self.problems)} problems:\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


@dataclass
class LoadReport:
    """Rows written per table: inserted, updated, left unchanged, and link rows removed."""

    inserted: Counter[str] = field(default_factory=Counter)
    updated: Counter[str] = field(default_factory=Counter)
    unchanged: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)

    @property
    def changed(self) -> int:
        return self.inserted.total() + self.updated.total() + self.removed.total()

    def __str__(self) -> str:
        tables = sorted(set(self.inserted) | set(self.updated) | set(self.unchanged) | set(self.removed))
        parts = [
            f"{t}: +{self.inserted[t]} ~{self.updated[t]} ={self.unchanged[t]}"
            + (f" -{self.removed[t]}" if self.removed[t] else "")
            for t in tables
        ]
        return "; ".join(parts) or "empty document"


# --------------------------------------------------------------------------- files


class _YamlLoader(yaml.SafeLoader):
    pass


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    return fields.SourceInt(loader.construct_yaml_int(node), node.value)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    try:
        value = Decimal(node.value.replace("_", ""))
    except InvalidOperation:
        return loader.construct_yaml_float(node)  # .inf / .nan: rejected later with a path
    return value if value.is_finite() else loader.construct_yaml_float(node)


_YamlLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_YamlLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def read_document(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML (.yaml/.yml) or JSON (.json) fixture file without loading it."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            return json.loads(text, parse_float=Decimal)
        return yaml.load(text, Loader=_YamlLoader)  # a SafeLoader subclass: no arbitrary objects
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise FixtureError([f"{p.name}: cannot parse: {exc}"]) from exc


def load_file(conn: psycopg.Connection[Any], path: str | os.PathLike[str]) -> LoadReport:
    """Load a YAML or JSON fixture file (see load_document)."""
    doc = read_document(path)
    if doc is None:
        doc = {}
    return load_document(conn, doc)


@dataclass(frozen=True, slots=True)
class _F:
    conv: Callable[[Any], Any]
    required: bool = False
    nullable: bool = False
    column: bool = True  # False: a reference or list the writer handles itself


def _ref(conv: Callable[[Any], Any] = fields.NAME, *, required: bool = False, nullable: bool = False) -> _F:
    return _F(conv, required=required, nullable=nullable, column=False)


# --------------------------------------------------------------------------- entity specs

_LOCALIZATION = {
    "name": _F(fields.NAME, required=True),
    "description": _F(fields.text()),
    "active": _F(fields.boolean),
    "number_originate": _F(fields.rules),
    "cli_originate": _F(fields.rules),
    "cli_inbound": _F(fields.rules),
    "number_terminate": _F(fields.rules),
    "cli_terminate": _F(fields.rules),
}

_RATE_GROUP = {
    "name": _F(fields.NAME, required=True),
    "description": _F(fields.text()),
    "active": _F(fields.boolean),
    "markup_percent": _F(fields.decimal()),
    "routing_type": _F(fields.choice("lcr", "cost")),
    "init_inc": _F(fields.integer()),
    "inc": _F(fields.integer()),
    "lossless": _F(fields.boolean),
    "reseller": _ref(fields.digits(), nullable=True),
    "trunks": _ref(fields.name_list),
}

_RATE = {
    "prefix": _F(fields.digits(empty=True), required=True),
    "cost_per_minute": _F(fields.decimal(), required=True),
    "connect_cost": _F(fields.decimal()),
    "included_seconds": _F(fields.integer()),
    "init_inc": _F(fields.integer()),
    "inc": _F(fields.integer()),
    "precedence": _F(fields.integer()),
    "active": _F(fields.boolean),
    "description": _F(fields.text()),
    "forced_trunks": _ref(fields.name_list),
}
_TOP_RATE = {**_RATE, "rate_group": _ref(), "account": _ref(fields.digits())}

_GATEWAY = {
    "name": _F(fields.SOFIA_NAME, required=True),
    "description": _F(fields.text()),
    "active": _F(fields.boolean),
    "sip_profile": _F(fields.NAME),
    "proxy": _F(fields.text()),
    "username": _F(fields.text()),
    "password": _F(fields.text()),
    "register": _F(fields.boolean),
    "params": _F(fields.params),
}

_TRUNK = {
    "name": _F(fields.NAME, required=True),
    "gateway": _ref(required=True),
    "failover_gateways": _ref(fields.name_list),
    "active": _F(fields.boolean),
    "precedence": _F(fields.integer()),
    "max_channels": _F(fields.integer()),
    "cps": _F(fields.integer()),
    "codecs": _F(fields.CODECS),
    "leg_timeout": _F(fields.integer()),
    "localization": _ref(nullable=True),
    "sip_cid_type": _F(fields.choice("none", "rpid", "pid")),
}

_TERMINATION_RATE = {
    "prefix": _F(fields.digits(empty=True), required=True),
    "cost_per_minute": _F(fields.decimal(), required=True),
    "connect_cost": _F(fields.decimal()),
    "included_seconds": _F(fields.integer()),
    "init_inc": _F(fields.integer()),
    "inc": _F(fields.integer()),
    "strip": _F(fields.digits(empty=True)),
    "prepend": _F(fields.PREPEND),
    "precedence": _F(fields.integer()),
    "active": _F(fields.boolean),
    "description": _F(fields.text()),
}

_ACCOUNT = {
    "number": _F(fields.digits(max_len=20), required=True),
    "status": _F(fields.choice("active", "inactive")),
    "postpaid": _F(fields.boolean),
    "balance": _F(fields.decimal(minimum=None)),
    "credit_limit": _F(fields.decimal()),
    "currency": _F(fields.CURRENCY),
    "rate_group": _ref(nullable=True),
    "non_cli_rate_group": _ref(nullable=True),
    "cli_pool": _F(fields.integer(0, 8)),
    "localization": _ref(nullable=True),
    "local_calls_allowed": _F(fields.boolean),
    "local_call_cost_per_minute": _F(fields.decimal()),
    "codecs": _F(fields.CODECS),
    "max_channels": _F(fields.integer()),
    "cps": _F(fields.integer()),
    "pin": _ref(fields.secret_pattern(r"[0-9]+", "a PIN of digits"), nullable=True),
    "password": _ref(fields.account_password, nullable=True),
    "email": _F(fields.EMAIL, nullable=True),
    "first_name": _F(fields.text()),
    "last_name": _F(fields.text()),
    "company": _F(fields.text()),
    "phone": _F(fields.PHONE),
    "mobile": _F(fields.PHONE),
    "address_1": _F(fields.text()),
    "address_2": _F(fields.text()),
    "city": _F(fields.text()),
    "province": _F(fields.text()),
    "postal_code": _F(fields.text()),
    "country": _F(fields.COUNTRY, nullable=True),
    "timezone": _F(fields.timezone),
    "language": _F(fields.LANGUAGE),
    "notifications": _F(fields.boolean),
    "is_recording": _F(fields.boolean),
    "allow_ip_management": _F(fields.boolean),
    "billing_schedule": _F(fields.choice("daily", "weekly", "monthly")),
    "invoice_day": _F(fields.integer(1, 28), nullable=True),
    "tax_number": _F(fields.text()),
    "reference": _F(fields.text(100)),
    "invoice_note": _F(fields.text()),
    "generate_invoice": _F(fields.boolean),
    "notify_enabled": _F(fields.boolean),
    "notify_balance_below": _F(fields.decimal(minimum=None), nullable=True),
    "notify_email": _F(fields.EMAIL, nullable=True),
    "first_used": _F(fields.timestamp, nullable=True),
    "expiry": _F(fields.timestamp, nullable=True),
    "valid_days": _F(fields.integer(), nullable=True),
    "expiry_from_first_use": _F(fields.boolean),
}
_ACCOUNT_CHILDREN = (
    "sip_devices",
    "ip_map",
    "caller_ids",
    "forced_caller_id",
    "dids",
    "speed_dials",
    "blocked_codes",
    "personal_rates",
)
_ACCOUNT_REFS = {
    "rate_group": ("rate_group", "rate_group_id"),
    "non_cli_rate_group": ("rate_group", "non_cli_rate_group_id"),
    "localization": ("localization", "localization_id"),
}

_SIP_DEVICE = {
    "username": _F(fields.SIP_USER, required=True),
    "password": _F(fields.secret_pattern(r".+", "a non-empty password"), required=True),
    "active": _F(fields.boolean),
    "codecs": _F(fields.CODECS),
    "caller_id_name": _F(fields.text()),
    "caller_id_number": _F(fields.digits(empty=True)),
    "context": _F(fields.NAME),
    "voicemail_enabled": _F(fields.boolean),
    "voicemail_password": _F(fields.secret_pattern(r"[0-9]*", "a voicemail password of digits")),
}

_IP_MAP = {
    "cidr": _F(fields.cidr, required=True),
    "tech_prefix": _F(fields.digits(empty=True)),
    "name": _F(fields.text()),
    "active": _F(fields.boolean),
}

_CALLER_ID = {
    "number": _F(fields.digits(), required=True),
    "description": _F(fields.text()),
    "active": _F(fields.boolean),
}
_FORCED_CALLER_ID = {
    "number": _F(fields.digits(), required=True),
    "name": _F(fields.text()),
    "active": _F(fields.boolean),
}

_DID = {
    "number": _F(fields.digits(), required=True),
    "description": _F(fields.text()),
    "active": _F(fields.boolean),
    "destination_type": _F(fields.choice("device", "uri", "number")),
    "destination": _F(fields.text()),
    "max_channels": _F(fields.integer()),
    "cps": _F(fields.integer()),
    "leg_timeout": _F(fields.integer()),
    "connect_cost": _F(fields.decimal()),
    "cost_per_minute": _F(fields.decimal()),
    "included_seconds": _F(fields.integer()),
    "init_inc": _F(fields.integer()),
    "inc": _F(fields.integer()),
    "setup_cost": _F(fields.decimal()),
    "monthly_cost": _F(fields.decimal()),
    "provider": _ref(fields.digits(), nullable=True),
}
_TOP_DID = {**_DID, "account": _ref(fields.digits(), nullable=True)}

_SPEED_DIAL = {
    "key": _F(fields.pattern(r"[0-9]{1,3}", "a speed-dial key of 1 to 3 digits"), required=True),
    "number": _F(fields.digits(), required=True),
}
_BLOCKED_CODE = {"prefix": _F(fields.digits(), required=True), "description": _F(fields.text())}

# --------------------------------------------------------------------------- parsed document


@dataclass
class _Item:
    path: str
    f: dict[str, Any]  # converted fields, only the keys the entry wrote


@dataclass
class _Account(_Item):
    kind: str = "customer"
    parent: str | None = None  # reseller number (nesting or `reseller:`)
    parent_path: str = ""
    children: dict[str, list[_Item]] = field(default_factory=dict)


@dataclass
class _Trunk(_Item):
    provider: str = ""
    termination_rates: list[_Item] = field(default_factory=list)


@dataclass
class _RateGroup(_Item):
    rates: list[_Item] = field(default_factory=list)


@dataclass
class _Parsed:
    localizations: list[_Item] = field(default_factory=list)
    rate_groups: list[_RateGroup] = field(default_factory=list)
    origination_rates: list[_Item] = field(default_factory=list)
    gateways: list[_Item] = field(default_factory=list)
    accounts: list[_Account] = field(default_factory=list)  # parents before children
    trunks: list[_Trunk] = field(default_factory=list)
    dids: list[_Item] = field(default_factory=list)


_SECTIONS = (
    "localizations",
    "rate_groups",
    "origination_rates",
    "gateways",
    "providers",
    "resellers",
    "customers",
    "dids",
)


class _Parser:
    """Validates the document's shape and values, collecting every problem with its path."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.seen: dict[tuple[Any, ...], str] = {}
        self.out = _Parsed()

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def unique(self, key: tuple[Any, ...], path: str, shown: Any) -> None:
        first = self.seen.setdefault(key, path)
        if first != path:
            self.problem(path, f"duplicate {shown!r} (first at {first})")

    def entries(self, container: Mapping[str, Any], key: str, path: str) -> list[tuple[str, Any]]:
        if key not in container or container[key] is None:
            return []
        value = container[key]
        where = f"{path}.{key}" if path else key
        if not isinstance(value, list):
            self.problem(where, f"must be a list, not {type(value).__name__}")
            return []
        return [(f"{where}[{i}]", entry) for i, entry in enumerate(value)]

    def fields(
        self,
        entry: Any,
        path: str,
        spec: Mapping[str, _F],
        children: Iterable[str] = (),
        shorthand: str | None = None,
    ) -> dict[str, Any] | None:
        if shorthand is not None and not isinstance(entry, Mapping):
            entry = {shorthand: entry}
        if not isinstance(entry, Mapping):
            self.problem(path, f"must be a mapping, not {type(entry).__name__}")
            return None
        allowed = set(spec) | set(children)
        for key in entry:
            if key not in allowed:
                self.problem(f"{path}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        out: dict[str, Any] = {}
        ok = True
        for key, spec_field in spec.items():
            where = f"{path}.{key}"
            if key not in entry:
                if spec_field.required:
                    self.problem(where, "required")
                    ok = False
                continue
            value = entry[key]
            if value is None:
                if spec_field.nullable:
                    out[key] = None
                else:
                    self.problem(where, "must not be null")
                    ok = False
                continue
            try:
                out[key] = spec_field.conv(value)
            except fields.Invalid as exc:
                self.problem(where, str(exc))
                ok = False
        return out if ok else None

    # -- sections

    def parse(self, doc: Any) -> _Parsed:
        if not isinstance(doc, Mapping):
            self.problem("(document)", f"must be a mapping of sections, not {type(doc).__name__}")
            return self.out
        for key in doc:
            if key not in _SECTIONS:
                self.problem(str(key), f"unknown section (allowed: {', '.join(_SECTIONS)})")

        for path, entry in self.entries(doc, "localizations", ""):
            f = self.fields(entry, path, _LOCALIZATION)
            if f is not None:
                self.unique(("localization", f["name"]), f"{path}.name", f["name"])
                self.out.localizations.append(_Item(path, f))

        for path, entry in self.entries(doc, "rate_groups", ""):
            f = self.fields(entry, path, _RATE_GROUP, children=("rates",))
            if f is None:
                continue
            self.unique(("rate_group", f["name"]), f"{path}.name", f["name"])
            group = _RateGroup(path, f)
            for rpath, rentry in self.entries(entry, "rates", path):
                rate = self.rate(rentry, rpath, _RATE, ("group", f["name"]))
                if rate is not None:
                    group.rates.append(rate)
            self.out.rate_groups.append(group)

        for path, entry in self.entries(doc, "origination_rates", ""):
            owner: tuple[str, Any] = ("?", None)
            if isinstance(entry, Mapping):
                if ("rate_group" in entry) == ("account" in entry):
                    message = "needs exactly one of rate_group (group rate) or account (personal rate)"
                    self.problem(path, message)
                    continue
                owner = (
                    ("group", entry["rate_group"])
                    if "rate_group" in entry
                    else ("account", fields.text_of(entry["account"]))
                )
            rate = self.rate(entry, path, _TOP_RATE, owner)
            if rate is not None:
                self.out.origination_rates.append(rate)

        for path, entry in self.entries(doc, "gateways", ""):
            f = self.fields(entry, path, _GATEWAY)
            if f is not None:
                self.unique(("gateway", f["name"]), f"{path}.name", f["name"])
                self.out.gateways.append(_Item(path, f))

        for path, entry in self.entries(doc, "providers", ""):
            self.account(entry, path, "provider", None, "")
        for path, entry in self.entries(doc, "resellers", ""):
            self.account(entry, path, "reseller", None, "")
        for path, entry in self.entries(doc, "customers", ""):
            self.account(entry, path, "customer", None, "")

        for path, entry in self.entries(doc, "dids", ""):
            did = self.did(entry, path, _TOP_DID)
            if did is not None:
                self.out.dids.append(did)
        return self.out

    def rate(self, entry: Any, path: str, spec: Mapping[str, _F], owner: tuple[str, Any]) -> _Item | None:
        f = self.fields(entry, path, spec)
        if f is None:
            return None
        self.unique(("rate", *owner, f["prefix"]), f"{path}.prefix", f["prefix"])
        return _Item(path, f)

    def did(self, entry: Any, path: str, spec: Mapping[str, _F]) -> _Item | None:
        f = self.fields(entry, path, spec)
        if f is None:
            return None
        self.unique(("did", f["number"]), f"{path}.number", f["number"])
        if f.get("destination_type") == "number" and not re.fullmatch(r"[0-9]*", f.get("destination", "")):
            self.problem(f"{path}.destination", "a 'number' destination must be digits")
        uri = f.get("destination", "")
        if f.get("destination_type") == "uri" and uri and not is_sip_uri(uri):  # the call path's rule
            self.problem(f"{path}.destination", f"{show(uri)} is not a SIP URI a call can be bridged to")
        return _Item(path, f)

    def account(self, entry: Any, path: str, kind: str, parent: str | None, parent_path: str) -> None:
        children: tuple[str, ...] = _ACCOUNT_CHILDREN
        spec = dict(_ACCOUNT)
        if kind == "reseller":
            children += ("customers", "resellers")
        if kind == "provider":
            children += ("trunks",)
        elif parent is None:
            spec["reseller"] = _ref(fields.digits(), nullable=True)
        f = self.fields(entry, path, spec, children)
        if f is None:
            return
        number = f["number"]
        self.unique(("account", number), f"{path}.number", number)
        if f.get("email"):
            self.unique(("email", f["email"].lower()), f"{path}.email", f["email"])
        if "postpaid" in f and not f["postpaid"] and f.get("credit_limit", 0) != 0:
            # (with postpaid left out, the database's value decides, see accounts_prepaid_no_credit)
            self.problem(f"{path}.credit_limit", "only postpaid accounts have a credit limit")
        if f.get("billing_schedule") == "daily" and "invoice_day" not in f:
            f["invoice_day"] = None  # a daily schedule has no invoice day
        if "reseller" in f:
            parent, parent_path = f.pop("reseller"), f"{path}.reseller"
        account = _Account(path, f, kind=kind, parent=parent, parent_path=parent_path)
        self.out.accounts.append(account)

        for cpath, centry in self.entries(entry, "sip_devices", path):
            cf = self.fields(centry, cpath, _SIP_DEVICE)
            if cf is not None:
                self.unique(("sip_user", cf["username"]), f"{cpath}.username", cf["username"])
                account.children.setdefault("sip_devices", []).append(_Item(cpath, cf))
        for cpath, centry in self.entries(entry, "ip_map", path):
            cf = self.fields(centry, cpath, _IP_MAP)
            if cf is not None:
                key = (cf["cidr"], cf.get("tech_prefix", ""))
                self.unique(("ip", *key), f"{cpath}.cidr", f"{key[0]} prefix {key[1]!r}")
                account.children.setdefault("ip_map", []).append(_Item(cpath, cf))
        for cpath, centry in self.entries(entry, "caller_ids", path):
            cf = self.fields(centry, cpath, _CALLER_ID, shorthand="number")
            if cf is not None:
                self.unique(("caller_id", number, cf["number"]), f"{cpath}.number", cf["number"])
                account.children.setdefault("caller_ids", []).append(_Item(cpath, cf))
        if entry.get("forced_caller_id") is not None:
            cpath = f"{path}.forced_caller_id"
            cf = self.fields(entry["forced_caller_id"], cpath, _FORCED_CALLER_ID)
            if cf is not None:
                account.children["forced_caller_id"] = [_Item(cpath, cf)]
        for cpath, centry in self.entries(entry, "dids", path):
            did = self.did(centry, cpath, _DID)
            if did is not None:
                account.children.setdefault("dids", []).append(did)
        for cpath, centry in self.entries(entry, "speed_dials", path):
            cf = self.fields(centry, cpath, _SPEED_DIAL)
            if cf is not None:
                self.unique(("speed_dial", number, cf["key"]), f"{cpath}.key", cf["key"])
                account.children.setdefault("speed_dials", []).append(_Item(cpath, cf))
        for cpath, centry in self.entries(entry, "blocked_codes", path):
            cf = self.fields(centry, cpath, _BLOCKED_CODE, shorthand="prefix")
            if cf is not None:
                self.unique(("blocked", number, cf["prefix"]), f"{cpath}.prefix", cf["prefix"])
                account.children.setdefault("blocked_codes", []).append(_Item(cpath, cf))
        for cpath, centry in self.entries(entry, "personal_rates", path):
            rate = self.rate(centry, cpath, _RATE, ("account", number))
            if rate is not None:
                account.children.setdefault("personal_rates", []).append(rate)

        for tpath, tentry in self.entries(entry, "trunks", path):
            tf = self.fields(tentry, tpath, _TRUNK, children=("termination_rates",))
            if tf is None:
                continue
            self.unique(("trunk", tf["name"]), f"{tpath}.name", tf["name"])
            trunk = _Trunk(tpath, tf, provider=number)
            for rpath, rentry in self.entries(tentry, "termination_rates", tpath):
                rf = self.fields(rentry, rpath, _TERMINATION_RATE)
                if rf is not None:
                    self.unique(("trate", tf["name"], rf["prefix"]), f"{rpath}.prefix", rf["prefix"])
                    trunk.termination_rates.append(_Item(rpath, rf))
            self.out.trunks.append(trunk)

        for cpath, centry in self.entries(entry, "resellers", path):
            self.account(centry, cpath, "reseller", number, path)
        for cpath, centry in self.entries(entry, "customers", path):
            self.account(centry, cpath, "customer", number, path)


# --------------------------------------------------------------------------- database writer

# unique constraints a document can collide with in the database -> (field, message)
_CONSTRAINT_HINTS = {
    "accounts_email_live_key": ("email", "already used by another account"),
    "accounts_reseller_fkey": ("reseller", "is not a reseller"),
    "accounts_reseller_chain": ("reseller", "would make the reseller chain loop"),
    "accounts_invoice_day": (
        "invoice_day",
        "does not fit the billing schedule (weekly 1-7, monthly 1-28, daily none)",
    ),
    "accounts_notify_threshold": ("notify_balance_below", "required when notify_enabled"),
    "accounts_expiry_from_first_use": ("valid_days", "required when expiry_from_first_use"),
    "accounts_prepaid_no_credit": ("credit_limit", "only postpaid accounts have a credit limit"),
    "accounts_provider_top_level": ("reseller", "a provider cannot belong to a reseller"),
    "trunk_failover_gateways_once": ("failover_gateways", "lists a gateway twice"),
}


class _Writer:
    def __init__(self, conn: psycopg.Connection[Any], report: LoadReport) -> None:
        self.conn = conn
        self.report = report
        self.ids: dict[tuple[str, str], int] = {}
        self.kinds: dict[str, str] = {}  # account number -> kind, for reference checks

    # -- low level

    def execute(self, path: str, query: Any, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            return self.conn.execute(query, params)
        except (errors.IntegrityError, errors.DataError, errors.RaiseException) as exc:
            diag = exc.diag
            hint = _CONSTRAINT_HINTS.get(diag.constraint_name or "")
            if hint is not None:
                raise FixtureError([f"{path}.{hint[0]}: {hint[1]}"]) from exc
            detail = f" ({diag.message_detail})" if diag.message_detail else ""
            raise FixtureError([f"{path}: rejected by the database: {diag.message_primary}{detail}"]) from exc

    def upsert(
        self,
        table: str,
        path: str,
        key: Mapping[str, Any],
        values: Mapping[str, Any],
        *,
        returning: str = "id",
        partial: str | None = None,
    ) -> int:
        """Insert or update one row by its natural key; count it; return its id."""
        cols = [*key, *values]
        ident = sql.Identifier
        conflict = sql.SQL("({})").format(sql.SQL(", ").join(map(ident, key)))
        if partial:  # the predicate of a partial unique index
            conflict = sql.SQL("{} WHERE {}").format(conflict, sql.SQL(partial))
        action: sql.Composable
        if values:
            action = sql.SQL("DO UPDATE SET {} WHERE ROW({}) IS DISTINCT FROM ROW({})").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in values),
                sql.SQL(", ").join(sql.SQL("{}.{}").format(ident(table), ident(c)) for c in values),
                sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(ident(c)) for c in values),
            )
        else:
            action = sql.SQL("DO NOTHING")
        query = sql.SQL(
            "INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT {conflict} {action}"
            " RETURNING {ret}, xmax = 0"
        ).format(
            t=ident(table),
            cols=sql.SQL(", ").join(map(ident, cols)),
            vals=sql.SQL(", ").join(sql.Placeholder() * len(cols)),
            conflict=conflict,
            action=action,
            ret=ident(returning),
        )
        row = self.execute(path, query, [*key.values(), *values.values()]).fetchone()
        if row is not None:
            (self.report.inserted if row[1] else self.report.updated)[table] += 1
            return int(row[0])
        where = sql.SQL(" AND ").join(sql.SQL("{} = %s").format(ident(c)) for c in key)
        if partial:
            where = sql.SQL("{} AND {}").format(where, sql.SQL(partial))
        found = self.execute(
            path,
            sql.SQL("SELECT {} FROM {} WHERE {}").format(ident(returning), ident(table), where),
            list(key.values()),
        ).fetchone()
        assert found is not None
        self.report.unchanged[table] += 1
        return int(found[0])

    def sync_set(
        self, table: str, parent_col: str, parent_id: int, child_col: str, wanted: list[int], path: str
    ) -> None:
        """Make the link rows of one parent exactly `wanted` (unordered)."""
        t, pc, cc = sql.Identifier(table), sql.Identifier(parent_col), sql.Identifier(child_col)
        current = {
            r[0]
            for r in self.execute(
                path, sql.SQL("SELECT {} FROM {} WHERE {} = %s").format(cc, t, pc), [parent_id]
            ).fetchall()
        }
        extra = sorted(current - set(wanted))
        if extra:
            self.execute(
                path,
                sql.SQL("DELETE FROM {} WHERE {} = %s AND {} = ANY(%s)").format(t, pc, cc),
                [parent_id, extra],
            )
            self.report.removed[table] += len(extra)
        for child in wanted:
            if child in current:
                self.report.unchanged[table] += 1
            else:
                self.execute(
                    path,
                    sql.SQL("INSERT INTO {} ({}, {}) VALUES (%s, %s)").format(t, pc, cc),
                    [parent_id, child],
                )
                self.report.inserted[table] += 1

    def sync_failover(self, trunk_id: int, wanted: list[int], path: str) -> None:
        current = [
            r[0]
            for r in self.execute(
                path,
                "SELECT gateway_id FROM trunk_failover_gateways WHERE trunk_id = %s ORDER BY position",
                [trunk_id],
            ).fetchall()
        ]
        table = "trunk_failover_gateways"
        if current == wanted:
            self.report.unchanged[table] += len(wanted)
            return
        self.execute(path, "DELETE FROM trunk_failover_gateways WHERE trunk_id = %s", [trunk_id])
        self.report.removed[table] += len(current)
        for position, gateway_id in enumerate(wanted, start=1):
            self.execute(
                path,
                "INSERT INTO trunk_failover_gateways (trunk_id, position, gateway_id) VALUES (%s, %s, %s)",
                [trunk_id, position, gateway_id],
            )
        self.report.inserted[table] += len(wanted)

    # -- references

    _LOOKUP: ClassVar[dict[str, str]] = {
        "rate_group": "SELECT id FROM rate_groups WHERE name = %s",
        "localization": "SELECT id FROM localizations WHERE name = %s",
        "gateway": "SELECT id FROM gateways WHERE name = %s",
        "trunk": "SELECT id FROM trunks WHERE name = %s",
        "account": "SELECT id FROM accounts WHERE number = %s AND NOT deleted",
    }
    _WHAT: ClassVar[dict[str, str]] = {
        "rate_group": "rate group",
        "localization": "localization",
        "gateway": "gateway",
        "trunk": "trunk",
        "account": "account",
        "reseller": "reseller",
        "provider": "provider",
    }

    def resolve(self, kind: str, name: str, path: str) -> int:
        """The id of a named entity, from this document or the database; FixtureError if unknown."""
        table_kind = "account" if kind in ("reseller", "provider") else kind
        ident = self.ids.get((table_kind, name))
        if ident is None:
            row = self.execute(path, self._LOOKUP[table_kind], [name]).fetchone()
            if row is None:
                raise FixtureError([f"{path}: unknown {self._WHAT[kind]} {name!r}"])
            ident = self.ids[(table_kind, name)] = int(row[0])
        if kind in ("reseller", "provider"):
            actual = self.kinds.get(name)
            if actual is None:
                found = self.execute(path, "SELECT kind FROM accounts WHERE id = %s", [ident]).fetchone()
                assert found is not None  # the id was just resolved
                actual = found[0]
                self.kinds[name] = actual
            if actual != kind:
                raise FixtureError([f"{path}: account {name!r} is a {actual}, not a {kind}"])
        return ident

    def check_references(self, doc: _Parsed) -> None:
        """Report every unknown reference at once, before anything is written."""
        declared: dict[str, set[str]] = {
            "rate_group": {g.f["name"] for g in doc.rate_groups},
            "localization": {x.f["name"] for x in doc.localizations},
            "gateway": {x.f["name"] for x in doc.gateways},
            "trunk": {t.f["name"] for t in doc.trunks},
            "account": {a.f["number"] for a in doc.accounts},
        }
        kinds = {a.f["number"]: a.kind for a in doc.accounts}
        refs: list[tuple[str, str, str]] = []  # (kind, name, path)

        def add(kind: str, value: Any, path: str) -> None:
            if value is None:
                return
            for name in value if isinstance(value, list) else [value]:
                refs.append((kind, name, path))

        for g in doc.rate_groups:
            add("reseller", g.f.get("reseller"), f"{g.path}.reseller")
            add("trunk", g.f.get("trunks"), f"{g.path}.trunks")
            for r in g.rates:
                add("trunk", r.f.get("forced_trunks"), f"{r.path}.forced_trunks")
        for r in doc.origination_rates:
            add("rate_group", r.f.get("rate_group"), f"{r.path}.rate_group")
            add("account", r.f.get("account"), f"{r.path}.account")
            add("trunk", r.f.get("forced_trunks"), f"{r.path}.forced_trunks")
        for t in doc.trunks:
            add("gateway", t.f.get("gateway"), f"{t.path}.gateway")
            add("gateway", t.f.get("failover_gateways"), f"{t.path}.failover_gateways")
            add("localization", t.f.get("localization"), f"{t.path}.localization")
        for a in doc.accounts:
            if a.parent is not None and a.parent_path.endswith(".reseller"):
                add("reseller", a.parent, a.parent_path)
            for key in ("rate_group", "non_cli_rate_group", "localization"):
                add(_ACCOUNT_REFS[key][0], a.f.get(key), f"{a.path}.{key}")
            for d in a.children.get("dids", []):
                add("provider", d.f.get("provider"), f"{d.path}.provider")
            for r in a.children.get("personal_rates", []):
                add("trunk", r.f.get("forced_trunks"), f"{r.path}.forced_trunks")
        for d in doc.dids:
            add("provider", d.f.get("provider"), f"{d.path}.provider")
            add("account", d.f.get("account"), f"{d.path}.account")

        problems = []
        for kind, name, path in refs:
            table_kind = "account" if kind in ("reseller", "provider") else kind
            if name in declared[table_kind]:
                if kind in ("reseller", "provider") and kinds[name] != kind:
                    problems.append(f"{path}: account {name!r} is a {kinds[name]}, not a {kind}")
                continue
            try:
                self.resolve(kind, name, path)
            except FixtureError as exc:
                problems.extend(exc.problems)
        if problems:
            raise FixtureError(problems)

    # -- the load, in dependency order

    def load(self, doc: _Parsed) -> None:
        self.check_references(doc)
        for x in doc.localizations:
            f = dict(x.f)
            name = f.pop("name")
            self.ids[("localization", name)] = self.upsert("localizations", x.path, {"name": name}, f)
        for g in doc.rate_groups:
            # the owner (a reseller, maybe declared below) is set at the end
            f = {k: v for k, v in g.f.items() if k not in ("reseller", "trunks")}
            name = f.pop("name")
            self.ids[("rate_group", name)] = self.upsert("rate_groups", g.path, {"name": name}, f)
        for x in doc.gateways:
            f = dict(x.f)
            name = f.pop("name")
            if "params" in f:
                f["params"] = Jsonb(f["params"])
            self.ids[("gateway", name)] = self.upsert("gateways", x.path, {"name": name}, f)

        for a in self.ordered_accounts(doc.accounts):
            self.account(a)

        for t in doc.trunks:
            self.trunk(t)

        for g in doc.rate_groups:
            group_id = self.ids[("rate_group", g.f["name"])]
            if "trunks" in g.f:
                wanted = [self.resolve("trunk", n, f"{g.path}.trunks") for n in g.f["trunks"]]
                self.sync_set("rate_group_trunks", "rate_group_id", group_id, "trunk_id", wanted, g.path)
            for r in g.rates:
                self.rate(r, {"rate_group_id": group_id})
        for r in doc.origination_rates:
            if "rate_group" in r.f:
                group_id = self.resolve("rate_group", r.f["rate_group"], f"{r.path}.rate_group")
                owner = {"rate_group_id": group_id}
            else:
                owner = {"account_id": self.resolve("account", r.f["account"], f"{r.path}.account")}
            self.rate(r, owner)

        for a in doc.accounts:
            self.account_children(a)
        for d in doc.dids:
            account_id: Any = ...
            if "account" in d.f:
                account_id = (
                    None
                    if d.f["account"] is None
                    else self.resolve("account", d.f["account"], f"{d.path}.account")
                )
            self.did(d, account_id)

        for g in doc.rate_groups:
            if "reseller" in g.f:
                group_owner = (
                    None
                    if g.f["reseller"] is None
                    else self.resolve("reseller", g.f["reseller"], f"{g.path}.reseller")
                )
                # counted with the group's own upsert above (an owner change shows as no extra row)
                self.execute(
                    f"{g.path}.reseller",
                    "UPDATE rate_groups SET reseller_id = %s"
                    " WHERE id = %s AND reseller_id IS DISTINCT FROM %s",
                    [group_owner, self.ids[("rate_group", g.f["name"])], group_owner],
                )

    def ordered_accounts(self, accounts: list[_Account]) -> list[_Account]:
        """Accounts with each document-declared reseller before the accounts it owns."""
        by_number = {a.f["number"]: a for a in accounts}
        done: set[str] = set()
        order: list[_Account] = []

        def visit(a: _Account, trail: tuple[str, ...]) -> None:
            number = a.f["number"]
            if number in done:
                return
            if number in trail:
                raise FixtureError([f"{a.parent_path}: reseller chain loops through {number!r}"])
            parent = by_number.get(a.parent) if a.parent is not None else None
            if parent is not None:
                visit(parent, (*trail, number))
            done.add(number)
            order.append(a)

        for a in accounts:
            visit(a, ())
        return order

    def account(self, a: _Account) -> None:
        f = dict(a.f)
        number = f.pop("number")
        values: dict[str, Any] = {"kind": a.kind}
        values["reseller_id"] = (
            None
            if a.parent is None
            else self.resolve("reseller", a.parent, a.parent_path or f"{a.path}.reseller")
        )
        for key, (kind, column) in _ACCOUNT_REFS.items():
            if key in f:
                name = f.pop(key)
                values[column] = None if name is None else self.resolve(kind, name, f"{a.path}.{key}")
        secrets = {k: f.pop(k) for k in ("password", "pin") if k in f}
        if secrets:
            row = self.execute(
                a.path,
                "SELECT password_hash, pin_hash FROM accounts WHERE number = %s AND NOT deleted",
                [number],
            ).fetchone()
            stored = {"password": row[0] if row else None, "pin": row[1] if row else None}
            for key, secret in secrets.items():
                if secret is None:
                    values[f"{key}_hash"] = None
                elif verify_secret(secret, stored[key]):
                    values[f"{key}_hash"] = stored[key]
                else:
                    values[f"{key}_hash"] = hash_secret(secret)
        values.update(f)
        before = self._balance_of(a.path, number) if "balance" in values else None
        account_id = self.upsert("accounts", a.path, {"number": number}, values, partial="NOT deleted")
        self.ids[("account", number)] = account_id
        if "balance" in values:
            self._record_balance_set(a.path, account_id, before)
        self.kinds[number] = a.kind

    def _balance_of(self, path: str, number: str) -> Decimal | None:
        row = self.execute(
            path, "SELECT balance FROM accounts WHERE number = %s AND NOT deleted", [number]
        ).fetchone()
        return None if row is None else Decimal(row[0])

    def _record_balance_set(self, path: str, account_id: int, before: Decimal | None) -> None:
        """A balance a document sets is a ledger entry like any other: the opening balance of a
        new account ('initial'), or the difference it makes on an existing one (a refill or a
        charge), so the ledger equation (docs/accounting.md) holds for loaded accounts too."""
        self.execute(
            path,
            "INSERT INTO balance_changes"
            " (account_id, kind, amount, balance_after, currency, description, actor)"
            " SELECT id, CASE WHEN %s::numeric IS NULL THEN 'initial'"
            "                 WHEN balance > %s THEN 'refill' ELSE 'charge' END,"
            "        balance - coalesce(%s, 0), balance, currency,"
            "        'balance set by a fixture document', 'fixtures'"
            "   FROM accounts WHERE id = %s AND balance <> coalesce(%s, 0)",
            [before, before, before, account_id, before],
        )

    def trunk(self, t: _Trunk) -> None:
        f = dict(t.f)
        name = f.pop("name")
        values: dict[str, Any] = {"provider_id": self.resolve("provider", t.provider, f"{t.path}")}
        values["gateway_id"] = self.resolve("gateway", f.pop("gateway"), f"{t.path}.gateway")
        failover = f.pop("failover_gateways", None)
        if "localization" in f:
            loc = f.pop("localization")
            values["localization_id"] = (
                None if loc is None else self.resolve("localization", loc, f"{t.path}.localization")
            )
        values.update(f)
        trunk_id = self.upsert("trunks", t.path, {"name": name}, values)
        self.ids[("trunk", name)] = trunk_id
        if failover is not None:
            wanted = [self.resolve("gateway", n, f"{t.path}.failover_gateways") for n in failover]
            if values["gateway_id"] in wanted:
                primary = t.f["gateway"]
                raise FixtureError([f"{t.path}.failover_gateways: lists the primary gateway {primary!r}"])
            self.sync_failover(trunk_id, wanted, t.path)
        for r in t.termination_rates:
            rf = dict(r.f)
            prefix = rf.pop("prefix")
            self.upsert("termination_rates", r.path, {"trunk_id": trunk_id, "prefix": prefix}, rf)

    def rate(self, r: _Item, owner: Mapping[str, int]) -> None:
        f = {k: v for k, v in r.f.items() if k not in ("rate_group", "account", "forced_trunks")}
        prefix = f.pop("prefix")
        rate_id = self.upsert("origination_rates", r.path, {**owner, "prefix": prefix}, f)
        if "forced_trunks" in r.f:
            wanted = [self.resolve("trunk", n, f"{r.path}.forced_trunks") for n in r.f["forced_trunks"]]
            self.sync_set("origination_rate_trunks", "rate_id", rate_id, "trunk_id", wanted, r.path)

    def did(self, d: _Item, account_id: Any) -> None:
        f = dict(d.f)
        f.pop("account", None)
        number = f.pop("number")
        values: dict[str, Any] = {}
        if account_id is not ...:
            values["account_id"] = account_id
        if "provider" in f:
            provider = f.pop("provider")
            values["provider_id"] = (
                None if provider is None else self.resolve("provider", provider, f"{d.path}.provider")
            )
        values.update(f)
        did_id = self.upsert("dids", d.path, {"number": number}, values)
        row = self.execute(
            d.path, "SELECT account_id, destination_type, destination FROM dids WHERE id = %s", [did_id]
        ).fetchone()
        assert row is not None  # the row was just upserted
        owner, dtype, destination = row
        if dtype == "device" and destination:
            found = self.execute(
                d.path,
                "SELECT 1 FROM sip_devices WHERE username = %s AND account_id IS NOT DISTINCT FROM %s",
                [destination, owner],
            ).fetchone()
            if found is None:
                raise FixtureError(
                    [f"{d.path}.destination: {destination!r} is not a SIP device of the DID's account"]
                )

    def account_children(self, a: _Account) -> None:
        account_id = self.ids[("account", a.f["number"])]
        for x in a.children.get("sip_devices", []):
            f = dict(x.f)
            key = {"username": f.pop("username")}
            self.upsert("sip_devices", x.path, key, {"account_id": account_id, **f})
        for x in a.children.get("ip_map", []):
            f = dict(x.f)
            key = {"cidr": f.pop("cidr"), "tech_prefix": f.pop("tech_prefix", "")}
            self.upsert("ip_map", x.path, key, {"account_id": account_id, **f})
        for x in a.children.get("caller_ids", []):
            f = dict(x.f)
            self.upsert("caller_ids", x.path, {"account_id": account_id, "number": f.pop("number")}, f)
        for x in a.children.get("forced_caller_id", []):
            self.upsert(
                "forced_caller_ids", x.path, {"account_id": account_id}, dict(x.f), returning="account_id"
            )
        for x in a.children.get("speed_dials", []):
            f = dict(x.f)
            self.upsert(
                "speed_dials",
                x.path,
                {"account_id": account_id, "key": f.pop("key")},
                f,
                returning="account_id",
            )
        for x in a.children.get("blocked_codes", []):
            f = dict(x.f)
            self.upsert("blocked_codes", x.path, {"account_id": account_id, "prefix": f.pop("prefix")}, f)
        for x in a.children.get("personal_rates", []):
            self.rate(x, {"account_id": account_id})
        for x in a.children.get("dids", []):
            self.did(x, account_id)


def load_document(conn: psycopg.Connection[Any], doc: Mapping[str, Any]) -> LoadReport:
    """Validate `doc` and upsert it in one transaction; FixtureError (nothing written) if invalid.

    On an idle connection the transaction is committed on success; inside a
    caller's transaction a savepoint is used and committing is the caller's job.
    """
    parser = _Parser()
    parsed = parser.parse(doc)
    if parser.problems:
        raise FixtureError(parser.problems)
    report = LoadReport()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [FIXTURE_LOCK_KEY])
        _Writer(conn, report).load(parsed)
    return report
