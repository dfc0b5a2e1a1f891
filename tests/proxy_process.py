"""The proxy as a real process: `python -m proxy run --config FILE`.

Fault tests need what an in-process proxy cannot give: a process that can be SIGKILLed
mid-flight, frozen with SIGSTOP, or sent SIGTERM to drain. `start_process` writes a temp
YAML config (loopback, port 0), starts the command, reads the ports it chose from its
"listening" log line and waits for its admin /healthz. Its stderr (JSON logs) goes to a
file, so a test can look for an event the proxy logged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.conftest import raw_config

_REPO = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 15.0


@dataclass
class ProxyProcess:
    """A running `python -m proxy run` with its listeners and its log file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    admin_url: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no draining, leases left as they are."""
        if self.process.poll() is None:
            self.process.kill()

    def terminate(self) -> None:
        """SIGTERM: the proxy's graceful shutdown."""
        self.process.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        """The exit status, once the process has ended; TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy pid {self.pid} still running after {timeout}s")
            await asyncio.sleep(0.01)
        return code

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line the process wrote so far."""
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except ValueError:
                parsed.append({"event": line})
        return parsed

    def peak_rss_kib(self) -> int:
        """The process's peak resident memory so far (VmHWM), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM in /proc/<pid>/status")


def write_config(directory: Path, upstream_url: str, **overrides: Any) -> Path:
    """A YAML config like tests.conftest.make_config's, written to `directory`."""
    raw = raw_config(upstream_url, **overrides)
    path = directory / f"proxy-{os.urandom(4).hex()}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


async def start_process(directory: Path, upstream_url: str, **overrides: Any) -> ProxyProcess:
    """Start a proxy process with `overrides` on top of the test config; wait until ready."""
    config = write_config(directory, upstream_url, **overrides)
    log_path = config.with_suffix(".log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPOTENCY_PROXY_")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            cwd=_REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    running = ProxyProcess(process, log_path)
    try:
        await _wait_until_listening(running)
    except BaseException:
        running.kill()
        process.wait()
        raise
    return running


async def _wait_until_listening(running: ProxyProcess) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while not running.url:
        if running.process.poll() is not None:
            raise RuntimeError(f"the proxy exited at start:\n{running.log_path.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the proxy did not start:\n{running.log_path.read_text()}")
        for line in running.events():
            if line.get("event") == "listening":
                running.url, running.admin_url = line["proxy"], line["admin"]
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(running.admin_url + "/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the proxy's /healthz never answered 200")
            await asyncio.sleep(0.02)


async def stop_process(running: ProxyProcess) -> None:
    """Make sure the process is gone (SIGCONT first, in case a test froze it)."""
    if running.process.poll() is None:
        running.process.send_signal(signal.SIGCONT)
        running.kill()
    await running.wait(10)
