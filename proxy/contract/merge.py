"""Put the proxy's contract into the upstream's own OpenAPI document (3.0 or 3.1).

Teams put the proxy in front of an API that already has an OpenAPI document, and clients are
generated from it. Merging adds, to exactly the operations that a protected route governs,
the key header as a parameter and the proxy's problem answers as responses, both as `$ref`s
to reusable components; everything else stays as it was, keys in their order.

What the document already says wins: an operation that has a parameter of the key header's
name, or an answer for a status, keeps it, and a component name that is taken gets a suffix.
Each such case, and each operation whose paths are split between routes that disagree, is
returned as a note for the operator.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from proxy.config import Config, RoutePolicy
from proxy.contract.describe import (
    OPERATION_METHODS,
    PROBLEM_SCHEMA,
    Components,
    Protection,
    problem_schema,
)
from proxy.contract.paths import governing

REF_PREFIX = "#/components/"


class MergeError(ValueError):
    """The document is not one this can merge into (the message says why)."""


@dataclass
class Merged:
    """The merged document, the operations that gained the contract, and notes for stderr."""

    document: dict[str, Any]
    protected: list[str] = field(default_factory=list)  # "POST /v1/payments"
    notes: list[str] = field(default_factory=list)


def merge(document: dict[str, Any], config: Config) -> Merged:
    """A copy of `document` with the contract on every operation a protected route governs."""
    version = str(document.get("openapi", ""))
    if not version.startswith(("3.0.", "3.1.")):
        found = document.get("swagger") or version or "no `openapi` field"
        raise MergeError(f"expected an OpenAPI 3.0 or 3.1 document, got {found}")
    merged = Merged(copy.deepcopy(document))
    paths = merged.document.get("paths") or {}
    if not isinstance(paths, dict):
        raise MergeError("`paths` is not a mapping")
    found = []
    for path, item, method, operation in _operations(paths):
        where = f"{method.upper()} {path}"
        prefix = _base_path(merged.document, item, operation)
        routes = _routes_for(config.routes, prefix + path, method, where, merged.notes)
        if routes:
            found.append((item, operation, where, routes))
    if not found:
        return merged  # nothing protected: not even components are added
    sections = merged.document.setdefault("components", {})
    schema = _free_name(sections, "schemas", PROBLEM_SCHEMA, problem_schema(), merged.notes)
    components = Components(config, schema)
    wanted = [(item, operation, where, components.protect(routes))
              for item, operation, where, routes in found]  # fmt: skip
    names = _place_components(sections, components, merged.notes)
    for item, operation, where, protection in wanted:
        _protect(merged.document, item, operation, where, protection, names, merged.notes)
        merged.protected.append(where)
    return merged


def _operations(paths: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, Any]]:
    for path, item in paths.items():
        if not isinstance(item, dict):
            continue
        for method in OPERATION_METHODS:
            if isinstance(item.get(method), dict):
                yield str(path), item, method, item[method]


def _base_path(document: dict[str, Any], item: dict[str, Any], operation: dict[str, Any]) -> str:
    """The path the first server URL adds in front of the templates (operation's, path
    item's, then the document's servers); `{variables}` in it stay templated."""
    for holder in (operation, item, document):
        servers = holder.get("servers")
        if isinstance(servers, list) and servers and isinstance(servers[0], dict):
            return urlsplit(str(servers[0].get("url", ""))).path.rstrip("/")
    return ""


def _routes_for(routes: tuple[RoutePolicy, ...], template: str, method: str, where: str,
                notes: list[str]) -> tuple[RoutePolicy, ...]:  # fmt: skip
    """The routes whose contract the operation gets: none, or those that all protect it alike."""
    found = governing(routes, template)
    guarding = [route for route in found.routes if method.upper() in route.methods]
    if not guarding:
        return ()
    if not found.split:
        return found.routes
    alike = {(route.key_header, route.require_key) for route in found.routes}
    if found.complete and len(guarding) == len(found.routes) and len(alike) == 1:
        return found.routes
    ids = ", ".join(route.id for route in found.routes)
    tail = "" if found.complete else " and some to no route"
    notes.append(
        f"{where}: left unchanged: its paths go to routes that protect it differently "
        f"({ids}{tail}); give it its own route or split the operation"
    )
    return ()


def _place_components(sections: dict[str, Any], components: Components,
                      notes: list[str]) -> dict[str, str]:  # fmt: skip
    """Add the components the operations use; return {our name: the name in the document}."""
    names: dict[str, str] = {}
    for kind, wanted in (("parameters", components.parameters),
                         ("responses", components.responses)):  # fmt: skip
        for name, value in wanted.items():
            names[name] = _free_name(sections, kind, name, value, notes)
    return names


def _free_name(sections: dict[str, Any], kind: str, name: str, value: dict[str, Any],
               notes: list[str]) -> str:  # fmt: skip
    """Put `value` under components/kind as `name`, or `name2`... if another holds `name`."""
    section = sections.setdefault(kind, {})
    candidate, number = name, 1
    while candidate in section and section[candidate] != value:
        number += 1
        candidate = f"{name}{number}"
    if candidate != name:
        notes.append(f"components/{kind}/{name} exists and differs: added as {candidate}")
    section[candidate] = value
    return candidate


def _resolve(document: dict[str, Any], value: Any) -> Any:
    """A local `$ref` followed (one level is what parameters use), else the value."""
    if isinstance(value, dict) and isinstance(value.get("$ref"), str):
        ref = value["$ref"]
        if ref.startswith("#/"):
            target: Any = document
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            return target
    return value


def _has_header(document: dict[str, Any], holders: list[dict[str, Any]], name: str) -> bool:
    for holder in holders:
        for parameter in holder.get("parameters") or []:
            found = _resolve(document, parameter)
            if (
                isinstance(found, dict)
                and found.get("in") == "header"
                and str(found.get("name", "")).lower() == name.lower()
            ):
                return True
    return False


def _protect(document: dict[str, Any], item: dict[str, Any], operation: dict[str, Any],
             where: str, protection: Protection, names: dict[str, str],
             notes: list[str]) -> None:  # fmt: skip
    """Add the key parameter and the problem answers the operation does not have yet."""
    header = protection.header
    if _has_header(document, [item, operation], header):
        notes.append(f"{where}: keeps its own {header} parameter")
    else:
        ref = {"$ref": f"{REF_PREFIX}parameters/{names[protection.parameter]}"}
        operation.setdefault("parameters", []).append(ref)
    responses = operation.setdefault("responses", {})
    taken = {str(status) for status in responses}
    for status, name in protection.responses.items():
        if status in taken:
            notes.append(f"{where}: keeps its own {status} answer")
            continue
        responses[status] = {"$ref": f"{REF_PREFIX}responses/{names[name]}"}
