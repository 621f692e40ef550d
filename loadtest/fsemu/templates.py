"""Header templates derived from the FreeSWITCH captures.

Two data files sit next to this module:

``channel_data_template.txt``
    The CHANNEL_DATA block FreeSWITCH sends in reply to ``connect``: the 165 headers
    of ``connect_reply_raw.txt`` in wire order, with the per-call values replaced by
    ``${parameter}``.
``event_template.txt``
    The header blocks events are made of, the layout of each event type, and the
    channel variables FreeSWITCH sets at each step of a call.

Values in both files are written as on the wire (percent-encoded).  Rendering
substitutes the percent-encoded parameter values and decodes the result, so the
emulator works on plain strings and ``wire.serialize_event`` re-encodes them; the
round trip gives back the captured bytes exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template

from .wire import fs_urldecode, fs_urlencode

__all__ = [
    "CHANNEL_DATA_PARAMETERS",
    "EventDef",
    "TemplateLine",
    "apply_vars",
    "channel_data_lines",
    "event_defs",
    "render_channel_data",
    "render_event",
    "sections",
    "var_groups",
]

_HERE = Path(__file__).resolve().parent
CHANNEL_DATA_FILE = _HERE / "channel_data_template.txt"
EVENT_FILE = _HERE / "event_template.txt"

#: Parameters ``channel_data_template.txt`` uses (all must be given to render it).
CHANNEL_DATA_PARAMETERS = (
    "core_uuid",
    "hostname",
    "switchname",
    "ipv4",
    "ipv6",
    "date_local",
    "date_gmt",
    "date_ts",
    "seq",
    "from_user",
    "cid_name",
    "cid_number",
    "caller_ip",
    "caller_port",
    "dest",
    "uuid",
    "channel_name",
    "created_us",
    "session_id",
    "call_id",
    "sip_authorized",
    "sip_auth_username",
    "sip_auth_realm",
    "from_tag",
    "fs_sip_ip",
    "fs_sip_port",
    "via_branch",
    "media_port",
    "socket_data",
    "socket_host",
    "socket_mode",
    "control",
)

_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class TemplateLine:
    """``Name: value`` of a template; ``optional`` lines vanish when the value is empty."""

    name: str
    value: str
    optional: bool = False
    unset: bool = False  # "!name" in a vars group
    marker: str = ""  # "@extra_variables"

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(_PLACEHOLDER.findall(self.value))

    def render(self, encoded: Mapping[str, str]) -> str:
        """The decoded value, ``encoded`` holding percent-encoded parameter values."""
        parts = _split_value(self.value)
        if len(parts) == 1:
            return _decoded_constant(self.value)
        # parts alternate literal, parameter name, literal, ...
        text = "".join(encoded[p] if i % 2 else p for i, p in enumerate(parts))
        return fs_urldecode(text) if "%" in text else text

    def render_name(self, prefix: str | None) -> str:
        if "${" in self.name:
            return _prefixed_name(self.name, prefix or "")
        return self.name


@cache
def _split_value(value: str) -> tuple[str, ...]:
    return tuple(_PLACEHOLDER.split(value))


@cache
def _prefixed_name(name: str, prefix: str) -> str:
    return Template(name).substitute(P=prefix)


@cache
def _decoded_constant(value: str) -> str:
    return fs_urldecode(value)


def _parse_line(line: str) -> TemplateLine:
    if line.startswith("@"):
        return TemplateLine(name="", value="", marker=line[1:].strip())
    if line.startswith("!"):
        return TemplateLine(name=line[1:].strip(), value="", unset=True)
    optional = line.startswith("?")
    if optional:
        line = line[1:]
    name, sep, value = line.partition(": ")
    if not sep:
        raise ValueError(f"bad template line: {line!r}")
    return TemplateLine(name=name, value=value, optional=optional)


def _content_lines(path: Path) -> Iterable[str]:
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        yield raw


@cache
def channel_data_lines() -> tuple[TemplateLine, ...]:
    return tuple(_parse_line(ln) for ln in _content_lines(CHANNEL_DATA_FILE))


@dataclass(frozen=True)
class EventDef:
    name: str
    calling_file: str
    calling_function: str
    calling_line: str
    layout: tuple[str, ...]


_Lines = tuple[TemplateLine, ...]


@cache
def _event_file() -> tuple[dict[str, _Lines], dict[str, EventDef], dict[str, _Lines]]:
    secs: dict[str, list[TemplateLine]] = {}
    events: dict[str, dict[str, str]] = {}
    groups: dict[str, list[TemplateLine]] = {}
    current: list[TemplateLine] | dict[str, str] | None = None
    for ln in _content_lines(EVENT_FILE):
        m = re.fullmatch(r"\[(section|event|vars) ([A-Za-z0-9_]+)\]", ln.strip())
        if m:
            kind, name = m.groups()
            if kind == "section":
                current = secs.setdefault(name, [])
            elif kind == "vars":
                current = groups.setdefault(name, [])
            else:
                current = events.setdefault(name, {})
            continue
        if current is None:
            raise ValueError(f"line outside a section in {EVENT_FILE.name}: {ln!r}")
        if isinstance(current, dict):
            k, _, v = ln.partition(": ")
            current[k] = v
        else:
            current.append(_parse_line(ln))
    defs = {
        name: EventDef(
            name=name,
            calling_file=d["Event-Calling-File"],
            calling_function=d["Event-Calling-Function"],
            calling_line=d["Event-Calling-Line-Number"],
            layout=tuple(d["layout"].split()),
        )
        for name, d in events.items()
    }
    return (
        {k: tuple(v) for k, v in secs.items()},
        defs,
        {k: tuple(v) for k, v in groups.items()},
    )


def sections() -> dict[str, tuple[TemplateLine, ...]]:
    return _event_file()[0]


def event_defs() -> dict[str, EventDef]:
    return _event_file()[1]


def var_groups() -> dict[str, tuple[TemplateLine, ...]]:
    return _event_file()[2]


class Encoded(dict):
    """Parameters already percent-encoded (see :func:`encode_params`)."""


def encode_params(params: Mapping[str, object], base: Mapping[str, str] | None = None) -> Encoded:
    """Percent-encode parameter values; ``base`` (already encoded) is copied first.
    An :class:`Encoded` mapping is returned as is."""
    if isinstance(params, Encoded) and base is None:
        return params
    out = Encoded(base or {})
    for k, v in params.items():
        out[k] = v if isinstance(params, Encoded) else fs_urlencode("" if v is None else str(v))
    return out


def render_lines(
    lines: Iterable[TemplateLine], encoded: Mapping[str, str], *, prefix: str | None = None
) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for tl in lines:
        if tl.marker or tl.unset:
            continue
        value = tl.render(encoded)
        if tl.optional and value == "":
            continue
        out.append((tl.render_name(prefix), value))
    return out


def render_channel_data(
    params: Mapping[str, object], extra_variables: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """The CHANNEL_DATA headers (decoded values), in wire order."""
    encoded = encode_params(params)
    out: list[tuple[str, str]] = []
    extra = [(f"variable_{k}", v) for k, v in extra_variables]
    for tl in channel_data_lines():
        if tl.marker == "extra_variables":
            out.extend(extra)
            continue
        value = tl.render(encoded)
        if tl.optional and value == "":
            continue
        out.append((tl.name, value))
    return out


def render_event(
    event_name: str,
    params: Mapping[str, object],
    *,
    caller: Mapping[str, object],
    other: Mapping[str, object] | None = None,
    variables: Mapping[str, str] | None = None,
) -> list[tuple[str, str]]:
    """Headers of one event (decoded values) following its layout in event_template.txt.

    ``params`` feeds the head/channel/bridge/application blocks, ``caller`` the
    ``Caller-`` profile, ``other`` the ``Other-Leg-`` profile (left out when None) and
    ``variables`` the ``variable_*`` headers."""
    d = event_defs()[event_name]
    secs = sections()
    enc = encode_params(
        {
            "event_name": event_name,
            "calling_file": d.calling_file,
            "calling_function": d.calling_function,
            "calling_line": d.calling_line,
        },
        base=encode_params(params),
    )
    out: list[tuple[str, str]] = []
    for part in d.layout:
        if part == "caller":
            out += render_lines(secs["profile"], encode_params(caller), prefix="Caller")
        elif part == "other":
            if other is not None:
                out += render_lines(secs["other"], enc)
                out += render_lines(secs["profile"], encode_params(other), prefix="Other-Leg")
        elif part == "vars":
            if variables:
                out += [(f"variable_{k}", v) for k, v in variables.items()]
        else:
            out += render_lines(secs[part], enc)
    return out


def apply_vars(variables: MutableMapping[str, str], group: str, params: Mapping[str, object]) -> None:
    """Apply a ``[vars group]`` to a channel's variables: set (moving to the end), or unset
    for ``!name`` and for optional lines that render empty."""
    enc = encode_params(params)
    for tl in var_groups()[group]:
        if tl.unset:
            variables.pop(tl.name, None)
            continue
        value = tl.render(enc)
        variables.pop(tl.name, None)
        if tl.optional and value == "":
            continue
        variables[tl.name] = value
