"""Pure decisions about the key: parse it, scope it, fingerprint the request.

Nothing here touches a socket or the loop, so each rule of the behaviour table that is
about the key can be tested with plain values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.config import KEY_MAX_LENGTH, RAW_FINGERPRINT, FingerprintPolicy
from proxy.errors import InvalidKey
from proxy.fingerprints import canonical_body

STORAGE_PREFIX = "idp:"


@dataclass(frozen=True, slots=True)
class RecordKey:
    """Where a key's record lives: `store` addresses it in the store, `hash` names it in logs,
    metrics and the admin API (never the raw key or tenant)."""

    hash: str

    @property
    def store(self) -> str:
        return STORAGE_PREFIX + self.hash


def parse_key(values: Sequence[str], header: str = "Idempotency-Key") -> str:
    """The key from the header's values, or `InvalidKey` saying what is wrong.

    `values` are every occurrence of the header (a key sent twice is ambiguous and
    refused). A Structured Field string (`"abc"`) is unquoted first: the quotes are not
    part of the key and do not count towards its length.
    """
    if len(values) != 1:
        raise InvalidKey(f"{header} must be sent once; it was sent {len(values)} times")
    raw = values[0].strip(" \t")
    key = _unquote(raw, header) if raw.startswith('"') else raw
    if not key:
        raise InvalidKey(f"{header} is empty")
    if len(key) > KEY_MAX_LENGTH:
        raise InvalidKey(
            f"{header} is {len(key)} characters long; at most {KEY_MAX_LENGTH} are allowed"
        )
    for char in key:
        if not " " <= char <= "~":
            raise InvalidKey(
                f"{header} may only contain printable ASCII characters; found {char!r}"
            )
    return key


def _unquote(raw: str, header: str) -> str:
    """Decode an RFC 8941 sf-string: `"` ... `"` with `\\"` and `\\\\` escapes."""
    out: list[str] = []
    index = 1
    while index < len(raw):
        char = raw[index]
        if char == "\\":
            if index + 1 >= len(raw) or raw[index + 1] not in '"\\':
                raise InvalidKey(f"{header} is a quoted string with an invalid escape")
            out.append(raw[index + 1])
            index += 2
            continue
        if char == '"':
            if raw[index + 1 :].strip(" \t"):
                raise InvalidKey(f"{header} has characters after its closing quote")
            return "".join(out)
        out.append(char)
        index += 1
    raise InvalidKey(f"{header} is a quoted string without its closing quote")


def fingerprint_request(
    method: str, path: str, query: str, body: bytes, content_type: str = "",
    policy: FingerprintPolicy = RAW_FINGERPRINT,
) -> str:  # fmt: skip
    """What makes two requests "the same request": method, path, query and body.

    The body enters as its bytes, or, under `policy.body: canonical`, in the canonical form
    its `content_type` has (`proxy.fingerprints`), hashed with a function of its own.
    """
    canonical = None if policy.body == "raw" else canonical_body(policy, content_type, body)
    if canonical is None:
        digest = hashlib.blake2b(digest_size=16)
    else:
        digest = hashlib.blake2b(digest_size=16, person=canonical[0])
        body = canonical[1]
    for part in (method.encode(), path.encode("utf-8", "surrogateescape"),
                 query.encode("utf-8", "surrogateescape")):  # fmt: skip
        digest.update(len(part).to_bytes(4, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()


def scope_of(header_values: Iterable[tuple[str, Sequence[str]]]) -> bytes:
    """The tenant a key belongs to: the values of the route's scope headers.

    Returns raw bytes that only ever feed a hash; a credential never leaves this process.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, values in header_values:
        for part in (name.lower(), *values):
            data = part.encode("utf-8", "surrogateescape")
            digest.update(len(data).to_bytes(4, "big"))
            digest.update(data)
        digest.update(b"\x00")
    return digest.digest()


def storage_key(namespace: str, scope: bytes, key: str) -> RecordKey:
    """The record of a key: a hash, never the raw key or scope values."""
    digest = hashlib.blake2b(digest_size=20)
    ns = namespace.encode()
    digest.update(len(ns).to_bytes(4, "big"))
    digest.update(ns)
    digest.update(scope)
    digest.update(key.encode())
    return RecordKey(digest.hexdigest())
