"""Property-based fuzzing of the proxy listener (see tests/fuzzing.py for what each case
must satisfy, tests/fuzz_cases.py for what the cases are).

A bounded, derandomized number of cases per property runs here, so CI sees the same cases
every time; bench/fuzz runs the same properties with many more.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given

from tests.fuzz_cases import PROPERTIES
from tests.fuzzing import Fuzzer, fuzz_settings, running_fuzzer

# Shrinking a failure takes many more cases (at most 30 s of them, see tests/fuzzing.py).
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[Fuzzer]:
    with running_fuzzer() as running:
        yield running


def _property(name: str, examples: int) -> Any:
    """The property `name` as a test of `examples` cases (about 10-30 ms each on an idle
    machine, most of it hypothesis's own work)."""
    strategy, check = PROPERTIES[name]

    @fuzz_settings(examples)
    @given(case=strategy)
    def test(fuzzer: Fuzzer, case: Any) -> None:
        check(fuzzer, case)

    test.__doc__ = check.__doc__
    return test


# More cases where the search space is wide, fewer where a case costs more.
test_request_targets_reach_only_the_upstream = _property("reach", 60)
test_request_targets = _property("targets", 50)
test_header_fields = _property("fields", 30)
test_idempotency_keys = _property("keys", 40)
test_body_framing = _property("framing", 50)
test_upstream_header_fields = _property("upstream_fields", 40)
test_store_down = _property("store_down", 30)
