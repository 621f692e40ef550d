"""Directory + Answers: what FreeSWITCH is told for each lookup. Pure (no I/O)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from engine.fsxml import render
from engine.fsxml.directory import DIAL_STRING, GATEWAYS_USER, Answers, Directory, SofiaTemplate, a1_hash
from engine.fsxml.request import lookup, parse_form
from tests.fsxml import forms
from tests.fsxml.catalog import DOMAIN, GATEWAY_PASSWORDS, HOSTILE_NAME, catalog, device

ANSWERS = Answers(DOMAIN, password_of=lambda ident: GATEWAY_PASSWORDS.get(ident, ""))


def ask(body: str, directory: Directory | None = None, answers: Answers | None = None) -> bytes:
    return (answers or ANSWERS).answer(lookup(parse_form(body)), directory or Directory.build(catalog()))


def users(document: bytes) -> dict[str, ET.Element]:
    root = ET.fromstring(document)
    return {u.get("id", ""): u for u in root.iter("user")}


def params(element: ET.Element, tag: str = "param") -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in element.iter(tag)}


def test_an_existing_device_gets_its_a1_hash_and_variables_never_its_password() -> None:
    document = ask(forms.sip_auth("alice", DOMAIN))
    assert b"Wd3kM9pQs7Vx" not in document
    alice = users(document)["alice"]
    assert params(alice) == {
        "a1-hash": a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx"),
        "allow-empty-password": "false",
    }
    assert params(alice, "variable") == {
        "user_context": "public",
        "accountcode": "1000000001",
        "effective_caller_id_name": "Alice Carter",
        "effective_caller_id_number": "442079460001",
    }  # no absolute_codec_string: the device sets no codecs (the account's are for carrier legs)
    domain = ET.fromstring(document).find("section[@name='directory']/domain")
    assert domain is not None and domain.get("name") == DOMAIN
    assert params(domain.find("params")) == {"dial-string": DIAL_STRING}  # type: ignore[arg-type]


def test_the_a1_hash_is_the_snapshots_and_another_realm_finds_no_user(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The snapshot holds the hash for the configured domain only: a device that answered the
    # challenge with another realm (even one differing in case) can never match, so it is not found.
    answers = Answers(DOMAIN)
    assert users(ask(forms.sip_auth("alice", DOMAIN, realm=DOMAIN), answers=answers))
    for realm in ("other.realm", DOMAIN.upper()):
        document = ask(forms.sip_auth("alice", DOMAIN, realm=realm), answers=answers)
        assert document != render.NOT_FOUND and users(document) == {}  # the domain, without the user
    assert caplog.text.count("with a realm other than") == 1  # logged once a minute, counted
    assert "Wd3kM9pQs7Vx" not in caplog.text


def test_a_lookup_without_a_realm_gets_the_hash_for_the_domain() -> None:
    user_call = forms.form(
        "directory", "domain", "name", DOMAIN, action="user_call", user="alice", domain=DOMAIN
    )
    alice = users(ask(user_call))["alice"]
    assert params(alice)["a1-hash"] == a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx")


def test_the_domain_is_matched_without_case_and_the_user_exactly() -> None:
    assert "alice" in users(ask(forms.sip_auth("alice", DOMAIN.upper(), realm=DOMAIN)))
    assert users(ask(forms.sip_auth("Alice", DOMAIN))) == {}


def test_a_wrong_domain_is_not_found_so_freeswitch_uses_its_own_xml() -> None:
    assert ask(forms.sip_auth("alice", "other.example.com")) == render.NOT_FOUND
    assert ask(forms.sip_auth("alice", "sip.example.com.evil")) == render.NOT_FOUND


@pytest.mark.parametrize("user", ["nobody", "alice-desk", "bob", "carol", GATEWAYS_USER])
def test_an_unknown_or_unusable_user_is_absent_from_callgates_domain(user: str) -> None:
    # Authoritative: the domain is answered without the user, so FreeSWITCH refuses it (403)
    # instead of falling back to a same-named user of its own XML.
    document = ask(forms.sip_auth(user, DOMAIN))
    assert document != render.NOT_FOUND
    assert users(document) == {}


def test_a_device_without_password_cannot_authenticate() -> None:
    dave = users(ask(forms.sip_auth("dave", DOMAIN)))["dave"]
    assert params(dave) == {"allow-empty-password": "false"}  # sofia: empty password denied
    assert params(dave, "variable")["absolute_codec_string"] == "PCMA"


def test_hostile_values_reach_freeswitch_literally() -> None:
    document = ask(forms.sip_auth("eve", DOMAIN))
    assert b"$${" not in document and b"x-pre-process" not in document.lower()
    eve = users(document)["eve"]
    assert params(eve, "variable")["effective_caller_id_name"] == HOSTILE_NAME
    assert params(eve)["a1-hash"] == a1_hash("eve", DOMAIN, 'p<&>"$${pw}')


def test_a_domain_lookup_and_an_unset_domain() -> None:
    document = ask(forms.form("directory", "domain", "name", DOMAIN))
    assert users(document) == {} and b"dial-string" in document
    assert ask(forms.sip_auth("alice", DOMAIN), answers=Answers("")) == render.NOT_FOUND


def test_gateways_of_the_asking_profile_only_active_ones() -> None:
    for body in (forms.gateways("external", DOMAIN), forms.gateways("external")):
        root = ET.fromstring(ask(body))
        # The one path sofia reads a domain's gateways from (sofia.c parse_domain_tag).
        found = root.findall("section/domain/groups/group/users/user/gateways/gateway")
        assert found == list(root.iter("gateway"))
        gateways = {g.get("name"): params(g) for g in found}
        assert list(gateways) == ["alpha-gw1", "beta-gw1", "register-wins"]
        assert gateways["alpha-gw1"] == {
            "caller-id-in-from": "true",
            "ping": "30",
            "register": "false",
            "proxy": "sip1.alpha.example",
        }
        assert gateways["beta-gw1"] == {
            "register": "true",
            "proxy": "198.51.100.20",
            "username": "callgate",
            "password": "B3ta&<pw>",
        }
    carriers = ET.fromstring(ask(forms.gateways("carriers")))
    assert [g.get("name") for g in carriers.iter("gateway")] == ["gamma-gw1"]
    assert list(ET.fromstring(ask(forms.gateways("internal"))).iter("gateway")) == []
    assert ask(forms.gateways("external", "other.example")) == render.NOT_FOUND
    assert ask(forms.gateways("external"), answers=Answers(DOMAIN, serve_gateways=False)) == render.NOT_FOUND


def test_the_columns_win_over_free_form_params() -> None:
    # sofia keeps the last value of a param: the register/proxy columns come after the params
    root = ET.fromstring(ask(forms.gateways("external")))
    gateway = next(g for g in root.iter("gateway") if g.get("name") == "register-wins")
    names = [(p.get("name"), p.get("value")) for p in gateway.iter("param")]
    assert names == [("register", "true"), ("proxy", "ignored.example"), ("register", "false")]


def test_sofia_conf_from_a_template(tmp_path: Path) -> None:
    template = tmp_path / "sofia.conf.xml"
    template.write_text(
        """<configuration name="sofia.conf" description="sofia Endpoint">
  <global_settings><param name="log-level" value="0"/></global_settings>
  <profiles>
    <profile name="internal">
      <settings><param name="sip-port" value="$${internal_sip_port}"/></settings>
    </profile>
    <profile name="external">
      <gateways><gateway name="static-gw"><param name="register" value="false"/></gateway></gateways>
      <settings><param name="auth-calls" value="false"/></settings>
    </profile>
  </profiles>
</configuration>"""
    )
    answers = Answers(
        DOMAIN,
        sofia_template=SofiaTemplate.load(template),
        password_of=lambda ident: GATEWAY_PASSWORDS.get(ident, ""),
    )
    document = ask(forms.sofia_conf("external"), answers=answers)
    assert b"$${internal_sip_port}" in document  # the template's own variables are FreeSWITCH's to expand
    root = ET.fromstring(document)
    profiles = {p.get("name"): p for p in root.iter("profile")}
    assert [g.get("name") for g in profiles["external"].iter("gateway")] == [
        "static-gw",
        "alpha-gw1",
        "beta-gw1",
        "register-wins",
    ]
    assert [g.get("name") for g in profiles["internal"].iter("gateway")] == []
    assert params(profiles["external"].find("settings")) == {"auth-calls": "false"}  # type: ignore[arg-type]
    assert ask(forms.sofia_conf("external")) == render.NOT_FOUND  # no template: FreeSWITCH's own file


def test_a_template_that_is_not_sofia_conf_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text('<configuration name="acl.conf"/>')
    with pytest.raises(ValueError, match=r"sofia\.conf"):
        SofiaTemplate.load(bad)
    with pytest.raises(ValueError):
        SofiaTemplate.load(tmp_path / "missing.xml")


def test_changes_apply_in_place() -> None:
    directory = Directory.build(catalog())
    renamed = device(11, 1, "alice2", password="N3w")
    directory.apply_changes([renamed], [("sip_devices", "13"), ("rates", "x")])
    assert users(ask(forms.sip_auth("alice", DOMAIN), directory)) == {}
    alice2 = users(ask(forms.sip_auth("alice2", DOMAIN), directory))["alice2"]
    assert params(alice2)["a1-hash"] == a1_hash("alice2", DOMAIN, "N3w")
    directory.apply_changes([device(30, 4, "frank", password="f")], [("accounts", "1"), ("gateways", "21")])
    assert users(ask(forms.sip_auth("alice2", DOMAIN), directory)) == {}  # its account is gone
    assert "frank" in users(ask(forms.sip_auth("frank", DOMAIN), directory))
    assert [g.name for g in directory.gateways_of("external")] == ["beta-gw1", "register-wins"]
    with pytest.raises(ValueError):
        directory.apply_changes([], [("sip_devices", "not-an-id")])


def test_a_hostile_username_is_escaped_in_the_answer() -> None:
    hostile = 'x<&"y$${z}'
    directory = Directory.build(catalog())
    directory.apply_changes([device(40, 4, hostile, password="pw")], [])
    document = ask(forms.sip_auth(hostile, DOMAIN), directory)
    assert b"$${" not in document
    assert params(users(document)[hostile])["a1-hash"] == a1_hash(hostile, DOMAIN, "pw")


def test_a_username_held_twice_is_served_from_the_lower_id_then_the_other() -> None:
    # the database forbids it; the index must still stay consistent if a snapshot ever had it
    directory = Directory(
        [device(7, 4, "twin", password="seven"), device(3, 4, "twin", password="three")],
        catalog().accounts,
    )
    assert params(users(ask(forms.sip_auth("twin", DOMAIN), directory))["twin"])["a1-hash"] == a1_hash(
        "twin", DOMAIN, "three"
    )
    directory.apply_changes([], [("sip_devices", "3")])
    assert params(users(ask(forms.sip_auth("twin", DOMAIN), directory))["twin"])["a1-hash"] == a1_hash(
        "twin", DOMAIN, "seven"
    )
    directory.apply_changes([], [("sip_devices", "7")])
    assert users(ask(forms.sip_auth("twin", DOMAIN), directory)) == {}
