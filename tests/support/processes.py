"""What every child process we start has in common: a pid while it runs, and descendants.

A proxy started with --workers forks worker processes; killing only the parent leaves them
running (and holding their port) after the test, so whoever kills a child kills its tree.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path


def parent_and_cpu(pid: int) -> tuple[int, int] | None:
    """(parent pid, utime + stime in ticks) of `pid`, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may contain spaces
    return int(fields[1]), int(fields[11]) + int(fields[12])


def process_tree(root: int) -> list[int]:
    """`root` and every descendant of it, parents before their children."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := parent_and_cpu(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def kill_tree(root: int) -> None:
    """SIGKILL `root` and its descendants, children first so that none is left orphaned."""
    for pid in reversed(process_tree(root)):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class ChildProcess:
    """A process this test run (or benchmark) started; None before its first start."""

    process: subprocess.Popen[bytes] | None = field(default=None, kw_only=True)

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{type(self).__name__} is not running"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None
