"""Reading the client's request body: bounded in size and in time, and `100 Continue`.

A protected request's body is read whole (it is fingerprinted and may be forwarded again by
a takeover); a pass-through body is streamed as it arrives. Either way a client cannot hold
the proxy or an upstream connection forever: a body over its limit gets 413 as soon as that
is known, and a body that stalls gets 408.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import HttpVersion11, web

from proxy.errors import BodyTimeout, BodyTooLarge


async def read_body(request: web.BaseRequest, limit: int, timeout: float) -> bytes:
    """The whole request body, or 413 as soon as it is known to exceed `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"the request body is {request.content_length} bytes; the limit is {limit}"
        )
    await send_continue(request)
    content = request.content
    if content.is_eof():  # the usual case: the whole body came in with the headers
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(f"the request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError as exc:
        raise BodyTimeout(f"the request body did not arrive within {timeout:g}s") from exc
    return b"".join(chunks)


async def read_bounded(
    request: web.BaseRequest, limit: int, idle: float
) -> bytes | AsyncIterator[bytes]:
    """The whole body if it is at most `limit` bytes; else the body as a stream (what was read
    first, then the rest as it arrives), never a 413: for requests the proxy forwards whatever
    their size (observe mode, keyless duplicate counting). A stall of `idle` seconds is 408,
    as for a streamed body."""
    if request.content_length is not None and request.content_length > limit:
        await send_continue(request)
        return stream_body(request, idle)
    await send_continue(request)
    if request.content.is_eof():  # it all came with the headers
        body = request.content.read_nowait()
        return body if len(body) <= limit else _chain([body], stream_body(request, idle))
    chunks: list[bytes] = []
    size = 0
    rest = stream_body(request, idle)
    async for chunk in rest:
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return _chain(chunks, rest)
    return b"".join(chunks)


async def _chain(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def send_continue(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` once the proxy has decided to read the body.

    Called only after the key and the declared length have passed, so a request the proxy
    refuses is refused before the client sends its body.
    """
    if (
        request.version == HttpVersion11
        and request.headers.get("Expect", "").lower() == "100-continue"
        and not request.content.is_eof()
    ):
        await write_interim(request, b"HTTP/1.1 100 Continue\r\n\r\n")


async def write_interim(request: web.BaseRequest, head: bytes) -> None:
    """Write an interim (1xx) response head before the final response.

    aiohttp's low-level server has no public call for this; its web handler sends 100
    Continue the same way, through the request's payload writer. This is the one place that
    does so; `tests/test_hostile_input.py` checks it over a real socket, so a change in aiohttp
    shows.
    """
    await request.writer.write(head)
    request.writer.output_size = 0  # the interim head is not part of the response's size


async def stream_body(request: web.BaseRequest, idle: float) -> AsyncIterator[bytes]:
    """The request body as it arrives. A client silent for `idle` seconds is cut off, so a
    body that stalls (or whose chunked framing broke mid-way, which aiohttp never reports to
    the handler) cannot hold an upstream connection forever."""
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await request.content.readany()
        except TimeoutError as exc:
            raise BodyTimeout(f"the request body stalled for {idle:g}s") from exc
        if not chunk:
            return
        yield chunk
