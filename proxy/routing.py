"""Route matching: which policy, if any, governs a request path.

Routes are compiled once at start-up (and on reload); matching is a pure function of the
path. The first route whose pattern matches wins; `*` matches any characters, `/` included.
A path that no route matches is proxied untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from operator import methodcaller

from proxy.config import RoutePolicy


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`/v1/payments/*` -> a regex that matches the whole path."""
    return re.compile("".join(".*" if part == "*" else re.escape(part)
                              for part in re.split(r"(\*)", pattern)) + r"\Z")  # fmt: skip


def compile_matcher(pattern: str) -> Callable[[str], object]:
    """A predicate for `pattern`: plain string tests for the common shapes, else a regex.

    `/v1/payments/*` (one trailing star) is a prefix test and `/exact` an equality test;
    they run on every request, and a regex match costs several times more.
    """
    star = pattern.find("*")
    if star == -1:
        return pattern.__eq__
    if star == len(pattern) - 1:
        return methodcaller("startswith", pattern[:-1])
    return compile_pattern(pattern).match


def normalize(path: str) -> str:
    """`path` with `.` and `..` segments resolved and repeated slashes collapsed.

    Routes are matched on this form, so that `/x/../payments/1` or `//payments/1` cannot
    slip past a `/payments/*` route that requires a key, to an upstream that normalises the
    path and runs it as `/payments/1`. The request is still forwarded as the client sent it.
    """
    if "//" not in path and "/." not in path:  # the usual case: nothing to resolve
        return path
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    trailing = "/" if path.endswith(("/", "/.", "/..")) and segments else ""
    return "/" + "/".join(segments) + trailing


class Router:
    """The configured routes, compiled, in the order they were written."""

    def __init__(self, routes: Sequence[RoutePolicy]) -> None:
        self.routes = tuple(routes)
        self._compiled = tuple((compile_matcher(r.path), r) for r in self.routes)

    def match(self, path: str) -> RoutePolicy | None:
        """The first route whose pattern matches `path` (as an upstream that resolves dot
        segments and repeated slashes reads it), or None."""
        path = normalize(path)
        for matches, route in self._compiled:
            if matches(path):
                return route
        return None
