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

import collections
import csv
import io
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import IO, Annotated, Any, TextIO

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
    annotated: Any = Annotated[info.annotation, info]  # a type built at run time
    return TypeAdapter(annotated)


@dataclass
class ImportPlan:
    """How the file's columns become fields (built from the header and the options)."""

    columns: list[str | None]  # per column: the field, or None (ignored)
    names: dict[str, str]  # field -> how messages name it (the CSV header, or "default <field>")
    defaults: dict[str, Any] = field(default_factory=dict)
    convention: str | None = None
    header_width: int = 0
    header: list[str] = field(default_factory=list)

    def record(self, cells: list[str]) -> tuple[dict[str, Any], str | None]:
        """The field values of one row, or a problem that fails the row before validation."""
        if len(cells) > self.header_width:
            return {}, f"the row has {len(cells)} cells, the header {self.header_width}"
        values: dict[str, Any] = {}
        for index, cell in enumerate(cells):
            if "\x00" in cell:
                return {}, f"column {self.header[index]!r} holds a NUL byte (0x00): no field may contain one"
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
    convention: str | None = options.balance_convention
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
                      header_width=len(header), header=cleaned)  # fmt: skip


# A quoted cell may hold line breaks (RFC 4180), but a quote left open must not swallow the rest
# of the file: a record may span at most this many physical lines, else its first line is reported
# as an unclosed quote and reading starts again on the next line.
MAX_RECORD_LINES = 20
# A longer physical line is reported and skipped (memory stays bounded whatever the file holds).
MAX_LINE_BYTES = 1 << 16

Line = tuple[int, str | None, str | None]  # (line number, text with its line break, or a problem)
Row = tuple[int, list[str] | None, str | None]  # (first line number, cells, or a problem)


def _byte_lines(raw: IO[bytes]) -> Iterator[Line]:
    """Physical lines of a byte stream, each decoded on its own: a bad byte fails one line only."""
    number = 0
    while True:
        data = raw.readline(MAX_LINE_BYTES + 1)
        if not data:
            return
        number += 1
        if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
            while data and not data.endswith(b"\n"):  # skip to the end of the line, bounded reads
                data = raw.readline(MAX_LINE_BYTES + 1)
            yield number, None, f"the line is longer than {MAX_LINE_BYTES} bytes"
            continue
        if number == 1 and data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # the UTF-8 byte-order mark spreadsheets write
        try:
            yield number, data.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            where = f"byte 0x{data[exc.start]:02X} at byte {exc.start + 1}"
            yield number, None, f"the line is not UTF-8 text ({where})"


def _text_lines(stream: IO[str]) -> Iterator[Line]:
    for number, text in enumerate(stream, start=1):
        if number == 1:
            text = text.removeprefix("\ufeff")
        if len(text) > MAX_LINE_BYTES:
            yield number, None, f"the line is longer than {MAX_LINE_BYTES} characters"
        else:
            yield number, text, None


def physical_lines(stream: IO[Any]) -> Iterator[Line]:
    """The stream's lines, read as bytes when it has them (a text file's buffer, an upload).

    A text stream must not have been read from yet: its bytes are read directly.
    """
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        return _byte_lines(raw)
    if isinstance(stream.read(0), bytes):
        return _byte_lines(stream)
    return _text_lines(stream)


_UNCLOSED = "a quoted cell opened on this line is not closed (an unbalanced '\"')"


def _parse(first: str, more: Iterator[str]) -> tuple[list[str], int]:
    """One CSV record starting with the line `first`, and the lines it used.

    csv.Error if it is not one; when the error shows past the first line, the first line opened
    a quote that never closed properly, and the message says so.
    """
    lines = itertools.chain([first], itertools.islice(more, MAX_RECORD_LINES - 1))
    reader = csv.reader(lines, strict=True)
    try:
        cells = next(reader)
    except csv.Error as exc:
        if reader.line_num > 1 or "unexpected end of data" in str(exc):
            raise csv.Error(_UNCLOSED) from None
        raise
    return cells, reader.line_num


def _is_row(text: str, width: int) -> bool:
    """Whether the line, read alone, is a whole record of `width` cells."""
    try:
        return len(next(csv.reader([text], strict=True))) == width
    except csv.Error:
        return False


def read_rows(stream: IO[Any], width: Callable[[], int | None] = lambda: None) -> Iterator[Row]:
    """(first line number, cells, problem) for every record; the header is line 1.

    Every non-blank physical line is accounted for: it is (part of) a record, or a problem is
    reported for it and reading goes on with the next line. `width` gives the header's number of
    cells once known: a record spanning several lines with another count is an unclosed quote,
    not a record, and so is one that takes a line that is a whole row by itself. Streams: at
    most MAX_RECORD_LINES lines are held.
    """
    pending: collections.deque[Line] = collections.deque()
    source = physical_lines(stream)

    def _swallowed(cells: list[str], used: int, expected: int) -> bool:
        """Whether a record over `used` lines is a stray quote eating rows, not a cell with breaks:
        it has the wrong number of cells, or a line it took is a whole row by itself."""
        if len(cells) != expected:
            return True
        return any(_is_row(pending[i][1] or "", expected) for i in range(1, used))

    def following() -> Iterator[str]:
        """The lines after the current one, read ahead as the parser asks for them."""
        index = 1
        while True:
            while len(pending) <= index:
                nxt = next(source, None)
                if nxt is None:
                    return
                pending.append(nxt)
            text = pending[index][1]
            if text is None:
                return  # a broken line ends the lookahead: it is reported on its own
            yield text
            index += 1

    while True:
        if not pending:
            nxt = next(source, None)
            if nxt is None:
                return
            pending.append(nxt)
        number, text, problem = pending[0]
        if text is None:
            pending.popleft()
            yield number, None, problem
            continue
        if not text.strip():
            pending.popleft()
            continue  # a blank line is not a record
        try:
            cells, used = _parse(text, following())
        except csv.Error as exc:
            pending.popleft()
            yield number, None, f"not valid CSV: {exc}; the next line is read as a new row"
            continue
        expected = width()
        if used > 1 and expected is not None and _swallowed(cells, used, expected):
            pending.popleft()  # the open quote took other rows: refuse only this line
            yield number, None, f"not valid CSV: {_UNCLOSED}; the next line is read as a new row"
            continue
        for _ in range(used):
            pending.popleft()
        yield number, cells, None


Record = tuple[int, dict[str, Any], str | None]  # (row number, field values, problem)


def records(stream: IO[Any], options: s.ImportOptions) -> tuple[ImportPlan, Iterator[Record]]:
    """The plan (checked now, from the header) and a lazy iterator of (row, values, problem).

    Rows are numbered by the physical line they start on; every line after the header gives a
    record or a problem, never nothing (blank lines aside).
    """
    plan: ImportPlan | None = None
    rows = read_rows(stream, lambda: None if plan is None else plan.header_width)
    try:
        number, header, problem = next(rows)
    except StopIteration:
        raise ValidationFailed.one("file", "is empty: the first line must be a header") from None
    if header is None:
        if problem and "UTF-8" in problem:
            raise ValidationFailed.one("file", "is not UTF-8 text") from None
        raise ValidationFailed.one("file", f"line {number}: {problem}")
    if number != 1:
        raise ValidationFailed.one("file", "the first line must be a header naming the columns")
    plan = build_plan(header, options)
    checked = plan

    def generate() -> Iterator[Record]:
        for number, cells, problem in rows:
            if cells is None:
                yield number, {}, problem
                continue
            values, problem = checked.record(cells)
            yield number, values, problem

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
        balance: Decimal = row.balance
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
