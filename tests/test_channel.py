"""Channel data -> CallRequest, on the captured connect reply and on hostile values."""

from __future__ import annotations

from pathlib import Path

from engine.call.channel import call_request
from engine.esl.protocol import EslParser, encode_value

CAPTURE = Path(__file__).parent / "fixtures" / "connect_reply_raw.txt"


def captured_headers() -> dict[str, str]:
    stream = CAPTURE.read_bytes().split(b"----- << -----\n", 1)[1]
    return dict(EslParser().feed(stream)[0].headers)


def test_request_from_the_captured_channel_data() -> None:
    request = call_request(captured_headers())
    assert request.uuid == "18de0cbf-f510-4eca-83b5-35ad4384bf5e"
    assert request.destination == "4412345678"
    assert request.caller_id_number == "sipp"
    assert request.network_ip == "127.0.0.1"
    assert request.sip_auth_username == ""  # no digest auth happened on that call
    assert request.switch_hostname == "vm"


def test_values_are_percent_decoded_and_undef_is_empty() -> None:
    headers = captured_headers()
    headers["variable_sip_auth_username"] = encode_value("alice@example")
    headers["variable_sip_h_P-Accountcode"] = "_undef_"
    request = call_request(headers)
    assert request.sip_auth_username == "alice@example"
    assert request.account_code_header == ""


def test_effective_caller_id_wins_over_the_caller_profile() -> None:
    headers = captured_headers()
    headers["variable_effective_caller_id_number"] = encode_value("+442079460001")
    headers["variable_effective_caller_id_name"] = encode_value("Front Desk")
    request = call_request(headers)
    assert (request.caller_id_number, request.caller_id_name) == ("+442079460001", "Front Desk")


def test_caller_supplied_freeswitch_syntax_is_removed() -> None:
    headers = captured_headers()
    headers["Caller-Caller-ID-Name"] = encode_value("${system(rm -rf /)}|[x],'\"\n")
    request = call_request(headers)
    assert request.caller_id_name == "system(rm -rf /)x"
