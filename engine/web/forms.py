"""HTML forms drawn from the service's pydantic models, and form posts read back into them.

Every field of a model becomes one labelled control: a yes/no select for booleans (with
"default" when the model lets the server choose), a select for a fixed list of values, a number
box for integers, a password box for secrets, a text box otherwise. A post is read back into the
dict the model validates; the service then decides (no rule is repeated here), and its errors are
drawn next to the field they name.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel

from engine.admin import schemas as s
from engine.admin.errors import FieldError

SECRET_FIELDS = frozenset({"password", "pin", "sip_password", "voicemail_password"})

# Labels where the field's name would not say it plainly.
LABELS = {
    "cps": "Calls per second (0 = unlimited)",
    "max_channels": "Concurrent calls (0 = unlimited)",
    "pin": "PIN",
    "generate_pin": "Generate a PIN",
    "sip_username": "SIP username",
    "sip_password": "SIP password",
    "create_sip_device": "Create a SIP device",
    "create_sip_devices": "Create a SIP device for each",
    "valid_days": "Valid for (days)",
    "expiry": "Expiry (YYYY-MM-DD or ISO date-time)",
    "cli_pool": "Caller-ID rule (0-8)",
    "notify_enabled": "Low-balance e-mail alert",
    "notify_balance_below": "Alert when available credit is at or below",
    "notify_email": "Alert e-mail",
    "paypal_permission": "PayPal allowed",
    "is_recording": "Record calls",
    "allow_ip_management": "May manage its IP addresses",
    "local_call_cost_per_minute": "Local call cost per minute",
    "non_cli_rate_group": "Rate group without caller ID",
    "email": "E-mail",
    "cidr": "Network or address (CIDR)",
    "tech_prefix": "Tech prefix",
    "caller_id_name": "Caller ID name",
    "caller_id_number": "Caller ID number",
    "voicemail_enabled": "Voicemail",
    "voicemail_password": "Voicemail password",
    "reseller": "Reseller (account number; empty = admin)",
    "sip_code": "SIP code",
    "billsec": "Billed (s)",
    "started_at": "Started (UTC)",
}

# The customer form's sections, as ASTPP groups them.
CUSTOMER_SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "Panel access",
        ("reseller", "number", "password", "pin", "generate_pin", "email", "create_sip_device",
         "sip_username", "sip_password", "status", "valid_days", "expiry", "expiry_from_first_use"),
    ),
    (
        "Account settings",
        ("max_channels", "cps", "localization", "local_calls_allowed", "local_call_cost_per_minute", "codecs",
         "notifications", "paypal_permission", "is_recording", "allow_ip_management", "notify_enabled",
         "notify_balance_below", "notify_email"),
    ),
    (
        "Profile",
        ("first_name", "last_name", "company", "phone", "mobile", "address_1", "address_2", "city",
         "province", "postal_code", "country", "timezone", "language", "currency"),
    ),
    (
        "Billing",
        ("account_type", "balance", "credit_limit", "rate_group", "non_cli_rate_group", "cli_pool",
         "billing_schedule", "invoice_day", "tax_number", "generate_invoice", "invoice_note", "reference"),
    ),
)  # fmt: skip


@dataclass
class Control:
    name: str
    label: str
    kind: str  # text, number, password, select
    required: bool = False
    options: list[tuple[str, str]] = field(default_factory=list)  # (value, shown)
    value: str = ""
    error: str = ""
    help: str = ""


def label(name: str) -> str:
    return LABELS.get(name) or name.replace("_", " ").capitalize()


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def shown(value: Any) -> str:
    """A value as a form shows it (and as a post of the unchanged form sends it back)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        return s._format_money(value)
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def controls(
    model: type[BaseModel],
    values: Mapping[str, Any] | None = None,
    errors: Iterable[FieldError] = (),
    only: Sequence[str] | None = None,
    *,
    editing: bool = False,
) -> list[Control]:
    """One control per field of `model` (or of `only`, in that order) with values and errors.

    `editing`: an edit form of an existing row, whose update model makes every field optional
    only so that a field can be left out: a select then offers no empty choice for a field that
    has a value (choosing it would only be refused as null)."""
    values = values or {}
    by_field: dict[str, str] = {}
    for error in errors:
        name = error.field.split(".")[0]
        by_field[name] = f"{by_field[name]}; {error.message}" if name in by_field else error.message
    out = []
    for name in only or list(model.model_fields):
        info = model.model_fields.get(name)
        if info is None:
            continue
        inner, nullable = _unwrap(info.annotation)
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        value = values.get(name, default)
        if editing and value not in (None, ""):
            nullable = False
        kind, options = "text", []
        if inner is bool:
            kind = "select"
            options = [("", "default")] if nullable else []
            options += [("yes", "yes"), ("no", "no")]
        elif typing.get_origin(inner) is Literal:
            kind = "select"
            options = ([("", "—")] if nullable else []) + [(str(v), str(v)) for v in typing.get_args(inner)]
        elif inner is int:
            kind = "number"
        if name in SECRET_FIELDS:
            kind = "password"
        out.append(
            Control(
                name=name,
                label=label(name),
                kind=kind,
                required=info.is_required(),
                options=options,
                value="" if kind == "password" else shown(value),
                error=by_field.get(name, ""),
                help=info.description or "",
            )
        )
    return out


def sections(
    model: type[BaseModel],
    values: Mapping[str, Any],
    errors: Iterable[FieldError],
    layout: Sequence[tuple[str, Sequence[str]]] = CUSTOMER_SECTIONS,
    *,
    editing: bool = False,
) -> list[tuple[str, list[Control]]]:
    """The customer form's controls in ASTPP's sections; fields no section names come last."""
    errors = list(errors)
    placed = {name for _, names in layout for name in names}
    rest = [name for name in model.model_fields if name not in placed]
    groups = [(title, controls(model, values, errors, names, editing=editing)) for title, names in layout]
    if rest:
        groups.append(("Other", controls(model, values, errors, rest, editing=editing)))
    return [(title, group) for title, group in groups if group]


def unplaced_errors(model: type[BaseModel], errors: Iterable[FieldError]) -> list[str]:
    """Errors that name no field of the form (shown above it)."""
    return [str(e) for e in errors if e.field.split(".")[0] not in model.model_fields]


def _value(raw: str, kind_of: Any) -> Any:
    inner, _ = _unwrap(kind_of)
    if inner is bool:
        return raw == "yes"
    return raw


def read_create(model: type[BaseModel], form: Mapping[str, str]) -> dict[str, Any]:
    """The fields a create form sets: an empty box leaves the model's default."""
    data: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        raw = form.get(name)
        if raw is None:
            continue
        if name not in SECRET_FIELDS:
            raw = raw.strip()
        if raw == "":
            continue
        data[name] = _value(raw, info.annotation)
    return data


def read_changes(
    model: type[BaseModel], form: Mapping[str, str], current: Mapping[str, Any]
) -> dict[str, Any]:
    """The fields an edit form changes against `current`: only those are sent (an emptied box
    sends null, which clears an optional field or is refused with the field's message)."""
    data: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        raw = form.get(name)
        if raw is None:
            continue
        if name in SECRET_FIELDS:
            if raw:
                data[name] = raw  # a secret is changed by typing a new one; empty = unchanged
            continue
        raw = raw.strip()
        if raw == shown(current.get(name)):
            continue
        data[name] = None if raw == "" else _value(raw, info.annotation)
    return data
