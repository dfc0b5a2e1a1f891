"""The audit's data: what it is asked to do, what it sent and got back, what it concluded.

`AuditOptions` is the command's options, `Attempt` one request and its answer, `ProbeResult`
and `AuditReport` the verdicts. Sending, inference and the report all speak in these types, so
they live apart from all three. `LIMITS` is here because the JSON report carries it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from proxy import __version__

DEFAULT_METHOD = "POST"
DEFAULT_DATA = "{}"
DEFAULT_KEY_HEADER = "Idempotency-Key"
DEFAULT_TIMEOUT = 1.0
DEFAULT_CONCURRENCY = 5
DEFAULT_MAX_REQUESTS = 50
VARIANT_FIELD = "idempotency_audit_variant"

LIMITS = (
    "Duplicates are inferred from answers: an API whose answers carry no id and are the same "
    'byte for byte on every execution (say {"ok": true}) hides its duplicates; check its '
    "records for the audit's keys (they start with 'audit-').",
    "Without an id, bodies are compared: an API that deduplicates but renders a fresh "
    "timestamp into each answer, without a replay marker, looks like it executed twice.",
    "The timeout probe cannot see the first answer. When the retry is a new execution and a "
    "later attempt replays the retry, the first attempt either never executed or the API only "
    "records a key once a request finishes; the audit reports a warning, not a duplicate.",
    "A 4xx to the changed body may be the API's validation of the extra field "
    f"'{VARIANT_FIELD}' rather than a key check.",
    "Every probe sends real, mutating requests. Point the audit at a test environment.",
)


class Verdict(StrEnum):
    SAFE = "safe"
    WARNING = "warning"
    UNSAFE = "unsafe"


@dataclass(frozen=True, slots=True)
class AuditOptions:
    """What to audit and how hard; the `audit` command's options."""

    url: str
    method: str = DEFAULT_METHOD
    data: bytes = DEFAULT_DATA.encode()
    headers: tuple[tuple[str, str], ...] = ()
    key_header: str = DEFAULT_KEY_HEADER
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    max_requests: int = DEFAULT_MAX_REQUESTS
    json_path: str | None = None
    yes: bool = False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request the audit sent, and what came back."""

    label: str
    key: str | None
    status: int | None = None  # None: no HTTP answer (timed out, refused, reset)
    replayed: bool = False
    resource_id: str | None = None
    identity: str | None = None  # what two answers are compared by: id, else body digest
    body_sha256: str | None = None
    body_preview: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.status is not None and 200 <= self.status < 400

    @property
    def fresh(self) -> bool:
        """A successful answer that does not say it is a replay: it looks like an execution."""
        return self.succeeded and not self.replayed


@dataclass
class ProbeResult:
    name: str
    title: str
    expected: str
    verdict: Verdict = Verdict.WARNING
    happened: str = ""
    duplicates: int = 0  # executions beyond the first, as inferred from the answers
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class AuditReport:
    target: str
    method: str
    key_header: str
    probes: list[ProbeResult]
    requests_sent: int
    seconds: float
    options: dict[str, Any]

    @property
    def duplicates(self) -> int:
        return sum(p.duplicates for p in self.probes)

    @property
    def audited(self) -> bool:
        """Some request succeeded. If none did (a wrong URL, a 401), nothing was tested."""
        return any(a.succeeded for p in self.probes for a in p.attempts)

    @property
    def verdict(self) -> Verdict:
        verdicts = {p.verdict for p in self.probes}
        if Verdict.UNSAFE in verdicts:
            return Verdict.UNSAFE
        return Verdict.WARNING if Verdict.WARNING in verdicts else Verdict.SAFE

    @property
    def exit_code(self) -> int:
        """0: no duplicate execution seen; 1: one seen; 3: no request succeeded."""
        if not self.audited:
            return 3
        return 1 if self.verdict is Verdict.UNSAFE else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": f"idempotency-proxy audit {__version__}",
            "target": self.target,
            "method": self.method,
            "key_header": self.key_header,
            "options": self.options,
            "verdict": self.verdict.value,
            "exit_code": self.exit_code,
            "duplicate_executions": self.duplicates,
            "requests_sent": self.requests_sent,
            "seconds": round(self.seconds, 3),
            "probes": [asdict(p) for p in self.probes],
            "limits": list(LIMITS),
        }
