"""The proxy's contract with its clients, published: what each route asks of them and answers.

The IETF idempotency-key draft says a resource MUST publish its idempotency policy (which
operations, the key's format, its expiry). The policy is the config, so this module turns a
`Config` into that description, and nothing else: pure functions, a config in, a document out.
`idempotency-proxy describe` prints it, `GET /admin/contract` serves it, and `merge` adds it to
the upstream's own OpenAPI document, where generated clients and developer portals read it.

Two tables drive every format, so that describing one more route setting is one more line:
`FACTS` (a label and how to say it for a route) and `PROBLEMS` (an error class of
`proxy.errors`, when a route's clients can receive it, and why). Status, type and title come
from the error classes themselves, never retyped here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from proxy.config import KEY_MAX_LENGTH, Config, RoutePolicy
from proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    PROBLEM_TYPE_PREFIX,
    BodyTimeout,
    BodyTooLarge,
    InvalidKey,
    InvalidTarget,
    KeyInUse,
    KeyMismatch,
    MissingKey,
    OutcomeUnknown,
    ProxyError,
    ResponseExpired,
    ResponseNotReplayable,
    StoreUnavailable,
    UnsupportedMethod,
    UnsupportedTransferCoding,
    UnsupportedVersion,
    UpstreamDisconnected,
    UpstreamTimeout,
    UpstreamUnreachable,
)

REPLAY_HEADER = "Idempotent-Replayed"
OPENAPI_VERSION = "3.1.0"
# The methods an OpenAPI path item can hold (a route may protect others; no operation has them).
OPERATION_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PROBLEM_SCHEMA = "IdempotencyProblem"


# --- what a client must know about a route ---------------------------------------------


# (unit, its seconds, the least value written in it): days from a week on, so that a
# `48h` ttl reads as it was written.
_DURATION_UNITS = (("d", 86400.0, 7 * 86400.0), ("h", 3600.0, 3600.0), ("m", 60.0, 60.0),
                   ("s", 1.0, 1.0))  # fmt: skip


def duration(seconds: float) -> str:
    """`86400.0` -> `24h`, `0.5` -> `500ms`: the way the config file writes it."""
    for unit, length, least in _DURATION_UNITS:
        if seconds >= least and (seconds / length).is_integer():
            return f"{int(seconds / length)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def size(count: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= factor and count % factor == 0:
            return f"{count // factor} {unit}"
    return f"{count} bytes"


def _methods(route: RoutePolicy) -> str:
    return ", ".join(sorted(route.methods))


def _key(route: RoutePolicy) -> str:
    if route.require_key:
        return "required: a request without it gets 400 `missing-key`"
    return "optional: a request without it is forwarded unprotected (it may execute twice)"


def key_format(route: RoutePolicy) -> str:
    return (
        f"1 to {KEY_MAX_LENGTH} printable ASCII characters, sent once; a Structured Field "
        f'string (`"abc"`) is the key `abc` (the quotes do not count). Use a fresh random key '
        f"(a UUID) per operation, and the same key for each retry of it"
    )


def _expiry(route: RoutePolicy) -> str:
    return f"{duration(route.ttl)}: a retry within it gets the first answer replayed"


def _after_expiry(route: RoutePolicy) -> str:
    if route.tombstone_ttl:
        return (
            f"remembered for {duration(route.tombstone_ttl)} more: the same request gets 409 "
            "`response-expired` (another request 422), never a second execution; then forgotten"
        )
    return "the key is forgotten: a request with it executes as a new one"


def _fingerprint(route: RoutePolicy) -> str:
    policy = route.fingerprint
    if policy.body == "raw":
        return "method, path, query and the body's bytes"
    ignored = ", ".join(f"`{pointer}`" for pointer in policy.ignore)
    return (
        "method, path, query and the body in canonical form (JSON: RFC 8785; forms: pairs by "
        "name), so key order and whitespace do not matter"
        + (f"; ignoring {ignored}" if ignored else "")
    )


def _scope(route: RoutePolicy) -> str:
    if not route.scope_headers:
        return "one key space for every client"
    names = ", ".join(f"`{name}`" for name in route.scope_headers)
    return f"per value of {names}: two clients never share a key"


def _concurrency(route: RoutePolicy) -> str:
    if route.on_concurrent == "wait":
        return (
            f"a retry while the first attempt runs waits up to {duration(route.wait_timeout)} "
            "and gets its answer replayed; after that, 409 `key-in-use` with `Retry-After`"
        )
    return (
        "a retry while the first attempt runs gets 409 `key-in-use` with `Retry-After`; "
        "retry after it to get the first answer"
    )


def _replay(route: RoutePolicy) -> str:
    released = ", ".join(str(status) for status in sorted(route.release_statuses))
    return (
        f"status, headers and body of the first answer (4xx and 5xx too, except {released}, "
        f"which are not kept: the retry executes again), plus `{REPLAY_HEADER}: true`"
    )


def _unknown(route: RoutePolicy) -> str:
    timeout = duration(route.upstream_timeout)
    if route.on_unknown_outcome == "retry":
        return (
            f"an upstream that does not answer within {timeout} (504) or drops the connection "
            "(502) may have acted; a retry executes again"
        )
    return (
        f"an upstream that does not answer within {timeout} (504) or drops the connection "
        "(502) may have acted; that answer is the key's result and every retry gets it"
    )


def _limits(route: RoutePolicy) -> str:
    return (
        f"request body at most {size(route.max_request_body)} (413); an answer over "
        f"{size(route.max_stored_response)} is not kept for replay (409 "
        "`response-not-replayable` to retries, never a second execution)"
    )


Fact = tuple[str, Callable[[RoutePolicy], str]]

# One line per thing a client must know, in the order a developer reads them. Every format
# (markdown, the OpenAPI document and its `x-idempotency-routes`) is built from this table.
FACTS: tuple[Fact, ...] = (
    ("Methods protected", _methods),
    ("Key header", lambda route: f"`{route.key_header}`"),
    ("Key", _key),
    ("Key format", key_format),
    ("Same request means", _fingerprint),
    ("Expiry (ttl)", _expiry),
    ("After the expiry", _after_expiry),
    ("Key scope", _scope),
    ("Concurrent retry", _concurrency),
    ("Replay", _replay),
    ("Unknown outcome", _unknown),
    ("Limits", _limits),
)


# --- the problems a client can receive -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """A problem answer a client of a protected route can receive, and when."""

    error: type[ProxyError]
    applies: Callable[[RoutePolicy, Config], bool]
    when: str

    @property
    def status(self) -> int:
        return self.error.status

    @property
    def slug(self) -> str:
        return self.error.slug

    @property
    def type(self) -> str:
        return PROBLEM_TYPE_PREFIX + self.error.slug


def _always(route: RoutePolicy, config: Config) -> bool:
    return True


PROBLEMS: tuple[Problem, ...] = (
    Problem(MissingKey, lambda route, config: route.require_key, "the key header is missing"),
    Problem(InvalidKey, _always,
            "the key is empty, too long, not printable ASCII, or sent more than once"),
    Problem(BodyTimeout, _always, "the request body arrived too slowly"),
    Problem(KeyInUse, _always,
            "a request with this key is still being processed (see Concurrent retry)"),
    Problem(ResponseNotReplayable, _always,
            "the first request with this key completed, but its answer was too large to keep"),
    Problem(BodyTooLarge, _always, "the request body is over the route's limit"),
    Problem(KeyMismatch, _always,
            "the key was first used with another request (method, path, query or body)"),
    Problem(UpstreamUnreachable, _always,
            "the upstream could not be reached; nothing was delivered, a retry executes"),
    Problem(UpstreamDisconnected, _always,
            "the upstream dropped the connection after the request was sent; it may have acted"),
    Problem(OutcomeUnknown, lambda route, config: route.on_unknown_outcome == "reject",
            "the proxy handling the first request stopped before the upstream answered"),
    Problem(StoreUnavailable, lambda route, config: config.store.fail_mode == "closed",
            "the idempotency store did not answer; nothing was forwarded (see Retry-After)"),
    Problem(UpstreamTimeout, _always,
            "the upstream did not answer in time; it may have acted"),
    Problem(ResponseExpired, lambda route, config: bool(route.tombstone_ttl),
            "the first request with this key executed; its answer expired and is no longer "
            "available"),
)  # fmt: skip

# Errors of `proxy.errors` that no operation of an OpenAPI document can meet: they answer
# request targets, methods and framings that a generated client does not send.
NOT_PER_OPERATION: tuple[type[ProxyError], ...] = (
    InvalidTarget,
    UnsupportedMethod,
    UnsupportedTransferCoding,
    UnsupportedVersion,
)
# Answers that carry Retry-After.
RETRY_AFTER_SLUGS = frozenset({KeyInUse.slug, StoreUnavailable.slug})


def route_problems(route: RoutePolicy, config: Config) -> tuple[Problem, ...]:
    """The problems a client of `route` can receive, by status."""
    found = [problem for problem in PROBLEMS if problem.applies(route, config)]
    return tuple(sorted(found, key=lambda problem: problem.status))


def by_status(problems: Iterable[Problem]) -> dict[int, tuple[Problem, ...]]:
    grouped: dict[int, list[Problem]] = {}
    for problem in problems:
        if problem not in grouped.setdefault(problem.status, []):
            grouped[problem.status].append(problem)
    return {status: tuple(grouped[status]) for status in sorted(grouped)}


# --- markdown --------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(config: Config) -> str:
    """The contract for a developer portal: one section per route, first match first."""
    lines = [
        "# Idempotency contract",
        "",
        "Requests are matched against these routes in order; the first match applies, and a",
        "path no route matches is forwarded unprotected. Every answer the proxy makes itself",
        f"is `{PROBLEM_CONTENT_TYPE}` (RFC 9457) with a `type` of `{PROBLEM_TYPE_PREFIX}<name>`,",
        "so a client can tell it from the upstream's own answers.",
    ]
    for route in config.routes:
        lines += ["", f"## Route `{route.id}`: `{route.path}`", "", "| | |", "| --- | --- |"]
        lines += [f"| {label} | {_cell(say(route))} |" for label, say in FACTS]
        lines += ["", "| status | type | title | when |", "| --- | --- | --- | --- |"]
        lines += [
            f"| {p.status} | `{p.type}` | {_cell(p.error.title)} | {_cell(p.when)} |"
            for p in route_problems(route, config)
        ]
    return "\n".join(lines) + "\n"


# --- OpenAPI: the reusable parts -------------------------------------------------------


def _camel(text: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", text))


def parameter_name(route: RoutePolicy) -> str:
    """The components/parameters name of a route's key header: `IdempotencyKey[Required]`."""
    return _camel(route.key_header) + ("Required" if route.require_key else "")


def key_parameter(route: RoutePolicy) -> dict[str, Any]:
    """The key header as an OpenAPI parameter (the same in 3.0 and 3.1)."""
    if route.require_key:
        need = "Required: a request without it gets 400 `missing-key`."
    else:
        need = "Optional: a request without it is forwarded unprotected."
    return {
        "name": route.key_header,
        "in": "header",
        "required": route.require_key,
        "description": (
            f"Idempotency key (draft-ietf-httpapi-idempotency-key-header). {need} "
            f"{key_format(route)}. A retry within {duration(route.ttl)} with the same key and "
            f"the same request gets the first answer again, marked `{REPLAY_HEADER}: true`; "
            "with another request, 422 `key-mismatch`."
        ),
        "schema": {
            "type": "string",
            "minLength": 1,
            "maxLength": KEY_MAX_LENGTH,
            "pattern": "^[\\x20-\\x7E]+$",
        },
        "example": "3f1c1d7e-8c1e-4f57-9a4b-2f8f0f6f5e1a",
    }


def response_name(problems: Sequence[Problem]) -> str:
    """`IdempotencyKeyInUseOrResponseNotReplayable`: named by the types it can carry."""
    return "Idempotency" + "Or".join(_camel(problem.slug) for problem in problems)


def problem_response(problems: Sequence[Problem], schema: str = PROBLEM_SCHEMA) -> dict[str, Any]:
    """One status's problem answers as an OpenAPI response (valid in 3.0 and 3.1)."""
    status = problems[0].status
    listed = "; ".join(f"`{p.slug}`: {p.when}" for p in problems)
    response: dict[str, Any] = {
        "description": f"{HTTPStatus(status).phrase}, answered by the idempotency proxy: {listed}.",
    }
    if any(problem.slug in RETRY_AFTER_SLUGS for problem in problems):
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying with the same key.",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    response["content"] = {
        PROBLEM_CONTENT_TYPE: {
            "schema": {
                "allOf": [
                    {"$ref": f"#/components/schemas/{schema}"},
                    {"type": "object", "properties": {
                        "type": {"type": "string", "enum": [p.type for p in problems]},
                        "status": {"type": "integer", "enum": [status]},
                    }},
                ]
            }
        }
    }  # fmt: skip
    return response


def problem_schema() -> dict[str, Any]:
    """RFC 9457 problem details, as the proxy writes them (valid in 3.0 and 3.1)."""
    return {
        "type": "object",
        "description": "RFC 9457 problem details from the idempotency proxy.",
        "properties": {
            "type": {"type": "string", "description": f"`{PROBLEM_TYPE_PREFIX}<name>`"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "request_id": {
                "type": "string",
                "description": "Leads to the proxy's log line for this request.",
            },
        },
        "required": ["type", "title", "status", "detail"],
    }


@dataclass(frozen=True, slots=True)
class Protection:
    """What an operation needs: its key parameter and its problem answers by status."""

    header: str
    parameter: str  # components/parameters name
    responses: dict[str, str]  # status -> components/responses name


class Components:
    """The reusable parts a document gains, named once and shared by every operation."""

    def __init__(self, config: Config, schema: str = PROBLEM_SCHEMA) -> None:
        self.config = config
        self.schema = schema  # the components/schemas name of the problem schema
        self.parameters: dict[str, dict[str, Any]] = {}
        self.responses: dict[str, dict[str, Any]] = {}

    def protect(self, routes: Sequence[RoutePolicy]) -> Protection:
        """The parameter and responses for an operation that `routes` (one, usually) govern."""
        route = routes[0]
        parameter = parameter_name(route)
        self.parameters.setdefault(parameter, key_parameter(route))
        problems = [p for r in routes for p in route_problems(r, self.config)]
        responses = {}
        for status, group in by_status(problems).items():
            name = response_name(group)
            self.responses.setdefault(name, problem_response(group, self.schema))
            responses[str(status)] = name
        return Protection(route.key_header, parameter, responses)


def route_entry(route: RoutePolicy, protection: Protection) -> dict[str, Any]:
    """A route in `x-idempotency-routes`: its facts, and which components apply to it."""
    return {
        "id": route.id,
        "path": route.path,
        "methods": sorted(route.methods),
        "policy": {label: say(route) for label, say in FACTS},
        "parameter": f"#/components/parameters/{protection.parameter}",
        "responses": {
            status: f"#/components/responses/{name}"
            for status, name in protection.responses.items()
        },
    }


def to_openapi(config: Config, title: str = "Idempotency contract") -> dict[str, Any]:
    """An OpenAPI 3.1 document of the contract: its parts as components, per route a summary.

    Route patterns (`/v1/payments/*`) are not path templates, so the document has no
    operations: `--merge` puts the components on the upstream document's operations.
    """
    components = Components(config)
    routes = [route_entry(route, components.protect([route])) for route in config.routes]
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": "1", "description": to_markdown(config)},
        "paths": {},
        "components": {
            "schemas": {PROBLEM_SCHEMA: problem_schema()},
            "parameters": components.parameters,
            "responses": components.responses,
            "headers": {
                REPLAY_HEADER: {
                    "description": "On a replayed answer: `true`.",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        },
        "x-idempotency-routes": routes,
    }
