"""The published contract: `describe` (markdown, OpenAPI), `--merge`, and `/admin/contract`.

OpenAPI output is checked by openapi-spec-validator, a well-kept validator of OpenAPI 2.0, 3.0
and 3.1 documents, run here on every document the proxy writes. The merge is checked on two
sample upstream documents (3.0 YAML, 3.1 JSON in tests/data): the operations it protects are
exactly those a route governs, and everything else re-serialises to the same text.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from openapi_spec_validator import validate

from proxy import errors
from proxy.admin import negotiate, openapi_document
from proxy.cli import main
from proxy.config import load_config, parse_config
from proxy.contract.describe import (
    FACTS,
    NOT_PER_OPERATION,
    PROBLEMS,
    route_problems,
    to_markdown,
    to_openapi,
)
from proxy.contract.paths import covers, governing, touches
from tests.conftest import ProxyFactory, raw_config

DATA = Path(__file__).resolve().parent / "data"
PAYMENTS_ROUTES: list[dict[str, Any]] = [
    {"path": "/v1/payments*", "id": "payments", "require_key": True, "ttl": "48h"},
    {"path": "/v1/reports/daily", "id": "daily-report"},
    {"path": "/v1/reports/*", "id": "reports", "methods": ["PUT"]},
    {"path": "/*", "id": "rest", "methods": ["DELETE"]},
]
ORDERS_ROUTES: list[dict[str, Any]] = [
    {"path": "/v2/checkout/orders", "id": "orders", "key_header": "PayPal-Request-Id",
     "on_concurrent": "wait"},
    {"path": "/v2/checkout/orders/*/capture", "id": "capture", "key_header": "PayPal-Request-Id"},
    {"path": "/v2/*", "id": "v2", "methods": ["PUT"]},
]  # fmt: skip
OPERATION_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def write_config(tmp_path: Path, routes: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config("http://127.0.0.1:9000", routes=routes, **top)))
    return path


def describe(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["describe", *args])
    out, err = capsys.readouterr()
    return status, out, err


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): item[method]
        for path, item in document["paths"].items()
        for method in OPERATION_KEYS
        if method in item
    }


def same_text(left: Any, right: Any) -> bool:
    """Equal, key order included: the same JSON text."""
    return json.dumps(left) == json.dumps(right)


# --- which routes govern a path template -----------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "template", "covered", "touched"),
    [
        ("/v1/payments/*", "/v1/payments/{id}", True, True),
        ("/v1/payments/*", "/v1/payments/{id}/capture", True, True),
        ("/v1/payments*", "/v1/payments", True, True),
        ("/v1/payments/refunds", "/v1/payments/{id}", False, True),
        ("/v1/*/refunds", "/v1/payments/{id}", False, True),
        ("/v1/payments/*/capture", "/v1/payments/{id}", False, False),
        ("/v1/payments/*/capture", "/v1/payments/{id}/capture", True, True),
        ("/v1/pay*/x", "/v1/{kind}/x", False, True),
        ("/v1/payments", "/v1/payments/{id}", False, False),
        ("/v1/{id}", "/v1/{id}", False, True),  # a pattern's braces are literal characters
    ],
)
def test_route_patterns_against_path_templates(
    pattern: str, template: str, covered: bool, touched: bool
) -> None:
    """A route covers a template when all its paths match, touches it when some do."""
    assert covers(pattern, template) is covered
    assert touches(pattern, template) is touched


def test_the_routes_that_govern_a_template_end_at_the_first_that_covers_it() -> None:
    """First match wins: earlier routes that touch a template share it with the one covering it."""
    config = parse_config(raw_config("http://127.0.0.1:9000", routes=PAYMENTS_ROUTES), env={})
    found = governing(config.routes, "/v1/reports/{name}")
    assert [route.id for route in found.routes] == ["daily-report", "reports"]
    assert found.complete and found.split
    alone = governing(config.routes, "/v1/payments/{id}")
    assert [route.id for route in alone.routes] == ["payments"] and not alone.split


# --- describe: markdown and OpenAPI ----------------------------------------------------


def test_every_proxy_error_is_published_or_said_not_to_apply() -> None:
    """Each problem in proxy/errors.py is in PROBLEMS or NOT_PER_OPERATION: a new error class
    (with its own slug) must be placed in one of them, or clients never learn about it."""
    leaves = {
        cls for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.ProxyError) and cls.slug != "internal-error"
        and cls.__module__ == errors.__name__
    }  # fmt: skip
    published = {problem.error for problem in PROBLEMS} | set(NOT_PER_OPERATION)
    slugs = {cls.slug for cls in leaves} - {cls.slug for cls in published}
    assert not slugs, f"add these problems to proxy.contract.describe.PROBLEMS: {sorted(slugs)}"


def test_markdown_lists_every_route_its_facts_and_its_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One section per route in config order, each fact, and the problems its clients can get."""
    path = write_config(tmp_path, PAYMENTS_ROUTES, store={"url": "memory://", "fail_mode": "open"})
    status, out, _ = describe(capsys, "--config", str(path))
    assert status == 0
    config = load_config(path, env={})
    sections = out.split("\n## Route ")[1:]
    assert [s.split("`")[1] for s in sections] == [r["id"] for r in PAYMENTS_ROUTES]
    for section, route in zip(sections, config.routes, strict=True):
        assert f"`{route.path}`" in section.splitlines()[0]
        for label, say in FACTS:
            assert f"| {label} | {say(route)} |" in section
        listed = {line.split("`")[1] for line in section.splitlines() if "problem:" in line}
        assert listed == {problem.type for problem in route_problems(route, config)}
    first, second = sections[0], sections[1]
    assert "missing-key" in first and "missing-key" not in second  # require_key only
    assert "store-unavailable" not in out  # fail_mode: open forwards instead
    assert "| Expiry (ttl) | 48h:" in first and "| Expiry (ttl) | 24h:" in second


def test_openapi_format_is_a_valid_31_document_with_reusable_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format openapi: valid OpenAPI 3.1; the key header in components/parameters, each
    status's problems in components/responses with an RFC 9457 schema; JSON by file name."""
    path = write_config(tmp_path, ORDERS_ROUTES)
    status, out, _ = describe(capsys, "--config", str(path), "--format", "openapi")
    assert status == 0
    document = yaml.safe_load(out)
    validate(document)
    assert document["openapi"] == "3.1.0"
    parameter = document["components"]["parameters"]["PayPalRequestId"]
    assert (parameter["name"], parameter["in"], parameter["required"]) == (
        "PayPal-Request-Id", "header", False)  # fmt: skip
    assert parameter["schema"]["maxLength"] == 255
    responses = document["components"]["responses"]
    conflict = responses["IdempotencyKeyInUseOrResponseNotReplayable"]
    schema = conflict["content"]["application/problem+json"]["schema"]
    assert schema["allOf"][0] == {"$ref": "#/components/schemas/IdempotencyProblem"}
    assert schema["allOf"][1]["properties"]["type"]["enum"] == [
        errors.PROBLEM_TYPE_PREFIX + "key-in-use",
        errors.PROBLEM_TYPE_PREFIX + "response-not-replayable",
    ]
    assert "Retry-After" in conflict["headers"]
    assert {"type", "title", "status", "detail"} <= set(
        document["components"]["schemas"]["IdempotencyProblem"]["required"]
    )
    routes = {entry["id"]: entry for entry in document["x-idempotency-routes"]}
    assert set(routes) == {"orders", "capture", "v2"}
    assert set(routes["orders"]["responses"]) == {"400", "408", "409", "413", "422", "502",
                                                  "503", "504"}  # fmt: skip
    as_json = tmp_path / "contract.json"
    status, _, _ = describe(capsys, "--config", str(path), "--format", "openapi",
                            "--output", str(as_json))  # fmt: skip
    assert status == 0 and json.loads(as_json.read_text()) == document


# --- --merge ---------------------------------------------------------------------------


def merge_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], routes: list[dict[str, Any]],
               source: Path) -> tuple[str, str]:  # fmt: skip
    config = write_config(tmp_path, routes)
    target = tmp_path / ("merged" + source.suffix)
    status, out, err = describe(capsys, "--config", str(config), "--merge", str(source),
                                "--output", str(target))  # fmt: skip
    assert status == 0 and out == "", err
    return target.read_text(), err


def assert_only_added(before: dict[str, Any], after: dict[str, Any]) -> None:
    """`after` has every key of `before`, first and in order, with the same values."""
    assert list(after)[: len(before)] == list(before)
    for name, value in before.items():
        assert same_text(after[name], value), name


def assert_merged_only(before: dict[str, Any], after: dict[str, Any],
                       protected: set[tuple[str, str]]) -> None:  # fmt: skip
    """Protected operations gained parameters and responses; nothing else changed at all."""
    assert list(after) == list(before)
    for name in before:
        if name not in ("paths", "components"):
            assert same_text(after[name], before[name]), name
    assert list(after["paths"]) == list(before["paths"])
    for path, item in before["paths"].items():
        merged_item = after["paths"][path]
        assert list(merged_item) == list(item)
        for name in item:
            if name not in OPERATION_KEYS or (name.upper(), path) not in protected:
                assert same_text(merged_item[name], item[name]), (name, path)
    for (method, path), operation in operations(before).items():
        if (method, path) in protected:
            merged = operations(after)[(method, path)]
            assert_only_added({k: v for k, v in operation.items()
                               if k not in ("parameters", "responses")},
                              {k: v for k, v in merged.items()
                               if k not in ("parameters", "responses")})  # fmt: skip
            assert merged.get("parameters", [])[: len(operation.get("parameters", []))] == (
                operation.get("parameters", []))  # fmt: skip
            assert_only_added(operation["responses"], merged["responses"])
    for section, parts in before.get("components", {}).items():
        assert_only_added(parts, after["components"][section])


def test_merge_into_a_30_yaml_document_touches_only_protected_operations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3.0 YAML in, valid 3.0 YAML out; the server's /v1 is part of the matched path; an
    operation's own key parameter and 409 are kept (stderr says so); a template whose paths
    go to routes that disagree is left alone (stderr says so)."""
    source = DATA / "payments-3.0.yaml"
    before = yaml.safe_load(source.read_text())
    text, err = merge_file(tmp_path, capsys, PAYMENTS_ROUTES, source)
    after = yaml.safe_load(text)
    validate(after)
    assert after["openapi"] == "3.0.3"
    protected = {("POST", "/payments"), ("PATCH", "/payments/{id}"),
                 ("POST", "/payments/{id}/capture")}  # fmt: skip
    assert_merged_only(before, after, protected)
    ops = operations(after)
    key = {"$ref": "#/components/parameters/IdempotencyKeyRequired"}
    assert ops[("POST", "/payments")]["parameters"] == [key]
    assert ops[("PATCH", "/payments/{id}")]["parameters"] == [key]
    assert key not in ops[("POST", "/payments/{id}/capture")]["parameters"]
    create = ops[("POST", "/payments")]["responses"]
    assert list(create) == ["201", "400", "408", "409", "413", "422", "502", "503", "504"]
    assert create["400"] == {"$ref": "#/components/responses/Error"}  # the API's own 400 kept
    assert ops[("POST", "/payments/{id}/capture")]["responses"]["409"] == {
        "description": "Already captured."}  # fmt: skip
    assert "POST /payments/{id}/capture: keeps its own Idempotency-Key parameter" in err
    assert "POST /payments/{id}/capture: keeps its own 409 answer" in err
    assert "POST /payments: keeps its own 400 answer" in err
    assert "POST /reports/{name}: left unchanged" in err and "daily-report, reports" in err
    assert "3 operation(s) protected" in err


def test_merge_into_a_31_json_document_touches_only_protected_operations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """3.1 JSON in, valid 3.1 JSON out; a key parameter given by $ref is recognised; a
    component name the document uses for something else gets a suffix; webhooks untouched."""
    source = DATA / "orders-3.1.json"
    before = json.loads(source.read_text())
    text, err = merge_file(tmp_path, capsys, ORDERS_ROUTES, source)
    assert text.lstrip().startswith("{")
    after = json.loads(text)
    validate(after)
    protected = {("POST", "/v2/checkout/orders"),
                 ("POST", "/v2/checkout/orders/{order_id}/capture")}  # fmt: skip
    assert_merged_only(before, after, protected)
    ops = operations(after)
    assert ops[("POST", "/v2/checkout/orders")]["parameters"] == [
        {"$ref": "#/components/parameters/RequestId"}]  # fmt: skip
    assert {"$ref": "#/components/parameters/PayPalRequestId"} in ops[
        ("POST", "/v2/checkout/orders/{order_id}/capture")]["parameters"]  # fmt: skip
    mismatch = ops[("POST", "/v2/checkout/orders")]["responses"]["422"]
    assert mismatch == {"$ref": "#/components/responses/IdempotencyKeyMismatch2"}
    assert "POST /v2/checkout/orders: keeps its own PayPal-Request-Id parameter" in err
    assert "components/responses/IdempotencyKeyMismatch exists and differs" in err


def test_merge_with_nothing_protected_writes_the_document_back_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No route protects any operation: the same document, not even a component added."""
    source = DATA / "orders-3.1.json"
    text, err = merge_file(tmp_path, capsys, [{"path": "/*", "methods": ["PUT"]}], source)
    assert same_text(json.loads(text), json.loads(source.read_text()))
    assert "0 operation(s) protected: none" in err


def test_merge_refuses_what_is_not_openapi_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Swagger 2.0 file or broken YAML: exit 1 and a message, no output."""
    config = write_config(tmp_path, PAYMENTS_ROUTES)
    swagger = tmp_path / "swagger.yaml"
    swagger.write_text("swagger: '2.0'\ninfo: {title: x, version: '1'}\npaths: {}\n")
    status, out, err = describe(capsys, "--config", str(config), "--merge", str(swagger))
    assert (status, out) == (1, "") and "expected an OpenAPI 3.0 or 3.1 document" in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("openapi: 3.0.3\npaths: [\n")
    status, out, err = describe(capsys, "--config", str(config), "--merge", str(broken))
    assert (status, out) == (1, "") and "not valid YAML: line" in err


# --- GET /admin/contract ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "text/markdown"),
        ("*/*", "text/markdown"),
        ("application/json", "application/json"),
        ("application/vnd.oai.openapi+json", "application/vnd.oai.openapi+json"),
        ("application/yaml", "application/yaml"),
        ("text/html, application/*;q=0.5", "application/json"),
        ("application/json;q=0.4, text/markdown;q=0.9", "text/markdown"),
        ("application/yaml, application/json;q=0", "application/yaml"),
        ("image/png", "text/markdown"),
    ],
)
def test_contract_negotiation(accept: str | None, chosen: str) -> None:
    """The Accept header picks the form; ties and unknown types fall back to markdown."""
    offered = ["text/markdown", "application/json", "application/vnd.oai.openapi+json",
               "application/yaml", "application/vnd.oai.openapi"]  # fmt: skip
    assert negotiate(accept, offered) == chosen


async def test_admin_contract_serves_the_description_by_accept(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    """GET /admin/contract: markdown, OpenAPI JSON or YAML by Accept, the running config's
    routes, behind the admin token like the rest of /admin/*."""
    token = "contract-token-0123456789"
    proxy = await start_proxy(routes=ORDERS_ROUTES, admin_token=token)
    url = proxy.admin_url + "/admin/contract"
    async with client.get(url) as response:
        assert response.status == 401
    config = parse_config(raw_config("http://127.0.0.1:9000", routes=ORDERS_ROUTES), env={})
    expected = to_openapi(config)
    auth = {"Authorization": f"Bearer {token}"}
    for accept, content_type in [(None, "text/markdown"), ("application/json", "application/json"),
                                 ("application/yaml", "application/yaml")]:  # fmt: skip
        headers = auth if accept is None else {**auth, "Accept": accept}
        async with client.get(url, headers=headers) as response:
            assert response.status == 200
            assert response.content_type == content_type
            body = await response.text()
        if content_type == "text/markdown":
            assert body == to_markdown(config)
        else:
            document = json.loads(body) if "json" in content_type else yaml.safe_load(body)
            assert document == expected
            validate(document)


def test_the_admin_listeners_own_openapi_document_is_valid() -> None:
    """proxy/openapi.yaml, which now documents /admin/contract, passes the validator."""
    validate(yaml.safe_load(openapi_document()))
