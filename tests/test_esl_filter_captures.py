"""What a real FreeSWITCH 1.10.12 sent on the outbound socket with and without the event filters
perfc proposed (tests/fixtures/esl_filter/README.md, docs/real-switch-lab.md): the recordings
parse into the frames the lab saw, with the framer in use and the pure-Python one."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.esl.protocol import EslParser, Frame, PyEslParser

CAPTURES = Path(__file__).parent / "fixtures" / "esl_filter"

REPLIES = ["+OK Events Enabled", "+OK events nixed"]
FILTER_REPLIES = [
    "+OK filter added. [Event-Name]=[CHANNEL_HANGUP_COMPLETE]",
    "+OK filter added. [Application]=[bridge]",
]
TAIL_REPLIES = ["+OK will linger", "api:+OK Deleted: 1", "+OK", "+OK"]

# What followed the batch's replies, frame by frame (event: name/application).
EXPECTED = {
    "filtered-bridged": ["disconnect", "CHANNEL_EXECUTE_COMPLETE/bridge", "CHANNEL_HANGUP_COMPLETE"],
    "filtered-failed": ["CHANNEL_EXECUTE_COMPLETE/bridge", "+OK", "disconnect", "CHANNEL_HANGUP_COMPLETE"],
    "plain-bridged": [
        "CHANNEL_EXECUTE_COMPLETE/multiset",
        "CHANNEL_EXECUTE_COMPLETE/bridge",
        "CHANNEL_EXECUTE_COMPLETE/socket",
        "disconnect",
        "CHANNEL_HANGUP_COMPLETE",
    ],
    "plain-failed": [
        "CHANNEL_PARK",
        "CHANNEL_EXECUTE_COMPLETE/multiset",
        "CHANNEL_EXECUTE_COMPLETE/bridge",
        "+OK",
        "CHANNEL_EXECUTE_COMPLETE/socket",
        "disconnect",
        "CHANNEL_HANGUP_COMPLETE",
    ],
}


def describe(frame: Frame) -> str:
    if frame.content_type == "command/reply":
        return frame.reply_text
    if frame.content_type == "api/response":
        return "api:" + frame.body.decode().strip()
    if frame.content_type == "text/disconnect-notice":
        return "disconnect"
    application = frame.event_header("Application")
    return frame.event_name + (f"/{application}" if application else "")


@pytest.mark.parametrize("parser_class", [EslParser, PyEslParser], ids=["active", "python"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_real_switch_sent_what_the_lab_recorded(name: str, parser_class: type) -> None:
    frames = parser_class().feed((CAPTURES / f"{name}.raw").read_bytes())
    assert frames[0].channel_data()["Event-Name"] == "CHANNEL_DATA"
    replies = REPLIES + (FILTER_REPLIES if name.startswith("filtered") else []) + TAIL_REPLIES
    seen = [describe(frame) for frame in frames[1:]]
    assert seen[: len(replies)] == replies
    assert seen[len(replies) :] == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_verbose_events_off_still_sends_every_variable_with_the_hangup(name: str) -> None:
    """verbose_events was off on the lab's switch: CHANNEL_HANGUP_COMPLETE is in the fixed list
    of events that always carry the channel variables (switch_channel.c), the engine's bill
    and reason among them."""
    frames = PyEslParser().feed((CAPTURES / f"{name}.raw").read_bytes())
    hangup = next(frame.event() for frame in frames if frame.event_name == "CHANNEL_HANGUP_COMPLETE")
    variables = [header for header in hangup if header.startswith("variable_")]
    assert len(variables) == (186 if name.endswith("bridged") else 142)
    assert hangup["variable_callgate_reason"] == "ACCEPTED"
    assert "variable_verbose_events" not in hangup
