"""Prometheus metrics of ``callgate fsxml`` (served on ``[fsxml] metrics_port``, like the sync worker's).

Every label is bounded: a closed list of values, anything else counted as ``other`` (never a
source address, user, domain or uuid). What an SRE reads here:

* ``callgate_fsxml_requests_total{kind, outcome}``: mod_xml_curl lookups (``kind`` the lookup
  kind, ``none`` when refused before the form was read) by what was answered;
* ``callgate_fsxml_cdr_posts_total{outcome}``: mod_json_cdr posts by outcome; ``unavailable``
  (503) means FreeSWITCH retries and then piles the CDR in its err-log-dir: unbilled until
  replayed (alert CallgateCdrPostsUnavailable);
* ``callgate_fsxml_request_duration_seconds{endpoint}``: time to answer, ``fsxml`` or ``cdr``.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app

from engine.fsxml.request import Kind

log = logging.getLogger("callgate.fsxml")

OTHER = "other"
KINDS = ("none", *(kind.value for kind in Kind))
REQUEST_OUTCOMES = (
    "answered",
    "forbidden",  # source outside fsxml.allowed_networks (403)
    "unauthorized",  # basic-auth credentials wrong (401)
    "malformed",  # not a form (400)
    "too_large",  # over fsxml.max_body_bytes (413)
    "method",  # neither GET nor POST (405)
    "not_found",  # another path (404)
    "no_snapshot",  # 503
    "no_gateway_credentials",  # 503
    "error",  # unexpected failure, answered 503
)
CDR_OUTCOMES = (
    "billed",
    "already_billed",
    "ignored",
    "malformed",  # 400 / 415 / 413 / 405: FreeSWITCH keeps it in its err-log-dir, never billed
    "refused",  # 403 / 401: a source or credentials the endpoint does not accept
    "bad_signature",  # a ticket whose signature does not verify ([billing] ticket_keys; 400)
    "unavailable",  # 503: not billed yet, FreeSWITCH retries then writes its err-log-dir
)
ENDPOINTS = ("fsxml", "cdr", OTHER)
# A directory answer comes from memory (~0.1-1 ms); a CDR post runs one Redis script.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

# CdrReceiver's outcome kinds -> the label (ignored_* collapse into one value).
_CDR_KIND = {
    "billed": "billed",
    "duplicate": "already_billed",
    "malformed": "malformed",
    "bad_signature": "bad_signature",
}


def cdr_outcome(kind: str) -> str:
    """The bounded ``outcome`` label of a CdrReceiver outcome kind."""
    if kind.startswith("ignored_"):
        return "ignored"
    label = _CDR_KIND.get(kind, kind)
    return label if label in CDR_OUTCOMES else OTHER


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


class FsxmlMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "callgate_fsxml_requests_total",
            "mod_xml_curl lookups answered by callgate fsxml, by lookup kind and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.cdr_posts = Counter(
            "callgate_fsxml_cdr_posts_total",
            "mod_json_cdr posts answered at /cdr, by outcome",
            ["outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "callgate_fsxml_request_duration_seconds",
            "Time to answer one request, by endpoint (fsxml: directory/gateways, cdr: CDR posts)",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Every series exists from the start: a rate over a series born with its first
        # increment misses that increment, and an alert on it would stay silent.
        for outcome in CDR_OUTCOMES:
            self.cdr_posts.labels(outcome)
        for endpoint in ENDPOINTS[:2]:
            self.duration.labels(endpoint)

    def request(self, kind: str, outcome: str) -> None:
        self.requests.labels(_bounded(kind, KINDS), _bounded(outcome, REQUEST_OUTCOMES)).inc()

    def cdr_post(self, outcome: str) -> None:
        self.cdr_posts.labels(_bounded(outcome, CDR_OUTCOMES)).inc()

    def observe(self, endpoint: str, seconds: float) -> None:
        self.duration.labels(_bounded(endpoint, ENDPOINTS)).observe(seconds)


def serve_metrics(metrics: FsxmlMetrics, host: str, port: int, server_factory: Any) -> Any:
    """Serve /metrics with ``server_factory`` (engine.fsxml.server.wsgi_server: gevent, like the
    service itself); None when the port is 0. A port in use is logged, not fatal: the
    directory and the CDR endpoint matter more than their metrics."""
    if not port:
        return None
    try:
        server = server_factory((host, port), make_wsgi_app(metrics.registry))
        server.start()
    except OSError as exc:
        log.error("fsxml metrics not served on %s:%s: %s", host, port, exc)
        return None
    return server
