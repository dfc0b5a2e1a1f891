"""Several worker processes on one port, for more than one core.

Each worker is a full proxy with its own event loop; all of them bind the proxy and admin
ports with SO_REUSEPORT, so the kernel spreads connections across them. Metrics are written
through prometheus-client's multiprocess mode into one directory, so a scrape answered by any
worker adds up all of them. The parent only supervises: it forwards SIGTERM/SIGINT (drain and
exit) and SIGHUP (reload) to the workers and restarts a worker that dies.

`memory://` cannot be shared between processes, so it is refused with several workers: each
worker would keep its own records and a retry landing on another worker would execute again.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from prometheus_client import multiprocess

from proxy import logs
from proxy.server import serve_config

_RESTART_PAUSE = 1.0


def worker_count(value: str) -> int:
    """`--workers` value: a positive number, or `auto` for one per CPU."""
    if value == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1
        )  # fmt: skip
    count = int(value)
    if count < 1:
        raise ValueError("--workers must be at least 1")
    return count


def _worker_main(config_path: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    # A reload that arrives before the worker's loop handles SIGHUP must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise SystemExit(serve_config(config_path, reuse_port=True))


def supervise(config_path: str, count: int, shutdown_grace: float) -> int:
    """Run `count` workers until SIGTERM/SIGINT; return the exit status."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="idempotency-proxy-")
    context = multiprocessing.get_context("spawn")
    workers: list[BaseProcess] = []
    stopping = False

    def start() -> BaseProcess:
        process = context.Process(target=_worker_main, args=(config_path,), name="worker")
        process.start()
        return process

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
            signum = signal.SIGTERM
        for process in workers:
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    workers.extend(start() for _ in range(count))
    logs.event("workers started", workers=count, pids=[p.pid for p in workers])

    while not stopping:
        time.sleep(0.2)
        for index, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
                logs.event("worker exited; restarting", pid=process.pid, code=process.exitcode)
                time.sleep(_RESTART_PAUSE)
                workers[index] = start()

    deadline = time.monotonic() + shutdown_grace + 5
    status = 0
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
            status = 1
        elif process.exitcode:
            status = 1
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]
    return status
