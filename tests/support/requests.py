"""Keyed requests to the proxy and what to assert about their answers.

`post` sends one request and keeps the whole answer (status, headers, body), so that a retry
can be compared with the first attempt byte for byte. `assert_replayed_once` is the shape
most behaviour tests share: the same key twice, one execution at the upstream, the second
answer the first one replayed.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from proxy.errors import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX
from tests.support.upstream import Upstream

KEY_HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"


class HasUrl(Protocol):
    """Anything the proxy runs as: `Running` in-process or a `ProxyProcess`."""

    @property
    def url(self) -> str: ...


def key(name: str = "") -> str:
    """A fresh idempotency key."""
    return f"{name}-{os.urandom(6).hex()}"


def base_url(target: HasUrl | str) -> str:
    return target if isinstance(target, str) else target.url


class Answer(NamedTuple):
    """One response as the client saw it; unpacks as (status, headers, body)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    @property
    def replayed(self) -> bool:
        return self.headers.get(REPLAYED) == "true"

    def json(self) -> Any:
        return json.loads(self.body)


async def request(
    client: aiohttp.ClientSession,
    method: str,
    target: HasUrl | str,
    path: str,
    body: bytes = b"{}",
    idem: str | None = None,
    **headers: str,
) -> Answer:
    """`method path` of the proxy (or any base URL), with `idem` as the key if given."""
    sent = dict(headers)
    if idem is not None:
        sent[KEY_HEADER] = idem
    url = base_url(target) + path
    async with client.request(method, url, data=body, headers=sent) as response:
        return Answer(response.status, response.headers, await response.read())


async def post(client: aiohttp.ClientSession, target: HasUrl | str, path: str,
               body: bytes = b"{}", idem: str | None = None, **headers: str) -> Answer:  # fmt: skip
    """POST `body` to `path` of the proxy (or any base URL), with `idem` as the key if given."""
    return await request(client, "POST", target, path, body, idem, **headers)


def problem(body: bytes) -> dict[str, Any]:
    """A problem+json body, checked for the fields every problem of ours carries."""
    data = json.loads(body)
    assert data["type"].startswith(PROBLEM_TYPE_PREFIX)
    assert {"type", "title", "status", "detail"} <= data.keys()
    return dict(data)


def problem_type(headers: Any, body: bytes) -> str:
    """The problem's type slug (`key-in-use`), after checking content type and fields."""
    assert headers["Content-Type"] == PROBLEM_CONTENT_TYPE
    return str(problem(body)["type"]).removeprefix(PROBLEM_TYPE_PREFIX)


async def assert_replayed_once(
    client: aiohttp.ClientSession,
    upstream: Upstream,
    target: HasUrl | str,
    path: str = "/v1/pay",
    body: bytes = b"{}",
    idem: str | None = None,
    status: int | None = None,
    again: HasUrl | str | None = None,
    **headers: str,
) -> tuple[Answer, Answer]:
    """Same key twice: the upstream executed it once, the second answer is the first replayed.

    `status`, when given, is what both answers must carry; `again` sends the second
    attempt to another proxy (sharing the store). Returns both answers for more checks.
    """
    k = key("once") if idem is None else idem
    first = await post(client, target, path, body, k, **headers)
    second = await post(client, target if again is None else again, path, body, k, **headers)
    if status is not None:
        assert (first.status, second.status) == (status, status), (first, second)
    assert REPLAYED not in first.headers and second.replayed, (first.headers, second.headers)
    assert second.status == first.status and second.body == first.body
    assert upstream.executions(k) == 1
    return first, second
