"""The pure decision rules: no I/O, no clock, no global random (see decide.py)."""

from engine.rules.catalog import Catalog
from engine.rules.config import RulesConfig
from engine.rules.decide import NUMBER_HANDLING, CallState, DecisionContext, decide
from engine.rules.gate import FirstUse, first_use, first_uses
from engine.rules.localization import CompiledRules, LocalizationError, parse_rules, validate_rules

__all__ = [
    "NUMBER_HANDLING",
    "CallState",
    "Catalog",
    "CompiledRules",
    "DecisionContext",
    "FirstUse",
    "LocalizationError",
    "RulesConfig",
    "decide",
    "first_use",
    "first_uses",
    "parse_rules",
    "validate_rules",
]
