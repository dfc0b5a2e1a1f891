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
- `command`: the `audit` command (`main`) and its curl-style option readers.

This module re-exports their public names, so `from proxy import audit` sees one namespace.
"""

from __future__ import annotations

from proxy.audit.auditor import (
    MAX_BODY_READ,
    POLL_DEADLINE,
    POLL_MAX_DELAY,
    PREVIEW_CHARS,
    REQUEST_TIMEOUT,
    RETRY_PAUSE_MIN,
    Auditor,
    OutOfRequests,
)
from proxy.audit.command import (
    REFUSAL,
    load_data,
    main,
    parse_header,
)
from proxy.audit.inference import (
    BUSY_STATUSES,
    ID_FIELDS,
    LONG_KEY_LENGTH,
    REPLAY_HEADER,
    describe,
    executions,
    identify,
    judge_concurrent,
    judge_long_key,
    judge_mismatch,
    judge_no_key,
    judge_replay,
    judge_timeout,
)
from proxy.audit.model import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DATA,
    DEFAULT_KEY_HEADER,
    DEFAULT_MAX_REQUESTS,
    DEFAULT_METHOD,
    DEFAULT_TIMEOUT,
    LIMITS,
    VARIANT_FIELD,
    Attempt,
    AuditOptions,
    AuditReport,
    ProbeResult,
    Verdict,
)
from proxy.audit.probes import (
    PROBES,
    Probe,
    new_key,
    probe_concurrent,
    probe_long_key,
    probe_mismatch,
    probe_no_key,
    probe_replay,
    probe_timeout,
    run_audit,
    variant_body,
)
from proxy.audit.report import (
    format_report,
    write_json,
)

__all__ = [
    "BUSY_STATUSES",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DATA",
    "DEFAULT_KEY_HEADER",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_METHOD",
    "DEFAULT_TIMEOUT",
    "ID_FIELDS",
    "LIMITS",
    "LONG_KEY_LENGTH",
    "MAX_BODY_READ",
    "POLL_DEADLINE",
    "POLL_MAX_DELAY",
    "PREVIEW_CHARS",
    "PROBES",
    "REFUSAL",
    "REPLAY_HEADER",
    "REQUEST_TIMEOUT",
    "RETRY_PAUSE_MIN",
    "VARIANT_FIELD",
    "Attempt",
    "AuditOptions",
    "AuditReport",
    "Auditor",
    "OutOfRequests",
    "Probe",
    "ProbeResult",
    "Verdict",
    "describe",
    "executions",
    "format_report",
    "identify",
    "judge_concurrent",
    "judge_long_key",
    "judge_mismatch",
    "judge_no_key",
    "judge_replay",
    "judge_timeout",
    "load_data",
    "main",
    "new_key",
    "parse_header",
    "probe_concurrent",
    "probe_long_key",
    "probe_mismatch",
    "probe_no_key",
    "probe_replay",
    "probe_timeout",
    "run_audit",
    "variant_body",
    "write_json",
]
