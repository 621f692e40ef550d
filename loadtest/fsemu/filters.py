"""mod_event_socket's ``filter`` command and its event filters, as FreeSWITCH 1.10.12 does them.

Shared by the emulator (loadtest.fsemu) and the load driver's switch model (loadtest.driver),
so that both answer and filter exactly alike. From ``mod_event_socket.c``:

``parse_command``, ``filter <header> <value>``:

* the line is cut at its first CR or LF (``strip_cr``), the spaces after ``filter `` are
  skipped, and the first remaining space splits the header name from the value (the value is
  the rest of the line, spaces and all; no space: no value);
* ``filter delete <name> [<value>]`` removes the filters on ``name`` (case-insensitive), only
  those whose value is exactly ``<value>`` when one is given (``switch_event_del_header_val``);
  ``filter delete all`` removes every filter. Reply ``+OK filter deleted. [<name>][<value>]``;
* ``filter add <name> <value>`` is ``filter <name> <value>``;
* the filter is appended (several filters may name the same header). An empty value adds
  nothing and removes the filters on that name (``switch_event_base_add_header`` deletes a
  header given an empty value). Reply ``+OK filter added. [<name>]=[<value>]``; after
  ``add <name>`` without a value nothing is added and glibc prints the NULL as ``(null)``;
* no value at all (``filter Event-Name``): ``-ERR invalid syntax``.

``event_handler``, for each event the listener is subscribed to, before the ``myevents``
UUID check: with at least one filter, the event is sent only if a positive filter matches
and no negative one does. A filter matches when the event has the header (name compared
case-insensitively) and its value equals the filter's, case-insensitively. A value's
leading ``+``/``-``/spaces set the sign (the last sign wins; ``+`` by default) and are
skipped; a value that *starts* with ``/`` is a PCRE (``/re/flags``, ``i`` and ``s``), matched
anywhere in the header's value. With only negative filters nothing is ever sent. Command
replies, ``api/response`` frames and disconnect notices are not events: never filtered.

Not modelled (the engine never sends them, and an emulator must not pretend): header names
with an ``[index]`` and ``ARRAY::`` values, which FreeSWITCH stores as arrays. They raise
:class:`UnsupportedFilter`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["EventFilters", "UnsupportedFilter"]


class UnsupportedFilter(ValueError):
    """A filter the emulators do not model (see the module doc)."""


class EventFilters:
    """One listener's filters (``listener->filters``), in the order they were added."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: list[tuple[str, str]] = []

    def __bool__(self) -> bool:
        return bool(self.entries)

    def command(self, line: str) -> str:
        """Run ``filter ...`` (the command's first line, ``filter `` included, any case);
        returns FreeSWITCH's reply text."""
        rest = line[7:]
        for stop in ("\r", "\n"):  # strip_cr: the first CR, else the first LF
            at = rest.find(stop)
            if at >= 0:
                rest = rest[:at]
                break
        name = rest.lstrip(" ")
        value: str | None
        name, space, value = name.partition(" ")
        if not space:
            value = None
        if name.lower() == "delete" and value is not None:
            name, space, rest_value = value.partition(" ")
            value = rest_value if space else None
            if name.lower() == "all":
                self.entries.clear()
            else:
                self._delete(name, value)
            return f"+OK filter deleted. [{name}][{value or ''}]"
        if value is None:
            return "-ERR invalid syntax"
        if name.lower() == "add":
            name, space, rest_value = value.partition(" ")
            value = rest_value if space else None
        if value is None:  # switch_event_add_header_string(NULL): nothing added
            return f"+OK filter added. [{name}]=[(null)]"
        if "[" in name or value.startswith("ARRAY::"):
            raise UnsupportedFilter(f"filter {name} {value}: arrays are not modelled")
        if value:
            self.entries.append((name, value))
        else:  # an empty value deletes the header (switch_event_base_add_header)
            self._delete(name, None)
        return f"+OK filter added. [{name}]=[{value}]"

    def _delete(self, name: str, value: str | None) -> None:
        low = name.lower()
        self.entries = [
            (n, v) for n, v in self.entries if not (n.lower() == low and (not value or v == value))
        ]

    def passes(self, header: Callable[[str], str | None]) -> bool:
        """Whether an event with these headers is sent. ``header(name)``: the event's (decoded)
        value of ``name`` looked up case-insensitively, None when absent."""
        if not self.entries:
            return True
        send = False
        for name, value in self.entries:
            have = header(name)
            if have is None:
                continue
            positive = True
            at = 0
            while at < len(value):
                ch = value[at]
                if ch == "+":
                    positive = True
                elif ch == "-":
                    positive = False
                elif ch != " ":
                    break
                at += 1
            if send and positive:
                continue
            wanted = value[at:]
            matched = _regex_match(have, wanted) if value.startswith("/") else have.lower() == wanted.lower()
            if matched:
                if not positive:
                    return False
                send = True
        return send


def _regex_match(value: str, expression: str) -> bool:
    """``switch_regex_perform`` for ``/re/flags``: flags ``i`` and ``s``; no closing ``/`` or a
    pattern that does not compile matches nothing. (Python's ``re`` stands in for PCRE.)"""
    body = expression[1:]
    end = body.rfind("/")
    if end < 0:
        return False
    pattern, options = body[:end], body[end + 1 :]
    flags = (re.IGNORECASE if "i" in options else 0) | (re.DOTALL if "s" in options else 0)
    try:
        return re.search(pattern, value, flags) is not None
    except re.error:
        return False


def header_lookup(headers: list[tuple[str, str]]) -> Callable[[str], str | None]:
    """``header(name)`` over an event's (name, value) list: the first of that name, as
    ``switch_event_get_header`` finds it."""
    table: dict[str, str] = {}
    for name, value in headers:
        table.setdefault(name.lower(), value)
    return lambda name: table.get(name.lower())
