"""Store URL options work on the hot path as redis-py defines them, or are refused at start.

TLS runs for real: a CA made by the test, a redis-server with a TLS port, verify-full,
mutual TLS, the hostname option and a wrong CA.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest

from proxy.config import ConfigError, parse_config
from proxy.errors import StoreUnavailable
from proxy.store.base import Acquired
from proxy.store.connection import DEFAULT_HEALTH_CHECK_INTERVAL, connection_pool
from proxy.store.redis import RedisStore
from tests.conftest import RedisServer, key, raw_config
from tests.redis_topologies import Certificates, RedisNode, tls_node


async def works(url: str) -> bool:
    """One begin through a store on `url`: True if acquired, False if the store failed."""
    store = RedisStore(url, timeout=2.0)
    try:
        decision = await store.begin("idp:" + key("tls"), "fp", lease=5, ttl=60, takeover=False)
        assert isinstance(decision, Acquired)
        await store.ping()
        return True
    except StoreUnavailable:
        return False
    finally:
        await store.close()


def tls_url(node: RedisNode, certs: Certificates, *options: str, host: str = "127.0.0.1") -> str:
    port = node.tls_port
    query = "&".join((f"ssl_ca_certs={certs.path('ca.crt')}", *options))
    return f"rediss://{host}:{port}/0?{query}"


async def test_tls_verify_full(
    certificates: Certificates, redis_nodes: list[RedisNode], tmp_path: Path
) -> None:
    """With the CA, the server's certificate and name are verified; with the wrong CA the
    connection is refused."""
    node = tls_node(tmp_path / "tls", certificates).started()
    redis_nodes.append(node)
    assert await works(tls_url(node, certificates))
    assert await works(tls_url(node, certificates, "ssl_cert_reqs=required"))
    wrong_ca = tls_url(node, certificates).replace("ca.crt", "wrong-ca.crt")
    assert not await works(wrong_ca)


async def test_tls_ca_given_as_data(
    certificates: Certificates, redis_nodes: list[RedisNode], tmp_path: Path
) -> None:
    """`ssl_ca_data` carries the CA in the URL itself."""
    node = tls_node(tmp_path / "tls", certificates).started()
    redis_nodes.append(node)
    pem = (certificates.directory / "ca.crt").read_text()
    port = node.tls_port
    assert await works(f"rediss://127.0.0.1:{port}/0?ssl_ca_data={quote(pem, safe='')}")


async def test_mutual_tls(
    certificates: Certificates, redis_nodes: list[RedisNode], tmp_path: Path
) -> None:
    """A server that demands client certificates accepts ssl_certfile/ssl_keyfile, and
    refuses a client without them."""
    node = tls_node(tmp_path / "mtls", certificates, clients_need_certs=True).started()
    redis_nodes.append(node)
    client = (f"ssl_certfile={certificates.path('client.crt')}",
              f"ssl_keyfile={certificates.path('client.key')}")  # fmt: skip
    assert await works(tls_url(node, certificates, *client))
    assert not await works(tls_url(node, certificates))


async def test_tls_hostname_check_can_be_turned_off(
    certificates: Certificates, redis_nodes: list[RedisNode], tmp_path: Path
) -> None:
    """A certificate for another name fails verify-full, and passes with
    ssl_check_hostname=false (the chain is still verified)."""
    node = tls_node(tmp_path / "other", certificates, server="other").started()
    redis_nodes.append(node)
    assert not await works(tls_url(node, certificates))
    assert await works(tls_url(node, certificates, "ssl_check_hostname=false"))
    wrong_ca = tls_url(node, certificates, "ssl_check_hostname=false")
    assert not await works(wrong_ca.replace("ca.crt", "wrong-ca.crt"))


async def test_acl_user_and_password_and_username_only(
    redis: RedisServer,
) -> None:
    """An ACL user with a password, and a username-only URL (a `nopass` user), both
    authenticate as that user; a wrong password is refused."""
    redis.command("ACL", "SETUSER", "proxy", "on", ">s3cret", "~*", "+@all")
    redis.command("ACL", "SETUSER", "nopassuser", "on", "nopass", "~*", "+@all")
    try:
        base = f"127.0.0.1:{redis.port}/0"
        for url, user in ((f"redis://proxy:s3cret@{base}", b"proxy"),
                          (f"redis://nopassuser@{base}", b"nopassuser")):  # fmt: skip
            store = RedisStore(url, timeout=2.0)
            try:
                assert await store._batcher.call("ACL", "WHOAMI") == user
            finally:
                await store.close()
        assert not await works(f"redis://proxy:wrong@127.0.0.1:{redis.port}/0")
    finally:
        redis.command("ACL", "DELUSER", "proxy", "nopassuser")


async def test_db_from_the_path_and_the_query(redis: RedisServer) -> None:
    """Records land in the database the URL names, by path or by `?db=`."""
    for url in (f"redis://127.0.0.1:{redis.port}/5", f"redis://127.0.0.1:{redis.port}?db=5"):
        store = RedisStore(url, timeout=2.0)
        try:
            record = "idp:" + key("db")
            await store.begin(record, "fp", lease=5, ttl=60, takeover=False)
            assert await store._batcher.call("EXISTS", record) == 1
        finally:
            await store.close()
    assert b"idp:" not in redis.command("KEYS", "*")  # nothing in db 0


def test_keepalive_health_checks_and_no_retries_by_default() -> None:
    """TCP keepalive and health checks are on unless the URL says otherwise; retries never."""
    pool = connection_pool("redis://127.0.0.1:1/0", 0.5)
    kwargs = pool.connection_kwargs
    assert kwargs["socket_keepalive"] is True
    assert kwargs["health_check_interval"] == DEFAULT_HEALTH_CHECK_INTERVAL
    assert kwargs["socket_connect_timeout"] == 0.5
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    assert connection.retry.get_retries() == 0
    custom = connection_pool(
        "redis://127.0.0.1:1/0?socket_keepalive=false&health_check_interval=3&socket_timeout=2",
        0.5,
    )
    assert custom.connection_kwargs["socket_keepalive"] is False
    assert custom.connection_kwargs["health_check_interval"] == 3
    assert custom.connection_kwargs["socket_timeout"] == 2.0


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://127.0.0.1/0?ssl_cert_reqs=none", "ssl_cert_reqs"),
        ("rediss://127.0.0.1/0?ssl_cert_reqs=bogus", "ssl_cert_reqs"),
        ("rediss://127.0.0.1/0?ssl_certfile=/no/such/file", "ssl_certfile"),
        ("rediss://127.0.0.1/0?ssl_min_version=5", "ssl_min_version"),
        ("redis://127.0.0.1/0?retry_on_timeout=true", "retry_on_timeout"),
        ("redis://127.0.0.1/0?decode_responses=true", "decode_responses"),
        ("redis://127.0.0.1/0?socket_timout=1", "socket_timout"),
        ("redis://127.0.0.1/0?db=first", "db"),
        ("redis://127.0.0.1/0?protocol=4", "protocol"),
        ("unix:///tmp/redis.sock?socket_keepalive=true", "socket_keepalive"),
    ],
)
def test_unsupported_or_invalid_options_are_refused_at_start(url: str, named: str) -> None:
    """The config error names the store URL field and the option."""
    with pytest.raises(ConfigError) as error:
        parse_config(raw_config("http://127.0.0.1:9", store={"url": url}), env={})
    assert error.value.problems[0].startswith(f"store.url: option {named}"), error.value


def test_no_password_in_a_refused_url() -> None:
    """A refused URL is reported without its password."""
    with pytest.raises(ConfigError) as error:
        parse_config(raw_config("http://127.0.0.1:9", store={"url": "mongo://u:hunter2@h/0"}),
                     env={})  # fmt: skip
    assert "hunter2" not in str(error.value)
