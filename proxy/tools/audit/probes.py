"""The probes, in the order they run, and `run_audit`, which runs them all.

Each probe is one way a request reaches an API twice (the same key twice, concurrent
duplicates, a retry after a client timeout, the same key with a new body, no key, an over-long
key): it sends its requests through the `Auditor` and hands the answers to its `judge_*`
function. `PROBES` pairs each with what a safe API would do.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import TextIO

import aiohttp

from proxy.config import KEY_MAX_LENGTH
from proxy.masking import redact_url
from proxy.tools.audit.auditor import POLL_DEADLINE, RETRY_PAUSE_MIN, Auditor, OutOfRequests
from proxy.tools.audit.inference import (
    LONG_KEY_LENGTH,
    REPLAY_HEADER,
    judge_concurrent,
    judge_long_key,
    judge_mismatch,
    judge_no_key,
    judge_replay,
    judge_timeout,
)
from proxy.tools.audit.model import VARIANT_FIELD, AuditOptions, AuditReport, ProbeResult, Verdict
from proxy.tools.audit.report import format_report


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
        target=redact_url(options.url),  # the report gets shared: no credentials in it
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
