"""mod_json_cdr's real posts (recorded on FreeSWITCH 1.10.12, tests/fixtures/json_cdr/README.md)
read into the same billing facts as the engine's CHANNEL_HANGUP_COMPLETE."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from engine.billing.hangup import parse_hangup
from engine.fsxml.jsoncdr import hangup_headers, read_post

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "json_cdr"

# file -> (callgate_reason, hangup cause, billsec, legs tried, carried leg, callgate_account)
EXPECTED = {
    # alpha-gw1 was down (its OPTIONS ping had failed), so alpha-gw2 carried demo-03: two legs
    "answered.http": ("ACCEPTED", "NORMAL_CLEARING", 3, 2, 1, "1000000001"),
    "failover.http": ("ACCEPTED", "NORMAL_CLEARING", 2, 2, 1, "1000000001"),  # beta-gw1 503, beta-gw2
    "rejected.http": ("DESTINATION_BLOCKED", "CALL_REJECTED", 0, 0, None, ""),  # a reject sets no account
    "disable-100-continue/answered.http": ("ACCEPTED", "NORMAL_CLEARING", 2, 1, 0, "1000000001"),
    "disable-100-continue/failover.http": ("ACCEPTED", "NORMAL_CLEARING", 2, 2, 1, "1000000001"),
    "disable-100-continue/rejected.http": ("DESTINATION_BLOCKED", "CALL_REJECTED", 0, 0, None, ""),
}
POSTS = sorted(FIXTURES.glob("**/*.http"))


def request(path: Path) -> tuple[str, dict[str, str], bytes]:
    head, _, body = path.read_bytes().partition(b"\r\n\r\n")
    line, *fields = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return line, headers, body


def test_every_kind_of_call_was_recorded_with_both_settings() -> None:
    assert sorted(p.relative_to(FIXTURES).as_posix() for p in POSTS) == sorted(EXPECTED)


@pytest.mark.parametrize("path", POSTS, ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_a_real_post_reads_into_the_hangup_facts(path: Path) -> None:
    line, headers, body = request(path)
    method, target, _ = line.split()
    assert method == "POST" and headers["user-agent"] == "freeswitch-json/1.0"
    assert int(headers["content-length"]) == len(body)
    # disable-100-continue=true drops mod_json_cdr's own Content-Type (README.md)
    expected_type = "application/x-www-form-urlencoded" if path.parent != FIXTURES else "application/json"
    assert headers["content-type"] == expected_type
    post = read_post(body, headers["content-type"])
    [uuid] = parse_qs(urlsplit(target).query)["uuid"]
    assert post.uuid == uuid and not post.b_leg
    end = parse_hangup(hangup_headers(post))
    reason, cause, billsec, legs, carried, account = EXPECTED[path.relative_to(FIXTURES).as_posix()]
    assert (end.callgate_reason, end.hangup_cause, end.billsec) == (reason, cause, billsec)
    assert (len(end.legs), end.carried_leg, end.callgate_account) == (legs, carried, account)
    assert end.anomalies == ()
