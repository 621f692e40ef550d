"""The one failure type every rule step returns; `decide` turns it into a Reject."""

from __future__ import annotations

from dataclasses import dataclass

from engine.decision import Reason


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: Reason
    detail: str
    account_id: int | None = None  # set when the step knows the account better than the caller's
