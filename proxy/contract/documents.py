"""Reading and writing OpenAPI documents as JSON or YAML, chosen by their content.

A document is written back in the format it came in, keys in their order, so that a merged
upstream document differs from its input only where the proxy's contract was added. This is
the one place that handles the parsers' errors.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import yaml

from proxy.config import yaml_problem

Format = Literal["json", "yaml"]


class DocumentError(ValueError):
    """The text is not a JSON or YAML mapping (the message says where)."""


def load_document(text: str, source: str = "<document>") -> tuple[dict[str, Any], Format]:
    """The document and its format: JSON when it starts with `{`, YAML otherwise."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DocumentError(
                f"{source}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
            ) from exc
        kind: Format = "json"
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DocumentError(f"{source}: not valid YAML: {yaml_problem(exc)}") from exc
        kind = "yaml"
    if not isinstance(data, dict):
        raise DocumentError(f"{source}: expected a mapping at the top")
    return data, kind


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, writing text of several lines as a `|` block (markdown stays
    readable); the emitter falls back to quoting where a block cannot hold the text."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump_document(data: dict[str, Any], kind: Format) -> str:
    """`data` as text, keys in their order."""
    if kind == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    text: str = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False,
        width=100,
    )  # fmt: skip
    return text
