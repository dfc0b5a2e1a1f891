"""Configuration: typed values, every problem reported at once with its path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    load_config,
    load_config_text,
    parse_config,
    parse_duration,
    parse_size,
    redact_url,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("24h", 86400.0), ("1d", 86400.0),
     (3, 3.0), ("1.5s", 1.5)],
)  # fmt: skip
def test_durations(text: object, seconds: float) -> None:
    """Durations accept ms, s, m, h, d suffixes or plain seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512KiB", 524288), ("1MiB", 1048576), (100, 100),
                                            ("1MB", 1000000), ("2GiB", 2 * 1024**3)])  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    """Sizes accept binary and decimal units or plain bytes."""
    assert parse_size(text) == size


def test_example_config_is_valid() -> None:
    """The shipped config/proxy.yaml passes validation."""
    config = load_config(ROOT / "config" / "proxy.yaml", env={})
    assert config.store.url == "memory://"
    assert [r.id for r in config.routes] == ["payments", "payments-create", "default"]
    payments = config.routes[0]
    assert payments.require_key and payments.ttl == 48 * 3600
    assert payments.lease == 10 and payments.methods == {"POST", "PATCH"}


def test_routes_inherit_defaults_and_override_them() -> None:
    """A route takes every default it does not set itself."""
    config = parse_config({
        "upstream": "http://up:9000",
        "defaults": {"ttl": "1h", "on_concurrent": "wait", "methods": ["post"]},
        "routes": [{"path": "/a/*", "ttl": "2h", "upstream": "http://other:1"}, {"path": "/*"}],
    }, env={})  # fmt: skip
    first, second = config.routes
    assert (first.ttl, first.on_concurrent, first.upstream) == (7200, "wait", "http://other:1")
    assert (second.ttl, second.upstream, second.methods) == (
        3600,
        "http://up:9000",
        frozenset({"POST"}),
    )
    assert second.id == "/*"


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    """A broken file yields all its problems, each naming the field."""
    text = """
listen: nowhere
store: {url: "mysql://x", fail_mode: sometimes}
defaults: {ttl: tomorrow, requier_key: true}
routes:
  - {path: /a/*, max_request_body: huge}
  - {id: b}
  - {path: /c, on_unknown_outcome: maybe, release_statuses: [429, 9000]}
"""
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, env={})
    problems = caught.value.problems
    expected = [
        'listen: expected "host:port", got "nowhere"',
        "store.url: expected memory://",
        "store.fail_mode: expected 'closed' or 'open', got 'sometimes'",
        'defaults.ttl: expected a duration like "24h", got "tomorrow"',
        "defaults.requier_key: unknown key",
        'routes[0].max_request_body: expected a size like "1MiB"',
        "routes[1].path: required",
        "routes[2].on_unknown_outcome: expected 'reject' or 'retry', got 'maybe'",
        "routes[2].release_statuses: expected a list of HTTP status codes",
    ]
    for line in expected:
        assert any(p.startswith(line) for p in problems), (line, problems)
    assert len(problems) == len(expected)


def test_lease_longer_than_ttl_is_refused() -> None:
    """A lease that outlives the record makes no sense and is an error."""
    with pytest.raises(ConfigError, match=r"routes\[0\]\.lease: must not exceed ttl"):
        parse_config({"routes": [{"path": "/*", "ttl": "1s", "lease": "5s"}]}, env={})


def test_environment_overrides_the_file() -> None:
    """Store URL and listen address come from the environment when set."""
    config = parse_config({"listen": "127.0.0.1:1"}, env={
        "IDEMPOTENCY_PROXY_STORE_URL": "redis://cache:6379/2",
        "IDEMPOTENCY_PROXY_LISTEN": "0.0.0.0:8081",
    })  # fmt: skip
    assert config.store.url == "redis://cache:6379/2"
    assert config.listen == ("0.0.0.0", 8081)


def test_bad_environment_value_names_the_variable() -> None:
    """A broken override is reported with the variable's name."""
    with pytest.raises(ConfigError, match="IDEMPOTENCY_PROXY_LISTEN"):
        parse_config({}, env={"IDEMPOTENCY_PROXY_LISTEN": "eighty"})


def test_store_password_is_masked() -> None:
    """Logged store URLs never show a password."""
    assert redact_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_check_config_command(tmp_path: Path) -> None:
    """check-config exits 0 on a valid file and 1 with every problem on a broken one."""
    good = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(ROOT / "config" / "proxy.yaml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("defaults: {ttl: tomorrow}\nroutes: [{path: x}]\n")
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(broken)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 1
    assert 'defaults.ttl: expected a duration like "24h", got "tomorrow"' in bad.stderr
    assert "routes[0].path: expected a path starting with" in bad.stderr
