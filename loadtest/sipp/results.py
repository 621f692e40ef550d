"""Per-call results from the callers' ``<log>`` lines, and the results table (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from loadtest.sipp.scenarios import LOG_TAG

FIELDS = 14  # CGLAB;call-id;outcome;final;18x;t0 s;t0 us;t1 s;t1 us;t2 s;t2 us;t3 s;t3 us;reason


@dataclass(frozen=True)
class CallResult:
    call_id: str
    outcome: str  # local_bye, remote_bye, refused, cancelled
    final_code: str  # "200", "503", ... ("" if none)
    ring_code: str  # first 18x ("180"/"183") or ""
    t_invite: float | None
    t_ring: float | None
    t_final: float | None
    t_end: float | None  # BYE sent or received
    bye_reason: str = ""
    # The A leg's CHANNEL_HANGUP_COMPLETE as FreeSWITCH's inbound socket saw it (--esl):
    # callgate_* variables, hangup cause; empty when not watched.
    channel: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def callgate_reason(self) -> str | None:
        """The CDR's callgate_reason ("" when unset); None when the channel was not watched."""
        return self.channel.get("callgate_reason", "") if self.channel else None

    @property
    def pdd_ms(self) -> float | None:
        """Post-dial delay: INVITE sent -> first 180/183 received."""
        return _delta_ms(self.t_invite, self.t_ring)

    @property
    def final_ms(self) -> float | None:
        return _delta_ms(self.t_invite, self.t_final)

    @property
    def talk_seconds(self) -> float | None:
        """200 received -> the BYE (for a BYE from FreeSWITCH: when it arrived)."""
        ms = _delta_ms(self.t_final, self.t_end) if self.final_code == "200" else None
        return None if ms is None else ms / 1000


def _delta_ms(start: float | None, end: float | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start) * 1000


def _time(seconds: str, micros: str) -> float | None:
    """SIPp prints its gettimeofday doubles as ``1796565700.000000`` and ``437716.000000``;
    a variable never set prints empty or 0."""
    try:
        s, us = float(seconds), float(micros)
    except ValueError:
        return None
    if s <= 0:
        return None
    return s + us / 1e6


def _code(text: str) -> str:
    """``SIP/2.0 503`` (what the scenario captures) -> ``503``."""
    text = text.strip()
    return text.rsplit(" ", 1)[-1] if text else ""


def parse_line(line: str) -> CallResult | None:
    parts = line.rstrip("\r\n").split(";", FIELDS - 1)
    if len(parts) != FIELDS or parts[0] != LOG_TAG:
        return None
    _, call_id, outcome, final, ring, t0s, t0us, t1s, t1us, t2s, t2us, t3s, t3us, reason = parts
    reason = reason.strip()
    if reason.lower().startswith("reason:"):
        reason = reason[len("reason:") :].strip()
    return CallResult(
        call_id=call_id,
        outcome=outcome,
        final_code=_code(final),
        ring_code=_code(ring),
        t_invite=_time(t0s, t0us),
        t_ring=_time(t1s, t1us),
        t_final=_time(t2s, t2us),
        t_end=_time(t3s, t3us),
        bye_reason=reason,
    )


def parse_log(lines: Iterable[str]) -> list[CallResult]:
    """Every call's line; a call logged twice (SIPp retrying the log) counts once."""
    seen: dict[str, CallResult] = {}
    for line in lines:
        result = parse_line(line)
        if result is not None:
            seen.setdefault(result.call_id, result)
    return list(seen.values())


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest rank (as loadtest.stats): the smallest value with pct% of the values at or below."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def pdd_summary(results: Sequence[CallResult]) -> dict[str, float]:
    delays = [d for d in (r.pdd_ms for r in results) if d is not None]
    if not delays:
        return {"n": 0}
    return {
        "n": len(delays),
        "mean": sum(delays) / len(delays),
        "p50": percentile(delays, 50),
        "p90": percentile(delays, 90),
        "max": max(delays),
    }


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """A Markdown table (what the docs carry), columns padded for the terminal."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{labels}': value} (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: value - before.get(name, 0.0) for name, value in after.items()}
