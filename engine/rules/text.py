"""Small text helpers shared by the rules: safe values and exact money display."""

from __future__ import annotations

import re
from decimal import Decimal

# What a caller may dial on an outbound call: an optional leading "+", then digits,
# "*" and "#". Nothing here is special to a FreeSWITCH bridge string or to `set`.
_DIALLABLE = re.compile(r"\+?[0-9*#]+")
# A SIP device username as the database allows it: safe in `user/<username>@<domain>`.
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# A SIP URI a DID may forward to, bridged as `sofia/<profile>/<uri>`: user@host[:port][;params],
# optionally with the sip:/sips: scheme. Nothing a bridge string treats specially
# (`,` `|` `[` `]` `{` `}` `$` quotes, spaces) can appear.
_SIP_URI = re.compile(
    r"(?:sips?:)?(?:[A-Za-z0-9._~+*#%!=-]+@)?"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
    r"(?:;[A-Za-z0-9._-]+(?:=[A-Za-z0-9._-]+)?)*"
)
# Characters that end or restructure a `[name=value,...]` block in a bridge string, or
# that FreeSWITCH would expand: dropped from per-leg variable values.
_LEG_UNSAFE = frozenset(",[]|$'\\\"{}")


def is_diallable(number: str) -> bool:
    return _DIALLABLE.fullmatch(number) is not None


def is_username(text: str) -> bool:
    return _USERNAME.fullmatch(text) is not None


def is_sip_uri(text: str) -> bool:
    return _SIP_URI.fullmatch(text) is not None


def leg_value(value: str) -> str:
    """``value`` made safe inside a dial target's ``[...]`` variables."""
    if value.isprintable() and not any(ch in _LEG_UNSAFE for ch in value):
        return value
    return "".join(ch for ch in value if ch.isprintable() and ch not in _LEG_UNSAFE)


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
