"""engine.logs.mask_secrets skips each pattern's scan only when it cannot match (a differential test)."""

from __future__ import annotations

import random

import pytest

from engine import logs


def full_mask(text: str) -> str:
    """mask_secrets without the shortcut (the oracle)."""
    text = logs.SECRET_PATTERN.sub(lambda m: f"{m.group(1)}{m.group(2)}{logs.MASK}", text)
    text = logs.URL_PASSWORD_PATTERN.sub(lambda m: f"{m.group(1)}{logs.MASK}@", text)
    text = logs.AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{logs.MASK}", text)
    return logs.ESL_AUTH_PATTERN.sub(lambda m: f"{m.group(1)}{logs.MASK}", text)


PIECES = [
    "password",
    "PassWd",
    "PWD",
    "Secret",
    "tOkEn",
    "api_key",
    "API-Key",
    "apikey",
    "PIN",
    "pin",
    "paſſword",
    "\u212aey",
    "=",
    ": ",
    " ",
    '"',
    "'",
    "x",
    "uuid=18de0cbf-f510",
    "sip_auth_",
    "\n",
    "redis://:pw@host",
    "Authorization: Bearer ",
    "auth ",
    "ClueCon",
    "é",
    "destination=4412",
    # the URL and auth scans' shortcuts
    "AUTH",
    "AuThOrIzAtIoN= ",
    "userauth ",
    "u:",
    "://",
    ":/",
    "/",
    "@",
    "postgresql://user:pw@db",
    "HTTP://a:b@c",
]


@pytest.mark.parametrize("seed", range(20))
def test_same_result_as_the_full_scan(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        assert logs.mask_secrets(text) == full_mask(text), text


def test_the_decision_line_has_nothing_to_mask() -> None:
    line = "uuid=18de0cbf-f510-4eca-83b5-35ad4384bf5e result=accept reason=- account=1000020 latency_ms=1.2"
    assert logs.mask_secrets(line) == line
    assert logs.mask_secrets("destination=sip_auth_password=hunter2") == "destination=sip_auth_password=***"
