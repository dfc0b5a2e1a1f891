"""The `audit` command: its options, and the run that refuses without --yes.

`add_parser` declares the command; `parse_header` and `load_data` read the curl-style
options (`-H 'Name: value'`, `--data @file`); `run` audits, writes --json and returns the
exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TextIO

from proxy.masking import redact_url
from proxy.tools.audit.model import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DATA,
    DEFAULT_KEY_HEADER,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_METHOD,
    DEFAULT_TIMEOUT,
    AuditOptions,
)
from proxy.tools.audit.probes import run_audit
from proxy.tools.audit.report import write_json
from proxy.tools.options import Commands, positive

REFUSAL = (
    "idempotency-proxy audit sends real, mutating requests to {url}: each probe may create "
    "a resource (a charge, an order) and some create several on purpose. Run it against a "
    "test environment, and add --yes to confirm."
)


def add_parser(commands: Commands) -> None:
    """The `audit` command and its curl-style options."""
    probe = commands.add_parser(
        "audit", help="probe an HTTP endpoint for duplicate-delivery safety (sends real requests)"
    )
    probe.add_argument("url", help="the endpoint, e.g. https://staging.example.com/v1/charges")
    probe.add_argument("-X", "--method", default=DEFAULT_METHOD, type=str.upper,
                       help="request method (default %(default)s)")  # fmt: skip
    probe.add_argument("-d", "--data", default=DEFAULT_DATA,
                       help="request body, or @FILE (default %(default)s)")  # fmt: skip
    probe.add_argument("-H", "--header", action="append", default=[], type=header,
                       help="extra request header 'Name: value' (repeatable)")  # fmt: skip
    probe.add_argument("--key-header", default=DEFAULT_KEY_HEADER,
                       help="the idempotency key header (default %(default)s)")  # fmt: skip
    probe.add_argument(
        "--timeout", type=positive(float), default=DEFAULT_TIMEOUT,
        help="seconds the timeout probe waits before giving up (default %(default)s)",
    )  # fmt: skip
    probe.add_argument("--concurrency", type=positive(int), default=DEFAULT_CONCURRENCY,
                       help="duplicates sent at once (default %(default)s)")  # fmt: skip
    probe.add_argument("--max-requests", type=positive(int), default=DEFAULT_MAX_REQUESTS,
                       help="never send more requests than this (default %(default)s)")  # fmt: skip
    probe.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    probe.add_argument(
        "--yes", action="store_true", help="confirm: the audit sends real, mutating requests"
    )
    probe.set_defaults(run=run)


def parse_header(text: str) -> tuple[str, str]:
    """`-H 'Name: value'`, as curl takes it."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip():
        raise ValueError(f'expected "Name: value", got "{text}"')
    return name, value.strip()


def header(text: str) -> tuple[str, str]:
    """An option type: `parse_header`, its error reported as a usage error."""
    try:
        return parse_header(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def load_data(text: str) -> bytes:
    """`--data '{...}'`, or `--data @file` as curl takes it."""
    if text.startswith("@"):
        return Path(text[1:]).read_bytes()
    return text.encode()


def run(args: argparse.Namespace) -> int:
    """The `audit` command, from its parsed options."""
    try:
        data = load_data(args.data)
    except OSError as exc:
        print(f"--data {args.data}: cannot read: {exc.strerror}", file=sys.stderr)
        return 2
    options = AuditOptions(
        url=args.url,
        method=args.method,
        data=data,
        headers=tuple(args.header),
        key_header=args.key_header,
        timeout=args.timeout,
        concurrency=args.concurrency,
        max_requests=args.max_requests,
        json_path=args.json,
        yes=args.yes,
    )
    return audit(options)


def audit(options: AuditOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Refuse without --yes, else audit and return the exit status."""
    if not options.yes:
        print(REFUSAL.format(url=redact_url(options.url)), file=err)
        return 2
    try:
        report = asyncio.run(run_audit(options, out))
    except KeyboardInterrupt:
        return 130
    if options.json_path is not None:
        write_json(report, options.json_path)
    return report.exit_code
