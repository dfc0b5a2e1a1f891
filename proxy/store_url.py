"""Store URLs: every option checked at start, and what a Sentinel or Cluster URL names.

`check_redis_url` refuses any option the store would not honour exactly as redis-py does.

Users who outgrow one Redis point the proxy at a Sentinel group or a Cluster:

    redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]
    redis+cluster://[[user]:password@]host:port[,host:port...]

(and `rediss+` for TLS). The credentials, the db and every query option mean exactly what
they mean in a `redis://` URL: they are handed to redis-py's own URL parser, on a
`redis://` URL rebuilt from the same parts, so an option behaves the same whichever form
names the store. An option that redis-py's connections do not take is refused here, by
name, before the proxy starts. Two options are our own and never reach a data node:
`sentinel_username` and `sentinel_password`, for sentinels that require AUTH of their own.

The module sits below the config layer (it imports nothing of ours), so that the config
can refuse a bad URL with the field's path, and the store can build its clients from the
same parse.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, parse_url
from redis.exceptions import RedisError

TopologyKind = Literal["sentinel", "cluster"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_PORT = 26379
CLUSTER_PORT = 6379

# Options redis-py gives the connections to sentinels too: how to reach a server at all.
_SHARED_PREFIXES = ("socket_", "ssl_")
_SENTINEL_AUTH = ("sentinel_username", "sentinel_password")
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


@dataclass(frozen=True, slots=True)
class Topology:
    """A Sentinel group or a Cluster, as redis-py's clients take them.

    `nodes` are the sentinels (Sentinel) or the seed nodes (Cluster). `connection` holds
    the keyword arguments for a connection to a data node, without its address (the
    sentinels or the slot map supply it); `tls` says whether it is a TLS connection.
    `sentinel_connection` holds those for a connection to a sentinel.
    """

    kind: TopologyKind
    nodes: tuple[tuple[str, int], ...]
    tls: bool
    connection: Mapping[str, Any]
    service_name: str = ""
    sentinel_connection: Mapping[str, Any] = field(default_factory=dict)


def is_topology_url(url: str) -> bool:
    return urlsplit(url).scheme in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES)


def parse_topology(url: str) -> Topology:
    """Parse a `redis[s]+sentinel://` or `redis[s]+cluster://` URL; ValueError says why not."""
    parts = urlsplit(url)
    if parts.scheme not in (*SENTINEL_SCHEMES, *CLUSTER_SCHEMES):
        raise ValueError(f'expected a redis+sentinel:// or redis+cluster:// URL, got "{url}"')
    sentinel = parts.scheme in SENTINEL_SCHEMES
    tls = parts.scheme.startswith("rediss")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    nodes = _nodes(hosts, SENTINEL_PORT if sentinel else CLUSTER_PORT)
    segments = [unquote(s) for s in parts.path.split("/")[1:] if s]
    if sentinel:
        if not segments:
            raise ValueError("a Sentinel URL names its service: redis+sentinel://host:port/name")
        service, db_path = segments[0], segments[1:]
    else:
        service, db_path = "", segments
        if db_path not in ([], ["0"]):
            raise ValueError("a Cluster has only database 0: remove the path from the URL")
    if len(db_path) > 1 or (db_path and not db_path[0].isdigit()):
        raise ValueError(f'expected a database number after the service name, got "{parts.path}"')
    # The same URL for one node: redis-py reads credentials, db and options from it.
    options = parse_url(_single(parts, userinfo, db_path, parts.query))
    options.pop("host", None)
    options.pop("port", None)
    options.pop("connection_class", None)
    kwargs: dict[str, Any] = dict(options)
    sentinel_auth = {name: kwargs.pop(name) for name in _SENTINEL_AUTH if name in kwargs}
    if sentinel_auth and not sentinel:
        raise ValueError(f"option {next(iter(sentinel_auth))!r} is for Sentinel URLs only")
    if not sentinel and kwargs.get("db", 0) != 0:
        raise ValueError("option 'db': a Cluster has only database 0")
    check_options(kwargs, tls)
    if not sentinel:
        return Topology("cluster", nodes, tls, kwargs)
    shared = {k: v for k, v in kwargs.items() if k.startswith(_SHARED_PREFIXES)}
    for name, value in sentinel_auth.items():
        shared[name.removeprefix("sentinel_")] = value
    if tls:
        shared["ssl"] = True
    return Topology("sentinel", nodes, tls, kwargs, service, shared)


def node_url(url: str) -> str:
    """The `redis[s]://` URL of one data node that `url` describes (its address a stand-in),
    without the sentinels' own options: what a `redis://` URL's checks apply to."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    segments = [s for s in parts.path.split("/")[1:] if s]
    db_path = segments[1:] if parts.scheme in SENTINEL_SCHEMES else segments
    query = "&".join(
        pair for pair in parts.query.split("&")
        if pair and pair.partition("=")[0] not in _SENTINEL_AUTH
    )  # fmt: skip
    return _single(parts, userinfo, db_path, query)


def _single(parts: SplitResult, userinfo: str, db_path: list[str], query: str) -> str:
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    auth = userinfo + "@" if userinfo else ""
    return f"{scheme}://{auth}localhost/{db_path[0] if db_path else ''}?{query}"


def check_options(options: Mapping[str, Any], tls: bool) -> None:
    """Refuse, by name, an option that redis-py's connections do not take."""
    if not tls:
        for name in options:
            if name.startswith("ssl_"):
                raise ValueError(f"option {name!r} needs TLS: use a rediss+ URL")
    try:
        # Building a connection object checks its arguments; it opens nothing.
        (SSLConnection if tls else Connection)(**options)
    except TypeError as exc:
        match = _UNEXPECTED.search(str(exc))
        name = match.group(1) if match else "?"
        raise ValueError(f"option {name!r} is not a Redis connection option") from None


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for entry in hosts.split(","):
        host, port = _address(entry.strip(), default_port)
        nodes.append((host, port))
    return tuple(nodes)


def _address(entry: str, default_port: int) -> tuple[str, int]:
    if entry.startswith("["):  # [v6]:port
        host, _, rest = entry[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = entry.partition(":")
    if not host:
        raise ValueError(f'expected host:port in the URL, got "{entry}"')
    if not port_text:
        return unquote(host), default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f'expected host:port in the URL, got "{entry}"')
    return unquote(host), int(port_text)


# Query options of a Redis store URL, passed to redis-py exactly as it parses them.
REDIS_URL_OPTIONS = frozenset({
    "db", "username", "password", "protocol", "client_name", "lib_name", "lib_version",
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "health_check_interval",
    "max_connections", "retry_on_timeout",
})  # fmt: skip
REDIS_TLS_OPTIONS = frozenset({
    "ssl_keyfile", "ssl_certfile", "ssl_password", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_ca_data", "ssl_ca_path", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers",
    "ssl_include_verify_flags", "ssl_exclude_verify_flags",
})  # fmt: skip
# Options redis-py would accept that the store refuses, and why.
_REFUSED_REDIS_OPTIONS = {
    "decode_responses": "the store reads replies as bytes",
    "encoding": "the store encodes its own values",
    "encoding_errors": "the store encodes its own values",
    "retry_on_error": "the proxy never re-sends a store command",
    "timeout": "use store.timeout",
    "socket_keepalive_options": "not expressible in a URL; keepalive timing is redis-py's",
}


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL option the store would not honour exactly as redis-py does.

    Every option is checked by name, then redis-py parses the URL and builds (without
    connecting) the connection it describes, TLS context included, so a bad value or a
    missing certificate file is reported now rather than on the first request.
    """
    parts = urlsplit(url)
    names = [pair.partition("=")[0] for pair in parts.query.split("&") if pair]
    for name in names:
        if name in _REFUSED_REDIS_OPTIONS:
            raise ValueError(f"option {name} is not supported: {_REFUSED_REDIS_OPTIONS[name]}")
        if name in REDIS_TLS_OPTIONS and parts.scheme != "rediss":
            raise ValueError(f"option {name} needs a rediss:// URL")
        if name not in REDIS_URL_OPTIONS | REDIS_TLS_OPTIONS:
            raise ValueError(f"option {name} is not a known Redis URL option")
    values = dict(parse_qsl(parts.query))
    for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
        if name in values and not os.path.isfile(values[name]):
            raise ValueError(f"option {name}: no such file: {values[name]}")
    if parts.scheme == "unix" and "socket_keepalive" in names:
        raise ValueError("option socket_keepalive applies to TCP only, not unix://")
    try:
        pool = ConnectionPool.from_url(url)
        if pool.connection_kwargs.get("retry_on_timeout"):
            raise ValueError("option retry_on_timeout: the proxy never re-sends a store command")
        connection = pool.make_connection()  # type: ignore[no-untyped-call]
        if isinstance(connection, SSLConnection):
            connection.ssl_context.get()
    except (ValueError, TypeError, RedisError, OSError) as exc:
        raise ValueError(f"{_option_named(exc, parts.query, names)}{exc}") from None


# Words of redis-py's and the ssl module's messages -> the option they are about.
_MESSAGE_OPTIONS = {
    "Certificate Requirements": "ssl_cert_reqs",
    "TLS/SSL version": "ssl_min_version",
    "cipher": "ssl_ciphers",
    "PEM": "ssl_certfile",
}


def _option_named(exc: Exception, query: str, names: list[str]) -> str:
    """`option NAME: ` for the option an error is about, when that can be told."""
    message = str(exc)
    if message.startswith("option "):
        return ""
    filename = getattr(exc, "filename", None)
    for name in names:
        if name in message or (filename and f"{name}={filename}" in unquote(query)):
            return f"option {name}: "
    for words, name in _MESSAGE_OPTIONS.items():
        if words in message and name in names:
            return f"option {name}: "
    return ""
