"""Configuration: one TOML file (config/callgate.toml) plus environment overrides.

Lookup order for the file: the explicit path, else $CALLGATE_CONFIG, else
./config/callgate.toml if present, else built-in defaults. Every key is optional;
unknown sections or keys are an error so a typo never silently keeps a default.

Environment overrides (applied after the file):
- CALLGATE_DATABASE_URL -> database.url
- CALLGATE_REDIS_URL    -> redis.url
- CALLGATE_<SECTION>__<KEY> for any other key, e.g. CALLGATE_ENGINE__LISTEN_PORT=9000
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from engine.decision import DEFAULT_SIP_RESPONSES, Reason
from engine.rules.config import RulesConfig


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class EngineSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8084
    max_connections: int = 50000  # sockets held per process (calls up); over it -> ENGINE_DEGRADED
    reuse_port: bool = False  # SO_REUSEPORT: several processes on one port
    connect_timeout: float = 2.0  # FreeSWITCH's reply to `connect`
    decision_deadline: float = 0.5  # channel data in -> decision written
    reply_timeout: float = 2.0  # replies still missing after this are logged; the call is still followed
    hangup_timeout: float = 14400.0  # socket kept this long at most waiting for CHANNEL_HANGUP_COMPLETE
    snapshot_max_age: float = 5.0  # refuse to decide on a snapshot not confirmed for this long
    snapshot_switch_max_age: float = 600.0  # the same bound while the next version is being loaded
    snapshot_poll_interval: float = 1.0
    # Catalogue images (engine.state.image): a directory where each built snapshot version is
    # written once and mapped by every process of the host that needs it later (a restart
    # then starts in about a second). A tmpfs such as /dev/shm/callgate; "" = no images.
    snapshot_image_dir: str = ""
    # Without a usable image in snapshot_image_dir (or without one), fetch the image the sync
    # worker published in Redis (engine.state.imageblob) before decoding the rows: a new host
    # or a new version starts in seconds instead of minutes at a million rows.
    snapshot_image_fetch: bool = True
    # With snapshot_image_fetch: how long (seconds) to wait at most for the image of a version its
    # producer marks as being built (the sync worker's leader, right after a full snapshot) rather
    # than decode and build it here too (~100 s of CPU per process at 1M/1M, holding the GIL
    # against calls). Sized to the producer's build at 1M/1M (~90-100 s); 0 = never wait. At most
    # half of snapshot_switch_max_age (the rest is for a build after a wait in vain).
    snapshot_image_wait: float = 150.0
    max_frame_bytes: int = 1048576
    # Bound of each packed table's cache of recently built entities, per generation (two
    # generations: at most twice this many per table; the origination rate tables of a catalogue
    # share it, engine.rules.packed.recent_limit). Memory against decision CPU: measured in
    # docs/performance.md ("Decision cost"); ~0.5 KB per cached account.
    entity_cache: int = 16384
    gc_young_threshold: int = 5000  # engine.gcpolicy; 0 = CPython's defaults
    # Middle-generation collections after this many young ones; 0 = never automatically (the
    # survivors wait for the periodic full collection: engine.gcpolicy). CPython's default: 10.
    gc_middle_threshold: int = 0
    gc_full_interval: float = 300.0  # seconds between full collections (with gc_young_threshold > 0)
    # Seconds between young collections run on a clock (with gc_young_threshold > 0), so that
    # one never walks more than this long's allocations (engine.gcpolicy); 0 = only the threshold.
    gc_young_interval: float = 0.02
    # Source networks FreeSWITCH connects from (CIDRs); a connection from elsewhere is closed at
    # accept. Empty: any source (then firewall the port: see docs/call-session.md).
    allowed_networks: tuple[str, ...] = ()
    # Load shedding before deciding (engine.shedding): ENGINE_DEGRADED at once when the event
    # loop is this many seconds behind, or when more calls than this wait for their decision
    # in the process; 0 turns either off.
    shed_loop_lag: float = 0.1
    shed_backlog: int = 1000
    # ENGINE_DEGRADED at once for a call whose connection waited longer than this (seconds)
    # between the engine's accept and its channel data; 0 = off.
    shed_accept_wait: float = 0.2
    # Count in that wait the connection's time in the kernel's accept queue (TCP_INFO, Linux;
    # engine.esl.server): without it a call queued there while the engine was busy is decided,
    # late, as if it had just arrived.
    shed_accept_queue: bool = True
    # While over shed_loop_lag or shed_backlog, stop listening: the kernel refuses new
    # connections (RST) and FreeSWITCH tries its next engine at once (docs/performance.md).
    shed_stop_listening: bool = True
    # The shortest such pause (seconds): the listener resumes once the lag and the backlog are
    # down to half their bounds and the pause has lasted this long (no flapping every tick).
    shed_min_pause: float = 0.05

    def __post_init__(self) -> None:
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as exc:
                raise ConfigError(f"engine.allowed_networks: {cidr!r} is not an IP network") from exc
        if self.shed_min_pause < 0:
            raise ConfigError(f"engine.shed_min_pause must be >= 0, not {self.shed_min_pause}")
        if self.shed_loop_lag < 0 or self.shed_backlog < 0 or self.shed_accept_wait < 0:
            raise ConfigError(
                "engine.shed_loop_lag, engine.shed_backlog and engine.shed_accept_wait must be >= 0 (0 = off)"
            )
        if self.snapshot_switch_max_age < self.snapshot_max_age:
            raise ConfigError(
                f"engine.snapshot_switch_max_age ({self.snapshot_switch_max_age}) must be >= "
                f"engine.snapshot_max_age ({self.snapshot_max_age})"
            )
        if not 0 <= self.snapshot_image_wait <= self.snapshot_switch_max_age / 2:
            raise ConfigError(
                f"engine.snapshot_image_wait ({self.snapshot_image_wait}) must be >= 0 and at most half "
                f"of engine.snapshot_switch_max_age ({self.snapshot_switch_max_age})"
            )
        if self.entity_cache < 1:
            raise ConfigError(f"engine.entity_cache must be >= 1, not {self.entity_cache}")
        if self.gc_young_threshold < 0:
            raise ConfigError(f"engine.gc_young_threshold must be >= 0, not {self.gc_young_threshold}")
        if self.gc_middle_threshold < 0:
            raise ConfigError(f"engine.gc_middle_threshold must be >= 0, not {self.gc_middle_threshold}")
        if self.gc_young_interval < 0:
            raise ConfigError(f"engine.gc_young_interval must be >= 0, not {self.gc_young_interval}")
        if self.gc_full_interval <= 0:
            raise ConfigError(f"engine.gc_full_interval must be > 0, not {self.gc_full_interval}")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "postgresql://postgres@127.0.0.1:5432/callgate"
    connect_timeout: float = 5.0


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "callgate:"
    socket_timeout: float = 0.25  # the hot path's deadline for one round trip
    max_connections: int = 64  # per engine process; calls beyond it wait for a free connection
    # Redis Sentinel (docs/high-availability.md): "host:port" of each sentinel. Set, clients ask
    # them for the primary of service_name; url then gives only the db, user and password.
    sentinels: tuple[str, ...] = ()
    service_name: str = "callgate"
    sentinel_password: str = ""  # the sentinels' own requirepass, if any


@dataclass(frozen=True)
class RulesSettings:
    call_max_length: int = 6000  # seconds (ASTPP's 100 minutes)
    max_free_length: int = 6000
    default_leg_timeout: int = 60
    trusted_proxies: tuple[str, ...] = ()
    did_translation: str = ""  # rules applied to the dialled number before the DID lookup
    did_caller_id_translation: str = ""  # caller-ID rules for every inbound DID call
    local_domain: str = "${domain_name}"  # on-net legs bridge to user/<username>@<local_domain>
    uri_profile: str = "external"  # DIDs to a SIP URI bridge to sofia/<uri_profile>/<uri>
    sip_responses: Mapping[str, str] = field(default_factory=dict)  # REASON = "503 Service Unavailable"


@dataclass(frozen=True)
class LimitsSettings:
    fail_open: bool = False  # Redis down: admit by a per-process approximation instead of ENGINE_DEGRADED
    local_share: float = 1.0  # fail-open: share of each limit one process may use (1/N for N processes)
    margin_seconds: int = 300  # a call whose hangup is never seen stops counting max_duration + this later
    switches: tuple[str, ...] = ()  # FreeSWITCH inbound sockets ("host:port") listed by the reconciler
    switch_password: str = "ClueCon"
    reconcile_interval: float = 60.0  # seconds between reconciliations (when switches are configured)


@dataclass(frozen=True)
class MetricsSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 9184  # 0 disables the endpoint
    # Several processes on one host (engine.reuse_port): a directory private to them where each
    # writes its metrics; every process then serves the host's totals on a shared port.
    multiprocess_dir: str = ""


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    json: bool = False
    decision_level: str = "INFO"  # level of the one-line-per-call decision log


@dataclass(frozen=True)
class SyncSettings:
    """`callgate sync`, the live PostgreSQL -> Redis worker (docs/sync.md)."""

    check_interval: float = 1.0  # catch up at least this often without a notification; checks Redis too
    bulk_threshold: int = 2000  # more pending changes than this in one catch-up: publish a full snapshot
    lease_seconds: float = 10.0  # leader lease: a standby takes over at most this long after the leader dies
    sweep_interval: float = 600.0  # full comparison of Redis with PostgreSQL, repairing drift; 0 = never
    prune_interval: float = 60.0  # seconds between prunes of the change log
    changelog_retention: float = 3600.0  # applied changes are kept this long in callgate_changes
    journal_maxlen: int = 10000  # change events kept in Redis for engines that missed a message
    events_maxlen: int = 1000000  # cap of the {prefix}events stream the engines write (XADD MAXLEN ~)
    events_batch: int = 500  # engine events persisted per PostgreSQL transaction
    reconnect_max_delay: float = 10.0  # longest wait between reconnection attempts
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9185  # Prometheus /metrics of the worker; 0 disables
    # After each full snapshot, the leader builds its catalogue image in a child process and
    # publishes it in Redis (engine.state.imageblob), in chunks of image_chunk_bytes (1 MiB less a
    # page: with Redis' value header, each chunk fits jemalloc's 1 MiB size class, not the 1.25 MiB).
    publish_images: bool = True
    image_chunk_bytes: int = 1044480

    def __post_init__(self) -> None:
        if not 1 << 16 <= self.image_chunk_bytes <= 1 << 26:
            raise ConfigError(
                f"sync.image_chunk_bytes must be 64 KiB to 64 MiB, not {self.image_chunk_bytes}"
            )


# A SIP domain as FreeSWITCH's directory names it: a host name or an IPv4 address.
_SIP_DOMAIN = re.compile(
    r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


@dataclass(frozen=True)
class AdminSettings:
    """`[admin]`: customer management and its HTTP API (engine.admin; docs/admin.md)."""

    # `callgate api`: where the JSON HTTP API listens
    listen_host: str = "127.0.0.1"
    listen_port: int = 8089  # never an engine port (8084, 8086 in dialplan/callgate.xml)
    # generated account numbers (ASTPP's card_length / starting_digit)
    account_number_length: int = 10
    account_number_start_digit: str = ""  # digits every generated number starts with; "" = any of 1-9
    # PINs (ASTPP's pin_length / generate_pin)
    pin_length: int = 6
    generate_pin: bool = True  # a customer created without a PIN gets a generated one
    # ASTPP's create_sipdevice: a new customer gets a SIP device unless the request says otherwise
    create_sip_device: bool = False
    default_currency: str = "USD"
    default_timezone: str = "UTC"
    # scrypt work factor (log2 N) for PIN hashes; passwords always use the full factor (2^14).
    # A PIN has at most 10^pin_length values, so no affordable factor makes a leaked PIN hash
    # safe offline; this one keeps mass creation of 10,000 cards within seconds.
    pin_hash_log2_n: int = 9
    hash_threads: int = 0  # threads hashing secrets in bulk operations; 0 = one per CPU
    import_chunk_size: int = 500  # rows per import transaction
    max_page_size: int = 1000
    # `callgate api` request bodies: every route but the CSV import, and the CSV import (spooled to
    # disk); a bigger body is refused with 413 before it is read (docs/admin-api.md).
    max_body_bytes: int = 1 << 20
    max_import_bytes: int = 100 << 20
    # `callgate api` PostgreSQL connections: at most db_pool_size; a request waits db_pool_timeout
    # seconds for a free one (at most db_pool_max_waiting requests wait), then gets 503 + Retry-After.
    db_pool_size: int = 10
    db_pool_timeout: float = 2.0
    db_pool_max_waiting: int = 50

    def check(self) -> None:
        """Raise engine.config.ConfigError naming every bad key."""
        problems: list[str] = []
        if not 1 <= self.listen_port <= 65535:
            problems.append("listen_port must be 1-65535")
        if not 4 <= self.account_number_length <= 20:
            problems.append("account_number_length must be 4-20")
        if not re.fullmatch(r"[0-9]*", self.account_number_start_digit):
            problems.append("account_number_start_digit must be digits")
        elif len(self.account_number_start_digit) >= self.account_number_length - 2:
            problems.append("account_number_start_digit must leave at least 3 random digits")
        if not 4 <= self.pin_length <= 20:
            problems.append("pin_length must be 4-20")
        if not re.fullmatch(r"[A-Z]{3}", self.default_currency):
            problems.append("default_currency must be an ISO 4217 code such as USD")
        try:
            zoneinfo.ZoneInfo(self.default_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            problems.append(f"default_timezone {self.default_timezone!r} is not an IANA time zone")
        if not 4 <= self.pin_hash_log2_n <= 20:
            problems.append("pin_hash_log2_n must be 4-20")
        if self.hash_threads < 0:
            problems.append("hash_threads must be 0 (one per CPU) or more")
        if not 1 <= self.import_chunk_size <= 10000:
            problems.append("import_chunk_size must be 1-10000")
        if not 10 <= self.max_page_size <= 100000:
            problems.append("max_page_size must be 10-100000")
        if not 1024 <= self.max_body_bytes <= 64 << 20:
            problems.append("max_body_bytes must be 1024 to 64 MiB")
        if not self.max_body_bytes <= self.max_import_bytes <= 1 << 30:
            problems.append("max_import_bytes must be max_body_bytes to 1 GiB")
        if not 1 <= self.db_pool_size <= 1000:
            problems.append("db_pool_size must be 1-1000")
        if not 0 < self.db_pool_timeout <= 60:
            problems.append("db_pool_timeout must be more than 0 and at most 60 seconds")
        if not 0 <= self.db_pool_max_waiting <= 100000:
            problems.append("db_pool_max_waiting must be 0 (no limit) to 100000")
        if problems:
            raise ConfigError("[admin] " + "; ".join(problems))

    @property
    def threads(self) -> int:
        return self.hash_threads or max(1, os.cpu_count() or 1)


WEB_ROLES = ("admin", "readonly")


@dataclass(frozen=True)
class WebSettings:
    """`callgate web`: the browser admin (engine.web; docs/web-admin.md)."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8088
    # Signs the session cookie. "" = a random key made at start: sessions end when the process does.
    secret_key: str = field(default="", repr=False)
    # The cookie's Secure flag: "auto" = when the request came over TLS, "always", "never".
    cookie_secure: str = "auto"
    session_minutes: int = 480  # a session ends this long after sign-in
    # Staff who are not accounts: name = "<role>:<scrypt hash>" (`callgate web hash-password`),
    # role admin (everything) or readonly (reads everything, changes nothing). Resellers sign in
    # with their account number and account password instead.
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    # Reseller accounts that sign in read-only (support staff of a reseller).
    readonly_resellers: tuple[str, ...] = ()
    # Failed sign-ins allowed per user name and per source address within the window.
    login_max_failures: int = 5
    login_max_failures_per_source: int = 20
    login_window_seconds: int = 900
    max_jobs: int = 2  # mass creates and imports running at once; more are refused
    max_upload_mb: int = 200  # the largest CSV an import accepts

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 <= self.listen_port <= 65535:
            problems.append("listen_port must be 0-65535")
        if self.secret_key and len(self.secret_key) < 32:
            problems.append("secret_key must be at least 32 characters (or empty: random at start)")
        if self.cookie_secure not in ("auto", "always", "never"):
            problems.append("cookie_secure must be auto, always or never")
        if not 1 <= self.session_minutes <= 7 * 24 * 60:
            problems.append("session_minutes must be 1-10080")
        for name, entry in self.users.items():
            role, _, digest = entry.partition(":")
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9._@-]{0,63}", name) or name.isdigit():
                problems.append(f"users: {name!r} is not a user name (a letter first; not all digits)")
            elif role not in WEB_ROLES or not digest.startswith("scrypt$"):
                problems.append(f"users.{name}: expected '<admin|readonly>:<scrypt hash>'")
        if not (self.login_max_failures >= 1 and self.login_max_failures_per_source >= 1):
            problems.append("login_max_failures and login_max_failures_per_source must be >= 1")
        if self.login_window_seconds < 1:
            problems.append("login_window_seconds must be >= 1")
        if not 1 <= self.max_jobs <= 16:
            problems.append("max_jobs must be 1-16")
        if not 1 <= self.max_upload_mb <= 4096:
            problems.append("max_upload_mb must be 1-4096")
        if problems:
            raise ConfigError("[web] " + "; ".join(problems))


@dataclass(frozen=True)
class FsxmlSettings:
    """`callgate fsxml`: FreeSWITCH's directory and sofia gateways over mod_xml_curl (docs/freeswitch.md)."""

    listen_host: str = "127.0.0.1"
    # Not 8084/8086 (the engines the dialplan lists), 8085/8089 (admin API), 9184/9185 (metrics).
    listen_port: int = 8087
    # The SIP domain (= digest realm) callgate's devices live in. callgate answers for this
    # domain only, and authoritatively: a user it does not know there is unknown to FreeSWITCH.
    # "" = no directory is served (every directory request is "not found").
    domain: str = ""
    allowed_networks: tuple[str, ...] = ("127.0.0.1/32", "::1/128")  # the FreeSWITCH hosts; others: 403
    # HTTP basic auth (mod_xml_curl's gateway-credentials "user:password"); both empty = off.
    username: str = ""
    password: str = field(default="", repr=False)
    serve_gateways: bool = True  # answer `purpose=gateways` lookups (a sofia profile's <domains>)
    # A sofia.conf.xml whose profiles get callgate's gateways added; "" = sofia.conf is "not found".
    sofia_template: str = ""
    cacheable_ms: int = 0  # FreeSWITCH may cache each user answer this long; 0 = ask every time
    snapshot_max_age: float = 60.0  # answer 503 once Redis has not confirmed the snapshot this long
    max_body_bytes: int = 262144  # a user_call lookup carries the call's variables
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9186  # Prometheus /metrics of `callgate fsxml`; 0 disables

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 <= self.listen_port <= 65535:
            problems.append("listen_port must be 0-65535")
        if not 0 <= self.metrics_port <= 65535:
            problems.append("metrics_port must be 0-65535")
        if self.domain and not _SIP_DOMAIN.match(self.domain):
            problems.append(f"domain {self.domain!r} is not a host name")
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                problems.append(f"allowed_networks: {network!r} is not an address or network")
        if bool(self.username) != bool(self.password):
            problems.append("username and password are set together (basic auth) or both left empty")
        if ":" in self.username:
            problems.append("username may not contain ':' (basic auth)")
        if self.cacheable_ms < 0:
            problems.append("cacheable_ms must be >= 0")
        if self.snapshot_max_age <= 0:
            problems.append("snapshot_max_age must be > 0")
        if self.max_body_bytes < 4096:
            problems.append("max_body_bytes must be >= 4096")
        if problems:
            raise ConfigError("[fsxml] " + "; ".join(problems))


@dataclass(frozen=True)
class SmtpConfig:
    """`[smtp]`: the server the low-balance e-mails go through (engine.billing.alerts; docs/accounting.md).

    Also settable as CALLGATE_SMTP_HOST, _PORT, _FROM, _USER, _PASSWORD, _STARTTLS (or the
    generic CALLGATE_SMTP__<KEY>). The password is never shown (repr) nor logged."""

    host: str = ""  # "" = no e-mail is sent (they stay pending in the e-mail log)
    port: int = 25
    sender: str = "callgate@localhost"  # the From address
    username: str = ""
    password: str = field(default="", repr=False)
    starttls: bool = False
    timeout: float = 10.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 < self.port < 65536:
            problems.append("port must be 1-65535")
        if self.timeout <= 0:
            problems.append("timeout must be > 0")
        if self.host and "@" not in self.sender:
            problems.append(f"sender {self.sender!r} is not an e-mail address")
        if self.password and not self.username:
            problems.append("a password needs a username")
        if problems:
            raise ConfigError("[smtp] " + "; ".join(problems))


@dataclass(frozen=True)
class BillingSettings:
    """`[billing]`: settings the engine and `callgate fsxml` share (docs/accounting.md)."""

    # HMAC-SHA256 keys of the callgate_bill ticket (engine.billing.ticket): the engine signs
    # with the first, `callgate fsxml` accepts any (rotation: add the new key second
    # everywhere, then first, then drop the old). Empty: tickets unsigned and not checked.
    ticket_keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        # Never the keys themselves in a message.
        if any(len(key) < 32 for key in self.ticket_keys):
            raise ConfigError("[billing] ticket_keys: every key must be at least 32 characters")
        if len(set(self.ticket_keys)) != len(self.ticket_keys):
            raise ConfigError("[billing] ticket_keys: a key is listed twice")
        if len(self.ticket_keys) > 8:
            raise ConfigError("[billing] ticket_keys: at most 8 keys")


@dataclass(frozen=True)
class Config:
    engine: EngineSettings = field(default_factory=EngineSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    sync: SyncSettings = field(default_factory=SyncSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    fsxml: FsxmlSettings = field(default_factory=FsxmlSettings)
    web: WebSettings = field(default_factory=WebSettings)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    billing: BillingSettings = field(default_factory=BillingSettings)


ENV_SHORTCUTS = {
    "CALLGATE_DATABASE_URL": ("database", "url"),
    "CALLGATE_REDIS_URL": ("redis", "url"),
    # the accounting helper's first names for the SMTP settings, still honoured
    "CALLGATE_SMTP_HOST": ("smtp", "host"),
    "CALLGATE_SMTP_PORT": ("smtp", "port"),
    "CALLGATE_SMTP_FROM": ("smtp", "sender"),
    "CALLGATE_SMTP_USER": ("smtp", "username"),
    "CALLGATE_SMTP_PASSWORD": ("smtp", "password"),
    "CALLGATE_SMTP_STARTTLS": ("smtp", "starttls"),
}
DEFAULT_PATH = Path("config/callgate.toml")
# Keys whose values never appear in a configuration error.
SECRET_KEYS = frozenset(
    {"password", "sentinel_password", "switch_password", "secret_key", "users", "ticket_keys"}
)


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    environ = os.environ if environ is None else environ
    raw = _read_file(_resolve_path(path, environ))
    _apply_environment(raw, environ)
    config = _build(raw)
    rules_config(config.rules)  # validates trusted proxies and SIP responses at start-up
    for entry in config.limits.switches:
        parse_switch_address(entry)
    for entry in config.redis.sentinels:
        parse_address("redis.sentinels", entry)
    if config.redis.sentinels and not config.redis.service_name.strip():
        raise ConfigError("redis.service_name: required when redis.sentinels is set")
    return config


def parse_switch_address(entry: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') of a FreeSWITCH inbound event socket."""
    return parse_address("limits.switches", entry)


def parse_address(where: str, entry: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port'); anything else is a ConfigError naming ``where``."""
    host, _, port = entry.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected 'host:port', got {entry!r}")
    return host.strip("[]"), int(port)


def _resolve_path(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if environ.get("CALLGATE_CONFIG"):
        return Path(environ["CALLGATE_CONFIG"])
    return DEFAULT_PATH if DEFAULT_PATH.is_file() else None


def _read_file(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: '{section}' must be a [section]")
    return data


def _apply_environment(raw: dict[str, dict[str, Any]], environ: Mapping[str, str]) -> None:
    for name, value in environ.items():
        if name in ENV_SHORTCUTS:
            section, key = ENV_SHORTCUTS[name]
        elif name.startswith("CALLGATE_") and "__" in name:
            section, _, key = name.removeprefix("CALLGATE_").lower().partition("__")
        else:
            continue
        raw.setdefault(section, {})[key] = _EnvValue(value, name)


@dataclass(frozen=True)
class _EnvValue:
    text: str
    variable: str


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    sections = {f.name: f for f in fields(Config)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
    built = {
        name: _build_section(name, sections[name].default_factory, raw.get(name, {})) for name in sections
    }
    return Config(**built)


def _build_section(name: str, factory: Any, values: dict[str, Any]) -> Any:
    defaults = factory()
    hints = get_type_hints(type(defaults))
    known = {f.name for f in fields(defaults)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(unknown)}")
    converted = {key: _convert(f"{name}.{key}", hints[key], value) for key, value in values.items()}
    return dataclasses.replace(defaults, **converted)


def _convert(where: str, hint: Any, value: Any) -> Any:
    if isinstance(value, _EnvValue):
        return _convert_text(f"{where} (from {value.variable})", hint, value.text)
    origin = getattr(hint, "__origin__", None)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if origin is Mapping and isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    shown = "a secret (not shown)" if where.rpartition(".")[2] in SECRET_KEYS else repr(value)
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {shown}")


def _convert_text(where: str, hint: Any, text: str) -> Any:
    try:
        if hint is bool:
            lowered = text.strip().lower()
            if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError(text)
            return lowered in {"1", "true", "yes", "on"}
        if hint in (int, float):
            return hint(text)
        if getattr(hint, "__origin__", None) is tuple:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if hint is str:
            return text
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot read {text!r} as {hint.__name__}") from exc
    raise ConfigError(f"{where}: cannot be set from the environment")


def rules_config(settings: RulesSettings) -> RulesConfig:
    """The rules' immutable settings; bad reasons, responses or networks are errors at start-up."""
    responses = dict(DEFAULT_SIP_RESPONSES)
    for name, response in settings.sip_responses.items():
        if name not in Reason.__members__:
            raise ConfigError(f"rules.sip_responses: unknown reason {name!r}")
        code, _, text = response.partition(" ")
        if not (code.isdigit() and 400 <= int(code) <= 699 and text.strip()):
            raise ConfigError(f"rules.sip_responses.{name}: expected '<4xx-6xx> <text>', got {response!r}")
        responses[Reason(name)] = (int(code), text.strip())
    try:
        return RulesConfig(
            call_max_length=settings.call_max_length,
            max_free_length=settings.max_free_length,
            default_leg_timeout=settings.default_leg_timeout,
            trusted_proxies=settings.trusted_proxies,
            did_translation=settings.did_translation,
            did_caller_id_translation=settings.did_caller_id_translation,
            local_domain=settings.local_domain,
            uri_profile=settings.uri_profile,
            sip_responses=responses,
        )
    except ValueError as exc:
        raise ConfigError(f"[rules] {exc}") from exc
