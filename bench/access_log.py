"""What one access log line costs: CPU per line of the proxy's path and of the reference.

The access line is written once per request, so its cost adds straight to the proxy's CPU per
request (bench/run). This script times it without sockets: an event loop finishes a
"request" per iteration (as a loaded proxy does, often several) and logs its line, and the
same loop without the line is subtracted. Two paths are timed:

- `logging`: the standard `logging` module, a `StreamHandler` and a `json.dumps` formatter,
  as the proxy wrote its access lines before they got their own writer (the reference);
- `proxy`: `proxy.exchange.log_access` behind `logs.access_enabled`, as `observe` calls it.

Lines go where stderr would go: a file (default, like `2>proxy.log` or a container log) or
/dev/null (`--to /dev/null`: the write system calls without the disk). CPU is the process's
user + system time (`time.process_time`). `--profile` prints a cProfile of the proxy path.

    .venv/bin/python bench/access_log.py                    # 200,000 lines per path
    .venv/bin/python bench/access_log.py --lines 50000 --per-iteration 8 --to /dev/null
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from aiohttp.test_utils import make_mocked_request

from proxy import exchange, logs
from proxy.outcomes import RequestOutcome

try:
    import uvloop
except ImportError:  # the standard loop: figures a little higher
    uvloop = None  # type: ignore[assignment]

LogLine = Callable[[], None]


class StdlibJson(logging.Formatter):
    """The reference: the formatter the proxy used before, one `json.dumps` per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        return json.dumps(line, default=str)


def sample_exchange() -> exchange.Exchange:
    """A protected first attempt, as the flow leaves it."""
    return exchange.Exchange(
        request_id="9f3c2a1b1a2b",
        route="payments",
        outcome=RequestOutcome.FORWARDED,
        record="4f1d2c3b4a5968778695a4b3c2d1e0f1e2d3c4b5a69788796a5b4c3d2e1f0a1b",
        upstream_status=201,
        upstream_seconds=0.000812,
    )


def stdlib_path(sink: TextIO) -> LogLine:
    logger = logging.getLogger("bench.access_log.stdlib")
    handler = logging.StreamHandler(sink)
    handler.setFormatter(StdlibJson())
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    request = make_mocked_request("POST", "/v1/payments/orders")
    ex = sample_exchange()

    def line() -> None:
        if logger.isEnabledFor(logging.INFO):
            logger.info("request", extra={"fields": {
                "route": ex.route, "method": request.method, "path": request.path,
                "outcome": ex.outcome, "status": 201, "key_hash": ex.record,
                "upstream_status": ex.upstream_status,
                "upstream_ms": round(0.000812 * 1000, 3), "latency_ms": round(0.00123 * 1000, 3),
                "request_id": ex.request_id, "error": ex.error,
            }})  # fmt: skip

    return line


def proxy_path(sink: TextIO) -> LogLine:
    logs.configure("info", sink)
    request = make_mocked_request("POST", "/v1/payments/orders")
    ex = sample_exchange()

    def line() -> None:
        if logs.access_enabled():
            exchange.log_access(request, ex, 201, 0.00123)

    return line


async def spin(line: LogLine | None, lines: int, per_iteration: int) -> float:
    """CPU seconds for `lines` loop iterations' worth of requests, each logging its line."""
    started = time.process_time()
    for _ in range(lines // per_iteration):
        if line is not None:
            for _ in range(per_iteration):
                line()
        await asyncio.sleep(0)  # one turn of the loop: where buffered lines get written
    return time.process_time() - started


def measure(make: Callable[[TextIO], LogLine], args: argparse.Namespace, sink: TextIO) -> float:
    """Microseconds of CPU per line: the loop with lines, less the loop without."""
    line = make(sink)

    async def both() -> float:
        await spin(line, min(args.lines, 20_000), args.per_iteration)  # warm up
        best = float("inf")
        for _ in range(args.repeat):  # the least disturbed of a few runs
            empty = await spin(None, args.lines, args.per_iteration)
            full = await spin(line, args.lines, args.per_iteration)
            best = min(best, full - empty)
        logs.flush()
        lines: int = args.lines
        return best / lines * 1e6

    return float(run(both()))


def run(coro: Any) -> Any:
    if uvloop is not None:
        return uvloop.run(coro)
    return asyncio.run(coro)


def check(path: Path) -> int:
    """Every line in `path` is one complete JSON object: how many there are."""
    count = 0
    with path.open(encoding="utf-8") as lines:
        for text in lines:
            json.loads(text)
            count += 1
    return count


def profile(args: argparse.Namespace, sink: TextIO) -> None:
    line = proxy_path(sink)
    profiler = cProfile.Profile()
    profiler.enable()
    run(spin(line, args.lines, args.per_iteration))
    profiler.disable()
    logs.flush()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="lines per measured run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per path; the best counts")
    parser.add_argument(
        "--per-iteration", type=int, default=1, help="requests finishing per loop iteration"
    )
    parser.add_argument("--to", default=None, help="where lines go (default: a temp file)")
    parser.add_argument("--profile", action="store_true", help="cProfile the proxy path")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="access-log-"))
    target = Path(args.to) if args.to else directory / "stderr.log"
    loadavg = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{args.lines:,} lines per run, best of {args.repeat}, {args.per_iteration} per loop "
          f"iteration, to {target}; loop {'uvloop' if uvloop else 'asyncio'}; "
          f"load average {' '.join(loadavg)}")  # fmt: skip
    results = {}
    for name, make in (("logging", stdlib_path), ("proxy", proxy_path)):
        with target.open("w", encoding="utf-8") as sink:
            results[name] = measure(make, args, sink)
        checked = f"  ({check(target):,} complete JSON lines)" if target.is_file() else ""
        print(f"  {name:8} {results[name]:6.2f} us CPU per line{checked}")
    print(f"  ratio    {results['logging'] / results['proxy']:.1f}x")
    if args.profile:
        with target.open("w", encoding="utf-8") as sink:
            profile(args, sink)
    shutil.rmtree(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
