"""mod_xml_curl's form -> Lookup, on bodies shaped as FreeSWITCH builds them. Pure."""

from __future__ import annotations

import pytest

from engine.fsxml.request import BadRequest, Kind, lookup, parse_form
from tests.fsxml import forms


def test_sip_auth_lookup() -> None:
    request = lookup(parse_form(forms.sip_auth("alice", "sip.example.com", realm="sip.example.com")))
    assert (request.kind, request.domain, request.user, request.action) == (
        Kind.USER,
        "sip.example.com",
        "alice",
        "sip_auth",
    )
    assert request.realm == "sip.example.com" and request.ip == "198.51.100.9"


def test_user_call_with_merged_call_variables_reads_freeswitchs_own_fields() -> None:
    # user_outgoing_channel merges the call's variables first (a variable may be called "user" or
    # "domain"), then switch_xml_locate_user appends key, user, domain; key_value names the domain.
    body = forms.form(
        "directory",
        "domain",
        "name",
        "sip.example.com",
        as_channel="true",
        action="user_call",
        user="mallory",
        domain="evil.example",
        key="id",
    )
    body += "&user=bob&domain=sip.example.com"
    request = lookup(parse_form(body))
    assert (request.kind, request.user, request.domain, request.action) == (
        Kind.USER,
        "bob",
        "sip.example.com",
        "user_call",
    )


def test_domain_gateways_and_configuration_lookups() -> None:
    assert (
        lookup(parse_form(forms.form("directory", "domain", "name", "sip.example.com"))).kind is Kind.DOMAIN
    )
    gateways = lookup(parse_form(forms.gateways("external", "sip.example.com")))
    assert (gateways.kind, gateways.profile, gateways.domain) == (
        Kind.GATEWAYS,
        "external",
        "sip.example.com",
    )
    every_domain = lookup(parse_form(forms.gateways("external")))
    assert (every_domain.kind, every_domain.domain) == (Kind.GATEWAYS, "")
    sofia = lookup(parse_form(forms.sofia_conf("internal")))
    assert (sofia.kind, sofia.profile) == (Kind.SOFIA_CONF, "internal")


@pytest.mark.parametrize(
    "body",
    [
        forms.form("configuration", "configuration", "name", "acl.conf"),
        forms.form("dialplan", "", "", "", **{"Caller-Destination-Number": "1000"}),
        forms.form("directory", "domain", "name", "sip.example.com", purpose="network-list"),
        forms.form("directory", "", "", ""),  # a walk of the whole directory
        forms.form("chatplan"),
        "",
    ],
)
def test_what_callgate_does_not_serve(body: str) -> None:
    assert lookup(parse_form(body)).kind is Kind.OTHER


def test_a_body_that_is_not_utf8_form_text_is_refused() -> None:
    with pytest.raises(BadRequest):
        parse_form("user=%ff%fe")
