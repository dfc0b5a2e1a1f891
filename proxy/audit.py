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

The pure part (`identify`, the `judge_*` functions) decides; `Auditor` only sends.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import __version__
from proxy.config import KEY_MAX_LENGTH

DEFAULT_METHOD = "POST"
DEFAULT_DATA = "{}"
DEFAULT_KEY_HEADER = "Idempotency-Key"
DEFAULT_TIMEOUT = 1.0
DEFAULT_CONCURRENCY = 5
DEFAULT_MAX_REQUESTS = 50
REPLAY_HEADER = "Idempotent-Replayed"
# Every attempt that is not meant to time out gets this long.
REQUEST_TIMEOUT = 30.0
# A timed-out client's retry comes --timeout after it gave up (at least RETRY_PAUSE_MIN), as
# a client's backoff would; answers that say "still working" (409, 425, 429, 503) are then
# polled with a backoff up to POLL_MAX_DELAY (shorter than a proxy's Retry-After, to keep
# the audit short) until POLL_DEADLINE.
RETRY_PAUSE_MIN = 0.2
POLL_DEADLINE = 10.0
POLL_MAX_DELAY = 1.0
BUSY_STATUSES = frozenset({409, 425, 429, 503})
LONG_KEY_LENGTH = 300
MAX_BODY_READ = 1024 * 1024
PREVIEW_CHARS = 200
# JSON fields that name the resource a request created, top level or under "data".
ID_FIELDS = ("id", "ID", "Id", "uuid", "_id")
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


# --- the inference: pure functions of the answers -------------------------------------


def identify(
    body: bytes, headers: CIMultiDictProxy[str] | CIMultiDict[str]
) -> tuple[str | None, str]:
    """The resource id an answer names (JSON id field, else Location), and its identity."""
    resource = _json_id(body) or headers.get("Location")
    if resource:
        return resource, f"id {resource}"
    return None, "body sha256:" + hashlib.sha256(body).hexdigest()[:16]


def _json_id(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict):
        return None
    for candidate in (document, document.get("data")):
        if isinstance(candidate, dict):
            for name in ID_FIELDS:
                value = candidate.get(name)
                if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                    return str(value)
    return None


def executions(attempts: Iterable[Attempt]) -> list[str]:
    """The distinct identities of answers that look like executions, in order of arrival."""
    seen: list[str] = []
    for attempt in attempts:
        if attempt.fresh and attempt.identity is not None and attempt.identity not in seen:
            seen.append(attempt.identity)
    return seen


def describe(attempt: Attempt) -> str:
    """`201 (id ch_12...)`, `409`, `timed out after 0.5 s`: one answer in a few words."""
    if attempt.status is None:
        return attempt.error or "no answer"
    text = str(attempt.status)
    if attempt.resource_id:
        text += f" (id {_short(attempt.resource_id)})"
    if attempt.replayed:
        text += " replayed"
    return text


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _statuses(attempts: Sequence[Attempt]) -> str:
    counts = Counter(str(a.status) if a.status is not None else "no answer" for a in attempts)
    return ", ".join(f"{n}x {status}" for status, n in sorted(counts.items()))


def judge_replay(first: Attempt, second: Attempt) -> tuple[Verdict, str, int]:
    """The same request twice, one key, the second sent after the first finished."""
    if not first.succeeded:
        return Verdict.WARNING, f"first attempt: {describe(first)}; nothing to compare", 0
    ran = executions([first, second])
    if len(ran) > 1:
        return (
            Verdict.UNSAFE,
            f"{describe(first)}, then {describe(second)} with a different "
            "result and no replay marker: executed twice",
            1,
        )
    if second.replayed:
        same = "same body" if second.body_sha256 == first.body_sha256 else "a different body"
        verdict = Verdict.SAFE if second.body_sha256 == first.body_sha256 else Verdict.WARNING
        return verdict, f"{describe(first)}, then {describe(second)} with {same}", 0
    if second.fresh:
        return (
            Verdict.SAFE,
            f"{describe(first)}, then the same answer again, but without "
            f"{REPLAY_HEADER}: a client cannot tell it was a replay",
            0,
        )
    if second.status is not None and 400 <= second.status < 500:
        return (
            Verdict.WARNING,
            f"{describe(first)}, then {describe(second)}: not executed "
            "twice, but a client that lost the first answer can never learn it",
            0,
        )
    return Verdict.WARNING, f"{describe(first)}, then {describe(second)}", 0


def judge_concurrent(attempts: Sequence[Attempt]) -> tuple[Verdict, str, int]:
    """N duplicates sent at the same moment under one key."""
    ran = executions(attempts)
    answered = f"{len(attempts)} at once: {_statuses(attempts)}"
    if len(ran) > 1:
        return (
            Verdict.UNSAFE,
            f"{answered}; {len(ran)} different results without a replay "
            f"marker: executed {len(ran)} times",
            len(ran) - 1,
        )
    if not ran and not any(a.replayed and a.succeeded for a in attempts):
        return Verdict.WARNING, f"{answered}; none succeeded, nothing to compare", 0
    return Verdict.SAFE, f"{answered}; one result, executed once", 0


def judge_timeout(
    first: Attempt, retries: Sequence[Attempt], confirm: Attempt | None, timeout: float
) -> tuple[Verdict, str, int]:
    """A retry after the client gave up on the first attempt (which it cannot see)."""
    if not retries:
        return Verdict.WARNING, f"first attempt: {describe(first)}; no retry sent", 0
    retry = retries[-1]
    polled = f" (after {len(retries) - 1} x 'still working')" if len(retries) > 1 else ""
    if not first.timed_out:
        if first.status is None:
            return Verdict.WARNING, f"first attempt failed: {describe(first)}", 0
        verdict, text, extra = judge_replay(first, retry)
        return (
            verdict,
            f"not provoked: the first attempt answered within {timeout:g} s (a lower "
            f"--timeout provokes one). {text}",
            extra,
        )
    head = f"first attempt timed out after {timeout:g} s; retry{polled}: {describe(retry)}"
    if retry.replayed and retry.succeeded:
        return Verdict.SAFE, f"{head}: the first attempt's result", 0
    if retry.status in BUSY_STATUSES:
        return Verdict.WARNING, f"{head}: still busy when the audit stopped polling", 0
    if not retry.fresh:
        return Verdict.WARNING, f"{head}: the retry failed, so nothing to compare", 0
    if confirm is None:
        return (
            Verdict.WARNING,
            f"{head}: a new execution, unless the first attempt never "
            "ran; no request budget left to check",
            0,
        )
    if len(executions([retry, confirm])) > 1:
        return (
            Verdict.UNSAFE,
            f"{head}, a new execution; one more attempt ran yet again, {describe(confirm)}: "
            "the key is ignored, so the timed-out attempt (sent in full) surely ran too",
            1,
        )
    return (
        Verdict.WARNING,
        f"{head}, a new execution without a replay marker, which later "
        "attempts replay: either the timed-out attempt never ran, or the API records a "
        "key only when a request finishes and ran it twice",
        0,
    )


def judge_mismatch(first: Attempt, second: Attempt) -> tuple[Verdict, str, int]:
    """The same key with a different body: a client bug that must not be papered over."""
    if not first.succeeded:
        return Verdict.WARNING, f"first attempt: {describe(first)}; nothing to compare", 0
    head = f"{describe(first)}, then {describe(second)} for the different body"
    if second.status == 422:
        return Verdict.SAFE, f"{head}: rejected", 0
    if second.status is not None and 400 <= second.status < 500:
        return Verdict.WARNING, f"{head}: rejected, but not with 422", 0
    if second.replayed or (second.succeeded and second.identity == first.identity):
        return (
            Verdict.WARNING,
            f"{head}: the first request's answer, so the second request was silently dropped",
            0,
        )
    if second.fresh:
        return Verdict.WARNING, f"{head}: executed; the key is not bound to its request", 0
    return Verdict.WARNING, head, 0


def judge_no_key(attempt: Attempt, earlier: dict[str, str]) -> tuple[Verdict, str, int]:
    """A request without a key. `earlier` maps identities seen so far to their keys."""
    if attempt.status == 400:
        return Verdict.SAFE, "400: this endpoint requires a key", 0
    # Only ids count here: equal bodies without an id may just be a constant answer.
    if attempt.fresh and attempt.resource_id is not None and attempt.identity in earlier:
        return (
            Verdict.WARNING,
            f"{describe(attempt)}: the answer of an earlier request with "
            "the same body: deduplicated by body, not by key",
            0,
        )
    if attempt.succeeded:
        return (
            Verdict.WARNING,
            f"{describe(attempt)}: executed; a client that forgets the key "
            "gets no protection (the proxy: require_key: true)",
            0,
        )
    return Verdict.WARNING, describe(attempt), 0


def judge_long_key(attempt: Attempt) -> tuple[Verdict, str, int]:
    """A key longer than the 255 characters the draft's implementations accept."""
    if attempt.status == 400:
        return Verdict.SAFE, f"400: a {LONG_KEY_LENGTH}-character key is refused", 0
    if attempt.succeeded:
        return (
            Verdict.WARNING,
            f"{describe(attempt)}: a {LONG_KEY_LENGTH}-character key was "
            "accepted; if it is truncated when stored, different requests collide",
            0,
        )
    return Verdict.WARNING, describe(attempt), 0


# --- sending ---------------------------------------------------------------------------


class OutOfRequests(Exception):
    """--max-requests would be exceeded: the probe is skipped, not half run."""


def variant_body(data: bytes) -> bytes:
    """A body that differs from `data` in meaning, not only in bytes."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict):
        return json.dumps({**document, VARIANT_FIELD: os.urandom(4).hex()}).encode()
    if b"=" in data:
        return data + f"&{VARIANT_FIELD}=1".encode()
    return data + f"\n{VARIANT_FIELD}".encode()


def new_key(probe: str) -> str:
    return f"audit-{probe}-{os.urandom(8).hex()}"


class Auditor:
    """Sends the probes' requests within the request budget and records the answers."""

    def __init__(self, session: aiohttp.ClientSession, options: AuditOptions) -> None:
        self.session = session
        self.options = options
        self.sent = 0
        # Identity of every answer that looked like an execution -> the key it was sent with.
        self.seen: dict[str, str] = {}
        self.headers = CIMultiDict(options.headers)
        if "Content-Type" not in self.headers and options.data:
            try:
                json.loads(options.data)
            except (ValueError, UnicodeDecodeError):
                self.headers["Content-Type"] = "application/x-www-form-urlencoded"  # as curl
            else:
                self.headers["Content-Type"] = "application/json"

    def ensure(self, count: int) -> None:
        """Refuse to start a probe that could not send all of its first `count` requests."""
        if self.sent + count > self.options.max_requests:
            raise OutOfRequests(f"--max-requests {self.options.max_requests} reached")

    async def send(
        self,
        label: str,
        key: str | None,
        body: bytes | None = None,
        read_timeout: float | None = None,
    ) -> Attempt:
        """One request; `read_timeout` gives up that long after the request was sent in full."""
        self.ensure(1)
        self.sent += 1
        attempt = await self._send(label, key, body, read_timeout)
        if attempt.fresh and attempt.identity is not None and key is not None:
            self.seen.setdefault(attempt.identity, key)
        return attempt

    async def _send(
        self, label: str, key: str | None, body: bytes | None, read_timeout: float | None
    ) -> Attempt:
        headers = self.headers.copy()
        headers.popall(self.options.key_header, None)
        if key is not None:
            headers[self.options.key_header] = key
        # sock_read starts once the body is written, so a timeout means "delivered, no answer".
        timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT, sock_read=read_timeout)
            if read_timeout is not None
            else aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        )
        shown_key = None if key is None else _short(key, 40)
        started = time.perf_counter()
        try:
            async with self.session.request(
                self.options.method,
                self.options.url,
                headers=headers,
                timeout=timeout,
                data=self.options.data if body is None else body,
                allow_redirects=False,
            ) as response:
                content = await _read_capped(response)
                resource, identity = identify(content, response.headers)
                return Attempt(
                    label,
                    shown_key,
                    response.status,
                    replayed=response.headers.get(REPLAY_HEADER, "").strip().lower() == "true",
                    resource_id=resource,
                    identity=identity,
                    body_sha256=hashlib.sha256(content).hexdigest(),
                    body_preview=content[:PREVIEW_CHARS].decode("utf-8", "replace"),
                    seconds=round(time.perf_counter() - started, 4),
                )
        except TimeoutError:
            limit = read_timeout if read_timeout is not None else REQUEST_TIMEOUT
            return Attempt(
                label,
                shown_key,
                seconds=round(time.perf_counter() - started, 4),
                timed_out=True,
                error=f"timed out after {limit:g} s",
            )
        except aiohttp.ClientError as exc:
            return Attempt(
                label,
                shown_key,
                seconds=round(time.perf_counter() - started, 4),
                error=f"{type(exc).__name__}: {exc}",
            )

    async def send_until_settled(self, label: str, key: str, deadline: float) -> list[Attempt]:
        """Retry while the answer says "still working", as a patient client would."""
        attempts: list[Attempt] = []
        delay = 0.1
        while True:
            attempt = await self.send(f"{label} #{len(attempts) + 1}", key)
            attempts.append(attempt)
            if attempt.status not in BUSY_STATUSES or time.monotonic() >= deadline:
                return attempts
            if self.sent >= self.options.max_requests:
                return attempts  # out of budget: judge what we have
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, POLL_MAX_DELAY)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_BODY_READ:
            break
    return b"".join(chunks)[:MAX_BODY_READ]


# --- the probes, in the order they run -------------------------------------------------


async def probe_replay(auditor: Auditor, probe: ProbeResult) -> None:
    key = new_key("replay")
    auditor.ensure(2)
    first = await auditor.send("first attempt", key)
    second = await auditor.send("second attempt", key)
    probe.attempts += [first, second]
    probe.verdict, probe.happened, probe.duplicates = judge_replay(first, second)


async def probe_concurrent(auditor: Auditor, probe: ProbeResult) -> None:
    key = new_key("concurrent")
    count = auditor.options.concurrency
    auditor.ensure(count)
    attempts = await asyncio.gather(
        *(auditor.send(f"duplicate {n + 1}", key) for n in range(count))
    )
    probe.attempts += attempts
    probe.verdict, probe.happened, probe.duplicates = judge_concurrent(attempts)


async def probe_timeout(auditor: Auditor, probe: ProbeResult) -> None:
    key = new_key("timeout")
    timeout = auditor.options.timeout
    auditor.ensure(2)
    first = await auditor.send("first attempt (client gives up)", key, read_timeout=timeout)
    probe.attempts.append(first)
    if first.timed_out:
        await asyncio.sleep(max(RETRY_PAUSE_MIN, timeout))
    retries = await auditor.send_until_settled("retry", key, time.monotonic() + POLL_DEADLINE)
    probe.attempts += retries
    confirm = None
    # A fresh answer to the retry is a second execution only if the first attempt ran: ask
    # once more, to tell an API that ignores the key from one that merely lost the first.
    if first.timed_out and retries[-1].fresh and auditor.sent < auditor.options.max_requests:
        confirm = await auditor.send("one more attempt, same key", key)
        probe.attempts.append(confirm)
    probe.verdict, probe.happened, probe.duplicates = judge_timeout(
        first, retries, confirm, timeout
    )


async def probe_mismatch(auditor: Auditor, probe: ProbeResult) -> None:
    key = new_key("mismatch")
    auditor.ensure(2)
    first = await auditor.send("first attempt", key)
    second = await auditor.send(
        "same key, different body", key, body=variant_body(auditor.options.data)
    )
    probe.attempts += [first, second]
    probe.verdict, probe.happened, probe.duplicates = judge_mismatch(first, second)


async def probe_no_key(auditor: Auditor, probe: ProbeResult) -> None:
    attempt = await auditor.send("no key", None)
    probe.attempts.append(attempt)
    probe.verdict, probe.happened, probe.duplicates = judge_no_key(attempt, auditor.seen)


async def probe_long_key(auditor: Auditor, probe: ProbeResult) -> None:
    key = new_key("long")
    key += "x" * (LONG_KEY_LENGTH - len(key))
    attempt = await auditor.send(f"{LONG_KEY_LENGTH}-character key", key)
    probe.attempts.append(attempt)
    probe.verdict, probe.happened, probe.duplicates = judge_long_key(attempt)


Probe = Callable[[Auditor, ProbeResult], Awaitable[None]]

# name, title, what a safe API would do, the probe; in the order they run.
PROBES: tuple[tuple[str, str, str, Probe], ...] = (
    (
        "replay",
        "same key twice",
        f"answer the second with the first answer: same status and body, {REPLAY_HEADER}: true",
        probe_replay,
    ),
    (
        "concurrent",
        "concurrent duplicates",
        "execute one; answer the others 409 (retry later), or wait and replay its answer",
        probe_concurrent,
    ),
    (
        "timeout",
        "retry after timeout",
        "replay the first attempt's result, or 409 while it still runs; never run it again",
        probe_timeout,
    ),
    (
        "mismatch",
        "same key, new body",
        "422: the key was used for a different request; nothing executed",
        probe_mismatch,
    ),
    (
        "no-key",
        "no key",
        "execute as usual where keys are optional, or 400 where they are required",
        probe_no_key,
    ),
    (
        "long-key",
        "over-long key",
        f"400: keys are at most {KEY_MAX_LENGTH} characters (Stripe, this proxy)",
        probe_long_key,
    ),
)


async def run_audit(options: AuditOptions, out: TextIO | None = None) -> AuditReport:
    """Run every probe against `options.url`; print the table to `out`, if given."""
    started = time.perf_counter()
    results: list[ProbeResult] = []
    connector = aiohttp.TCPConnector(limit=options.concurrency + 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        auditor = Auditor(session, options)
        for name, title, expected, probe in PROBES:
            result = ProbeResult(name, title, expected)
            results.append(result)
            try:
                await probe(auditor, result)
            except OutOfRequests as exc:
                result.verdict, result.happened = Verdict.WARNING, f"not run: {exc}"
    report = AuditReport(
        target=options.url,
        method=options.method,
        key_header=options.key_header,
        probes=results,
        requests_sent=auditor.sent,
        seconds=round(time.perf_counter() - started, 4),
        options={
            "timeout": options.timeout,
            "concurrency": options.concurrency,
            "max_requests": options.max_requests,
            # Names only: header values may be credentials.
            "headers": [name for name, _ in options.headers],
        },
    )
    if out is not None:
        out.write(format_report(report))
    return report


def write_json(report: AuditReport, path: str) -> None:
    """The `--json FILE` report: every attempt, every verdict, and the limits of inference."""
    Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")


# --- the printed report ------------------------------------------------------------------

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
        answers = _statuses([a for a in attempts if a.status is not None]) or "none"
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


# --- the command ---------------------------------------------------------------------------

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
        print(REFUSAL.format(url=options.url), file=err)
        return 2
    try:
        report = asyncio.run(run_audit(options, out))
    except KeyboardInterrupt:
        return 130
    if options.json_path is not None:
        write_json(report, options.json_path)
    return report.exit_code
