"""Sending: `Auditor` sends the probes' requests and records each answer as an `Attempt`.

It owns the client side of the audit (headers, the key header, timeouts, the request budget,
reading a capped body) and decides nothing: the `judge_*` functions in `inference` do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time

import aiohttp
from multidict import CIMultiDict

from proxy.masking import redact_urls_in
from proxy.tools.audit.inference import BUSY_STATUSES, REPLAY_HEADER, identify, shorten
from proxy.tools.audit.model import Attempt, AuditOptions

# Every attempt that is not meant to time out gets this long.
REQUEST_TIMEOUT = 30.0
# A timed-out client's retry comes --timeout after it gave up (at least RETRY_PAUSE_MIN), as
# a client's backoff would; answers that say "still working" (409, 425, 429, 503) are then
# polled with a backoff up to POLL_MAX_DELAY (shorter than a proxy's Retry-After, to keep
# the audit short) until POLL_DEADLINE.
RETRY_PAUSE_MIN = 0.2
POLL_DEADLINE = 10.0
POLL_MAX_DELAY = 1.0
MAX_BODY_READ = 1024 * 1024
PREVIEW_CHARS = 200


class OutOfRequests(Exception):
    """--max-requests would be exceeded: the probe is skipped, not half run."""


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
        shown_key = None if key is None else shorten(key, 40)
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
                error=f"{type(exc).__name__}: {redact_urls_in(str(exc))}",  # may quote the URL
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
