"""Sentinel and Cluster store URLs parse into what redis-py needs, or are refused by name."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, describe, parse_config
from proxy.store_url import Topology, is_topology_url, parse_topology
from tests.conftest import raw_config


def test_sentinel_url_names_sentinels_service_db_and_credentials() -> None:
    """Sentinels (default port 26379), the service, the db and percent-decoded credentials."""
    topology = parse_topology(
        "redis+sentinel://app:p%40ss@10.0.0.1:26380,[::1]:26381,s3/orders/2?socket_timeout=0.5"
    )
    assert topology == Topology(
        kind="sentinel",
        nodes=(("10.0.0.1", 26380), ("::1", 26381), ("s3", 26379)),
        tls=False,
        connection={"username": "app", "password": "p@ss", "db": 2, "socket_timeout": 0.5},
        service_name="orders",
        sentinel_connection={"socket_timeout": 0.5},
    )


def test_sentinels_get_their_own_credentials_and_the_tls_options() -> None:
    """sentinel_password reaches only the sentinels; TLS options reach both."""
    topology = parse_topology(
        "rediss+sentinel://:data-pw@s1:26379/svc?sentinel_password=sent-pw"
        "&ssl_cert_reqs=none&ssl_check_hostname=false"
    )
    assert topology.tls
    assert topology.connection == {
        "password": "data-pw", "ssl_cert_reqs": "none", "ssl_check_hostname": False,
    }  # fmt: skip
    assert topology.sentinel_connection == {
        "password": "sent-pw", "ssl": True, "ssl_cert_reqs": "none", "ssl_check_hostname": False,
    }  # fmt: skip


def test_cluster_url_names_seed_nodes_and_options() -> None:
    """Seed nodes (default port 6379) and options as redis-py parses them."""
    topology = parse_topology("rediss+cluster://u:pw@a:7000,b?health_check_interval=5")
    assert topology == Topology(
        kind="cluster",
        nodes=(("a", 7000), ("b", 6379)),
        tls=True,
        connection={"username": "u", "password": "pw", "health_check_interval": 5},
    )
    assert parse_topology("redis+cluster://a:7000/0").connection == {"db": 0}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "names its service"),
        ("redis+sentinel://s1:26379/svc/one", "database number"),
        ("redis+sentinel://s1:70000/svc", "expected host:port entries in the URL"),
        ("redis+sentinel://s1,:26379/svc", "host:port"),
        ("redis+cluster://a:7000/3", "only database 0"),
        ("redis+cluster://a:7000?db=3", "option 'db'"),
        ("redis+cluster://a:7000?sentinel_password=x", "option 'sentinel_password'"),
        ("redis+cluster://a:7000?retries=3", "option 'retries'"),
        ("redis+sentinel://s1/svc?ssl_certfile=/c.pem", "option 'ssl_certfile' needs TLS"),
        ("redis+cluster://a?socket_timeout=soon", "'socket_timeout'"),
    ],
)
def test_bad_urls_are_refused_naming_the_problem(url: str, message: str) -> None:
    """A URL the proxy could not honour fully is refused, saying which part."""
    with pytest.raises(ValueError) as caught:
        parse_topology(url)
    assert message in str(caught.value)


def test_only_the_topology_schemes_are_topology_urls() -> None:
    for url in ("redis+sentinel://s/x", "rediss+sentinel://s/x", "redis+cluster://a",
                "rediss+cluster://a"):  # fmt: skip
        assert is_topology_url(url)
    for url in ("redis://a", "rediss://a", "unix:///tmp/r.sock", "memory://"):
        assert not is_topology_url(url)


def test_config_accepts_topology_urls_and_masks_their_password() -> None:
    """The store URL field takes the new forms; the effective config hides the password."""
    url = "redis+sentinel://:secret@s1:26379,s2:26379/svc"
    config = parse_config(raw_config("http://127.0.0.1:9", store={"url": url}), env={})
    assert config.store.url == url
    assert "secret" not in str(describe(config))


def test_config_refuses_a_bad_topology_url_with_the_field_path() -> None:
    """An unknown option is a config error naming the field and the option."""
    raw = raw_config("http://127.0.0.1:9", store={"url": "redis+cluster://a:7000?colour=red"})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, env={})
    assert caught.value.problems == ["store.url: option 'colour' is not a Redis connection option"]
