"""What the suite places and what each case must produce (pure data and pure checks).

The demo cases are ``config/demo.yaml``'s numbered demo calls, with the expected outcome its
header states, as the SIP caller sees it: the code is FreeSWITCH's answer to the INVITE after
callgate decided (callgate's reject codes: 403, 404, 402, 503; an accepted call is a 200 from
the gateway's callee). The lab cases use the catalogue's additions (:mod:`loadtest.sipp.fixture`).
Cases that need the engine or Redis stopped run only when the operator gives the commands
that do it (``--hook``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from loadtest.sipp import fixture as fx
from loadtest.sipp.results import CallResult, percentile

ALICE = ("alice", "Wd3kM9pQs7Vx")
BRIGHT = ("2000000101", "Zq7rT2vLx9Kp")
HARBOR = ("2000000102", "Hb4nW8qPz2Rm")


@dataclass(frozen=True)
class Caller:
    ip: str
    user: str = "lab"  # the From user; the digest username when FreeSWITCH challenges
    password: str = ""
    cid: str = "1000"


@dataclass(frozen=True)
class Expect:
    codes: dict[str, int]  # final code -> how many calls ("200": answered)
    remote_bye_reason: str = ""  # FreeSWITCH's BYE must carry this text in its Reason
    answered_seconds: tuple[float, float] | None = None  # answer -> FreeSWITCH's BYE, bounds
    max_final_ms: float | None = None  # INVITE -> final answer, upper bound
    # callgate_reason in the CDR (checked when the suite watches FreeSWITCH's inbound socket):
    # how many calls carry each value; "" = unset. None: not checked.
    reasons: dict[str, int] | None = None
    # Increase of engine metrics over the case (checked with --metrics), e.g.
    # {'callgate_socket_errors_total{kind="gone"}': 1}.
    metric_deltas: dict[str, float] | None = None
    decided: bool = True  # callgate decided the calls (False: it could not; the CDR keeps the dialplan's)
    # Other acceptable code counts (a result that depends on state outside the catalogue).
    alternatives: tuple[dict[str, int], ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    what: str
    caller: Caller
    dest: str
    expect: Expect
    scenario: str = "caller.xml"
    calls: int = 1
    rate: float = 10.0  # calls per second
    hook_before: str = ""  # hook run before the calls (e.g. engine-down)
    hook_after: str = ""  # hook run after them (e.g. engine-up)
    slow: bool = False  # only with --slow (takes long by design)
    wait_seconds: float = 60.0  # SIPp's global timeout for the case
    needs: str = (
        ""  # a prerequisite named like a hook ("slow-path": --slow-prefix, "late-path": --late-prefix)
    )
    tags: tuple[str, ...] = field(default_factory=tuple)


def _device(user_pw: tuple[str, str], cid: str) -> Caller:
    return Caller(fx.DEVICE_IP, user_pw[0], user_pw[1], cid)


NORTHWIND = Caller(fx.NORTHWIND_IP, "northwind", cid="12125550100")
LAB = Caller(fx.LAB_CALLER_IP, "lab")


def _one(code: str, reason: str | None = None, **kw: object) -> Expect:
    return Expect({code: 1}, reasons=None if reason is None else {reason: 1}, **kw)  # type: ignore[arg-type]


# The dialplan sets this before `socket`; a call callgate decided must not keep it (issue 14).
UNREACHABLE = "ENGINE_UNREACHABLE"

# A frozen engine costs the caller the dialplan's guard (`sched_hangup +4` in
# dialplan/callgate.xml) plus FreeSWITCH's scheduler tick; without the guard it was ~35 s.
FROZEN_ENGINE_MAX_MS = 6000


def demo_cases() -> list[Case]:
    alice = _device(ALICE, "442079460001")
    return [
        Case(
            "demo-01",
            "accept",
            "alice, UK London; beta-gw1 dead -> failover to beta-gw2",
            alice,
            "00442079460123",
            _one("200"),
        ),
        Case("demo-02", "accept", "alice, speed dial 1", alice, "1", _one("200")),
        Case(
            "demo-03", "accept", "alice, UK mobile (alpha-main first)", alice, "00447700900123", _one("200")
        ),
        Case(
            "demo-04",
            "accept",
            "alice, Nigeria, forced trunk beta-premium",
            alice,
            "2348123456789",
            _one("200"),
        ),
        Case(
            "demo-05",
            "reject",
            "alice, blocked code 449: DESTINATION_BLOCKED",
            alice,
            "00449012345678",
            _one("403", "DESTINATION_BLOCKED"),
        ),
        Case(
            "demo-06",
            "accept",
            "alice -> on-net 2000000101 (480 after callgate's accept unless the device is registered)",
            alice,
            "2000000101",
            Expect({"480": 1}, alternatives=({"200": 1},)),
        ),
        Case(
            "demo-07",
            "accept",
            "Northwind by IP map, tech prefix 7788, its DID as CLI",
            NORTHWIND,
            "778812125550123",
            _one("200"),
        ),
        Case(
            "demo-08",
            "accept",
            "Northwind, unknown CLI: non-CLI rate group",
            Caller(fx.NORTHWIND_IP, "northwind", cid="15550001111"),
            "7788442079460123",
            _one("200"),
        ),
        Case(
            "demo-09",
            "reject",
            "source outside every IP map: AUTHENTICATION_FAIL",
            Caller(fx.STRANGER_IP, "stranger"),
            "7788442071112222",
            _one("403", "AUTHENTICATION_FAIL"),
        ),
        Case(
            "demo-10",
            "accept",
            "Bright Dental (reseller ACME's customer), Germany mobile",
            _device(BRIGHT, "442079460201"),
            "004915112345678",
            _one("200"),
        ),
        Case(
            "demo-11",
            "accept",
            "Harbor Logistics (postpaid under ACME), France mobile",
            _device(HARBOR, "442039990102"),
            "33612345678",
            _one("200"),
        ),
        Case(
            "demo-12a",
            "accept",
            "Carrier Alpha -> alice's DID -> her device (480 unless registered)",
            Caller(fx.CARRIER_ALPHA_IP, "alpha", cid="447700900555"),
            "442071234567",
            Expect({"480": 1}, alternatives=({"200": 1},)),
        ),
        Case(
            "demo-12b",
            "reject",
            "Carrier Alpha -> unassigned DID: NO_ROUTE_DESTINATION",
            Caller(fx.CARRIER_ALPHA_IP, "alpha", cid="447700900555"),
            "442039990000",
            _one("404", "NO_ROUTE_DESTINATION"),
        ),
    ]


def lab_cases(max_duration: float, pdd_calls: int) -> list[Case]:
    ans = fx.ANSWER_PREFIX + "0001"
    return [
        Case(
            "callee-bye",
            "call",
            "gateway answers, hangs up 2 s later: caller gets FreeSWITCH's BYE",
            LAB,
            fx.BYE_PREFIX + "0001",
            Expect({"200": 1}, remote_bye_reason="NORMAL_CLEARING", answered_seconds=(1.5, 3.0)),
            scenario="caller_wait.xml",
        ),
        Case(
            "caller-cancel",
            "call",
            "gateway rings, caller cancels after 1 s",
            LAB,
            fx.RING_PREFIX + "0001",
            _one("487"),
            scenario="caller_cancel.xml",
        ),
        Case(
            "all-routes-fail",
            "failover",
            "only route is a dead gateway: bridge fails, callgate hangs up",
            LAB,
            fx.DEAD_PREFIX + "0001",
            _one("503", max_final_ms=5000),
        ),
        # The "Caution" of docs/real-switch-lab.md: the dialplan's park_timeout (10 s) against a
        # bridge that rings longer (the lab trunks' leg_timeout is 30 s) and then fails. callgate's
        # own hang-up must give the caller the bridge's cause, with ROUTES_FAILED in the CDR.
        Case(
            "ring-timeout",
            "failover",
            "gateway rings past the park timeout, leg times out: the bridge's cause, not park's",
            LAB,
            fx.RING_PREFIX + "0002",
            _one("480", "ROUTES_FAILED", max_final_ms=40000),
            slow=True,
            wait_seconds=60,
        ),
        Case(
            "max-duration",
            "duration",
            f"caller never hangs up: sched_hangup ends it at the allowance ({max_duration:g} s)",
            LAB,
            ans,
            Expect(
                {"200": 1},
                remote_bye_reason="ALLOTTED_TIMEOUT",
                answered_seconds=(max_duration - 1.0, max_duration + 1.5),
            ),
            scenario="caller_wait.xml",
            wait_seconds=max_duration + 30,
        ),
        Case(
            "concurrent-limit",
            "limits",
            "5 calls at once from an account limited to 2 channels",
            Caller(fx.TWO_CHANNELS_IP, "two"),
            ans,
            Expect({"200": 2, "503": 3}, reasons={"CONCURRENT_LIMIT": 3}),
            calls=5,
            rate=50.0,
        ),
        Case(
            "cps-limit",
            "limits",
            "6 calls in 120 ms from an account limited to 2 CPS",
            Caller(fx.TWO_CPS_IP, "cps"),
            ans,
            Expect({"200": 2, "503": 4}, reasons={"CPS_LIMIT": 4}),
            calls=6,
            rate=50.0,
            scenario="caller_short.xml",
        ),
        Case(
            "engine-down",
            "outage",
            "no engine listening: the dialplan's 503, fast",
            LAB,
            ans,
            _one("503", UNREACHABLE, max_final_ms=3000),
            hook_before="engine-down",
            hook_after="engine-up",
        ),
        Case(
            "engine-frozen",
            "outage",
            "engine accepts the socket, never speaks: the dialplan's guard answers 503",
            LAB,
            ans,
            _one("503", UNREACHABLE, max_final_ms=FROZEN_ENGINE_MAX_MS),
            hook_before="engine-freeze",
            hook_after="engine-thaw",
            wait_seconds=40,
        ),
        # issue 14, defect 1: FreeSWITCH slow to return the +OKs (a path that delays them, and an
        # engine whose reply_timeout is shorter): the calls must stay counted, as they connect.
        Case(
            "slow-replies",
            "defects",
            "5 calls, 200 ms apart, from the 2-channel account; FreeSWITCH's replies arrive late",
            Caller(fx.TWO_CHANNELS_IP, "two"),
            ans,
            Expect({"200": 2, "503": 3}, reasons={"CONCURRENT_LIMIT": 3}),
            calls=5,
            rate=5.0,
            needs="slow-path",
        ),
        # issue 14, defect 5: the caller hangs up before the engine's `connect` reached FreeSWITCH
        # (a path that delays what the engine sends): FreeSWITCH's disconnect notice comes first.
        Case(
            "abandoned",
            "defects",
            "caller cancels 200 ms after the 100, before the engine's connect arrives",
            LAB,
            ans,
            Expect(
                {"487": 1},
                metric_deltas={
                    'callgate_socket_errors_total{kind="gone"}': 1,
                    'callgate_socket_errors_total{kind="protocol"}': 0,
                },
                decided=False,
            ),
            scenario="caller_abandon.xml",
            needs="late-path",
        ),
        # SIP devices registered (--register-devices): the answering callee stands for the phones.
        Case(
            "device-onnet",
            "devices",
            "alice (digest) -> on-net 2000000101, registered: user/2000000101@<her domain>",
            _device(ALICE, "442079460001"),
            "2000000101",
            _one("200"),
            needs="devices",
        ),
        # issue 14, defect 5: a carrier's call to a DID that rings a device (no digest: no domain_name)
        Case(
            "device-did",
            "devices",
            "Carrier Alpha -> alice's DID -> her registered device",
            Caller(fx.CARRIER_ALPHA_IP, "alpha", cid="447700900555"),
            "442071234567",
            _one("200"),
            needs="devices",
        ),
        # An account with limits: its decision needs Redis (an unlimited one is decided from the
        # in-memory snapshot until engine.snapshot_max_age).
        Case(
            "redis-down",
            "outage",
            "Redis unresponsive: ENGINE_DEGRADED 503; then how long until calls pass once it is back",
            Caller(fx.TWO_CHANNELS_IP, "two"),
            ans,
            _one("503", "ENGINE_DEGRADED", max_final_ms=3000),
            hook_before="redis-down",
            hook_after="redis-up",
            tags=("redis-recovery",),
        ),
    ]


def select(
    cases: list[Case], only: list[str], hooks: set[str], slow: bool
) -> tuple[list[Case], list[tuple[Case, str]]]:
    """The cases to run, and the skipped ones with why. ``only``: names or groups (empty: all)."""
    chosen: list[Case] = []
    skipped: list[tuple[Case, str]] = []
    for case in cases:
        if only and case.name not in only and case.group not in only:
            continue
        missing = [h for h in (case.hook_before, case.hook_after) if h and h not in hooks]
        if case.needs and case.needs not in hooks:
            option = {"devices": "register-devices"}.get(case.needs, case.needs.replace("-path", "-prefix"))
            skipped.append((case, f"needs --{option}"))
        elif missing:
            skipped.append((case, "needs --hook " + ", ".join(f"{h}=..." for h in missing)))
        elif case.slow and not slow:
            skipped.append((case, "slow: needs --slow"))
        else:
            chosen.append(case)
    return chosen, skipped


@dataclass(frozen=True)
class Verdict:
    ok: bool
    observed: str
    notes: tuple[str, ...] = ()


def code_counts(results: list[CallResult]) -> Counter[str]:
    return Counter(r.final_code or "none" for r in results)


def check(case: Case, results: list[CallResult], metric_deltas: dict[str, float] | None = None) -> Verdict:
    """Compare what the callers saw with the case's expectation."""
    counts = code_counts(results)
    observed = ", ".join(f"{n}x{code}" for code, n in sorted(counts.items()))
    notes: list[str] = []
    ok = len(results) == case.calls and (
        dict(counts) == case.expect.codes or dict(counts) in case.expect.alternatives
    )
    if len(results) != case.calls:
        notes.append(f"{len(results)} of {case.calls} calls reported")
    if case.expect.remote_bye_reason:
        byes = [r for r in results if r.outcome == "remote_bye"]
        if not byes or not all(case.expect.remote_bye_reason in r.bye_reason for r in byes):
            ok = False
            notes.append("no FreeSWITCH BYE" if not byes else f"BYE reason {byes[0].bye_reason!r}")
        else:
            notes.append(f"BYE {byes[0].bye_reason}")
    if case.expect.answered_seconds is not None:
        lo, hi = case.expect.answered_seconds
        talk = [r.talk_seconds for r in results if r.talk_seconds is not None]
        if not talk or not all(lo <= t <= hi for t in talk):
            ok = False
        if talk:
            notes.append(f"answer->BYE {max(talk):.2f} s (expected {lo:g}-{hi:g})")
    if case.expect.max_final_ms is not None:
        finals = [r.final_ms for r in results if r.final_ms is not None]
        worst = max(finals) if finals else None
        if worst is None or worst > case.expect.max_final_ms:
            ok = False
        if worst is not None:
            notes.append(f"INVITE->final {worst:.0f} ms")
    elif any(r.final_ms is not None for r in results):
        finals = [r.final_ms for r in results if r.final_ms is not None]
        notes.append(f"INVITE->final p50 {percentile(finals, 50):.0f} ms")
    channel_ok, channel_notes = check_channels(case, results)
    metrics_ok, metric_notes = check_metrics(case, metric_deltas)
    return Verdict(ok and channel_ok and metrics_ok, observed, tuple(notes + channel_notes + metric_notes))


def check_metrics(case: Case, deltas: dict[str, float] | None) -> tuple[bool, list[str]]:
    """The engine's counters moved as the case expects (only when the suite reads them)."""
    expected = case.expect.metric_deltas
    if not expected or deltas is None:
        return True, []
    ok = True
    notes = []
    for name, want in expected.items():
        got = deltas.get(name)
        if got != want:
            ok = False
        notes.append(f"{name} +{got:g}" if got is not None else f"{name} missing")
    return ok, notes


def check_channels(case: Case, results: list[CallResult]) -> tuple[bool, list[str]]:
    """What FreeSWITCH recorded (only for calls whose CDR the suite saw, --esl): the reasons the
    case expects on the calls not answered; never ENGINE_UNREACHABLE on a call callgate decided;
    an accepted call's callgate_rate is ``prefix:cost`` (an empty prefix once gave ``:0.001``)."""
    watched = [r for r in results if r.callgate_reason is not None]
    if not watched:
        return True, []
    ok = True
    reasons = Counter(r.callgate_reason or "" for r in watched)
    notes = ["callgate_reason " + ", ".join(f"{n}x{k or '(unset)'}" for k, n in sorted(reasons.items()))]
    expected = case.expect.reasons
    if expected is not None:
        refused = Counter(r.callgate_reason or "" for r in watched if r.final_code != "200")
        if dict(refused) != expected:
            ok = False
            notes.append("expected " + ", ".join(f"{n}x{k}" for k, n in sorted(expected.items())))
    if case.expect.decided and UNREACHABLE not in (expected or {}) and reasons.get(UNREACHABLE):
        ok = False
        notes.append(f"{reasons[UNREACHABLE]} decided call(s) recorded {UNREACHABLE}")
    bad_rates = [
        r.channel["callgate_rate"] for r in watched if r.channel.get("callgate_rate", "x").startswith(":")
    ]
    if bad_rates:
        ok = False
        notes.append(f"callgate_rate {bad_rates[0]!r}")
    if len(watched) < len(results):
        notes.append(f"CDR seen for {len(watched)} of {len(results)} calls")
    return ok, notes
