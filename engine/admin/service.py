"""The one service layer of customer management: rules, validation, transactions, audit.

The CLI and the HTTP API both call :class:`AdminService`; neither holds a
business rule. Every method that writes runs in one transaction that also
writes the audit log; nothing is half-done on error.

Scope: an :class:`Actor` is the admin (``reseller_id is None``) or a reseller,
who sees and changes only the accounts below it (its subtree, sub-resellers'
customers included). An account outside the scope is reported as not found,
exactly like one that does not exist.

Accounts here are customers and providers (ASTPP's customer module); the
account number is the handle, unique among accounts that are not deleted.

Secrets: passwords and PINs are stored as scrypt hashes and never returned;
secrets the server generates (password, PIN, SIP password) are returned once,
by the call that generated them. SIP device passwords are stored as given
(FreeSWITCH needs them for digest authentication) but never returned either.

Balances follow callgate's convention: ``balance`` is what the customer holds
(negative = debt), prepaid and postpaid alike; available credit is
``balance + credit_limit``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from itertools import islice
from typing import Any, Protocol, TextIO

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb, set_json_loads
from pydantic import ValidationError

from engine.admin import csvio, numbers
from engine.admin import schemas as s
from engine.admin.errors import FieldError, Forbidden, NotFound, Unauthorized, ValidationFailed
from engine.admin.settings import AdminSettings

ACCOUNT_KINDS = ("customer", "provider")

# CustomerCreate fields stored in the accounts column of the same name.
DIRECT_COLUMNS = (
    "number",
    "status",
    "email",
    "valid_days",
    "expiry",
    "expiry_from_first_use",
    "max_channels",
    "cps",
    "local_calls_allowed",
    "local_call_cost_per_minute",
    "codecs",
    "paypal_permission",
    "is_recording",
    "allow_ip_management",
    "notify_enabled",
    "notify_balance_below",
    "notify_email",
    "first_name",
    "last_name",
    "company",
    "phone",
    "mobile",
    "address_1",
    "address_2",
    "city",
    "province",
    "postal_code",
    "country",
    "language",
    "balance",
    "credit_limit",
    "cli_pool",
    "billing_schedule",
    "tax_number",
    "generate_invoice",
    "invoice_note",
    "reference",
)

# database constraint -> (field, message), for writes that lose a race to another writer
CONSTRAINT_MESSAGES = {
    "accounts_number_live_key": ("number", "is already used by another account"),
    "accounts_email_live_key": ("email", "is already used by another account"),
    "sip_devices_username_key": ("username", "is already taken by another SIP device"),
    "ip_map_cidr_prefix_key": ("cidr", "this network with this tech prefix is already mapped"),
    "caller_ids_account_number_key": ("number", "is already a caller ID of this account"),
    "blocked_codes_account_prefix_key": ("prefix", "is already blocked for this account"),
}


def _dumps(value: Any) -> str:
    """JSON text for jsonb with exact decimals (json.dumps would need floats or strings)."""
    if isinstance(value, Decimal) and value.is_finite():
        return format(value, "f")
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in value) + "]"
    if isinstance(value, datetime):
        return json.dumps(value.isoformat())
    return json.dumps(value, default=str)


def _now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- actor and progress


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: written into the audit log, and the scope of what they can see."""

    name: str
    reseller_id: int | None = None  # None = the admin
    reseller_number: str | None = None
    token_id: int | None = None

    @property
    def is_admin(self) -> bool:
        return self.reseller_id is None

    @classmethod
    def cli(cls) -> Actor:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # pragma: no cover - no passwd entry
            user = "unknown"
        return cls(name=f"cli:{user}")


class Progress(Protocol):
    def begin(self, total: int | None, label: str) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    def begin(self, total: int | None, label: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass

    def end(self) -> None:
        pass


# --------------------------------------------------------------------------- internal records


@dataclass
class _NewAccount:
    """An account that passed every check and waits to be inserted."""

    key: Any  # the caller's handle: import row number, list index...
    kind: str
    columns: dict[str, Any]
    password: str | None = None  # in clear until hashed at insert time
    pin: str | None = None
    sip: dict[str, Any] | None = None  # sip_devices columns (clear password: FreeSWITCH needs it)
    generated: s.GeneratedSecrets = field(default_factory=s.GeneratedSecrets)


@dataclass
class _RefCache:
    rate_groups: dict[str, tuple[int, int | None, bool] | None] = field(default_factory=dict)
    localizations: dict[str, int | None] = field(default_factory=dict)
    resellers: dict[str, int | None] = field(default_factory=dict)


def _batched(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(iterable)
    while chunk := list(islice(it, size)):
        yield chunk


def _like(value: str, op: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return {
        "begins": f"{escaped}%",
        "ends": f"%{escaped}",
        "contains": f"%{escaped}%",
        "not_contains": f"%{escaped}%",
    }[op]


_GRID_SELECT = """
SELECT a.kind AS entity_type,
       CASE WHEN a.postpaid THEN 'postpaid' ELSE 'prepaid' END AS account_type,
       a.number, a.first_name, a.last_name, a.company, a.email, rg.name AS rate_group,
       a.balance, a.credit_limit, a.currency, a.first_used, a.expiry, a.max_channels AS concurrent_calls,
       loc.name AS localization, r.number AS reseller, a.created_at AS created, a.status, a.billing_schedule
  FROM accounts a
  LEFT JOIN rate_groups rg ON rg.id = a.rate_group_id
  LEFT JOIN localizations loc ON loc.id = a.localization_id
  LEFT JOIN accounts r ON r.id = a.reseller_id
"""

_DETAIL_SELECT = """
SELECT a.*, r.number AS reseller_number, rg.name AS rate_group_name, nrg.name AS non_cli_rate_group_name,
       loc.name AS localization_name
  FROM accounts a
  LEFT JOIN accounts r ON r.id = a.reseller_id
  LEFT JOIN rate_groups rg ON rg.id = a.rate_group_id
  LEFT JOIN rate_groups nrg ON nrg.id = a.non_cli_rate_group_id
  LEFT JOIN localizations loc ON loc.id = a.localization_id
"""

# grid column -> SQL expression (filters and sorting)
_GRID_EXPR = {
    "entity_type": "a.kind",
    "account_type": "a.postpaid",
    "number": "a.number",
    "first_name": "a.first_name",
    "last_name": "a.last_name",
    "company": "a.company",
    "email": "coalesce(a.email, '')",
    "rate_group": "coalesce(rg.name, '')",
    "balance": "a.balance",
    "credit_limit": "a.credit_limit",
    "first_used": "a.first_used",
    "expiry": "a.expiry",
    "concurrent_calls": "a.max_channels",
    "localization": "coalesce(loc.name, '')",
    "reseller": "coalesce(r.number, '')",
    "created": "a.created_at",
    "status": "a.status",
    "billing_schedule": "a.billing_schedule",
}
_TEXT_FILTERS = (
    "number",
    "first_name",
    "last_name",
    "company",
    "email",
    "rate_group",
    "localization",
    "reseller",
)
_RANGE_FILTERS = {
    "balance_min": ("balance", ">="),
    "balance_max": ("balance", "<="),
    "credit_limit_min": ("credit_limit", ">="),
    "credit_limit_max": ("credit_limit", "<="),
    "concurrent_calls_min": ("concurrent_calls", ">="),
    "concurrent_calls_max": ("concurrent_calls", "<="),
    "first_used_from": ("first_used", ">="),
    "first_used_to": ("first_used", "<="),
    "expiry_from": ("expiry", ">="),
    "expiry_to": ("expiry", "<="),
    "created_from": ("created", ">="),
    "created_to": ("created", "<="),
}

_CHILD_IMAGE = "to_jsonb({t}.*) - 'updated_at' - 'change_version' - 'password'"


@dataclass(frozen=True, slots=True)
class _ChildTable:
    """A per-account sub-resource table whose rows are found by one key column within the account."""

    table: str
    key_column: str
    entity: str  # audit entity; the audit actions are `<entity>.create`, `.update` and `.delete`
    label: str  # what a missing row is called in NotFound

    def missing(self, key: str | int) -> str:
        return f"{self.label} {key} not found"

    def row_condition(self) -> sql.Composable:
        return sql.SQL("account_id = %s AND {} = %s").format(sql.Identifier(self.key_column))

    def locked_image_query(self) -> sql.Composable:
        return sql.SQL("SELECT {} FROM {} WHERE {} FOR UPDATE").format(
            sql.SQL(_CHILD_IMAGE.format(t=self.table)), sql.Identifier(self.table), self.row_condition()
        )


_SIP_DEVICES = _ChildTable("sip_devices", "username", "sip_device", "SIP device")
_IP_MAP = _ChildTable("ip_map", "id", "ip_map", "IP map entry")
_CALLER_IDS = _ChildTable("caller_ids", "number", "caller_id", "caller ID")
_SPEED_DIALS = _ChildTable("speed_dials", "key", "speed_dial", "speed dial")
_BLOCKED_CODES = _ChildTable("blocked_codes", "prefix", "blocked_code", "blocked code")


class AdminService:
    """Customer management for one actor over one connection (autocommit; see module docstring)."""

    def __init__(self, conn: psycopg.Connection[Any], settings: AdminSettings, actor: Actor) -> None:
        if not conn.autocommit:
            raise ValueError("AdminService needs an autocommit connection (it opens its own transactions)")
        self.conn = conn
        self.settings = settings
        self.actor = actor
        set_json_loads(partial(json.loads, parse_float=Decimal), conn)

    # ================================================================= scope and lookups

    def _scope(self, alias: str = "a") -> sql.Composable:
        if self.actor.is_admin:
            return sql.SQL("TRUE")
        return sql.SQL(
            "{a}.id IN (WITH RECURSIVE subtree(id) AS ("
            " SELECT id FROM accounts WHERE reseller_id = {r}"
            " UNION SELECT c.id FROM accounts c JOIN subtree t ON c.reseller_id = t.id)"
            " SELECT id FROM subtree)"
        ).format(a=sql.Identifier(alias), r=sql.Literal(self.actor.reseller_id))

    def _find(self, number: str, *, lock: bool = False) -> dict[str, Any]:
        """The live customer or provider `number` within the actor's scope (NotFound otherwise)."""
        query = sql.SQL(
            _DETAIL_SELECT + " WHERE a.number = %s AND NOT a.deleted AND a.kind = ANY(%s) AND {}"
        ).format(self._scope())
        if lock:
            query = sql.SQL("{} FOR UPDATE OF a").format(query)
        with self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(query, [number, list(ACCOUNT_KINDS)]).fetchone()
        if row is None:
            raise NotFound(f"account {number} not found")
        return row

    def _require_admin(self, what: str) -> None:
        if not self.actor.is_admin:
            raise Forbidden(f"{what} needs an admin token")

    # ================================================================= audit

    def _audit(
        self,
        action: str,
        entity: str,
        key: str,
        account_id: int | None,
        before: Any = None,
        after: Any = None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO audit_log (actor, token_id, action, account_id, entity, entity_key, before, after)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
            [
                self.actor.name,
                self.actor.token_id,
                action,
                account_id,
                entity,
                key,
                None if before is None else Jsonb(before, dumps=_dumps),
                None if after is None else Jsonb(after, dumps=_dumps),
            ],
        )

    def _account_image(self, account_id: int) -> dict[str, Any]:
        row = self.conn.execute(
            "SELECT callgate_audit_account(a) FROM accounts a WHERE a.id = %s", [account_id]
        ).fetchone()
        assert row is not None
        return row[0]

    # ================================================================= output

    def _account_out(self, row: Mapping[str, Any]) -> s.AccountOut:
        return s.AccountOut(
            entity_type=row["kind"],
            number=row["number"],
            reseller=row["reseller_number"],
            status=row["status"],
            email=row["email"],
            has_password=row["password_hash"] is not None,
            has_pin=row["pin_hash"] is not None,
            valid_days=row["valid_days"],
            expiry=row["expiry"],
            expiry_from_first_use=row["expiry_from_first_use"],
            first_used=row["first_used"],
            created=row["created_at"],
            max_channels=row["max_channels"],
            cps=row["cps"],
            localization=row["localization_name"],
            local_calls_allowed=row["local_calls_allowed"],
            local_call_cost_per_minute=row["local_call_cost_per_minute"],
            codecs=row["codecs"],
            notifications=row["notifications"],
            paypal_permission=row["paypal_permission"],
            is_recording=row["is_recording"],
            allow_ip_management=row["allow_ip_management"],
            notify_enabled=row["notify_enabled"],
            notify_balance_below=row["notify_balance_below"],
            notify_email=row["notify_email"],
            first_name=row["first_name"],
            last_name=row["last_name"],
            company=row["company"],
            phone=row["phone"],
            mobile=row["mobile"],
            address_1=row["address_1"],
            address_2=row["address_2"],
            city=row["city"],
            province=row["province"],
            postal_code=row["postal_code"],
            country=row["country"],
            timezone=row["timezone"],
            language=row["language"],
            currency=row["currency"],
            account_type="postpaid" if row["postpaid"] else "prepaid",
            balance=row["balance"],
            credit_limit=row["credit_limit"],
            available=row["balance"] + row["credit_limit"],
            rate_group=row["rate_group_name"],
            non_cli_rate_group=row["non_cli_rate_group_name"],
            cli_pool=row["cli_pool"],
            billing_schedule=row["billing_schedule"],
            invoice_day=row["invoice_day"],
            tax_number=row["tax_number"],
            generate_invoice=row["generate_invoice"],
            invoice_note=row["invoice_note"],
            reference=row["reference"],
        )

    def get_account(self, number: str) -> s.AccountOut:
        return self._account_out(self._find(number))

    # ================================================================= the form's rules

    def _form_rules(
        self, m: s.CustomerCreate, kind: str, *, creating: bool, require_email: bool = True
    ) -> list[FieldError]:
        """Rules across fields of the customer form (formats were checked by the schema)."""
        errs: list[FieldError] = []
        if require_email and not m.email:
            errs.append(FieldError("email", "required"))
        if kind == "provider" and m.reseller:
            errs.append(FieldError("reseller", "a provider belongs to the admin, not to a reseller"))
        if kind == "customer" and m.rate_group is None:
            errs.append(FieldError("rate_group", "required for a customer"))
        if m.account_type == "prepaid" and m.credit_limit != 0:
            errs.append(FieldError("credit_limit", "only postpaid accounts have a credit limit"))
        problem = _invoice_day_problem(m.billing_schedule, m.invoice_day)
        if problem:
            errs.append(FieldError("invoice_day", problem))
        problem = _notify_problem(m.notify_enabled, m.notify_balance_below)
        if problem:
            errs.append(FieldError("notify_balance_below", problem))
        if m.expiry_from_first_use and m.valid_days is None:
            errs.append(FieldError("valid_days", "required when expiry_from_first_use is true"))
        if m.expiry_from_first_use and m.expiry is not None and creating:
            errs.append(FieldError("expiry", "give an expiry or expiry_from_first_use, not both"))
        if m.cli_pool in (3, 4, 5) and m.non_cli_rate_group is None:
            errs.append(FieldError("non_cli_rate_group", "required when cli_pool is 3, 4 or 5"))
        if creating:
            if m.pin is not None and m.generate_pin:
                errs.append(FieldError("pin", "give a PIN or generate_pin, not both"))
            if (m.sip_username or m.sip_password) and m.create_sip_device is False:
                errs.append(
                    FieldError("create_sip_device", "is false but a SIP username or password was given")
                )
            if m.expiry is not None and m.expiry <= _now():
                errs.append(FieldError("expiry", "must be in the future"))
        return errs

    def _resolve(
        self, m: s.CustomerCreate, kind: str, cache: _RefCache
    ) -> tuple[dict[str, Any], list[FieldError]]:
        """Names and numbers -> ids: reseller, rate groups, localization (checked against the scope)."""
        errs: list[FieldError] = []
        out: dict[str, Any] = {}
        if kind == "provider":
            out["reseller_id"] = None
        elif m.reseller is not None:
            reseller_id = self._reseller_id(m.reseller, cache)
            if reseller_id is None:
                errs.append(FieldError("reseller", f"no reseller with number {m.reseller}"))
            out["reseller_id"] = reseller_id
        else:
            out["reseller_id"] = self.actor.reseller_id
        owner = out["reseller_id"]
        for name, column in (
            ("rate_group", "rate_group_id"),
            ("non_cli_rate_group", "non_cli_rate_group_id"),
        ):
            group = getattr(m, name)
            out[column] = None
            if group is None:
                continue
            found = self._rate_group(group, cache)
            if found is None:
                errs.append(FieldError(name, f"no rate group named {group!r}"))
                continue
            group_id, group_owner, active = found
            if group_owner != owner:
                whose = "the admin" if owner is None else "the account's reseller"
                errs.append(FieldError(name, f"{group!r} is not a rate group of {whose}"))
            elif not active:
                errs.append(FieldError(name, f"{group!r} is inactive"))
            out[column] = group_id
        out["localization_id"] = None
        if m.localization is not None:
            if m.localization not in cache.localizations:
                row = self.conn.execute(
                    "SELECT id FROM localizations WHERE name = %s", [m.localization]
                ).fetchone()
                cache.localizations[m.localization] = row[0] if row else None
            out["localization_id"] = cache.localizations[m.localization]
            if out["localization_id"] is None:
                errs.append(FieldError("localization", f"no localization named {m.localization!r}"))
        return out, errs

    def _reseller_id(self, number: str, cache: _RefCache) -> int | None:
        """A live reseller the actor may place accounts under (itself or one below it)."""
        if number not in cache.resellers:
            query = sql.SQL(
                "SELECT a.id FROM accounts a WHERE a.number = %s AND a.kind = 'reseller' AND NOT a.deleted"
                " AND ({} OR a.id = %s)"
            ).format(self._scope())
            row = self.conn.execute(query, [number, self.actor.reseller_id]).fetchone()
            cache.resellers[number] = row[0] if row else None
        return cache.resellers[number]

    def _rate_group(self, name: str, cache: _RefCache) -> tuple[int, int | None, bool] | None:
        if name not in cache.rate_groups:
            row = self.conn.execute(
                "SELECT id, reseller_id, active FROM rate_groups WHERE name = %s", [name]
            ).fetchone()
            cache.rate_groups[name] = (row[0], row[1], row[2]) if row else None
        return cache.rate_groups[name]

    def _columns(self, m: s.CustomerCreate, kind: str, refs: Mapping[str, Any]) -> dict[str, Any]:
        cols = {name: getattr(m, name) for name in DIRECT_COLUMNS}
        cols["kind"] = kind
        cols["postpaid"] = m.account_type == "postpaid"
        cols["notifications"] = m.notifications if m.notifications is not None else kind != "provider"
        cols["timezone"] = m.timezone or self.settings.default_timezone
        cols["currency"] = m.currency or self.settings.default_currency
        cols["invoice_day"] = _invoice_day(m.billing_schedule, m.invoice_day)
        cols.update(refs)
        return cols

    # ================================================================= creating accounts

    def _prepare(
        self,
        items: Sequence[tuple[Any, s.CustomerCreate, str]],
        *,
        cache: _RefCache | None = None,
        require_email: bool = True,
        generate_secrets: bool = True,
    ) -> tuple[list[_NewAccount], dict[Any, list[FieldError]]]:
        """Check `items` (key, form, kind) against every rule and each other; generate what is missing.

        `generate_secrets` false (imports): a missing password or PIN stays missing and a SIP
        device needs its password given, since nobody would ever see a generated one.
        Rows written earlier in the same run are in the database (or in the open transaction of a
        dry run), so a number, e-mail or SIP username repeated across batches is caught there.
        """
        cache = cache or _RefCache()
        errors: dict[Any, list[FieldError]] = {}
        ready: list[_NewAccount] = []
        now = _now()
        for key, m, kind in items:
            errs = self._form_rules(m, kind, creating=True, require_email=require_email)
            refs, ref_errs = self._resolve(m, kind, cache)
            errs += ref_errs
            if errs:  # go on: the uniqueness checks below report their problems too
                errors[key] = errs
            cols = self._columns(m, kind, refs)
            if m.expiry is None and m.valid_days is not None and not m.expiry_from_first_use:
                cols["expiry"] = now + timedelta(days=m.valid_days)
            new = _NewAccount(key=key, kind=kind, columns=cols)
            new.password, new.pin = m.password, m.pin
            if generate_secrets and m.password is None:
                new.password = new.generated.password = numbers.generate_password()
            generate_pin = self.settings.generate_pin if m.generate_pin is None else m.generate_pin
            if generate_secrets and m.pin is None and generate_pin:
                new.pin = new.generated.pin = numbers.generate_pin(self.settings.pin_length)
            wants_sip = m.create_sip_device
            if wants_sip is None:
                wants_sip = bool(m.sip_username or m.sip_password) or self.settings.create_sip_device
            if wants_sip:
                password = m.sip_password
                if password is None and generate_secrets:
                    password = new.generated.sip_password = numbers.generate_password(16)
                elif password is None:
                    errors.setdefault(key, []).append(
                        FieldError("sip_password", "required to create a SIP device here")
                    )
                new.sip = {"username": m.sip_username, "password": password}
            ready.append(new)

        # numbers: given ones must be free, missing ones are generated
        seen_numbers: dict[str, Any] = {}
        for new in ready:
            number = new.columns["number"]
            if number is not None:
                first = seen_numbers.setdefault(number, new.key)
                if first != new.key:
                    errors.setdefault(new.key, []).append(
                        FieldError("number", f"{number} repeats the one on line {first}")
                    )
        in_use = numbers.taken_numbers(self.conn, list(seen_numbers))
        for new in ready:
            number = new.columns["number"]
            if number is not None and number in in_use:
                errors.setdefault(new.key, []).append(
                    FieldError("number", f"{number} is already used by another account")
                )
        missing = [new for new in ready if new.columns["number"] is None and new.key not in errors]
        if missing:
            try:
                fresh = numbers.generate_numbers(
                    self.conn,
                    len(missing),
                    self.settings.account_number_length,
                    self.settings.account_number_start_digit,
                    exclude=list(seen_numbers),
                )
            except numbers.NotEnoughNumbers as exc:
                raise ValidationFailed.one(
                    "number",
                    f"no free account number to generate ({exc.free} left with "
                    f"{self.settings.account_number_length} digits); give one",
                ) from None
            for new, number in zip(missing, fresh, strict=True):
                new.columns["number"] = number
        for new in ready:
            if new.sip is not None and new.sip["username"] is None:
                new.sip["username"] = new.columns["number"]

        # e-mail addresses and SIP usernames: unique among live accounts / all devices
        self._unique_check(
            ready,
            errors,
            "email",
            lambda n: n.columns["email"],
            self._taken_emails,
            "is already used by another account",
            fold=str.lower,
        )
        self._unique_check(
            ready,
            errors,
            "sip_username",
            lambda n: n.sip and n.sip["username"],
            self._taken_usernames,
            "is already taken by another SIP device",
        )
        return [n for n in ready if n.key not in errors], errors

    def _unique_check(
        self,
        ready: list[_NewAccount],
        errors: dict[Any, list[FieldError]],
        field_name: str,
        get: Callable[[_NewAccount], str | None],
        lookup: Callable[[list[str]], set[str]],
        message: str,
        fold: Callable[[str], str] = str,
    ) -> None:
        first: dict[str, Any] = {}
        for new in ready:
            value = get(new)
            if not value:
                continue
            holder = first.setdefault(fold(value), new.key)
            if holder != new.key:
                errors.setdefault(new.key, []).append(
                    FieldError(field_name, f"{value} repeats the one on line {holder}")
                )
        in_use = lookup(list(first))
        for new in ready:
            value = get(new)
            if value and fold(value) in in_use:
                errors.setdefault(new.key, []).append(FieldError(field_name, f"{value} {message}"))

    def _taken_emails(self, emails: list[str]) -> set[str]:
        if not emails:
            return set()
        rows = self.conn.execute(
            "SELECT lower(email) FROM accounts WHERE NOT deleted AND lower(email) = ANY(%s)", [emails]
        ).fetchall()
        return {r[0] for r in rows}

    def _taken_usernames(self, usernames: list[str]) -> set[str]:
        if not usernames:
            return set()
        rows = self.conn.execute("SELECT username FROM sip_devices WHERE username = ANY(%s)", [usernames])
        return {r[0] for r in rows}

    def _insert(
        self, accounts: list[_NewAccount], action: str, progress: Progress | None = None
    ) -> list[int]:
        """Hash the secrets and insert accounts, SIP devices, opening balances and audit rows."""
        if not accounts:
            return []
        progress = progress or NoProgress()
        threads = self.settings.threads
        if any(a.password for a in accounts):
            progress.begin(sum(1 for a in accounts if a.password), "hashing passwords")
            hashed = numbers.hash_all(
                [a.password for a in accounts],
                n=numbers.PASSWORD_SCRYPT_N,
                threads=threads,
                progress=progress.advance,
            )
            progress.end()
            for a, h in zip(accounts, hashed, strict=True):
                a.columns["password_hash"] = h
        if any(a.pin for a in accounts):
            progress.begin(sum(1 for a in accounts if a.pin), "hashing PINs")
            hashed = numbers.hash_all(
                [a.pin for a in accounts],
                n=2**self.settings.pin_hash_log2_n,
                threads=threads,
                progress=progress.advance,
            )
            progress.end()
            for a, h in zip(accounts, hashed, strict=True):
                a.columns["pin_hash"] = h
        progress.begin(len(accounts), "writing accounts")
        ids: list[int] = []
        columns = sorted({c for a in accounts for c in a.columns})
        query = sql.SQL("INSERT INTO accounts ({}) SELECT * FROM unnest({}) RETURNING id, number").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(_ACCOUNT_TYPES[c])) for c in columns),
        )
        by_number: dict[str, int] = {}
        for chunk in _batched(accounts, 5000):
            params = [[a.columns.get(c) for a in chunk] for c in columns]
            for account_id, number in self.conn.execute(query, params).fetchall():
                by_number[number] = account_id
            progress.advance(len(chunk))
        ids = [by_number[a.columns["number"]] for a in accounts]
        devices = [(i, a) for i, a in zip(ids, accounts, strict=True) if a.sip]
        if devices:
            self.conn.execute(
                "INSERT INTO sip_devices (account_id, username, password, caller_id_number)"
                " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[])",
                [
                    [i for i, _ in devices],
                    [a.sip["username"] for _, a in devices],
                    [a.sip["password"] for _, a in devices],
                    [a.columns["number"] for _, a in devices],
                ],
            )
        opening = [(i, a) for i, a in zip(ids, accounts, strict=True) if a.columns.get("balance")]
        if opening:
            self.conn.execute(
                "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency, description,"
                " actor) SELECT id, 'initial', balance, balance, currency, 'opening balance', %s"
                " FROM accounts WHERE id = ANY(%s)",
                [self.actor.name, [i for i, _ in opening]],
            )
        self.conn.execute(
            "INSERT INTO audit_log (actor, token_id, action, account_id, entity, entity_key, after)"
            " SELECT %s, %s, %s, a.id, 'account', a.number, callgate_audit_account(a)"
            " FROM accounts a WHERE a.id = ANY(%s) ORDER BY a.id",
            [self.actor.name, self.actor.token_id, action, ids],
        )
        if devices:
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO audit_log (actor, token_id, action, account_id, entity, entity_key, after)"
                    " SELECT %s, %s, 'sip_device.create', d.account_id, 'sip_device', d.username, {}"
                    " FROM sip_devices d WHERE d.account_id = ANY(%s) ORDER BY d.id"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="d"))),
                [self.actor.name, self.actor.token_id, [i for i, _ in devices]],
            )
        progress.end()
        return ids

    def create_account(self, data: s.CustomerCreate, kind: str = "customer") -> s.AccountCreated:
        """ASTPP's customer (or provider) form: validate, generate what is missing, insert, audit."""
        if kind not in ACCOUNT_KINDS:
            raise ValueError(kind)
        if kind == "provider":
            self._require_admin("creating a provider")
        for attempt in range(3):
            try:
                with self.conn.transaction():
                    if data.number is None:
                        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [numbers.NUMBERS_LOCK_KEY])
                    ready, errors = self._prepare([(0, data, kind)])
                    if errors:
                        raise ValidationFailed(errors[0])
                    self._insert(ready, f"{kind}.create")
                break
            except pg_errors.UniqueViolation as exc:  # lost a race: the re-check reports the field
                if attempt == 2:
                    raise _constraint_error(exc) from None
        new = ready[0]
        return s.AccountCreated(
            account=self.get_account(new.columns["number"]),
            generated=new.generated,
            sip_username=new.sip["username"] if new.sip else None,
        )

    # ================================================================= editing

    def _form_values(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The stored account as CustomerCreate input (secrets left out)."""
        values = {name: row[name] for name in DIRECT_COLUMNS}
        values.update(
            reseller=row["reseller_number"],
            account_type="postpaid" if row["postpaid"] else "prepaid",
            notifications=row["notifications"],
            timezone=row["timezone"],
            currency=row["currency"],
            invoice_day=row["invoice_day"],
            rate_group=row["rate_group_name"],
            non_cli_rate_group=row["non_cli_rate_group_name"],
            localization=row["localization_name"],
        )
        return values

    def update_account(self, number: str, data: Any) -> s.AccountOut:
        """Profile and settings edit (CustomerUpdate): number, account type and balance never change."""
        given = data.model_dump(exclude_unset=True)
        with self.conn.transaction():
            row = self._find(number, lock=True)
            kind = row["kind"]
            merged = {**self._form_values(row), **given}
            merged = {k: v for k, v in merged.items() if v is not None or k in given}
            try:
                m = s.CustomerCreate.model_validate(merged)
            except ValidationError as exc:
                # stored values that today's rules refuse (e.g. loaded by fixtures) block only their own edit
                problems = [e for e in s.field_errors(exc) if _touched(e.field, given)]
                if problems:
                    raise ValidationFailed(problems) from None
                m = s.CustomerCreate.model_construct(**merged)
            errs = self._form_rules(m, kind, creating=False, require_email=row["email"] is not None)
            refs, ref_errs = self._resolve(m, kind, _RefCache())
            refs.pop("reseller_id")
            errs = [e for e in errs + ref_errs if _touched(e.field, given)]
            if (
                "expiry" in given
                and m.expiry is not None
                and m.expiry <= _now()
                and row["expiry"] != m.expiry
            ):
                errs.append(FieldError("expiry", "must be in the future"))
            if (
                m.email
                and (row["email"] or "").lower() != m.email.lower()
                and self._taken_emails([m.email.lower()])
            ):
                errs.append(FieldError("email", f"{m.email} is already used by another account"))
            if errs:
                raise ValidationFailed(errs)
            cols = self._columns(m, kind, refs)
            for immutable in ("number", "kind", "postpaid", "balance", "reseller_id"):
                cols.pop(immutable, None)
            if (
                "valid_days" in given
                and "expiry" not in given
                and m.valid_days is not None
                and not m.expiry_from_first_use
                and m.valid_days != row["valid_days"]
            ):
                cols["expiry"] = _now() + timedelta(days=m.valid_days)  # ASTPP: a new validity restarts now
            if "password" in given:
                cols["password_hash"] = (
                    None
                    if m.password is None
                    else numbers.hash_all([m.password], n=numbers.PASSWORD_SCRYPT_N, threads=1)[0]
                )
            if "pin" in given:
                cols["pin_hash"] = (
                    None
                    if m.pin is None
                    else numbers.hash_all([m.pin], n=2**self.settings.pin_hash_log2_n, threads=1)[0]
                )
            changed = {c: v for c, v in cols.items() if c.endswith("_hash") or row[c] != v}
            if changed:
                before = self._account_image(row["id"])
                self._execute_write(
                    sql.SQL("UPDATE accounts SET {} WHERE id = %s").format(_set_clause(changed)),
                    [*changed.values(), row["id"]],
                )
                self._audit(
                    "account.update", "account", number, row["id"], before, self._account_image(row["id"])
                )
        return self.get_account(number)

    def _execute_write(self, query: Any, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        try:
            with self.conn.transaction():
                return self.conn.execute(query, params)
        except (pg_errors.UniqueViolation, pg_errors.CheckViolation, pg_errors.ForeignKeyViolation) as exc:
            raise _constraint_error(exc) from None

    # ================================================================= list, search, export

    def _grid_where(self, q: s.CustomerFilter) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = [
            sql.SQL("NOT a.deleted AND a.kind IN ('customer', 'provider')"),
            self._scope(),
        ]
        params: list[Any] = []
        for name in _TEXT_FILTERS:
            value = getattr(q, name)
            if value is None:
                continue
            op = getattr(q, f"{name}_op") or ("begins" if name == "number" else "contains")
            expr = sql.SQL(_GRID_EXPR[name])
            if name == "reseller" and value.lower() == "admin":
                parts.append(sql.SQL("a.reseller_id IS NULL" if op != "ne" else "a.reseller_id IS NOT NULL"))
                continue
            if op in ("eq", "ne"):
                parts.append(
                    sql.SQL("lower({}) {} lower(%s)").format(expr, sql.SQL("=" if op == "eq" else "<>"))
                )
                params.append(value)
            else:
                like = "NOT ILIKE" if op == "not_contains" else "ILIKE"
                parts.append(sql.SQL("{} {} %s").format(expr, sql.SQL(like)))
                params.append(_like(value, op))
        for name, (column, op) in _RANGE_FILTERS.items():
            value = getattr(q, name)
            if value is not None:
                parts.append(sql.SQL("{} {} %s").format(sql.SQL(_GRID_EXPR[column]), sql.SQL(op)))
                params.append(value)
        for name, expr in (
            ("entity_type", "a.kind"),
            ("status", "a.status"),
            ("billing_schedule", "a.billing_schedule"),
        ):
            value = getattr(q, name)
            if value is not None:
                parts.append(sql.SQL(f"{expr} = %s"))
                params.append(value)
        if q.account_type is not None:
            parts.append(sql.SQL("a.postpaid = %s"))
            params.append(q.account_type == "postpaid")
        return sql.SQL(" AND ").join(parts), params

    def _grid_order(self, q: s.CustomerFilter) -> sql.Composable:
        key = q.sort.lstrip("-")
        direction = "DESC" if q.sort.startswith("-") else "ASC"
        return sql.SQL("ORDER BY {} {}, a.id {}").format(
            sql.SQL(_GRID_EXPR[key]), sql.SQL(direction), sql.SQL(direction)
        )

    def list_customers(self, q: s.CustomerQuery) -> s.CustomerPage:
        """The customer grid: customers and providers (resellers' customers included), one page."""
        if q.per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        where, params = self._grid_where(q)
        base = sql.SQL(_GRID_SELECT + " WHERE {}").format(where)
        total = self.conn.execute(sql.SQL("SELECT count(*) FROM ({}) g").format(base), params).fetchone()[0]
        query = sql.SQL("{} {} LIMIT %s OFFSET %s").format(base, self._grid_order(q))
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(query, [*params, q.per_page, (q.page - 1) * q.per_page]).fetchall()
        return s.CustomerPage(
            items=[s.CustomerRow(**r) for r in rows], page=q.page, per_page=q.per_page, total=total
        )

    def iter_customers(self, q: s.CustomerFilter) -> Iterator[s.CustomerRow]:
        """Every row of the search (no paging), streamed from a server-side cursor."""
        where, params = self._grid_where(q)
        query = sql.SQL(_GRID_SELECT + " WHERE {} {}").format(where, self._grid_order(q))
        with self.conn.transaction(), self.conn.cursor(name="callgate_export", row_factory=dict_row) as cur:
            cur.itersize = 2000
            cur.execute(query, params)
            for row in cur:
                yield s.CustomerRow(**row)

    # ================================================================= delete

    def delete_accounts(self, account_numbers: Sequence[str]) -> s.DeleteResult:
        """Soft-delete customers/providers in one transaction: off, children removed, DIDs released."""
        wanted = list(dict.fromkeys(account_numbers))
        with self.conn.transaction():
            rows = []
            missing = []
            for number in sorted(wanted):  # one locking order: concurrent deletes cannot deadlock
                try:
                    rows.append(self._find(number, lock=True))
                except NotFound:
                    missing.append(number)
            if missing:
                raise NotFound("account(s) not found: " + ", ".join(missing))
            released: list[str] = []
            for row in rows:
                released += self._delete_one(row)
        return s.DeleteResult(deleted=wanted, released_dids=released)

    def _delete_one(self, row: Mapping[str, Any]) -> list[str]:
        account_id = row["id"]
        before = self._account_image(account_id)
        children: dict[str, Any] = {}
        for table in (
            "sip_devices",
            "ip_map",
            "caller_ids",
            "forced_caller_ids",
            "speed_dials",
            "blocked_codes",
        ):
            images = self.conn.execute(
                sql.SQL("DELETE FROM {t} WHERE account_id = %s RETURNING {img}").format(
                    t=sql.Identifier(table), img=sql.SQL(_CHILD_IMAGE.format(t=table))
                ),
                [account_id],
            ).fetchall()
            children[table] = [r[0] for r in images]
        dids = self.conn.execute(
            "UPDATE dids SET account_id = NULL, destination_type = 'device', destination = ''"
            " WHERE account_id = %s RETURNING number",
            [account_id],
        ).fetchall()
        children["dids"] = [r[0] for r in dids]
        if row["kind"] == "provider":
            trunks = self.conn.execute(
                "UPDATE trunks SET active = false WHERE provider_id = %s AND active RETURNING name",
                [account_id],
            ).fetchall()
            children["trunks_disabled"] = [r[0] for r in trunks]
        self.conn.execute(
            "UPDATE accounts SET deleted = true, deleted_at = now(), status = 'inactive' WHERE id = %s",
            [account_id],
        )
        self._audit(
            "account.delete",
            "account",
            row["number"],
            account_id,
            {**before, "related": children},
            self._account_image(account_id),
        )
        return children["dids"]

    # ================================================================= mass create

    def mass_create(self, data: s.MassCreate, progress: Progress | None = None) -> s.MassCreateResult:
        """ASTPP's mass create: `count` numbers `prefix` + random digits, all or nothing."""
        template = s.CustomerCreate(
            first_name="-",
            reseller=data.reseller,
            currency=data.currency,
            country=data.country,
            timezone=data.timezone,
            account_type=data.account_type,
            balance=data.balance,
            credit_limit=data.credit_limit,
            cli_pool=data.cli_pool,
            rate_group=data.rate_group,
            non_cli_rate_group=data.non_cli_rate_group,
            billing_schedule=data.billing_schedule,
            invoice_day=data.invoice_day,
            valid_days=data.valid_days,
        )
        errs = self._form_rules(template, "customer", creating=True, require_email=False)
        if data.account_length <= len(data.prefix):
            errs.append(
                FieldError(
                    "account_length",
                    f"must be longer than the prefix ({len(data.prefix)} digits): the prefix is too long",
                )
            )
        generate_pin = self.settings.generate_pin if data.generate_pin is None else data.generate_pin
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [numbers.NUMBERS_LOCK_KEY])
            refs, ref_errs = self._resolve(template, "customer", _RefCache())
            errs += ref_errs
            if not any(e.field == "account_length" for e in errs):
                free = numbers.capacity(self.conn, data.account_length, data.prefix)
                if free <= 0:
                    errs.append(
                        FieldError(
                            "prefix",
                            f"no free account numbers left with prefix {data.prefix} "
                            f"and {data.account_length} digits",
                        )
                    )
                elif data.count > free:
                    errs.append(
                        FieldError(
                            "count",
                            f"only {free} free account numbers with prefix "
                            f"{data.prefix} and {data.account_length} digits",
                        )
                    )
            if errs:
                raise ValidationFailed(errs)
            fresh = numbers.generate_numbers(self.conn, data.count, data.account_length, data.prefix)
            if data.create_sip_devices:
                clash = self._taken_usernames(fresh)
                if clash:
                    raise ValidationFailed.one(
                        "create_sip_devices", f"SIP usernames already taken: {', '.join(sorted(clash)[:10])}"
                    )
            base = self._columns(template, "customer", refs)
            if data.valid_days is not None:
                base["expiry"] = _now() + timedelta(days=data.valid_days)
            accounts = []
            for number in fresh:
                new = _NewAccount(
                    key=number, kind="customer", columns={**base, "number": number, "first_name": number}
                )
                if generate_pin:
                    new.pin = new.generated.pin = numbers.generate_pin(self.settings.pin_length)
                if data.create_sip_devices:
                    new.sip = {"username": number, "password": numbers.generate_password(16)}
                    new.generated.sip_password = new.sip["password"]
                accounts.append(new)
            self._insert(accounts, "customer.mass_create", progress)
        return s.MassCreateResult(
            count=len(accounts),
            accounts=[
                s.MassCreatedAccount(
                    number=a.columns["number"], pin=a.generated.pin, sip_password=a.generated.sip_password
                )
                for a in accounts
            ],
        )

    # ================================================================= import

    def import_csv(
        self, stream: TextIO, options: s.ImportOptions, progress: Progress | None = None
    ) -> Iterator[s.ImportRowResult]:
        """Import a CSV of customers (see engine.admin.csvio for the columns).

        The header, mapping and defaults are checked now (ValidationFailed); the rows are read and
        written lazily, as the returned iterator is consumed.
        """
        plan, rows = csvio.records(stream, options)
        return self.import_records(rows, names=plan.names, dry_run=options.dry_run, progress=progress)

    def import_records(
        self,
        records: Iterable[tuple[int, Mapping[str, Any], str | None]],
        *,
        names: Mapping[str, str] | None = None,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> Iterator[s.ImportRowResult]:
        """Import prepared rows (line, field values, or a conversion error) as customers or providers.

        Each row is all or nothing; rows are written in chunks of [admin] import_chunk_size, each
        chunk in its own transaction (a dry run holds them all in one that is rolled back). Yields
        one result per row, in file order, as chunks complete: memory stays bounded.
        """
        progress = progress or NoProgress()
        names = dict(names or {})
        outer = self.conn.transaction(force_rollback=True) if dry_run else nullcontext()
        with outer:
            for chunk in _batched(records, self.settings.import_chunk_size):
                results = self._import_chunk(chunk, names, dry_run)
                progress.advance(len(chunk))
                yield from results

    def _import_chunk(
        self,
        chunk: list[tuple[int, Mapping[str, Any], str | None]],
        names: Mapping[str, str],
        dry_run: bool,
    ) -> list[s.ImportRowResult]:
        def shown(errs: Iterable[FieldError]) -> str:
            return "; ".join(str(FieldError(names.get(e.field, e.field), e.message)) for e in errs)

        results: dict[int, s.ImportRowResult] = {}
        items: list[tuple[int, s.CustomerCreate, str]] = []
        numbers_by_row: dict[int, str | None] = {}
        for line, values, problem in chunk:
            numbers_by_row[line] = values.get("number") if isinstance(values.get("number"), str) else None
            if problem:
                results[line] = s.ImportRowResult(
                    row=line, account=numbers_by_row[line], status="failed", reason=problem
                )
                continue
            kind = values.get("entity_type") or "customer"
            fields = {k: v for k, v in values.items() if k != "entity_type"}
            if kind not in ACCOUNT_KINDS:
                results[line] = s.ImportRowResult(
                    row=line,
                    account=numbers_by_row[line],
                    status="failed",
                    reason=shown([FieldError("entity_type", f"{kind!r} is not customer or provider")]),
                )
                continue
            try:
                m = s.parse(s.CustomerCreate, fields)
            except ValidationFailed as exc:
                results[line] = s.ImportRowResult(
                    row=line, account=numbers_by_row[line], status="failed", reason=shown(exc.errors)
                )
                continue
            if kind == "provider" and not self.actor.is_admin:
                results[line] = s.ImportRowResult(
                    row=line,
                    account=m.number,
                    status="failed",
                    reason=shown([FieldError("entity_type", "providers need an admin token")]),
                )
                continue
            items.append((line, m, kind))
        ok = "would_import" if dry_run else "imported"
        with self.conn.transaction():
            if any(m.number is None for _, m, _ in items):
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", [numbers.NUMBERS_LOCK_KEY])
            try:
                ready, errors = self._prepare(items, generate_secrets=False)
            except ValidationFailed as exc:  # no number could be generated: every row without one fails
                ready, errors = self._prepare(
                    [i for i in items if i[1].number is not None], generate_secrets=False
                )
                for line, m, _ in items:
                    if m.number is None:
                        errors[line] = exc.errors
            for line, errs in errors.items():
                results[line] = s.ImportRowResult(
                    row=line, account=numbers_by_row.get(line), status="failed", reason=shown(errs)
                )
            try:
                with self.conn.transaction():
                    self._insert(ready, "account.import")
                written = ready
            except psycopg.IntegrityError:  # a concurrent writer: redo the rows one by one
                written = []
                for new in ready:
                    try:
                        with self.conn.transaction():
                            self._insert([new], "account.import")
                        written.append(new)
                    except psycopg.IntegrityError as exc:
                        results[new.key] = s.ImportRowResult(
                            row=new.key,
                            account=new.columns["number"],
                            status="failed",
                            reason=shown(_constraint_error(exc, {"username": "sip_username"}).errors),
                        )
            for new in written:
                results[new.key] = s.ImportRowResult(row=new.key, account=new.columns["number"], status=ok)
        return [results[line] for line in sorted(results)]

    # ================================================================= sub-resources

    def _child_rows(self, query: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, params).fetchall()

    def _account_children(self, number: str, query: str) -> list[dict[str, Any]]:
        """The rows `query` selects for the account `number` (its one parameter is the account's id)."""
        return self._child_rows(query, [self._find(number)["id"]])

    def _child_write(
        self,
        account: Mapping[str, Any],
        action: str,
        entity: str,
        key: str,
        query: Any,
        params: Sequence[Any],
        *,
        before_query: Any = None,
        before_params: Sequence[Any] = (),
        names: Mapping[str, str] | None = None,
    ) -> dict[str, Any] | None:
        """Run one child-table write (RETURNING the row's image) and audit it; None if nothing matched.

        `before_query` (if any) must return the row's image before the write, or no row when there is
        nothing to change."""
        before = None
        if before_query is not None:
            found = self.conn.execute(before_query, before_params).fetchone()
            if found is None:
                return None
            before = found[0]
        try:
            with self.conn.transaction():
                row = self.conn.execute(query, params).fetchone()
        except (pg_errors.UniqueViolation, pg_errors.CheckViolation) as exc:
            raise _constraint_error(exc, names) from None
        after = row[0] if row else None
        if before is None and after is None:
            return None
        self._audit(action, entity, key, account["id"], before, after)
        return after if after is not None else before  # a removal returns what was removed

    def _insert_child(
        self, account: Mapping[str, Any], child: _ChildTable, key: str, values: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Insert the account's `child` row of `values` (audited as keyed `key`); the row's image."""
        image = self._child_write(
            account,
            f"{child.entity}.create",
            child.entity,
            key,
            sql.SQL("INSERT INTO {} (account_id, {}) VALUES (%s, {}) RETURNING {}").format(
                sql.Identifier(child.table),
                sql.SQL(", ").join(map(sql.Identifier, values)),
                sql.SQL(", ").join(sql.Placeholder() * len(values)),
                sql.SQL(_CHILD_IMAGE.format(t=child.table)),
            ),
            [account["id"], *values.values()],
        )
        assert image is not None
        return image

    def _add_child(
        self, number: str, child: _ChildTable, key: str, values: Mapping[str, Any]
    ) -> dict[str, Any]:
        with self.conn.transaction():
            return self._insert_child(self._find(number, lock=True), child, key, values)

    def _update_child(
        self, number: str, child: _ChildTable, key: str, given: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Set `given` on the account's `child` row keyed `key` (audited); the row's image after."""
        with self.conn.transaction():
            account = self._find(number, lock=True)
            where = [account["id"], key]
            if given:
                image = self._child_write(
                    account,
                    f"{child.entity}.update",
                    child.entity,
                    key,
                    sql.SQL("UPDATE {} SET {} WHERE {} RETURNING {}").format(
                        sql.Identifier(child.table),
                        _set_clause(given),
                        child.row_condition(),
                        sql.SQL(_CHILD_IMAGE.format(t=child.table)),
                    ),
                    [*given.values(), *where],
                    before_query=child.locked_image_query(),
                    before_params=where,
                )
            else:
                found = self.conn.execute(child.locked_image_query(), where).fetchone()
                image = None if found is None else found[0]
            if image is None:
                raise NotFound(child.missing(key))
        return image

    def _delete_child(self, number: str, child: _ChildTable, key: str | int) -> None:
        """Delete the account's `child` row keyed `key` (audited); NotFound if there is none."""
        with self.conn.transaction():
            account = self._find(number, lock=True)
            where = [account["id"], key]
            image = self._child_write(
                account,
                f"{child.entity}.delete",
                child.entity,
                str(key),
                sql.SQL("DELETE FROM {} WHERE {} RETURNING NULL").format(
                    sql.Identifier(child.table), child.row_condition()
                ),
                where,
                before_query=child.locked_image_query(),
                before_params=where,
            )
            if image is None:
                raise NotFound(child.missing(key))

    # -- SIP devices

    _SIP_COLUMNS = (
        "active",
        "codecs",
        "caller_id_name",
        "caller_id_number",
        "context",
        "voicemail_enabled",
        "voicemail_password",
    )

    def list_sip_devices(self, number: str) -> list[s.SipDeviceOut]:
        rows = self._account_children(
            number, "SELECT * FROM sip_devices WHERE account_id = %s ORDER BY username"
        )
        return [s.SipDeviceOut(**r) for r in rows]

    def add_sip_device(self, number: str, data: s.SipDeviceCreate) -> s.SipDeviceCreated:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            username = data.username or account["number"]
            if self._taken_usernames([username]):
                raise ValidationFailed.one("username", f"{username} is already taken by another SIP device")
            generated = None
            password = data.password
            if password is None:
                password = generated = numbers.generate_password(16)
            values = {c: getattr(data, c) for c in self._SIP_COLUMNS}
            image = self._insert_child(
                account, _SIP_DEVICES, username, {"username": username, "password": password, **values}
            )
        return s.SipDeviceCreated(device=s.SipDeviceOut(**image), generated_password=generated)

    def update_sip_device(self, number: str, username: str, data: Any) -> s.SipDeviceOut:
        image = self._update_child(number, _SIP_DEVICES, username, _non_null_changes(data))
        return s.SipDeviceOut(**image)

    def delete_sip_device(self, number: str, username: str) -> None:
        self._delete_child(number, _SIP_DEVICES, username)

    # -- IP map

    def list_ip_map(self, number: str) -> list[s.IpMapOut]:
        rows = self._account_children(
            number,
            "SELECT id, cidr::text AS cidr, tech_prefix, name, active FROM ip_map"
            " WHERE account_id = %s ORDER BY id",
        )
        return [s.IpMapOut(**r) for r in rows]

    def add_ip_map(self, number: str, data: s.IpMapCreate) -> s.IpMapOut:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            self._ip_map_free(data.cidr, data.tech_prefix, None)
            image = self._insert_child(
                account,
                _IP_MAP,
                f"{data.cidr} {data.tech_prefix}".strip(),
                {
                    "cidr": data.cidr,
                    "tech_prefix": data.tech_prefix,
                    "name": data.name,
                    "active": data.active,
                },
            )
        return s.IpMapOut(**image)

    def _ip_map_free(self, cidr: str, tech_prefix: str, own_id: int | None) -> None:
        row = self.conn.execute(
            "SELECT id FROM ip_map WHERE cidr = %s::cidr AND tech_prefix = %s AND id IS DISTINCT FROM %s",
            [cidr, tech_prefix, own_id],
        ).fetchone()
        if row is not None:
            raise ValidationFailed.one(
                "cidr", f"{cidr} with tech prefix {tech_prefix!r} is already mapped to an account"
            )

    def update_ip_map(self, number: str, entry_id: int, data: Any) -> s.IpMapOut:
        given = _non_null_changes(data)
        with self.conn.transaction():
            account = self._find(number, lock=True)
            current = self._child_rows(
                "SELECT id, cidr::text AS cidr, tech_prefix, name, active FROM ip_map"
                " WHERE account_id = %s AND id = %s FOR UPDATE",
                [account["id"], entry_id],
            )
            if not current:
                raise NotFound(f"IP map entry {entry_id} not found")
            merged = {**current[0], **given}
            if not given:
                return s.IpMapOut(**current[0])
            self._ip_map_free(merged["cidr"], merged["tech_prefix"], entry_id)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="ip_map"))
            image = self._child_write(
                account,
                "ip_map.update",
                "ip_map",
                str(entry_id),
                sql.SQL("UPDATE ip_map SET {} WHERE id = %s RETURNING {}").format(
                    _set_clause(given), image_sql
                ),
                [*given.values(), entry_id],
                before_query=sql.SQL("SELECT {} FROM ip_map WHERE id = %s").format(image_sql),
                before_params=[entry_id],
            )
        return s.IpMapOut(**{**image, "id": entry_id})

    def delete_ip_map(self, number: str, entry_id: int) -> None:
        self._delete_child(number, _IP_MAP, entry_id)

    # -- caller IDs (the CLI pool's list)

    def list_caller_ids(self, number: str) -> list[s.CallerIdOut]:
        rows = self._account_children(
            number, "SELECT * FROM caller_ids WHERE account_id = %s ORDER BY number"
        )
        return [s.CallerIdOut(**r) for r in rows]

    def add_caller_id(self, number: str, data: s.CallerIdCreate) -> s.CallerIdOut:
        image = self._add_child(
            number,
            _CALLER_IDS,
            data.number,
            {"number": data.number, "description": data.description, "active": data.active},
        )
        return s.CallerIdOut(**image)

    def update_caller_id(self, number: str, caller_id: str, data: Any) -> s.CallerIdOut:
        image = self._update_child(number, _CALLER_IDS, caller_id, _non_null_changes(data))
        return s.CallerIdOut(**image)

    def delete_caller_id(self, number: str, caller_id: str) -> None:
        self._delete_child(number, _CALLER_IDS, caller_id)

    # -- forced caller ID

    def get_forced_caller_id(self, number: str) -> s.ForcedCallerIdOut:
        rows = self._account_children(number, "SELECT * FROM forced_caller_ids WHERE account_id = %s")
        if not rows:
            raise NotFound(f"account {number} has no forced caller ID")
        return s.ForcedCallerIdOut(**rows[0])

    def set_forced_caller_id(self, number: str, data: s.ForcedCallerIdIn) -> s.ForcedCallerIdOut:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="forced_caller_ids"))
            image = self._child_write(
                account,
                "forced_caller_id.set",
                "forced_caller_id",
                number,
                sql.SQL(
                    "INSERT INTO forced_caller_ids AS f (account_id, number, name, active)"
                    " VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (account_id) DO UPDATE SET number = EXCLUDED.number, name = EXCLUDED.name,"
                    " active = EXCLUDED.active RETURNING {}"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="f"))),
                [account["id"], data.number, data.name, data.active],
                before_query=sql.SQL(
                    "SELECT coalesce((SELECT {} FROM forced_caller_ids WHERE account_id = %s), 'null'::jsonb)"
                ).format(image_sql),
                before_params=[account["id"]],
            )
        return s.ForcedCallerIdOut(**image)

    def clear_forced_caller_id(self, number: str) -> None:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image = self._child_write(
                account,
                "forced_caller_id.clear",
                "forced_caller_id",
                number,
                sql.SQL("DELETE FROM forced_caller_ids WHERE account_id = %s RETURNING NULL"),
                [account["id"]],
                before_query=sql.SQL(
                    "SELECT {} FROM forced_caller_ids WHERE account_id = %s FOR UPDATE"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="forced_caller_ids"))),
                before_params=[account["id"]],
            )
            if image is None:
                raise NotFound(f"account {number} has no forced caller ID")

    # -- DIDs

    def list_dids(self, number: str) -> list[s.DidOut]:
        rows = self._account_children(number, "SELECT * FROM dids WHERE account_id = %s ORDER BY number")
        return [s.DidOut(**r) for r in rows]

    def _did_destination_problem(self, account_id: int, dtype: str, destination: str) -> FieldError | None:
        if dtype == "number" and not destination.isdigit() and destination != "":
            return FieldError("destination", "a 'number' destination must be digits")
        if dtype == "device" and destination:
            row = self.conn.execute(
                "SELECT 1 FROM sip_devices WHERE account_id = %s AND username = %s", [account_id, destination]
            ).fetchone()
            if row is None:
                return FieldError("destination", f"{destination!r} is not a SIP device of this account")
        if dtype == "uri" and not destination:
            return FieldError("destination", "a 'uri' destination must not be empty")
        return None

    def assign_did(self, number: str, data: s.DidAssign) -> s.DidOut:
        """Give the account a free DID (admin only: DIDs are the admin's inventory)."""
        self._require_admin("assigning a DID")
        with self.conn.transaction():
            account = self._find(number, lock=True)
            did = self.conn.execute(
                "SELECT id, account_id FROM dids WHERE number = %s FOR UPDATE", [data.number]
            ).fetchone()
            if did is None:
                raise ValidationFailed.one("number", f"no DID {data.number}")
            if did[1] is not None:
                raise ValidationFailed.one("number", f"DID {data.number} is already assigned")
            problem = self._did_destination_problem(account["id"], data.destination_type, data.destination)
            if problem:
                raise ValidationFailed([problem])
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.assign",
                "did",
                data.number,
                sql.SQL(
                    "UPDATE dids SET account_id = %s, destination_type = %s, destination = %s WHERE id = %s"
                    " RETURNING {}"
                ).format(image_sql),
                [account["id"], data.destination_type, data.destination, did[0]],
                before_query=sql.SQL("SELECT {} FROM dids WHERE id = %s").format(image_sql),
                before_params=[did[0]],
            )
        return s.DidOut(**image)

    def update_did(self, number: str, did_number: str, data: s.DidUpdate) -> s.DidOut:
        given = _non_null_changes(data)
        with self.conn.transaction():
            account = self._find(number, lock=True)
            current = self._child_rows(
                "SELECT * FROM dids WHERE account_id = %s AND number = %s FOR UPDATE",
                [account["id"], did_number],
            )
            if not current:
                raise NotFound(f"DID {did_number} not found")
            if not given:
                return s.DidOut(**current[0])
            merged = {**current[0], **given}
            problem = self._did_destination_problem(
                account["id"], merged["destination_type"], merged["destination"]
            )
            if problem:
                raise ValidationFailed([problem])
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.update",
                "did",
                did_number,
                sql.SQL("UPDATE dids SET {} WHERE id = %s RETURNING {}").format(
                    _set_clause(given), image_sql
                ),
                [*given.values(), current[0]["id"]],
                before_query=sql.SQL("SELECT {} FROM dids WHERE id = %s").format(image_sql),
                before_params=[current[0]["id"]],
            )
        return s.DidOut(**image)

    def release_did(self, number: str, did_number: str) -> None:
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="dids"))
            image = self._child_write(
                account,
                "did.release",
                "did",
                did_number,
                sql.SQL(
                    "UPDATE dids SET account_id = NULL, destination_type = 'device', destination = ''"
                    " WHERE account_id = %s AND number = %s RETURNING {}"
                ).format(image_sql),
                [account["id"], did_number],
                before_query=sql.SQL(
                    "SELECT {} FROM dids WHERE account_id = %s AND number = %s FOR UPDATE"
                ).format(image_sql),
                before_params=[account["id"], did_number],
            )
            if image is None:
                raise NotFound(f"DID {did_number} not found")

    # -- speed dials

    def list_speed_dials(self, number: str) -> list[s.SpeedDialOut]:
        rows = self._account_children(
            number, "SELECT key, number FROM speed_dials WHERE account_id = %s ORDER BY key"
        )
        return [s.SpeedDialOut(**r) for r in rows]

    def set_speed_dial(self, number: str, key: str, data: s.SpeedDialIn) -> s.SpeedDialOut:
        key = s.parse(_SpeedDialKey, {"key": key}).key
        with self.conn.transaction():
            account = self._find(number, lock=True)
            image_sql = sql.SQL(_CHILD_IMAGE.format(t="speed_dials"))
            image = self._child_write(
                account,
                "speed_dial.set",
                "speed_dial",
                key,
                sql.SQL(
                    "INSERT INTO speed_dials AS sd (account_id, key, number) VALUES (%s, %s, %s)"
                    " ON CONFLICT (account_id, key) DO UPDATE SET number = EXCLUDED.number RETURNING {}"
                ).format(sql.SQL(_CHILD_IMAGE.format(t="sd"))),
                [account["id"], key, data.number],
                before_query=sql.SQL(
                    "SELECT coalesce((SELECT {} FROM speed_dials WHERE account_id = %s"
                    " AND key = %s), 'null'::jsonb)"
                ).format(image_sql),
                before_params=[account["id"], key],
            )
        return s.SpeedDialOut(key=image["key"], number=image["number"])

    def delete_speed_dial(self, number: str, key: str) -> None:
        self._delete_child(number, _SPEED_DIALS, key)

    # -- blocked codes

    def list_blocked_codes(self, number: str) -> list[s.BlockedCodeOut]:
        rows = self._account_children(
            number, "SELECT prefix, description FROM blocked_codes WHERE account_id = %s ORDER BY prefix"
        )
        return [s.BlockedCodeOut(**r) for r in rows]

    def add_blocked_code(self, number: str, data: s.BlockedCodeCreate) -> s.BlockedCodeOut:
        image = self._add_child(
            number, _BLOCKED_CODES, data.prefix, {"prefix": data.prefix, "description": data.description}
        )
        return s.BlockedCodeOut(prefix=image["prefix"], description=image["description"])

    def delete_blocked_code(self, number: str, prefix: str) -> None:
        self._delete_child(number, _BLOCKED_CODES, prefix)

    # -- alert threshold

    def get_alert_threshold(self, number: str) -> s.AlertThresholdOut:
        row = self._find(number)
        return s.AlertThresholdOut(
            notify_enabled=row["notify_enabled"],
            notify_balance_below=row["notify_balance_below"],
            notify_email=row["notify_email"],
        )

    def set_alert_threshold(self, number: str, data: s.AlertThreshold) -> s.AlertThresholdOut:
        given = data.model_dump(exclude_unset=True)
        if given.get("notify_enabled", True) is None:
            raise ValidationFailed.one("notify_enabled", "must not be null")
        with self.conn.transaction():
            row = self._find(number, lock=True)
            merged = {k: row[k] for k in ("notify_enabled", "notify_balance_below", "notify_email")} | given
            problem = _notify_problem(merged["notify_enabled"], merged["notify_balance_below"])
            if problem:
                raise ValidationFailed.one("notify_balance_below", problem)
            changed = {k: v for k, v in merged.items() if row[k] != v}
            if changed:
                before = self._account_image(row["id"])
                self._execute_write(
                    sql.SQL("UPDATE accounts SET {} WHERE id = %s").format(_set_clause(changed)),
                    [*changed.values(), row["id"]],
                )
                self._audit(
                    "alert_threshold.update",
                    "account",
                    number,
                    row["id"],
                    before,
                    self._account_image(row["id"]),
                )
        return s.AlertThresholdOut(**merged)

    # -- provider trunks

    def list_trunks(self, number: str) -> list[s.TrunkOut]:
        rows = self._account_children(
            number,
            "SELECT t.name, g.name AS gateway, t.active, t.precedence, t.max_channels, t.cps FROM trunks t"
            " JOIN gateways g ON g.id = t.gateway_id WHERE t.provider_id = %s ORDER BY t.name",
        )
        return [s.TrunkOut(**r) for r in rows]

    # ================================================================= balance: refills and charges

    def _move_balance(
        self, number: str, kind: str, amount: Decimal, description: str, reference: str, method: str
    ) -> s.LedgerEntryOut:
        if amount <= 0:
            raise ValidationFailed.one("amount", "must be greater than 0")
        signed = amount if kind == "refill" else -amount
        with self.conn.transaction():
            row = self._find(number, lock=True)
            before = self._account_image(row["id"])
            try:
                balance = self.conn.execute(
                    "UPDATE accounts SET balance = balance + %s WHERE id = %s RETURNING balance",
                    [signed, row["id"]],
                ).fetchone()[0]
            except pg_errors.NumericValueOutOfRange:
                raise ValidationFailed.one("amount", "would take the balance out of range") from None
            with self.conn.cursor(row_factory=dict_row) as cur:
                entry = cur.execute(
                    "INSERT INTO balance_changes (account_id, kind, amount, balance_after, currency,"
                    " description, reference, method, actor)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING *",
                    [
                        row["id"],
                        kind,
                        signed,
                        balance,
                        row["currency"],
                        description,
                        reference,
                        method,
                        self.actor.name,
                    ],
                ).fetchone()
            after = self._account_image(row["id"])
            self._audit(
                f"balance.{kind}",
                "account",
                number,
                row["id"],
                {"balance": before["balance"]},
                {"balance": after["balance"], "ledger_id": entry["id"]},
            )
        return s.LedgerEntryOut(**entry, account=number)

    def refill(self, number: str, data: s.RefillIn) -> s.LedgerEntryOut:
        """Top-up: the customer holds `amount` more (a postpaid account's debt shrinks)."""
        return self._move_balance(
            number, "refill", data.amount, data.description, data.reference, data.method
        )

    def charge(self, number: str, data: s.ChargeIn) -> s.LedgerEntryOut:
        """Post a charge: the customer holds `amount` less."""
        return self._move_balance(number, "charge", data.amount, data.description, data.reference, "")

    def _ledger(
        self, where: list[sql.Composable], params: list[Any], page: int, per_page: int
    ) -> s.LedgerPage:
        if per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        cond = sql.SQL(" AND ").join([self._scope(), *where])
        base = sql.SQL("FROM balance_changes b JOIN accounts a ON a.id = b.account_id WHERE {}").format(cond)
        with self.conn.cursor(row_factory=dict_row) as cur:
            totals = cur.execute(
                sql.SQL(
                    "SELECT b.currency, count(*) AS count, sum(b.amount) AS amount {} GROUP BY b.currency"
                    " ORDER BY b.currency"
                ).format(base),
                params,
            ).fetchall()
            rows = cur.execute(
                sql.SQL("SELECT b.*, a.number AS account {} ORDER BY b.id DESC LIMIT %s OFFSET %s").format(
                    base
                ),
                [*params, per_page, (page - 1) * per_page],
            ).fetchall()
        return s.LedgerPage(
            items=[s.LedgerEntryOut(**r) for r in rows],
            page=page,
            per_page=per_page,
            total=sum(t["count"] for t in totals),
            totals=[s.CurrencyTotal(**t) for t in totals],
        )

    def ledger(self, number: str, q: s.LedgerQuery) -> s.LedgerPage:
        """The account's charge history: every balance change made here, newest first."""
        account = self._find(number)
        where: list[sql.Composable] = [sql.SQL("b.account_id = %s")]
        params: list[Any] = [account["id"]]
        for value, clause in ((q.since, "b.at >= %s"), (q.until, "b.at <= %s"), (q.kind, "b.kind = %s")):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        return self._ledger(where, params, q.page, q.per_page)

    def refill_report(self, q: s.RefillQuery) -> s.LedgerPage:
        """Refills across the actor's accounts, filtered by account, reseller subtree and period."""
        where: list[sql.Composable] = [sql.SQL("b.kind = 'refill'")]
        params: list[Any] = []
        if q.account is not None:
            where.append(sql.SQL("a.number = %s AND NOT a.deleted"))
            params.append(q.account)
        if q.reseller is not None:
            reseller_id = self._reseller_id(q.reseller, _RefCache())
            if reseller_id is None:
                raise NotFound(f"reseller {q.reseller} not found")
            where.append(
                sql.SQL(
                    "a.id IN (WITH RECURSIVE subtree(id) AS (SELECT id FROM accounts WHERE reseller_id = %s"
                    " UNION SELECT c.id FROM accounts c JOIN subtree t ON c.reseller_id = t.id)"
                    " SELECT id FROM subtree)"
                )
            )
            params.append(reseller_id)
        for value, clause in ((q.since, "b.at >= %s"), (q.until, "b.at <= %s")):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        return self._ledger(where, params, q.page, q.per_page)

    # ================================================================= audit log

    def audit_log(self, q: s.AuditQuery) -> s.AuditPage:
        """Audit entries about the actor's accounts (the admin sees every entry), newest first."""
        if q.per_page > self.settings.max_page_size:
            raise ValidationFailed.one("per_page", f"at most {self.settings.max_page_size}")
        where: list[sql.Composable] = [
            sql.SQL("TRUE")
            if self.actor.is_admin
            else sql.SQL("l.account_id IS NOT NULL AND {}").format(self._scope())
        ]
        params: list[Any] = []
        for value, clause in (
            (q.account, "a.number = %s"),
            (q.action, "l.action = %s"),
            (q.entity, "l.entity = %s"),
            (q.since, "l.at >= %s"),
            (q.until, "l.at <= %s"),
        ):
            if value is not None:
                where.append(sql.SQL(clause))
                params.append(value)
        base = sql.SQL("FROM audit_log l LEFT JOIN accounts a ON a.id = l.account_id WHERE {}").format(
            sql.SQL(" AND ").join(where)
        )
        total = self.conn.execute(sql.SQL("SELECT count(*) {}").format(base), params).fetchone()[0]
        with self.conn.cursor(row_factory=dict_row) as cur:
            rows = cur.execute(
                sql.SQL("SELECT l.*, a.number AS account {} ORDER BY l.id DESC LIMIT %s OFFSET %s").format(
                    base
                ),
                [*params, q.per_page, (q.page - 1) * q.per_page],
            ).fetchall()
        return s.AuditPage(
            items=[s.AuditEntryOut(**r) for r in rows], page=q.page, per_page=q.per_page, total=total
        )

    # ================================================================= API tokens

    def create_token(
        self, name: str, reseller: str | None = None, expires_days: int | None = None, read_only: bool = False
    ) -> tuple[dict[str, Any], str]:
        """A new API token (admin scope, or one reseller's subtree; read-only: every write refused);
        the token is returned once."""
        self._require_admin("creating an API token")
        name = s.parse(_TokenName, {"name": name}).name
        if expires_days is not None and expires_days <= 0:
            raise ValidationFailed.one("expires_days", "must be at least 1")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.conn.transaction():
            reseller_id = None
            if reseller is not None:
                reseller_id = self._reseller_id(reseller, _RefCache())
                if reseller_id is None:
                    raise ValidationFailed.one("reseller", f"no reseller with number {reseller}")
            with self.conn.cursor(row_factory=dict_row) as cur:
                row = cur.execute(
                    "INSERT INTO api_tokens (name, token_sha256, token_hint, scope, reseller_id, created_by,"
                    " expires_at, read_only)"
                    " VALUES (%s, %s, %s, %s, %s, %s, now() + %s * interval '1 day', %s)"
                    " RETURNING id, name, token_hint, scope, reseller_id, created_at, created_by, expires_at,"
                    " read_only",
                    [
                        name,
                        _token_digest(token),
                        token[:10],
                        "reseller" if reseller_id else "admin",
                        reseller_id,
                        self.actor.name,
                        expires_days,
                        read_only,
                    ],
                ).fetchone()
            row["reseller"] = reseller
            self._audit(
                "token.create",
                "token",
                str(row["id"]),
                reseller_id,
                None,
                {k: v for k, v in row.items() if k != "reseller_id"},
            )
        return row, token

    def list_tokens(self) -> list[dict[str, Any]]:
        self._require_admin("listing API tokens")
        with self.conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                "SELECT t.id, t.name, t.token_hint, t.scope, t.read_only, r.number AS reseller, t.created_at,"
                " t.created_by, t.expires_at, t.last_used_at, t.revoked_at FROM api_tokens t"
                " LEFT JOIN accounts r ON r.id = t.reseller_id ORDER BY t.id"
            ).fetchall()

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        self._require_admin("revoking an API token")
        with self.conn.transaction(), self.conn.cursor(row_factory=dict_row) as cur:
            row = cur.execute(
                "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = %s"
                " RETURNING id, name, scope, reseller_id, revoked_at",
                [token_id],
            ).fetchone()
            if row is None:
                raise NotFound(f"token {token_id} not found")
            self._audit(
                "token.revoke",
                "token",
                str(token_id),
                row["reseller_id"],
                None,
                {k: v for k, v in row.items() if k != "reseller_id"},
            )
        return row


TOKEN_PREFIX = "cgt_"


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def authenticate(conn: psycopg.Connection[Any], token: str | None) -> Actor:
    """The Actor a bearer token stands for; Unauthorized if missing, unknown, revoked or expired."""
    if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise Unauthorized("a valid API token is required (Authorization: Bearer <token>)")
    row = conn.execute(
        "SELECT t.id, t.name, t.reseller_id, r.number, t.last_used_at < now() - interval '1 minute'"
        " OR t.last_used_at IS NULL FROM api_tokens t LEFT JOIN accounts r ON r.id = t.reseller_id"
        " WHERE t.token_sha256 = %s AND t.revoked_at IS NULL"
        " AND (t.expires_at IS NULL OR t.expires_at > now())"
        " AND (t.reseller_id IS NULL OR (NOT r.deleted AND r.status = 'active'))",
        [_token_digest(token)],
    ).fetchone()
    if row is None:
        raise Unauthorized("a valid API token is required (Authorization: Bearer <token>)")
    token_id, name, reseller_id, reseller_number, stale = row
    if stale:
        conn.execute("UPDATE api_tokens SET last_used_at = now() WHERE id = %s", [token_id])
    return Actor(
        name=f"token:{token_id}:{name}",
        reseller_id=reseller_id,
        reseller_number=reseller_number,
        token_id=token_id,
    )


# --------------------------------------------------------------------------- small rules and helpers


class _TokenName(s._In):
    name: s.Name


class _SpeedDialKey(s._In):
    key: s.SpeedDialKey


# a rule's field -> the other fields whose change makes the rule apply again on an edit
_RULE_INPUTS = {
    "invoice_day": {"billing_schedule"},
    "notify_balance_below": {"notify_enabled"},
    "valid_days": {"expiry_from_first_use"},
    "non_cli_rate_group": {"cli_pool"},
}


def _non_null_changes(data: Any) -> dict[str, Any]:
    """The fields an update request sets; none of them may be set to null."""
    given = data.model_dump(exclude_unset=True)
    nulls = [k for k, v in given.items() if v is None]
    if nulls:
        raise ValidationFailed([FieldError(k, "must not be null") for k in nulls])
    return given


def _set_clause(values: Mapping[str, Any]) -> sql.Composable:
    """`col = %s, ...` for the columns of `values`, in their order."""
    return sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)


def _touched(field_name: str, given: Mapping[str, Any]) -> bool:
    """Whether an edit that changes `given` is answerable for a problem with `field_name`."""
    return field_name in given or bool(_RULE_INPUTS.get(field_name, set()) & set(given))


def _invoice_day(schedule: str, day: int | None) -> int | None:
    if schedule == "daily":
        return None
    return 1 if day is None else day


def _invoice_day_problem(schedule: str, day: int | None) -> str | None:
    if day is None:
        return None
    if schedule == "daily":
        return "a daily billing schedule has no invoice day"
    if schedule == "weekly" and not 1 <= day <= 7:
        return "must be 1-7 for a weekly billing schedule"
    if schedule == "monthly" and not 1 <= day <= 28:
        return "must be 1-28 for a monthly billing schedule"
    return None


def _notify_problem(enabled: bool | None, below: Decimal | None) -> str | None:
    if enabled and below is None:
        return "required when notify_enabled is true"
    return None


def _constraint_error(exc: psycopg.Error, names: Mapping[str, str] | None = None) -> ValidationFailed:
    diag = exc.diag
    hint = CONSTRAINT_MESSAGES.get(diag.constraint_name or "")
    if hint is not None:
        field_name = (names or {}).get(hint[0], hint[0])
        return ValidationFailed.one(field_name, hint[1])
    return ValidationFailed.one("", f"rejected by the database: {diag.message_primary}")


# accounts column -> PostgreSQL type, for the bulk insert through unnest()
_ACCOUNT_TYPES = {
    "number": "text",
    "kind": "text",
    "reseller_id": "bigint",
    "status": "text",
    "postpaid": "boolean",
    "balance": "numeric",
    "credit_limit": "numeric",
    "currency": "text",
    "rate_group_id": "bigint",
    "non_cli_rate_group_id": "bigint",
    "cli_pool": "smallint",
    "localization_id": "bigint",
    "local_calls_allowed": "boolean",
    "local_call_cost_per_minute": "numeric",
    "codecs": "text",
    "max_channels": "integer",
    "cps": "integer",
    "pin_hash": "text",
    "password_hash": "text",
    "email": "text",
    "first_name": "text",
    "last_name": "text",
    "company": "text",
    "phone": "text",
    "mobile": "text",
    "address_1": "text",
    "address_2": "text",
    "city": "text",
    "province": "text",
    "postal_code": "text",
    "country": "text",
    "timezone": "text",
    "language": "text",
    "notifications": "boolean",
    "is_recording": "boolean",
    "allow_ip_management": "boolean",
    "paypal_permission": "boolean",
    "billing_schedule": "text",
    "invoice_day": "smallint",
    "tax_number": "text",
    "reference": "text",
    "invoice_note": "text",
    "generate_invoice": "boolean",
    "notify_enabled": "boolean",
    "notify_balance_below": "numeric",
    "notify_email": "text",
    "valid_days": "integer",
    "expiry": "timestamptz",
    "expiry_from_first_use": "boolean",
}
