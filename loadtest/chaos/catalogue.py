"""The chaos run's catalogue: accounts with channel limits, prepaid accounts whose funds run low, a
reseller chain, and a caller nobody knows. Prices are per second (init_inc 1, inc 1)."""

from __future__ import annotations

from typing import Any

PER_SECOND = {"init_inc": 1, "inc": 1}
DESTINATION = "441234567890"
SPARE = "1000000099"  # never calls: the sync-burst fault edits its max_channels


def _customer(number: str, user: str, balance: str, max_channels: int, **extra: Any) -> dict[str, Any]:
    return {
        "number": number,
        "email": f"{user}@example.com",
        "password": "Chaos2024xx",
        "balance": balance,
        "rate_group": "retail",
        "max_channels": max_channels,
        "sip_devices": [{"username": user, "password": "Secret123x"}],
        **extra,
    }


CATALOGUE: dict[str, Any] = {
    "gateways": [{"name": "gw-a"}],
    "providers": [
        {
            "number": "9000000001",
            "company": "Carrier A",
            "trunks": [
                {
                    "name": "carrier-a",
                    "gateway": "gw-a",
                    "termination_rates": [{"prefix": "44", "cost_per_minute": "0.24", **PER_SECOND}],
                }
            ],
        }
    ],
    "rate_groups": [
        {
            "name": "wholesale",
            "trunks": ["carrier-a"],
            "rates": [{"prefix": "44", "cost_per_minute": "0.36", **PER_SECOND}],
        },
        {
            "name": "retail",
            "trunks": ["carrier-a"],
            "rates": [{"prefix": "44", "cost_per_minute": "0.60", **PER_SECOND}],
        },
    ],
    "resellers": [
        {
            "number": "2000000001",
            "email": "ops@reseller.example",
            "password": "Reseller2024",
            "balance": "500.00",
            "rate_group": "wholesale",
            "max_channels": 20,
            "customers": [_customer("2000000101", "resold", "50.00", 4)],
        }
    ],
    "customers": [
        _customer("1000000001", "alice", "1000.00", 4),
        _customer("1000000002", "bob", "1000.00", 3),
        _customer("1000000003", "burst", "1000.00", 30),
        _customer("1000000011", "pre1", "1.50", 10),
        _customer("1000000012", "pre2", "1.50", 10),
        _customer(SPARE, "spare", "0.00", 1),
    ],
}

# The steady callers of each switch: (sip user, number of callers). alice and bob have more callers
# than channels (CONCURRENT_LIMIT in the mix), pre1/pre2 run out of funds (NO_SUFFICIENT_FUND),
# "nobody" is no device at all (refused).
CALLERS: tuple[tuple[str, int], ...] = (
    ("alice", 3),
    ("bob", 2),
    ("resold", 2),
    ("pre1", 1),
    ("pre2", 1),
    ("nobody", 1),
)
PREPAID = ("1000000011", "1000000012")
