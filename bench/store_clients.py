"""Client CPU per request of the ways the store could talk to Redis.

    .venv/bin/python -m bench.store_clients [--requests 20000] [--tasks 50]

One process, 50 tasks, each request a begin then a complete (two EVALSHAs of the store's own
scripts), against a redis-server of the run's own. Reported per request: the client's CPU
(time.process_time), Redis's CPU (from /proc) and wall time. The contenders:

- `handwritten`: the multiplexed asyncio connection the store used before it moved onto
  redis-py (loaded from git history, commit e787d50, for this comparison only);
- `batcher`: `RedisBatcher` on a redis-py `ConnectionPool` (what the store uses);
- `batcher+wait1`: the same with `min_replicas_ack: 1` against a primary with one replica;
- `pipeline`: a redis-py pipeline per event-loop iteration;
- `per-command`: `await client.evalsha(...)` per command, redis-py's ordinary use.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from bench import services
from proxy.store.connection import RedisBatcher, connection_pool
from proxy.store.redis import BEGIN, COMPLETE, _Script
from tests.support.proxies import REPO
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until_sync

OLD_COMMIT = "e787d50"
Call = Callable[..., Awaitable[Any]]


def handwritten_module() -> types.ModuleType:
    """The old connection module, from git history, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:proxy/store/connection.py"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("handwritten_connection")
    exec(compile(source, "handwritten_connection.py", "exec"), module.__dict__)
    return module


class PipelineBatcher:
    """A redis-py pipeline per event-loop iteration."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending:
            loop.call_soon(lambda: asyncio.ensure_future(self.flush()))
        self.pending.append((args, future))
        return future

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        pipe = self.client.pipeline(transaction=False)
        for args, _ in batch:
            pipe.execute_command(*args)
        replies = await pipe.execute(raise_on_error=False)
        for (_, future), reply in zip(batch, replies, strict=True):
            future.set_result(reply)


async def drive(call: Call, requests: int, tasks: int, tag: str) -> float:
    """Run `requests` begin+complete pairs on `tasks` tasks; return the wall seconds."""
    begin, complete = _Script(BEGIN), _Script(COMPLETE)
    counter = iter(range(requests))

    async def worker() -> None:
        for n in counter:
            key = f"idp:bench:{tag}:{n}"
            # fingerprint, token, lease, ttl, takeover, tombstone (off)
            reply = await call("EVALSHA", begin.sha, 1, key, "fp", "tok", 10000, 60000, 0, 0)
            assert reply[0] == 1, reply
            headers = "Content-Type: application/json\r\n"
            done = await call("EVALSHA", complete.sha, 1, key, "tok", 60000, "response", 201,
                              headers, b'{"id":"ord_123"}', 0)  # fmt: skip
            assert done == 1, done

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    return time.perf_counter() - started


async def measure(
    name: str, make: Callable[[], Any], server: RedisServer, args: argparse.Namespace
) -> None:
    client, call, close = make()
    await drive(call, 2000, args.tasks, f"{name}-warm")  # connect, warm caches
    redis_before = services.cpu_ticks(server.pid)
    cpu = time.process_time()
    wall = await drive(call, args.requests, args.tasks, name)
    cpu = time.process_time() - cpu
    redis_cpu = services.cpu_seconds_between(redis_before, services.cpu_ticks(server.pid))
    await close()
    n = args.requests
    print(f"{name:14} client {cpu / n * 1e6:6.1f} µs/request   redis {redis_cpu / n * 1e6:6.1f}"
          f" µs/request   wall {wall / n * 1e6:6.1f} µs/request ({n / wall:,.0f}/s)")  # fmt: skip
    del client


def contenders(primary: str, replicated: str) -> dict[str, Callable[[], Any]]:
    def handwritten() -> Any:
        connection = handwritten_module().RedisConnection(primary, 5.0)
        return connection, connection.call, connection.close

    def batcher(url: str, acks: int) -> Callable[[], Any]:
        def make() -> Any:
            b = RedisBatcher(connection_pool(url, 5.0), 5.0, min_replicas_ack=acks)
            return b, b.call_acknowledged, b.close

        return make

    def pipeline() -> Any:
        client = aioredis.Redis.from_url(primary, retry=Retry(NoBackoff(), 0))
        return client, PipelineBatcher(client).call, client.aclose

    def per_command() -> Any:
        client = aioredis.Redis.from_url(primary, retry=Retry(NoBackoff(), 0))
        return client, client.execute_command, client.aclose

    return {
        "handwritten": handwritten,
        "batcher": batcher(primary, 0),
        "batcher+wait1": batcher(replicated, 1),
        "pipeline": pipeline,
        "per-command": per_command,
    }


def wait_for_replica(replica: RedisServer) -> None:
    wait_until_sync(
        lambda: b"master_link_status:up" in replica.command("INFO", "replication"),
        10, "the replica to connect", 0.05,
    )  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        primary = services.start_redis(Path(tmp), None)
        replica = services.start_redis(
            Path(tmp), None, "--replicaof", "127.0.0.1", str(primary.port), name="replica"
        )
        try:
            loader = aioredis.Redis.from_url(primary.url)
            for source in (BEGIN, COMPLETE):
                await loader.script_load(source)
            await loader.aclose()
            wait_for_replica(replica)
            makers = contenders(primary.url, primary.url)
            for name in args.only or list(makers):
                await measure(name, makers[name], primary, args)
        finally:
            replica.kill()
            primary.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--only", type=lambda s: s.split(","), default=None)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    arguments = parser.parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.run(main(arguments))
    else:
        asyncio.run(main(arguments))
