"""The store seam: the contract every backend keeps, and the values that cross it.

A record exists per (namespace, scope, key), addressed by a hashed storage key (see
`proxy.keys.storage_key`). It is either in flight (owned by one fencing token until its
lease deadline) or done (holding the outcome to replay). With a tombstone, a done record
outlives its response: for `tombstone` more seconds after its ttl only its fingerprint and
the outcome's kind and status are kept, so a late retry is told, never executed again.
Every transition is atomic in the backend and checks the token, so two proxies can never
both believe they own a key.

Times cross the seam as seconds (floats); backends measure leases with their own clock
(Redis: the server's `TIME`), so proxies with skewed clocks agree.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Literal, Protocol

OutcomeKind = Literal["response", "too_large", "unknown"]

# Fencing tokens only need to be unique: a random prefix per process and a counter. (No
# system call per request, unlike os.urandom; tokens never leave the proxy.)
_TOKEN_PREFIX = os.urandom(8).hex()
_token_serial = itertools.count()


def new_token() -> str:
    """A fencing token no other owner, in any process, has used."""
    return f"{_TOKEN_PREFIX}{next(_token_serial):x}"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response exactly as the first client received it."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """The terminal result of a key.

    `response`: replayable as stored. `too_large`: the upstream answered `response.status`
    but the body was too large to keep; retries get a problem, never a second execution.
    `unknown`: the first owner died mid-flight; nobody knows whether the upstream acted.
    """

    kind: OutcomeKind
    response: StoredResponse

    def size(self) -> int:
        return len(self.response.body) + sum(len(k) + len(v) + 4 for k, v in self.response.headers)


UNKNOWN_OUTCOME = Outcome("unknown", StoredResponse(0, (), b""))


@dataclass(frozen=True, slots=True)
class Acquired:
    """The caller owns the key with `token` and must forward, then complete or release.

    `takeover` is true when an expired lease of a dead owner was taken over.
    """

    token: str
    takeover: bool = False


@dataclass(frozen=True, slots=True)
class Replay:
    """The key is done: answer with its outcome.

    `age`, here and in `InProgress` and `Mismatch`: seconds since the key's first attempt
    began (its record was created), or None for a record that does not say. Observe mode
    reports it as the time between two attempts; it never changes a decision.
    """

    outcome: Outcome
    age: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class InProgress:
    """Another request owns the key; its lease runs for `retry_after` more seconds."""

    retry_after: float
    age: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was first used with a different request fingerprint."""

    age: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Expired:
    """The key was executed, but its response is past its ttl: only a tombstone is left,
    with the outcome's kind and status (0 when the outcome is unknown)."""

    kind: OutcomeKind
    status: int


Decision = Acquired | Replay | InProgress | Mismatch | Expired


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What an operator sees of a record (never the body itself)."""

    state: Literal["in_flight", "done"]
    fingerprint: str
    ttl_remaining: float | None
    lease_remaining: float | None = None
    outcome: OutcomeKind | None = None
    status: int | None = None
    body_bytes: int | None = None
    tombstone: bool = False  # done, response expired: only fingerprint, kind, status kept


class Store(Protocol):
    """An idempotency store. Every method raises `proxy.errors.StoreError` on failure."""

    async def begin(
        self, key: str, fingerprint: str, *, lease: float, ttl: float, takeover: bool,
        tombstone: float = 0.0,
    ) -> Decision:  # fmt: skip
        """Decide a request in one atomic step.

        - no record: create it in flight with a new token, lease and ttl -> `Acquired`;
        - fingerprint differs from the record's -> `Mismatch` (whatever the state, a
          tombstone's included);
        - done -> `Replay` of its outcome; once its response is past its ttl (a tombstone)
          -> `Expired` with the outcome's kind and status;
        - in flight, lease running -> `InProgress`;
        - in flight, lease expired (the owner died): with `takeover`, take the record
          with a new token and lease -> `Acquired(takeover=True)`; without, turn it into
          the terminal `UNKNOWN_OUTCOME` -> `Replay`, which is kept as a tombstone for
          `tombstone` seconds after the record's ttl.

        `Replay`, `InProgress` and `Mismatch` carry the record's `age` (since its creation;
        a takeover keeps it). A record created or taken over is kept for at least its new
        lease, even when less of its ttl is left (or `lease` exceeds `ttl`): it never expires
        under its owner.
        """
        ...

    async def renew(self, key: str, token: str, *, lease: float) -> bool:
        """Extend the lease to now + `lease` if `token` still owns the in-flight record.

        The record is kept for at least that lease, past its ttl if need be.
        """
        ...

    async def complete(
        self, key: str, token: str, outcome: Outcome, *, ttl: float, tombstone: float = 0.0
    ) -> bool:
        """Store `outcome` (done, kept `ttl`) if `token` still owns the in-flight record.

        With `tombstone`, the record outlives its response by that many seconds, holding
        only its fingerprint and the outcome's kind and status (`begin` answers `Expired`).

        Returns False, storing nothing, when the token was fenced out by a takeover or the
        record became "outcome unknown". Completing again with the same token after it
        succeeded returns True and changes nothing (a retry whose first answer was lost).
        """
        ...

    async def release(self, key: str, token: str) -> bool:
        """Delete the in-flight record if `token` owns it: the request was never delivered."""
        ...

    async def ping(self) -> None:
        """Return when the store answers; raise `StoreError` when it does not."""
        ...

    async def inspect(self, key: str) -> RecordInfo | None:
        """The record at `key`, or None."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the record at `key` whatever its state (an operator's decision)."""
        ...

    async def counts(self) -> dict[str, int]:
        """How many records there are, by state (`in_flight`, `done`)."""
        ...

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""
        ...
