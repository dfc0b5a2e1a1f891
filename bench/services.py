"""The processes a benchmark run starts, and what they cost in CPU.

Every server here is the run's own child, on a free loopback port, with its files in the
run's temp directory: an nginx upstream that answers a fixed JSON body, nginx as a plain
reverse proxy, the bare aiohttp pass-through, the idempotency proxy, and a redis-server
(never the one on 6379). CPU is read from /proc: utime + stime of a process and all its
descendants (nginx and multi-worker proxies fork their workers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.ports import free_port
from tests.support.processes import kill_tree, parent_and_cpu, process_tree
from tests.support.proxies import REPO, START_TIMEOUT, ProxyProcess
from tests.support.redis_server import RedisServer

BENCH_DIR = Path(__file__).resolve().parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
UPSTREAM_BODY = '{"id":"ord_123","status":"created","amount":100,"currency":"EUR"}'


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    """`argv` under `taskset -c cpus` (taskset execs, so the pid stays the server's)."""
    return ["taskset", "-c", cpus, *argv] if cpus else argv


# --- CPU accounting ---------------------------------------------------------------------


def cpu_ticks(*roots: int) -> dict[int, int]:
    """CPU ticks used so far by each process of the trees of `roots` (several redis-servers
    of one topology count as one store)."""
    ticks = {}
    for root in roots:
        for pid in process_tree(root):
            stat = parent_and_cpu(pid)
            if stat is not None:
                ticks[pid] = stat[1]
    return ticks


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds the tree used between two `cpu_ticks` snapshots (new workers included)."""
    return sum(t - before.get(pid, 0) for pid, t in after.items()) / CLOCK_TICKS


def cpu_busy() -> dict[int, tuple[int, int]]:
    """Per CPU: (busy ticks, all ticks) so far, from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def busy_share(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]
) -> float:
    """How busy `cpus` were between two `cpu_busy` snapshots (0..1), whoever kept them busy."""
    busy = sum(after[c][0] - before[c][0] for c in cpus)
    total = sum(after[c][1] - before[c][1] for c in cpus)
    return busy / total if total else 0.0


# --- processes ----------------------------------------------------------------------------


@dataclass
class Server:
    """A child process serving HTTP (or Redis) on `port`."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL for the tree after `timeout`; a worker that outlived its
        parent (orphaned, so no longer in the tree) is killed too."""
        if self.process.poll() is not None:
            return
        children = process_tree(self.pid)[1:]
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.pid)
            self.process.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _spawn(
    name: str,
    argv: list[str],
    log: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env, stdin=subprocess.DEVNULL
        )


@contextlib.contextmanager
def killed_unless_ready(server: Server) -> Iterator[None]:
    """Kill `server`'s tree if waiting for it fails (or is interrupted): nobody else holds
    it yet to stop it."""
    try:
        yield
    except BaseException:
        kill_tree(server.pid)
        server.process.wait()
        raise


def wait_http(server: Server, path: str, method: str = "GET", timeout: float = 15.0) -> None:
    """Wait until `server` answers `method path` with 200 (through to the upstream)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"{server.name} exited:\n{server.log_tail()}")
        try:
            data = b"{}" if method == "POST" else None
            request = urllib.request.Request(server.url + path, data=data, method=method)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
                last = response.status
        except Exception as exc:  # not up yet: connection refused, 502 while it starts, ...
            last = exc
        time.sleep(0.05)
    raise RuntimeError(
        f"{server.name} did not answer {method} {path} with 200: {last}\n{server.log_tail()}"
    )


_NGINX_COMMON = """
daemon off;
master_process on;
worker_processes {workers};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""


def _nginx(name: str, workers: int, body: str, port: int, tmp: Path, cpus: str | None) -> Server:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    prefix = tmp / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_NGINX_COMMON.format(workers=workers, prefix=prefix, body=body))
    log = prefix / "stderr.log"
    # `user root` is not set: as root, nginx workers drop to `nobody`, which only needs to
    # read nothing (no files are served).
    argv = [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    process = _spawn(name, pinned(cpus, argv), log)
    return Server(name, port, process, log, url=f"http://127.0.0.1:{port}")


def start_upstream(tmp: Path, cpus: str | None, workers: int = 2) -> Server:
    """The legacy API stand-in: nginx answering 200 + a fixed JSON body to any method."""
    port = free_port()
    body = f"""
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY}';
        }}
    }}"""
    server = _nginx("upstream", workers, body, port, tmp, cpus)
    with killed_unless_ready(server):
        wait_http(server, "/")
    return server


def start_nginx_proxy(tmp: Path, upstream: Server, workers: int, cpus: str | None) -> Server:
    """nginx as a plain reverse proxy with a keepalive pool to the upstream."""
    port = free_port()
    body = f"""
    upstream backend {{
        server 127.0.0.1:{upstream.port};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    server = _nginx(f"nginx-proxy-{workers}w", workers, body, port, tmp, cpus)
    with killed_unless_ready(server):
        wait_http(server, "/")
    return server


def start_passthrough(tmp: Path, upstream: Server, workers: int, cpus: str | None) -> Server:
    port = free_port()
    log = tmp / f"passthrough-{workers}w.log"
    argv = [
        sys.executable,
        str(BENCH_DIR / "passthrough.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream.url,
        "--workers",
        str(workers),
    ]
    server = Server(
        "passthrough",
        port,
        _spawn("passthrough", pinned(cpus, argv), log),
        log,
        url=f"http://127.0.0.1:{port}",
    )
    with killed_unless_ready(server):
        wait_http(server, "/ready")
        wait_listening(server, workers)
    return server


def proxy_supports_workers() -> bool:
    """Whether `idempotency-proxy run` has a `--workers` option yet."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return "--workers" in result.stdout


def proxy_config(
    port: int,
    admin_port: int,
    upstream: Server,
    store_url: str,
    log_level: str,
    min_replicas_ack: int = 0,
) -> str:
    """The bench's proxy config: `/open/*` streams POSTs through, `/pay/*` protects them,
    `/observe/*` observes them (mode: observe)."""
    acks = f", min_replicas_ack: {min_replicas_ack}" if min_replicas_ack else ""
    return f"""# written by bench/harness.py
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin_port}
upstream: {upstream.url}
log_level: {log_level}
shutdown_grace: 2s
store: {{url: "{store_url}", max_records: 2000000, max_bytes: 4GiB{acks}}}
routes:
  # Only PATCH is protected here, so the benchmark's POSTs take the unprotected path
  # with exactly the same bytes on the wire as the protected cases.
  - {{path: /open/*, id: open, methods: [PATCH]}}
  - {{path: /pay/*, id: pay}}
  # The same protection, observed only: every request forwarded, duplicates counted.
  - {{path: /observe/*, id: observe, mode: observe}}
"""


def start_proxy(
    tmp: Path,
    name: str,
    upstream: Server,
    store_url: str,
    workers: int,
    cpus: str | None,
    log_level: str,
    pass_workers: bool,
    extra_config: str = "",
    min_replicas_ack: int = 0,
) -> Server:
    """The bench's proxy (`proxy_config`, with `extra_config` YAML appended) as a process,
    once every worker listens."""
    port, admin_port = free_port(), free_port()
    config = tmp / f"{name}.yaml"
    config.write_text(
        proxy_config(port, admin_port, upstream, store_url, log_level, min_replicas_ack)
        + extra_config
    )
    # The proxy's JSON log lines (stderr) land in its log; the bench config is the whole
    # truth (the caller's IDEMPOTENCY_PROXY_* variables are left out).
    proxy = ProxyProcess(
        config,
        tmp / f"{name}.log",
        args=("--workers", str(workers)) if pass_workers else (),
        argv_prefix=pinned(cpus, []),
    )
    proxy.spawn()
    assert proxy.process is not None
    server = Server(
        name, port, proxy.process, proxy.log_path, url=proxy.url, extra={"config": str(config)}
    )
    # Every worker imports the proxy on its own: on a busy 2-core machine 4 of them took
    # more than 15 s to listen.
    timeout = START_TIMEOUT * max(1.0, workers / 2)
    with killed_unless_ready(server):
        wait_http(server, "/open/ready", method="POST", timeout=timeout)
        if pass_workers:  # one answered; the others may still be importing
            wait_listening(server, workers, timeout)
    return server


def listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (with SO_REUSEPORT, one per process)."""
    local = f"0100007F:{port:04X}"  # /proc/net/tcp: address and port in hex
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # state LISTEN
            count += 1
    return count


def wait_listening(server: Server, workers: int, timeout: float = 30.0) -> None:
    """Wait until each of `workers` processes listens on the port: a worker that is still
    starting would leave the first seconds of the run to the others."""
    deadline = time.monotonic() + timeout
    while (count := listening_sockets(server.port)) < workers:
        if not server.alive() or time.monotonic() > deadline:
            raise RuntimeError(
                f"{server.name}: {count} of {workers} processes listening\n{server.log_tail()}"
            )
        time.sleep(0.05)


def start_redis(tmp: Path, cpus: str | None, *extra: str, name: str = "redis") -> RedisServer:
    """A redis-server of the run's own: no persistence, on a free port (`extra` arguments
    such as `--replicaof 127.0.0.1 PORT` appended)."""
    server = RedisServer(
        tmp / name, extra_args=extra, argv_prefix=pinned(cpus, []), log=tmp / f"{name}.log"
    )
    server.start()
    return server
