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

# Cases per property in the default suite: about 10 ms each on an idle machine.
EXAMPLES = 60

pytestmark = pytest.mark.timeout(120)  # shrinking a failure takes many more cases


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[Fuzzer]:
    with running_fuzzer() as running:
        yield running


def _property(name: str) -> Any:
    strategy, check = PROPERTIES[name]

    @fuzz_settings(EXAMPLES)
    @given(case=strategy)
    def test(fuzzer: Fuzzer, case: Any) -> None:
        check(fuzzer, case)

    test.__doc__ = check.__doc__
    return test


test_request_targets_reach_only_the_upstream = _property("reach")
test_request_targets = _property("targets")
test_header_fields = _property("fields")
test_idempotency_keys = _property("keys")
test_body_framing = _property("framing")
test_upstream_header_fields = _property("upstream_fields")
test_store_down = _property("store_down")
