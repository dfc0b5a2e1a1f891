"""The audit's report: the table and verdict it prints, and the `--json FILE` document.

Rendering only: the verdicts come from `inference`, the data from `model`.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Sequence
from pathlib import Path

from proxy.tools.audit.inference import count_statuses
from proxy.tools.audit.model import AuditReport, Verdict

_COLUMNS = (("PROBE", 16), ("VERDICT", 7), ("WHAT HAPPENED", 42), ("A SAFE API WOULD", 29))
_WIDTH = sum(width for _, width in _COLUMNS) + 2 * (len(_COLUMNS) - 1)


def format_report(report: AuditReport) -> str:
    """The table and the verdict, as printed."""
    options = report.options
    lines = [
        f"idempotency-proxy audit: {report.method} {report.target}",
        textwrap.fill(
            f"key header {report.key_header}, client timeout {options['timeout']:g} s, "
            f"{options['concurrency']} concurrent duplicates; {report.requests_sent} requests "
            f"sent in {report.seconds:.1f} s",
            width=_WIDTH,
        ),
        "",
        _row([name for name, _ in _COLUMNS]),
    ]
    for probe in report.probes:
        cells = [probe.title, probe.verdict.value.upper(), probe.happened, probe.expected]
        lines += [_row(cells), ""]
    unsafe = [p for p in report.probes if p.verdict is Verdict.UNSAFE]
    warnings = [p for p in report.probes if p.verdict is Verdict.WARNING]
    if not report.audited:
        attempts = [a for p in report.probes for a in p.attempts]
        errors = sorted({a.error for a in attempts if a.error})
        answers = count_statuses([a for a in attempts if a.status is not None]) or "none"
        verdict = (
            "Verdict: COULD NOT AUDIT: no request succeeded, so nothing was tested. "
            f"Answers: {answers}. " + (f"Errors: {'; '.join(errors)}." if errors else "")
        )
    elif unsafe:
        verdict = (
            f"Verdict: UNSAFE: duplicate execution in {len(unsafe)} of {len(report.probes)} "
            f"probes ({report.duplicates} extra executions inferred). A retry here can do the "
            "work twice."
        )
    elif warnings:
        verdict = f"Verdict: no duplicate execution seen; {len(warnings)} warning(s)."
    else:
        verdict = (
            "Verdict: SAFE: no duplicate execution seen; every probe behaved as a safe API would."
        )
    lines.append(textwrap.fill(verdict, width=_WIDTH))
    lines.append(
        textwrap.fill(
            f"Exit status {report.exit_code}. Inferred from the answers only: --json writes "
            "every attempt and the limits of the inference.",
            width=_WIDTH,
        )
    )
    return "\n".join(lines) + "\n"


def _row(cells: Sequence[str]) -> str:
    wrapped = [
        textwrap.wrap(cell, width) or [""] for cell, (_, width) in zip(cells, _COLUMNS, strict=True)
    ]
    height = max(len(w) for w in wrapped)
    out = []
    for line in range(height):
        parts = [
            (w[line] if line < len(w) else "").ljust(width)
            for w, (_, width) in zip(wrapped, _COLUMNS, strict=True)
        ]
        out.append("  ".join(parts).rstrip())
    return "\n".join(out)


def write_json(report: AuditReport, path: str) -> None:
    """The `--json FILE` report: every attempt, every verdict, and the limits of inference."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
