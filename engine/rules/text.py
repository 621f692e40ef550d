"""Small text helpers shared by the rules: safe values and exact money display."""

from __future__ import annotations

import re
from decimal import Decimal

# What a caller may dial on an outbound call: an optional leading "+", then digits,
# "*" and "#". Nothing here is special to a FreeSWITCH bridge string or to `set`.
_DIALLABLE = re.compile(r"\+?[0-9*#]+")


def is_diallable(number: str) -> bool:
    return _DIALLABLE.fullmatch(number) is not None


def safe_text(value: str) -> str:
    """``value`` without the characters that could break or subvert a channel variable.

    Control and other non-printable characters (newlines would end an ESL command)
    and ``$`` (FreeSWITCH expands ``${...}`` in a `set` argument, including API
    calls) are removed. Plain printable text comes back unchanged.
    """
    if value.isprintable() and "$" not in value:
        return value
    return "".join(ch for ch in value if ch.isprintable() and ch != "$")


def show(value: str, limit: int = 40) -> str:
    """An untrusted value quoted for a log or explanation line (escaped, shortened)."""
    if len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} chars)"
    return repr(value)


def plain_decimal(value: Decimal) -> str:
    """Exact, without exponent or trailing zeros: 0.01320 -> '0.0132', 1E+2 -> '100'."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text
