"""The XML documents: escaping against FreeSWITCH's parser and its pre-processor. Pure."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from engine.fsxml import render
from engine.fsxml.directory import a1_hash

HOSTILE = [
    "a<b&c\"d'e",
    "$${hostname}",
    "${api(system rm -rf /)}",
    '<X-PRE-PROCESS cmd="exec" data="touch /tmp/x"/>',
    "x-pre-process",
    "X-Pre-Process in the middle",
    "<include></include>",
    "<?xml?>",
    "<!-- comment",
    "line\nbreak\rand\ttab",
    "ünïcødé ☎",
    "]]>",
]


def _preprocessor_triggers(document: str) -> list[str]:
    """The raw-text patterns FreeSWITCH's pre-processor acts on (switch_xml.c, preprocess)."""
    found = []
    for line in document.splitlines()[1:]:  # the first line is our own <?xml ...?> declaration
        if "$${" in line:
            found.append("$${")
        if re.search(r"(?i)x-pre-process", line):
            found.append("x-pre-process")
        if "<include>" in line or "</include>" in line or "<?" in line:
            found.append("include/<?")
        if "<!--" in line:
            found.append("comment")
    return found


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_come_back_literally_and_trigger_nothing(value: str) -> None:
    user = render.user_element(value, [("a1-hash", value)], [("effective_caller_id_name", value)], "")
    document = render.directory_document(value, [("dial-string", value)], [user]).decode()
    assert _preprocessor_triggers(document) == []
    root = ET.fromstring(document.encode())
    domain = root.find("section/domain")
    assert domain is not None and domain.get("name") == value
    element = root.find("section/domain/users/user")
    assert element is not None and element.get("id") == value
    assert [p.get("value") for p in root.iter("param")] == [value, value]
    assert [v.get("value") for v in root.iter("variable")] == [value]


def test_control_characters_that_xml_cannot_carry_are_dropped() -> None:
    assert render.attr("a\x00b\x07c\x1fd\x7fe") == "abcde"
    escaped = render.attr("a\x01\tb")
    assert ET.fromstring(f'<x v="{escaped}"/>').get("v") == "a\tb"


def test_every_element_of_a_user_stays_on_its_own_line() -> None:
    user = render.user_element("u", [("p", "a\nb")], [("v", "c\r\nd")], "  ")
    assert all(line.strip().startswith("<") and line.strip().endswith(">") for line in user.splitlines())


def test_not_found_is_the_result_section_freeswitch_skips() -> None:
    root = ET.fromstring(render.NOT_FOUND)
    result = root.find("section[@name='result']/result")
    assert result is not None and result.get("status") == "not found"


def test_gateways_user_and_configuration_parse() -> None:
    gateway = render.gateway_element("gw-1", [("proxy", "198.51.100.1"), ("register", "false")], "")
    user = render.gateways_user_element("callgate-gateways", [gateway], "")
    root = ET.fromstring(render.gateways_document("d.example", [], user))
    # Where mod_sofia's parse_domain_tag looks (a plain <users> is never read for gateways).
    assert root.find("section/domain/users") is None
    params = root.findall("section/domain/groups/group/users/user/gateways/gateway/param")
    assert [(p.get("name"), p.get("value")) for p in params] == [
        ("proxy", "198.51.100.1"),
        ("register", "false"),
    ]
    conf = ET.fromstring(render.configuration_document('<configuration name="sofia.conf"/>'))
    assert conf.find("section[@name='configuration']/configuration") is not None


def test_a1_hash_is_rfc_2617s() -> None:
    # RFC 2617 section 3.5: HA1 of Mufasa / testrealm@host.com / "Circle Of Life"
    assert a1_hash("Mufasa", "testrealm@host.com", "Circle Of Life") == "939e7578ed9e3c518a452acee763bce9"
