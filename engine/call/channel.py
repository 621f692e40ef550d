"""From FreeSWITCH's decoded CHANNEL_DATA headers to the rules' CallRequest."""

from __future__ import annotations

from collections.abc import Mapping

from engine.esl.protocol import decode_value
from engine.model import CallRequest

ACCOUNT_CODE_HEADER = "variable_sip_h_P-Accountcode"


def _first(headers: Mapping[str, str], *names: str) -> str:
    """The first non-empty value among `names`, percent-decoded (only the headers used are decoded)."""
    for name in names:
        raw = headers.get(name)
        if raw:
            value = decode_value(raw)
            if value:
                return value
    return ""


# FreeSWITCH expands ${...} (and runs ${api(...)}) in application arguments, and the dial
# string gives meaning to [ ] { } | and ','; none of these may come from a caller.
UNSAFE_CHARACTERS = frozenset("${}[]|,'\"\\")


def _printable(value: str) -> str:
    """Caller-supplied SIP data reduced to printable characters that carry no FreeSWITCH syntax."""
    if value.isprintable() and UNSAFE_CHARACTERS.isdisjoint(value):
        return value  # the usual case, without rebuilding the string
    return "".join(ch for ch in value if ch.isprintable() and ch not in UNSAFE_CHARACTERS)


def call_request(headers: Mapping[str, str]) -> CallRequest:
    """`headers` as received in the connect reply (still percent-encoded)."""
    return CallRequest(
        uuid=_printable(_first(headers, "Unique-ID", "variable_uuid", "Channel-Unique-ID")),
        destination=_first(headers, "Caller-Destination-Number", "Channel-Destination-Number"),
        caller_id_number=_printable(
            _first(headers, "variable_effective_caller_id_number", "Caller-Caller-ID-Number")
        ),
        caller_id_name=_printable(
            _first(headers, "variable_effective_caller_id_name", "Caller-Caller-ID-Name")
        ),
        sip_auth_username=_printable(_first(headers, "variable_sip_auth_username")),
        network_ip=_printable(_first(headers, "variable_sip_network_ip", "Caller-Network-Addr")),
        account_code_header=_printable(_first(headers, ACCOUNT_CODE_HEADER)),
        switch_hostname=_printable(_first(headers, "FreeSWITCH-Hostname")),
    )
