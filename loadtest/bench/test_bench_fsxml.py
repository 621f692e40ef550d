"""The fsxml application per request, without HTTP: a sip_auth lookup among 100k devices.

The HTTP share (gevent's pywsgi) is measured by ``python -m loadtest.fsxml_bench`` against a
static-response server; this isolates what callgate adds: parse, access check, answer.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
from typing import Any

import pytest

from engine.config import FsxmlSettings
from engine.fsxml.directory import Answers, Directory, a1_hash
from engine.fsxml.request import lookup, parse_form
from engine.fsxml.server import FsxmlApp
from loadtest.dataset import Scale, generate
from loadtest.fsxml_bench import AUTH, DOMAIN, request_bytes


@pytest.fixture(scope="module")
def directory() -> Directory:
    data = generate(Scale(accounts=113_000, rates=10_000, groups=10, termination_rates=10_000))
    data.sip_devices = [
        dataclasses.replace(d, a1_hash=a1_hash(d.username, DOMAIN, f"pw-{d.username}"))
        for d in data.sip_devices
    ]
    return Directory.build(data)


@pytest.fixture(scope="module")
def bodies(directory: Directory) -> list[tuple[bytes, str]]:
    users = list(directory._device_by_username)
    out = []
    for request in request_bytes(users, 2000):
        head, _, body = request.partition(b"\r\n\r\n")
        authorization = next(line for line in head.split(b"\r\n") if line.startswith(b"Authorization: "))
        out.append((body, authorization.split(b": ", 1)[1].decode()))
    return out


class _Source:
    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def directory(self, max_age: float) -> Directory:
        return self._directory


def test_bench_fsxml_app_sip_auth(
    benchmark: Any, directory: Directory, bodies: list[tuple[bytes, str]]
) -> None:
    settings = FsxmlSettings(domain=DOMAIN, username=AUTH[0], password=AUTH[1])
    app = FsxmlApp(settings, Answers(DOMAIN), _Source(directory))  # type: ignore[arg-type]
    cycle = itertools.cycle(bodies)
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        statuses.append(status)

    def one() -> None:
        body, authorization = next(cycle)
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/fsxml",
            "REMOTE_ADDR": "127.0.0.1",
            "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body),
            "HTTP_AUTHORIZATION": authorization,
        }
        app(environ, start_response)

    benchmark(one)
    assert set(statuses) == {"200 OK"}


def test_bench_fsxml_answer_only(
    benchmark: Any, directory: Directory, bodies: list[tuple[bytes, str]]
) -> None:
    answers = Answers(DOMAIN)
    lookups = itertools.cycle([lookup(parse_form(body.decode())) for body, _ in bodies])
    benchmark(lambda: answers.answer(next(lookups), directory))
