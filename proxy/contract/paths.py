"""Which routes govern an OpenAPI operation: route patterns against path templates.

A route pattern (`/v1/payments/*`, where `*` is any characters, `/` too) and a path template
(`/v1/payments/{id}`, where `{id}` is one or more characters other than `/`) each stand for a
set of request paths. A route *covers* a template when every path of the template matches it,
and *touches* it when some do: `/v1/payments/refunds` touches `/v1/payments/{id}` but covers
only one of its paths. As the proxy takes the first route that matches a request, the routes
that govern an operation are those that touch its template up to the first that covers it.

Both questions are answered exactly, on the patterns themselves, never by trying sample paths:
"covers" by one match of the template with each parameter replaced by a character no route
pattern contains (only a `*` can match it, and a `*` matches anything in its place), "touches"
by walking the two patterns' automata side by side until both can end.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config import RoutePolicy
from proxy.routing import compile_pattern

_PARAMETER = re.compile(r"\{[^{}/]*\}")
# Stand-ins for "any character but `/`" that no route pattern is likely to contain; one that
# does is skipped for that pattern.
_OPAQUE = ("\ue000", "\ue001", "\ue002")

# Automaton steps. A route pattern: a literal character, or ANY (`*`: any characters, none
# included). A template: a literal character, or SEGMENT_FIRST then SEGMENT_REST (`{x}`).
_ANY = "any"
_SEGMENT_FIRST = "segment-first"
_SEGMENT_REST = "segment-rest"
_OTHER = "\x00"  # any character that appears in neither pattern


def covers(pattern: str, template: str) -> bool:
    """Whether every path of `template` matches the route pattern."""
    opaque = next(char for char in _OPAQUE if char not in pattern)
    return compile_pattern(pattern).match(_PARAMETER.sub(opaque, template)) is not None


def _route_steps(pattern: str) -> list[str]:
    return [_ANY if char == "*" else char for char in pattern]


def _template_steps(template: str) -> list[str]:
    steps: list[str] = []
    for index, part in enumerate(_PARAMETER.split(template)):
        if index:
            steps += [_SEGMENT_FIRST, _SEGMENT_REST]
        steps += list(part)
    return steps


def _closure(steps: Sequence[str], states: set[int], skippable: str) -> set[int]:
    """`states` plus those reached by skipping `skippable` steps (which match nothing too)."""
    found = set(states)
    for state in sorted(states):
        while state < len(steps) and steps[state] == skippable:
            state += 1
            found.add(state)
    return found


def _advance(steps: Sequence[str], state: int, char: str) -> set[int]:
    if state >= len(steps):
        return set()
    step = steps[state]
    if step in (_ANY, _SEGMENT_REST):
        return {state} if step == _ANY or char != "/" else set()
    if step == _SEGMENT_FIRST:
        return {state + 1} if char != "/" else set()
    return {state + 1} if step == char else set()


def touches(pattern: str, template: str) -> bool:
    """Whether some path of `template` matches the route pattern."""
    route, path = _route_steps(pattern), _template_steps(template)
    alphabet = {step for step in [*route, *path] if len(step) == 1} | {_OTHER, "/"}
    start = (0, 0)
    seen = {start}
    frontier = [start]
    while frontier:
        r_state, p_state = frontier.pop()
        r_states = _closure(route, {r_state}, _ANY)
        p_states = _closure(path, {p_state}, _SEGMENT_REST)
        if len(route) in r_states and len(path) in p_states:
            return True
        for char in alphabet:
            for r_next in {n for s in r_states for n in _advance(route, s, char)}:
                for p_next in {n for s in p_states for n in _advance(path, s, char)}:
                    if (r_next, p_next) not in seen:
                        seen.add((r_next, p_next))
                        frontier.append((r_next, p_next))
    return False


@dataclass(frozen=True, slots=True)
class Governing:
    """The routes that decide requests to a template, first match first."""

    routes: tuple[RoutePolicy, ...]
    complete: bool  # the last of them covers the template: no path falls through unrouted

    @property
    def split(self) -> bool:
        """Whether different paths of the template go to different routes (or to none)."""
        return len(self.routes) > 1 or (bool(self.routes) and not self.complete)


def governing(routes: Sequence[RoutePolicy], template: str) -> Governing:
    """The routes that touch `template`, in order, up to the first that covers it."""
    found: list[RoutePolicy] = []
    for route in routes:
        if covers(route.path, template):
            return Governing((*found, route), complete=True)
        if touches(route.path, template):
            found.append(route)
    return Governing(tuple(found), complete=False)
