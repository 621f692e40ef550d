"""The shapes both front ends validate with (pydantic v2), and what the service returns.

Per-field formats live here and reuse the fixture loader's converters, so a value
the fixture loader refuses is refused here with the same words. Rules that span
fields or need the database (uniqueness, ownership, scope) live in
:mod:`engine.admin.service`.

Money: a ``Decimal`` everywhere. JSON output writes it as a string ("12.50");
input takes a string, an integer, or a JSON number read exactly (the API parses
JSON numbers as ``Decimal``, never as binary floats); at most 6 decimal places
and 14 integer digits (the database's numeric(20,6)).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from engine.admin.errors import FieldError, ValidationFailed
from engine.db import fields as fx

# --------------------------------------------------------------------------- field types


def _check(conv: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A fixture-loader converter as a pydantic validator (same rule, same message)."""

    def check(value: Any) -> Any:
        try:
            return conv(value)
        except fx.Invalid as exc:
            raise PydanticCustomError("invalid", str(exc)) from None

    return check


def _string(conv: Callable[[Any], Any], schema: dict[str, Any]) -> Any:
    return Annotated[str, AfterValidator(_check(conv)), WithJsonSchema({"type": "string", **schema})]


def _format_money(value: Decimal) -> str:
    """Exact, without exponent; at least 2 decimals, trailing zeros beyond them dropped."""
    if value == value.quantize(Decimal("0.01")):
        return f"{value:.2f}"
    return format(value.normalize(), "f")


_MONEY_PATTERN = r"^-?[0-9]{1,14}(\.[0-9]{1,6})?$"


def _money(minimum: Decimal | None) -> Any:
    schema: dict[str, Any] = {
        "type": "string",
        "pattern": _MONEY_PATTERN,
        "description": "decimal, e.g. 10.50",
    }
    if minimum is not None:
        schema["pattern"] = _MONEY_PATTERN.replace("^-?", "^")
    return Annotated[
        Decimal,
        BeforeValidator(_check(fx.decimal(minimum=minimum))),
        PlainSerializer(_format_money, return_type=str, when_used="json"),
        WithJsonSchema(schema),
    ]


def _secret(minimum: int, what: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:  # never echoes the value
        if not isinstance(value, str) or len(value) < minimum or any(c.isspace() for c in value):
            raise fx.Invalid(f"must be {what}")
        return value

    return conv


AccountNumber = _string(fx.digits(max_len=20), {"pattern": "^[0-9]{1,20}$"})
Digits = _string(fx.digits(), {"pattern": "^[0-9]+$"})
DigitsOrEmpty = _string(fx.digits(empty=True), {"pattern": "^[0-9]*$"})
Name = _string(fx.NAME, {"minLength": 1})
Email = _string(fx.EMAIL, {"format": "email"})
Phone = _string(fx.PHONE, {"pattern": "^[0-9 +()-]*$"})
Currency = _string(fx.CURRENCY, {"pattern": "^[A-Z]{3}$"})
Country = _string(fx.COUNTRY, {"pattern": "^[A-Z]{2}$"})
Language = _string(fx.LANGUAGE, {"pattern": "^[a-z]{2}(-[A-Z]{2})?$"})
Timezone = _string(fx.timezone, {"description": "IANA time zone, e.g. Europe/London"})
Codecs = _string(fx.CODECS, {"description": "comma list, e.g. PCMA,PCMU"})
SipUser = _string(fx.SIP_USER, {"pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"})
Cidr = _string(fx.cidr, {"description": "a network (203.0.113.0/28) or an address"})
Password = _string(fx.account_password, {"minLength": 8, "format": "password", "writeOnly": True})
SipPassword = _string(
    _secret(8, "a SIP password of at least 8 characters without spaces"),
    {"minLength": 8, "format": "password", "writeOnly": True},
)
Pin = _string(
    fx.secret_pattern(r"[0-9]{4,20}", "a PIN of 4 to 20 digits"),
    {"pattern": "^[0-9]{4,20}$", "format": "password", "writeOnly": True},
)
VoicemailPassword = _string(
    fx.secret_pattern(r"[0-9]{0,20}", "a voicemail password of at most 20 digits"),
    {"pattern": "^[0-9]{0,20}$", "format": "password", "writeOnly": True},
)
SpeedDialKey = _string(
    fx.pattern(r"[0-9]{1,3}", "a speed-dial key of 1 to 3 digits"), {"pattern": "^[0-9]{1,3}$"}
)


def Text(max_len: int | None = None) -> Any:
    schema: dict[str, Any] = {} if max_len is None else {"maxLength": max_len}
    return _string(fx.text(max_len), schema)


def _required_text(value: Any) -> str:
    text = fx.text()(value)
    if not text.strip():
        raise fx.Invalid("must not be empty")
    return text


RequiredText = _string(_required_text, {"minLength": 1})
Money = _money(Decimal(0))  # >= 0
SignedMoney = _money(None)
Timestamp = Annotated[
    datetime,
    BeforeValidator(_check(fx.timestamp)),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]

Status = Literal["active", "inactive"]
AccountType = Literal["prepaid", "postpaid"]
EntityType = Literal["customer", "provider"]
BillingSchedule = Literal["daily", "weekly", "monthly"]
DestinationType = Literal["device", "uri", "number"]
BalanceConvention = Literal["held", "astpp"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# --------------------------------------------------------------------------- accounts


class CustomerCreate(_In):
    """ASTPP's customer form. Omitted fields take the defaults shown (or [admin]'s)."""

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
    valid_days: Count | None = Field(None, description="days of validity: expiry = now (or first use) + days")
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
    last_name: Text() = ""
    company: Text() = ""
    phone: Phone = ""
    mobile: Phone = ""
    address_1: Text() = ""
    address_2: Text() = ""
    city: Text() = ""
    province: Text() = ""
    postal_code: Text() = ""
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
    tax_number: Text() = ""
    generate_invoice: bool = True
    invoice_note: Text(110) = ""
    reference: Text(100) = ""


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


def _optional_copy(model: type[BaseModel], name: str, exclude: tuple[str, ...], doc: str) -> type[BaseModel]:
    fields: dict[str, Any] = {}
    for field_name, info in model.model_fields.items():
        if field_name in exclude:
            continue
        fields[field_name] = (info.rebuild_annotation() | None, Field(None, description=info.description))
    created = create_model(name, __base__=_In, __doc__=doc, **fields)
    created.__module__ = __name__
    return created


CustomerUpdate = _optional_copy(
    CustomerCreate,
    "CustomerUpdate",
    _NOT_UPDATABLE,
    "Profile and settings edit: only the fields given change (null clears an optional one).",
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
    available: SignedMoney = Field(description="balance + credit limit")
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
SortKey = Literal[tuple(k for key in SORT_KEYS for k in (key, f"-{key}"))]  # type: ignore[valid-type]


class CustomerFilter(_In):
    """Search the grid: a text filter takes an operator (default `contains`; `begins` for number)."""

    number: str | None = None
    number_op: StringOp | None = None
    first_name: str | None = None
    first_name_op: StringOp | None = None
    last_name: str | None = None
    last_name_op: StringOp | None = None
    company: str | None = None
    company_op: StringOp | None = None
    email: str | None = None
    email_op: StringOp | None = None
    rate_group: str | None = None
    rate_group_op: StringOp | None = None
    localization: str | None = None
    localization_op: StringOp | None = None
    reseller: str | None = Field(None, description="reseller account number; 'admin' = owned by the admin")
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
    sort: SortKey = Field("-number", description="a column, '-' first for descending")  # type: ignore[valid-type]


class CustomerQuery(CustomerFilter):
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=100000)


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
    valid_days: Count | None = None
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
    caller_id_name: Text() = ""
    caller_id_number: DigitsOrEmpty = ""
    context: Name = "default"
    voicemail_enabled: bool = False
    voicemail_password: VoicemailPassword = ""


SipDeviceUpdate = _optional_copy(
    SipDeviceCreate, "SipDeviceUpdate", ("username",), "Only the fields given change."
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
    name: Text() = ""
    active: bool = True


IpMapUpdate = _optional_copy(IpMapCreate, "IpMapUpdate", (), "Only the fields given change.")


class IpMapOut(_Out):
    id: int
    cidr: str
    tech_prefix: str
    name: str
    active: bool


class CallerIdCreate(_In):
    number: Digits
    description: Text() = ""
    active: bool = True


CallerIdUpdate = _optional_copy(
    CallerIdCreate, "CallerIdUpdate", ("number",), "Only the fields given change."
)


class CallerIdOut(_Out):
    number: str
    description: str
    active: bool


class ForcedCallerIdIn(_In):
    number: Digits
    name: Text() = ""
    active: bool = True


class ForcedCallerIdOut(_Out):
    number: str
    name: str
    active: bool


class DidAssign(_In):
    number: Digits = Field(description="a DID that exists and is not assigned")
    destination_type: DestinationType = "device"
    destination: Text() = Field("", description="device: a SIP username of the account; number: digits")


class DidUpdate(_In):
    destination_type: DestinationType | None = None
    destination: Text() | None = None
    active: bool | None = None


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
    description: Text() = ""


class BlockedCodeOut(_Out):
    prefix: str
    description: str


class AlertThreshold(_In):
    """Low-balance notification: alert when the available credit drops to `notify_balance_below`."""

    notify_enabled: bool | None = None
    notify_balance_below: SignedMoney | None = None
    notify_email: Email | None = None


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
    description: Text(500) = ""
    reference: Text(200) = Field("", description="receipt or payment reference")
    method: Text(100) = Field("manual", description="how it was paid: cash, bank transfer, card...")


class ChargeIn(_In):
    amount: Money = Field(description="debited from the customer; > 0")
    description: Text(500) = ""
    reference: Text(200) = ""


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
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=100000)


class RefillQuery(_In):
    account: AccountNumber | None = None
    reseller: AccountNumber | None = Field(None, description="refills of this reseller's subtree")
    since: Timestamp | None = None
    until: Timestamp | None = None
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=100000)


class CurrencyTotal(_Out):
    currency: str
    count: int
    amount: SignedMoney


class LedgerPage(_Out):
    items: list[LedgerEntryOut]
    page: int
    per_page: int
    total: int
    totals: list[CurrencyTotal] = Field(description="sum of the matching entries per currency")


class AuditQuery(_In):
    account: AccountNumber | None = None
    action: str | None = None
    entity: str | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=100000)


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
        out.append(FieldError(field, message))
    return out


def parse(model: type[BaseModel], data: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Any:
    """Validate `data` into `model`, or raise ValidationFailed naming each field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValidationFailed(field_errors(exc, names)) from None
