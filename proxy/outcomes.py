"""What the proxy did with a request: the `outcome` of metrics, logs and the tests.

One enum, so that a typo cannot create a new metric label or log value: the metrics module
pre-creates a series for every member, and the flow, the errors and the tests all name
members, never strings.
"""

from __future__ import annotations

from enum import StrEnum


class RequestOutcome(StrEnum):
    FORWARDED = "forwarded"  # first attempt, executed upstream and recorded
    REPLAYED = "replayed"  # retry answered from the store
    CONFLICT = "conflict"  # retry while the first attempt runs: 409
    WAITED = "waited"  # retry that waited for the first attempt and replayed it
    MISMATCH = "mismatch"  # same key, other request: 422
    MISSING_KEY = "missing_key"  # key required, none sent: 400
    INVALID_KEY = "invalid_key"  # key malformed: 400
    PASSTHROUGH = "passthrough"  # route or method not protected: streamed through
    UNPROTECTED = "unprotected"  # protected method without a key, forwarded anyway
    STORE_UNAVAILABLE = "store_unavailable"  # store down: 503 (fail_mode open: forwarded)
    UPSTREAM_ERROR = "upstream_error"  # upstream failed and nothing was stored for a key
    UNKNOWN_OUTCOME = "unknown_outcome"  # upstream timed out / dropped, or owner died: stored
    FENCED = "fenced"  # the record was taken over while we worked; our result was not stored
    TOO_LARGE = "too_large"  # request body over the limit (413), or a response too large to store
    RELEASED = "released"  # upstream answered a release status (429/503): returned, not stored
    EXPIRED = "expired"  # retry after the response's ttl, inside tombstone_ttl: 409, not executed
    # observe mode: forwarded, although enforcing would have answered it otherwise
    OBSERVED = "observed"
    BAD_REQUEST = "bad_request"  # the request itself was refused (target, framing, slow body)
