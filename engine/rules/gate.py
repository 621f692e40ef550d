"""The account gate (decision-rules §3): the account, then every reseller above it.

The funds themselves are checked by rating (§5), at each level's own price; the
gate checks existence, status and expiry. First use is reported, never written.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from engine.decision import Accept, Reason
from engine.model import Account
from engine.rules.catalog import Catalog
from engine.rules.refusal import Refusal
from engine.rules.text import plain_decimal, show


@dataclass(frozen=True, slots=True)
class FirstUse:
    """An account's first authorized call: the sync worker persists these values."""

    account_id: int
    first_used: datetime
    expiry: datetime | None  # set when the account's validity starts at first use


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def effective_expiry(account: Account) -> datetime | None:
    """The stored expiry; for first-use validity not yet persisted, first_used + valid_days."""
    if account.expiry is not None:
        return _utc(account.expiry)
    if account.expiry_from_first_use and account.first_used is not None and account.valid_days is not None:
        return _utc(account.first_used) + timedelta(days=account.valid_days)
    return None


def level_name(account: Account, position: int) -> str:
    return f"{'account' if position == 0 else 'reseller'} {account.number}"


def check_chain(
    account: Account | None, account_number: str, catalog: Catalog, now: datetime
) -> tuple[Account, ...] | Refusal:
    """The chain (account first, then each reseller to the top) if every level passes."""
    if account is None:
        return Refusal(Reason.ACCOUNT_INACTIVE, f"account {show(account_number)} not found")
    chain: list[Account] = []
    seen: set[int] = set()
    level: Account | None = account
    while level is not None:
        # (the level's name is formatted only for a refusal: level_name(level, position))
        if not level.usable:
            name = level_name(level, len(chain))
            return Refusal(Reason.ACCOUNT_INACTIVE, f"{name} is {'deleted' if level.deleted else 'inactive'}")
        expiry = effective_expiry(level)
        if expiry is not None and expiry < now:
            name = level_name(level, len(chain))
            return Refusal(Reason.ACCOUNT_EXPIRED, f"{name} expired {expiry.isoformat()}")
        position = len(chain)
        chain.append(level)
        seen.add(level.id)
        parent_id = level.reseller_id
        if parent_id is None:
            break
        if parent_id in seen:
            name = level_name(level, position)
            return Refusal(Reason.ACCOUNT_INACTIVE, f"reseller chain of {name} loops at {parent_id}")
        parent = catalog.accounts.get(parent_id)
        if parent is None:
            name = level_name(level, position)
            return Refusal(Reason.ACCOUNT_INACTIVE, f"reseller {parent_id} of {name} not found")
        level = parent
    return tuple(chain)


def describe_level(account: Account, position: int) -> str:
    name = level_name(account, position)
    if account.postpaid:
        return (
            f"{name} active, postpaid, available {plain_decimal(account.available_credit)} "
            f"(balance {plain_decimal(account.balance)} + credit limit {plain_decimal(account.credit_limit)})"
        )
    return f"{name} active, prepaid, available {plain_decimal(account.available_credit)}"


def first_use(account: Account, now: datetime) -> FirstUse | None:
    """What to record if this authorized call is the account's first, else None."""
    if account.first_used is not None:
        return None
    expiry = None
    if account.expiry_from_first_use and account.valid_days is not None:
        expiry = now + timedelta(days=account.valid_days)
    return FirstUse(account.id, now, expiry)


def first_uses(accept: Accept, catalog: Catalog, now: datetime) -> tuple[FirstUse, ...]:
    """First-use records due for an accepted call: every chain member not used before."""
    found = []
    for account_id in accept.chain:
        account = catalog.accounts.get(account_id)
        record = first_use(account, now) if account is not None else None
        if record is not None:
            found.append(record)
    return tuple(found)
