"""What a tombstone costs: bytes per key remembered after its response expired.

For each store, N keys are executed with a 1 KiB JSON response (and the headers an API
sends) under a tombstone, then their responses expire and each key is asked for again (the
retry that turns a record into its tombstone). Measured:

- Redis: `MEMORY USAGE` of one record (SAMPLES 0) while its response is kept, as a tombstone
  touched by a retry (headers and body deleted), and as a tombstone nobody asked for again
  (Redis before 7.4 cannot expire part of a hash, so it keeps its body until it expires);
  plus `used_memory` from INFO over N tombstones, which counts the keyspace's own overhead.
- memory://: `tracemalloc` over N records, live and as tombstones.

It starts its own redis-server on a free loopback port (never the one on 6379). Run:

    .venv/bin/python -m bench.tombstones             # N = 10000, a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import tracemalloc
from pathlib import Path

from bench.services import start_redis
from proxy.keys import storage_key
from proxy.store.base import Acquired, Expired, Outcome, Store, StoredResponse
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.support.redis_server import RedisServer

TTL, TOMBSTONE = 0.2, 3600.0


def response() -> Outcome:
    """A 1 KiB JSON response with an API's headers, fresh objects as the proxy makes them."""
    headers = (("Content-Type", "application/json"), ("Content-Length", "1024"),
               ("Date", "Fri, 31 Jan 2025 12:00:00 GMT"),
               ("X-Request-Id", "req_" + os.urandom(6).hex()))  # fmt: skip
    return Outcome("response", StoredResponse(201, headers, os.urandom(512).hex().encode()))


def keys(count: int, prefix: str) -> list[tuple[str, str]]:
    """(record, fingerprint) pairs as the proxy makes them."""
    return [(storage_key("default", os.urandom(16), f"{prefix}-{i}").store,
             os.urandom(16).hex()) for i in range(count)]  # fmt: skip


async def execute(store: Store, records: list[tuple[str, str]]) -> None:
    for record, fingerprint in records:
        lock = await store.begin(record, fingerprint, lease=10, ttl=TTL, takeover=False)
        assert isinstance(lock, Acquired)
        done = await store.complete(record, lock.token, response(), ttl=TTL, tombstone=TOMBSTONE)
        assert done


async def retry(store: Store, records: list[tuple[str, str]]) -> None:
    for record, fingerprint in records:
        decision = await store.begin(record, fingerprint, lease=10, ttl=TTL, takeover=False,
                                     tombstone=TOMBSTONE)  # fmt: skip
        assert decision == Expired("response", 201), decision


def used_memory(server: RedisServer) -> int:
    info = server.command("INFO", "memory").decode()
    match = re.search(r"^used_memory:(\d+)", info, re.M)
    assert match
    return int(match.group(1))


def usage(server: RedisServer, record: str) -> int:
    return int(server.command("MEMORY", "USAGE", record, "SAMPLES", "0")[1:].strip())


async def measure_redis(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp), None)
        try:
            store = RedisStore(server.url, timeout=5)
            untouched, touched = keys(1, "untouched"), keys(count, "touched")
            await execute(store, untouched)
            live = usage(server, untouched[0][0])
            before = used_memory(server)
            await execute(store, touched)
            await asyncio.sleep(TTL + 0.05)
            await retry(store, touched)
            after = used_memory(server)
            info = server.command("INFO", "server").decode()
            version = re.search(r"^redis_version:(\S+)", info, re.M)
            print(f"Redis {version.group(1) if version else '?'}:")
            print(f"  record with its response (1 KiB body): {live} bytes (MEMORY USAGE)")
            print(f"  tombstone, untouched since its response expired: "
                  f"{usage(server, untouched[0][0])} bytes")  # fmt: skip
            print(f"  tombstone after a retry (headers, body deleted): "
                  f"{usage(server, touched[0][0])} bytes (MEMORY USAGE)")  # fmt: skip
            print(f"  used_memory over {count} such tombstones: {(after - before) / count:.0f} "
                  "bytes each")  # fmt: skip
            await store.close()
        finally:
            server.kill()


async def measure_memory(count: int) -> None:
    now = [1000.0]
    store = MemoryStore(max_records=count * 2, clock=lambda: now[0])
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    records = keys(count, "m")  # the keys and fingerprints count: the store keeps them
    await execute(store, records)
    live = tracemalloc.get_traced_memory()[0]
    now[0] += TTL + 1
    await retry(store, records)
    tomb = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"memory:// (Python {sys.version.split()[0]}, tracemalloc over {count} records):")
    # The bench's own list of (record, fingerprint) tuples is not the store's: left out.
    own = sys.getsizeof(records) + sum(sys.getsizeof(pair) for pair in records)
    print(f"  record with its response (1 KiB body): {(live - before - own) / count:.0f} bytes")
    print(f"  tombstone: {(tomb - before - own) / count:.0f} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    args = parser.parse_args()
    asyncio.run(measure_redis(args.count))
    asyncio.run(measure_memory(args.count))


if __name__ == "__main__":
    main()
