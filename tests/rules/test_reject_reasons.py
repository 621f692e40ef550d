"""Every reject reason the rules can give, one case per way of reaching it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from engine.decision import Accept, Reason, Reject
from engine.model import CallRequest, CliPool
from tests.rules.builders import NOW, World, call, run

Case = Callable[[World], tuple[CallRequest, dict[str, Any]]]
CASES: list[Any] = []
TRUSTED = {"trusted_proxies": ("10.0.0.0/8",)}


def case(reason: Reason) -> Callable[[Case], Case]:
    """Register a world change that must end in ``reason``; the function name is the case id."""

    def register(setup: Case) -> Case:
        CASES.append(pytest.param(setup, reason, id=setup.__name__))
        return setup

    return register


def header_call(number: str = "1001") -> CallRequest:
    return call(sip_auth_username="", network_ip="10.0.0.5", account_code_header=number)


def ip_call(destination: str = "442071234567", source: str = "203.0.113.9") -> CallRequest:
    return call(destination, sip_auth_username="", network_ip=source)


def add_reseller(w: World, **fields: Any) -> None:
    wholesale = w.b.group("Wholesale", trunks=(w.carrier_a,))
    w.b.rate(wholesale, "44", "0.05")
    fields.setdefault("rate_group", wholesale)
    reseller = w.b.reseller("R1", balance=fields.pop("balance", "50"), **fields)
    w.b.update(w.customer, reseller_id=reseller.id)


# -- §2 identification -------------------------------------------------------------


@case(Reason.AUTHENTICATION_FAIL)
def unknown_device(w: World):
    return call(sip_auth_username="bob"), {}


@case(Reason.AUTHENTICATION_FAIL)
def inactive_device(w: World):
    w.b.update(w.alice, active=False)
    return call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def deleted_accounts_device(w: World):
    w.b.update(w.customer, deleted=True)
    return call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def inactive_accounts_device(w: World):
    w.b.update(w.customer, active=False)
    return call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def no_credentials(w: World):
    return call(sip_auth_username=""), {}


@case(Reason.AUTHENTICATION_FAIL)
def ip_outside_cidr(w: World):
    w.b.ip("203.0.113.0/24", w.customer)
    return ip_call(source="198.51.100.7"), {}


@case(Reason.AUTHENTICATION_FAIL)
def wrong_tech_prefix(w: World):
    w.b.ip("203.0.113.0/24", w.customer, "99")
    return ip_call("88442071234567"), {}


@case(Reason.AUTHENTICATION_FAIL)
def inactive_ip_map_entry(w: World):
    w.b.ip("203.0.113.0/24", w.customer, active=False)
    return ip_call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def ip_map_entry_of_inactive_account(w: World):
    w.b.ip("203.0.113.0/24", w.customer)
    w.b.update(w.customer, active=False)
    return ip_call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def unparseable_source_address(w: World):
    w.b.ip("203.0.113.0/24", w.customer)
    return ip_call(source="not-an-ip"), {}


@case(Reason.AUTHENTICATION_FAIL)
def header_without_trusted_proxies(w: World):
    return header_call(), {}


@case(Reason.AUTHENTICATION_FAIL)
def header_from_outside_the_trusted_proxies(w: World):
    return header_call(), {"trusted_proxies": ("192.0.2.0/24",)}


# -- destination sanity (no spec reason of its own: see the report) ---------------


@case(Reason.NO_ROUTE_DESTINATION)
def destination_with_a_bridge_separator(w: World):
    return call("4420|sofia/gateway/x/1"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def destination_with_a_newline(w: World):
    return call("4420\nexit"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def destination_with_a_variable(w: World):
    return call("44${system(id)}"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def destination_emptied_by_the_tech_prefix(w: World):
    w.b.ip("203.0.113.0/24", w.customer, "99")
    return ip_call("99"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def destination_too_long(w: World):
    return call("4" * 65), {}


# -- §1 direction: DIDs --------------------------------------------------------------


@case(Reason.NO_ROUTE_DESTINATION)
def unassigned_did(w: World):
    w.b.did("442000000001", None)
    return call("442000000001"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def inactive_did(w: World):
    w.b.did("442000000001", w.customer, active=False)
    return call("442000000001"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def did_of_an_inactive_account(w: World):
    w.b.did("442000000001", w.b.account("2001", active=False))
    return call("442000000001"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def did_to_someone_elses_device(w: World):
    w.b.did("442000000001", w.b.account("2001"), destination="alice")
    return call("442000000001"), {}


@case(Reason.ACCOUNT_EXPIRED)
def did_of_an_expired_account(w: World):
    owner = w.b.account("2001", expiry=NOW - timedelta(days=1))
    w.b.device("bob", owner)
    w.b.did("442000000001", owner, destination="bob")
    return call("442000000001"), {}


@case(Reason.NO_SUFFICIENT_FUND)
def priced_did_of_an_account_without_funds(w: World):
    owner = w.b.account("2001", balance="0.01")
    w.b.device("bob", owner)
    w.b.did("442000000001", owner, destination="bob", cost_per_minute="0.02")
    return call("442000000001"), {}


@case(Reason.NO_ROUTE_DESTINATION)
def on_net_user_without_local_calls(w: World):
    w.b.device("bob", w.b.account("2001"))
    w.b.update(w.customer, local_calls_allowed=False)
    return call("bob"), {}


@case(Reason.NO_SUFFICIENT_FUND)
def charged_local_call_without_funds(w: World):
    w.b.device("bob", w.b.account("2001"))
    w.b.update(w.customer, local_call_cost_per_minute=Decimal("10.01"))
    return call("bob"), {}


# -- §3 account gate ---------------------------------------------------------------


@case(Reason.ACCOUNT_INACTIVE)
def header_names_an_unknown_account(w: World):
    return header_call("9999"), TRUSTED


@case(Reason.ACCOUNT_INACTIVE)
def header_names_an_inactive_account(w: World):
    w.b.update(w.customer, active=False)
    return header_call(), TRUSTED


@case(Reason.ACCOUNT_INACTIVE)
def header_names_a_deleted_account(w: World):
    w.b.update(w.customer, deleted=True)
    return header_call(), TRUSTED


@case(Reason.ACCOUNT_INACTIVE)
def inactive_reseller(w: World):
    add_reseller(w, active=False)
    return call(), {}


@case(Reason.ACCOUNT_INACTIVE)
def deleted_reseller(w: World):
    add_reseller(w, deleted=True)
    return call(), {}


@case(Reason.ACCOUNT_INACTIVE)
def missing_reseller(w: World):
    w.b.update(w.customer, reseller_id=999)
    return call(), {}


@case(Reason.ACCOUNT_INACTIVE)
def reseller_chain_loop(w: World):
    add_reseller(w)
    reseller = w.b.build().accounts_by_number["R1"]
    w.b.update(reseller, reseller_id=w.customer.id)
    return call(), {}


@case(Reason.ACCOUNT_EXPIRED)
def expired_account(w: World):
    w.b.update(w.customer, expiry=NOW - timedelta(seconds=1))
    return call(), {}


@case(Reason.ACCOUNT_EXPIRED)
def expired_account_via_trusted_header(w: World):
    w.b.update(w.customer, expiry=NOW - timedelta(days=1))
    return header_call(), TRUSTED


@case(Reason.ACCOUNT_EXPIRED)
def expired_reseller(w: World):
    add_reseller(w, expiry=NOW - timedelta(days=1))
    return call(), {}


@case(Reason.ACCOUNT_EXPIRED)
def first_use_validity_over(w: World):
    w.b.update(w.customer, expiry_from_first_use=True, valid_days=30, first_used=NOW - timedelta(days=31))
    return call(), {}


# -- §5 funds and origination rate -------------------------------------------------


@case(Reason.NO_SUFFICIENT_FUND)
def prepaid_without_funds(w: World):
    w.b.update(w.customer, balance=Decimal(0))
    return call(), {}


@case(Reason.NO_SUFFICIENT_FUND)
def prepaid_in_debt_on_a_free_rate(w: World):
    w.b.update(w.customer, balance=Decimal("-0.01"))
    w.b.update(w.rate_44, cost_per_minute=Decimal(0))
    return call(), {}


@case(Reason.NO_SUFFICIENT_FUND)
def postpaid_over_its_credit_limit(w: World):
    w.b.update(w.customer, postpaid=True, balance=Decimal("-99.95"), credit_limit=Decimal(100))
    return call(), {}


@case(Reason.NO_SUFFICIENT_FUND)
def reseller_without_funds(w: World):
    add_reseller(w, balance="0.01")
    return call(), {}


@case(Reason.NO_SUFFICIENT_FUND)
def postpaid_reseller_at_its_credit_limit(w: World):
    add_reseller(w, postpaid=True, balance="-100", credit_limit="100")
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def no_rate_for_the_destination(w: World):
    return call("33123456789"), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def inactive_rate_group(w: World):
    w.b.update(w.retail, active=False)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def inactive_rate(w: World):
    w.b.update(w.rate_44, active=False)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def account_without_rate_group(w: World):
    w.b.update(w.customer, rate_group_id=None)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def personal_rate_under_an_inactive_group(w: World):
    w.b.rate(w.customer, "44", "0.2")
    w.b.update(w.retail, active=False)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def reseller_without_rate_group(w: World):
    add_reseller(w, rate_group=None)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def reseller_group_lacks_the_prefix(w: World):
    wholesale = w.b.group("Wholesale", trunks=(w.carrier_a,))
    w.b.rate(wholesale, "33", "0.05")
    add_reseller(w, rate_group=wholesale)
    return call(), {}


# -- §4 number handling ------------------------------------------------------------


@case(Reason.DESTINATION_BLOCKED)
def blocked_code(w: World):
    w.b.blocked(w.customer, "4420")
    return call(), {}


@case(Reason.DESTINATION_BLOCKED)
def blocked_code_after_localization(w: World):
    w.b.update(w.customer, localization_id=w.b.localization("intl", number_originate="00/").id)
    w.b.blocked(w.customer, "44")
    return call("00442071234567"), {}


@case(Reason.DESTINATION_BLOCKED)
def blocked_code_of_the_reseller(w: World):
    add_reseller(w)
    w.b.blocked(w.b.build().accounts_by_number["R1"], "44")
    return call(), {}


@case(Reason.NO_ROUTE_DESTINATION)
def localization_leaves_no_destination(w: World):
    w.b.update(w.customer, localization_id=w.b.localization("eat", number_originate="44/").id)
    return call("44"), {}


@case(Reason.CLI_NOT_ALLOWED)
def cli_not_among_the_dids(w: World):
    w.b.did("442000000001", w.customer)
    w.b.update(w.customer, cli_pool=CliPool.REJECT_UNLESS_IN_DIDS)
    return call(), {}


@case(Reason.CLI_NOT_ALLOWED)
def cli_not_among_the_caller_ids(w: World):
    w.b.caller_id("442000000001", w.customer)
    w.b.update(w.customer, cli_pool=CliPool.REJECT_UNLESS_IN_CALLER_IDS)
    return call(), {}


@case(Reason.CLI_NOT_ALLOWED)
def cli_in_neither_list(w: World):
    w.b.update(w.customer, cli_pool=CliPool.REJECT_UNLESS_IN_EITHER)
    return call(), {}


@case(Reason.CLI_POOL_MISCONFIGURED)
def random_did_without_dids(w: World):
    w.b.update(w.customer, cli_pool=CliPool.KEEP_IF_IN_DIDS_ELSE_RANDOM_DID)
    return call(), {}


@case(Reason.CLI_POOL_MISCONFIGURED)
def random_caller_id_without_caller_ids(w: World):
    w.b.update(w.customer, cli_pool=CliPool.KEEP_IF_IN_CALLER_IDS_ELSE_RANDOM_CALLER_ID)
    return call(), {}


@case(Reason.CLI_POOL_MISCONFIGURED)
def non_cli_rates_without_a_non_cli_group(w: World):
    w.b.update(w.customer, cli_pool=CliPool.NON_CLI_RATES_UNLESS_IN_EITHER)
    return call(), {}


@case(Reason.ORIGINATION_RATE_NOT_FOUND)
def non_cli_group_lacks_the_prefix(w: World):
    non_cli = w.b.group("NON-CLI", trunks=(w.carrier_a,))
    w.b.rate(non_cli, "33", "0.5")
    w.b.update(w.customer, cli_pool=CliPool.NON_CLI_RATES_UNLESS_IN_DIDS, non_cli_rate_group_id=non_cli.id)
    return call(), {}


# -- §6 termination ----------------------------------------------------------------


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def rate_group_without_trunks(w: World):
    w.b.update(w.retail, trunk_ids=())
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def inactive_gateway(w: World):
    w.b.update(w.gw_a, active=False)
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def inactive_trunk(w: World):
    w.b.update(w.carrier_a, active=False)
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def inactive_provider(w: World):
    w.b.update(w.provider, active=False)
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def no_termination_rate_for_the_prefix(w: World):
    w.b.update(w.term_a, prefix="33")
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def inactive_termination_rate(w: World):
    w.b.update(w.term_a, active=False)
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def loss_less_drop(w: World):
    w.b.update(w.term_a, cost_per_minute=Decimal("0.1000001"))
    return call(), {}


@case(Reason.TERMINATION_RATE_NOT_FOUND)
def strip_leaves_no_number(w: World):
    w.b.update(w.term_a, strip="442071234567")
    return call(), {}


@pytest.mark.parametrize(("setup", "reason"), CASES)
def test_reject_reason(setup: Case, reason: Reason) -> None:
    world = World()
    request, config = setup(world)
    decision = run(world.catalog(), request, **config)
    assert isinstance(decision, Reject), decision
    assert decision.reason is reason, decision.detail
    assert decision.detail
    assert decision.steps == ()


@pytest.mark.parametrize(("setup", "reason"), CASES)
def test_explained_reject_ends_with_its_reason(setup: Case, reason: Reason) -> None:
    world = World()
    request, config = setup(world)
    decision = run(world.catalog(), request, explain=True, **config)
    assert isinstance(decision, Reject)
    assert decision.steps[-1].outcome == f"{reason}: {decision.detail}"


def test_every_reason_of_the_scope_is_covered() -> None:
    covered = {param.values[1] for param in CASES}
    in_scope = set(Reason) - {
        Reason.CONCURRENT_LIMIT,  # §7, applied by the engine
        Reason.CPS_LIMIT,  # §7
        Reason.ENGINE_DEGRADED,  # §9, the engine's
    }
    assert covered == in_scope


def test_the_unchanged_world_is_accepted() -> None:
    assert isinstance(run(World().catalog()), Accept)
