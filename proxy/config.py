"""Typed configuration: the YAML file, validated up front.

Every section is a frozen dataclass. Parsing collects every problem with its path
(`routes[2].ttl: expected a duration like "24h", got "tomorrow"`) and raises them
together, so an operator fixes a broken file in one pass instead of one error per start.
Unknown keys are errors: a typo such as `requier_key` must not silently weaken a route.
A refused value is quoted through `proxy.masking`, so no message carries a password or token.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from proxy.masking import mask_text, quote_url, redact_url, show_value
from proxy.store_url import check_redis_url, is_topology_url, node_url, parse_topology

DEFAULT_LISTEN = "0.0.0.0:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9090"
DEFAULT_UPSTREAM = "http://127.0.0.1:9000"
DEFAULT_STORE_URL = "memory://"
DEFAULT_STORE_TIMEOUT = 0.5
DEFAULT_NAMESPACE = "default"
DEFAULT_MEMORY_MAX_RECORDS = 100_000
DEFAULT_MEMORY_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_SHUTDOWN_GRACE = 30.0
DEFAULT_BODY_READ_TIMEOUT = 30.0
# Below the idle timeout of common upstream servers (gunicorn's 2 s is the shortest).
DEFAULT_UPSTREAM_KEEPALIVE = 1.0
DEFAULT_TRACING_ENDPOINT = "http://127.0.0.1:4318/v1/traces"  # an OTLP/HTTP collector beside us
DEFAULT_TRACING_SERVICE = "idempotency-proxy"
# What `tracing:` needs installed, and how to install it.
TRACING_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")
TRACING_EXTRA = "pip install 'idempotency-proxy[otel]'"

ENV_STORE_URL = "IDEMPOTENCY_PROXY_STORE_URL"
ENV_LISTEN = "IDEMPOTENCY_PROXY_LISTEN"
ENV_ADMIN_LISTEN = "IDEMPOTENCY_PROXY_ADMIN_LISTEN"
ENV_ADMIN_TOKEN = "IDEMPOTENCY_PROXY_ADMIN_TOKEN"
ENV_LOG_LEVEL = "IDEMPOTENCY_PROXY_LOG_LEVEL"

KEY_MAX_LENGTH = 255
LOG_LEVELS = ("debug", "info", "warning", "error")

OnConcurrent = Literal["reject", "wait"]
FingerprintBody = Literal["raw", "canonical"]
OnUnknownOutcome = Literal["reject", "retry"]
FailMode = Literal["closed", "open"]
Mode = Literal["enforce", "observe"]


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every one with its path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def parse_pointer(text: object) -> tuple[str, ...]:
    """An RFC 6901 JSON Pointer (`/a/b~1c`) as its unescaped reference tokens.

    The empty pointer (the whole document) is refused: ignoring the whole body would make
    every request with the key "the same request".
    """
    if not isinstance(text, str) or not text.startswith("/"):
        raise ValueError(f'expected a JSON Pointer like "/metadata/nonce", got {show_value(text)}')
    if _BAD_ESCAPE.search(text):
        raise ValueError(f'"~" must be followed by 0 or 1 (RFC 6901), got {show_value(text)}')
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in text[1:].split("/"))


@dataclass(frozen=True, slots=True)
class FingerprintPolicy:
    """How a request body enters the fingerprint (`proxy.fingerprints`).

    `ignore` holds the JSON Pointers as written; `paths` the same, parsed into tokens.
    """

    body: FingerprintBody = "raw"
    ignore: tuple[str, ...] = ()
    paths: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "paths", tuple(parse_pointer(p) for p in self.ignore))


RAW_FINGERPRINT = FingerprintPolicy()


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """What the proxy does for requests whose path matches `path`."""

    path: str
    id: str
    upstream: str
    methods: frozenset[str] = frozenset({"POST", "PATCH"})
    key_header: str = "Idempotency-Key"
    require_key: bool = False
    ttl: float = 24 * 3600.0
    lease: float = 10.0
    on_concurrent: OnConcurrent = "wait"
    wait_timeout: float = 10.0
    on_unknown_outcome: OnUnknownOutcome = "reject"
    scope_headers: tuple[str, ...] = ("Authorization",)
    release_statuses: frozenset[int] = frozenset({429, 503})
    upstream_timeout: float = 30.0
    max_request_body: int = 1024 * 1024
    max_stored_response: int = 1024 * 1024
    fingerprint: FingerprintPolicy = RAW_FINGERPRINT
    # How long a key is remembered after its response expired (0: not at all).
    tombstone_ttl: float = 0.0
    # observe: forward everything as a plain reverse proxy would, record keys as enforce
    # does, and count what enforcing would have changed (proxy.observing).
    mode: Mode = "enforce"
    # Keyless requests with the same scope and fingerprint within this window are counted
    # as suspected duplicates (never blocked); None: not counted.
    observe_keyless: float | None = None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    url: str = DEFAULT_STORE_URL
    fail_mode: FailMode = "closed"
    timeout: float = DEFAULT_STORE_TIMEOUT
    namespace: str = DEFAULT_NAMESPACE
    max_records: int = DEFAULT_MEMORY_MAX_RECORDS
    max_bytes: int = DEFAULT_MEMORY_MAX_BYTES
    # Replicas that must acknowledge a begin, renew or complete (Redis WAIT) for it to count.
    min_replicas_ack: int = 0


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OpenTelemetry traces, exported over OTLP/HTTP; present only when tracing is on."""

    endpoint: str = DEFAULT_TRACING_ENDPOINT
    service_name: str = DEFAULT_TRACING_SERVICE
    sample_ratio: float = 1.0  # for requests without a parent; a parent's decision is followed
    headers: tuple[tuple[str, str], ...] = ()  # sent with every export (values are secrets)


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[str, int]
    admin_listen: tuple[str, int]
    upstream: str
    store: StoreConfig
    routes: tuple[RoutePolicy, ...]
    defaults: RoutePolicy
    admin_token: str | None = None
    log_level: str = "info"
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    body_read_timeout: float = DEFAULT_BODY_READ_TIMEOUT
    upstream_keepalive_timeout: float = DEFAULT_UPSTREAM_KEEPALIVE
    tracing: TracingConfig | None = None  # None: off, and OpenTelemetry is never imported
    source: str = field(default="<defaults>", compare=False)


# --- value parsers: each returns the parsed value or raises ValueError with a message ---

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip
_BAD_ESCAPE = re.compile(r"~(?![01])")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# An unknown key is quoted back only when it looks like a field name (not a URL, say).
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}\Z")


def parse_duration(value: object) -> float:
    """`"500ms"`, `"10s"`, `"5m"`, `"24h"`, `"1d"` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f'expected a duration like "24h", got {show_value(value)}')
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f'expected a duration like "24h", got "{mask_text(str(value))}"')
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"expected a positive duration, got {show_value(value)}")
    return seconds


def parse_size(value: object) -> int:
    """`"512KiB"`, `"1MiB"` or a number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f'expected a size like "1MiB", got {show_value(value)}')
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ValueError(
                f'expected a size like "1MiB" or a number of bytes, got "{mask_text(str(value))}"'
            )
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size <= 0:
        raise ValueError(f"expected a positive size, got {show_value(value)}")
    return size


def parse_address(value: object) -> tuple[str, int]:
    """`host:port`, `[::1]:port` or `:port` (all interfaces)."""
    text = str(value)
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port", got "{mask_text(text)}"')
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def parse_upstream(value: object) -> str:
    text = str(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {quote_url(str(value))}")
    if parts.query or parts.fragment or parts.path:
        raise ValueError(f"expected scheme://host:port without a path, got {quote_url(str(value))}")
    return text


def parse_store_url(value: object) -> str:
    text = str(value)
    if is_topology_url(text):
        parse_topology(text)  # a bad host list, service or db is refused here
        check_redis_url(node_url(text))  # and every option, as for a redis:// URL
        return text
    scheme = urlsplit(text).scheme
    if scheme not in ("memory", "redis", "rediss", "unix"):
        raise ValueError(
            "expected memory://, redis://, rediss://, unix://, redis+sentinel:// or "
            f"redis+cluster:// (or a rediss+ form), got {quote_url(text)}"
        )
    if scheme != "memory":
        check_redis_url(text)
    return text


def _choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in allowed:
            options = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"expected {options}, got {show_value(value)}")
        return str(value)

    return parse


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {show_value(value)}")
    return value


def _methods(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list of methods, got {show_value(value)}")
    methods = set()
    for item in value:
        if not isinstance(item, str) or not _TOKEN.match(item):
            raise ValueError(f"expected HTTP method names, got {show_value(item)}")
        methods.add(item.upper())
    return frozenset(methods)


def _header_name(value: object) -> str:
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise ValueError(f"expected a header name, got {show_value(value)}")
    return value


def _header_names(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of header names, got {show_value(value)}")
    return tuple(_header_name(item) for item in value)


def _statuses(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in value
    ):
        raise ValueError(f"expected a list of HTTP status codes, got {show_value(value)}")
    return frozenset(value)


def _route_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f'expected a path starting with "/", got {show_value(value)}')
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {show_value(value)}")
    return value


def _secret(value: object) -> str:
    """A token: never quoted back, whatever was wrong with it."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string (the value is not shown)")
    return value


def _tombstone_ttl(value: object) -> float:
    """A duration, or 0 / false to keep no tombstone (so a route can turn a default off)."""
    if value is False or (isinstance(value, int | float) and not isinstance(value, bool)
                          and value == 0):  # fmt: skip
        return 0.0
    return parse_duration(value)


def _pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of JSON Pointers, got {show_value(value)}")
    for item in value:
        parse_pointer(item)
    return tuple(value)


def _positive_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"expected a positive whole number, got {show_value(value)}")
    return value


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"expected a whole number, 0 or more, got {value!r}")
    return value


def _ratio(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {show_value(value)}")
    return float(value)


def parse_tracing_endpoint(value: object) -> str:
    """The OTLP/HTTP URL spans are posted to; a bare `http://host:4318` gets `/v1/traces`."""
    text = str(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {quote_url(text)}")
    if parts.path in ("", "/"):
        return text.rstrip("/") + "/v1/traces"
    return text


def _export_headers(value: object) -> tuple[tuple[str, str], ...]:
    """Header name -> value, sent with every export: the values are credentials, never shown."""
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of header names to values (values are not shown)")
    return tuple((_header_name(name), _secret(item)) for name, item in value.items())


# Field name in YAML -> parser. The same table drives `defaults` and each route.
_POLICY_FIELDS: dict[str, Callable[[object], Any]] = {
    "methods": _methods,
    "key_header": _header_name,
    "require_key": _bool,
    "ttl": parse_duration,
    "lease": parse_duration,
    "on_concurrent": _choice("reject", "wait"),
    "wait_timeout": parse_duration,
    "on_unknown_outcome": _choice("reject", "retry"),
    "scope_headers": _header_names,
    "release_statuses": _statuses,
    "upstream_timeout": parse_duration,
    "max_request_body": parse_size,
    "max_stored_response": parse_size,
    "upstream": parse_upstream,
    "tombstone_ttl": _tombstone_ttl,
    "mode": _choice("enforce", "observe"),
    "observe_keyless": parse_duration,
}
# `fingerprint:` is a mapping of its own; a route's fields go on top of the defaults' ones.
_FINGERPRINT_FIELDS: dict[str, Callable[[object], Any]] = {
    "body": _choice("raw", "canonical"),
    "ignore": _pointers,
}
_ROUTE_ONLY_FIELDS: dict[str, Callable[[object], Any]] = {"path": _route_path, "id": _text}
_STORE_FIELDS: dict[str, Callable[[object], Any]] = {
    "url": parse_store_url,
    "fail_mode": _choice("closed", "open"),
    "timeout": parse_duration,
    "namespace": _text,
    "max_records": _positive_int,
    "max_bytes": parse_size,
    "min_replicas_ack": _count,
}
_TOP_FIELDS: dict[str, Callable[[object], Any]] = {
    "listen": parse_address,
    "admin_listen": parse_address,
    "admin_token": _secret,
    "log_level": _choice(*LOG_LEVELS),
    "shutdown_grace": parse_duration,
    "body_read_timeout": parse_duration,
}
_TRACING_FIELDS: dict[str, Callable[[object], Any]] = {
    "enabled": _bool,
    "endpoint": parse_tracing_endpoint,
    "service_name": _text,
    "sample_ratio": _ratio,
    "headers": _export_headers,
}
# `upstream:` is a URL, or a mapping with the URL and the settings of the connection pool.
_UPSTREAM_FIELDS: dict[str, Callable[[object], Any]] = {
    "url": parse_upstream,
    "keepalive_timeout": parse_duration,
}
_SECTIONS = ("store", "defaults", "routes", "upstream", "tracing")


class _Collector:
    """Parses fields of one mapping, recording problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def section(
        self, path: str, raw: object, fields: Mapping[str, Callable[[object], Any]],
        extra: tuple[str, ...] = (),
    ) -> dict[str, Any]:  # fmt: skip
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{path or '<top>'}: expected a mapping, got {show_value(raw)}")
            return {}
        parsed: dict[str, Any] = {}
        for name, value in raw.items():
            where = f"{path}.{name}" if path else str(name)
            if name in extra:
                continue
            parser = fields.get(name)
            if parser is None and not (isinstance(name, str) and _FIELD_NAME.match(name)):
                self.problems.append(
                    f"{path or '<top>'}: unknown key (not a field name; not shown)"
                )
                continue
            if parser is None:
                self.problems.append(f"{where}: unknown key")
                continue
            try:
                parsed[name] = parser(value)
            except ValueError as exc:
                self.problems.append(f"{where}: {exc}")
        return parsed

    def fingerprint(self, path: str, raw: object, base: FingerprintPolicy) -> FingerprintPolicy:
        """The `fingerprint:` mapping of `raw` (a route or the defaults) on top of `base`."""
        if not isinstance(raw, dict) or raw.get("fingerprint") is None:
            return base
        where = f"{path}.fingerprint"
        fields = self.section(where, raw["fingerprint"], _FINGERPRINT_FIELDS)
        policy = replace(base, **fields)
        if policy.ignore and policy.body != "canonical":
            inherited = "" if "ignore" in fields else " (the ignore list comes from defaults)"
            self.problems.append(
                f"{where}.ignore: needs body: canonical (ignored fields are left out of the "
                f"canonical form of a JSON body){inherited}"
            )
        return policy

    def check_timing(self, path: str, policy: RoutePolicy) -> None:
        if policy.lease > policy.ttl:
            self.problems.append(f"{path}.lease: must not exceed ttl ({policy.ttl:g}s)")


def parse_config(
    raw: object, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    """Build a `Config` from parsed YAML, applying environment overrides; raise `ConfigError`."""
    env = os.environ if env is None else env
    collector = _Collector()
    if raw is None:
        raw = {}
    mapping = raw if isinstance(raw, dict) else {}
    upstream_fields = _upstream_section(collector, mapping.get("upstream"))
    top = collector.section("", raw, _TOP_FIELDS, extra=_SECTIONS)
    store_fields = collector.section("store", mapping.get("store"), _STORE_FIELDS)
    raw_defaults = mapping.get("defaults")
    default_fields = collector.section(
        "defaults", raw_defaults, _POLICY_FIELDS, extra=("fingerprint",)
    )
    default_fields["fingerprint"] = collector.fingerprint("defaults", raw_defaults, RAW_FINGERPRINT)
    tracing = _tracing_section(collector, mapping)
    _apply_environment(collector, env, top, store_fields)

    upstream = upstream_fields.get("url", DEFAULT_UPSTREAM)
    defaults = RoutePolicy(path="/*", id="default", upstream=upstream, **default_fields)
    collector.check_timing("defaults", defaults)
    routes = _routes(collector, mapping.get("routes"), defaults)
    if collector.problems:
        raise ConfigError(collector.problems)
    return Config(
        listen=top.get("listen", parse_address(DEFAULT_LISTEN)),
        admin_listen=top.get("admin_listen", parse_address(DEFAULT_ADMIN_LISTEN)),
        upstream=upstream,
        store=StoreConfig(**store_fields),
        routes=tuple(routes),
        defaults=defaults,
        admin_token=top.get("admin_token"),
        log_level=top.get("log_level", "info"),
        shutdown_grace=top.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE),
        body_read_timeout=top.get("body_read_timeout", DEFAULT_BODY_READ_TIMEOUT),
        upstream_keepalive_timeout=upstream_fields.get(
            "keepalive_timeout", DEFAULT_UPSTREAM_KEEPALIVE
        ),
        tracing=tracing,
        source=source,
    )


def _upstream_section(collector: _Collector, raw: object) -> dict[str, Any]:
    """`upstream:` is a URL, or a mapping of the URL and the connection pool's settings."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        parsed = collector.section("", {"upstream": raw}, {"upstream": parse_upstream})
        return {"url": parsed["upstream"]} if "upstream" in parsed else {}
    fields = collector.section("upstream", raw, _UPSTREAM_FIELDS)
    if "url" not in raw:
        collector.problems.append("upstream.url: required")
    return fields


def _tracing_section(collector: _Collector, mapping: dict[Any, Any]) -> TracingConfig | None:
    """A `tracing:` block turns tracing on (unless `enabled: false`); it needs the extra."""
    if "tracing" not in mapping:
        return None
    fields = collector.section("tracing", mapping["tracing"], _TRACING_FIELDS)
    if not fields.pop("enabled", True):
        return None
    if not all(_installed(module) for module in TRACING_MODULES):
        collector.problems.append(
            f"tracing: OpenTelemetry is not installed; install the extra: {TRACING_EXTRA}"
        )
    return TracingConfig(**fields)


def _installed(module: str) -> bool:
    """Whether `module` can be imported (its parent packages are imported to find out)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def _apply_environment(collector: _Collector, env: Mapping[str, str], top: dict[str, Any],
                       store_fields: dict[str, Any]) -> None:  # fmt: skip
    """The deployment-specific overrides from the environment."""
    overrides = {
        ENV_LISTEN: ("listen", parse_address),
        ENV_ADMIN_LISTEN: ("admin_listen", parse_address),
        ENV_ADMIN_TOKEN: ("admin_token", _secret),
        ENV_LOG_LEVEL: ("log_level", _choice(*LOG_LEVELS)),
    }
    for var, (name, parser) in overrides.items():
        if env.get(var):
            try:
                top[name] = parser(env[var])
            except ValueError as exc:
                collector.problems.append(f"{var} (environment): {exc}")
    if env.get(ENV_STORE_URL):
        try:
            store_fields["url"] = parse_store_url(env[ENV_STORE_URL])
        except ValueError as exc:
            collector.problems.append(f"{ENV_STORE_URL} (environment): {exc}")


def _routes(collector: _Collector, raw_routes: object, defaults: RoutePolicy) -> list[RoutePolicy]:
    """Each route: the defaults, with the route's own fields on top."""
    if raw_routes is None:
        raw_routes = [{"path": "/*"}]
    if not isinstance(raw_routes, list):
        shown = show_value(raw_routes)
        collector.problems.append(f"routes: expected a list of routes, got {shown}")
        raw_routes = []
    routes: list[RoutePolicy] = []
    seen_ids: set[str] = set()
    for index, raw_route in enumerate(raw_routes):
        where = f"routes[{index}]"
        fields = collector.section(
            where, raw_route, _POLICY_FIELDS, extra=(*_ROUTE_ONLY_FIELDS, "fingerprint")
        )
        fields["fingerprint"] = collector.fingerprint(where, raw_route, defaults.fingerprint)
        route_only = {}
        if isinstance(raw_route, dict):
            for name, parser in _ROUTE_ONLY_FIELDS.items():
                if name in raw_route:
                    try:
                        route_only[name] = parser(raw_route[name])
                    except ValueError as exc:
                        collector.problems.append(f"{where}.{name}: {exc}")
            if "path" not in raw_route:
                collector.problems.append(f"{where}.path: required")
        path = route_only.get("path", "/*")
        route_id = route_only.get("id", path)
        if route_id in seen_ids:
            collector.problems.append(f"{where}.id: {route_id!r} is used by an earlier route")
        seen_ids.add(route_id)
        policy = replace(defaults, path=path, id=route_id, **fields)
        collector.check_timing(where, policy)
        routes.append(policy)
    return routes


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; raise `ConfigError` naming every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    return load_config_text(text, source=str(path), env=env)


def load_config_text(
    text: str, source: str = "<config>", env: Mapping[str, str] | None = None
) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {yaml_problem(exc)}"]) from exc
    return parse_config(raw, source=source, env=env)


# What PyYAML quotes in a problem is text of the file: a name (an alias, a tag, an anchor)
# is masked, one character such as '\t' is kept.
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_ONE_CHARACTER = re.compile(r"^(?:.|\\.|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4})\Z")


def _masked_quote(match: re.Match[str]) -> str:
    quoted = match.group(1) if match.group(1) is not None else match.group(2)
    return match.group(0) if _ONE_CHARACTER.match(quoted) else "(not shown)"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """Where a YAML error is and what it is, without the text of the line.

    PyYAML's message quotes the offending line, which may be the store URL with its
    password, and names such as an undefined alias (`admin_token: *pw...` reads as one).
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = _QUOTED.sub(_masked_quote, exc.problem or exc.context or "syntax error")
        if mark is None:
            return what
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    if isinstance(exc, yaml.reader.ReaderError):
        return f"character {exc.position}: {exc.reason}"
    return "cannot be parsed"


def describe(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked: logged at start-up."""
    return {
        "source": config.source,
        "listen": "{}:{}".format(*config.listen),
        "admin_listen": "{}:{}".format(*config.admin_listen),
        "upstream": redact_url(config.upstream),
        "store": {
            "url": redact_url(config.store.url),
            "fail_mode": config.store.fail_mode,
            "timeout": config.store.timeout,
            "min_replicas_ack": config.store.min_replicas_ack,
            "namespace": config.store.namespace,
        },
        "admin_token": "***" if config.admin_token else None,
        "routes": [_describe_route(r) for r in config.routes],
        "tracing": _describe_tracing(config.tracing),
    }


def _describe_tracing(tracing: TracingConfig | None) -> dict[str, Any] | None:
    if tracing is None:
        return None
    return {
        "endpoint": redact_url(tracing.endpoint),
        "service_name": tracing.service_name,
        "sample_ratio": tracing.sample_ratio,
        "headers": {name: "***" for name, _ in tracing.headers},
    }


def _describe_route(route: RoutePolicy) -> dict[str, Any]:
    return {
        "id": route.id,
        "path": route.path,
        "upstream": redact_url(route.upstream),
        "methods": sorted(route.methods),
        "require_key": route.require_key,
        "ttl": route.ttl,
        "lease": route.lease,
        "on_concurrent": route.on_concurrent,
        "on_unknown_outcome": route.on_unknown_outcome,
        "fingerprint": {"body": route.fingerprint.body, "ignore": list(route.fingerprint.ignore)},
        "tombstone_ttl": route.tombstone_ttl,
        "mode": route.mode,
        "observe_keyless": route.observe_keyless,
    }
