"""The canonical form of a request body, for routes whose clients re-serialise on retry.

A client that retries may send the same JSON with another key order or other whitespace, or
put a fresh timestamp or nonce in every attempt. Under `fingerprint.body: canonical` such
bodies fingerprint alike: JSON in its RFC 8785 (JCS) form, without the fields named in
`fingerprint.ignore`, and a form body as its pairs ordered by name. Only the fingerprint
changes: the bytes forwarded upstream and the stored response are the client's and the
upstream's own.

Where a body cannot be put in canonical form without losing something, it is fingerprinted
as raw bytes, never refused: a body that claims JSON but does not parse, or that holds a
duplicate member name, a number the JCS domain cannot hold exactly (an integer past 2**53, a
decimal with more digits than a double keeps, NaN) or a lone surrogate. Two requests that
differ in such a detail then never count as the same request.

The canonical serialiser is `rfc8785` (Trail of Bits): number formatting as ECMAScript's,
members ordered by UTF-16 code units, as the RFC requires.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

import rfc8785

from proxy.config import FingerprintPolicy

FORM = "application/x-www-form-urlencoded"
# Distinct hash functions (BLAKE2 personalisation) for each canonical form: a canonical
# fingerprint can never equal the raw fingerprint of some other body's bytes.
JSON_PERSON = b"idp-jcs"
FORM_PERSON = b"idp-form"


class _NotCanonical(ValueError):
    """The body holds something its canonical form would lose."""


def is_json(content_type: str) -> bool:
    """`application/json` or any `+json` media type, parameters aside."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.endswith("+json") and "/" in media)


def canonical_body(
    policy: FingerprintPolicy, content_type: str, body: bytes
) -> tuple[bytes, bytes] | None:
    """(hash personalisation, canonical bytes) of `body`, or None: fingerprint it raw."""
    if policy.body != "canonical":
        return None
    if is_json(content_type):
        canonical = canonical_json(body, policy.paths)
        return None if canonical is None else (JSON_PERSON, canonical)
    if content_type.partition(";")[0].strip().lower() == FORM:
        framed = bytearray()
        for name, value in form_pairs(body):
            for part in (name, value):
                framed += len(part).to_bytes(4, "big")
                framed += part
        return FORM_PERSON, bytes(framed)
    return None


def canonical_json(body: bytes, ignore: tuple[tuple[str, ...], ...] = ()) -> bytes | None:
    """`body` in RFC 8785 form without the `ignore`d members, or None when it cannot be."""
    try:
        document = json.loads(body, object_pairs_hook=_object, parse_float=_exact_float)
        for path in ignore:
            _leave_out(document, path)
        return rfc8785.dumps(document)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, rfc8785's
        return None


def form_pairs(body: bytes) -> list[tuple[bytes, bytes]]:
    """The pairs of a form body, ordered by name; repeated names keep their order (`a=1&a=2`
    is a list to most servers, so it is not the same request as `a=2&a=1`).

    Latin-1 maps every byte to one character, so decoding loses nothing, and `%41` and `A`
    are the same pair, as they are to the server.
    """
    pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True, encoding="latin-1")
    pairs.sort(key=lambda pair: pair[0])  # stable: values of one name keep their order
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _NotCanonical("duplicate member name")
    return members


def _exact_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused when a double cannot hold it."""
    value = float(text)
    if repr(value) != text and Decimal(repr(value)) != Decimal(text):  # the first is cheap
        raise _NotCanonical("number not exactly representable")
    return value


def _leave_out(document: Any, path: tuple[str, ...]) -> None:
    """Remove the member at `path`; an array element is replaced by null, so that the other
    elements keep their positions. A path that is not there changes nothing."""
    node = document
    for depth, token in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, dict):
            if token not in node:
                return
            if last:
                del node[token]
                return
            node = node[token]
        elif isinstance(node, list):
            index = _index(token)
            if index is None or index >= len(node):
                return
            if last:
                node[index] = None
                return
            node = node[index]
        else:
            return


def _index(token: str) -> int | None:
    """An RFC 6901 array index ("0", or digits without a leading zero), or None."""
    if token.isdigit() and token.isascii() and (token == "0" or token[0] != "0"):
        return int(token)
    return None
