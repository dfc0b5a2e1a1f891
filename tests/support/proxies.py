"""The proxy under test: its test config, in this event loop, or as a process of its own.

In-process (`ProxyStarter`) is the fast default: the test reaches the running app, its store
and its config. As a process (`ProxyProcess`), the proxy can be SIGKILLed mid-flight, frozen
with SIGSTOP, drained with SIGTERM, run with --workers, or pinned to a CPU by a benchmark;
its stderr (JSON logs) goes to a file a test can read, and the environment the caller runs
in never leaks into it (no IDEMPOTENCY_PROXY_*, OTEL_* or PROMETHEUS_MULTIPROC_DIR unless asked).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.config import Config, parse_config
from proxy.server import Running, serve
from tests.support.ports import LOOPBACK
from tests.support.processes import ChildProcess, kill_tree

REPO = Path(__file__).resolve().parents[2]
# How long a proxy process may take to import and bind. Not a claim the tests make: on a
# 2-core machine under a load of 10+, two --workers processes took more than 15 s.
START_TIMEOUT = 25.0
# Settings of the caller's environment that must not slip into a proxy process.
SCRUBBED_ENV = ("IDEMPOTENCY_PROXY_", "PROMETHEUS_MULTIPROC_DIR", "OTEL_")


# --- the test config -------------------------------------------------------------------


def raw_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A test config as YAML data: loopback, free ports, memory store, one catch-all route;
    `overrides` on top (a mapping is merged into its section, anything else replaces)."""
    raw: dict[str, Any] = {
        "listen": f"{LOOPBACK}:0",
        "admin_listen": f"{LOOPBACK}:0",
        "upstream": upstream_url,
        # A store call may take this long before it counts as failed: 4x the default, so that
        # a machine at a load of 10 does not turn a behaviour test into a store-outage test
        # (the fault tests set their own).
        "store": {"url": "memory://", "timeout": "2s"},
        "shutdown_grace": "5s",
        "routes": [{"path": "/*", "id": "all"}],
    }
    for name, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    return raw


def make_config(upstream_url: str, **overrides: Any) -> Config:
    """`raw_config`, validated."""
    return parse_config(raw_config(upstream_url, **overrides), env={})


def write_config(path: Path, upstream_url: str, **overrides: Any) -> Path:
    """`raw_config` written as a YAML file at `path` (replaced if it exists)."""
    path.write_text(yaml.safe_dump(raw_config(upstream_url, **overrides)), encoding="utf-8")
    return path


# --- in this event loop ----------------------------------------------------------------


class ProxyStarter:
    """Starts proxies in the running loop in front of one upstream; all stop with `stack`."""

    def __init__(self, stack: AsyncExitStack, upstream_url: str) -> None:
        self.stack, self.upstream_url = stack, upstream_url

    async def __call__(self, **overrides: Any) -> Running:
        config = make_config(self.upstream_url, **overrides)
        return await self.stack.enter_async_context(serve(config))


# --- as a process ------------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the proxy's own settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCRUBBED_ENV)}
    return {**env, **(extra or {})}


def _url(listen: str) -> str:
    """The URL of a `host:port` listen setting, or "" while the port is still to be chosen."""
    host, _, port = listen.rpartition(":")
    return "" if port == "0" else f"http://{host}:{port}"


@dataclass
class ProxyProcess(ChildProcess):
    """`idempotency-proxy run --config FILE` as a child process, restartable, its log a file.

    With port 0 in the config, `url` and `admin_url` are read from the "listening" log line.
    """

    config: Path
    log_path: Path
    args: Sequence[str] = ()  # after `run --config FILE`, e.g. ("--workers", "2")
    env: Mapping[str, str] = field(default_factory=dict)  # on top of `child_env()`
    command: Sequence[str] = (sys.executable, "-m", "proxy")
    cwd: Path = REPO
    argv_prefix: Sequence[str] = ()  # e.g. ("taskset", "-c", "0")
    url: str = ""
    admin_url: str = ""
    workers: list[int] = field(default_factory=list)  # worker pids, when a test learns them

    def spawn(self) -> None:
        """Start the process (appending to its log) without waiting for it."""
        raw = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        self.url, self.admin_url = _url(raw["listen"]), _url(raw["admin_listen"])
        argv = [*self.argv_prefix, *self.command, "run", "--config", str(self.config), *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, cwd=self.cwd, env=child_env(self.env),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    async def healthy(self) -> bool:
        """Whether the admin /healthz answers 200 now; RuntimeError if the process ended."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the proxy exited with {self.process.returncode}:\n{self.text()}")
        if not self.admin_url:
            for line in self.events():
                if line.get("event") == "listening":
                    self.url, self.admin_url = line["proxy"], line["admin"]
            if not self.admin_url:
                return False
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.admin_url + "/healthz", timeout=aiohttp.ClientTimeout(1)) as r,
            ):
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_ready(self, listening: int = 1, timeout: float = START_TIMEOUT) -> None:
        """Until /healthz answers 200 and `listening` processes logged that they listen."""
        deadline = time.monotonic() + timeout
        while not (await self.healthy() and self.text().count('"event":"listening"') >= listening):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy did not start:\n{self.text()}")
            await asyncio.sleep(0.02)

    async def start(self, listening: int = 1, timeout: float = START_TIMEOUT) -> None:
        """Spawn and wait until ready; killed again if it does not get there."""
        self.spawn()
        try:
            await self.wait_ready(listening, timeout)
        except BaseException:
            self.kill()
            raise

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None, "the proxy is not running"
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, workers included: no cleanup, no draining, leases left as they are."""
        for pid in self.workers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            kill_tree(self.process.pid)
            self.process.wait()

    def terminate(self) -> None:
        """SIGTERM: the proxy's graceful shutdown."""
        self.signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        """The exit status, once the process has ended; TimeoutError after `timeout`."""
        assert self.process is not None, "the proxy was never started"
        try:
            return await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"proxy pid {self.pid} still running after {timeout}s") from None

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, and the exit status once the process (and its workers) ended."""
        if self.alive():
            self.terminate()
        return await self.wait(timeout)

    async def close(self) -> None:
        """Make sure the process is gone (SIGCONT first, in case a test froze it)."""
        if self.alive():
            self.signal(signal.SIGCONT)
        self.kill()
        if self.process is not None:
            await self.wait(10)

    def text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        """Every log line so far, parsed; a line that is not JSON becomes {"event": line}."""
        parsed = []
        for line in self.text().splitlines():
            try:
                parsed.append(json.loads(line))
            except ValueError:
                parsed.append({"event": line})
        return parsed

    def lines(self) -> list[dict[str, Any]]:
        """Every complete log line, each of which must be one JSON object."""
        *complete, _partial = self.text().split("\n")  # a line being written is not done yet
        return [json.loads(line) for line in complete]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line["event"] == event]

    def peak_rss_kib(self) -> int:
        """The process's peak resident memory so far (VmHWM), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/<pid>/status")


async def start_process(
    directory: Path,
    upstream_url: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    listening: int = 1,
    **overrides: Any,
) -> ProxyProcess:
    """A proxy process with `overrides` on top of the test config, started and ready."""
    config = write_config(directory / f"proxy-{os.urandom(4).hex()}.yaml", upstream_url,
                          **overrides)  # fmt: skip
    running = ProxyProcess(config, config.with_suffix(".log"), args=args, env=env or {})
    await running.start(listening)
    return running
