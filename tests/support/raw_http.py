"""HTTP/1.1 written and read byte by byte on a raw socket.

aiohttp's client refuses to send most hostile requests (bad framing, raw 0xff in a header, a
body that stops half way) and hides how an answer was framed, so the tests that need either
write the request themselves and parse the answer here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from multidict import CIMultiDict

from proxy.errors import PROBLEM_TYPE_PREFIX
from proxy.server import Running
from tests.support.ports import LOOPBACK

HEAD_LIMIT = 64 * 1024


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes
    interim: list[int] = field(default_factory=list)

    def problem_type(self) -> str:
        assert self.headers["Content-Type"] == "application/problem+json"
        data = json.loads(self.body)
        assert data["status"] == self.status
        return str(data["type"]).removeprefix(PROBLEM_TYPE_PREFIX)


class RawConnection:
    """One client connection that writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, proxy: Running) -> RawConnection:
        reader, writer = await asyncio.open_connection(LOOPBACK, proxy.port, limit=HEAD_LIMIT)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_head(self) -> tuple[int, CIMultiDict[str]]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers.add(name.strip(), value.strip())
        return status, headers

    async def read_response(self, timeout: float = 2.0) -> RawResponse:
        """The next final response (1xx interim responses are collected on the way)."""
        async with asyncio.timeout(timeout):
            interim = []
            status, headers = await self.read_head()
            while 100 <= status < 200:
                interim.append(status)
                status, headers = await self.read_head()
            if "Content-Length" in headers:
                body = await self.reader.readexactly(int(headers["Content-Length"]))
            elif headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = await self.read_chunks()
            else:
                body = await self.reader.read()
        return RawResponse(status, headers, body, interim)

    async def read_chunks(self) -> bytes:
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)
        await self.reader.readuntil(b"\r\n")
        return b"".join(parts)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def exchange(proxy: Running, data: bytes, timeout: float = 2.0) -> RawResponse:
    """Send `data` on a new connection and read one response."""
    connection = await RawConnection.open(proxy)
    try:
        await connection.send(data)
        return await connection.read_response(timeout)
    finally:
        await connection.close()


def request(method: str, path: str, headers: Sequence[tuple[str, str | bytes]],
            body: bytes = b"") -> bytes:  # fmt: skip
    """A request head and body, byte for byte; str values are latin-1."""
    lines = [f"{method} {path} HTTP/1.1\r\n".encode("latin-1"), b"Host: 127.0.0.1\r\n"]
    for name, value in headers:
        raw = value if isinstance(value, bytes) else value.encode("latin-1")
        lines.append(name.encode("latin-1") + b": " + raw + b"\r\n")
    return b"".join(lines) + b"\r\n" + body
