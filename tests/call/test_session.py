"""The call's conversation with FreeSWITCH, every path, without a socket (engine.call.session).

Frames are FreeSWITCH's bytes (the emulator's framing, checked against real captures in
tests/test_fsemu.py) parsed by the engine's own parser; actions are compared exactly.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from engine.call.render import accept_batch, reject_batch, routes_failed_batch
from engine.call.session import (
    CONNECT,
    Action,
    Arm,
    Bill,
    CallSession,
    Deadline,
    Decide,
    Disarm,
    Finish,
    Outcome,
    Phase,
    Release,
    Send,
    SessionSettings,
    Warn,
)
from engine.decision import (
    DEFAULT_SIP_RESPONSES,
    Accept,
    Direction,
    GatewayLeg,
    RatedLevel,
    Reason,
    Reject,
    Route,
)
from engine.esl.protocol import EslParser, Frame
from loadtest.fsemu import wire

SETTINGS = SessionSettings(connect_timeout=2.0, reply_timeout=3.0, hangup_timeout=100.0)
UUID = "18de0cbf-f510-4eca-83b5-35ad4384bf5e"
CAPTURE = Path(__file__).parents[1] / "fixtures" / "connect_reply_raw.txt"

ACCEPT = Accept(
    direction=Direction.OUTBOUND,
    account_id=1,
    account_number="1001",
    chain=(1,),
    destination="442071234567",
    caller_id_number="1001",
    caller_id_name="Alice",
    levels=(RatedLevel(1, "1001", 5, "44", Decimal("0.01"), Decimal(0), 60, 60, 600),),
    max_duration=600,
    routes=(
        Route(
            trunk_id=1,
            trunk_name="carrier-a",
            provider_id=9,
            termination_prefix="44",
            cost_per_minute=Decimal("0.005"),
            number="442071234567",
            caller_id_number="1001",
            caller_id_name="Alice",
            targets=(GatewayLeg("gw-a", "442071234567", 30),),
        ),
    ),
)
REJECT = Reject(Reason.NO_SUFFICIENT_FUND, 1, "no money")
ACCEPT_BATCH = accept_batch(ACCEPT, guard_uuid=UUID)


def frame(data: bytes) -> Frame:
    [parsed] = EslParser().feed(data)
    return parsed


def channel_data() -> Frame:
    return frame(CAPTURE.read_bytes().split(b"----- << -----\n", 1)[1])


def reply(text: str = "+OK") -> Frame:
    return frame(wire.command_reply(text))


def api_response(body: str) -> Frame:
    return frame(wire.api_response(body))


def event(name: str, **headers: str) -> Frame:
    fields = [("Event-Name", name), ("Unique-ID", UUID)]
    fields += [(key.replace("_", "-") if key[0].isupper() else key, value) for key, value in headers.items()]
    return frame(wire.event_plain_frame(fields))


def hangup_complete(cause: str = "NORMAL_CLEARING") -> Frame:
    return event("CHANNEL_HANGUP_COMPLETE", Hangup_Cause=cause)


def bridge_complete(answer_state: str, disposition: str = "") -> Frame:
    headers = {"Application": "bridge", "Answer_State": answer_state}
    if disposition:
        headers["variable_originate_disposition"] = disposition
    return event("CHANNEL_EXECUTE_COMPLETE", **headers)


LINGER = frame(wire.linger_notice(UUID, "sofia/internal/1001@127.0.0.1", -1))
DISCONNECT = frame(wire.disconnect_notice(UUID))


def new_session() -> CallSession:
    return CallSession(SETTINGS, DEFAULT_SIP_RESPONSES.__getitem__)


def deciding() -> CallSession:
    session = new_session()
    session.start()
    session.frame(channel_data())
    return session


def committed() -> CallSession:
    session = deciding()
    session.decided(ACCEPT, holds_slots=True)
    return session


def acknowledged(session: CallSession, replies: int | None = None) -> CallSession:
    for _ in range(session.replies_pending if replies is None else replies):
        session.frame(reply())
    return session


# ------------------------------------------------------------------ connect and channel data


def test_start_sends_connect_and_arms_the_connect_deadline() -> None:
    assert new_session().start() == [Send(CONNECT), Arm(Deadline.CONNECT, 2.0)]
    assert CONNECT == b"connect\n\n"


def test_channel_data_asks_for_a_decision() -> None:
    session = new_session()
    session.start()
    actions = session.frame(channel_data())
    assert actions[0] == Disarm(Deadline.CONNECT)
    assert isinstance(actions[1], Decide) and actions[1].request.uuid == UUID
    assert session.phase is Phase.DECIDING and session.request is actions[1].request


def test_disconnect_notice_before_the_channel_data_is_an_abandoned_call_not_a_protocol_error() -> None:
    session = new_session()
    session.start()
    [finish] = session.frame(DISCONNECT)
    assert finish == Finish(Outcome.ABANDONED, "the call ended before its channel data")
    assert session.done


def test_anything_else_than_the_connect_reply_is_a_protocol_error() -> None:
    session = new_session()
    session.start()
    [finish] = session.frame(event("CHANNEL_PARK"))
    assert isinstance(finish, Finish) and finish.outcome is Outcome.PROTOCOL
    assert "expected the connect reply, got 'text/event-plain'" in finish.detail


def test_garbage_connect_timeout_and_eof_before_the_decision_release_nothing() -> None:
    for feed in (
        lambda s: s.protocol_error("bad Content-Length"),
        lambda s: s.expired(Deadline.CONNECT),
        lambda s: s.peer_gone("closed", clean=True),
        lambda s: s.peer_gone("reset", clean=False),
    ):
        session = new_session()
        session.start()
        [finish] = feed(session)
        assert isinstance(finish, Finish) and not finish.kept
    session = new_session()
    session.start()
    assert session.expired(Deadline.CONNECT) == [
        Finish(Outcome.TIMEOUT, "no channel data within 2s (engine.connect_timeout)")
    ]


def test_no_frame_is_expected_while_deciding() -> None:
    with pytest.raises(RuntimeError):
        deciding().frame(reply())
    with pytest.raises(RuntimeError):
        new_session().decided(ACCEPT, holds_slots=True)


# ------------------------------------------------------------------ the decision


def test_accept_writes_one_batch_and_arms_both_deadlines() -> None:
    session = deciding()
    actions = session.decided(ACCEPT, holds_slots=True)
    assert actions == [Send(ACCEPT_BATCH.payload), Arm(Deadline.REPLIES, 3.0), Arm(Deadline.HANGUP, 100.0)]
    assert session.phase is Phase.COMMITTED and session.holds_slots
    assert session.replies_pending == 8  # sched_del, myevents, nixevent, 2 x filter, linger, multiset, bridge


def test_reject_writes_respond_and_releases_at_once_what_a_late_decision_took() -> None:
    session = deciding()
    actions = session.decided(REJECT, holds_slots=True)
    assert actions[0] == Send(reject_batch(REJECT, 402, "Payment Required", guard_uuid=UUID).payload)
    assert actions[1:3] == [Release(), Bill(None, may_hold_funds=True)]  # released, then recorded
    assert session.phase is Phase.ANSWERING and not session.holds_slots
    plain = deciding()
    plain_actions = plain.decided(REJECT, holds_slots=False)
    assert Release() not in plain_actions and plain_actions.count(Bill(None)) == 1


def test_configured_sip_response_is_used() -> None:
    session = CallSession(SETTINGS, lambda reason: (486, "Busy Here"))
    session.start()
    session.frame(channel_data())
    [send, *_] = session.decided(REJECT, holds_slots=False)
    assert isinstance(send, Send) and b"execute-app-arg: 486 Busy Here" in send.data


# ------------------------------------------------------------------ replies


def test_replies_are_counted_and_the_last_disarms_the_reply_deadline() -> None:
    session = committed()
    assert session.frame(api_response("+OK Deleted: 1\n")) == []  # the guard's sched_del, first
    for _ in range(6):
        assert session.frame(reply()) == []
    assert session.frame(reply()) == [Disarm(Deadline.REPLIES)]
    assert session.replies_pending == 0
    assert session.frame(reply()) == []  # an unexpected extra reply changes nothing


def test_both_batches_cancel_the_dialplan_guard_first() -> None:
    """The guard's `sched_del` runs in FreeSWITCH's listener thread as soon as it is read, so
    it leads the batch: it cannot race the bridge and its execute_on_answer sched_hangup."""
    accepted = deciding()
    [send, *_] = accepted.decided(ACCEPT, holds_slots=True)
    rejected = deciding()
    [send_reject, *_] = rejected.decided(REJECT, holds_slots=False)
    for sent in (send, send_reject):
        assert isinstance(sent, Send) and sent.data.startswith(f"api sched_del {UUID}\n\n".encode())
        assert sent.data.count(b"sched_del") == 1


@pytest.mark.parametrize("body", ["+OK Deleted: 1\n", "+OK Deleted: 0\n"])
def test_the_guard_reply_counts_as_a_reply(body: str) -> None:
    """0 deleted: a dialplan without a guard, or one that already fired; neither is an error."""
    session = committed()
    assert session.frame(api_response(body)) == []
    assert session.replies_pending == 7


def test_a_refused_guard_cancel_is_warned_about() -> None:
    session = committed()
    [warning] = session.frame(api_response("-ERR sched_del Command not found!\n"))
    assert warning == Warn(
        "refused_command", "FreeSWITCH refused the guard's sched_del: -ERR sched_del Command not found!"
    )
    assert session.replies_pending == 7


def test_a_refused_command_is_warned_about() -> None:
    session = committed()
    [warning] = session.frame(reply("-ERR command not found"))
    assert warning == Warn("refused_command", "FreeSWITCH refused a command: -ERR command not found")


def test_late_replies_warn_and_keep_the_call_counted() -> None:
    """Issue 14 item 1: a slow switch may still run the queued bridge."""
    session = committed()
    [warning] = session.expired(Deadline.REPLIES)
    assert isinstance(warning, Warn) and warning.kind == "late_replies"
    assert "8 command replies still due" in warning.message
    assert session.phase is Phase.COMMITTED and not session.done
    acknowledged(session)
    end = hangup_complete()
    assert session.frame(end) == [Bill(end), Release(), Finish(Outcome.ENDED, "NORMAL_CLEARING")]


# ------------------------------------------------------------------ following the call


def test_hangup_complete_ends_an_accepted_call_and_releases_it() -> None:
    session = acknowledged(committed())
    assert session.frame(event("CHANNEL_EXECUTE_COMPLETE", Application="multiset")) == []
    assert session.frame(bridge_complete("answered")) == []
    end = hangup_complete("NORMAL_CLEARING")
    assert session.frame(end) == [Bill(end), Release(), Finish(Outcome.ENDED, "NORMAL_CLEARING")]
    assert session.hangup_cause == "NORMAL_CLEARING" and session.done
    with pytest.raises(RuntimeError):
        session.frame(reply())  # the driver stops reading once the session is done


def test_linger_notice_does_not_end_the_call_a_disconnect_notice_does() -> None:
    """The caller-cancel capture: the linger notice comes before the CDR."""
    session = acknowledged(committed())
    assert session.frame(LINGER) == []
    assert session.frame(bridge_complete("hangup", "ORIGINATOR_CANCEL")) == []  # nothing to hang up
    end = hangup_complete("ORIGINATOR_CANCEL")
    assert session.frame(end) == [Bill(end), Release(), Finish(Outcome.ENDED, "ORIGINATOR_CANCEL")]
    other = acknowledged(committed())
    assert other.frame(DISCONNECT) == [Release(), Finish(Outcome.ENDED, "FreeSWITCH disconnected")]


def test_rejected_call_ends_at_hangup_without_a_release() -> None:
    session = deciding()
    session.decided(REJECT, holds_slots=False)
    acknowledged(session)
    assert session.frame(event("CHANNEL_EXECUTE_COMPLETE", Application="respond")) == []
    assert session.frame(hangup_complete("CALL_REJECTED")) == [Finish(Outcome.ENDED, "CALL_REJECTED")]


def test_failed_bridge_records_routes_failed_then_hangs_up_with_its_cause() -> None:
    session = acknowledged(committed())
    actions = session.frame(bridge_complete("ringing", "USER_BUSY"))
    assert actions == [
        Send(routes_failed_batch("USER_BUSY").payload),
        Warn("routes_failed", "every route failed: USER_BUSY"),
        Arm(Deadline.REPLIES, 3.0),
    ]
    assert session.replies_pending == 2
    assert session.frame(bridge_complete("ringing", "USER_BUSY")) == []  # only once
    session.frame(reply())
    assert session.frame(reply()) == [Disarm(Deadline.REPLIES)]
    assert session.frame(hangup_complete("USER_BUSY"))[1] == Release()


def test_failed_bridge_before_the_replies_are_in_adds_to_the_pending_count() -> None:
    session = committed()
    acknowledged(session, 6)
    actions = session.frame(bridge_complete("ringing"))
    assert Arm(Deadline.REPLIES, 3.0) not in actions  # still armed for the batch
    assert session.replies_pending == 4
    send = actions[0]
    assert isinstance(send, Send) and b"hangup-cause: NORMAL_TEMPORARY_FAILURE" in send.data


def test_a_bridge_after_a_reject_is_not_followed_up() -> None:
    session = deciding()
    session.decided(REJECT, holds_slots=False)
    assert session.frame(bridge_complete("ringing")) == []


def test_unread_events_and_other_frames_are_ignored() -> None:
    session = acknowledged(committed())
    assert session.frame(event("CHANNEL_PARK")) == []
    assert session.frame(frame(b"Content-Type: log/data\nContent-Length: 2\n\nhi")) == []


# ------------------------------------------------------------------ the committed rule


def test_hangup_deadline_drops_the_socket_but_keeps_an_accepted_call_counted() -> None:
    session = acknowledged(committed())
    [finish] = session.expired(Deadline.HANGUP)
    assert finish == Finish(
        Outcome.TIMEOUT, "no CHANNEL_HANGUP_COMPLETE within 100s (engine.hangup_timeout)", kept=True
    )


def test_a_reset_connection_keeps_an_accepted_call_counted() -> None:
    session = committed()
    assert session.peer_gone("connection reset", clean=False) == [
        Finish(Outcome.GONE, "connection reset", kept=True)
    ]


def test_clean_eof_after_the_bridge_was_acknowledged_keeps_it_counted() -> None:
    session = acknowledged(committed())
    [finish] = session.peer_gone("closed", clean=True)
    assert isinstance(finish, Finish) and finish.kept


def test_clean_eof_before_the_bridge_was_acknowledged_releases_it() -> None:
    """FreeSWITCH replies to each command as it queues it, in order: a bridge never
    acknowledged before an orderly close was never queued."""
    session = committed()
    acknowledged(session, 4)
    assert session.peer_gone("closed", clean=True) == [
        Release(),
        Finish(Outcome.GONE, "closed before the bridge was queued"),
    ]


def test_garbage_after_an_accept_keeps_it_counted() -> None:
    [finish] = committed().protocol_error("bad header")
    assert finish == Finish(Outcome.PROTOCOL, "malformed data from FreeSWITCH: bad header", kept=True)


def test_a_rejected_call_never_keeps_anything() -> None:
    for end in (
        lambda s: s.expired(Deadline.HANGUP),
        lambda s: s.peer_gone("reset", clean=False),
        lambda s: s.protocol_error("x"),
    ):
        session = deciding()
        session.decided(REJECT, holds_slots=True)
        [finish] = end(session)
        assert isinstance(finish, Finish) and not finish.kept


def test_nothing_happens_after_the_end() -> None:
    session = acknowledged(committed())
    session.frame(hangup_complete())
    assert session.expired(Deadline.REPLIES) == []
    assert session.peer_gone("closed", clean=True) == []
    assert session.protocol_error("x") == []


# ------------------------------------------------------------------ billing (issue 13)


def bills(actions: list[Action]) -> list[Bill]:
    return [action for action in actions if isinstance(action, Bill)]


def test_an_accepted_call_is_billed_once_on_its_hangup_complete_before_its_release() -> None:
    session = acknowledged(committed())
    end = hangup_complete()
    actions = session.frame(end)
    assert bills(actions) == [Bill(end)] and actions.index(Bill(end)) < actions.index(Release())
    # a second CHANNEL_HANGUP_COMPLETE is never read: the session is over (the settle script
    # is idempotent per uuid for a duplicate that reaches another session)
    with pytest.raises(RuntimeError):
        session.frame(hangup_complete())
    assert session.peer_gone("closed", clean=True) == [] and session.expired(Deadline.HANGUP) == []


def test_a_rejected_call_is_billed_once_at_its_answer_never_at_its_hangup() -> None:
    session = deciding()
    actions = session.decided(REJECT, holds_slots=False)
    assert bills(actions) == [Bill(None)]
    assert isinstance(actions[0], Send)  # the answer is written before the attempt is recorded
    acknowledged(session)
    assert bills(session.frame(hangup_complete("CALL_REJECTED"))) == []


def test_an_accepted_call_that_ends_without_its_hangup_event_is_not_billed() -> None:
    """No facts to rate: its reservation is left to its Redis deadline (docs/accounting.md)."""
    ends = [
        lambda s: s.frame(DISCONNECT),
        lambda s: s.expired(Deadline.HANGUP),
        lambda s: s.peer_gone("reset", clean=False),
        lambda s: s.peer_gone("closed", clean=True),
        lambda s: s.protocol_error("x"),
    ]
    for end in ends:
        session = acknowledged(committed())
        assert bills(end(session)) == []
    unacknowledged = committed()
    assert bills(unacknowledged.peer_gone("closed", clean=True)) == []


def test_a_failed_bridge_is_billed_on_the_hangup_that_follows() -> None:
    session = acknowledged(committed())
    session.frame(bridge_complete("ringing", "USER_BUSY"))
    acknowledged(session)
    end = hangup_complete("USER_BUSY")
    assert bills(session.frame(end)) == [Bill(end)]


@pytest.mark.parametrize(
    "raw",
    [
        wire.command_reply("+OK"),
        wire.command_reply("+OK will linger"),
        wire.command_reply("-ERR command not found"),
        wire.command_reply(""),
        b"Content-Type: command/reply\nReply-Text: %2BOK\nEvent-Name: X\n\n",
        b"Content-Type: command/reply\nReply-Text: +OK\nEvent-Name: X\n\n",
        b"Content-Type: command/reply\n\n",
    ],
)
@pytest.mark.parametrize("pending", [0, 1, 2, 7])
def test_the_quick_reply_path_does_what_the_full_one_does(raw: bytes, pending: int) -> None:
    """frame() takes a shortcut for a plain +OK reply; it must match _reply() exactly."""
    quick, full = committed(), committed()
    for session in (quick, full):
        session.replies_pending = pending
        session._batch_replies = max(0, pending - 1)
    assert quick.frame(frame(raw)) == full._reply(frame(raw))
    assert (quick.replies_pending, quick._batch_replies) == (full.replies_pending, full._batch_replies)
