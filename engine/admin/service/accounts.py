"""Accounts: the customer form's rules, create, read, edit and delete."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from psycopg import errors as pg_errors
from psycopg import sql
from pydantic import ValidationError

from engine.admin import numbers
from engine.admin import schemas as s
from engine.admin.errors import FieldError, NotFound, ValidationFailed
from engine.admin.service.base import (
    _CHILD_IMAGE,
    ACCOUNT_KINDS,
    NoProgress,
    Progress,
    _batched,
    _constraint_error,
    _now,
    _RefCache,
    _set_clause,
)
from engine.admin.service.form import (
    DIRECT_COLUMNS,
    FormMixin,
    _touched,
)


# CustomerCreate fields stored in the accounts column of the same name.
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


class AccountsMixin(FormMixin):
    """Customers and providers: one at a time."""

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
            lambda n: n.sip["username"] if n.sip else None,
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
        devices = [(i, a, a.sip) for i, a in zip(ids, accounts, strict=True) if a.sip]
        if devices:
            self.conn.execute(
                "INSERT INTO sip_devices (account_id, username, password, caller_id_number)"
                " SELECT * FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[])",
                [
                    [i for i, _, _ in devices],
                    [sip["username"] for _, _, sip in devices],
                    [sip["password"] for _, _, sip in devices],
                    [a.columns["number"] for _, a, _ in devices],
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
                [self.actor.name, self.actor.token_id, [i for i, _, _ in devices]],
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
        released: list[str] = children["dids"]
        return released


# a rule's field -> the other fields whose change makes the rule apply again on an edit
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
