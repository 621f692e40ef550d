"""Field validators shared by the fixture loader and the admin API (one rule, one message).

Each validator is a callable taking a raw value (from YAML, JSON or a CSV cell) and returning
the clean value, or raising :class:`Invalid` with a message that names what was expected.

Secrets: validators of secret fields (:func:`account_password`, :func:`secret_pattern`) never
put the value in their message; the other validators may quote the value they refuse.
"""

from __future__ import annotations

import ipaddress
import re
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any


class SourceInt(int):
    """An int read from YAML that remembers how it was written ("0044" stays "0044")."""

    text: str

    def __new__(cls, value: int, text: str) -> SourceInt:
        obj = super().__new__(cls, value)
        obj.text = text
        return obj


class Invalid(Exception):
    """A value a validator refuses; the message says what was expected."""


def text_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, SourceInt):
        return value.text
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def text(max_len: int | None = None) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        text = text_of(value)
        if text is None:
            raise Invalid(f"must be a string, not {type(value).__name__}")
        if max_len is not None and len(text) > max_len:
            raise Invalid(f"longer than {max_len} characters")
        return text

    return conv


def pattern(regex: str, what: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def conv(value: Any) -> str:
        text = text_of(value)
        if text is None:
            raise Invalid(f"must be {what}, not {type(value).__name__}")
        if not compiled.fullmatch(text):
            raise Invalid(f"{text!r} is not {what}")
        return text

    return conv


def secret_pattern(regex: str, what: str) -> Callable[[Any], str]:
    """Like :func:`pattern` for a secret (PIN, voicemail password): the message never quotes the value."""
    compiled = re.compile(regex)

    def conv(value: Any) -> str:
        text = text_of(value)
        if text is None or not compiled.fullmatch(text):
            raise Invalid(f"must be {what}")
        return text

    return conv


def digits(*, empty: bool = False, max_len: int | None = None) -> Callable[[Any], str]:
    what = "a string of digits" + (" (may be empty)" if empty else "")
    quant = "*" if empty else "+"
    conv = pattern(f"[0-9]{quant}", what)
    if max_len is None:
        return conv

    def limited(value: Any) -> str:
        text = conv(value)
        if len(text) > max_len:
            raise Invalid(f"{text!r} has more than {max_len} digits")
        return text

    return limited


NAME = pattern(r"\S(?:.*\S)?", "a non-empty name without surrounding spaces")
SOFIA_NAME = pattern(r"[A-Za-z0-9][A-Za-z0-9._-]*", "a gateway name of letters, digits, '.', '_', '-'")
SIP_USER = pattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a SIP username (letters, digits, '.', '_', '-')")
EMAIL = pattern(r"[^@\s]+@[^@\s]+\.[^@\s]+", "an e-mail address")
PHONE = pattern(r"[0-9 +()-]*", "a phone number")
PREPEND = pattern(r"[0-9+#*]*", "digits, '+', '#' or '*'")
CURRENCY = pattern(r"[A-Z]{3}", "an ISO 4217 currency code such as 'USD'")
COUNTRY = pattern(r"[A-Z]{2}", "an ISO 3166 country code such as 'GB'")
LANGUAGE = pattern(r"[a-z]{2}(?:-[A-Z]{2})?", "a language tag such as 'en' or 'en-GB'")
CODECS = pattern(
    r"(?:[A-Za-z0-9][A-Za-z0-9@._-]*(?:,[A-Za-z0-9][A-Za-z0-9@._-]*)*)?", "a comma list of codecs"
)


def account_password(value: Any) -> str:
    """ASTPP's rule (at least 8 characters, letters and digits); never echoes the value."""
    text = text_of(value)
    if text is None or not re.fullmatch(r"(?=.*[A-Za-z])(?=.*[0-9]).{8,}", text):
        raise Invalid("must be a password of at least 8 characters with letters and digits")
    return text


_RULE = r"(?:\*|[0-9+#]+)/(?:\*|[0-9+#]*)"
_RULES_RE = re.compile(rf"(?:{_RULE}(?:,{_RULE})*)?")


def rules(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string of 'match/replace' rules, not {type(value).__name__}")
    if not _RULES_RE.fullmatch(re.sub(r"\s", "", value)):
        raise Invalid(
            f"{value!r} is not a rule set: comma-separated 'match/replace' pairs, match '*' or "
            "digits/+/#, replace '*' or digits/+/# or empty"
        )
    return value


def decimal(*, minimum: Decimal | None = Decimal(0)) -> Callable[[Any], Decimal]:
    def conv(value: Any) -> Decimal:
        if isinstance(value, (bool, float)):
            raise Invalid(f"must be a decimal written as a string or integer, not {type(value).__name__}")
        if isinstance(value, Decimal):
            number = value
        elif isinstance(value, int):
            number = Decimal(int(value))
        elif isinstance(value, str):
            try:
                number = Decimal(value.strip())
            except InvalidOperation:
                raise Invalid(f"{value!r} is not a decimal number") from None
        else:
            raise Invalid(f"must be a decimal number, not {type(value).__name__}")
        if not number.is_finite():
            raise Invalid(f"{value!r} is not a finite decimal number")
        if abs(number) >= Decimal(10) ** 14:
            raise Invalid(f"{value!r} is too large (at most 14 digits before the point)")
        exponent = number.as_tuple().exponent
        assert isinstance(exponent, int)
        if exponent < -6 and number != number.quantize(Decimal("0.000001")):
            raise Invalid(f"{value!r} has more than 6 decimal places")
        if minimum is not None and number < minimum:
            raise Invalid(f"{value!r} must be at least {minimum}")
        return number

    return conv


def integer(minimum: int | None = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"must be an integer, not {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise Invalid(f"{int(value)} is below {minimum}")
        if maximum is not None and value > maximum:
            raise Invalid(f"{int(value)} is above {maximum}")
        return int(value)

    return conv


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {value!r}")
    return value


def choice(*allowed: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if value not in allowed:
            raise Invalid(f"{value!r} is not one of {', '.join(allowed)}")
        return str(value)

    return conv


def cidr(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a CIDR string such as '203.0.113.0/24', not {type(value).__name__}")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=True))
    except ValueError as exc:
        raise Invalid(f"{value!r} is not a valid CIDR ({exc})") from None


def timestamp(value: Any) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time())
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise Invalid(f"{value!r} is not an ISO 8601 date/time") from None
    else:
        raise Invalid(f"must be a date/time, not {type(value).__name__}")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def timezone(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be an IANA time zone name, not {type(value).__name__}")
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise Invalid(f"{value!r} is not a known IANA time zone") from None
    return value


def name_list(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise Invalid(f"must be a list of names, not {type(value).__name__}")
    names = [NAME(v) for v in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Invalid(f"lists {dupes[0]!r} twice")
    return names


def params(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise Invalid(f"must be a mapping of gateway parameters, not {type(value).__name__}")
    out = {}
    for k, v in value.items():
        text = "true" if v is True else "false" if v is False else text_of(v)
        if not isinstance(k, str) or text is None:
            raise Invalid(f"parameter {k!r} must map a name to a string, number or boolean")
        out[k] = text
    return out
