"""Instructions per call of the hangup side's parts (issue 18, round 5), for callgrind.

Step 1 records the real inputs of the hangup side from ``loadtest.inprocess`` (the decoded
CHANNEL_HANGUP_COMPLETE, the billing ticket and the recorded figures of every call, and
each settlement sent to Redis)::

    python -m loadtest.hangup_cost capture --calls 300 --mix accept    # -> /tmp/hangup_inputs.pkl

Step 2 runs one part N times over them; under callgrind, N runs minus 0 runs, over N::

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m loadtest.hangup_cost bench parse 2000 [--billsec]       # and ... parse 0

Parts: parse (parse_hangup), rate (rate_call), cdr (ticket_cdr: answered_cdr), ticket
(ticket_settlement: the three), settle_call (the settle script's KEYS/ARGV, CDR JSON
included), settle_pack (that and its packing for the wire), release_pack (a limits
release's command, packed). ``--billsec`` replaces the load driver's 0-second calls by
1-900 s ones (seeded), so that the rating computes amounts.
"""

from __future__ import annotations

import pickle
import random
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.billing.funds import Settlement

INPUTS = "/tmp/hangup_inputs.pkl"


def capture(argv: list[str]) -> None:
    import engine.billing.calls as calls
    import engine.billing.funds as funds
    from loadtest.inprocess import main

    tickets: list[Any] = []
    items: list[Any] = []
    body = calls.ticket_settlement
    settle_many = funds.Funds.settle_many

    # the engine's hangups (held_settlement, call_settlement) and the CDR post all end here
    def recording_settlement(headers: Any, ticket: Any, recorded: Any) -> Any:
        out = body(headers, ticket, recorded)
        tickets.append((dict(headers), ticket, {d.account_id: recorded(d.account_id) for d in out[1].debits}))
        return out

    def recording_settle_many(self: funds.Funds, batch: Sequence[Settlement]) -> list[bool]:
        items.extend(batch)
        return settle_many(self, batch)

    calls.ticket_settlement = recording_settlement
    funds.Funds.settle_many = recording_settle_many  # type: ignore[method-assign,assignment]
    try:
        main(argv)
    finally:
        with open(INPUTS, "wb") as out:
            pickle.dump({"tickets": tickets, "items": items}, out)
        print(f"captured {len(tickets)} hangups, {len(items)} settlements -> {INPUTS}", file=sys.stderr)


def bench(part: str, n: int, billsec: bool) -> None:
    import redis

    from engine.billing import calls, hangup, rating
    from engine.billing.funds import Funds
    from engine.state.direct import DirectConnections
    from engine.state.limits.redis import _RELEASE_SCRIPT, Limiter

    with open(INPUTS, "rb") as source:
        tickets = pickle.load(source)["tickets"]
    if billsec:
        rnd = random.Random(7)
        for headers, _, _ in tickets:
            seconds = rnd.randint(1, 900)
            headers["variable_billsec"] = str(seconds)
            headers["variable_duration"] = str(seconds + 3)
            answered = int(headers["variable_answer_uepoch"])
            headers["variable_end_uepoch"] = str(answered + seconds * 1_000_000 + 123)
    prepared = []
    for headers, ticket, figures in tickets:
        recorded = figures.get
        item, rated, end = calls.ticket_settlement(headers, ticket, recorded)
        prepared.append((headers, ticket, recorded, end, rated, item))
    funds = Funds(redis.Redis(), "bench:")
    direct = DirectConnections(redis.Connection, {}, 1, 1.0)
    connection = redis.Connection()
    limiter = Limiter(redis.Redis(), "bench:")
    m = len(prepared)

    def one(i: int) -> None:
        headers, ticket, recorded, end, rated, item = prepared[i % m]
        if part == "parse":
            hangup.parse_hangup(headers)
        elif part == "rate":
            rating.rate_call(ticket.pricing, end.billsec, end.carried_leg)
        elif part == "cdr":
            calls.ticket_cdr(end, ticket, rated)
        elif part == "ticket":
            calls.ticket_settlement(headers, ticket, recorded)
        elif part == "settle_call":
            funds._settle_call(item)
        elif part == "settle_pack":
            keys, args = funds._settle_call(item)
            direct._pack(connection, ("EVALSHA", "x" * 40, len(keys), *keys, *args))
        elif part == "release_pack":
            uuid = item.uuid
            command = ("EVALSHA", _RELEASE_SCRIPT.sha, 2, limiter.registry_key, limiter.call_key(uuid), uuid)
            direct._pack(connection, command)
        else:
            raise SystemExit(f"unknown part {part!r}")

    for i in range(n):
        one(i)


if __name__ == "__main__":
    if sys.argv[1:2] == ["capture"]:
        capture(sys.argv[2:])
    else:
        bench(sys.argv[2], int(sys.argv[3]), "--billsec" in sys.argv)
