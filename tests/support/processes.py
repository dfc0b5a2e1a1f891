"""What every child process we start has in common: a pid while it runs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field


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
