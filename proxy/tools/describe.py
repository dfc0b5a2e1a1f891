"""`idempotency-proxy describe`: publish the contract a config makes with its clients.

Prints, for every route, what a client must know (see `proxy.contract`), as markdown for a
developer portal or as an OpenAPI 3.1 document; with `--merge`, writes the upstream's own
OpenAPI document back with the key header and the proxy's problem answers on exactly the
operations a protected route governs. What the merge left alone, and why, goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from proxy.config import Config, ConfigError, load_config
from proxy.contract.describe import to_markdown, to_openapi
from proxy.contract.documents import DocumentError, Format, dump_document, load_document
from proxy.contract.merge import MergeError, merge
from proxy.tools.options import Commands

FORMATS = ("markdown", "openapi")


def add_parser(commands: Commands) -> None:
    """The `describe` command and its options."""
    describe = commands.add_parser(
        "describe", help="print each route's idempotency contract (markdown or OpenAPI)"
    )
    describe.add_argument("--config", required=True, help="the YAML config file")
    describe.add_argument(
        "--format", choices=FORMATS, help="markdown (default) or an OpenAPI 3.1 document"
    )
    describe.add_argument(
        "--merge", metavar="OPENAPI",
        help="the upstream's OpenAPI document (3.0 or 3.1, JSON or YAML): add the contract "
        "to the operations the proxy protects and write it out in its own format",
    )  # fmt: skip
    describe.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    describe.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """The `describe` command."""
    if args.merge and args.format == "markdown":
        print("describe: --merge writes an OpenAPI document; drop --format markdown",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    try:
        if args.merge:
            text = _merged(config, args.merge)
        elif args.format == "openapi":
            kind: Format = "json" if str(args.output or "").endswith(".json") else "yaml"
            text = dump_document(to_openapi(config), kind)
        else:
            text = to_markdown(config)
    except (OSError, UnicodeDecodeError, DocumentError, MergeError) as exc:
        print(f"describe: {exc}", file=sys.stderr)
        return 1
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _merged(config: Config, path: str) -> str:
    """The upstream document at `path` with the contract added; notes go to stderr."""
    document, kind = load_document(Path(path).read_text(encoding="utf-8"), source=path)
    result = merge(document, config)
    for note in result.notes:
        print(f"describe: {note}", file=sys.stderr)
    protected = ", ".join(result.protected) or "none"
    print(f"describe: {len(result.protected)} operation(s) protected: {protected}",
          file=sys.stderr)  # fmt: skip
    return dump_document(result.document, kind)
