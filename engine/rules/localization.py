"""Number translation rule sets (decision-rules §4.2 and §6): parsed once, applied per call.

A rule set is written ``match/replace,match/replace,...`` and its pairs run in order,
each one on the result of the previous one, as plain prefix rewrites:

- ``X/Y``  a number starting with X has that X replaced by Y;
- ``X/*`` or ``X/``  a leading X is removed;
- ``*/Y``  Y is put in front of every number;
- whitespace anywhere is ignored; an empty set has no rules.

A match is ``*`` or a non-empty run of ``0-9``, ``+`` and ``#``; a replacement is ``*``
or such a run, possibly empty. This is exactly the grammar the database enforces
(``callgate_valid_rules`` in the first migration), so anything saved there parses
here. Anything else is refused by :func:`parse_rules` with a
:class:`LocalizationError` that names the offending pair: a bad set is refused when
it is saved, never discovered while a call waits.

The parsed form is immutable; ``*`` is stored as the empty match (every number
starts with ""), so applying a set is one ``startswith`` and one concatenation per
pair, with no regular expression and no allocation when nothing matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.model import Localization

_RUN = frozenset("0123456789+#")


class LocalizationError(ValueError):
    """A rule set that cannot be saved; ``position`` (1-based) and ``pair`` name the culprit."""

    def __init__(self, message: str, position: int = 0, pair: str = "") -> None:
        super().__init__(message)
        self.position = position
        self.pair = pair


@dataclass(frozen=True, slots=True)
class Rule:
    match: str  # "" stands for "*": every number (prepend)
    replace: str
    text: str  # the pair as written, whitespace removed: shown by explain

    def rewrite(self, number: str) -> str:
        if number.startswith(self.match):
            return self.replace + number[len(self.match) :]
        return number


@dataclass(frozen=True, slots=True)
class CompiledRules:
    rules: tuple[Rule, ...] = ()
    _pairs: tuple[tuple[str, str, int], ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        pairs = tuple((rule.match, rule.replace, len(rule.match)) for rule in self.rules)
        object.__setattr__(self, "_pairs", pairs)

    def __bool__(self) -> bool:
        return bool(self.rules)

    @property
    def text(self) -> str:
        return ",".join(rule.text for rule in self.rules)

    def apply(self, number: str) -> str:
        """The hot path: every pair in order, each on the previous result."""
        for match, replace, length in self._pairs:
            if number.startswith(match):
                number = replace + number[length:]
        return number

    def trace(self, number: str) -> tuple[str, list[tuple[str, str, str]]]:
        """Like :meth:`apply`, plus (before, after, rule text) for each pair that changed
        the number (for explain only)."""
        changes: list[tuple[str, str, str]] = []
        for rule in self.rules:
            after = rule.rewrite(number)
            if after != number:
                changes.append((number, after, rule.text))
            number = after
        return number, changes


NO_RULES = CompiledRules()


def _side(value: str, *, is_match: bool) -> str | None:
    """The stored form of one side of a pair, or None if it is not allowed."""
    if value == "*":
        return ""
    if not value:
        return None if is_match else ""
    return value if all(ch in _RUN for ch in value) else None


def parse_rules(text: str) -> CompiledRules:
    """Parse a rule set; raises LocalizationError naming the first bad pair."""
    compact = "".join(text.split())
    if not compact:
        return NO_RULES
    rules = []
    for position, pair in enumerate(compact.split(","), start=1):
        where = f"rule {position} {pair!r}"
        if not pair:
            raise LocalizationError(f"rule {position} is empty (stray comma)", position, pair)
        if pair.count("/") != 1:
            raise LocalizationError(f"{where}: expected exactly one '/' (match/replace)", position, pair)
        raw_match, raw_replace = pair.split("/")
        if not raw_match:
            raise LocalizationError(f"{where}: the match is empty (use '*' to prepend)", position, pair)
        match = _side(raw_match, is_match=True)
        if match is None:
            raise LocalizationError(
                f"{where}: the match must be '*' or digits (0-9, +, #), got {raw_match!r}", position, pair
            )
        replace = _side(raw_replace, is_match=False)
        if replace is None:
            raise LocalizationError(
                f"{where}: the replacement must be '*', empty or digits (0-9, +, #), got {raw_replace!r}",
                position,
                pair,
            )
        rules.append(Rule(match, replace, pair))
    return CompiledRules(tuple(rules))


def validate_rules(text: str) -> str | None:
    """For admin forms and importers: None if ``text`` is a valid rule set, else why not."""
    try:
        parse_rules(text)
    except LocalizationError as exc:
        return str(exc)
    return None


RULE_SETS = ("number_originate", "cli_originate", "cli_inbound", "number_terminate", "cli_terminate")
"""The rule-set fields of engine.model.Localization."""


@dataclass(frozen=True, slots=True)
class CompiledLocalization:
    """An active localization with its five rule sets parsed (a malformed set: no rules)."""

    id: int
    name: str
    number_originate: CompiledRules = NO_RULES
    cli_originate: CompiledRules = NO_RULES
    cli_inbound: CompiledRules = NO_RULES
    number_terminate: CompiledRules = NO_RULES
    cli_terminate: CompiledRules = NO_RULES


def compile_localization(localization: Localization, problems: list[str]) -> CompiledLocalization:
    """Parse every rule set; one that does not parse is left out (no rules) and reported."""
    sets: dict[str, CompiledRules] = {}
    for name in RULE_SETS:
        try:
            sets[name] = parse_rules(getattr(localization, name))
        except LocalizationError as exc:
            problems.append(
                f"localization {localization.id} {localization.name!r} {name}: {exc}; rule set ignored"
            )
    return CompiledLocalization(localization.id, localization.name, **sets)
