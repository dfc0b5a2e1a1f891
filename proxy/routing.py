"""Route matching: which policy, if any, governs a request path.

Routes are compiled once at start-up (and on reload); matching is a pure function of the
path. The first route whose pattern matches wins; `*` matches any characters, `/` included.
A path that no route matches is proxied untouched.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.config import RoutePolicy


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`/v1/payments/*` -> a regex that matches the whole path."""
    return re.compile("".join(".*" if part == "*" else re.escape(part)
                              for part in re.split(r"(\*)", pattern)) + r"\Z")  # fmt: skip


class Router:
    """The configured routes, compiled, in the order they were written."""

    def __init__(self, routes: Sequence[RoutePolicy]) -> None:
        self.routes = tuple(routes)
        self._compiled = tuple((compile_pattern(r.path).match, r) for r in self.routes)

    def match(self, path: str) -> RoutePolicy | None:
        """The first route whose pattern matches `path`, or None."""
        for matches, route in self._compiled:
            if matches(path):
                return route
        return None
