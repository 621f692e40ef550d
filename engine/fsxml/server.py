"""``callgate fsxml``: the WSGI application mod_xml_curl talks to, and the gevent server around it.

Two endpoints behind the same access check: ``/cdr``, where mod_json_cdr posts FreeSWITCH's
CDRs (engine.fsxml.cdrpost: the billing backstop), and ``/fsxml`` (any other path: 404),
``POST`` form (mod_xml_curl's default) or ``GET`` query (its ``method=GET``). In order, per
``/fsxml`` request:

1. the source address must be in ``fsxml.allowed_networks`` (else 403), and with
   ``fsxml.username``/``password`` set, the basic-auth credentials must match (else 401);
2. the body must be a form of at most ``fsxml.max_body_bytes`` (else 400 / 413);
3. the snapshot must be loaded and confirmed by Redis within ``fsxml.snapshot_max_age``
   (else 503: FreeSWITCH logs the HTTP error and falls back to its own XML, where callgate's
   devices are absent, so they are refused rather than let in on stale data);
4. a gateway lookup (``purpose=gateways``, ``sofia.conf``) needs the carrier passwords read
   from PostgreSQL once (:mod:`engine.fsxml.credentials`; else 503);
5. the answer comes from memory (:class:`~engine.fsxml.directory.Answers`).

Nothing answers 500: an unexpected error is logged (without the request) and answered 503.
Refusals are logged at most once per ``_LOG_EVERY`` seconds per source and kind, with the
source and the counts; never a credential, and caller-supplied text only escaped (``%r``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from engine.config import FsxmlSettings
from engine.fsxml.access import Access, Denial
from engine.fsxml.cdrpost import PATH as CDR_PATH
from engine.fsxml.cdrpost import CdrReceiver
from engine.fsxml.credentials import GatewayPasswords, postgres_reader
from engine.fsxml.directory import Answers, Directory
from engine.fsxml.metrics import FsxmlMetrics, cdr_outcome
from engine.fsxml.request import BadRequest, Kind, lookup, parse_form

log = logging.getLogger("callgate.fsxml")

PATH = "/fsxml"
_LOG_EVERY = 60.0
_XML = [("Content-Type", "text/xml; charset=utf-8")]
_TEXT = [("Content-Type", "text/plain; charset=utf-8")]

StartResponse = Callable[..., Any]
_GATEWAY_KINDS = (Kind.GATEWAYS, Kind.SOFIA_CONF)


class SnapshotSource:
    """What the application needs of a SnapshotHolder (tests may pass the holder itself)."""

    def __init__(self, holder: Any) -> None:
        self._holder = holder

    def directory(self, max_age: float) -> Directory | None:
        holder = self._holder
        if not holder.loaded or holder.confirmed_age() > max_age:
            return None
        directory: Directory = holder.current[1]
        return directory


class _Seen:
    """What one request was, for the metrics (filled in as the request is handled)."""

    __slots__ = ("endpoint", "kind", "outcome")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint  # fsxml, cdr, other
        self.kind = "none"  # the lookup kind, once the form was read
        self.outcome = "error"


class FsxmlApp:
    """The WSGI application."""

    def __init__(
        self,
        settings: FsxmlSettings,
        answers: Answers,
        source: SnapshotSource,
        gateways_ready: Callable[[], bool] = lambda: True,
        cdr: CdrReceiver | None = None,
        metrics: FsxmlMetrics | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or FsxmlMetrics()
        self._cdr = cdr  # None: no /cdr endpoint
        self._answers = answers
        self._source = source
        self._gateways_ready = gateways_ready  # the carrier passwords were read (engine.fsxml.credentials)
        self._access = Access(settings.allowed_networks, settings.username, settings.password)
        self._refusals: dict[tuple[str, str], list[float]] = {}  # (source, kind) -> [last logged, count]
        self.served = 0

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        path = environ.get("PATH_INFO", "")
        cdr = path == CDR_PATH and self._cdr is not None
        seen = _Seen("cdr" if cdr else "fsxml" if path == PATH else "other")
        try:
            return self._handle(environ, start_response, seen)
        except Exception:
            log.exception("fsxml request failed")
            seen.outcome = "unavailable" if cdr else "error"  # a CDR answered 503 is retried
            return _reply(start_response, "503 Service Unavailable", b"unavailable\n", _TEXT)
        finally:
            self._count(seen, time.perf_counter() - started)

    def _count(self, seen: _Seen, seconds: float) -> None:
        if seen.endpoint == "cdr":
            self.metrics.cdr_post(seen.outcome)
        else:
            self.metrics.request(seen.kind, seen.outcome)
        self.metrics.observe(seen.endpoint, seconds)

    def _handle(self, environ: dict[str, Any], start_response: StartResponse, seen: _Seen) -> Iterable[bytes]:
        remote = environ.get("REMOTE_ADDR", "")
        denial = self._access.check(remote, environ.get("HTTP_AUTHORIZATION"))
        cdr = seen.endpoint == "cdr"
        if denial is Denial.SOURCE:
            seen.outcome = "refused" if cdr else "forbidden"
            self._refused(remote, "source")
            return _reply(start_response, "403 Forbidden", b"forbidden\n", _TEXT)
        if denial is Denial.CREDENTIALS:
            seen.outcome = "refused" if cdr else "unauthorized"
            self._refused(remote, "credentials")
            headers = [*_TEXT, ("WWW-Authenticate", 'Basic realm="callgate fsxml"')]
            return _reply(start_response, "401 Unauthorized", b"unauthorized\n", headers)
        if cdr and self._cdr is not None:
            return self._cdr_post(environ, start_response, self._cdr, seen)
        if seen.endpoint != "fsxml":
            seen.outcome = "not_found"
            return _reply(start_response, "404 Not Found", b"not found\n", _TEXT)
        method = environ.get("REQUEST_METHOD", "")
        if method == "POST":
            body = self._body(environ)
            if body is None:
                seen.outcome = "too_large"
                return _reply(start_response, "413 Content Too Large", b"too large\n", _TEXT)
        elif method == "GET":
            body = environ.get("QUERY_STRING", "").encode("latin-1")
        else:
            seen.outcome = "method"
            return _reply(
                start_response, "405 Method Not Allowed", b"GET or POST\n", [*_TEXT, ("Allow", "GET, POST")]
            )
        try:
            request = lookup(parse_form(body.decode("utf-8")))
        except (BadRequest, UnicodeDecodeError):
            seen.outcome = "malformed"
            self._refused(remote, "malformed")
            return _reply(start_response, "400 Bad Request", b"not a form\n", _TEXT)
        seen.kind = request.kind.value
        directory = self._source.directory(self._settings.snapshot_max_age)
        if directory is None:
            seen.outcome = "no_snapshot"
            self._refused(remote, "no_snapshot")
            return _reply(start_response, "503 Service Unavailable", b"no current snapshot\n", _TEXT)
        if request.kind in _GATEWAY_KINDS and not self._gateways_ready():
            seen.outcome = "no_gateway_credentials"
            self._refused(remote, "no_gateway_credentials")
            return _reply(start_response, "503 Service Unavailable", b"no gateway credentials\n", _TEXT)
        self.served += 1
        answer = self._answers.answer(request, directory)
        seen.outcome = "answered"
        return _reply(start_response, "200 OK", answer, _XML)

    def _cdr_post(
        self, environ: dict[str, Any], start_response: StartResponse, cdr: CdrReceiver, seen: _Seen
    ) -> Iterable[bytes]:
        seen.outcome = "malformed"  # a request FreeSWITCH's module would not send
        if environ.get("REQUEST_METHOD", "") != "POST":
            return _reply(start_response, "405 Method Not Allowed", b"POST\n", [*_TEXT, ("Allow", "POST")])
        body = self._body(environ)
        if body is None:
            self._refused(environ.get("REMOTE_ADDR", ""), "cdr_too_large")
            return _reply(start_response, "413 Content Too Large", b"too large\n", _TEXT)
        uuids = parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=20).get("uuid")
        outcome = cdr.receive(body, environ.get("CONTENT_TYPE", ""), uuids[0] if uuids else None)
        seen.outcome = cdr_outcome(outcome.kind)
        return _reply(start_response, outcome.status, outcome.text.encode(), _TEXT)

    def _body(self, environ: dict[str, Any]) -> bytes | None:
        limit = self._settings.max_body_bytes
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)  # absent (chunked): read up to the limit
        except ValueError:
            length = -1
        if length > limit:
            return None
        stream = environ["wsgi.input"]
        body: bytes = stream.read(length) if length >= 0 else stream.read(limit + 1)
        return None if len(body) > limit else body

    def _refused(self, remote: str, kind: str) -> None:
        now = time.monotonic()
        entry = self._refusals.setdefault((remote, kind), [-_LOG_EVERY, 0])
        entry[1] += 1
        if now - entry[0] >= _LOG_EVERY:
            log.warning("fsxml: refused %d request(s) from %r: %s", entry[1], remote, kind.replace("_", " "))
            entry[0], entry[1] = now, 0
        if len(self._refusals) > 10_000:  # bounded whatever the sources
            self._refusals.clear()


def _reply(
    start_response: StartResponse, status: str, body: bytes, headers: list[tuple[str, str]]
) -> list[bytes]:
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def build_app(
    config: Any,
    holder: Any,
    passwords: GatewayPasswords,
    funds: Any = None,
    release_limits: Any = None,
    metrics: FsxmlMetrics | None = None,
) -> FsxmlApp:
    """The application for ``config`` over a SnapshotHolder that builds :class:`Directory`, with
    the gateways' carrier passwords of ``passwords``; with ``funds`` (engine.billing.funds.Funds)
    it also takes FreeSWITCH's CDR posts at ``/cdr``."""
    from engine.fsxml.directory import SofiaTemplate

    settings: FsxmlSettings = config.fsxml
    template = SofiaTemplate.load(settings.sofia_template) if settings.sofia_template else None
    answers = Answers(
        settings.domain,
        serve_gateways=settings.serve_gateways,
        sofia_template=template,
        cacheable_ms=settings.cacheable_ms,
        password_of=passwords.password_of,
    )
    source = SnapshotSource(holder)
    cdr = None
    if funds is not None:
        from engine.billing.ticket import ticket_keys

        cdr = CdrReceiver(
            funds,
            lambda: source.directory(settings.snapshot_max_age),
            release_limits=release_limits,
            ticket_keys=ticket_keys(config.billing.ticket_keys),
        )
    return FsxmlApp(settings, answers, source, lambda: passwords.loaded, cdr, metrics)


def snapshot_realm(client: Any, prefix: str, version: int) -> str | None:
    """The realm the sync made snapshot ``version``'s a1-hashes for ("" = none); None while the
    sync state does not describe that version (the sync writes it right after the switch)."""
    from engine.sync.state import read_state

    state = read_state(client, prefix)
    if state is None or state.version != version:
        return None
    return state.sip_realm


class RealmCheck:
    """After each full load: an ERROR when the snapshot's a1-hashes were made for a realm other
    than ``domain`` (every digest check then fails, freeswitch.md).

    The sync makes a snapshot current first and records its state (the realm) just after, so a
    load can come first: until the state describes the loaded version, the check looks again
    every ``every`` seconds, up to ``tries`` times, and stops once a newer version is loaded
    (whose own load checks). ``read_realm(version)``: :func:`snapshot_realm` on the service's
    Redis; ``later(delay, fn)``: run ``fn`` after ``delay`` seconds (``gevent.spawn_later``).
    """

    def __init__(
        self,
        read_realm: Callable[[int], str | None],
        domain: str,
        later: Callable[[float, Callable[[], None]], object],
        *,
        tries: int = 60,
        every: float = 0.5,
    ) -> None:
        self._read_realm = read_realm
        self._domain = domain
        self._later = later
        self._tries = tries
        self._every = every
        self._latest = -1

    def __call__(self, version: int) -> None:
        self._latest = version
        self._check(version, self._tries)

    def _check(self, version: int, tries_left: int) -> None:
        if version != self._latest:
            return  # a newer version was loaded: its load checks
        import redis

        try:
            realm = self._read_realm(version)
        except redis.RedisError:
            realm = None  # as if not recorded yet: look again
        if realm is None:
            if tries_left > 1:
                self._later(self._every, lambda: self._check(version, tries_left - 1))
            return
        if realm != self._domain:
            log.error(
                "fsxml: snapshot %d holds a1-hashes for realm %r but fsxml.domain is %r: every digest"
                " check fails; give callgate sync and callgate fsxml the same [fsxml] domain",
                version,
                realm,
                self._domain,
            )


def wsgi_server(address: tuple[str, int], app: Any, error_log: Any = None) -> Any:
    """gevent's WSGI server with TCP_NODELAY on every connection, and no access log.

    gevent's pywsgi writes a response's headers and its body in two sends: on a kept-alive
    connection Nagle's algorithm then holds the body until the client acknowledges the
    headers, which a client delays by up to 40 ms (measured: 44 ms per request on one kept
    connection, 0.5 ms with TCP_NODELAY). mod_xml_curl opens a connection per request and is
    not hit, but a proxy or another client keeping connections would be.
    """
    import contextlib
    import socket

    from gevent.pywsgi import WSGIServer

    class NoDelayWSGIServer(WSGIServer):
        def handle(self, sock: Any, client_address: Any) -> None:
            with contextlib.suppress(OSError):  # not TCP (a test's socket pair), or already closed
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().handle(sock, client_address)

    return NoDelayWSGIServer(address, app, log=None, error_log=error_log)


def serve(config: Any, host: str | None = None, port: int | None = None) -> int:
    """Run the service until SIGTERM/SIGINT (the caller monkey-patched already)."""
    import signal

    import gevent
    import gevent.event

    from engine.logs import setup_logging
    from engine.state.redisconn import redis_client
    from engine.state.watcher import SnapshotHolder

    setup_logging(config.logging)
    settings: FsxmlSettings = config.fsxml
    client = redis_client(config.redis, socket_timeout=10, socket_connect_timeout=5)
    # Carrier passwords come from PostgreSQL, read again when the holder sees a gateway change.
    passwords = GatewayPasswords(postgres_reader(config.database.url, config.database.connect_timeout))

    realm_check = RealmCheck(
        lambda version: snapshot_realm(client, config.redis.key_prefix, version),
        settings.domain,
        gevent.spawn_later,
    )

    def on_swap(version: int, directory: Directory) -> None:
        passwords.on_swap(version, directory)
        realm_check(version)

    holder: SnapshotHolder[Directory] = SnapshotHolder(
        client, config.redis.key_prefix, Directory.build, on_swap=on_swap, on_change=passwords.on_change
    )
    from engine.billing.funds import Funds
    from engine.billing.ticket import log_ticket_signing
    from engine.fsxml.metrics import serve_metrics
    from engine.state.limits import Limiter

    funds = Funds(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
    limiter = Limiter(client, config.redis.key_prefix, margin_seconds=config.limits.margin_seconds)
    app = build_app(config, holder, passwords, funds, limiter.release)
    metrics_server = serve_metrics(app.metrics, settings.metrics_host, settings.metrics_port, wsgi_server)
    stop = gevent.event.Event()
    watcher = gevent.spawn(holder.run, stop, config.engine.snapshot_poll_interval)
    reader = gevent.spawn(passwords.run, stop)
    address = (host or settings.listen_host, settings.listen_port if port is None else port)
    # No access log (every REGISTER asks; the refusals are logged above).
    server = wsgi_server(address, app, error_log=log)
    server.start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, stop.set)
    print(f"callgate fsxml listening on http://{address[0]}:{server.server_port}{PATH}", flush=True)
    log_ticket_signing(log, config.billing.ticket_keys, "the CDR endpoint accepts")
    if not settings.domain:
        log.warning("fsxml.domain is empty: no directory is served (every user lookup is 'not found')")
    try:
        stop.wait()
    finally:
        server.stop(timeout=5)
        if metrics_server is not None:
            metrics_server.stop(timeout=1)
        watcher.kill()
        reader.kill()
        client.close()
    return 0
