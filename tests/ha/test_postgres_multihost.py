"""PostgreSQL multi-host connection strings (libpq's, through psycopg): the first host is a dead
port, the second the live server; every PostgreSQL user of callgate must reach the live one.

`target_session_attrs=read-write` makes libpq skip a standby (after a failover the old primary,
if it comes back as a standby, is passed over); here the dead port stands for a lost primary.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from engine.admin.api import create_app
from engine.admin.service import Actor, AdminService
from engine.admin.settings import AdminSettings
from engine.sync.worker import SyncWorker
from tests.support import config_for, engine_environment, free_port, prepare_database, run_cli
from tests.test_limits_e2e import CATALOGUE


def multi_host(url: str, dead_port: int) -> str:
    """``url`` with a dead host:port listed before its own, and read-write sessions required."""
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}127.0.0.1:{dead_port},{parts.hostname}:{parts.port or 5432}"
    query = "target_session_attrs=read-write" + (f"&{parts.query}" if parts.query else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


@pytest.fixture(scope="module")
def environment(module_pg_url: str, redis_url: str, module_key_prefix: str) -> dict[str, str]:
    prepare_database(module_pg_url, CATALOGUE)
    url = multi_host(module_pg_url, free_port())
    return engine_environment(url, redis_url, module_key_prefix, CALLGATE_DATABASE__CONNECT_TIMEOUT="2")


def test_the_url_really_lists_a_dead_host_first(environment: dict[str, str]) -> None:
    url = environment["CALLGATE_DATABASE_URL"]
    hosts = urlsplit(url).netloc.split("@")[-1]
    dead_only = url.replace(hosts, hosts.split(",")[0])
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dead_only, connect_timeout=2).close()


def test_the_sync_worker_connects_to_the_live_host(environment: dict[str, str], module_pg_url: str) -> None:
    worker = SyncWorker(config_for(environment))
    try:
        worker.connect()
        assert worker._listen is not None and worker._query is not None
        live_port = urlsplit(module_pg_url).port or 5432
        assert worker._listen.info.port == live_port
        assert worker._query.info.port == live_port
    finally:
        worker.close()
        worker.redis.close()


def test_sync_once_and_status_through_a_multi_host_url(environment: dict[str, str]) -> None:
    published = run_cli(["sync", "--once"], environment)
    assert published.returncode == 0, published.stderr
    status = run_cli(["sync", "--status"], environment)
    assert status.returncode == 0, status.stderr


def test_the_cdr_writer_connection_reaches_the_live_host(
    environment: dict[str, str], module_pg_url: str
) -> None:
    # The CDR writer's and the event persister's connection, as engine.sync.worker opens it.
    config = config_for(environment)
    with psycopg.connect(
        config.database.url,
        connect_timeout=max(1, int(config.database.connect_timeout)),
        application_name="callgate-sync-cdrs",
    ) as conn:
        assert conn.info.port == (urlsplit(module_pg_url).port or 5432)
        assert conn.execute("SELECT NOT pg_is_in_recovery()").fetchone() == (True,)


def test_the_admin_api_answers_through_a_multi_host_url(
    environment: dict[str, str], module_pg_url: str
) -> None:
    with psycopg.connect(module_pg_url, autocommit=True) as conn:
        _, token = AdminService(conn, AdminSettings(), Actor(name="test:admin")).create_token("ha-test")
    client = create_app(config_for(environment)).test_client()
    response = client.get("/api/v1/customers", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.data
