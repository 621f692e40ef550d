"""The shipped dialplan hands calls to callgate and fails closed when no engine decides."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

DIALPLAN = Path(__file__).resolve().parent.parent / "dialplan" / "callgate.xml"


def actions() -> list[tuple[str, str]]:
    root = ET.parse(DIALPLAN).getroot()
    return [(a.get("application", ""), a.get("data", "")) for a in root.iter("action")]


def test_socket_is_async_full_with_a_failover_host_list() -> None:
    sockets = [data for app, data in actions() if app == "socket"]
    assert len(sockets) == 1
    hosts, *modes = sockets[0].split()
    assert modes == ["async", "full"]
    assert len(hosts.split("|")) >= 2
    assert all(host.rpartition(":")[2].isdigit() for host in hosts.split("|"))


def test_without_an_engine_the_call_is_rejected_never_bridged() -> None:
    apps = [app for app, _ in actions()]
    after_socket = apps[apps.index("socket") + 1 :]
    assert after_socket == ["respond"]
    assert dict(actions())["respond"].startswith("503 ")
    assert "bridge" not in apps


def test_no_park_timeout_cuts_a_long_ringing_call() -> None:
    """On the real switch a park timeout fired when a bridge that rang longer than it failed:
    the caller got NETWORK_OUT_OF_ORDER (503) instead of the bridge's cause. The guard bounds a
    frozen engine instead (tests/call/test_switch_defects_e2e.py reproduces both)."""
    assert not [data for app, data in actions() if data.startswith("park_timeout")]


def test_no_other_callgate_service_listens_on_an_engine_port() -> None:
    """Issue 14 item 4: the second engine address was the admin API's default port; a service
    that accepts the socket but never speaks ESL holds the caller ~35 s."""
    from engine.config import Config

    [data] = [data for app, data in actions() if app == "socket"]
    engine_ports = {int(host.rpartition(":")[2]) for host in data.split()[0].split("|")}
    config = Config()
    assert config.engine.listen_port in engine_ports
    others = {
        config.admin.listen_port,
        config.metrics.listen_port,
        config.sync.metrics_port,
        config.fsxml.listen_port,
        config.fsxml.metrics_port,
    }
    assert not engine_ports & others


def test_the_reason_the_dialplan_records_is_the_one_the_engine_replaces() -> None:
    from engine.call.render import ENGINE_UNREACHABLE, REASON_VARIABLE

    assert ("set", f"{REASON_VARIABLE}={ENGINE_UNREACHABLE}") in actions()


def guard_seconds() -> int:
    """N of the frozen-engine guard, `sched_hangup +N NETWORK_OUT_OF_ORDER`."""
    [data] = [data for app, data in actions() if app == "sched_hangup"]
    when, cause = data.split()
    assert cause == "NETWORK_OUT_OF_ORDER"  # 503 to the caller (mod_sofia hangup_cause_to_sip)
    assert when.startswith("+") and when[1:].isdigit()  # relative, whole seconds (atol)
    return int(when[1:])


def test_a_frozen_engine_is_bounded_by_a_guard_set_before_the_socket() -> None:
    apps = [app for app, _ in actions()]
    assert apps.index("sched_hangup") < apps.index("socket")
    assert guard_seconds() < 10  # far below the ~35 s a frozen engine cost without it


def test_the_guard_leaves_the_engine_time_to_decide() -> None:
    """The engine cancels the guard with its decision; the slowest decision it still writes comes
    engine.connect_timeout + engine.decision_deadline after FreeSWITCH connects, and the guard
    must not cut that off (docs/real-switch-lab.md, "Frozen engine")."""
    from engine.config import Config

    engine = Config().engine
    assert guard_seconds() >= engine.connect_timeout + engine.decision_deadline + 1.0
