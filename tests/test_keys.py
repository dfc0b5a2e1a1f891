"""Key parsing, scoping and fingerprinting: pure functions, no sockets."""

from __future__ import annotations

import pytest

from proxy.errors import InvalidKey
from proxy.keys import (
    STORAGE_PREFIX,
    fingerprint_request,
    parse_key,
    scope_of,
    storage_key,
)


@pytest.mark.parametrize(
    ("raw", "key"),
    [("abc", "abc"), ('"abc"', "abc"), (' "a b" ', "a b"), ('"a\\"b\\\\c"', 'a"b\\c'),
     ("x" * 255, "x" * 255), ('"' + "y" * 255 + '"', "y" * 255)],
)  # fmt: skip
def test_valid_keys(raw: str, key: str) -> None:
    """Bare and Structured Field string forms give the same key."""
    assert parse_key([raw]) == key


@pytest.mark.parametrize(
    ("values", "message"),
    [([], "sent once"), (["a", "a"], "sent once"), ([""], "empty"), (['""'], "empty"),
     (["x" * 256], "256 characters"), (["caf\u00e9"], "printable ASCII"),
     (["a\x7fb"], "printable ASCII"), (['"abc'], "closing quote"), (['"a\\nb"'], "escape"),
     (['"a"b'], "after its closing quote")],
)  # fmt: skip
def test_invalid_keys(values: list[str], message: str) -> None:
    """Malformed keys are refused with a reason a developer can act on."""
    with pytest.raises(InvalidKey, match=message):
        parse_key(values)


def test_fingerprint_separates_every_part() -> None:
    """Method, path, query and body each change the fingerprint; boundaries are unambiguous."""
    base = fingerprint_request("POST", "/a", "x=1", b"{}")
    assert base == fingerprint_request("POST", "/a", "x=1", b"{}")
    others = {
        fingerprint_request("PATCH", "/a", "x=1", b"{}"),
        fingerprint_request("POST", "/b", "x=1", b"{}"),
        fingerprint_request("POST", "/a", "x=2", b"{}"),
        fingerprint_request("POST", "/a", "x=1", b"[]"),
        fingerprint_request("POST", "/ax", "=1", b"{}"),
    }
    assert base not in others and len(others) == 5


def test_storage_key_hides_the_key_and_the_tenant() -> None:
    """Storage keys are hashes that differ by namespace, scope and key."""
    alice = scope_of([("Authorization", ["Bearer alice"])])
    bob = scope_of([("Authorization", ["Bearer bob"])])
    record = storage_key("ns", alice, "order-42")
    assert "order-42" not in record.store and "alice" not in record.store
    assert record.store == STORAGE_PREFIX + record.hash
    assert record == storage_key("ns", alice, "order-42")
    assert len({record, storage_key("ns", bob, "order-42"), storage_key("ns2", alice, "order-42"),
                storage_key("ns", alice, "order-43")}) == 4  # fmt: skip
    assert scope_of([("Authorization", ["a", "b"])]) != scope_of([("Authorization", ["ab"])])
