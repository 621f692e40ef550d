"""The ``[admin]`` configuration section (customer management and the HTTP API).

``engine.config.Config`` gains ``admin: AdminSettings`` (this module imports nothing from
engine.config at import time, so config.py can import it); until it does,
:func:`admin_settings` falls back to the defaults below.
"""

from __future__ import annotations

import os
import re
import zoneinfo
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AdminSettings:
    # `callgate api`: where the JSON HTTP API listens
    listen_host: str = "127.0.0.1"
    listen_port: int = 8085
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
    # disk); a bigger body is refused with 413 before it is read.
    max_body_bytes: int = 1 << 20
    max_import_bytes: int = 100 << 20
    # `callgate api` PostgreSQL connections: at most db_pool_size; a request waits db_pool_timeout
    # seconds for a free one (at most db_pool_max_waiting requests wait), then gets 503 + Retry-After.
    db_pool_size: int = 10
    db_pool_timeout: float = 2.0
    db_pool_max_waiting: int = 50

    def check(self) -> None:
        """Raise engine.config.ConfigError naming every bad key."""
        from engine.config import ConfigError  # here: engine.config may import this module

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


def admin_settings(config: Any) -> AdminSettings:
    """The checked [admin] section of `config` (defaults when the section does not exist yet)."""
    settings = getattr(config, "admin", None)
    if not isinstance(settings, AdminSettings):
        settings = AdminSettings()
    settings.check()
    return settings
