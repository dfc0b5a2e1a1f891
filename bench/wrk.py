"""Running wrk and reading its report.

Figures come from wrk's own text: `Requests/sec`, the request count, and the `--latency`
"Latency Distribution" (50/75/90/99 %). Errors are read too, so that a case whose proxy
answered 409s or dropped connections is flagged instead of looking fast.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s|m|h)$")
_PERCENTILE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+([\d.]+(?:us|ms|s|m|h))\s*$")
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+\w+),")
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency: dict[str, float]  # "50" -> seconds
    non_2xx: int = 0
    socket_errors: int = 0
    raw: str = field(default="", repr=False)

    @property
    def p50(self) -> float:
        return self.latency["50"]

    @property
    def p99(self) -> float:
        return self.latency["99"]

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["raw"]
        return data


def parse_duration(text: str) -> float:
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkResult:
    """Read wrk's `--latency` report."""
    latency: dict[str, float] = {}
    requests = seconds = rps = None
    non_2xx = socket_errors = 0
    in_distribution = False
    for line in output.splitlines():
        if "Latency Distribution" in line:
            in_distribution = True
            continue
        if in_distribution:
            match = _PERCENTILE.match(line)
            if match:
                latency[f"{float(match.group(1)):g}"] = parse_duration(match.group(2))
                continue
            in_distribution = False
        if match := _REQUESTS.match(line):
            requests, seconds = int(match.group(1)), parse_duration(match.group(2))
        elif match := _RATE.match(line):
            rps = float(match.group(1))
        elif match := _NON_2XX.search(line):
            non_2xx = int(match.group(1))
        elif match := _SOCKET_ERRORS.search(line):
            socket_errors = sum(int(g) for g in match.groups())
    if requests is None or seconds is None or rps is None or "50" not in latency:
        raise ValueError(f"cannot read wrk's report:\n{output}")
    return WrkResult(requests, seconds, rps, latency, non_2xx, socket_errors, output)


def run(
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int,
    script: str | None,
    script_args: list[str],
    cpus: str | None,
    timeout: str = "5s",
) -> WrkResult:
    """One wrk run against `url`; raises if wrk fails or prints no report."""
    argv = [
        "wrk",
        "--latency",
        "-t",
        str(max(1, min(threads, connections))),
        "-c",
        str(connections),
        "-d",
        f"{duration:g}s",
        "--timeout",
        timeout,
    ]
    if script:
        argv += ["-s", script]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    if cpus:
        argv = ["taskset", "-c", cpus, *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr or result.stdout}")
    return parse(result.stdout)
