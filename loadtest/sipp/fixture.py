"""The callgate catalogue the SIPp suite expects: the demo catalogue, reachable from loopback.

``config/demo.yaml`` identifies its IP-map callers by documentation addresses (203.0.113.0/28,
198.51.100.0/28) that a SIPp caller on a lab machine cannot send from. :func:`lab_catalogue`
returns the same document with those maps moved onto loopback addresses (every 127.0.0.0/8
address is local on Linux, so SIPp can bind to any of them), plus what the demo lacks for the
suite: gateways that ring only, answer then hang up, or are dead; and three IP-map customers
for the limit and delay cases. Every gateway leads to the lab's callees (``GATEWAY_TARGETS``,
profile ``callgate``, no registration), so FreeSWITCH can also learn them from ``callgate fsxml``.
Nothing of the demo's expected outcomes changes.

Load it as any fixture::

    python -m loadtest.sipp catalogue > /tmp/lab.yaml && callgate load /tmp/lab.yaml
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

DEMO_PATH = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"

# Where each caller sends from. One place: the cases, the catalogue and the docs use these.
NORTHWIND_NET = "127.0.0.16/28"  # demo: 203.0.113.0/28
NORTHWIND_IP = "127.0.0.26"  # demo: 203.0.113.10
CARRIER_ALPHA_NET = "127.0.0.32/28"  # demo: 198.51.100.0/28
CARRIER_ALPHA_IP = "127.0.0.34"
STRANGER_IP = "127.0.0.99"  # demo: 192.0.2.50, in no IP map
DEVICE_IP = "127.0.0.1"  # SIP devices (digest auth), outside FreeSWITCH's no-auth ACL
LAB_CALLER_IP = "127.0.0.64"  # no limits: delay, duration, failover, outages
TWO_CHANNELS_IP = "127.0.0.65"  # max_channels 2
TWO_CPS_IP = "127.0.0.66"  # cps 2
# FreeSWITCH must let these through without a digest challenge (its inbound ACL).
NO_AUTH_NETWORKS = (NORTHWIND_NET, CARRIER_ALPHA_NET, "127.0.0.64/26")

# Destinations of the lab's own trunks (rate group "lab"); each trunk has one gateway.
ANSWER_PREFIX = "9704"  # gateway alpha-gw1: answers
BYE_PREFIX = "9701"  # gateway bye-gw: answers, hangs up 2 s later
RING_PREFIX = "9702"  # gateway ring-gw: rings until cancelled
DEAD_PREFIX = "9703"  # gateway dead-gw: nothing listens

# Where each gateway leads in the lab: the callee SIPp that plays its role (runner.DEFAULT_CALLEE_PORTS),
# or a port where nothing listens. FreeSWITCH's gateways must say the same, whether written in its
# XML or served by `callgate fsxml` from this catalogue.
SIP_PROFILE = "callgate"
GATEWAY_TARGETS = {
    "alpha-gw1": "127.0.0.1:5090",
    "alpha-gw2": "127.0.0.1:5090",
    "beta-gw1": "127.0.0.1:5099",  # dead: demo calls 1 and 4 fail over to beta-gw2
    "beta-gw2": "127.0.0.1:5090",
    "bye-gw": "127.0.0.1:5091",
    "ring-gw": "127.0.0.1:5092",
    "dead-gw": "127.0.0.1:5098",
}

LAB_GATEWAYS = {
    "bye-gw": "answers, then sends BYE after 2 s",
    "ring-gw": "sends 180 and never answers",
    "dead-gw": "nothing listens",
}


def _lab_additions() -> dict[str, Any]:
    trunks = [
        ("lab-answer", "alpha-gw1", ANSWER_PREFIX),
        ("lab-bye", "bye-gw", BYE_PREFIX),
        ("lab-ring", "ring-gw", RING_PREFIX),
        ("lab-dead", "dead-gw", DEAD_PREFIX),
    ]

    def customer(number: str, company: str, ip: str, **limits: int) -> dict[str, Any]:
        return {
            "number": number,
            "company": company,
            "email": f"lab{number[-2:]}@lab.example",
            "balance": "1000.00",
            "rate_group": "lab",
            "max_channels": limits.get("max_channels", 0),
            "cps": limits.get("cps", 0),
            "ip_map": [{"name": f"{company} (SIPp)", "cidr": f"{ip}/32"}],
        }

    return {
        "gateways": [
            {"name": name, "description": f"lab: {what}", "proxy": "127.0.0.1"}
            for name, what in LAB_GATEWAYS.items()
        ],
        "providers": [
            {
                "number": "9000000010",
                "company": "Lab Gateways Ltd",
                "email": "noc@lab.example",
                "notifications": False,
                "trunks": [
                    {
                        "name": name,
                        "gateway": gateway,
                        "precedence": 1,
                        "leg_timeout": 30,
                        "termination_rates": [{"prefix": prefix, "cost_per_minute": "0.0050"}],
                    }
                    for name, gateway, prefix in trunks
                ],
            }
        ],
        "rate_groups": [
            {
                "name": "lab",
                "description": "the SIPp suite's own destinations",
                "routing_type": "lcr",
                "init_inc": 1,
                "inc": 1,
                "trunks": [name for name, _, _ in trunks],
                "rates": [{"prefix": prefix, "cost_per_minute": "0.0100"} for _, _, prefix in trunks],
            }
        ],
        "customers": [
            customer("1000000030", "Lab Caller", LAB_CALLER_IP),
            customer("1000000031", "Lab Two Channels", TWO_CHANNELS_IP, max_channels=2),
            customer("1000000032", "Lab Two CPS", TWO_CPS_IP, cps=2),
        ],
    }


def lab_catalogue(demo: dict[str, Any]) -> dict[str, Any]:
    """The demo document with loopback IP maps and the lab's additions (a new document)."""
    doc = copy.deepcopy(demo)
    moved = {"203.0.113.0/28": NORTHWIND_NET, "198.51.100.0/28": CARRIER_ALPHA_NET}
    for section in ("providers", "customers", "resellers"):
        for account in doc.get(section) or []:
            for entry in account.get("ip_map") or []:
                entry["cidr"] = moved.get(entry["cidr"], entry["cidr"])
    for section, entries in _lab_additions().items():
        doc.setdefault(section, [])
        doc[section] = list(doc[section]) + entries
    for gateway in doc["gateways"]:  # the lab's callees; no registration towards them
        gateway.update(proxy=GATEWAY_TARGETS[gateway["name"]], register=False, sip_profile=SIP_PROFILE)
    return doc


def load_demo(path: Path = DEMO_PATH) -> dict[str, Any]:
    with open(path) as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


def render(path: Path = DEMO_PATH) -> str:
    text: str = yaml.safe_dump(lab_catalogue(load_demo(path)), sort_keys=False, allow_unicode=True)
    return text
