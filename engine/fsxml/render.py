"""The XML documents callgate answers mod_xml_curl with. Pure: no I/O, no configuration objects.

FreeSWITCH runs its **pre-processor** over every mod_xml_curl answer before parsing it
(``switch_xml_parse_file`` -> ``preprocess``), line by line on the raw text: it expands
``$${name}`` to the switch's global variables, executes ``<X-PRE-PROCESS cmd=... data=...>``
(``exec`` runs a shell command), and silently drops any line that contains
``X-pre-process`` (any case) not preceded by ``<``, or ``<include>``, ``</include>`` or ``<?``.
So XML escaping alone is not enough for values FreeSWITCH must receive literally:
:func:`attr` also writes ``$`` as ``&#36;`` and breaks ``x-pre-process`` with ``&#45;``;
FreeSWITCH's parser turns the character references back into the characters, after the
pre-processor ran. Control characters other than tab, line feed and carriage return cannot be
represented in XML 1.0 and are dropped; those three are written as character references so
that every element stays on its line and attribute values keep them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

NOT_FOUND = (
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
    b'<document type="freeswitch/xml">\n'
    b'  <section name="result">\n'
    b'    <result status="not found"/>\n'
    b"  </section>\n"
    b"</document>\n"
)
"""What FreeSWITCH takes as "not served here": it tries its next binding, then its own XML."""

_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<document type="freeswitch/xml">\n'
_TAIL = "</document>\n"

_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "'": "&#39;",
    "$": "&#36;",
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}
_SPECIAL = re.compile(r"[&<>\"'$\t\n\r]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_PREPROCESS_WORD = re.compile(r"(?i)(x)-(pre)-(process)")


def attr(value: str) -> str:
    """``value`` as the content of a double-quoted XML attribute FreeSWITCH reads literally."""
    if _SPECIAL.search(value) is not None:
        value = _SPECIAL.sub(lambda m: _ESCAPES.get(m.group(0), ""), value)
    if "-" in value and _PREPROCESS_WORD.search(value) is not None:
        value = _PREPROCESS_WORD.sub(r"\1&#45;\2&#45;\3", value)
    return value


def param_lines(tag: str, pairs: Iterable[tuple[str, str]], indent: str) -> str:
    """``<param name=".." value=".."/>`` lines (or ``variable``), one per pair."""
    return "".join(f'{indent}<{tag} name="{attr(name)}" value="{attr(value)}"/>\n' for name, value in pairs)


def user_element(
    user_id: str,
    params: Sequence[tuple[str, str]],
    variables: Sequence[tuple[str, str]],
    indent: str,
    cacheable_ms: int = 0,
) -> str:
    cacheable = f' cacheable="{cacheable_ms}"' if cacheable_ms > 0 else ""
    inner = indent + "  "
    return (
        f'{indent}<user id="{attr(user_id)}"{cacheable}>\n'
        f"{inner}<params>\n{param_lines('param', params, inner + '  ')}{inner}</params>\n"
        f"{inner}<variables>\n{param_lines('variable', variables, inner + '  ')}{inner}</variables>\n"
        f"{indent}</user>\n"
    )


def gateway_element(name: str, params: Sequence[tuple[str, str]], indent: str) -> str:
    lines = param_lines("param", params, indent + "  ")
    return f'{indent}<gateway name="{attr(name)}">\n{lines}{indent}</gateway>\n'


def gateways_user_element(user_id: str, gateways: Sequence[str], indent: str) -> str:
    """A user carrying only ``<gateways>`` (what sofia parses from a profile's ``<domains>``)."""
    inner = f"{indent}  <gateways>\n{''.join(gateways)}{indent}  </gateways>\n"
    return f'{indent}<user id="{attr(user_id)}">\n{inner}{indent}</user>\n'


def directory_document(domain: str, domain_params: Sequence[tuple[str, str]], users: Sequence[str]) -> bytes:
    """One domain of the directory section with the given (rendered) users."""
    head, tail = directory_frame(domain, domain_params)
    return head + "".join(users).encode() + tail


def gateways_document(domain: str, domain_params: Sequence[tuple[str, str]], user: str) -> bytes:
    """A domain whose one user carries ``<gateways>``, where sofia reads them from a profile's
    ``<domains>``: mod_sofia's ``parse_domain_tag`` (sofia.c) looks under ``<domain><user>`` and
    under ``<domain><groups><group><users><user>``, never under the plain ``<users>`` the user
    lookups use (seen on FreeSWITCH 1.10.12: there, no gateway loaded)."""
    head = (
        _HEAD
        + '  <section name="directory">\n'
        + f'    <domain name="{attr(domain)}">\n'
        + f"      <params>\n{param_lines('param', domain_params, '        ')}      </params>\n"
        + '      <groups>\n        <group name="callgate">\n          <users>\n'
    )
    tail = "          </users>\n        </group>\n      </groups>\n    </domain>\n  </section>\n" + _TAIL
    return (head + user + tail).encode()


def directory_frame(domain: str, domain_params: Sequence[tuple[str, str]]) -> tuple[bytes, bytes]:
    """What comes before and after the users of a domain's document (the same for every user)."""
    head = (
        _HEAD
        + '  <section name="directory">\n'
        + f'    <domain name="{attr(domain)}">\n'
        + f"      <params>\n{param_lines('param', domain_params, '        ')}      </params>\n"
        + "      <users>\n"
    )
    return head.encode(), ("      </users>\n    </domain>\n  </section>\n" + _TAIL).encode()


def configuration_document(configuration_xml: str) -> bytes:
    """A configuration section around one rendered ``<configuration>`` element."""
    return (
        _HEAD + '  <section name="configuration">\n' + configuration_xml + "\n  </section>\n" + _TAIL
    ).encode()
