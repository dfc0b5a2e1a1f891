"""Canonical fingerprints: the pure functions, their settings, and the proxy using them.

The behaviour tests run a real proxy in front of the counting upstream, on both stores.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from proxy.cli import main
from proxy.config import ConfigError, FingerprintPolicy, parse_config, parse_pointer
from proxy.errors import PROBLEM_TYPE_PREFIX
from proxy.fingerprints import CANONICAL_MAX_BYTES, canonical_json, form_pairs, is_json
from proxy.keys import fingerprint_request
from proxy.server import Running
from tests.conftest import ProxyFactory, Upstream, key
from tests.support.requests import post, problem

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
RAW = FingerprintPolicy()
CANONICAL = FingerprintPolicy("canonical")
IGNORING = FingerprintPolicy("canonical", ("/timestamp", "/metadata/nonce", "/a~1b~0c"))


def fp(body: bytes, policy: FingerprintPolicy = CANONICAL, content_type: str = JSON) -> str:
    return fingerprint_request("POST", "/v1/pay", "", body, content_type, policy)


def test_raw_is_the_default_and_unchanged() -> None:
    """Without a policy, the body's bytes are fingerprinted as before: order matters."""
    assert fingerprint_request("POST", "/v1/pay", "", b'{"a":1}') == fp(b'{"a":1}', RAW)
    assert fp(b'{"a":1,"b":2}', RAW) != fp(b'{"b":2,"a":1}', RAW)
    assert fp(b'{"a":1}', RAW) != fp(b'{"a": 1}', RAW)


@pytest.mark.parametrize(
    ("first", "retry"),
    [(b'{"a":1,"b":[1,2]}', b'{ "b" : [1, 2],\n  "a" : 1 }'),
     (b'{"x":{"z":1,"y":2}}', b'{"x":{"y":2,"z":1}}'),
     (b'{"amount":100.50}', b'{"amount":1.005e2}'),
     (b'{"s":"\\u00e9\\ud83d\\ude00"}', '{"s":"\u00e9\U0001f600"}'.encode())],
)  # fmt: skip
def test_canonical_json_ignores_order_whitespace_and_spelling(first: bytes, retry: bytes) -> None:
    """Key order, whitespace, number and string spelling do not change a canonical JSON body."""
    assert fp(first) == fp(retry)
    assert fp(first, RAW) != fp(retry, RAW)


def test_canonical_json_still_tells_other_values_apart() -> None:
    """Another value, another member or another array order is another request."""
    base = fp(b'{"a":1,"b":[1,2]}')
    assert base != fp(b'{"a":2,"b":[1,2]}')
    assert base != fp(b'{"a":1,"b":[2,1]}')
    assert base != fp(b'{"a":1,"b":[1,2],"c":null}')
    assert base != fp(b'{"a":"1","b":[1,2]}')


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "Application/JSON; charset=utf-8", "application/merge-patch+json",
     "application/vnd.api+json"],
)  # fmt: skip
def test_json_is_recognised_by_content_type(content_type: str) -> None:
    """application/json and every +json type are canonicalised, parameters aside."""
    assert is_json(content_type)
    assert fp(b'{"a":1,"b":2}', content_type=content_type) == fp(b'{"b":2,"a":1}')


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/octet-stream", "json"])
def test_other_bodies_are_fingerprinted_raw(content_type: str) -> None:
    """A body not declared as JSON or a form is its bytes, under canonical too."""
    body = b'{"a":1,"b":2}'
    assert fp(body, content_type=content_type) == fp(body, RAW, content_type)
    assert fp(body, content_type=content_type) != fp(b'{"b":2,"a":1}', content_type=content_type)


@pytest.mark.parametrize(
    "body",
    [b'{"a":1', b"not json", b'{"a":1,"a":1}', b'{"n":9007199254740993}', b'{"n":NaN}',
     b'{"n":0.1000000000000000001}', b'{"n":333333333.33333329}', b'{"n":1e400}',
     b'"\\ud800"', b"\xff\xfe{}",
     b"[" * 100_000 + b"]" * 100_000],
)  # fmt: skip
def test_json_that_cannot_be_canonical_is_fingerprinted_raw(body: bytes) -> None:
    """Unparseable JSON, duplicate names, numbers a double cannot hold, lone surrogates, deep
    nesting: fingerprinted as raw bytes, never an error, never equal to a near neighbour."""
    assert canonical_json(body) is None
    assert fp(body) == fp(body, RAW)


def test_numbers_that_lose_precision_are_not_merged() -> None:
    """Two decimals that round to one double stay two requests."""
    assert fp(b'{"n":0.1000000000000000001}') != fp(b'{"n":0.1}')
    assert fp(b'{"n":9007199254740993}') != fp(b'{"n":9007199254740992}')


def test_ignored_fields_are_left_out() -> None:
    """A change in an ignored field keeps the fingerprint; any other change does not."""
    first = fp(b'{"amount":1,"timestamp":1,"metadata":{"nonce":"a","ref":"x"},"a/b~c":1}',
               IGNORING)  # fmt: skip
    retry = fp(b'{"a/b~c":2,"metadata":{"ref":"x","nonce":"b"},"timestamp":2,"amount":1}',
               IGNORING)  # fmt: skip
    assert first == retry
    assert first == fp(b'{"amount":1,"metadata":{"ref":"x"}}', IGNORING)  # absent is fine
    assert first != fp(b'{"amount":2,"timestamp":1,"metadata":{"nonce":"a","ref":"x"}}',
                       IGNORING)  # fmt: skip
    assert first != fp(b'{"amount":1,"timestamp":1,"metadata":{"nonce":"a","ref":"y"}}',
                       IGNORING)  # fmt: skip


def test_ignored_array_elements_keep_the_others_in_place() -> None:
    """Ignoring `/items/0/at` leaves the rest of the array and its positions alone."""
    policy = FingerprintPolicy("canonical", ("/items/0/at", "/tags/1", "/items/x", "/n/0"))
    base = fp(b'{"items":[{"at":1,"id":7},{"at":1}],"tags":["a","b"],"n":1}', policy)
    assert base == fp(b'{"items":[{"at":2,"id":7},{"at":1}],"tags":["a","c"],"n":1}', policy)
    assert base != fp(b'{"items":[{"at":1,"id":7},{"at":2}],"tags":["a","b"],"n":1}', policy)
    assert base != fp(b'{"items":[{"at":1,"id":7},{"at":1}],"tags":["a"],"n":1}', policy)


def test_canonical_json_is_rfc_8785() -> None:
    """The serialisation is RFC 8785's: its own example (UTF-16 member order, ES6 numbers),
    but for 333333333.33333329, which has more digits than a double keeps (raw, see above)."""
    body = (b'{"numbers":[333333333.3333333,1E30,4.50,2e-3,0.000000000000000000000000001],'
            b'"string":"\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
            b'"literals":[null,true,false]}')  # fmt: skip
    expected = ('{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,'
                '1e-27],"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}').encode()  # fmt: skip
    assert canonical_json(body) == expected
    order = '{"\u20ac":1,"\\r":2,"\ufb33":3,"1":4,"\U0001f600":5,"\u0080":6,"\u00f6":7}'
    keys = list(__import__("json").loads(canonical_json(order.encode()) or b"{}"))
    assert keys == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


def test_form_bodies_are_fingerprinted_as_sorted_pairs() -> None:
    """Another pair order or percent-spelling is the same form; a value or repetition order is
    not."""
    assert fp(b"amount=1&currency=eur", content_type=FORM) == fp(
        b"currency=eur&amount=%31", content_type=f"{FORM}; charset=utf-8"
    )
    assert fp(b"a=1&b=2", RAW, FORM) != fp(b"b=2&a=1", RAW, FORM)
    assert fp(b"a=1&b=2", content_type=FORM) != fp(b"a=1&b=3", content_type=FORM)
    assert fp(b"a=1&a=2", content_type=FORM) != fp(b"a=2&a=1", content_type=FORM)
    assert form_pairs(b"b=%FF&a=x+y&c") == [(b"a", b"x y"), (b"b", b"\xff"), (b"c", b"")]


def test_canonical_fingerprints_never_equal_a_raw_one() -> None:
    """A canonical form is hashed apart from raw bytes that happen to spell it."""
    assert fp(b'{"a":1}') != fp(b'{"a":1}', RAW)
    assert fp(b"a=1", content_type=FORM) != fp(b"a=1", RAW, FORM)


@pytest.mark.parametrize(
    ("pointer", "tokens"),
    [("/a", ("a",)), ("/a/0/b", ("a", "0", "b")), ("/a~1b", ("a/b",)), ("/m~0n", ("m~n",)),
     ("/~01", ("~1",)), ("/", ("",)), ("/a//b", ("a", "", "b"))],
)  # fmt: skip
def test_json_pointers_are_parsed_per_rfc_6901(pointer: str, tokens: tuple[str, ...]) -> None:
    """`~1` is `/` and `~0` is `~`, unescaped in that order."""
    assert parse_pointer(pointer) == tokens


def config_problems(**fields: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"upstream": "http://up:9000", **fields}, env={})
    return caught.value.problems


def test_fingerprint_settings_are_parsed_and_inherited() -> None:
    """Routes take the default fingerprint and may override either of its fields."""
    config = parse_config({
        "upstream": "http://up:9000",
        "defaults": {"fingerprint": {"body": "canonical"}},
        "routes": [{"path": "/a", "fingerprint": {"ignore": ["/ts"]}},
                   {"path": "/b", "fingerprint": {"body": "raw"}}, {"path": "/*"}],
    }, env={})  # fmt: skip
    a, b, rest = config.routes
    assert a.fingerprint == FingerprintPolicy("canonical", ("/ts",))
    assert a.fingerprint.paths == (("ts",),)
    assert b.fingerprint == FingerprintPolicy("raw")
    assert rest.fingerprint == FingerprintPolicy("canonical")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [({"routes": [{"path": "/*", "fingerprint": {"ignore": ["/ts"]}}]},
      "routes[0].fingerprint.ignore: needs body: canonical"),
     ({"defaults": {"fingerprint": {"body": "canonical", "ignore": ["/ts"]}},
       "routes": [{"path": "/a"}, {"path": "/*", "fingerprint": {"body": "raw"}}]},
      "routes[1].fingerprint.ignore: needs body: canonical"),
     ({"defaults": {"fingerprint": {"ignore": ["/ts"]}}},
      "defaults.fingerprint.ignore: needs body: canonical"),
     ({"routes": [{"path": "/*", "fingerprint": {"body": "canonical", "ignore": ["ts"]}}]},
      "routes[0].fingerprint.ignore: expected a JSON Pointer like \"/metadata/nonce\", got 'ts'"),
     ({"routes": [{"path": "/*", "fingerprint": {"body": "canonical", "ignore": ["/a~2"]}}]},
      'routes[0].fingerprint.ignore: "~" must be followed by 0 or 1'),
     ({"routes": [{"path": "/*", "fingerprint": {"body": "canonical", "ignore": [""]}}]},
      "routes[0].fingerprint.ignore: expected a JSON Pointer"),
     ({"routes": [{"path": "/*", "fingerprint": {"body": "sorted"}}]},
      "routes[0].fingerprint.body: expected 'raw' or 'canonical'"),
     ({"routes": [{"path": "/*", "fingerprint": {"bdy": "raw"}}]},
      "routes[0].fingerprint.bdy: unknown key"),
     ({"routes": [{"path": "/*", "fingerprint": "canonical"}]},
      "routes[0].fingerprint: expected a mapping")],
)  # fmt: skip
def test_fingerprint_problems_name_the_field(fields: dict[str, object], problem: str) -> None:
    """`ignore` without `canonical`, a malformed pointer or an unknown value is a config error
    naming the field."""
    assert any(p.startswith(problem) for p in config_problems(**fields)), problem


def test_check_config_refuses_ignore_without_canonical(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`check-config` says that `ignore` needs `canonical`, naming the route's field."""
    config = tmp_path / "proxy.yaml"
    config.write_text("routes:\n  - path: /v1/*\n    fingerprint: {ignore: [/timestamp]}\n")
    assert main(["check-config", str(config)]) == 1
    assert "routes[0].fingerprint.ignore: needs body: canonical" in capsys.readouterr().err


# --- through the proxy ------------------------------------------------------------------


async def send(client: aiohttp.ClientSession, proxy: Running, body: bytes, idem: str,
               content_type: str = JSON) -> tuple[int, bool, bytes]:  # fmt: skip
    """(status, replayed?, body) of one POST to /v1/pay."""
    status, headers, content = await post(client, proxy, "/v1/pay", body, idem,
                                          **{"Content-Type": content_type})  # fmt: skip
    return status, headers.get("Idempotent-Replayed") == "true", content


async def replays_then_refuses(
    client: aiohttp.ClientSession, proxy: Running, upstream: Upstream, bodies: list[bytes],
    content_type: str = JSON,
) -> None:  # fmt: skip
    """The first body executes, the second replays it, the third is 422: one execution."""
    k = key("same")
    first, retry, other = [await send(client, proxy, body, k, content_type) for body in bodies]
    assert first[0] == 201 and retry == (201, True, first[2])
    assert other[0] == 422
    assert upstream.executions(k) == 1


@pytest.mark.parametrize("mode", ["raw", "canonical"])
async def test_reordered_json_replays_under_canonical_and_is_422_under_raw(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession,
    store_url: str, mode: str,
) -> None:  # fmt: skip
    """A retry that re-serialises its JSON (key order, whitespace) replays under canonical and
    is refused as another request under raw; either way the upstream executes once."""
    proxy = await start_proxy(store={"url": store_url},
                              defaults={"fingerprint": {"body": mode}})  # fmt: skip
    k = key("order")
    first = await send(client, proxy, b'{"amount":100,"currency":"eur"}', k)
    retry = await send(client, proxy, b'{\n  "currency": "eur",\n  "amount": 100\n}', k)
    assert first[0] == 201 and not first[1]
    if mode == "canonical":
        assert retry == (201, True, first[2])
    else:
        assert retry[0] == 422
        assert problem(retry[2])["type"] == PROBLEM_TYPE_PREFIX + "key-mismatch"
    assert upstream.executions(k) == 1
    assert upstream.bodies == [b'{"amount":100,"currency":"eur"}']  # forwarded as sent


async def test_an_ignored_field_may_change_and_another_may_not(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """A fresh timestamp or nonce in an ignored field replays; a changed amount is 422."""
    proxy = await start_proxy(store={"url": store_url}, routes=[{
        "path": "/*", "fingerprint": {"body": "canonical",
                                      "ignore": ["/timestamp", "/metadata/nonce"]},
    }])  # fmt: skip
    await replays_then_refuses(client, proxy, upstream, [
        b'{"amount":1,"timestamp":1,"metadata":{"nonce":"a"}}',
        b'{"metadata":{"nonce":"b"},"timestamp":2,"amount":1}',
        b'{"amount":2,"timestamp":3,"metadata":{"nonce":"c"}}',
    ])  # fmt: skip


async def test_a_form_body_in_another_pair_order_replays_under_canonical(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession, store_url: str
) -> None:
    """Form pairs in another order are the same request; another value is not."""
    proxy = await start_proxy(store={"url": store_url},
                              defaults={"fingerprint": {"body": "canonical"}})  # fmt: skip
    await replays_then_refuses(client, proxy, upstream, [
        b"amount=1&currency=eur", b"currency=eur&amount=1", b"currency=usd&amount=1",
    ], FORM)  # fmt: skip


async def test_a_body_that_claims_json_but_is_not_is_fingerprinted_raw(
    upstream: Upstream, start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """Broken JSON is forwarded, stored and replayed by its bytes; a change in them is 422."""
    proxy = await start_proxy(defaults={"fingerprint": {"body": "canonical"}})
    await replays_then_refuses(client, proxy, upstream, [
        b'{"amount": 1,', b'{"amount": 1,', b'{"amount":1,',
    ])  # fmt: skip


def test_a_body_over_the_canonical_size_counts_by_its_bytes() -> None:
    """Canonicalising runs on the event loop: a body over 64 KiB is fingerprinted raw, so
    one request cannot stall the process (1 MiB of form pairs took 3 s)."""
    policy = FingerprintPolicy(body="canonical")
    small_a, small_b = b'{"a": 1, "b": 2}', b'{"b":2,"a":1}'
    filler = "x" * CANONICAL_MAX_BYTES
    big_a = json.dumps({"a": 1, "f": filler}).encode()
    big_b = json.dumps({"f": filler, "a": 1}, separators=(",", ":")).encode()
    same = [fingerprint_request("POST", "/p", "", a, "application/json", policy)
            == fingerprint_request("POST", "/p", "", b, "application/json", policy)
            for a, b in ((small_a, small_b), (big_a, big_b))]  # fmt: skip
    assert same == [True, False]
