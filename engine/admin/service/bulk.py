"""Many accounts at once: ASTPP's mass create and the CSV import."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, TextIO

import psycopg

from engine.admin import csvio, numbers
from engine.admin import schemas as s
from engine.admin.errors import FieldError, ValidationFailed
from engine.admin.service.accounts import AccountsMixin, _NewAccount
from engine.admin.service.base import (
    ACCOUNT_KINDS,
    NoProgress,
    Progress,
    _batched,
    _constraint_error,
    _now,
    _RefCache,
)


class BulkMixin(AccountsMixin):
    """Mass create and import."""

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
            except (psycopg.IntegrityError, psycopg.DataError):  # a concurrent writer, a value the
                # database refuses: redo the rows one by one, so only the guilty rows fail
                written = []
                for new in ready:
                    try:
                        with self.conn.transaction():
                            self._insert([new], "account.import")
                        written.append(new)
                    except (psycopg.IntegrityError, psycopg.DataError) as exc:
                        results[new.key] = s.ImportRowResult(
                            row=new.key,
                            account=new.columns["number"],
                            status="failed",
                            reason=shown(_constraint_error(exc, {"username": "sip_username"}).errors),
                        )
            for new in written:
                results[new.key] = s.ImportRowResult(row=new.key, account=new.columns["number"], status=ok)
        return [results[line] for line in sorted(results)]
