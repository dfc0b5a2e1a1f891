"""The batched metric updates expose exactly what prometheus-client's own calls would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proxy.metrics import OUTCOMES, LocalHistogram
from proxy.outcomes import RequestOutcome

SAMPLES = (0.0001, 0.0005, 0.003, 0.003, 0.2, 7.0, 99.0)
BUCKETS = (0.0005, 0.001, 0.005, 0.1, 1.0, 10.0)


def exposition(batched: bool) -> list[bytes]:
    registry = CollectorRegistry()
    histogram = Histogram("h", "help", ["route"], buckets=BUCKETS, registry=registry)
    child = histogram.labels("r")
    if batched:
        local = LocalHistogram(child)
        for value in SAMPLES:
            local.observe(value)
        local.flush()
        local.flush()  # a second flush adds nothing
    else:
        for value in SAMPLES:
            child.observe(value)
    lines = generate_latest(registry).splitlines()
    return [line for line in lines if b"_created" not in line]  # a creation time differs


def test_a_flushed_batch_exposes_what_observe_would() -> None:
    """Buckets, count and sum match one `observe` per sample (and fail if the library's
    histogram internals change under the batching)."""
    assert exposition(batched=True) == exposition(batched=False)


def test_the_outcome_label_takes_exactly_the_enum_values() -> None:
    """One list of outcomes for metrics, logs and tests."""
    assert set(OUTCOMES) == {outcome.value for outcome in RequestOutcome}
