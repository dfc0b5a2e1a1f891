"""Where the proxy's CPU goes under load: py-spy samples, summarised.

`record` runs `py-spy record --format raw` (collapsed stacks) against a running proxy;
`summarise` turns the stacks into self time (the innermost Python frame of each sample:
time spent in that function's own bytecode and the C calls it makes) and inclusive time,
per function. Frames are grouped by function, not by line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")
# The code the brief asks about: the proxy itself and the libraries on its hot path.
_REPO = str(Path(__file__).resolve().parent.parent) + "/"
OWN_AND_LIBS = ("proxy/", "aiohttp/", "redis/", "multidict/", "yarl/", "prometheus_client/")


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path, rate: int = 400) -> subprocess.Popen[bytes]:
    """Start sampling `pid` and its children for `seconds`; the caller waits for it.

    py-spy pauses the process for each sample (its default, for consistent stacks): a
    little slower under the profiler, so profiled runs are never the measured ones.
    """
    binary = py_spy()
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        "--subprocesses",
        "--output",
        str(output),
    ]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def short(frame: str) -> str:
    """`handle (/x/site-packages/aiohttp/web_protocol.py)` -> `handle (aiohttp/web_protocol.py)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3", _REPO):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = "stdlib/" + path.split("/", 1)[1]
            break
    return f"{match.group('func')} ({path})"


@dataclass
class Summary:
    samples: int
    self_time: Counter[str]
    inclusive: Counter[str]

    def top_self(self, n: int, only: tuple[str, ...] = ()) -> list[tuple[str, int]]:
        rows = [(f, c) for f, c in self.self_time.most_common() if _matches(f, only)]
        return rows[:n]

    def top_inclusive(self, n: int, only: tuple[str, ...] = ()) -> list[tuple[str, int]]:
        # Frames in (nearly) every sample are the entry points (main, run): no information.
        rows = [
            (f, c)
            for f, c in self.inclusive.most_common()
            if _matches(f, only) and c < 0.99 * self.samples
        ]
        return rows[:n]


def _matches(frame: str, only: tuple[str, ...]) -> bool:
    return not only or any(f"({prefix}" in frame for prefix in only)


def summarise(path: Path) -> Summary:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [short(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return Summary(samples, self_time, inclusive)


def report(title: str, summary: Summary, n: int = 15) -> str:
    def block(name: str, rows: list[tuple[str, int]]) -> list[str]:
        out = [f"  {name}"]
        for frame, count in rows:
            out.append(f"    {100 * count / max(1, summary.samples):5.1f} %  {frame}")
        return out

    lines = [f"{title}: {summary.samples} samples"]
    lines += block("self time, all code:", summary.top_self(n))
    lines += block(
        "self time, proxy/ aiohttp/ redis/ multidict/ yarl/ prometheus_client/:",
        summary.top_self(n, OWN_AND_LIBS),
    )
    lines += block(
        "inclusive time, the proxy's own functions (a spawned task's stack starts afresh):",
        summary.top_inclusive(n, ("proxy/",)),
    )
    return "\n".join(lines)
