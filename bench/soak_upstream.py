"""The soak's legacy API: counts executions per idempotency key and misbehaves on purpose.

It runs as its own process (`python bench/soak_upstream.py --port P --keys N ...`) so it
gets a core of its own. Keys look like `<prefix>-<n>`; the execution count of key n is
kept in a bytearray (a million keys cost a megabyte, not a dict of strings).

Each arriving request draws one fault from a seeded RNG:

- refuse: 503 before acting (a release status: the proxy forgets the key, so the retry
  executes; not counted as an execution, because the upstream did not act);
- reset:  counted, then the connection is dropped without an answer (the proxy stores a
  502 "outcome unknown");
- hang:   counted, then silence for longer than the proxy's upstream_timeout (504 stored);
- slow:   counted, then an answer after a random delay (client timeouts, concurrent
  duplicates, lease renewals);
- none:   counted, answered at once.

An execution is counted the moment the request arrives, before any sleep or reset: that is
when the upstream "acted". `GET /__counts` returns the bytearray, `GET /__stats` the fault
counts, `GET /__first` the (wall clock) time of each key's first execution as doubles, and
`GET /__repeats` every execution after a key's first with the times of both, so that a
duplicate or a lost record can be set against the faults around it; all are asked directly,
never through the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import time
from array import array
from collections import Counter

from aiohttp import web

KEY_HEADER = "Idempotency-Key"
MAX_REPEATS = 10_000  # repeat executions kept with their times


class Upstream:
    """Execution counts per key, fault counters, and the fault plan."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.prefix = args.prefix + "-"
        self.counts = bytearray(args.keys)
        self.first_at = array("d", bytes(8 * args.keys))  # wall time of each key's 1st execution
        self.repeats: list[tuple[int, float, float]] = []  # (key index, first, this execution)
        self.other: Counter[str] = Counter()  # keys outside the soak's key space
        self.stats: Counter[str] = Counter()
        self.rng = random.Random(args.seed)
        self.refuse = args.refuse_share
        self.reset = self.refuse + args.reset_share
        self.hang = self.reset + args.hang_share
        self.slow = self.hang + args.slow_share
        self.slow_min, self.slow_max = args.slow_min, args.slow_max
        self.hang_seconds = args.hang_seconds
        self.active = 0

    def execute(self, key: str) -> int:
        """Count one execution of `key`; return which execution of it this is."""
        self.stats["executions"] += 1
        if key.startswith(self.prefix):
            tail = key[len(self.prefix) :]
            if tail.isdigit() and int(tail) < len(self.counts):
                index = int(tail)
                count = self.counts[index]
                if count < 255:
                    self.counts[index] = count + 1
                if count == 0:
                    self.first_at[index] = time.time()
                elif len(self.repeats) < MAX_REPEATS:
                    self.repeats.append((index, self.first_at[index], time.time()))
                return count + 1
        self.other[key] += 1
        return self.other[key]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get(KEY_HEADER, "")
        if not key:
            self.stats["no_key"] += 1
        roll = self.rng.random()
        if roll < self.refuse:
            self.stats["refused_503"] += 1
            return web.Response(status=503, text="busy, not executed", headers={"Retry-After": "1"})
        execution = self.execute(key)
        body = b'{"key":"%s","execution":%d}' % (key.encode(), execution)
        if roll < self.reset:
            self.stats["resets"] += 1
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.05)
            return web.Response()
        self.active += 1
        self.stats["max_active"] = max(self.stats["max_active"], self.active)
        try:
            if roll < self.hang:
                self.stats["hangs"] += 1
                await asyncio.sleep(self.hang_seconds)
            elif roll < self.slow:
                self.stats["slow"] += 1
                await asyncio.sleep(self.rng.uniform(self.slow_min, self.slow_max))
        finally:
            self.active -= 1
        return web.Response(status=201, body=body, content_type="application/json")

    async def serve_counts(self, request: web.Request) -> web.Response:
        return web.Response(body=bytes(self.counts), content_type="application/octet-stream")

    async def serve_first(self, request: web.Request) -> web.Response:
        return web.Response(body=self.first_at.tobytes(), content_type="application/octet-stream")

    async def serve_repeats(self, request: web.Request) -> web.Response:
        return web.json_response(self.repeats)

    async def serve_stats(self, request: web.Request) -> web.Response:
        other = {
            "keys": len(self.other),
            "executions": sum(self.other.values()),
            "duplicates": sum(c - 1 for c in self.other.values() if c > 1),
        }
        saturated = sum(1 for c in self.counts if c == 255)
        return web.json_response({**self.stats, "other_keys": other, "saturated": saturated})


async def serve(args: argparse.Namespace) -> None:
    upstream = Upstream(args)
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_get("/__counts", upstream.serve_counts)
    app.router.add_get("/__stats", upstream.serve_stats)
    app.router.add_get("/__repeats", upstream.serve_repeats)
    app.router.add_get("/__first", upstream.serve_first)
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port, backlog=2048).start()
    print(json.dumps({"listening": args.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=int, required=True, help="size of the key space")
    parser.add_argument("--prefix", required=True, help="keys are <prefix>-<n>")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--refuse-share", type=float, default=0.0)
    parser.add_argument("--reset-share", type=float, default=0.0)
    parser.add_argument("--hang-share", type=float, default=0.0)
    parser.add_argument("--hang-seconds", type=float, default=5.0)
    parser.add_argument("--slow-share", type=float, default=0.0)
    parser.add_argument("--slow-min", type=float, default=0.2)
    parser.add_argument("--slow-max", type=float, default=2.0)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
