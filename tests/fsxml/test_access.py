"""Source allow-list and basic auth. Pure."""

from __future__ import annotations

import base64

import pytest

from engine.fsxml.access import Access, Denial


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_source_allow_list() -> None:
    access = Access(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert access.check("10.1.2.3", None) is None
    assert access.check("192.0.2.7", None) is None
    assert access.check("2001:db8::5", None) is None
    assert access.check("::ffff:10.9.9.9", None) is None  # dual-stack listener
    for outsider in ("192.0.2.8", "11.0.0.1", "2001:db9::1", "", "not-an-address", "::ffff:11.0.0.1"):
        assert access.check(outsider, None) is Denial.SOURCE


def test_no_credentials_configured_means_none_asked() -> None:
    assert not Access(["127.0.0.1"]).credentials_required
    assert Access(["127.0.0.1"]).check("127.0.0.1", "Basic garbage") is None


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        basic("fs", "wrong"),
        basic("other", "s3cret:x"),
        basic("fs", "s3cret:"),
        basic("fs", ""),
        "Bearer s3cret:x",
        "Basic !!!notbase64",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Basic",
    ],
)
def test_wrong_or_malformed_credentials_are_refused(authorization: str | None) -> None:
    access = Access(["127.0.0.1"], "fs", "s3cret:x")
    assert access.check("127.0.0.1", authorization) is Denial.CREDENTIALS


def test_right_credentials_from_an_allowed_source() -> None:
    access = Access(["127.0.0.1"], "fs", "s3cret:x")
    assert access.check("127.0.0.1", basic("fs", "s3cret:x")) is None
    assert access.check("127.0.0.1", "basic  " + basic("fs", "s3cret:x")[6:]) is None  # scheme is case-free
    assert access.check("127.0.0.2", basic("fs", "s3cret:x")) is Denial.SOURCE  # the source is checked first
