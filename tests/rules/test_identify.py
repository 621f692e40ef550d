"""§2: SIP device, then IP map (IPv4/IPv6, longest tech prefix, stripped), then trusted header."""

from __future__ import annotations

import pytest

from engine.decision import Accept, Reason, Reject
from engine.model import CallRequest
from engine.rules import RulesConfig
from engine.rules.identify import Identity, identify
from engine.rules.refusal import Refusal
from tests.rules.builders import World, call, run


def ip_call(destination: str, source: str) -> CallRequest:
    return call(destination, sip_auth_username="", network_ip=source)


def test_sip_device_names_the_account() -> None:
    world = World()
    identity = identify(call(), world.catalog(), RulesConfig())
    assert isinstance(identity, Identity)
    assert (identity.method, identity.account, identity.device) == ("sip_device", world.customer, world.alice)
    assert identity.destination == "442071234567"


def test_failed_device_falls_through_to_the_ip_map() -> None:
    world = World()
    world.b.ip("203.0.113.0/24", world.customer)
    identity = identify(
        call(sip_auth_username="ghost", network_ip="203.0.113.4"), world.catalog(), RulesConfig()
    )
    assert isinstance(identity, Identity) and identity.method == "ip_map"


@pytest.mark.parametrize(
    ("cidr", "source"),
    [
        ("203.0.113.0/24", "203.0.113.200"),
        ("203.0.113.7", "203.0.113.7"),  # a bare address is a /32
        ("203.0.113.0/24", "::ffff:203.0.113.9"),  # IPv4-mapped source
        ("2001:db8::/32", "2001:db8:ffff::1"),
        ("2001:db8::/32", "[2001:db8::5]"),
        ("2001:db8::1", "2001:db8::1"),  # a bare address is a /128
        ("2001:db8:0:0::/64", "2001:db8::abcd"),
    ],
)
def test_ip_map_matches_ipv4_and_ipv6(cidr: str, source: str) -> None:
    world = World()
    world.b.ip(cidr, world.customer)
    decision = run(world.catalog(), ip_call("442071234567", source))
    assert isinstance(decision, Accept), decision
    assert decision.account_id == world.customer.id


@pytest.mark.parametrize(
    ("cidr", "source"),
    [("2001:db8::/32", "2001:db9::1"), ("2001:db8::1", "2001:db8::2"), ("203.0.113.0/24", "2001:db8::1")],
)
def test_ip_map_misses(cidr: str, source: str) -> None:
    world = World()
    world.b.ip(cidr, world.customer)
    decision = run(world.catalog(), ip_call("442071234567", source))
    assert isinstance(decision, Reject) and decision.reason is Reason.AUTHENTICATION_FAIL


class Prefixed(World):
    """Three accounts on overlapping networks with tech prefixes '', '99' and '9912'."""

    def __init__(self) -> None:
        super().__init__()
        b = self.b
        self.plain = self.customer
        self.short = b.account("2002", rate_group=self.retail)
        self.long = b.account("3003", rate_group=self.retail)
        b.ip("203.0.113.0/24", self.plain)
        b.ip("203.0.113.0/24", self.short, "99")
        b.ip("203.0.0.0/16", self.long, "9912")  # wider network, longer prefix


@pytest.fixture
def prefixed() -> Prefixed:
    return Prefixed()


@pytest.mark.parametrize(
    ("dialled", "owner", "destination"),
    [
        ("9912442071234567", "long", "442071234567"),
        ("99442071234567", "short", "442071234567"),
        ("442071234567", "plain", "442071234567"),
        ("9944", "short", "44"),
    ],
)
def test_longest_tech_prefix_wins_and_is_stripped(
    prefixed: Prefixed, dialled: str, owner: str, destination: str
) -> None:
    decision = run(prefixed.catalog(), ip_call(dialled, "203.0.113.50"))
    assert isinstance(decision, Accept), decision
    assert decision.account_id == getattr(prefixed, owner).id
    assert decision.destination == destination
    assert decision.routes[0].number == destination


def test_outside_the_narrow_network_only_the_wide_entry_applies(prefixed: Prefixed) -> None:
    decision = run(prefixed.catalog(), ip_call("99442071234567", "203.0.1.1"))
    assert isinstance(decision, Reject) and decision.reason is Reason.AUTHENTICATION_FAIL
    decision = run(prefixed.catalog(), ip_call("9912442071234567", "203.0.1.1"))
    assert isinstance(decision, Accept) and decision.account_id == prefixed.long.id


def test_same_tech_prefix_goes_to_the_narrowest_network() -> None:
    world = World()
    other = world.b.account("2002", rate_group=world.retail)
    world.b.ip("203.0.0.0/16", world.customer, "7")
    world.b.ip("203.0.113.0/24", other, "7")
    decision = run(world.catalog(), ip_call("7442071234567", "203.0.113.1"))
    assert isinstance(decision, Accept) and decision.account_id == other.id


def test_ip_map_skips_entries_of_unusable_accounts() -> None:
    world = World()
    gone = world.b.account("2002", rate_group=world.retail, active=False)
    world.b.ip("203.0.113.0/24", gone, "99")  # longer prefix, but its account is inactive
    world.b.ip("203.0.113.0/24", world.customer)
    identity = identify(ip_call("99442071234567", "203.0.113.1"), world.catalog(), RulesConfig())
    assert isinstance(identity, Identity) and identity.account == world.customer
    assert identity.destination == "99442071234567"  # nothing stripped: the '' entry matched


def test_device_beats_ip_map() -> None:
    world = World()
    other = world.b.account("2002", rate_group=world.retail)
    world.b.ip("203.0.113.0/24", other)
    decision = run(world.catalog(), call(network_ip="203.0.113.1"))
    assert isinstance(decision, Accept) and decision.account_id == world.customer.id


def test_trusted_proxy_header_identifies() -> None:
    world = World()
    request = call(sip_auth_username="", network_ip="10.1.2.3", account_code_header="1001")
    decision = run(world.catalog(), request, trusted_proxies=("10.0.0.0/8", "2001:db8::/32"))
    assert isinstance(decision, Accept) and decision.account_id == world.customer.id


def test_ip_map_beats_the_header() -> None:
    world = World()
    other = world.b.account("2002", rate_group=world.retail)
    world.b.ip("10.0.0.0/8", other)
    request = call(sip_auth_username="", network_ip="10.1.2.3", account_code_header="1001")
    decision = run(world.catalog(), request, trusted_proxies=("10.0.0.0/8",))
    assert isinstance(decision, Accept) and decision.account_id == other.id


def test_header_prefers_the_undeleted_owner_of_a_reused_number() -> None:
    world = World()
    world.b.account("1001", rate_group=world.retail, deleted=True)  # an old, deleted holder of the number
    request = call(sip_auth_username="", network_ip="10.1.2.3", account_code_header="1001")
    decision = run(world.catalog(), request, trusted_proxies=("10.0.0.0/8",))
    assert isinstance(decision, Accept) and decision.account_id == world.customer.id


def test_refusal_carries_the_device_account() -> None:
    world = World()
    world.b.update(world.alice, active=False)
    refusal = identify(call(), world.catalog(), RulesConfig())
    assert isinstance(refusal, Refusal)
    assert refusal.account_id == world.customer.id
    assert refusal.reason is Reason.AUTHENTICATION_FAIL


def test_explain_names_the_ip_map_entry_and_the_header() -> None:
    world = World()
    world.b.ip("2001:db8::/32", world.customer, "99")
    decision = run(world.catalog(), ip_call("99442071234567", "2001:db8::7"), explain=True)
    assert (
        decision.steps[0].outcome
        == "account found via IP map 2001:db8::/32, tech prefix 99 stripped (account 1001)"
    )
    request = call(sip_auth_username="", network_ip="10.1.2.3", account_code_header="1001")
    decision = run(world.catalog(), request, explain=True, trusted_proxies=("10.0.0.0/8",))
    assert (
        decision.steps[0].outcome
        == "account '1001' named by the account-code header from trusted proxy 10.1.2.3"
    )
