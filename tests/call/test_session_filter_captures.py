"""The call session on what a real FreeSWITCH 1.10.12 wrote with and without the event filters
(tests/fixtures/esl_filter/, docs/real-switch-lab.md), in the order recorded and in every
order the disconnect notice can take: on the real switch the linger notice came BEFORE the
bridge's CHANNEL_EXECUTE_COMPLETE in the filtered bridged call."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.call.render import routes_failed_batch
from engine.call.session import Bill, Finish, Outcome, Release, Send, Warn
from engine.esl.protocol import EslParser, Frame
from tests.call.test_session import ACCEPT, new_session

CAPTURES = Path(__file__).parents[1] / "fixtures" / "esl_filter"
NAMES = ["filtered-bridged", "filtered-failed", "plain-bridged", "plain-failed"]


def capture(name: str) -> tuple[Frame, list[Frame]]:
    frames = EslParser().feed((CAPTURES / f"{name}.raw").read_bytes())
    return frames[0], frames[1:]


def is_notice(frame: Frame) -> bool:
    return frame.content_type == "text/disconnect-notice"


def run(channel_data: Frame, frames: list[Frame]) -> tuple[list[object], int]:
    """Decide ACCEPT on the channel data, feed ``frames`` until the session is done; the
    actions after the decision and how many frames were read."""
    session = new_session()
    session.start()
    session.frame(channel_data)
    session.decided(ACCEPT, holds_slots=True)
    actions: list[object] = []
    read = 0
    for frame in frames:
        if session.done:
            break
        actions += session.frame(frame)
        read += 1
    assert session.done
    return actions, read


def orders(frames: list[Frame]) -> list[list[Frame]]:
    """The recorded order, and the disconnect notice moved to every other position."""
    [notice] = [frame for frame in frames if is_notice(frame)]
    rest = [frame for frame in frames if not is_notice(frame)]
    return [[*rest[:at], notice, *rest[at:]] for at in range(len(rest) + 1)]


def hangup_of(frames: list[Frame]) -> Frame:
    return next(frame for frame in frames if frame.event_name == "CHANNEL_HANGUP_COMPLETE")


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("bridged")])
def test_a_bridged_call_ends_on_its_hangup_in_every_order(name: str) -> None:
    channel_data, frames = capture(name)
    hangup = hangup_of(frames)
    for order in orders(frames):
        actions, read = run(channel_data, order)
        assert not [a for a in actions if isinstance(a, Send | Warn)], order
        assert actions[-3:] == [Bill(hangup), Release(), Finish(Outcome.ENDED, "NORMAL_CLEARING")]
        assert order[read - 1] is hangup


@pytest.mark.parametrize("name", [n for n in NAMES if n.endswith("failed")])
def test_a_failed_bridge_is_hung_up_as_routes_failed_in_every_order(name: str) -> None:
    channel_data, frames = capture(name)
    hangup = hangup_of(frames)
    [bridge] = [
        f
        for f in frames
        if f.event_name == "CHANNEL_EXECUTE_COMPLETE" and f.event_header("Application") == "bridge"
    ]
    cause = bridge.event_header("variable_originate_disposition") or ""
    assert bridge.event_header("Answer-State") == "ringing"
    for order in orders(frames):
        actions, _ = run(channel_data, order)
        sends = [a for a in actions if isinstance(a, Send)]
        assert sends == [Send(routes_failed_batch(cause).payload)], order
        assert Warn("routes_failed", f"every route failed: {cause}") in actions
        assert actions[-3:] == [Bill(hangup), Release(), Finish(Outcome.ENDED, "NORMAL_TEMPORARY_FAILURE")]


def test_without_the_bridge_s_execute_complete_the_hangup_still_ends_the_call() -> None:
    """FreeSWITCH queues the bridge's EXECUTE_COMPLETE and the hangup from different threads;
    the hangup first (or alone) must end the call the same way."""
    channel_data, frames = capture("filtered-bridged")
    hangup = hangup_of(frames)
    without = [f for f in frames if f.event_name != "CHANNEL_EXECUTE_COMPLETE"]
    actions, _ = run(channel_data, without)
    assert actions[-3:] == [Bill(hangup), Release(), Finish(Outcome.ENDED, "NORMAL_CLEARING")]
    late = [f for f in frames if f.event_name != "CHANNEL_EXECUTE_COMPLETE"]
    late.append(next(f for f in frames if f.event_name == "CHANNEL_EXECUTE_COMPLETE"))
    actions, read = run(channel_data, late)
    assert late[read - 1] is hangup and actions[-1] == Finish(Outcome.ENDED, "NORMAL_CLEARING")


def test_the_filtered_batch_s_replies_are_all_counted() -> None:
    """The lab's probe wrote the engine's command set: its eight replies (the guard's api
    response included) are exactly the eight the session waits for."""
    channel_data, frames = capture("filtered-bridged")
    session = new_session()
    session.start()
    session.frame(channel_data)
    session.decided(ACCEPT, holds_slots=True)
    assert session.replies_pending == 8
    replies = [f for f in frames if f.content_type in ("command/reply", "api/response")]
    for frame in replies:
        assert not [a for a in session.frame(frame) if isinstance(a, Warn)]
    assert session.replies_pending == 0
