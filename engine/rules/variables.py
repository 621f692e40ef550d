"""Channel variables a decision sets on the call, in the order to set them (§1, §5, §6, §8).

Every value is passed through ``safe_text``: caller-ID text comes from a SIP
header, and a value must never end an ESL command (newline) or be expanded by
FreeSWITCH's `set` (``${...}``).
"""

from __future__ import annotations

from engine.decision import Accept, Reject
from engine.rules.text import plain_decimal, safe_text


def channel_variables(accept: Accept) -> list[tuple[str, str]]:
    pairs = [
        ("callgate_account", accept.account_number),
        ("callgate_reseller_chain", ",".join(level.account_number for level in accept.levels[1:])),
    ]
    if accept.levels:
        customer = accept.levels[0]
        pairs.append(("callgate_rate", f"{customer.prefix}:{plain_decimal(customer.cost_per_minute)}"))
    pairs.append(("callgate_max_duration", str(accept.max_duration)))
    pairs.append(("callgate_routes", ",".join(route.trunk_name for route in accept.routes)))
    if accept.caller_id_changed:
        pairs.append(("effective_caller_id_number", accept.caller_id_number))
        pairs.append(("effective_caller_id_name", accept.caller_id_name))
    pairs.append(("callgate_direction", accept.direction.value))
    if accept.did_id is not None:
        pairs.append(("callgate_did", str(accept.did_id)))
    pairs.append(("continue_on_fail", "true"))
    pairs.append(("hangup_after_bridge", "true"))
    # FreeSWITCH matches cause names exactly (case aside): the common spelling "alloted_timeout"
    # is no cause at all, so the CDR would not say why the call ended.
    pairs.append(("execute_on_answer", f"sched_hangup +{accept.max_duration} ALLOTTED_TIMEOUT"))
    return [(name, safe_text(value)) for name, value in pairs]


def reject_variables(reject: Reject) -> list[tuple[str, str]]:
    return [("callgate_reason", reject.reason.value)]
