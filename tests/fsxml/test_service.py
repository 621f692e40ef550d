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
from tests.support import free_port, wait_until

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
def holder(
    client: redis.Redis, key_prefix: str, request: pytest.FixtureRequest
) -> Iterator[SnapshotHolder[Directory]]:
    """A holder following the snapshot, polling every 0.2 s (a test may ask for another
    interval with ``@pytest.mark.parametrize("holder", [seconds], indirect=True)``)."""
    watcher: SnapshotHolder[Directory] = SnapshotHolder(
        client, key_prefix, Directory.build, offload=lambda fn: fn(), freeze_gc=False
    )
    stop = threading.Event()
    interval = float(getattr(request, "param", 0.2))
    thread = threading.Thread(target=watcher.run, args=(stop, interval), daemon=True)
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


# No poll during the test: the change reaches the holder by its pub/sub event alone. The
# low-level apply_changes writes no journal entry (the sync's apply script does), so a poll that
# read the new change count before the event was handled would load the snapshot whole.
@pytest.mark.parametrize("holder", [60.0], indirect=True)
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


def requests_counted(app: FsxmlApp) -> dict[tuple[str, str], float]:
    return {
        (s.labels["kind"], s.labels["outcome"]): s.value
        for family in app.metrics.registry.collect()
        if family.name == "callgate_fsxml_requests"
        for s in family.samples
        if s.name.endswith("_total") and s.value
    }


def test_every_lookup_is_counted_by_kind_and_outcome_with_bounded_labels(
    published: int, holder: SnapshotHolder[Directory]
) -> None:
    ready = False
    app = FsxmlApp(SETTINGS, Answers(SETTINGS.domain), SnapshotSource(holder), lambda: ready)
    call(app, forms.sip_auth("alice", DOMAIN), authorization=auth())
    call(app, forms.sip_auth("mallory", DOMAIN), authorization=auth())  # "not found" is an answer
    call(app, forms.gateways("external"), authorization=auth())  # 503 until the passwords are read
    call(app, forms.sip_auth("alice", DOMAIN), remote="192.0.2.1", authorization=auth())
    call(app, forms.sip_auth("alice", DOMAIN), authorization=auth(password="wrong"))
    call(app, b"\xff", authorization=auth())
    call(app, forms.sip_auth("alice", DOMAIN), path="/secret-per-caller", authorization=auth())
    assert requests_counted(app) == {
        ("user", "answered"): 2,
        ("gateways", "no_gateway_credentials"): 1,
        ("none", "forbidden"): 1,
        ("none", "unauthorized"): 1,
        ("none", "malformed"): 1,
        ("none", "not_found"): 1,
    }
    samples = [
        s
        for family in app.metrics.registry.collect()
        if family.name == "callgate_fsxml_request_duration_seconds"
        for s in family.samples
        if s.name.endswith("_count")
    ]
    assert {s.labels["endpoint"]: s.value for s in samples if s.value} == {"fsxml": 6, "other": 1}
    exposed = "\n".join(str(s.labels) for family in app.metrics.registry.collect() for s in family.samples)
    assert "alice" not in exposed and "192.0.2.1" not in exposed and "secret-per-caller" not in exposed


def test_the_metrics_endpoint_serves_prometheus_text(
    published: int, holder: SnapshotHolder[Directory]
) -> None:
    import urllib.request

    import gevent

    from engine.fsxml.metrics import serve_metrics
    from engine.fsxml.server import wsgi_server

    app = app_for(holder)
    call(app, forms.sip_auth("alice", DOMAIN), authorization=auth())
    server = serve_metrics(app.metrics, "127.0.0.1", 0, wsgi_server)
    assert server is None  # port 0: off
    port = free_port()
    server = serve_metrics(app.metrics, "127.0.0.1", port, wsgi_server)
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        # The server is gevent's (as in `callgate fsxml`); this test's process is not patched.
        text = gevent.get_hub().threadpool.apply(scrape)
        assert 'callgate_fsxml_requests_total{kind="user",outcome="answered"} 1.0' in text
        assert 'callgate_fsxml_cdr_posts_total{outcome="unavailable"} 0.0' in text
        # A taken port is logged, not fatal.
        assert serve_metrics(app.metrics, "127.0.0.1", port, wsgi_server) is None
    finally:
        server.stop(timeout=1)
