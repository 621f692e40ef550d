"""The customer form: its rules across fields, and names resolved to ids within the actor's scope."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.admin import schemas as s
from engine.admin.errors import FieldError
from engine.admin.service.base import (
    ServiceBase,
    _notify_problem,
    _now,
    _RefCache,
)

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


class FormMixin(ServiceBase):
    """Rules of the customer form shared by create, edit, import and mass create."""

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


_RULE_INPUTS = {
    "invoice_day": {"billing_schedule"},
    "notify_balance_below": {"notify_enabled"},
    "valid_days": {"expiry_from_first_use"},
    "non_cli_rate_group": {"cli_pool"},
}


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
