"""The soak's accounting: what the upstream executed per key against what clients saw.

Duplicate executions = sum over keys of max(0, executions - 1). The duplicate rate is
duplicate executions / keys; its one-sided 95 % upper bound is the rule of three (3 / keys)
when there are none, else the exact Clopper-Pearson bound (Wilson's score bound above 5,000
duplicates). Beside it: the faults that ran, the answers clients saw, what each key ended
as, the proxies' counters, the records left in Redis and what the proxies logged. In failover
mode (`--store sentinel`), also each switch: its downtime, the acknowledged writes it lost
and when they were acknowledged, and how near to a switch every duplicate executed first.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.soak_failover import ATTRIBUTION_SLACK, SoakSentinel, switch_costs
from bench.soak_faults import NAMESPACE, SoakRedis
from bench.soak_load import (
    CODE_NAMES,
    DISCONNECTED,
    GAVE_UP,
    LAPSED,
    NOT_RUN,
    SUCCESS,
    TIMED_OUT,
    key_lifetime,
)
from bench.soak_run import Soak
from proxy.keys import scope_of, storage_key

# --- statistics ---------------------------------------------------------------------------


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (n may be millions)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    base = math.lgamma(n + 1)
    logs = [
        base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
        + (n - i) * math.log1p(-p)
        for i in range(k + 1)
    ]  # fmt: skip
    top = max(logs)
    return math.exp(top) * sum(math.exp(x - top) for x in logs)


def upper_bound_95(k: int, n: int) -> tuple[float, str]:
    """One-sided 95 % upper bound of a rate seen as k in n, and the method's name."""
    if n <= 0:
        return float("nan"), "no keys"
    if k <= 0:
        return 3.0 / n, "rule of three: 3 / keys"
    k = min(k, n)
    if k > 5000:
        z, p = 1.6448536, k / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return min(1.0, (centre + spread) / (1 + z * z / n)), "Wilson score, one-sided"
    low, high = k / n, 1.0
    for _ in range(80):
        mid = (low + high) / 2
        if binomial_cdf(k, n, mid) > 0.05:
            low = mid
        else:
            high = mid
    return high, "exact Clopper-Pearson, one-sided"


def percent(rate: float) -> str:
    if rate == 0:
        return "0 %"
    if math.isnan(rate):
        return "n/a"
    digits = max(2, 1 - math.floor(math.log10(rate * 100)))
    return f"{rate * 100:.{digits}f} %"


# --- what is left at the end ----------------------------------------------------------------


def scan_logs(directory: Path) -> Counter[str]:
    """What the proxies wrote at warning level or above, and every traceback, by kind."""
    found: Counter[str] = Counter()
    for path in sorted(directory.glob("proxy*.log")):
        where = ""
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    pass
                else:
                    found[f"{entry.get('level')}: {entry.get('event')}"] += 1
                    continue
            if line.startswith("  File "):
                where = line.strip().split(", in ")[0].removeprefix("File ")
            elif line and not line[0].isspace() and not line.startswith("Traceback"):
                if where or "Error" in line or "Exception" in line:
                    found[f"{line.strip()[:120]}{' at ' + where if where else ''}"] += 1
                where = ""
    return found


# --- the report ---------------------------------------------------------------------------


@dataclass
class Summary:
    """What one run comes to: its exit status, and the figures `--compare-acks` sets side by
    side (measure, value)."""

    status: int
    clean: bool  # no check failed besides duplicates
    figures: list[tuple[str, str]] = field(default_factory=list)


def describe_store(args: argparse.Namespace) -> str:
    if args.store == "sentinel":
        return (
            f"Sentinel group (primary + 2 replicas + 3 sentinels, down-after "
            f"{args.down_after_ms} ms), min_replicas_ack {args.min_replicas_ack}"
        )
    return f"Redis persistence: {args.redis_persistence}"


def report(args: argparse.Namespace, soak: Soak, result: dict[str, Any]) -> Summary:
    counts: bytes = result["counts"]
    codes: bytearray = result["codes"]
    drivers = result["drivers"]
    sent = sum(d["sent"] for d in drivers)
    statuses: Counter[str] = Counter()
    checks: Counter[str] = Counter()
    for driver in drivers:
        statuses.update(driver["statuses"])
        checks.update(driver["checks"])
    keys = sum(1 for code in codes if code != NOT_RUN)
    executed = duplicates = keys_with_duplicates = 0
    ended: Counter[str] = Counter()
    cross: Counter[str] = Counter()
    duplicated: list[int] = []
    for index, (code, count) in enumerate(zip(codes, counts, strict=True)):
        if code == NOT_RUN:
            if count:
                cross["executed, but the key was never sent (!)"] += 1
            continue
        ended[CODE_NAMES[code]] += 1
        executed += count
        if count > 1:
            duplicates += count - 1
            keys_with_duplicates += 1
            duplicated.append(index)
        if code == SUCCESS and count == 0:
            cross["2xx answer, never executed (!)"] += 1
        elif code in (DISCONNECTED, TIMED_OUT) and count == 0:
            cross["upstream-disconnected/timeout, never executed (!)"] += 1
        elif code == LAPSED and count == 0:
            cross["outcome-unknown (lease lapsed), never executed: orphaned record"] += 1
        elif code == LAPSED:
            cross["outcome-unknown (lease lapsed), executed once"] += 1
        elif code == GAVE_UP and count:
            cross["gave up, executed once"] += 1
        elif code == GAVE_UP:
            cross["gave up, never executed"] += 1
    horizon = result["scanned_at"] - args.ttl + 10  # records of keys first run before may be gone
    vanished = vanished_records(codes, counts, result["first"], result["records"]["names"],
                                soak.prefix, horizon)  # fmt: skip
    if vanished:
        cross["executed once, its record gone from the store at the end"] = len(vanished)
    rate = duplicates / keys if keys else float("nan")
    bound, method = upper_bound_95(duplicates, keys)
    upstream = result["upstream"]
    elapsed = result["elapsed"]
    if isinstance(soak.store, SoakRedis):
        persistence = "redis persistence: " + (
            "append-only file, appendfsync always (restarts reload the records)"
            if args.redis_persistence == "aof"
            else "none (a restart loses every record)"
        )
    else:
        persistence = "store: " + describe_store(args)

    print()
    print(
        f"## Soak: {args.requests:,} requests, {len(soak.proxies)} proxies, "
        f"{args.drivers} client processes, {describe_store(args)}"
    )
    print()
    table = [
        ("requests (HTTP attempts, retries included)", f"{sent:,}"),
        ("keys (logical operations)", f"{keys:,}"),
        ("upstream executions", f"{executed:,}"),
        ("duplicate executions", f"{duplicates:,}"),
        ("keys executed more than once", f"{keys_with_duplicates:,}"),
        ("duplicate rate", percent(rate)),
        ("95 % upper bound", f"{percent(bound)} ({method})"),
    ]
    print_table(("measure", "value"), table)
    print()
    faults = [
        ("upstream resets (connection dropped after acting)", upstream.get("resets", 0)),
        (f"upstream slow answers ({args.slow_min:g}-{args.slow_max:g} s)", upstream.get("slow", 0)),
        ("upstream hangs (> upstream_timeout)", upstream.get("hangs", 0)),
        ("upstream 503 refusals (not executed)", upstream.get("refused_503", 0)),
        (
            "primary SIGKILLs + Sentinel switches"
            if isinstance(soak.store, SoakSentinel)
            else "redis restarts (SIGKILL + start)",
            soak.store.faults,
        ),
        ("proxy SIGKILLs + restarts", sum(p.kills for p in soak.proxies)),
        ("client timeouts", statuses.get("client timeout", 0)),
        ("client connection errors", statuses.get("connection error", 0)),
    ]
    print_table(("fault", "count"), [(name, f"{value:,}") for name, value in faults])
    print()
    print_table(
        ("answers seen by clients", "count"),
        [(name, f"{value:,}") for name, value in statuses.most_common()],
    )
    print()
    print_table(
        ("keys ended as", "count"), [(name, f"{value:,}") for name, value in ended.most_common()]
    )
    print()
    proxy_metrics: Counter[str] = Counter()
    for proxy in soak.proxies:
        proxy_metrics.update(proxy.metrics)
    print_table(
        ("proxy counters (summed over incarnations)", "count"),
        [(name, f"{value:,}") for name, value in sorted(proxy_metrics.items())],
    )
    print()
    records = result["records"]
    in_flight = records["in_flight"]
    stuck = describe_in_flight(in_flight, codes, counts, soak.prefix)
    checks_rows: list[tuple[str, object]] = [*checks.items(), *cross.items(), *stuck.items()]
    checks_rows.append(("records in Redis at the end, by state", json.dumps(records["states"])))
    checks_rows.append(
        (
            "redis memory / AOF bytes",
            f"{records['memory']} / "
            f"{records['aof_bytes'] if records['aof_bytes'] is not None else '-'}",
        )
    )
    for proxy, (code, seconds) in zip(soak.proxies, result["exits"], strict=True):
        checks_rows.append(
            (f"proxy {proxy.index} SIGTERM at the end", f"exit {code} after {seconds:.1f}s")
        )
    logs = scan_logs(soak.directory)
    soak.findings += sum(logs.values())
    for message, count in logs.most_common(12):
        checks_rows.append((f"proxy log: {message}", f"{count:,}"))
    print_table(("checks", "value"), [(name, str(value)) for name, value in checks_rows])
    print()
    failover: list[tuple[str, str]] = []
    if isinstance(soak.store, SoakSentinel):
        duplicate_firsts = [first for _, first, _ in result["repeats"]]
        failover = report_switches(soak.store, duplicate_firsts, vanished)
        print()
    print(
        f"elapsed {elapsed:.1f} s, {sent / elapsed:,.0f} requests/s; {persistence}; "
        f"store refused writes {soak.store.down_seconds:.1f} s in total; "
        f"lease {args.lease:g} s, upstream_timeout {args.upstream_timeout:g} s, "
        f"client timeout {args.client_timeout:g} s; ttl {args.ttl:g} s (a key lives at most "
        f"{key_lifetime(args):g} s); seed {args.seed}; proxy: {soak.code}"
    )
    if duplicated:
        sample = ", ".join(f"{soak.prefix}-{i} x{counts[i]}" for i in duplicated[:10])
        print(f"duplicated keys (first 10): {sample}")
    bad = [
        name
        for name, _ in [*checks.items(), *cross.items()]
        if "(!)" in name
        or name.startswith(
            (
                "2xx answer from",
                "2xx answer for",
                "retry after success answered without",
                "unexpected",
            )
        )
    ]
    bad_exit = any(code != 0 for code, _ in result["exits"])
    lapsed_after_2xx = checks.get(f"retry after success ended as: {CODE_NAMES[LAPSED]}", 0)
    fenced = int(proxy_metrics["requests_total:fenced"])
    figures = [
        *table[:6],  # the printed table's counts, then its bound with the method's name only
        ("95 % upper bound", f"{percent(bound)} ({method.split(':')[0]})"),
        ("keys executed once whose record vanished", f"{len(vanished):,}"),
        *failover,
        ("completes fenced out (the record was not theirs)", f"{fenced:,}"),
        ("retries after a 2xx answered outcome-unknown", f"{lapsed_after_2xx:,}"),
        ("client answers 503 store-unavailable", f"{statuses.get('503 store-unavailable', 0):,}"),
        ("elapsed", f"{elapsed:.0f} s"),
    ]  # fmt: skip
    clean = not bad and not bad_exit
    if result["cut_short"]:
        print("INCOMPLETE: --max-seconds reached; the numbers cover what ran")
        return Summary(2, clean, figures)
    if ended[CODE_NAMES[SUCCESS]] < keys / 2:
        print("NOT A SOAK: fewer than half of the keys got a 2xx answer; see the checks above")
        return Summary(2, clean, figures)
    return Summary(1 if duplicates or not clean else 0, clean, figures)


def vanished_records(
    codes: bytearray, counts: bytes, first: Sequence[float], names: set[str], prefix: str,
    horizon: float,
) -> list[float]:  # fmt: skip
    """When each key the upstream executed once first ran, if its record is not in the store
    at the end: a begin the store acknowledged and then lost (nothing else removes the
    record of an executed key). Only keys first run after `horizon`, whose record cannot
    have reached its ttl."""
    scope = scope_of([("Authorization", ())])
    out = []
    for index, count in enumerate(counts):
        if count != 1 or codes[index] == NOT_RUN or first[index] <= horizon:
            continue
        if storage_key(NAMESPACE, scope, f"{prefix}-{index}").store not in names:
            out.append(first[index])
    return out


def report_switches(
    store: SoakSentinel, firsts: list[float], vanished: list[float]
) -> list[tuple[str, str]]:
    """Print each change of primary, what it cost, and which duplicates it explains; return
    the failover figures for the comparison. `firsts`: when each duplicated execution's key
    first ran; `vanished`: the same for keys whose record the store lost."""
    costs = switch_costs(store)
    explained = [sum(1 for first in firsts if cost.explains(first)) for cost in costs]
    rows = []
    for number, (cost, duplicates) in enumerate(zip(costs, explained, strict=True), 1):
        switch = cost.switch
        old, new = cost.ports
        rows.append((
            f"{number}", "SIGKILL" if switch else "live primary demoted", f"{old} -> {new}",
            f"{switch.switched_after:.2f}" if switch else "-",
            "-" if cost.downtime is None else f"{cost.downtime:.2f}",
            "-" if cost.lost is None else f"{cost.lost:,}",
            f"{cost.loss_window * 1000:.0f}", f"{duplicates:,}",
            f"{switch.settled_after:.2f}" if switch else "-",
        ))  # fmt: skip
    print_columns(
        ("#", "cause", "primary", "switched after s", "writes refused s", "acked writes lost",
         "loss window ms", "duplicates", "settled after s"),
        rows,
    )  # fmt: skip
    probe = store.probe
    if probe is not None:
        print(
            f"probe: {probe.writes:,} writes to the primary, {probe.acknowledged:,} "
            f"acknowledged (WAIT {store.args.min_replicas_ack}). Duplicates: keys whose first "
            f"execution fell in a switch's loss window (+-{ATTRIBUTION_SLACK:g} s)."
        )
    unexplained = sum(1 for first in firsts if not any(c.explains(first) for c in costs))
    if unexplained:
        print(f"{unexplained} duplicated executions first executed outside every loss window")
    gone = sum(1 for first in vanished if any(c.explains(first) for c in costs))
    planned = [cost for cost in costs if cost.switch is not None]
    downtimes = [cost.downtime for cost in planned if cost.downtime is not None]
    lost = [cost.lost for cost in costs if cost.lost is not None]
    windows = [cost.loss_window for cost in costs]
    return [
        ("primary SIGKILLs + Sentinel switches", f"{len(planned)}"),
        ("live primaries demoted by the sentinels", f"{len(costs) - len(planned)}"),
        ("writes refused per SIGKILL (probe), median / max",
         f"{statistics.median(downtimes):.2f} / {max(downtimes):.2f} s" if downtimes else "-"),
        ("acknowledged probe writes lost", f"{sum(lost):,}"),
        ("switches that lost acknowledged writes", f"{sum(1 for n in lost if n)} of {len(lost)}"),
        ("loss window, max", f"{max(windows) * 1000:.0f} ms" if windows else "-"),
        ("duplicates inside a loss window", f"{len(firsts) - unexplained} of {len(firsts)}"),
        ("vanished records inside a loss window", f"{gone} of {len(vanished)}"),
    ]  # fmt: skip


def print_comparison(summaries: list[tuple[str, Summary]]) -> None:
    """The figures of several runs side by side, one column per run."""
    names = [name for name, _ in summaries[0][1].figures]
    values = [dict(summary.figures) for _, summary in summaries]
    rows = [(name, *(value.get(name, "-") for value in values)) for name in names]
    print_columns(("measure", *(label for label, _ in summaries)), rows)


def print_columns(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> None:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    first, *rest = widths

    def line(cells: tuple[str, ...]) -> str:
        head, *tail = cells
        right = (f"{cell:>{width}}" for cell, width in zip(tail, rest, strict=True))
        return "| " + " | ".join([f"{head:<{first}}", *right]) + " |"

    print(line(header))
    print("|" + "-" * (first + 2) + "|" + "|".join("-" * (w + 1) + ":" for w in rest) + "|")
    for row in rows:
        print(line(row))


def describe_in_flight(
    in_flight: list[str], codes: bytearray, counts: bytes, prefix: str
) -> Counter[str]:
    """Map in-flight records left at the end back to keys (their storage key is a hash)."""
    out: Counter[str] = Counter()
    if not in_flight:
        return out
    scope = scope_of([("Authorization", ())])
    wanted = set(in_flight)
    for index, code in enumerate(codes):
        if code != NOT_RUN and storage_key(NAMESPACE, scope, f"{prefix}-{index}").store in wanted:
            executed = "executed" if counts[index] else "never executed"
            out[f"left in flight (lease lapsed): key ended as {CODE_NAMES[code]}, {executed}"] += 1
    return out


def print_table(header: tuple[str, str], rows: list[tuple[str, str]]) -> None:
    width = max([len(header[0]), *(len(name) for name, _ in rows)])
    right = max([len(header[1]), *(len(value) for _, value in rows)])
    print(f"| {header[0]:<{width}} | {header[1]:>{right}} |")
    print(f"|{'-' * (width + 2)}|{'-' * (right + 1)}:|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:>{right}} |")
