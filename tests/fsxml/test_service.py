"""The WSGI application over a real SnapshotHolder following a real Redis snapshot.

The holder runs in a thread (redis-py blocking, as in any non-patched process); requests go
straight to the WSGI callable. `test_cli.py` runs the real `callgate fsxml` process.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from engine.config import FsxmlSettings
from engine.fsxml import render
from engine.fsxml.directory import Answers, Directory, a1_hash
from engine.fsxml.server import PATH, FsxmlApp, SnapshotSource
from engine.state.snapshot import apply_changes, current_version, publish_snapshot
from engine.state.watcher import SnapshotHolder
from tests.fsxml import forms
from tests.fsxml.catalog import DOMAIN, catalog, device
from tests.support import wait_until

SECRET = "fs-S3cret!"
SETTINGS = FsxmlSettings(
    domain=DOMAIN, allowed_networks=("127.0.0.1/32", "10.0.0.0/8"), username="fs", password=SECRET
)


def auth(user: str = "fs", password: str = SECRET) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def call(
    app: FsxmlApp,
    body: str | bytes = b"",
    *,
    method: str = "POST",
    path: str = PATH,
    remote: str = "127.0.0.1",
    authorization: str | None = None,
    content_length: str | None = None,
) -> Reply:
    data = body.encode() if isinstance(body, str) else body
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": data.decode("latin-1") if method == "GET" else "",
        "REMOTE_ADDR": remote,
        "CONTENT_LENGTH": str(len(data)) if content_length is None else content_length,
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "wsgi.input": io.BytesIO(data),
    }
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        seen["status"], seen["headers"] = int(status.split()[0]), dict(headers)

    payload = b"".join(app(environ, start_response))
    return Reply(seen["status"], seen["headers"], payload)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def holder(client: redis.Redis, key_prefix: str) -> Iterator[SnapshotHolder[Directory]]:
    watcher: SnapshotHolder[Directory] = SnapshotHolder(
        client, key_prefix, Directory.build, offload=lambda fn: fn(), freeze_gc=False
    )
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop, 0.2), daemon=True)
    thread.start()
    yield watcher
    stop.set()
    thread.join(timeout=10)


def app_for(holder: SnapshotHolder[Directory], settings: FsxmlSettings = SETTINGS) -> FsxmlApp:
    return FsxmlApp(settings, Answers(settings.domain), SnapshotSource(holder))


def user_a1(reply: Reply, user: str) -> str | None:
    for element in ET.fromstring(reply.body).iter("user"):
        if element.get("id") == user:
            return next(p.get("value") for p in element.iter("param") if p.get("name") == "a1-hash")
    return None


@pytest.fixture
def published(client: redis.Redis, key_prefix: str, holder: SnapshotHolder[Directory]) -> int:
    version = publish_snapshot(client, key_prefix, catalog())
    wait_until(lambda: holder.loaded)
    return version


def test_lookups_are_answered_from_the_snapshot(published: int, holder: SnapshotHolder[Directory]) -> None:
    app = app_for(holder)
    reply = call(app, forms.sip_auth("alice", DOMAIN), authorization=auth())
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/xml")
    assert user_a1(reply, "alice") == a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx")
    assert (
        call(app, forms.sip_auth("alice", "elsewhere.example"), authorization=auth()).body == render.NOT_FOUND
    )
    assert user_a1(call(app, forms.sip_auth("mallory", DOMAIN), authorization=auth()), "mallory") is None
    gateways = ET.fromstring(call(app, forms.gateways("external"), authorization=auth()).body)
    assert [g.get("name") for g in gateways.iter("gateway")] == ["alpha-gw1", "beta-gw1", "register-wins"]
    get = call(
        app, forms.sip_auth("alice", DOMAIN), method="GET", authorization=auth()
    )  # method=GET bindings
    assert user_a1(get, "alice") == a1_hash("alice", DOMAIN, "Wd3kM9pQs7Vx")


def test_a_changed_device_is_seen_by_the_next_lookup(
    published: int, holder: SnapshotHolder[Directory], client: redis.Redis, key_prefix: str
) -> None:
    app = app_for(holder)
    alice = catalog().sip_devices[0]
    changed = device(alice.id, alice.account_id, "alice", password="Ch4nged")
    apply_changes(client, key_prefix, published, [changed], [])

    def sees_new_password() -> bool:
        reply = call(app, forms.sip_auth("alice", DOMAIN), authorization=auth())
        return user_a1(reply, "alice") == a1_hash("alice", DOMAIN, "Ch4nged")

    wait_until(sees_new_password)
    assert holder.full_loads == 1  # applied in place, not by reloading the snapshot
    apply_changes(client, key_prefix, published, [], [("sip_devices", str(alice.id))])
    wait_until(
        lambda: user_a1(call(app, forms.sip_auth("alice", DOMAIN), authorization=auth()), "alice") is None
    )
    gateway = catalog().gateways[0]
    apply_changes(client, key_prefix, published, [dataclasses.replace(gateway, active=False)], [])

    def gateway_gone() -> bool:
        body = call(app, forms.gateways("external"), authorization=auth()).body
        return b"alpha-gw1" not in body

    wait_until(gateway_gone)


def test_a_new_snapshot_version_replaces_the_directory(
    published: int, holder: SnapshotHolder[Directory], client: redis.Redis, key_prefix: str
) -> None:
    app = app_for(holder)
    data = catalog()
    data.sip_devices = [d for d in data.sip_devices if d.username != "alice"]
    version = publish_snapshot(client, key_prefix, data)
    assert current_version(client, key_prefix) == version
    wait_until(lambda: holder.current[0] == version)
    assert user_a1(call(app, forms.sip_auth("alice", DOMAIN), authorization=auth()), "alice") is None


@pytest.mark.parametrize(
    ("remote", "authorization", "status"),
    [
        ("192.0.2.1", auth(), 403),  # source not allowed, even with the right credentials
        ("127.0.0.1", None, 401),
        ("127.0.0.1", auth(password="fs-S3cret"), 401),
        ("127.0.0.1", auth(user="FS"), 401),
        ("10.1.2.3", "Basic ####", 401),
        ("10.1.2.3", auth(), 200),
    ],
)
def test_auth_failures(
    published: int,
    holder: SnapshotHolder[Directory],
    remote: str,
    authorization: str | None,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    reply = call(app_for(holder), forms.sip_auth("alice", DOMAIN), remote=remote, authorization=authorization)
    assert reply.status == status
    if status == 401:
        assert reply.headers["WWW-Authenticate"].startswith("Basic ")
    if status != 200:
        assert b"a1-hash" not in reply.body
        assert SECRET not in caplog.text and "S3cret" not in caplog.text
        assert "refused 1 request(s)" in caplog.text


def test_without_basic_auth_configured_the_allow_list_alone_decides(
    published: int, holder: SnapshotHolder[Directory]
) -> None:
    app = app_for(holder, FsxmlSettings(domain=DOMAIN))
    assert call(app, forms.sip_auth("alice", DOMAIN)).status == 200
    assert call(app, forms.sip_auth("alice", DOMAIN), remote="10.0.0.1").status == 403


def test_bad_requests_get_4xx_never_5xx(published: int, holder: SnapshotHolder[Directory]) -> None:
    app = app_for(holder)
    good = forms.sip_auth("alice", DOMAIN)
    assert call(app, good, path="/other", authorization=auth()).status == 404
    assert call(app, good, method="PUT", authorization=auth()).status == 405
    assert call(app, b"user=%ff%fe", authorization=auth()).status == 400
    assert call(app, b"\xff\xfe", authorization=auth()).status == 400
    big = "x=" + "a" * SETTINGS.max_body_bytes
    assert call(app, big, authorization=auth()).status == 413
    assert call(app, big, authorization=auth(), content_length="").status == 413  # no length given
    assert call(app, good, authorization=auth(), content_length="nonsense").status == 200  # read to the limit
    assert call(app, b"", authorization=auth()).body == render.NOT_FOUND


def test_no_snapshot_or_a_stale_one_is_503(client: redis.Redis, key_prefix: str, holder: Any) -> None:
    app = app_for(holder)
    assert call(app, forms.sip_auth("alice", DOMAIN), authorization=auth()).status == 503
    publish_snapshot(client, key_prefix, catalog())
    wait_until(lambda: holder.loaded)
    assert call(app, forms.sip_auth("alice", DOMAIN), authorization=auth()).status == 200
    strict = app_for(holder, dataclasses.replace(SETTINGS, snapshot_max_age=1e-9))
    assert call(strict, forms.sip_auth("alice", DOMAIN), authorization=auth()).status == 503


def test_gateway_lookups_are_503_until_the_carrier_passwords_were_read(
    published: int, holder: SnapshotHolder[Directory]
) -> None:
    # Sending a registering gateway without its password would have the carrier refuse it:
    # FreeSWITCH gets an HTTP error instead, and falls back to its own configuration.
    ready = False
    app = FsxmlApp(SETTINGS, Answers(SETTINGS.domain), SnapshotSource(holder), lambda: ready)
    assert call(app, forms.gateways("external"), authorization=auth()).status == 503
    assert call(app, forms.sofia_conf("external"), authorization=auth()).status == 503
    assert call(app, forms.sip_auth("alice", DOMAIN), authorization=auth()).status == 200  # users: served
    ready = True
    assert call(app, forms.gateways("external"), authorization=auth()).status == 200
