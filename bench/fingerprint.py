"""What a fingerprint costs: raw bytes vs canonical JSON vs canonical JSON with ignored fields.

The fingerprint runs on every protected request, so its cost is added to each one. This
times `proxy.keys.fingerprint_request` on JSON bodies of about 1 KiB and 64 KiB shaped like
an API's (nested objects, arrays of line items, strings, integers and decimals), in this
process, with `timeit` on the process's CPU time (`time.process_time`), so that other work
on the machine inflates the figures less than wall-clock time would. Run:

    .venv/bin/python -m bench.fingerprint            # about 20 s
    .venv/bin/python -m bench.fingerprint --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import timeit
from pathlib import Path
from typing import Any

from proxy.config import FingerprintPolicy
from proxy.keys import fingerprint_request

POLICIES = {
    "raw": FingerprintPolicy(),
    "canonical": FingerprintPolicy("canonical"),
    "canonical+ignore": FingerprintPolicy("canonical", ("/timestamp", "/metadata/nonce")),
}


def item(index: int) -> dict[str, Any]:
    return {"sku": f"SKU-{index:06d}", "name": f"Widget number {index}", "quantity": index % 7,
            "unit_price": round(3.5 + index * 0.25, 2), "tags": ["blue", "large"],
            "attributes": {"weight_kg": 1.25, "fragile": index % 2 == 0}}  # fmt: skip


def body_of(size: int) -> bytes:
    """A JSON payment order of about `size` bytes, as a client's json.dumps writes it."""
    order: dict[str, Any] = {"amount": 12550, "currency": "EUR", "customer": "cus_4QFOF3xrqZ",
                             "timestamp": "2025-01-31T12:00:00Z",
                             "metadata": {"nonce": "5f1c9a", "channel": "web", "attempt": 1},
                             "items": []}  # fmt: skip
    while len(json.dumps(order)) < size:
        order["items"].append(item(len(order["items"])))
    return json.dumps(order).encode()


def measure(body: bytes, policy: FingerprintPolicy, seconds: float) -> float:
    """Microseconds per fingerprint of `body` under `policy` (best of 5 runs)."""

    def call() -> str:
        return fingerprint_request("POST", "/v1/orders", "", body, "application/json", policy)

    timer = timeit.Timer(call, timer=time.process_time)
    number, _ = timer.autorange()
    number = max(1, int(number * seconds / 5 / 0.2))
    runs = timer.repeat(number=number, repeat=5)
    return min(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per case, about")
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    print(f"Python {platform.python_version()}, {platform.machine()}; CPU us per body (best of 5)")
    print("| body | " + " | ".join(POLICIES) + " |")
    print("| --- |" + " --- |" * len(POLICIES))
    for label, size in (("1 KiB", 1024), ("64 KiB", 64 * 1024)):
        body = body_of(size)
        row = {name: measure(body, policy, args.seconds) for name, policy in POLICIES.items()}
        results[label] = row
        cells = " | ".join(f"{value:,.1f}" for value in row.values())
        print(f"| {label} JSON ({len(body):,} bytes) | {cells} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
