"""The pure rules on catalogs at scale: identification, rating at 1M rates, routing, decide."""

from __future__ import annotations

import itertools

import pytest

from engine.call.render import accept_batch
from engine.decision import Accept
from engine.model import CallRequest
from engine.rules import decide
from engine.rules.identify import identify
from engine.rules.rating import Rating, find_rate, rate_level
from engine.rules.routing import CallerId, plan_routes
from loadtest.bench.conftest import HUGE_ACCOUNTS, LARGE, SMALL, plans


def _requests(scale, kind: str = "accept") -> itertools.cycle:
    return itertools.cycle(
        [
            CallRequest(
                uuid=f"u{i}",
                destination=p.destination,
                sip_auth_username=p.sip_auth_username,
                network_ip=p.network_ip,
            )
            for i, p in enumerate(plans(scale, kind))
        ]
    )


@pytest.mark.benchmark(group="identify")
@pytest.mark.parametrize("which", ["small", "large", "million"])
def test_identify_sip_device(benchmark, which, small_catalog, large_catalog, million_accounts_catalog, ctx):
    catalog, scale = {
        "small": (small_catalog, SMALL),
        "large": (large_catalog, LARGE),
        "million": (million_accounts_catalog, HUGE_ACCOUNTS),
    }[which]
    requests = _requests(scale)
    identity = benchmark(lambda: identify(next(requests), catalog, ctx.config))
    assert identity.account is not None


@pytest.mark.benchmark(group="identify")
def test_identify_ip_map(benchmark, large_catalog, ctx):
    requests = _requests(LARGE, "accept_ip")
    identity = benchmark(lambda: identify(next(requests), large_catalog, ctx.config))
    assert identity.method == "ip_map"


@pytest.mark.benchmark(group="rating")
@pytest.mark.parametrize("which", ["10k_rates", "1M_rates"])
def test_find_rate(benchmark, which, small_catalog, large_catalog):
    catalog, scale = (small_catalog, SMALL) if which == "10k_rates" else (large_catalog, LARGE)
    cases = []
    for p in plans(scale):
        request = CallRequest(uuid="x", destination=p.destination, sip_auth_username=p.sip_auth_username)
        account = catalog.accounts[catalog.devices[request.sip_auth_username].account_id]
        cases.append((account.id, account.rate_group_id, p.destination))
    cycle = itertools.cycle(cases)

    def run():
        account_id, group_id, destination = next(cycle)
        return find_rate(catalog, account_id, group_id, destination)

    assert benchmark(run) is not None


@pytest.mark.benchmark(group="rating")
def test_rate_level_1m_rates(benchmark, large_catalog, ctx):
    cases = []
    for p in plans(LARGE):
        account = large_catalog.accounts[large_catalog.devices[p.sip_auth_username].account_id]
        cases.append((account, p.destination))
    cycle = itertools.cycle(cases)

    def run():
        account, destination = next(cycle)
        return rate_level(account, destination, large_catalog, ctx.config)

    assert benchmark(run).level.max_duration > 0


@pytest.mark.benchmark(group="routing")
def test_plan_routes_five_trunks(benchmark, large_catalog, ctx):
    cases = []
    for p in plans(LARGE, n=500):
        account = large_catalog.accounts[large_catalog.devices[p.sip_auth_username].account_id]
        rating = rate_level(account, p.destination, large_catalog, ctx.config)
        assert isinstance(rating, Rating), rating  # the dataset's plans are all rated
        cases.append((p.destination, rating))
    cycle = itertools.cycle(cases)
    caller = CallerId("1000", "")

    def run():
        destination, rating = next(cycle)
        return plan_routes(destination, rating, caller, "", large_catalog, ctx.config)

    assert len(benchmark(run)) == 5


@pytest.mark.benchmark(group="decide")
@pytest.mark.parametrize("which", ["small", "large"])
def test_decide_accepted_call(benchmark, which, small_catalog, large_catalog, ctx):
    catalog, scale = (small_catalog, SMALL) if which == "small" else (large_catalog, LARGE)
    requests = _requests(scale)
    assert isinstance(benchmark(lambda: decide(next(requests), catalog, ctx)), Accept)


@pytest.mark.benchmark(group="decide")
def test_render_bridge_batch(benchmark, large_catalog, ctx):
    """Decision -> the bytes of the pipelined write (preamble, one multiset, bridge over 10 targets)."""
    decision = decide(next(_requests(LARGE)), large_catalog, ctx)
    assert isinstance(decision, Accept)
    batch = benchmark(lambda: accept_batch(decision))
    # myevents, nixevent, the two filters (hangup, bridge result), linger, multiset, bridge
    assert batch.replies_expected == 7
