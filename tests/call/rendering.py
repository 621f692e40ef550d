"""Test helper: structured legs as the dial targets FreeSWITCH receives."""

from __future__ import annotations

from collections.abc import Iterable

from engine.call.render import dial_target
from engine.decision import Leg


def targets(legs: Iterable[Leg]) -> tuple[str, ...]:
    return tuple(dial_target(leg) for leg in legs)
