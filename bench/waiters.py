"""How soon a waiter on another proxy answers, and what the publish costs Redis.

    .venv/bin/python bench/waiters.py [--keys 100] [--rounds 5] [--calls 100000]

Two proxy processes (`on_concurrent: wait`) share a redis-server of the run's own. Each round
sends `--keys` first attempts to proxy A, which an upstream process holds; once all
have arrived, one retry per key goes to proxy B, and once every retry is waiting (subscribed
and checked again), the upstream releases the first attempts. Reported: for each key, the
time from its first attempt's answer to its waiter's answer (the distribution over every
round), and the begins proxy B made per waiter (a poller would make dozens).

This process only plays the clients, on uvloop: with the upstream in it too, or on the
default loop, the bench itself was the bottleneck.

Then the cost of the publish on the hot path: the COMPLETE script with and without its
`PUBLISH`, nobody subscribed, `--calls` times each, as Redis accounts it (`INFO
commandstats`, microseconds per call), and publishes to nobody inside one script.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis
import redis.asyncio as aioredis
import uvloop
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bench import services
from proxy.store.redis import _PUBLISH, COMPLETE, _Script
from tests.support.ports import free_port
from tests.support.proxies import REPO

BEGINS = "idempotency_proxy_store_operation_duration_seconds_count"
# Microseconds that 100000 calls take inside one script, by Redis's own clock.
_LOOP = """
local t = redis.call('TIME')
for i = 1, 100000 do redis.pcall({call}) end
local u = redis.call('TIME')
return (u[1] - t[1]) * 1000000 + (u[2] - t[2])
"""


class Gate:
    """The upstream, a process of its own: `/pay/...` waits for the round's release, anything
    else answers at once. The bench drives it: `POST /_round/N` starts a round of N held
    requests, `GET /_arrived` answers once all N have arrived, `POST /_release` lets them go."""

    def __init__(self) -> None:
        self.arrived = 0
        self.expected = 0
        self.all_arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        if request.path.startswith("/_round/"):
            self.arrived, self.expected = 0, int(request.path.rsplit("/", 1)[1])
            self.all_arrived.clear()
            self.release.clear()
        elif request.path == "/_arrived":
            await self.all_arrived.wait()
        elif request.path == "/_release":
            self.release.set()
        elif request.path.startswith("/pay/"):
            self.arrived += 1
            if self.arrived >= self.expected:
                self.all_arrived.set()
            await self.release.wait()
            return web.json_response({"id": os.urandom(4).hex()}, status=201)
        return web.json_response({})


def serve_gate(port: int) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", Gate().handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())  # fmt: skip


def start_gate(tmp: Path) -> services.Server:
    port = free_port()
    # As a module from the repository root, like the bench itself (`from bench import ...`).
    argv = [sys.executable, "-m", "bench.waiters", "--upstream-port", str(port)]
    process = services._spawn("upstream", argv, tmp / "upstream.log", cwd=services.BENCH_DIR.parent)
    server = services.Server("upstream", port, process, tmp / "upstream.log",
                             url=f"http://127.0.0.1:{port}")  # fmt: skip
    services.wait_http(server, "/ready")
    return server


def proxy_config(port: int, admin_port: int, upstream: str, store_url: str) -> str:
    return f"""# written by bench/waiters.py
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
upstream: {upstream}
log_level: warning
shutdown_grace: 2s
store: {{url: "{store_url}"}}
defaults: {{on_concurrent: wait, wait_timeout: 10s}}
routes:
  - {{path: /open/*, id: open, methods: [PATCH]}}
  - {{path: /pay/*, id: pay}}
"""


async def start_proxy(tmp: Path, name: str, upstream: str, store_url: str) -> services.Server:
    port, admin_port = free_port(), free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(proxy_config(port, admin_port, upstream, store_url))
    argv = [sys.executable, "-m", "proxy", "run", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPOTENCY_PROXY_")}
    process = services._spawn(name, argv, tmp / f"{name}.log", cwd=REPO, env=env)
    server = services.Server(name, port, process, tmp / f"{name}.log",
                             url=f"http://127.0.0.1:{port}",
                             extra={"admin": f"http://127.0.0.1:{admin_port}"})  # fmt: skip
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                async with session.post(server.url + "/open/ready", data=b"{}") as response:
                    if response.status == 200:
                        return server
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{name} did not start:\n{server.log_tail()}")


async def begins(session: aiohttp.ClientSession, proxy: services.Server) -> float:
    async with session.get(proxy.extra["admin"] + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == BEGINS and sample.labels.get("operation") == "begin":
                return float(sample.value)
    return 0.0


async def post(session: aiohttp.ClientSession, url: str, key: str) -> tuple[int, float]:
    async with session.post(url, data=b"{}", headers={"Idempotency-Key": key}) as response:
        await response.read()
        return response.status, time.perf_counter()


async def one_round(session: aiohttp.ClientSession, gate: str, first: services.Server,
                    second: services.Server, store: aioredis.Redis, keys: int,
                    ) -> tuple[list[float], float]:  # fmt: skip
    """The delays of one round's waiters, and the begins proxy B made per waiter."""
    async with session.post(f"{gate}/_round/{keys}") as response:
        await response.read()
    tag = os.urandom(4).hex()
    names = [f"{tag}-{i}" for i in range(keys)]
    before = await begins(session, second)
    firsts = [asyncio.ensure_future(post(session, first.url + "/pay/x", k)) for k in names]
    async with session.get(f"{gate}/_arrived") as response:
        await response.read()
    waiters = [asyncio.ensure_future(post(session, second.url + "/pay/x", k)) for k in names]
    # Every waiter is subscribed and has checked again since: it waits for its message.
    while True:
        subscribed = len(await store.pubsub_channels("idp:*")) >= keys
        if subscribed and await begins(session, second) - before >= 2 * keys:
            break
        await asyncio.sleep(0.005)
    async with session.post(f"{gate}/_release") as response:
        await response.read()
    answers = await asyncio.gather(*firsts)
    waited = await asyncio.gather(*waiters)
    if any(status != 201 for status, _ in (*answers, *waited)):
        raise RuntimeError("a request did not get its 201")
    per_waiter = (await begins(session, second) - before) / keys
    return [w - a for (_, a), (_, w) in zip(answers, waited, strict=True)], per_waiter


async def latency(tmp: Path, keys: int, rounds: int) -> None:
    redis_server = services.start_redis(tmp, None)
    store_url = f"redis://127.0.0.1:{redis_server.port}/0"
    gate = start_gate(tmp)
    upstream = gate.url
    proxies = [await start_proxy(tmp, name, upstream, store_url) for name in ("a", "b")]
    store = aioredis.Redis(port=redis_server.port)
    delays: list[float] = []
    medians: list[float] = []
    per_waiter: list[float] = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for _ in range(rounds):
                spread, made = await one_round(session, gate.url, proxies[0], proxies[1],
                                               store, keys)  # fmt: skip
                delays += spread
                medians.append(statistics.median(spread))
                per_waiter.append(made)
    finally:
        await store.aclose()
        for server in (*proxies, gate):
            server.stop()
        redis_server.stop()
    delays.sort()
    ms = [d * 1000 for d in delays]
    print(f"waiters on another proxy, {keys} keys at once, {rounds} rounds ({len(ms)} waiters):")
    print(f"  from the first answer: p50 {statistics.median(ms):.1f} ms, "
          f"p90 {ms[len(ms) * 9 // 10]:.1f} ms, p99 {ms[len(ms) * 99 // 100]:.1f} ms, "
          f"max {ms[-1]:.1f} ms, min {ms[0]:.1f} ms")  # fmt: skip
    print("  median per round: " + ", ".join(f"{m * 1000:.1f} ms" for m in medians))
    print("  begins per waiter: " + ", ".join(f"{b:.2f}" for b in per_waiter))
    verdict = "PASS" if statistics.median(ms) <= 10 else "MISS"
    print(f"  target: median <= 10 ms: {verdict}")


def publish_cost(tmp: Path, calls: int) -> None:
    """Redis's microseconds per COMPLETE, with and without its PUBLISH, nobody subscribed.

    The two scripts alternate in chunks of 1000 calls and each chunk is timed by Redis itself
    (`INFO commandstats`); the medians over the chunks are reported, so that a noisy
    neighbour on the machine weighs on both alike."""
    redis_server = services.start_redis(tmp, None, name="redis-cost")
    client = redis.Redis(port=redis_server.port)
    scripts = {"without PUBLISH": _Script(COMPLETE.replace(_PUBLISH.format(what="done"), "")),
               "with PUBLISH": _Script(COMPLETE)}  # fmt: skip
    assert scripts["without PUBLISH"].source != COMPLETE
    chunks: dict[str, list[float]] = {label: [] for label in scripts}
    try:
        for script in scripts.values():
            client.script_load(script.source)
        client.config_resetstat()
        for start in range(0, calls, 1000):
            order = list(scripts.items())
            for label, script in order if start % 2000 else order[::-1]:  # neither goes first
                pipe = client.pipeline(transaction=False)
                for i in range(start, min(calls, start + 1000)):
                    record = f"idp:{label[:4]}{i}"
                    pipe.hset(record, mapping={"st": "f", "tok": "t", "exp": 1})
                    pipe.evalsha(script.sha, 1, record, "t", 60000, "response", 201,
                                 "Content-Type: application/json\r\n", b"x" * 64,
                                 0)  # no tombstone  # fmt: skip
                pipe.execute()
                # the chunk's own time: commandstats summed since the last reset
                stats = client.info("commandstats")["cmdstat_evalsha"]
                chunks[label].append(stats["usec"] / stats["calls"])
                client.config_resetstat()
        # The publish alone, without the network: 100000 of them in one script, against as many
        # PINGs (the cost of any call from Lua), the best of 5.
        loops = {
            what: min(client.eval(_LOOP.format(call=call), 1, "idp:nobody") for _ in range(5))
            for what, call in (("PUBLISH", "'PUBLISH', KEYS[1], 'done'"), ("PING", "'PING'"))
        }
    finally:
        client.close()
        redis_server.stop()
    print("inside one script, per call (best of 5 loops of 100000): "
          f"PUBLISH to nobody {loops['PUBLISH'] / 100_000:.2f} us, "
          f"PING {loops['PING'] / 100_000:.2f} us")  # fmt: skip
    results = {label: statistics.median(values) for label, values in chunks.items()}
    print(f"COMPLETE script, {calls} calls each, nobody subscribed (Redis time per call,")
    print("median over chunks of 1000):")
    for label, usec in results.items():
        print(f"  {label}: {usec:.2f} us")
    extra = results["with PUBLISH"] - results["without PUBLISH"]
    print(f"  the publish adds {extra:.2f} us per first attempt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)  # the gate's process
    args = parser.parse_args()
    if args.upstream_port:
        serve_gate(args.upstream_port)
        return
    with tempfile.TemporaryDirectory() as directory:
        tmp = Path(directory)
        # uvloop, as the proxies run: this loop plays 2 x keys clients and the upstream.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(latency(tmp, args.keys, args.rounds))
        publish_cost(tmp, args.calls)


if __name__ == "__main__":
    main()
