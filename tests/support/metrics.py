"""The proxy's /metrics, scraped into samples a test or a benchmark can do sums with.

Parsing is prometheus-client's own (the exposition format has escapes and a `+Inf` that a
hand-written split would get wrong); a sample is addressed by its name and its labels.
"""

from __future__ import annotations

from collections import Counter

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(text: str) -> Samples:
    """Every sample of one exposition text, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(
    client: aiohttp.ClientSession, admin_url: str, timeout: float | None = None
) -> Samples:
    """Every sample of one /metrics scrape of the admin listener at `admin_url`."""
    async with client.get(
        admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)
    ) as response:
        assert response.status == 200
        text = await response.text()
    return parse_samples(text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when not exported yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def totals(samples: Samples, name: str, by: str | None = None) -> Counter[str]:
    """`name` summed over every label but `by`, keyed by the value of `by` ("" without)."""
    out: Counter[str] = Counter()
    for (sample, labels), number in samples.items():
        if sample == name:
            out[dict(labels).get(by, "") if by else ""] += int(number)
    return out
