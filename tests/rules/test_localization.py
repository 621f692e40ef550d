"""§4.2 rule sets: parsing (refused when saved, naming the bad pair) and semantics."""

from __future__ import annotations

import pytest

from engine.rules import RulesConfig
from engine.rules.localization import LocalizationError, parse_rules, validate_rules
from tests.rules.builders import World


@pytest.mark.parametrize(
    ("rules", "number", "expected"),
    [
        # X/Y replaces a leading X with Y
        ("00/+", "00442071234567", "+442071234567"),
        ("0/44", "02071234567", "442071234567"),
        # X/ and X/* strip a leading X
        ("00/", "00442071234567", "442071234567"),
        ("00/*", "00442071234567", "442071234567"),
        ("+/", "+442071234567", "442071234567"),
        # */Y prepends Y; */ and */* prepend nothing
        ("*/00", "442071234567", "00442071234567"),
        ("*/", "442071234567", "442071234567"),
        ("*/*", "442071234567", "442071234567"),
        # only a leading match counts: no match anywhere else
        ("44/0", "00442071234567", "00442071234567"),
        ("0/44", "442071234567", "442071234567"),
        # pairs run in sequence, each on the previous result
        ("00/,44/0", "00442071234567", "02071234567"),
        ("44/0,00/", "00442071234567", "442071234567"),
        ("0/44,44/0", "02071234567", "02071234567"),  # the second undoes the first
        ("*/9,9/8", "123", "8123"),
        # no break after a match (ASTPP applies every pair)
        ("0/,0/,0/", "000123", "123"),
        # spaces anywhere are ignored
        (" 00 / , 44 / 0 ", "00442071234567", "02071234567"),
        ("0 0/4 4", "00123", "44123"),
        # # and + are ordinary characters
        ("#31#/", "#31#12345", "12345"),
        ("", "12345", "12345"),
        ("   ", "12345", "12345"),
        # a rule may empty the number: what then happens is the caller's business
        ("123/", "123", ""),
    ],
)
def test_semantics(rules: str, number: str, expected: str) -> None:
    compiled = parse_rules(rules)
    assert compiled.apply(number) == expected
    assert compiled.trace(number)[0] == expected


def test_trace_names_each_rule_that_changed_the_number() -> None:
    result, changes = parse_rules("00/, 33/0, 44/0").trace("00442071234567")
    assert result == "02071234567"
    assert changes == [("00442071234567", "442071234567", "00/"), ("442071234567", "02071234567", "44/0")]


@pytest.mark.parametrize(
    ("rules", "position", "pair", "message"),
    [
        ("/44", 1, "/44", "the match is empty"),  # ASTPP silently stopped here
        ("00/,/44", 2, "/44", "the match is empty"),
        ("44*/", 1, "44*/", "the match must be '*' or digits"),  # ASTPP #247: not a strip
        ("00/,4a/4", 2, "4a/4", "the match must be '*' or digits"),
        ("0/4x", 1, "0/4x", "the replacement must be"),
        ("0/*4", 1, "0/*4", "the replacement must be"),
        ("0044", 1, "0044", "exactly one '/'"),
        ("0/4/4", 1, "0/4/4", "exactly one '/'"),
        ("00/,", 2, "", "empty"),
        (",00/", 1, "", "empty"),
        ("00/,,44/0", 2, "", "empty"),
        ("^00/", 1, "^00/", "the match must be"),  # no regular expressions
    ],
)
def test_malformed_sets_name_the_bad_pair(rules: str, position: int, pair: str, message: str) -> None:
    with pytest.raises(LocalizationError) as raised:
        parse_rules(rules)
    assert (raised.value.position, raised.value.pair) == (position, pair)
    assert message in str(raised.value)
    assert f"rule {position}" in str(raised.value)
    assert validate_rules(rules) == str(raised.value)


def test_validate_accepts_good_sets() -> None:
    assert validate_rules("00/, */+, 0 / 44") is None
    assert validate_rules("") is None


def test_localization_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_rules("x/y")


def test_catalog_skips_a_malformed_set_with_a_problem_entry() -> None:
    """The database refuses such sets; a snapshot that holds one anyway keeps the other sets."""
    world = World()
    uk = world.b.localization("UK", number_originate="00/,4a/4", cli_originate="0/44")
    catalog = world.catalog()
    compiled = catalog.localizations[uk.id]
    assert not compiled.number_originate  # ignored: translates nothing
    assert compiled.cli_originate.apply("0207") == "44207"
    assert len(catalog.problems) == 1
    assert "localization" in catalog.problems[0] and "'UK'" in catalog.problems[0]
    assert "number_originate" in catalog.problems[0] and "'4a/4'" in catalog.problems[0]


def test_inactive_localizations_are_not_indexed() -> None:
    world = World()
    off = world.b.localization("off", number_originate="00/", active=False)
    assert off.id not in world.catalog().localizations


def test_config_compiles_the_did_translations() -> None:
    config = RulesConfig(did_translation="00/, +/", did_caller_id_translation="0/44")
    assert config.did_rules.apply("+442071234567") == "442071234567"
    assert config.did_caller_id_rules.apply("02071234567") == "442071234567"
    assert not RulesConfig().did_rules


@pytest.mark.parametrize(
    "kwargs",
    [
        {"did_translation": "00/,/"},
        {"did_caller_id_translation": "a/b"},
        {"local_domain": "bad domain"},
        {"local_domain": "${a}${b}"},
        {"local_domain": "x|sofia/gateway/evil"},
        {"uri_profile": "ext ernal"},
        {"uri_profile": ""},
    ],
)
def test_config_rejects_bad_number_settings(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RulesConfig(**kwargs)


@pytest.mark.parametrize("domain", ["${domain_name}", "${domain}", "pbx.example.com", "10.0.0.1"])
def test_config_accepts_domains(domain: str) -> None:
    assert RulesConfig(local_domain=domain).local_domain == domain
