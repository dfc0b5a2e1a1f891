"""The `audit` command: refuse without --yes, else audit, write --json, return the exit status.

proxy/cli.py parses the arguments; `parse_header` and `load_data` read the curl-style ones
(`-H 'Name: value'`, `--data @file`) and `main` runs the audit.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import TextIO

from proxy.audit.model import AuditOptions
from proxy.audit.probes import run_audit
from proxy.audit.report import write_json
from proxy.masking import redact_url

REFUSAL = (
    "idempotency-proxy audit sends real, mutating requests to {url}: each probe may create "
    "a resource (a charge, an order) and some create several on purpose. Run it against a "
    "test environment, and add --yes to confirm."
)


def parse_header(text: str) -> tuple[str, str]:
    """`-H 'Name: value'`, as curl takes it."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip():
        raise ValueError(f'expected "Name: value", got "{text}"')
    return name, value.strip()


def load_data(text: str) -> bytes:
    """`--data '{...}'`, or `--data @file` as curl takes it."""
    if text.startswith("@"):
        return Path(text[1:]).read_bytes()
    return text.encode()


def main(options: AuditOptions, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """The `audit` command: refuse without --yes, else audit and return the exit status."""
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
