"""The shapes both front ends validate with (pydantic v2), and what the service returns.

Per-field formats live here and reuse the fixture loader's converters, so a value
the fixture loader refuses is refused here with the same words. Rules that span
fields or need the database (uniqueness, ownership, scope) live in
:mod:`engine.admin.service`.

Money: a ``Decimal`` everywhere. JSON output writes it as a string ("12.50");
input takes a string, an integer, or a JSON number read exactly (the API parses
JSON numbers as ``Decimal``, never as binary floats); at most 6 decimal places
and 14 integer digits (the database's numeric(20,6)). Sums of money (totals, available
credit) are exact decimals of any size (`MoneySum`).

Every request model refuses unknown fields, text PostgreSQL cannot store (NUL, lone
surrogates), nesting beyond 32 levels and objects of more than 1,000 fields (`_In`); every
text field has a maximum length, which the OpenAPI document states.

Why one module of about 1,000 lines: it is declarations with almost no logic, the catalogue
of what the API and the CLI accept, read top to bottom, and the OpenAPI document is generated
from it. Split by resource, it would become a field-types module and half a dozen short lists
of models that all import it; the admin service imports the models as ``schemas.X``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.admin.errors import FieldError, ValidationFailed
from engine.db import fields as fx

# --------------------------------------------------------------------------- field types
#
# Every text field has a maximum length (checked before any pattern, so an oversized value is
# refused without being scanned or echoed), and no text anywhere in a request may hold a NUL
# byte or a lone UTF-16 surrogate (PostgreSQL cannot store either): see `_In`.


def _check(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A fixture-loader converter as a pydantic validator (same rule, same message)."""

    def check(value: Any) -> Any:
        try:
            return conv(value)
        except fx.Invalid as exc:
            raise PydanticCustomError("invalid", str(exc)) from None

    return check


def _valid(conv: Callable[[Any], Any]) -> AfterValidator:
    return AfterValidator(_check(conv))


def _doc(max_len: int, **schema: Any) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "maxLength": max_len, **schema})


def _len(max_len: int) -> StringConstraints:
    return StringConstraints(max_length=max_len)


# For a pattern that bounds the length itself: a cheap cap far above it, so a wrong value gets the
# pattern's words and a huge one is refused before the pattern runs.
_CAP = _len(100)


def format_money(value: Decimal) -> str:
    """Exact, without exponent; at least 2 decimals, trailing zeros beyond them dropped."""
    if value == value.quantize(Decimal("0.01")):
        return f"{value:.2f}"
    return format(value.normalize(), "f")


_format_money = format_money  # the name csvio uses

_MONEY_PATTERN = r"^-?[0-9]{1,14}(\.[0-9]{1,6})?$"
_MONEY_SCHEMA = {"type": "string", "pattern": _MONEY_PATTERN, "description": "decimal, e.g. 10.50"}
_MONEY_OUT = PlainSerializer(format_money, return_type=str, when_used="json")

AccountNumber = Annotated[str, _valid(fx.digits(max_len=20)), _doc(20, pattern="^[0-9]{1,20}$")]
# Digit strings: numbers, DIDs, prefixes, caller IDs (E.164 has at most 15 digits; room for prefixes).
Digits = Annotated[str, _len(40), _valid(fx.digits()), _doc(40, pattern="^[0-9]+$")]
DigitsOrEmpty = Annotated[str, _len(40), _valid(fx.digits(empty=True)), _doc(40, pattern="^[0-9]*$")]
Name = Annotated[str, _len(100), _valid(fx.NAME), _doc(100, minLength=1)]
Email = Annotated[str, _len(254), _valid(fx.EMAIL), _doc(254, format="email")]
Phone = Annotated[str, _len(40), _valid(fx.PHONE), _doc(40, pattern="^[0-9 +()-]*$")]
Currency = Annotated[str, _CAP, _valid(fx.CURRENCY), _doc(3, pattern="^[A-Z]{3}$")]
Country = Annotated[str, _CAP, _valid(fx.COUNTRY), _doc(2, pattern="^[A-Z]{2}$")]
Language = Annotated[str, _CAP, _valid(fx.LANGUAGE), _doc(5, pattern="^[a-z]{2}(-[A-Z]{2})?$")]
Timezone = Annotated[
    str, _len(64), _valid(fx.timezone), _doc(64, description="IANA time zone, e.g. Europe/London")
]
Codecs = Annotated[str, _len(500), _valid(fx.CODECS), _doc(500, description="comma list, e.g. PCMA,PCMU")]
SipUser = Annotated[str, _len(64), _valid(fx.SIP_USER), _doc(64, pattern="^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Cidr = Annotated[
    str, _len(50), _valid(fx.cidr), _doc(50, description="a network (203.0.113.0/28) or an address")
]


def _secret(minimum: int, what: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:  # never echoes the value
        if not isinstance(value, str) or len(value) < minimum or any(c.isspace() for c in value):
            raise fx.Invalid(f"must be {what}")
        return value

    return conv


Password = Annotated[
    str, _len(128), _valid(fx.account_password), _doc(128, minLength=8, format="password", writeOnly=True)
]
SipPassword = Annotated[
    str,
    _len(128),
    _valid(_secret(8, "a SIP password of at least 8 characters without spaces")),
    _doc(128, minLength=8, format="password", writeOnly=True),
]
Pin = Annotated[
    str,
    _valid(fx.secret_pattern(r"[0-9]{4,20}", "a PIN of 4 to 20 digits")),
    _doc(20, pattern="^[0-9]{4,20}$", format="password", writeOnly=True),
]
VoicemailPassword = Annotated[
    str,
    _CAP,
    _valid(fx.secret_pattern(r"[0-9]{0,20}", "a voicemail password of at most 20 digits")),
    _doc(20, pattern="^[0-9]{0,20}$", format="password", writeOnly=True),
]
SpeedDialKey = Annotated[
    str,
    _CAP,
    _valid(fx.pattern(r"[0-9]{1,3}", "a speed-dial key of 1 to 3 digits")),
    _doc(3, pattern="^[0-9]{1,3}$"),
]

# Free text, by size: names and short labels; addresses and descriptions; notes.
Text100 = Annotated[str, _len(100), _valid(fx.text(100)), _doc(100)]
Text200 = Annotated[str, _len(200), _valid(fx.text(200)), _doc(200)]
Text500 = Annotated[str, _len(500), _valid(fx.text(500)), _doc(500)]
InvoiceNote = Annotated[str, _len(110), _valid(fx.text(110)), _doc(110)]  # ASTPP's limit
# A search filter's text (matched, never stored).
FilterText = Annotated[str, _len(200)]


def _required_text(value: Any) -> str:
    text = fx.text()(value)
    if not text.strip():
        raise fx.Invalid("must not be empty")
    return text


RequiredText = Annotated[str, _len(100), _valid(_required_text), _doc(100, minLength=1)]
Money = Annotated[  # >= 0, at most numeric(20,6)
    Decimal,
    BeforeValidator(_check(fx.decimal(minimum=Decimal(0)))),
    _MONEY_OUT,
    WithJsonSchema({**_MONEY_SCHEMA, "pattern": _MONEY_PATTERN.replace("^-?", "^")}),
]
SignedMoney = Annotated[
    Decimal, BeforeValidator(_check(fx.decimal(minimum=None))), _MONEY_OUT, WithJsonSchema(_MONEY_SCHEMA)
]
# A sum of money columns (totals, balance + credit limit): exact, any size, never refused.
MoneySum = Annotated[
    Decimal,
    _MONEY_OUT,
    WithJsonSchema(
        {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?$", "description": "decimal sum, any size"}
    ),
]
Timestamp = Annotated[
    datetime,
    BeforeValidator(_check(fx.timestamp)),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
# Days of validity: at most 100 years, so "now + days" is always a date.
ValidDays = Annotated[int, Field(ge=0, le=36500)]
# A page number: far beyond any table, and OFFSET = (page - 1) * per_page stays a bigint.
Page = Annotated[int, Field(ge=1, le=10_000_000)]
# per_page: the OpenAPI document states [admin] max_page_size as the maximum (the service checks it).
PerPage = Annotated[int, Field(ge=1, le=100000)]

Status = Literal["active", "inactive"]
AccountType = Literal["prepaid", "postpaid"]
EntityType = Literal["customer", "provider"]
BillingSchedule = Literal["daily", "weekly", "monthly"]
DestinationType = Literal["device", "uri", "number"]
BalanceConvention = Literal["held", "astpp"]


_SURROGATE = re.compile(r"[\ud800-\udfff]")
# No request nests deeper than this, or has more fields in one object (the largest form has
# about 70); beyond, it is refused before any validation, so no one pays for 10,000 errors.
MAX_DEPTH = 32
MAX_KEYS = 1000


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL byte"
    if _SURROGATE.search(text):
        return "contains a lone UTF-16 surrogate (not valid Unicode)"
    return None


def _shown(path: list[str]) -> str:
    return ".".join(p.encode("unicode_escape").decode("ascii")[:60] for p in path) or "the request"


def check_text_tree(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """ValueError naming where `value` (decoded JSON, a form or query) holds a text PostgreSQL
    cannot store (NUL, a lone surrogate) or nests deeper than `max_depth`."""
    stack: list[tuple[Any, list[str]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if len(path) > max_depth:
            raise ValueError(f"{_shown(path[:3])}...: nested deeper than {max_depth} levels")
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                raise ValueError(f"{_shown(path)}: {problem}")
        elif isinstance(item, dict):
            if len(item) > MAX_KEYS:
                raise ValueError(f"{_shown(path)}: more than {MAX_KEYS} fields")
            for key, child in item.items():
                key_text = str(key)
                problem = _text_problem(key_text)
                if problem:
                    raise ValueError(f"{_shown(path)}: a field name {problem}")
                stack.append((child, [*path, key_text]))
        elif isinstance(item, list | tuple):
            stack.extend((child, [*path, str(i)]) for i, child in enumerate(item))


class _In(BaseModel):
    """A request: unknown fields refused, and no text that PostgreSQL cannot store."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _storable_text(cls, data: Any) -> Any:
        try:
            check_text_tree(data)
        except ValueError as exc:
            raise PydanticCustomError("invalid_text", str(exc)) from None
        return data


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- accounts


def _email_required(schema: dict[str, Any]) -> None:
    """The document says what the service enforces: a new account always has an e-mail. (The model
    itself takes none, for accounts loaded without one by the fixture loader.)"""
    email = schema["properties"]["email"]
    email.update(next(o for o in email.pop("anyOf") if o.get("type") != "null"))
    email.pop("default", None)
    schema["required"] = sorted({*schema.get("required", []), "email"})


class CustomerCreate(_In):
    """ASTPP's customer form. Omitted fields take the defaults shown (or [admin]'s)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_email_required)

    # -- panel access
    reseller: AccountNumber | None = Field(None, description="owning reseller's account number; none = admin")
    number: AccountNumber | None = Field(
        None, description="account number; generated ([admin] length and start digit) when omitted"
    )
    password: Password | None = Field(
        None, description="panel password (8+ characters, letters and digits); generated when omitted"
    )
    pin: Pin | None = Field(None, description="calling-card PIN; generated when omitted and generate_pin")
    generate_pin: bool | None = Field(None, description="generate a PIN when none is given; default [admin]")
    email: Email | None = Field(None, description="required; unique among accounts not deleted")
    create_sip_device: bool | None = Field(None, description="also create a SIP device; default [admin]")
    sip_username: SipUser | None = Field(None, description="the SIP device's username; default the number")
    sip_password: SipPassword | None = Field(
        None, description="the SIP device's password; generated if omitted"
    )
    status: Status = "active"
    valid_days: ValidDays | None = Field(
        None, description="days of validity: expiry = now (or first use) + days"
    )
    expiry: Timestamp | None = Field(None, description="none = never expires")
    expiry_from_first_use: bool = False
    # -- account settings
    max_channels: Count = Field(0, description="concurrent calls; 0 = unlimited")
    cps: Count = Field(0, description="calls per second; 0 = unlimited")
    localization: Name | None = None
    local_calls_allowed: bool = True
    local_call_cost_per_minute: Money = Decimal(0)
    codecs: Codecs = ""
    notifications: bool | None = Field(None, description="e-mail notifications; default on (providers: off)")
    paypal_permission: bool = False
    is_recording: bool = False
    allow_ip_management: bool = False
    notify_enabled: bool = Field(False, description="low-balance alert on")
    notify_balance_below: SignedMoney | None = Field(None, description="alert when available credit <= this")
    notify_email: Email | None = None
    # -- profile
    first_name: RequiredText
    last_name: Text100 = ""
    company: Text200 = ""
    phone: Phone = ""
    mobile: Phone = ""
    address_1: Text200 = ""
    address_2: Text200 = ""
    city: Text100 = ""
    province: Text100 = ""
    postal_code: Text100 = ""
    country: Country | None = None
    timezone: Timezone | None = Field(None, description="IANA name; default [admin] default_timezone")
    language: Language = "en"
    currency: Currency | None = Field(None, description="ISO 4217; default [admin] default_currency")
    # -- billing
    account_type: AccountType = "prepaid"
    balance: SignedMoney = Field(Decimal(0), description="opening balance held by the customer (< 0 = debt)")
    credit_limit: Money = Field(Decimal(0), description="postpaid only")
    rate_group: Name | None = Field(None, description="required for customers")
    non_cli_rate_group: Name | None = None
    cli_pool: int = Field(0, ge=0, le=8, description="caller-ID rule 0-8 (decision-rules 4.4)")
    billing_schedule: BillingSchedule = "monthly"
    invoice_day: int | None = Field(None, description="weekly 1-7, monthly 1-28 (default 1), daily none")
    tax_number: Text100 = ""
    generate_invoice: bool = True
    invoice_note: InvoiceNote = ""
    reference: Text100 = ""


# Immutable once created (ASTPP: number, account type and balance; balance moves by refills/charges).
_NOT_UPDATABLE = (
    "reseller",
    "number",
    "account_type",
    "balance",
    "generate_pin",
    "create_sip_device",
    "sip_username",
    "sip_password",
)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


# An update field that may be omitted but not sent as null (the document says so: no default null).
_OMITTABLE: Any = Field(None, json_schema_extra=_no_default)


def _nullable(annotation: Any) -> bool:
    return type(None) in get_args(annotation)


# Nullable in the create model, but an edit may not clear it (the service refuses).
_NEVER_CLEARED = ("email",)


def _not_cleared(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("required", "required")
    return value


def _update_model(
    model: type[BaseModel], name: str, exclude: tuple[str, ...], doc: str, *, null_clears: bool
) -> type[BaseModel]:
    """`model` with every field optional: omitted = unchanged. With `null_clears`, a field that is
    nullable in `model` takes null (clears it); otherwise null is refused, as the service does."""
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in exclude:
            continue
        annotation = info.rebuild_annotation()
        if null_clears and _nullable(annotation) and field_name not in _NEVER_CLEARED:
            fields[field_name] = (annotation, Field(None, description=info.description))
            continue
        if _nullable(annotation):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        if field_name in _NEVER_CLEARED:
            annotation = Annotated[annotation, BeforeValidator(_not_cleared)]
        omitted = Field(None, description=info.description, json_schema_extra=_no_default)
        fields[field_name] = (annotation, omitted)
    created = create_model(name, __base__=_In, __doc__=doc, **fields)
    created.__module__ = __name__
    return created


if TYPE_CHECKING:  # built at run time from the create models; to mypy, any request model
    CustomerUpdate = _In
    SipDeviceUpdate = _In
    IpMapUpdate = _In
    CallerIdUpdate = _In
else:
    CustomerUpdate = _update_model(
        CustomerCreate,
        "CustomerUpdate",
        _NOT_UPDATABLE,
        "Profile and settings edit: only the fields given change (null clears an optional one).",
        null_clears=True,
    )


class AccountOut(_Out):
    entity_type: EntityType | Literal["reseller"]
    number: str
    reseller: str | None
    status: Status
    email: str | None
    has_password: bool
    has_pin: bool
    valid_days: int | None
    expiry: datetime | None
    expiry_from_first_use: bool
    first_used: datetime | None
    created: datetime
    max_channels: int
    cps: int
    localization: str | None
    local_calls_allowed: bool
    local_call_cost_per_minute: SignedMoney
    codecs: str
    notifications: bool
    paypal_permission: bool
    is_recording: bool
    allow_ip_management: bool
    notify_enabled: bool
    notify_balance_below: SignedMoney | None
    notify_email: str | None
    first_name: str
    last_name: str
    company: str
    phone: str
    mobile: str
    address_1: str
    address_2: str
    city: str
    province: str
    postal_code: str
    country: str | None
    timezone: str
    language: str
    currency: str
    account_type: AccountType
    balance: SignedMoney = Field(description="held by the customer; negative = debt")
    credit_limit: SignedMoney
    available: MoneySum = Field(description="balance + credit limit")
    rate_group: str | None
    non_cli_rate_group: str | None
    cli_pool: int
    billing_schedule: BillingSchedule
    invoice_day: int | None
    tax_number: str
    generate_invoice: bool
    invoice_note: str
    reference: str


class GeneratedSecrets(_Out):
    """Secrets the server generated: shown once, in this response only."""

    password: str | None = None
    pin: str | None = None
    sip_password: str | None = None


class AccountCreated(_Out):
    account: AccountOut
    generated: GeneratedSecrets
    sip_username: str | None = None


class CustomerRow(_Out):
    """One line of the customer grid (and of the CSV export)."""

    entity_type: EntityType
    account_type: AccountType
    number: str
    first_name: str
    last_name: str
    company: str
    email: str | None
    rate_group: str | None
    balance: SignedMoney
    credit_limit: SignedMoney
    currency: str
    first_used: datetime | None
    expiry: datetime | None
    concurrent_calls: int
    localization: str | None
    reseller: str | None
    created: datetime
    status: Status
    billing_schedule: BillingSchedule


StringOp = Literal["eq", "ne", "begins", "contains", "not_contains", "ends"]
SORT_KEYS = (
    "entity_type",
    "account_type",
    "number",
    "first_name",
    "last_name",
    "company",
    "email",
    "rate_group",
    "balance",
    "credit_limit",
    "first_used",
    "expiry",
    "concurrent_calls",
    "localization",
    "reseller",
    "created",
    "status",
    "billing_schedule",
)
if TYPE_CHECKING:  # a Literal built at run time from SORT_KEYS; mypy sees the plain string
    SortKey = str
else:
    SortKey = Literal[tuple(k for key in SORT_KEYS for k in (key, f"-{key}"))]


class CustomerFilter(_In):
    """Search the grid: a text filter takes an operator (default `contains`; `begins` for number)."""

    number: FilterText | None = None
    number_op: StringOp | None = None
    first_name: FilterText | None = None
    first_name_op: StringOp | None = None
    last_name: FilterText | None = None
    last_name_op: StringOp | None = None
    company: FilterText | None = None
    company_op: StringOp | None = None
    email: FilterText | None = None
    email_op: StringOp | None = None
    rate_group: FilterText | None = None
    rate_group_op: StringOp | None = None
    localization: FilterText | None = None
    localization_op: StringOp | None = None
    reseller: FilterText | None = Field(
        None, description="reseller account number; 'admin' = owned by the admin"
    )
    reseller_op: StringOp | None = None
    balance_min: SignedMoney | None = None
    balance_max: SignedMoney | None = None
    credit_limit_min: SignedMoney | None = None
    credit_limit_max: SignedMoney | None = None
    concurrent_calls_min: Count | None = None
    concurrent_calls_max: Count | None = None
    first_used_from: Timestamp | None = None
    first_used_to: Timestamp | None = None
    expiry_from: Timestamp | None = None
    expiry_to: Timestamp | None = None
    created_from: Timestamp | None = None
    created_to: Timestamp | None = None
    account_type: AccountType | None = None
    entity_type: EntityType | None = None
    status: Status | None = None
    billing_schedule: BillingSchedule | None = None
    sort: SortKey = Field("-number", description="a column, '-' first for descending")


class CustomerQuery(CustomerFilter):
    page: Page = 1
    per_page: PerPage = 50


class ExportQuery(CustomerFilter):
    balance_convention: BalanceConvention = Field(
        "held",
        description="held: balance is what the customer holds (negative = debt); "
        "astpp: postpaid balances are written as the amount owed (positive = debt)",
    )


class CustomerPage(_Out):
    items: list[CustomerRow]
    page: int
    per_page: int
    total: int


class DeleteRequest(_In):
    numbers: list[AccountNumber] = Field(min_length=1, max_length=10000)


class DeleteResult(_Out):
    deleted: list[str]
    released_dids: list[str]


# --------------------------------------------------------------------------- mass create


class MassCreate(_In):
    """ASTPP's mass create form."""

    count: int = Field(ge=1, le=100000)
    prefix: Digits = Field(description="every number starts with it")
    account_length: int = Field(ge=1, le=20, description="digits in each number, prefix included")
    generate_pin: bool | None = Field(None, description="default [admin] generate_pin")
    valid_days: ValidDays | None = None
    currency: Currency | None = None
    country: Country | None = None
    timezone: Timezone | None = None
    account_type: AccountType = "prepaid"
    balance: SignedMoney = Decimal(0)
    credit_limit: Money = Decimal(0)
    cli_pool: int = Field(0, ge=0, le=8)
    rate_group: Name
    non_cli_rate_group: Name | None = None
    billing_schedule: BillingSchedule = "monthly"
    invoice_day: int | None = None
    reseller: AccountNumber | None = None
    create_sip_devices: bool = Field(False, description="a SIP device per account (username = number)")


class MassCreatedAccount(_Out):
    number: str
    pin: str | None = None
    sip_password: str | None = None


class MassCreateResult(_Out):
    count: int
    accounts: list[MassCreatedAccount]


# --------------------------------------------------------------------------- import


class ImportOptions(_In):
    mapping: dict[str, str | None] = Field(
        default_factory=dict,
        description="CSV header -> field name (null or '' = ignore the column); ASTPP's sample "
        "headers and field names map themselves",
    )
    defaults: dict[str, str | int | bool | Decimal] = Field(
        default_factory=dict, description="field -> value for rows that give none"
    )
    dry_run: bool = False
    balance_convention: BalanceConvention | None = Field(
        None,
        description="how the file writes postpaid balances; required when one is not zero, "
        "unless the Balance header says it",
    )


ImportStatus = Literal["imported", "would_import", "failed"]


class ImportRowResult(_Out):
    row: int = Field(description="line of the record in the file (the header is line 1)")
    account: str | None
    status: ImportStatus
    reason: str = ""


class ImportSummary(_Out):
    rows: int = 0
    imported: int = 0
    failed: int = 0
    dry_run: bool = False


class ImportReport(_Out):
    rows: list[ImportRowResult]
    summary: ImportSummary
    error: str | None = Field(None, description="set when the import stopped early (the rows listed stand)")


# --------------------------------------------------------------------------- sub-resources


class SipDeviceCreate(_In):
    username: SipUser | None = Field(None, description="default: the account number")
    password: SipPassword | None = Field(None, description="generated when omitted (shown once)")
    active: bool = True
    codecs: Codecs = ""
    caller_id_name: Text100 = ""
    caller_id_number: DigitsOrEmpty = ""
    context: Name = "default"
    voicemail_enabled: bool = False
    voicemail_password: VoicemailPassword = ""


if not TYPE_CHECKING:
    SipDeviceUpdate = _update_model(
        SipDeviceCreate,
        "SipDeviceUpdate",
        ("username",),
        "Only the fields given change (null is refused).",
        null_clears=False,
    )


class SipDeviceOut(_Out):
    username: str
    active: bool
    codecs: str
    caller_id_name: str
    caller_id_number: str
    context: str
    voicemail_enabled: bool


class SipDeviceCreated(_Out):
    device: SipDeviceOut
    generated_password: str | None = None


class IpMapCreate(_In):
    cidr: Cidr = Field(description="a network, or one address (stored as /32 or /128)")
    tech_prefix: DigitsOrEmpty = Field("", description="stripped from the dialled number")
    name: Text100 = ""
    active: bool = True


if not TYPE_CHECKING:
    IpMapUpdate = _update_model(
        IpMapCreate, "IpMapUpdate", (), "Only the fields given change (null is refused).", null_clears=False
    )


class IpMapOut(_Out):
    id: int
    cidr: str
    tech_prefix: str
    name: str
    active: bool


class CallerIdCreate(_In):
    number: Digits
    description: Text200 = ""
    active: bool = True


if not TYPE_CHECKING:
    CallerIdUpdate = _update_model(
        CallerIdCreate,
        "CallerIdUpdate",
        ("number",),
        "Only the fields given change (null is refused).",
        null_clears=False,
    )


class CallerIdOut(_Out):
    number: str
    description: str
    active: bool


class ForcedCallerIdIn(_In):
    number: Digits
    name: Text100 = ""
    active: bool = True


class ForcedCallerIdOut(_Out):
    number: str
    name: str
    active: bool


class DidAssign(_In):
    number: Digits = Field(description="a DID that exists and is not assigned")
    destination_type: DestinationType = "device"
    destination: Text200 = Field("", description="device: a SIP username of the account; number: digits")


class DidUpdate(_In):
    destination_type: DestinationType = _OMITTABLE
    destination: Text200 = _OMITTABLE
    active: bool = _OMITTABLE


class DidOut(_Out):
    number: str
    description: str
    active: bool
    destination_type: DestinationType
    destination: str
    max_channels: int
    connect_cost: SignedMoney
    cost_per_minute: SignedMoney
    monthly_cost: SignedMoney


class SpeedDialIn(_In):
    number: Digits


class SpeedDialOut(_Out):
    key: str
    number: str


class BlockedCodeCreate(_In):
    prefix: Digits
    description: Text200 = ""


class BlockedCodeOut(_Out):
    prefix: str
    description: str


class AlertThreshold(_In):
    """Low-balance notification: alert when the available credit drops to `notify_balance_below`."""

    notify_enabled: bool = _OMITTABLE
    notify_balance_below: SignedMoney | None = Field(None, description="null clears it")
    notify_email: Email | None = Field(None, description="null clears it")


class AlertThresholdOut(_Out):
    notify_enabled: bool
    notify_balance_below: SignedMoney | None
    notify_email: str | None


class TrunkOut(_Out):
    name: str
    gateway: str
    active: bool
    precedence: int
    max_channels: int
    cps: int


class RefillIn(_In):
    amount: Money = Field(description="credited to the customer; > 0")
    description: Text500 = ""
    reference: Text200 = Field("", description="receipt or payment reference")
    method: Text100 = Field("manual", description="how it was paid: cash, bank transfer, card...")


class ChargeIn(_In):
    amount: Money = Field(description="debited from the customer; > 0")
    description: Text500 = ""
    reference: Text200 = ""


class LedgerEntryOut(_Out):
    id: int
    account: str
    at: datetime
    kind: Literal["initial", "refill", "charge"]
    amount: SignedMoney = Field(description="signed from the customer's side: + credit, - debit")
    balance_after: SignedMoney
    currency: str
    description: str
    reference: str
    method: str
    actor: str


class LedgerQuery(_In):
    since: Timestamp | None = None
    until: Timestamp | None = None
    kind: Literal["initial", "refill", "charge"] | None = None
    page: Page = 1
    per_page: PerPage = 50


class RefillQuery(_In):
    account: AccountNumber | None = None
    reseller: AccountNumber | None = Field(None, description="refills of this reseller's subtree")
    since: Timestamp | None = None
    until: Timestamp | None = None
    page: Page = 1
    per_page: PerPage = 50


class CurrencyTotal(_Out):
    currency: str
    count: int
    amount: MoneySum = Field(description="the exact sum; it may exceed the per-entry limit")


class LedgerPage(_Out):
    items: list[LedgerEntryOut]
    page: int
    per_page: int
    total: int
    totals: list[CurrencyTotal] = Field(description="sum of the matching entries per currency")


class AuditQuery(_In):
    account: AccountNumber | None = None
    action: FilterText | None = None
    entity: FilterText | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    page: Page = 1
    per_page: PerPage = 50


def _money_strings(value: Any) -> Any:
    if isinstance(value, Decimal):
        return _format_money(value)
    if isinstance(value, dict):
        return {k: _money_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_money_strings(v) for v in value]
    return value


Image = Annotated[dict[str, Any] | None, PlainSerializer(_money_strings, when_used="json")]


class AuditEntryOut(_Out):
    id: int
    at: datetime
    actor: str
    action: str
    account: str | None
    entity: str
    entity_key: str
    before: Image = Field(description="the entity before the change (none for a creation); money as strings")
    after: Image = Field(description="the entity after the change (none for a removal)")


class AuditPage(_Out):
    items: list[AuditEntryOut]
    page: int
    per_page: int
    total: int


class FieldErrorOut(_Out):
    field: str
    message: str


class ErrorOut(_Out):
    error: str = Field(description="validation_failed, not_found, forbidden, unauthorized...")
    message: str
    errors: list[FieldErrorOut] = Field(default_factory=list)


# --------------------------------------------------------------------------- helpers

_PYDANTIC_MESSAGES = {
    "missing": "required",
    "extra_forbidden": "unknown field",
    "literal_error": None,  # keep pydantic's "Input should be 'a' or 'b'"
}


def field_errors(exc: ValidationError, names: Mapping[str, str] | None = None) -> list[FieldError]:
    """pydantic errors as FieldErrors (field names optionally renamed, e.g. to CSV headers)."""
    out = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = [str(part) for part in error["loc"]]
        field = ".".join(loc)
        if names and loc and loc[0] in names:
            field = ".".join([names[loc[0]], *loc[1:]])
        message = _PYDANTIC_MESSAGES.get(error["type"]) or error["msg"]
        if error["type"] == "string_too_long":  # the fixture loader's words
            message = f"longer than {error.get('ctx', {}).get('max_length')} characters"
        out.append(FieldError(field, message))
    return out


def parse(model: type[BaseModel], data: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Any:
    """Validate `data` into `model`, or raise ValidationFailed naming each field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc, names)) from None
