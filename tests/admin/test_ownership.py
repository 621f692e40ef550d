"""Identification data is never claimed across tenants: the rule (pure), the service (409/403)
and the snapshot (the newer conflicting entry left out), for every kind of identification data.
"""

from __future__ import annotations

import ipaddress
import random
from decimal import Decimal
from typing import Any, cast

import psycopg
import pytest
import redis

from engine.config import load_config
from engine.db import ownership
from engine.model import Account, AccountKind, CallerId, CatalogData, Did, ForcedCallerId, IpMapEntry
from engine.state.keys import entity_hash_key
from engine.state.snapshot import current_version
from engine.sync import publish_once
from tests.admin.conftest import customer_body

# --------------------------------------------------------------------------- the rule, pure

ADMIN_C, TOP_R, SUB_R, SUB_C, TOP_C, OTHER_R, OTHER_C = 1, 2, 3, 4, 5, 6, 7


def _account(id: int, kind: str, reseller: int | None) -> Account:
    return Account(
        id=id,
        number=str(1000 + id),
        kind=AccountKind(kind),
        reseller_id=reseller,
        active=True,
        deleted=False,
        postpaid=False,
        balance=Decimal(1),
        credit_limit=Decimal(0),
        rate_group_id=None,
    )


ACCOUNTS = [
    _account(ADMIN_C, "customer", None),
    _account(TOP_R, "reseller", None),
    _account(SUB_R, "reseller", TOP_R),
    _account(SUB_C, "customer", SUB_R),
    _account(TOP_C, "customer", TOP_R),
    _account(OTHER_R, "reseller", None),
    _account(OTHER_C, "customer", OTHER_R),
]


def test_tenants_are_top_level_resellers_and_the_admin():
    assert ownership.tenants(ACCOUNTS) == {
        ADMIN_C: None,
        TOP_R: TOP_R,
        SUB_R: TOP_R,
        SUB_C: TOP_R,
        TOP_C: TOP_R,
        OTHER_R: OTHER_R,
        OTHER_C: OTHER_R,
    }


@pytest.mark.parametrize(
    ("a", "b", "conflict"),
    [
        (("198.51.100.7/32", "99"), ("198.51.100.7/32", "99"), True),  # the reported hijack
        (("198.51.100.0/24", "99"), ("198.51.100.7/32", "99"), True),  # a narrower network wins the lookup
        (("198.51.100.0/24", "99"), ("198.51.100.7", "9"), True),  # "9" starts "99"
        (("198.51.100.0/24", ""), ("198.51.100.7/32", "44"), True),  # "" starts everything
        (("0.0.0.0/0", "1"), ("203.0.113.9/32", "12"), True),  # the wide entry of the report
        (("198.51.100.0/24", "77"), ("198.51.100.7/32", "99"), False),  # no destination matches both
        (("198.51.100.0/25", "99"), ("198.51.100.128/25", "99"), False),  # disjoint networks
        (("0.0.0.0/0", ""), ("::/0", ""), False),  # IPv4 and IPv6 never overlap
        (("2001:db8::/32", "5"), ("2001:db8:1::1", "5"), True),
    ],
)
def test_ip_claims_conflict_when_some_call_matches_both(a, b, conflict):
    assert ownership.ip_claims_conflict(*a, *b) is conflict
    assert ownership.ip_claims_conflict(*b, *a) is conflict


def test_too_wide_for_a_reseller():
    assert ownership.too_wide_for_reseller("0.0.0.0/0")
    assert ownership.too_wide_for_reseller("10.0.0.0/23")
    assert not ownership.too_wide_for_reseller("10.0.0.0/24")
    assert ownership.too_wide_for_reseller("2001:db8::/47")
    assert not ownership.too_wide_for_reseller("2001:db8::/48")


def _data(**lists: Any) -> CatalogData:
    return CatalogData(accounts=list(ACCOUNTS), **lists)


def test_snapshot_drops_the_newer_of_two_tenants_conflicting_ip_entries():
    data = _data(
        ip_map=[
            IpMapEntry(id=10, account_id=ADMIN_C, cidr="198.51.100.0/24", tech_prefix="99"),
            IpMapEntry(id=11, account_id=TOP_C, cidr="198.51.100.7/32", tech_prefix="99"),  # hijack
            IpMapEntry(id=12, account_id=SUB_C, cidr="198.51.100.7/32", tech_prefix="77"),  # other prefix
            IpMapEntry(id=13, account_id=OTHER_C, cidr="0.0.0.0/0", tech_prefix="1"),  # too wide
            IpMapEntry(id=14, account_id=ADMIN_C, cidr="203.0.113.9/32", tech_prefix="12"),  # newer than 13
            IpMapEntry(id=15, account_id=TOP_C, cidr="203.0.113.0/24", tech_prefix="5"),
            IpMapEntry(id=16, account_id=SUB_C, cidr="203.0.113.5/32", tech_prefix="5"),  # same tenant
        ]
    )
    cleaned, conflicts = ownership.drop_conflicts(data)
    assert [e.id for e in cleaned.ip_map] == [10, 12, 13, 15, 16]
    assert [(c.key, c.kept_key) for c in conflicts] == [("11", "10"), ("14", "13")]
    assert "198.51.100.7/32 tech prefix '99'" in str(conflicts[0])
    # the older owner wins: had the wide entry come last, it would be the one dropped
    late = _data(
        ip_map=[*data.ip_map[:2], IpMapEntry(id=99, account_id=OTHER_C, cidr="0.0.0.0/0", tech_prefix="")]
    )
    assert [c.key for c in ownership.find_conflicts(late)] == ["11", "99"]


def test_a_dropped_entry_blocks_nothing():
    data = _data(
        ip_map=[
            IpMapEntry(id=1, account_id=ADMIN_C, cidr="10.0.0.1/32", tech_prefix="9"),
            IpMapEntry(id=2, account_id=OTHER_C, cidr="10.0.0.0/24", tech_prefix=""),  # dropped (id 1)
            IpMapEntry(id=3, account_id=TOP_C, cidr="10.0.0.2/32", tech_prefix="4"),  # only 2 overlaps it
        ]
    )
    assert [c.key for c in ownership.find_conflicts(data)] == ["2"]


def test_snapshot_drops_numbers_claimed_by_another_tenant():
    data = _data(
        dids=[
            Did(id=1, number="442071110001", account_id=ADMIN_C),
            Did(id=2, number="442071110002", account_id=None),
        ],
        caller_ids=[
            CallerId(id=1, account_id=TOP_C, number="442071110001"),  # another tenant's DID
            CallerId(id=2, account_id=TOP_C, number="442071110002"),  # an unassigned DID: free
            CallerId(id=3, account_id=OTHER_C, number="442071110002"),  # newer, another tenant
            CallerId(id=4, account_id=SUB_C, number="442071110002"),  # same tenant as id 2
        ],
        forced_caller_ids=[
            ForcedCallerId(account_id=OTHER_C, number="442071110001"),
            ForcedCallerId(account_id=SUB_C, number="442079460000"),
        ],
    )
    cleaned, conflicts = ownership.drop_conflicts(data)
    assert [c.id for c in cleaned.caller_ids] == [2, 4]
    assert [f.account_id for f in cleaned.forced_caller_ids] == [SUB_C]
    assert [(c.entity, c.key, c.kept_entity, c.kept_key) for c in conflicts] == [
        ("caller_ids", "1", "dids", "1"),
        ("caller_ids", "3", "caller_ids", "2"),
        ("forced_caller_ids", str(OTHER_C), "dids", "1"),
    ]
    assert cleaned.dids == data.dids  # a DID is never dropped


def test_overlap_sweep_finds_the_same_pairs_as_comparing_every_pair():
    rng = random.Random(7)
    entries = []
    for i in range(300):
        length = rng.choice([8, 16, 20, 24, 28, 30, 32])
        address = ipaddress.ip_address(f"10.{rng.randrange(4)}.{rng.randrange(4)}.{rng.randrange(256)}")
        net = ipaddress.ip_network(f"{address}/{length}", strict=False)
        entries.append(IpMapEntry(id=i, account_id=1, cidr=str(net)))
    swept = {frozenset((a.id, b.id)) for a, b in ownership._overlapping_pairs(entries)}
    brute = {
        frozenset((a.id, b.id))
        for i, a in enumerate(entries)
        for b in entries[i + 1 :]
        if ipaddress.ip_network(a.cidr).overlaps(ipaddress.ip_network(b.cidr))
    }
    assert swept == brute


# --------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def tenants_api(api, service, db_url):
    """Customers of the admin, of a reseller, of its sub-reseller and of another reseller."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO rate_groups (name, reseller_id) SELECT 'other-retail', id FROM accounts"
            " WHERE number = '2200000001' ON CONFLICT DO NOTHING"
        )
    groups = {"2100000001": "acme-retail", "2100000002": "sub-retail", "2200000001": "other-retail"}
    for number, reseller, email in (
        ("8600000001", None, "own1@tenant.example"),
        ("8600000002", "2100000001", "top@tenant.example"),
        ("8600000003", "2100000002", "sub@tenant.example"),
        ("8600000004", "2200000001", "other@tenant.example"),
        ("8600000005", "2100000001", "top2@tenant.example"),
    ):
        body = customer_body(number=number, email=email)
        if reseller:
            body.update(reseller=reseller, rate_group=groups[reseller])
        response = api.post("/customers", json=body)
        assert response.status_code == 201, response.body
    tokens = {
        "top": api.as_token(service.create_token("own-top", reseller="2100000001")[1]),
        "sub": api.as_token(service.create_token("own-sub", reseller="2100000002")[1]),
        "other": api.as_token(service.create_token("own-other", reseller="2200000001")[1]),
        "admin": api,
    }
    assert (
        api.post(
            "/customers/8600000001/ip-map", json={"cidr": "198.51.100.0/24", "tech_prefix": "99"}
        ).status_code
        == 201
    )
    assert api.post("/customers/8600000001/dids", json={"number": "442071110001"}).status_code == 201
    assert (
        api.post("/customers/8600000001/sip-devices", json={"username": "own-admin-dev"}).status_code == 201
    )
    return tokens


def _conflict(response: Any, field: str, words: str) -> None:
    assert response.status_code == 409, response.body
    assert response.body["error"] == "conflict"
    [error] = response.body["errors"]
    assert error["field"] == field and words in error["message"], error


def test_a_reseller_cannot_map_an_admin_customers_address(tenants_api):
    top = tenants_api["top"]
    hijack = top.post("/customers/8600000002/ip-map", json={"cidr": "198.51.100.7/32", "tech_prefix": "99"})
    _conflict(hijack, "cidr", "198.51.100.7/32 tech prefix '99' is already claimed by an account outside")
    assert "8600000001" not in hijack.body["errors"][0]["message"]  # a reseller is never told whose
    shorter = top.post("/customers/8600000002/ip-map", json={"cidr": "198.51.100.7", "tech_prefix": "9"})
    _conflict(shorter, "cidr", "already claimed")
    empty = top.post("/customers/8600000002/ip-map", json={"cidr": "198.51.100.7", "tech_prefix": ""})
    _conflict(empty, "cidr", "already claimed")
    # a tech prefix no destination shares with '99' claims no call of the customer
    distinct = top.post("/customers/8600000002/ip-map", json={"cidr": "198.51.100.7", "tech_prefix": "77"})
    assert distinct.status_code == 201, distinct.body
    # and an edit cannot move an entry onto the claimed calls either
    moved = top.patch(f"/customers/8600000002/ip-map/{distinct.body['id']}", json={"tech_prefix": "991"})
    _conflict(moved, "cidr", "already claimed")


def test_wide_networks_need_an_admin(tenants_api):
    for cidr in ("0.0.0.0/0", "10.0.0.0/16", "2001:db8::/32"):
        response = tenants_api["top"].post(
            "/customers/8600000002/ip-map", json={"cidr": cidr, "tech_prefix": "1"}
        )
        assert response.status_code == 403, response.body
        assert "needs an admin token" in response.body["message"]


def test_the_admin_is_refused_a_claim_on_another_tenants_calls_and_told_whose(tenants_api):
    admin, other = tenants_api["admin"], tenants_api["other"]
    assert (
        other.post(
            "/customers/8600000004/ip-map", json={"cidr": "203.0.113.9", "tech_prefix": "12"}
        ).status_code
        == 201
    )
    wide = admin.post("/customers/8600000001/ip-map", json={"cidr": "0.0.0.0/0", "tech_prefix": "1"})
    _conflict(wide, "cidr", "claimed by another tenant's account 8600000004")
    # without an overlapping claim the admin may map a wide network
    assert (
        admin.post("/customers/8600000001/ip-map", json={"cidr": "0.0.0.0/0", "tech_prefix": "3"}).status_code
        == 201
    )


def test_a_sub_reseller_cannot_claim_its_parents_other_customers_calls(tenants_api):
    top, sub = tenants_api["top"], tenants_api["sub"]
    assert (
        top.post(
            "/customers/8600000005/ip-map", json={"cidr": "192.0.2.0/24", "tech_prefix": "5"}
        ).status_code
        == 201
    )
    _conflict(
        sub.post("/customers/8600000003/ip-map", json={"cidr": "192.0.2.9", "tech_prefix": "5"}),
        "cidr",
        "outside",
    )
    # the parent may arrange its own subtree as it likes
    assert (
        top.post("/customers/8600000003/ip-map", json={"cidr": "192.0.2.9", "tech_prefix": "5"}).status_code
        == 201
    )


def test_sip_usernames_are_never_claimed_twice(tenants_api):
    taken = tenants_api["top"].post("/customers/8600000002/sip-devices", json={"username": "own-admin-dev"})
    _conflict(taken, "username", "own-admin-dev is already taken by another SIP device")


def test_caller_ids_and_forced_caller_ids_of_another_tenant_are_refused(tenants_api):
    top, other = tenants_api["top"], tenants_api["other"]
    did = top.post("/customers/8600000002/caller-ids", json={"number": "442071110001"})
    _conflict(did, "number", "number 442071110001 is already claimed by an account outside")
    assert other.post("/customers/8600000004/caller-ids", json={"number": "442079460111"}).status_code == 201
    _conflict(
        top.post("/customers/8600000002/caller-ids", json={"number": "442079460111"}), "number", "outside"
    )
    _conflict(
        top.put("/customers/8600000002/forced-caller-id", json={"number": "442079460111"}),
        "number",
        "outside",
    )
    _conflict(
        top.put("/customers/8600000002/forced-caller-id", json={"number": "442071110001"}),
        "number",
        "outside",
    )
    # within a reseller's own accounts a number may be shared
    assert top.post("/customers/8600000002/caller-ids", json={"number": "442079460222"}).status_code == 201
    assert top.post("/customers/8600000005/caller-ids", json={"number": "442079460222"}).status_code == 201


def test_a_did_is_not_assigned_over_another_tenants_caller_id(tenants_api):
    admin, other = tenants_api["admin"], tenants_api["other"]
    assert other.post("/customers/8600000004/caller-ids", json={"number": "442071110009"}).status_code == 201
    _conflict(
        admin.post("/customers/8600000001/dids", json={"number": "442071110009"}),
        "number",
        "claimed by another tenant's account 8600000004",
    )
    assert admin.post("/customers/8600000004/dids", json={"number": "442071110009"}).status_code == 201
    _conflict(
        admin.post("/customers/8600000001/dids", json={"number": "442071110009"}),
        "number",
        "already assigned",
    )


# --------------------------------------------------------------------------- the snapshot


def test_a_conflict_written_around_the_service_is_left_out_of_the_snapshot(
    tenants_api, env, db_url, redis_url, module_key_prefix, caplog
):
    """A fixture load or SQL by hand bypasses the service: the sync drops the newer claim."""
    with psycopg.connect(db_url) as conn:
        hijacked = conn.execute(
            "INSERT INTO ip_map (account_id, cidr, tech_prefix) SELECT id, '198.51.100.8/32', '99'"
            " FROM accounts WHERE number = '8600000002' RETURNING id"
        ).fetchone()
        spoofed = conn.execute(
            "INSERT INTO caller_ids (account_id, number) SELECT id, '442071110001'"
            " FROM accounts WHERE number = '8600000004' RETURNING id"
        ).fetchone()
    assert hijacked is not None and spoofed is not None  # both accounts exist
    (hijack,), (spoof,) = hijacked, spoofed
    config = load_config(
        environ={**env, "CALLGATE_REDIS_URL": redis_url, "CALLGATE_REDIS__KEY_PREFIX": module_key_prefix}
    )
    with caplog.at_level("ERROR", logger="callgate.sync"):
        publish_once(config)
    client = redis.Redis.from_url(redis_url)
    try:
        version = current_version(client, module_key_prefix)
        assert version is not None

        def ids_in(name: str) -> set[str]:
            fields = client.hkeys(entity_hash_key(module_key_prefix, version, name))
            return {k.decode() for k in cast(list[bytes], fields)}  # the client does not decode replies

        ip_keys, caller_keys = ids_in("ip_map"), ids_in("caller_ids")
    finally:
        client.close()
    assert str(hijack) not in ip_keys and ip_keys  # the rest of the IP map is there
    assert str(spoof) not in caller_keys and caller_keys
    logged = [r.getMessage() for r in caplog.records if "ownership conflict" in r.getMessage()]
    assert any(f"ip_map {hijack} " in m and "198.51.100.8/32 tech prefix '99'" in m for m in logged), logged
    assert any(f"caller_ids {spoof} " in m and "dids" in m for m in logged), logged
