"""CSV for customers: the import's column mapping and row conversion, and the export's writer.

Import: the header row names the columns. ASTPP's sample header, this module's
export header and the field names themselves map without help; any other
column needs an explicit mapping (or a mapping to nothing, to ignore it). An
unknown column is an error before any row is read, so a typo never drops data.

Balances: callgate stores what the customer holds (negative = debt). ASTPP
stores a postpaid account's debt as a positive balance. The export writes the
convention into the Balance header ("Balance (held)" or "Balance (astpp)"); the
import reads it from there or from the balance_convention option, and refuses
a postpaid row with a non-zero balance when neither says which it is.
Prepaid balances are the same in both conventions.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, TextIO

from pydantic import TypeAdapter, ValidationError

from engine.admin import schemas as s
from engine.admin.errors import FieldError, ValidationFailed

ASTPP_SAMPLE_HEADER = (
    "Account", "Password", "First Name", "Last Name", "Company", "Phone", "Mobile", "Email", "Address",
    "City", "Province/State", "Zip/Postal Code", "Balance", "Credit Limit", "SIP Username", "SIP Password",
    "Concurrent Calls", "CPS",
)  # fmt: skip

# header (case-insensitive) -> field; None = a read-only column of the export, ignored
KNOWN_HEADERS: dict[str, str | None] = {
    "account": "number", "password": "password", "first name": "first_name", "last name": "last_name",
    "company": "company", "phone": "phone", "mobile": "mobile", "email": "email", "address": "address_1",
    "city": "city", "province/state": "province", "zip/postal code": "postal_code", "balance": "balance",
    "credit limit": "credit_limit", "sip username": "sip_username", "sip password": "sip_password",
    "concurrent calls": "max_channels", "cps": "cps",
    # the export's other columns
    "entity type": "entity_type", "account type": "account_type", "rate group": "rate_group",
    "currency": "currency", "expiry": "expiry", "localization": "localization", "reseller": "reseller",
    "status": "status", "billing schedule": "billing_schedule", "first used": None, "created": None,
}  # fmt: skip
BALANCE_HEADERS = {"balance (held)": "held", "balance (astpp)": "astpp"}

IMPORT_FIELDS = frozenset(s.CustomerCreate.model_fields) | {"entity_type"}
# Unique per account or secret: a value shared by every row makes no sense.
NO_DEFAULT = frozenset({"number", "email", "sip_username", "password", "pin", "sip_password"})
# Lower-cased before validation (spreadsheets capitalise them).
_LOWERCASE = frozenset({"account_type", "status", "billing_schedule", "entity_type"})


def _adapter(name: str) -> TypeAdapter[Any]:
    if name == "entity_type":
        return TypeAdapter(s.EntityType)
    info = s.CustomerCreate.model_fields[name]
    return TypeAdapter(Annotated[info.annotation, info])


@dataclass
class ImportPlan:
    """How the file's columns become fields (built from the header and the options)."""

    columns: list[str | None]  # per column: the field, or None (ignored)
    names: dict[str, str]  # field -> how messages name it (the CSV header, or "default <field>")
    defaults: dict[str, Any] = field(default_factory=dict)
    convention: str | None = None
    header_width: int = 0

    def record(self, cells: list[str]) -> tuple[dict[str, Any], str | None]:
        """The field values of one row, or a problem that fails the row before validation."""
        if len(cells) > self.header_width:
            return {}, f"the row has {len(cells)} cells, the header {self.header_width}"
        values: dict[str, Any] = {}
        for column, cell in zip(self.columns, cells, strict=False):
            if column is not None and cell.strip():
                text = cell.strip()
                values[column] = text.lower() if column in _LOWERCASE else text
        for name, value in self.defaults.items():
            values.setdefault(name, value)
        balance = values.get("balance")
        if values.get("account_type") == "postpaid" and balance not in (None, ""):
            try:
                amount = Decimal(str(balance))
            except InvalidOperation:
                return values, None  # the schema reports it with the field's name
            if amount != 0 and self.convention is None:
                return values, (
                    f"{self.names.get('balance', 'balance')}: a postpaid balance needs the file's "
                    "convention: balance_convention held (what the customer holds, negative = debt) "
                    "or astpp (the amount owed)"
                )
            if self.convention == "astpp":
                values["balance"] = str(-amount)
        return values, None


def build_plan(header: list[str], options: s.ImportOptions) -> ImportPlan:
    """Check the header, mapping and defaults together; ValidationFailed lists every problem."""
    problems: list[FieldError] = []
    cleaned = [h.strip() for h in header]
    if not any(cleaned):
        raise ValidationFailed.one("file", "the first line must be a header naming the columns")
    seen: dict[str, int] = {}
    for h in cleaned:
        seen[h.lower()] = seen.get(h.lower(), 0) + 1
    for h, n in seen.items():
        if n > 1:
            problems.append(FieldError("header", f"column {h!r} appears {n} times"))
    mapping = {k.strip().lower(): v for k, v in options.mapping.items()}
    for key in mapping:
        if key not in seen:
            problems.append(FieldError(f"mapping.{key}", "no such column in the file"))
    convention = options.balance_convention
    columns: list[str | None] = []
    names: dict[str, str] = {}
    for h in cleaned:
        key = h.lower()
        target: str | None
        if key in mapping:
            target = mapping[key] or None
            if target is not None and target not in IMPORT_FIELDS:
                problems.append(FieldError(f"mapping.{h}", f"{target!r} is not a customer field"))
                target = None
        elif key in BALANCE_HEADERS:
            target = "balance"
            said = BALANCE_HEADERS[key]
            if convention is not None and convention != said:
                problems.append(
                    FieldError("balance_convention", f"is {convention} but the column {h!r} says {said}")
                )
            convention = said
        elif key in KNOWN_HEADERS:
            target = KNOWN_HEADERS[key]
        elif key in IMPORT_FIELDS:
            target = key
        elif not key:
            target = None
        else:
            problems.append(
                FieldError(
                    "header", f"column {h!r} is not a customer field: map it to one, or to null to ignore it"
                )
            )
            target = None
        if target is not None:
            if target in names:
                problems.append(
                    FieldError("header", f"columns {names[target]!r} and {h!r} both give {target}")
                )
            names[target] = h
        columns.append(target)
    defaults: dict[str, Any] = {}
    for name, value in options.defaults.items():
        if name not in IMPORT_FIELDS:
            problems.append(FieldError(f"defaults.{name}", "is not a customer field"))
            continue
        if name in NO_DEFAULT:
            problems.append(FieldError(f"defaults.{name}", "is unique per account or secret: no default"))
            continue
        if isinstance(value, str) and name in _LOWERCASE:
            value = value.lower()
        try:
            _adapter(name).validate_python(value)
        except ValidationError as exc:
            problems += [FieldError(f"defaults.{name}", e.message) for e in s.field_errors(exc)]
            continue
        defaults[name] = value
        names.setdefault(name, f"default {name}")
    if problems:
        raise ValidationFailed(problems)
    return ImportPlan(columns=columns, names=names, defaults=defaults, convention=convention,
                      header_width=len(header))  # fmt: skip


def read_rows(stream: TextIO) -> Iterator[tuple[int, list[str]]]:
    """(row number, cells) for every record; the header is row 1. Streams: nothing is kept."""
    yield from enumerate(csv.reader(stream), start=1)


Record = tuple[int, dict[str, Any], str | None]  # (row number, field values, problem)


def records(stream: TextIO, options: s.ImportOptions) -> tuple[ImportPlan, Iterator[Record]]:
    """The plan (checked now, from the header) and a lazy iterator of (row, values, problem)."""
    rows = read_rows(stream)
    try:
        _, header = next(rows)
    except StopIteration:
        raise ValidationFailed.one("file", "is empty: the first line must be a header") from None
    except csv.Error as exc:
        raise ValidationFailed.one("file", f"is not valid CSV: {exc}") from None
    except UnicodeDecodeError:
        raise ValidationFailed.one("file", "is not UTF-8 text") from None
    plan = build_plan(header, options)

    def generate() -> Iterator[Record]:
        number = 1
        try:
            for number, cells in rows:
                if not any(c.strip() for c in cells):
                    continue  # a blank line is not a record
                values, problem = plan.record(cells)
                yield number, values, problem
        except csv.Error as exc:
            yield number + 1, {}, f"not valid CSV from here on: {exc}"
        except UnicodeDecodeError:
            yield number + 1, {}, "not UTF-8 text from here on"

    return plan, generate()


def count_records(path: str) -> int:
    """Roughly the data rows of a file (its lines less the header), for a progress bar."""
    with open(path, "rb") as handle:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return max(lines - 1, 0)


# --------------------------------------------------------------------------- export

EXPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("Entity Type", "entity_type"), ("Account Type", "account_type"), ("Account", "number"),
    ("First Name", "first_name"), ("Last Name", "last_name"), ("Company", "company"), ("Email", "email"),
    ("Rate Group", "rate_group"), ("Balance", "balance"), ("Credit Limit", "credit_limit"),
    ("Currency", "currency"), ("First Used", "first_used"), ("Expiry", "expiry"),
    ("Concurrent Calls", "concurrent_calls"), ("Localization", "localization"), ("Reseller", "reseller"),
    ("Created", "created"), ("Status", "status"), ("Billing Schedule", "billing_schedule"),
)  # fmt: skip
_FREE_TEXT = frozenset({"first_name", "last_name", "company", "email", "rate_group", "localization"})


def export_header(convention: str) -> list[str]:
    return [f"Balance ({convention})" if key == "balance" else title for title, key in EXPORT_COLUMNS]


def _cell(key: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):
        return s._format_money(value)
    if isinstance(value, datetime):
        return value.isoformat()
    text = str(value)
    if key in _FREE_TEXT and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text  # never a formula when a spreadsheet opens the file
    return text


def export_lines(rows: Iterable[s.CustomerRow], convention: str = "held", batch: int = 500) -> Iterator[str]:
    """The CSV text of `rows` (grid columns), streamed in pieces of `batch` rows."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(export_header(convention))
    pending = 0
    for row in rows:
        balance = row.balance
        if convention == "astpp" and row.account_type == "postpaid":
            balance = -balance
        writer.writerow([_cell(key, balance if key == "balance" else getattr(row, key))
                         for _, key in EXPORT_COLUMNS])  # fmt: skip
        pending += 1
        if pending >= batch:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    yield buffer.getvalue()


def write_report(results: Iterable[s.ImportRowResult], out: TextIO, dry_run: bool) -> s.ImportSummary:
    """The per-row import report as CSV (row, account, status, reason), written as rows arrive."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["row", "account", "status", "reason"])
    summary = s.ImportSummary(dry_run=dry_run)
    for r in results:
        writer.writerow([r.row, r.account or "", r.status, r.reason])
        summary_add(summary, r)
    return summary


def summary_add(summary: s.ImportSummary, r: s.ImportRowResult) -> None:
    summary.rows += 1
    if r.status == "failed":
        summary.failed += 1
    else:
        summary.imported += 1


def mapping_pairs(pairs: Iterable[str], what: str) -> Mapping[str, str]:
    """CLI 'KEY=VALUE' pairs -> dict (ValidationFailed on a pair without '=')."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValidationFailed.one(what, f"{pair!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out
