"""§4 number handling in a call: speed dial, localization, blocked codes, CLI pool, forced caller ID."""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal
from typing import Any

import pytest

from engine.call.render import channel_variables
from engine.decision import Accept, Direction, Reason, Reject, Step
from engine.model import CallRequest, CliPool
from engine.rules import Catalog, CompiledRules, DecisionContext, decide
from tests.call.rendering import targets
from tests.rules.builders import NOW, World, call, run
from tests.rules.test_decide import shuffled

D = Decimal
DIDS = ("442000000001", "442000000002")
CALLER_IDS = ("442011111111",)


def accepted(world: World, request: CallRequest | None = None, **ctx: Any) -> Accept:
    decision = run(world.catalog(), request, **ctx)
    assert isinstance(decision, Accept), decision
    return decision


def rejected(world: World, request: CallRequest | None = None, **ctx: Any) -> Reject:
    decision = run(world.catalog(), request, **ctx)
    assert isinstance(decision, Reject), decision
    return decision


# -- 4.1 speed dial -----------------------------------------------------------------


def speed_world(**keys: str) -> World:
    world = World()
    for key, number in keys.items():
        world.b.speed_dial(world.customer, key.removeprefix("k"), number)
    return world


@pytest.mark.parametrize(
    ("keys", "dialled", "expected"),
    [
        ({"k5": "442071234567"}, "5", "442071234567"),
        ({"k05": "442071234567"}, "05", "442071234567"),
        ({"k5": "442071234567", "k05": "442079999999"}, "05", "442079999999"),
    ],
)
def test_speed_dial_on_an_exact_key(keys: dict, dialled: str, expected: str) -> None:
    decision = accepted(speed_world(**keys), call(dialled))
    assert decision.destination == expected
    assert decision.routes[0].number == expected


@pytest.mark.parametrize(
    ("keys", "dialled"),
    [
        ({"k5": "442071234567"}, "05"),  # ASTPP's integer cast made "05" hit slot 5
        ({"k05": "442071234567"}, "5"),
        ({"k5": "442071234567"}, "55"),
        ({"k4": "33123"}, "442071234567"),  # a key is never a prefix
        ({"k7": ""}, "7"),  # an empty slot is ignored (ASTPP dialled an empty number)
        ({"k7": "   "}, "7"),
    ],
)
def test_speed_dial_otherwise_leaves_the_destination(keys: dict, dialled: str) -> None:
    decision = run(speed_world(**keys).catalog(), call(dialled), explain=True)
    assert not any(step.rule == "speed_dial" for step in decision.steps)
    if isinstance(decision, Reject):  # nothing rates the untouched short number
        assert decision.reason is Reason.ORIGINATION_RATE_NOT_FOUND
        assert f"no active rate for {dialled} " in decision.detail
    else:
        assert decision.destination == dialled


def test_speed_dials_are_per_account() -> None:
    world = World()
    other = world.b.account("2002", rate_group=world.retail)
    world.b.speed_dial(other, "5", "442071234567")
    assert rejected(world, call("5")).reason is Reason.ORIGINATION_RATE_NOT_FOUND


def test_speed_dial_is_explained_and_then_localized() -> None:
    world = speed_world(k5="00442071234567")
    uk = world.b.localization("UK", number_originate="00/")
    world.b.update(world.customer, localization_id=uk.id)
    decision = accepted(world, call("5"), explain=True)
    assert decision.destination == "442071234567"
    assert Step("speed_dial", "speed dial 5 -> 00442071234567") in decision.steps
    assert (
        Step(
            "localization",
            "localization 'UK' (originate, destination): 00442071234567 -> 442071234567 by 00/",
        )
        in decision.steps
    )


def test_speed_dial_to_an_on_net_user_is_a_local_call() -> None:
    world = World()
    bob = world.b.account("2001")
    world.b.device("bob", bob)
    world.b.speed_dial(world.customer, "2", "bob")  # the database only stores digits; the rules do not care
    decision = accepted(world, call("2"))
    assert decision.direction is Direction.LOCAL
    assert targets(decision.bridge_targets) == ("[leg_timeout=60]user/bob@${domain_name}",)


# -- 4.2 localization ---------------------------------------------------------------


class LocalizedWorld(World):
    """The customer with localization 'UK' of the given rule sets."""

    def __init__(self, **rule_sets: str) -> None:
        super().__init__()
        self.uk = self.b.localization("UK", **rule_sets)
        self.b.update(self.customer, localization_id=self.uk.id)


def localized_world(**rule_sets: str) -> LocalizedWorld:
    return LocalizedWorld(**rule_sets)


def test_destination_is_localized_before_rating_and_routing() -> None:
    world = localized_world(number_originate="00/, 0/44")
    for dialled in ("00442071234567", "02071234567", "442071234567"):
        decision = accepted(world, call(dialled))
        assert decision.destination == "442071234567"
        assert decision.levels[0].rate_id == world.rate_44.id
        assert targets(decision.routes[0].targets) == ("[leg_timeout=60]sofia/gateway/gw-a/442071234567",)


def test_every_rewrite_is_explained_with_its_rule() -> None:
    world = localized_world(number_originate="00/, 33/, 44/0, 0/44", cli_originate="0/44, 33/")
    decision = accepted(world, call("00442071234567", caller_id_number="02079999999"), explain=True)
    assert [step for step in decision.steps if step.rule == "localization"] == [
        Step(
            "localization",
            "localization 'UK' (originate, destination): 00442071234567 -> 442071234567 by 00/",
        ),
        Step(
            "localization", "localization 'UK' (originate, destination): 442071234567 -> 02071234567 by 44/0"
        ),
        Step(
            "localization", "localization 'UK' (originate, destination): 02071234567 -> 442071234567 by 0/44"
        ),
        Step("localization", "localization 'UK' (originate, caller ID): 02079999999 -> 442079999999 by 0/44"),
    ]


def test_no_matching_rule_is_explained_too() -> None:
    world = localized_world(number_originate="00/")
    decision = accepted(world, explain=True)
    assert (
        Step(
            "localization",
            "localization 'UK' (originate, destination): 442071234567 unchanged, no rule matched",
        )
        in decision.steps
    )


def test_caller_id_is_localized_and_presented() -> None:
    world = localized_world(cli_originate="0/44")
    decision = accepted(world, call(caller_id_number="02079999999", caller_id_name="Alice"))
    assert (decision.caller_id_number, decision.caller_id_name) == ("442079999999", "Alice")
    assert decision.caller_id_changed is True
    assert decision.routes[0].caller_id_number == "442079999999"
    assert targets(decision.routes[0].targets) == (
        "[leg_timeout=60]sofia/gateway/gw-a/442071234567",
    )  # A-leg sets it
    variables = dict(channel_variables(decision))
    assert variables["effective_caller_id_number"] == "442079999999"
    assert variables["effective_caller_id_name"] == "Alice"


def test_rules_that_change_nothing_leave_the_caller_id_unchanged() -> None:
    decision = accepted(localized_world(cli_originate="0/44,44/0"), call(caller_id_number="02079999999"))
    assert decision.caller_id_number == "02079999999"
    assert decision.caller_id_changed is False


def test_inactive_localization_is_not_applied() -> None:
    world = localized_world(number_originate="0/44")
    world.b.update(world.uk, active=False)
    decision = run(world.catalog(), call("02071234567"), explain=True)
    assert isinstance(decision, Reject) and decision.reason is Reason.ORIGINATION_RATE_NOT_FOUND
    assert any("inactive or missing: not applied" in step.outcome for step in decision.steps)


def test_localization_that_leaves_nothing_is_no_route() -> None:
    decision = rejected(localized_world(number_originate="44/"), call("44"))
    assert decision.reason is Reason.NO_ROUTE_DESTINATION
    assert decision.detail == "no destination left after the number rules"


def test_explain_changes_nothing_but_the_steps() -> None:
    world = localized_world(number_originate="00/", cli_originate="0/44")
    request = call("00442071234567", caller_id_number="0207")
    plain, explained = accepted(world, request), accepted(world, request, explain=True)
    assert plain.steps == ()
    assert plain == dataclasses.replace(explained, steps=())


# -- 4.3 blocked codes --------------------------------------------------------------


def test_blocked_code_matches_the_localized_destination() -> None:
    """ASTPP matched before localization, so 0044... escaped a block on 44."""
    world = localized_world(number_originate="00/")
    world.b.blocked(world.customer, "44")
    decision = rejected(world, call("00442071234567"))
    assert decision.reason is Reason.DESTINATION_BLOCKED
    assert decision.detail == "442071234567 matches blocked code 44 of account 1001"


@pytest.mark.parametrize(
    ("codes", "dialled", "blocked_by"),
    [
        (("4420",), "442071234567", "4420"),
        (("44", "4420", "44207"), "442071234567", "44207"),  # the longest prefix is named
        (("4420",), "443071234567", None),
        (("442071234567",), "442071234567", "442071234567"),
        (("4420712345678",), "442071234567", None),  # longer than the number
    ],
)
def test_blocked_codes_longest_prefix(codes: tuple, dialled: str, blocked_by: str | None) -> None:
    world = World()
    for code in codes:
        world.b.blocked(world.customer, code)
    decision = run(world.catalog(), call(dialled))
    if blocked_by is None:
        assert isinstance(decision, Accept)
    else:
        assert isinstance(decision, Reject) and decision.reason is Reason.DESTINATION_BLOCKED
        assert f"blocked code {blocked_by} " in decision.detail


def test_blocked_codes_of_other_accounts_do_not_apply() -> None:
    world = World()
    world.b.blocked(world.b.account("2002"), "44")
    accepted(world)


def test_a_resellers_blocked_codes_cover_its_customers() -> None:
    world = World()
    wholesale = world.b.group("Wholesale", trunks=(world.carrier_a,))
    world.b.rate(wholesale, "44", "0.05")
    reseller = world.b.reseller("R1", balance="50", rate_group=wholesale)
    world.b.update(world.customer, reseller_id=reseller.id)
    world.b.blocked(reseller, "4420")
    decision = rejected(world)
    assert (decision.reason, decision.detail) == (
        Reason.DESTINATION_BLOCKED,
        "442071234567 matches blocked code 4420 of reseller R1",
    )


def test_blocked_step_is_named_in_the_explanation() -> None:
    world = World()
    world.b.blocked(world.customer, "44")
    decision = run(world.catalog(), explain=True)
    assert decision.steps[-1] == Step(
        "block_codes", "DESTINATION_BLOCKED: 442071234567 matches blocked code 44 of account 1001"
    )


# -- 4.4 CLI pool -------------------------------------------------------------------

RANDOM_DID = "random DID"
RANDOM_CALLER_ID = "random caller ID"
MISCONFIGURED = Reason.CLI_POOL_MISCONFIGURED
NOT_ALLOWED = Reason.CLI_NOT_ALLOWED


class PoolWorld(World):
    """Customer 1001 (Retail: 44 @0.10) with DIDs 442000000001/2, whitelisted caller ID
    442011111111, and a NON-CLI group (44 @0.20); plus noise that must never count:
    an inactive DID and caller ID of its own, and another account's DID."""

    def __init__(self, option: CliPool, *, dids: bool, caller_ids: bool, non_cli: bool) -> None:
        super().__init__()
        b = self.b
        if dids:
            for number in DIDS:
                b.did(number, self.customer)
        b.did("442000000009", self.customer, active=False)
        if caller_ids:
            for number in CALLER_IDS:
                b.caller_id(number, self.customer)
        b.caller_id("442011111119", self.customer, active=False)
        b.did("442000000077", b.account("2002"))
        self.non_cli = b.group("NON-CLI", trunks=(self.carrier_a,))
        self.non_cli_rate = b.rate(self.non_cli, "44", "0.20")
        b.update(self.customer, cli_pool=option, non_cli_rate_group_id=self.non_cli.id if non_cli else None)


def pool_world(
    option: CliPool, *, dids: bool = True, caller_ids: bool = True, non_cli: bool = True
) -> PoolWorld:
    return PoolWorld(option, dids=dids, caller_ids=caller_ids, non_cli=non_cli)


def check_pool(option: CliPool, cli: str, setup: dict, expected: str | Reason, group: str | None) -> None:
    world = pool_world(option, **setup)
    decision = run(world.catalog(), call(caller_id_number=cli))
    if isinstance(expected, Reason):
        assert isinstance(decision, Reject), decision
        assert decision.reason is expected, decision.detail
        return
    assert isinstance(decision, Accept), decision
    if expected == RANDOM_DID:
        expected = random.Random(7).choice(DIDS)  # the context's injected rng
    elif expected == RANDOM_CALLER_ID:
        expected = random.Random(7).choice(CALLER_IDS)
    assert decision.caller_id_number == expected
    assert decision.routes[0].caller_id_number == expected
    assert decision.caller_id_changed is (expected != cli)
    rate = world.rate_44 if group == "Retail" else world.non_cli_rate
    assert decision.levels[0].rate_id == rate.id
    assert decision.levels[0].cost_per_minute == rate.cost_per_minute


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("1001", {}, "1001", "Retail"),
        ("", {"dids": False, "caller_ids": False, "non_cli": False}, "", "Retail"),
    ],
)
def test_cli_pool_0_disabled(cli: str, setup: dict, expected: str, group: str) -> None:
    check_pool(CliPool.DISABLED, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442000000001", {}, "442000000001", "Retail"),  # match: kept
        ("+442000000002", {}, "+442000000002", "Retail"),  # a leading + is ignored, the CLI kept as is
        ("1001", {}, RANDOM_DID, "Retail"),  # no match: a random DID of the account
        ("442011111111", {}, RANDOM_DID, "Retail"),  # a whitelisted caller ID is not a DID
        ("442000000009", {}, RANDOM_DID, "Retail"),  # an inactive DID does not count
        ("442000000077", {}, RANDOM_DID, "Retail"),  # another account's DID does not count
        ("", {}, RANDOM_DID, "Retail"),  # no caller ID at all
        ("1001", {"dids": False}, MISCONFIGURED, None),  # empty list
        ("1001", {"non_cli": False}, RANDOM_DID, "Retail"),  # the NON-CLI group is irrelevant here
    ],
)
def test_cli_pool_1_did_else_random_did(cli: str, setup: dict, expected: Any, group: str | None) -> None:
    check_pool(CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442011111111", {}, "442011111111", "Retail"),
        ("+442011111111", {}, "+442011111111", "Retail"),
        ("1001", {}, RANDOM_CALLER_ID, "Retail"),
        ("442000000001", {}, RANDOM_CALLER_ID, "Retail"),  # a DID is not a whitelisted caller ID
        ("442011111119", {}, RANDOM_CALLER_ID, "Retail"),  # inactive caller ID
        ("1001", {"caller_ids": False}, MISCONFIGURED, None),
    ],
)
def test_cli_pool_2_caller_id_else_random_caller_id(
    cli: str, setup: dict, expected: Any, group: str | None
) -> None:
    check_pool(CliPool.KEEP_IF_IN_CALLER_IDS_ELSE_RANDOM_CALLER_ID, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442000000001", {}, "442000000001", "Retail"),
        ("+442000000001", {}, "+442000000001", "Retail"),
        ("1001", {}, "1001", "NON-CLI"),
        ("442011111111", {}, "442011111111", "NON-CLI"),  # caller IDs do not count for option 3
        ("1001", {"dids": False}, "1001", "NON-CLI"),
        ("1001", {"non_cli": False}, MISCONFIGURED, None),
        ("442000000001", {"non_cli": False}, MISCONFIGURED, None),  # misconfigured whatever the CLI
    ],
)
def test_cli_pool_3_non_cli_rates_unless_in_dids(
    cli: str, setup: dict, expected: Any, group: str | None
) -> None:
    check_pool(CliPool.NON_CLI_RATES_UNLESS_IN_DIDS, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442011111111", {}, "442011111111", "Retail"),
        ("1001", {}, "1001", "NON-CLI"),
        ("442000000001", {}, "442000000001", "NON-CLI"),  # DIDs do not count for option 4
        ("1001", {"caller_ids": False}, "1001", "NON-CLI"),
        ("1001", {"non_cli": False}, MISCONFIGURED, None),
        ("442011111111", {"non_cli": False}, MISCONFIGURED, None),
    ],
)
def test_cli_pool_4_non_cli_rates_unless_in_caller_ids(
    cli: str, setup: dict, expected: Any, group: str | None
) -> None:
    check_pool(CliPool.NON_CLI_RATES_UNLESS_IN_CALLER_IDS, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442000000001", {}, "442000000001", "Retail"),
        ("442011111111", {}, "442011111111", "Retail"),
        ("1001", {}, "1001", "NON-CLI"),
        ("1001", {"dids": False, "caller_ids": False}, "1001", "NON-CLI"),
        ("1001", {"non_cli": False}, MISCONFIGURED, None),
    ],
)
def test_cli_pool_5_non_cli_rates_unless_in_either(
    cli: str, setup: dict, expected: Any, group: str | None
) -> None:
    check_pool(CliPool.NON_CLI_RATES_UNLESS_IN_EITHER, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442000000002", {}, "442000000002", "Retail"),
        ("+442000000002", {}, "+442000000002", "Retail"),
        ("1001", {}, NOT_ALLOWED, None),
        ("442011111111", {}, NOT_ALLOWED, None),
        ("442000000009", {}, NOT_ALLOWED, None),
        ("1001", {"dids": False}, NOT_ALLOWED, None),  # an empty list rejects everything
        ("442000000001", {"non_cli": False}, "442000000001", "Retail"),
    ],
)
def test_cli_pool_6_reject_unless_in_dids(cli: str, setup: dict, expected: Any, group: str | None) -> None:
    check_pool(CliPool.REJECT_UNLESS_IN_DIDS, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442011111111", {}, "442011111111", "Retail"),
        ("1001", {}, NOT_ALLOWED, None),
        ("442000000001", {}, NOT_ALLOWED, None),
        ("442011111119", {}, NOT_ALLOWED, None),
        ("442011111111", {"caller_ids": False}, NOT_ALLOWED, None),
    ],
)
def test_cli_pool_7_reject_unless_in_caller_ids(
    cli: str, setup: dict, expected: Any, group: str | None
) -> None:
    check_pool(CliPool.REJECT_UNLESS_IN_CALLER_IDS, cli, setup, expected, group)


@pytest.mark.parametrize(
    ("cli", "setup", "expected", "group"),
    [
        ("442000000001", {}, "442000000001", "Retail"),
        ("442011111111", {}, "442011111111", "Retail"),
        ("+442011111111", {}, "+442011111111", "Retail"),
        ("1001", {}, NOT_ALLOWED, None),
        ("", {}, NOT_ALLOWED, None),
        ("442000000001", {"dids": False}, NOT_ALLOWED, None),
    ],
)
def test_cli_pool_8_reject_unless_in_either(cli: str, setup: dict, expected: Any, group: str | None) -> None:
    check_pool(CliPool.REJECT_UNLESS_IN_EITHER, cli, setup, expected, group)


def test_cli_pool_uses_the_localized_caller_id() -> None:
    world = pool_world(CliPool.REJECT_UNLESS_IN_DIDS)
    uk = world.b.localization("UK", cli_originate="0/44")
    world.b.update(world.customer, localization_id=uk.id)
    decision = accepted(world, call(caller_id_number="02000000001"))
    assert decision.caller_id_number == "442000000001"


def test_random_pick_comes_from_the_injected_rng() -> None:
    world = pool_world(CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID)
    catalog = world.catalog()
    picks = set()
    for seed in range(20):
        first = decide(call(caller_id_number="1001"), catalog, DecisionContext(NOW, random.Random(seed)))
        again = decide(call(caller_id_number="1001"), catalog, DecisionContext(NOW, random.Random(seed)))
        assert isinstance(first, Accept) and first == again
        picks.add(first.caller_id_number)
    assert picks == set(DIDS)


def test_cli_pool_explanations() -> None:
    world = pool_world(CliPool.NON_CLI_RATES_UNLESS_IN_EITHER)
    decision = accepted(world, call(caller_id_number="1001"), explain=True)
    assert (
        Step(
            "cli_pool",
            "CLI pool 5 (NON-CLI rates unless in DIDs or caller IDs): "
            "'1001' is not in its DIDs or caller IDs, rated with group NON-CLI",
        )
        in decision.steps
    )
    refusal = rejected(pool_world(CliPool.REJECT_UNLESS_IN_DIDS), call(caller_id_number="1001"), explain=True)
    assert refusal.steps[-1].rule == "cli_pool"
    assert refusal.detail == (
        "CLI pool 6 (reject unless in DIDs): caller ID '1001' is not in the DIDs of account 1001"
    )


def test_misconfiguration_says_what_is_missing() -> None:
    decision = rejected(pool_world(CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID, dids=False))
    assert decision.detail == (
        "account 1001: CLI pool 1 (keep if in DIDs, else a random DID) but it has no active DIDs"
    )
    decision = rejected(pool_world(CliPool.NON_CLI_RATES_UNLESS_IN_DIDS, non_cli=False))
    assert (
        decision.detail
        == "account 1001: CLI pool 3 (NON-CLI rates unless in DIDs) but no NON-CLI rate group set"
    )
    world = pool_world(CliPool.NON_CLI_RATES_UNLESS_IN_DIDS)
    world.b.update(world.customer, non_cli_rate_group_id=4242)
    assert rejected(world).reason is MISCONFIGURED


def test_inactive_non_cli_group_is_origination_rate_not_found() -> None:
    world = pool_world(CliPool.NON_CLI_RATES_UNLESS_IN_DIDS)
    world.b.update(world.non_cli, active=False)
    assert rejected(world, call(caller_id_number="1001")).reason is Reason.ORIGINATION_RATE_NOT_FOUND
    accepted(world, call(caller_id_number="442000000001"))  # the ordinary group still serves matching CLIs


# -- 4.5 forced caller ID -----------------------------------------------------------


def test_forced_caller_id_replaces_name_and_number() -> None:
    world = World()
    world.b.forced_caller_id(world.customer, "442080000000", "Sales")
    decision = accepted(world)
    assert (decision.caller_id_number, decision.caller_id_name) == ("442080000000", "Sales")
    assert decision.caller_id_changed is True
    assert (decision.routes[0].caller_id_number, decision.routes[0].caller_id_name) == (
        "442080000000",
        "Sales",
    )


def test_forced_caller_id_without_a_name_presents_the_number_as_name() -> None:
    world = World()
    world.b.forced_caller_id(world.customer, "442080000000")
    decision = accepted(world)
    assert (decision.caller_id_number, decision.caller_id_name) == ("442080000000", "442080000000")


def test_inactive_forced_caller_id_is_ignored() -> None:
    world = World()
    world.b.forced_caller_id(world.customer, "442080000000", "Sales", active=False)
    decision = accepted(world)
    assert (decision.caller_id_number, decision.caller_id_changed) == ("1001", False)


@pytest.mark.parametrize(
    ("option", "cli", "expected"),
    [
        # the pool judges the caller's CLI, then the forced one is presented
        (CliPool.REJECT_UNLESS_IN_DIDS, "442000000001", "442080000000"),
        (CliPool.REJECT_UNLESS_IN_DIDS, "1001", Reason.CLI_NOT_ALLOWED),
        (CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID, "1001", "442080000000"),  # replaces the random DID
        (CliPool.NON_CLI_RATES_UNLESS_IN_DIDS, "1001", "442080000000"),
    ],
)
def test_forced_caller_id_comes_after_the_cli_pool(option: CliPool, cli: str, expected: Any) -> None:
    world = pool_world(option)
    world.b.forced_caller_id(world.customer, "442080000000", "Sales")
    decision = run(world.catalog(), call(caller_id_number=cli), explain=True)
    if isinstance(expected, Reason):
        assert isinstance(decision, Reject) and decision.reason is expected
        return
    assert isinstance(decision, Accept)
    assert decision.caller_id_number == expected
    rules = [step.rule for step in decision.steps]
    assert rules.index("cli_pool") < rules.index("forced_caller_id")
    if option is CliPool.NON_CLI_RATES_UNLESS_IN_DIDS:
        assert decision.levels[0].rate_id == world.non_cli_rate.id  # rated on the caller's own CLI


def test_number_steps_run_in_the_order_of_section_4() -> None:
    world = pool_world(CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID)
    uk = world.b.localization("UK", number_originate="00/", cli_originate="0/44")
    world.b.update(world.customer, localization_id=uk.id)
    world.b.speed_dial(world.customer, "9", "00442071234567")
    world.b.forced_caller_id(world.customer, "442080000000", "Sales")
    decision = accepted(world, call("9", caller_id_number="02000000001"), explain=True)
    rules = [step.rule for step in decision.steps]
    assert rules[:8] == [
        "identify",
        "gate",
        "direction",
        "speed_dial",
        "direction",
        "localization",
        "localization",
        "cli_pool",
    ]
    assert rules[8] == "forced_caller_id"
    assert decision.destination == "442071234567"
    assert decision.caller_id_number == "442080000000"
    assert D(0) < decision.levels[0].cost_per_minute


def test_pool_picks_do_not_depend_on_the_loaders_row_order() -> None:
    world = pool_world(CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID)
    world.b.forced_caller_id(world.customer, "442080000000", "Sales", active=False)
    data = world.b.data()
    reference = decide(
        call(caller_id_number="1001"), Catalog.build(data), DecisionContext(NOW, random.Random(3))
    )
    for seed in range(10):
        catalog = Catalog.build(shuffled(data, seed))
        assert (
            decide(call(caller_id_number="1001"), catalog, DecisionContext(NOW, random.Random(3)))
            == reference
        )


def test_cli_pool_as_a_plain_number_works_too() -> None:
    """The Redis codec restores enum members; a plain int from elsewhere must not break the rules."""
    world = pool_world(CliPool.DISABLED)
    world.b.update(world.customer, cli_pool=6)
    assert rejected(world, call(caller_id_number="1001")).reason is Reason.CLI_NOT_ALLOWED
    world.b.update(world.customer, cli_pool=0)
    accepted(world, call(caller_id_number="1001"))


def test_hot_path_formats_no_explanations(monkeypatch: pytest.MonkeyPatch) -> None:
    """With explain off, rules are applied, never traced (tracing builds the explanation)."""
    world = pool_world(CliPool.NON_CLI_RATES_UNLESS_IN_EITHER)
    uk = world.b.localization("UK", number_originate="00/", cli_originate="0/44", number_terminate="*/9")
    world.b.update(world.customer, localization_id=uk.id)
    world.b.update(world.carrier_a, localization_id=uk.id)

    def no_trace(self, number):
        raise AssertionError("traced with explain off")

    monkeypatch.setattr(CompiledRules, "trace", no_trace)
    decision = accepted(world, call("00442071234567", caller_id_number="02000000001"))
    assert decision.routes[0].number == "9442071234567"
    with pytest.raises(AssertionError, match="traced with explain off"):
        run(world.catalog(), call("00442071234567"), explain=True)
