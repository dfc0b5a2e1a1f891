"""Configuration: typed values, every problem reported at once with its path."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    describe,
    load_config,
    load_config_text,
    parse_config,
    parse_duration,
    parse_size,
)
from proxy.masking import redact_url

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


def test_mode_and_observe_keyless_are_per_route_with_defaults() -> None:
    """`mode` defaults to enforce; a route may observe; both settings are named in errors."""
    config = parse_config({
        "defaults": {"observe_keyless": "10s"},
        "routes": [{"path": "/a", "mode": "observe"}, {"path": "/*"}],
    }, env={})  # fmt: skip
    observed, enforced = config.routes
    assert (observed.mode, observed.observe_keyless) == ("observe", 10.0)
    assert (enforced.mode, enforced.observe_keyless) == ("enforce", 10.0)
    assert parse_config({}, env={}).routes[0].observe_keyless is None
    with pytest.raises(ConfigError) as caught:
        parse_config({"defaults": {"mode": "watch"},
                      "routes": [{"path": "/*", "observe_keyless": "soon"}]}, env={})  # fmt: skip
    assert caught.value.problems == [
        "defaults.mode: expected 'enforce' or 'observe', got 'watch'",
        'routes[0].observe_keyless: expected a duration like "24h", got "soon"',
    ]


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


# --- secrets are never printed ---------------------------------------------------------

SECRET = "Hunter2Pw"


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://user:Hunter2Pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:Hunter2Pw@host", "redis://:***@host"),
        ("redis://Hunter2Pw@host:6379", "redis://***@host:6379"),  # a token as the user name
        ("https://svc:Hunter2Pw@api.internal:8443", "https://svc:***@api.internal:8443"),
        ("redis+sentinel://:Hunter2Pw@h1:26379,h2:26379/mymaster",
         "redis+sentinel://:***@h1:26379,h2:26379/mymaster"),
        ("rediss+cluster://app:Hunter2Pw@[::1]:7000,10.0.0.2:7001",
         "rediss+cluster://app:***@[::1]:7000,10.0.0.2:7001"),
        ("redis://host:6379/0?password=Hunter2Pw&db=1", "redis://host:6379/0?password=***&db=1"),
        ("rediss://host?ssl_password=Hunter2Pw&ssl_cert_reqs=none",
         "rediss://host?ssl_password=***&ssl_cert_reqs=none"),
        ("redis+sentinel://h1:26379/m?sentinel_password=Hunter2Pw",
         "redis+sentinel://h1:26379/m?sentinel_password=***"),
        ("http://up/?Auth_Token=Hunter2Pw&client_secret=Hunter2Pw&api_key=Hunter2Pw",
         "http://up/?Auth_Token=***&client_secret=***&api_key=***"),
        ("unix:///run/redis.sock?db=2&password=Hunter2Pw", "unix:///run/redis.sock?db=2&password=***"),
        ("redis://:Hunter%402Pw@host", "redis://:***@host"),
        ("redis://:Hunter@2Pw@host:6379", "redis://:***@host:6379"),  # an unencoded @
        ("redis://:Hunter/2Pw@host:6379", "redis://***"),  # the password ends the authority
        ("redis://:Hunter?2Pw@host:6379", "redis://***"),
        ("redis://:Hunter#2Pw@host:6379", "redis://***"),
        ("redis://host#Hunter2Pw", "redis://host#***"),
        ("svc:Hunter2Pw@host:9000", "***"),  # no scheme: nothing of it can be read
        ("Hunter2Pw", "***"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("memory://", "memory://"),
    ],
)  # fmt: skip
def test_redact_url_masks_every_credential_form(url: str, masked: str) -> None:
    """Passwords, user-name tokens and secret query values are masked in every URL form."""
    assert redact_url(url) == masked
    assert "Hunter" not in masked and "2Pw" not in masked


REFUSED = f"""
upstream: "http://svc:{SECRET}@up:9000/v1"
admin_token: 31337{len(SECRET)}
store:
  url: "mongodb://app:{SECRET}@db:27017"
defaults:
  upstream: "ftp://{SECRET}@files"
routes:
  - path: /a/*
    upstream: "http://up:9000/?password={SECRET}"
  - path: /b/*
    upstream: "svc:{SECRET}@up:9000"
  - "redis://:{SECRET}@cache"
  - path: /c/*
    "redis://:{SECRET}@cache": 1
"""


def test_refused_values_never_show_a_secret() -> None:
    """Each refused URL or secret is reported by its field, with its credentials masked."""
    with pytest.raises(ConfigError) as caught:
        load_config_text(REFUSED, env={})
    problems = caught.value.problems
    assert [p.partition(":")[0] for p in problems] == [
        "upstream", "admin_token", "store.url", "defaults.upstream", "routes[0].upstream",
        "routes[1].upstream", "routes[2]", "routes[3]",
    ]  # fmt: skip
    for problem in problems:
        assert SECRET not in problem and "313379" not in problem, problem
    assert 'got "http://svc:***@up:9000/v1"' in problems[0]
    assert 'got "mongodb://app:***@db:27017"' in problems[2]


def test_a_refused_store_url_from_the_environment_is_masked() -> None:
    """IDEMPOTENCY_PROXY_STORE_URL is named when refused, never shown with its password."""
    for value in (f"mongodb://:{SECRET}@db", f"{SECRET}@cache:6379", SECRET):
        with pytest.raises(ConfigError) as caught:
            parse_config({}, env={"IDEMPOTENCY_PROXY_STORE_URL": value})
        (problem,) = caught.value.problems
        assert problem.startswith("IDEMPOTENCY_PROXY_STORE_URL (environment): expected")
        assert SECRET not in problem


@pytest.mark.parametrize(
    "text",
    [
        f"store:\n  url: redis://:{SECRET}@cache:6379: oops\n",  # mapping values not allowed
        f'store:\n  url: "redis://:{SECRET}@cache:6379\n',  # unterminated quote
        f"store:\n  url: redis://:{SECRET}@cache\n   bad: [\n",
        f"admin_token: *{SECRET}\n",  # a token that starts with * reads as an alias
        f"admin_token: !{SECRET} x\n",  # ... and one that starts with ! as a tag
    ],
)
def test_a_yaml_syntax_error_names_the_place_not_the_text(text: str) -> None:
    """A YAML error gives line, column and the problem, never the text of the line."""
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, source="proxy.yaml", env={})
    (problem,) = caught.value.problems
    assert problem.startswith("proxy.yaml: not valid YAML: line "), problem
    assert SECRET not in problem and "cache" not in problem, problem


def test_describe_masks_every_credential() -> None:
    """The effective config logged at start and on reload holds no password or token."""
    config = parse_config({
        "upstream": f"https://svc:{SECRET}@up:8443",
        "admin_token": SECRET,
        "store": {"url": f"rediss://app:{SECRET}@cache:6379/0?ssl_password={SECRET}"},
        "routes": [{"path": "/*", "upstream": f"http://{SECRET}@other:9000"}],
    }, env={})  # fmt: skip
    described = json.dumps(describe(config))
    assert SECRET not in described
    assert "rediss://app:***@cache:6379/0?ssl_password=***" in described


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, check=False,
        env={**os.environ, **(env or {})}, timeout=60,
    )  # fmt: skip


@pytest.mark.timeout(90)  # six command-line starts: slow on a loaded 2-core machine
def test_check_config_and_run_never_print_a_secret(tmp_path: Path) -> None:
    """Refused URLs, the store URL variable and YAML errors reach the terminal masked."""
    refused = tmp_path / "refused.yaml"
    refused.write_text(REFUSED)
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"store:\n  url: redis://:{SECRET}@cache:6379: oops\n")
    valid = tmp_path / "valid.yaml"
    valid.write_text("routes: [{path: /*}]\n")
    bad_env = {"IDEMPOTENCY_PROXY_STORE_URL": f"mongodb://:{SECRET}@db"}
    for args, env in [
        (("check-config", str(refused)), None),
        (("check-config", str(broken)), None),
        (("check-config", str(valid)), bad_env),
        (("run", "--config", str(refused)), None),
        (("run", "--config", str(broken)), None),
        (("run", "--config", str(valid)), bad_env),
    ]:
        result = run_cli(*args, env=env)
        assert result.returncode in (1, 2), (args, result.stderr)
        assert "problem" in result.stderr or "invalid" in result.stderr
        assert SECRET not in result.stdout + result.stderr, (args, result.stderr)


@pytest.mark.timeout(90)  # two command-line starts: slow on a loaded 2-core machine
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


@pytest.mark.parametrize("url", [
    "redis://:Sup3rS3cretPrefix/rest@h:1",
    "redis://user:Sup3rS3cret#x@h:1",
    "redis://user:Sup3rS3cret?x@h:1",
    "redis+sentinel://:Sup3rS3cretPrefix/rest@h:1/mymaster",
    "redis+cluster://:Sup3rS3cretPrefix/rest@h:1",
])  # fmt: skip
def test_a_store_url_that_does_not_parse_never_quotes_its_password(url: str) -> None:
    """A password with an unencoded `/`, `?` or `#` breaks the URL; the parser's complaint
    about the piece it took for a port or an option is masked."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"store": {"url": url}}, env={})
    text = "\n".join(caught.value.problems)
    assert text.startswith("store.url: ")
    assert "Sup3rS3cret" not in text


def test_a_port_in_use_is_said_in_one_line_not_a_traceback(tmp_path: Path) -> None:
    """`run` on a listen address another process holds exits 2 naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.yaml"
        config.write_text(f"listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:0\n")
        result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
