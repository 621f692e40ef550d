"""The Redis client factory and its settings (pure: no connection is opened)."""

from __future__ import annotations

import pytest
import redis
import redis.sentinel

from engine.config import ConfigError, RedisSettings, load_config
from engine.state.redisconn import describe, redis_client, sentinel_addresses


def test_sentinels_from_the_environment() -> None:
    config = load_config(
        environ={
            "CALLGATE_REDIS__SENTINELS": "10.0.0.1:26379, [::1]:26380",
            "CALLGATE_REDIS__SERVICE_NAME": "cg",
        }
    )
    assert config.redis.sentinels == ("10.0.0.1:26379", "[::1]:26380")
    assert config.redis.service_name == "cg"
    assert sentinel_addresses(config.redis.sentinels) == [("10.0.0.1", 26379), ("::1", 26380)]


@pytest.mark.parametrize("bad", ["10.0.0.1", "host:0", "host:port", ":26379"])
def test_a_malformed_sentinel_is_refused_at_start(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"redis\.sentinels"):
        load_config(environ={"CALLGATE_REDIS__SENTINELS": bad})


def test_sentinels_need_a_service_name() -> None:
    with pytest.raises(ConfigError, match="service_name"):
        load_config(environ={"CALLGATE_REDIS__SENTINELS": "h:26379", "CALLGATE_REDIS__SERVICE_NAME": " "})


def test_without_sentinels_the_url_is_used() -> None:
    client = redis_client(
        RedisSettings(url="redis://:pw@10.1.2.3:6390/4"),
        socket_timeout=0.25,
        max_connections=8,
        blocking_timeout=2,
    )
    pool = client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool) and pool.max_connections == 8 and pool.timeout == 2
    kwargs = pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("10.1.2.3", 6390, 4, "pw")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25


def test_with_sentinels_connections_ask_for_the_primary() -> None:
    settings = RedisSettings(
        url="redis://:data-pw@ignored:1/3",
        sentinels=("127.0.0.1:26379",),
        service_name="cg",
        sentinel_password="s-pw",
    )
    client = redis_client(settings, socket_timeout=0.5, max_connections=4, blocking_timeout=1)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert isinstance(pool, redis.BlockingConnectionPool)  # callers wait for a free connection
    assert pool.service_name == "cg"
    assert pool.connection_class is redis.sentinel.SentinelManagedConnection
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["password"]) == (3, "data-pw")
    assert "host" not in kwargs  # the address comes from the sentinels, never from the URL
    (sentinel,) = pool.sentinel_manager.sentinels
    skw = sentinel.connection_pool.connection_kwargs
    assert (skw["host"], skw["port"], skw["password"], skw["socket_timeout"]) == (
        "127.0.0.1",
        26379,
        "s-pw",
        0.5,
    )
    plain = redis_client(settings, socket_timeout=None)
    assert type(plain.connection_pool) is redis.sentinel.SentinelConnectionPool


def test_describe_never_shows_a_password() -> None:
    assert describe(RedisSettings(url="redis://user:secret@h:6380/2")) == "redis://h:6380/2"
    text = describe(RedisSettings(sentinels=("a:1", "b:2"), service_name="cg", sentinel_password="secret"))
    assert "secret" not in text and "a:1" in text and "'cg'" in text
