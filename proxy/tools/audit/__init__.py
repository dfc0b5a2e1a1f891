"""`idempotency-proxy audit URL`: does this endpoint survive duplicate delivery?

Most API tooling never sends the same request twice on purpose, so most teams do not know
what a retry does to their API. The audit does, with real requests: the same request twice
under one key, a burst of concurrent duplicates, a retry after a client timeout, the same
key with a different body, no key, an over-long key. For each probe it says what happened,
what a safe API (the IETF Idempotency-Key draft, Stripe) would have done, and a verdict.

Duplicate executions are inferred from the answers alone, since the audit cannot read the
API's database: two successful answers to one key that differ in their resource id (or, with
no id, in their bodies) and carry no `Idempotent-Replayed: true` marker are two executions.
`LIMITS` says where that inference can be wrong; the report repeats it.

The pure part (`identify`, the `judge_*` functions) decides; `Auditor` only sends. One module
per part:

- `model`: the options, attempts, probe results, report and verdicts, and `LIMITS`;
- `inference`: the pure functions of the answers (`identify`, `executions`, `judge_*`);
- `auditor`: `Auditor`, which sends within the request budget and records the answers;
- `probes`: the probes, in the order they run, and `run_audit`;
- `report`: the printed table and the `--json` document;
- `command`: the `audit` command: its options (`add_parser`) and `run`.

This module exports the command and the programmatic entry (`run_audit` with its
`AuditOptions`); everything else is imported from the module that defines it.
"""

from __future__ import annotations

from proxy.tools.audit.command import add_parser, run
from proxy.tools.audit.model import AuditOptions
from proxy.tools.audit.probes import run_audit

__all__ = ["AuditOptions", "add_parser", "run", "run_audit"]
