"""The inference: pure functions of the answers.

The audit cannot read the API's database, so whether a request ran twice is decided from the
answers alone: `identify` names what an answer created, `executions` lists the distinct results
that look like executions, and each `judge_*` turns one probe's attempts into a verdict, a
sentence saying what happened, and a count of duplicate executions. Plain values in, plain
values out, so the rules are tested without sockets.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.tools.audit.model import Attempt, Verdict

REPLAY_HEADER = "Idempotent-Replayed"
BUSY_STATUSES = frozenset({409, 425, 429, 503})
LONG_KEY_LENGTH = 300
# JSON fields that name the resource a request created, top level or under "data".
ID_FIELDS = ("id", "ID", "Id", "uuid", "_id")


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
        text += f" (id {shorten(attempt.resource_id)})"
    if attempt.replayed:
        text += " replayed"
    return text


def shorten(text: str, width: int = 24) -> str:
    """`text`, cut to `width` characters with an ellipsis if longer."""
    return text if len(text) <= width else text[: width - 3] + "..."


def count_statuses(attempts: Sequence[Attempt]) -> str:
    """`2x 201, 3x 409`: how the attempts were answered."""
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
    answered = f"{len(attempts)} at once: {count_statuses(attempts)}"
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
