"""fsemu: a FreeSWITCH 1.10.12 emulator for testing the engine without FreeSWITCH.

It plays the switch side of the event socket, faithful to bytes captured from a real
FreeSWITCH (``/work/shared/reference/freeswitch-captures``):

* :func:`place_call` / :func:`run_calls`: the outbound socket (``socket host:port async
  full``): FreeSWITCH connects to the engine, answers ``connect`` with CHANNEL_DATA,
  executes what the engine sends and writes the events of the call;
* :class:`InboundServer`: the inbound socket (``auth``, ``api show channels``, events),
  listing the calls live on the same :class:`Switch`;
* :mod:`.wire`: FreeSWITCH-side framing and a parser of client commands;
* :mod:`.templates`: the CHANNEL_DATA and event header sets derived from the captures.

Command line: ``python -m loadtest.fsemu call --engine 127.0.0.1:8084 --dest 4412345678``.
"""

from .inbound import InboundServer
from .outbound import (
    CallResult,
    CallSpec,
    Channel,
    Switch,
    default_switch,
    gateways_answering,
    place_call,
    run_calls,
    split_dial_string,
)

__all__ = [
    "CallResult",
    "CallSpec",
    "Channel",
    "InboundServer",
    "Switch",
    "default_switch",
    "gateways_answering",
    "place_call",
    "run_calls",
    "split_dial_string",
]
