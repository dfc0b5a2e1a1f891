"""A redis-server of our own: on a free port, never the shared one on 6379.

Tests stop, kill, freeze and restart it to see what the proxy does when its store fails;
the benchmark pins it to a CPU; the soak SIGKILLs it on a schedule with an append-only file
so that a restart reloads the records. All of that is this one class: the server's settings
are redis.conf lines (defaults first, then `config`, where a later line wins), so a caller
asks for a password, persistence or anything else without a new launcher.

Sentinel and Cluster launchers belong next to this one: they differ only in their config
lines (`sentinel monitor ...`, `cluster-enabled yes`) and in how they are judged ready, so
they can build on `config_lines` and `argv` the same way.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import LOOPBACK, free_port
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until

SHARED_PORT = 6379  # the machine's own Redis: never started, flushed or even spoken to
ANSWERS = (b"+PONG", b"-NOAUTH")  # replies to PING from a server that is up


def redis_binary(name: str = "redis-server") -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (scripts/bootstrap installs it)")
    return binary


@dataclass
class RedisServer(ChildProcess):
    """One redis-server process on `port`, its files in `directory`; restartable."""

    directory: Path
    port: int = field(default_factory=free_port)
    config: Sequence[str] = ()  # extra redis.conf lines, e.g. "maxmemory 1mb"
    extra_args: Sequence[str] = ()  # appended to the command line, e.g. ("--replicaof", ...)
    password: str = ""  # set: the server requires AUTH (requirepass), and `url` carries it
    argv_prefix: Sequence[str] = ()  # e.g. ("taskset", "-c", "1")
    log: Path | None = None  # where its output goes; None: discarded
    frozen: bool = False

    def __post_init__(self) -> None:
        assert self.port != SHARED_PORT, "never touch the shared redis-server"

    @property
    def url(self) -> str:
        userinfo = f":{self.password}@" if self.password else ""
        return f"redis://{userinfo}{LOOPBACK}:{self.port}/0"

    def config_lines(self) -> list[str]:
        """The whole redis.conf: no persistence, loopback only, then `config` on top."""
        return [
            f"port {self.port}",
            f"bind {LOOPBACK}",
            'save ""',
            "appendonly no",
            f'dir "{self.directory}"',
            "loglevel warning",
            *([f"requirepass {self.password}"] if self.password else []),
            *self.config,
        ]

    def argv(self) -> list[str]:
        """The command line, after writing the config file it names."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"redis-{self.port}.conf"
        path.write_text("\n".join(self.config_lines()) + "\n", encoding="utf-8")
        return [*self.argv_prefix, redis_binary(), str(path), *self.extra_args]

    def spawn(self) -> None:
        """Start the process without waiting for it to answer."""
        assert not self.alive(), "redis-server is already running"
        if self.log is None:
            self.process = subprocess.Popen(
                self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        else:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("ab") as out:
                self.process = subprocess.Popen(self.argv(), stdout=out, stderr=out)
        self.frozen = False

    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until it answers PING."""
        self.spawn()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if not self.alive() or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    async def start_async(self, timeout: float = 10.0) -> None:
        """`start` for callers inside an event loop (a reload of a large AOF takes a while)."""
        self.spawn()
        await wait_until(self.ping_async, timeout, f"redis-server on port {self.port}", 0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, as an orderly shutdown; SIGKILL if it has not exited after `timeout`."""
        if self.process is None:
            return
        self.thaw()
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: gone at once, nothing flushed; what a crash looks like to the proxy."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        self.frozen = False

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, like a stalled host."""
        assert self.process is not None, "redis-server is not running"
        self.process.send_signal(signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """SIGCONT after `freeze`; the commands sent meanwhile run now."""
        if self.process is not None and self.frozen:
            self.process.send_signal(signal.SIGCONT)
        self.frozen = False

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """Send one inline command and return the raw reply (FLUSHALL, CLIENT PAUSE, INFO)."""
        with socket.create_connection((LOOPBACK, self.port), timeout=timeout) as sock:
            sock.sendall(self._auth() + (" ".join(args) + "\r\n").encode())
            reply = sock.recv(1 << 20)
            if self.password:  # the AUTH reply came first
                reply = reply.removeprefix(b"+OK\r\n") or sock.recv(1 << 20)
            return reply

    def _auth(self) -> bytes:
        return f"AUTH {self.password}\r\n".encode() if self.password else b""

    def ping(self) -> bool:
        """Whether it answers (a server with a password answers NOAUTH: up all the same)."""
        try:
            return self.command("PING", timeout=0.2).startswith(ANSWERS)
        except OSError:
            return False

    async def ping_async(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            return (await asyncio.wait_for(reader.readline(), 1)).startswith(ANSWERS)
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
