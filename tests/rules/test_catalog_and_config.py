"""Catalog.build indexes and RulesConfig validation."""

from __future__ import annotations

from decimal import Decimal

import pytest

from engine.decision import DEFAULT_SIP_RESPONSES, Reason
from engine.model import CatalogData
from engine.rules import Catalog, RulesConfig
from engine.rules.catalog import longest_prefix, parse_ip
from tests.rules.builders import World


def test_bad_cidr_is_reported_not_fatal() -> None:
    world = World()
    world.b.ip("300.1.2.3/24", world.customer)
    world.b.ip("203.0.113.0/24", world.customer)
    catalog = world.catalog()
    assert len(catalog.problems) == 1 and "300.1.2.3/24" in catalog.problems[0]
    address = parse_ip("203.0.113.1")
    assert address is not None
    assert catalog.ip_map_match(address, "44") is not None


def test_inactive_rates_are_not_indexed() -> None:
    world = World()
    world.b.rate(world.retail, "4420", "1", active=False)
    world.b.termination(world.carrier_a, "4420", "1", active=False)
    catalog = world.catalog()
    assert set(catalog.group_rates[world.retail.id]) == {"44"}
    assert set(catalog.termination_rates[world.carrier_a.id]) == {"44"}
    assert catalog.longest_origination_prefix == 2


def test_longest_prefix() -> None:
    table = {"": "any", "4": "four", "442": "uk-london"}
    assert longest_prefix(table, "44207", 3) == "uk-london"
    assert longest_prefix(table, "4410", 3) == "four"
    assert longest_prefix(table, "33", 3) == "any"
    assert longest_prefix({"44": 1}, "33", 2) is None
    assert longest_prefix(table, "44207", 1) == "four"  # longer keys cannot exist: not tried


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.1", "203.0.113.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("x", None),
    ],
)
def test_parse_ip(text: str, expected: str | None) -> None:
    parsed = parse_ip(text)
    assert (str(parsed) if parsed else None) == expected


def test_empty_catalog_builds() -> None:
    catalog = Catalog.build(CatalogData())
    assert catalog.accounts == {} and catalog.problems == ()


def test_large_rate_table_builds_and_looks_up() -> None:
    world = World()
    for n in range(20000):
        world.b.rate(world.retail, f"44{n:05d}", Decimal("0.01"))
    catalog = world.catalog()
    assert len(catalog.group_rates[world.retail.id]) == 20001
    found = longest_prefix(catalog.group_rates[world.retail.id], "4400042999", 7)
    assert found is not None and found.prefix == "4400042"


def test_config_defaults() -> None:
    config = RulesConfig()
    assert (config.call_max_length, config.max_free_length, config.default_leg_timeout) == (6000, 6000, 60)
    assert config.trusted_proxies == () and config.trusted_networks == ()
    assert config.sip_response(Reason.NO_SUFFICIENT_FUND) == (402, "Payment Required")


def test_config_sip_response_override_falls_back_per_reason() -> None:
    config = RulesConfig(sip_responses={Reason.NO_SUFFICIENT_FUND: (403, "Forbidden")})
    assert config.sip_response(Reason.NO_SUFFICIENT_FUND) == (403, "Forbidden")
    assert config.sip_response(Reason.CPS_LIMIT) == DEFAULT_SIP_RESPONSES[Reason.CPS_LIMIT]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trusted_proxies": ("10.0.0.0/33",)},
        {"trusted_proxies": "10.0.0.0/8"},
        {"call_max_length": 0},
        {"default_leg_timeout": -1},
        {"sip_responses": {Reason.CPS_LIMIT: (200, "OK")}},
        {"sip_responses": {Reason.CPS_LIMIT: (503, "Busy\r\nX: y")}},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        RulesConfig(**kwargs)


def test_trusted_proxies_are_compiled() -> None:
    # a list (as a config file gives it) is accepted and stored as a tuple
    config = RulesConfig(trusted_proxies=["10.0.0.1", " 2001:db8::/32 "])  # type: ignore[arg-type]
    assert config.trusted_proxies == ("10.0.0.1", " 2001:db8::/32 ")
    assert [str(n) for n in config.trusted_networks] == ["10.0.0.1/32", "2001:db8::/32"]
