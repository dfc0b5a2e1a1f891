"""Redis set-ups beyond one plain server: TLS with a CA of the test's own, a primary with a
replica, ACL users, and a relay that loses replies on purpose.

Every server is a real `redis-server` on free loopback ports. A TLS server also listens on a
plain port, so a test can drive it (demote it, stop its replica) without TLS of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest

from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until_sync


@dataclass
class RedisNode(RedisServer):
    """A redis-server on a free plain port, with `extra_args` on its command line."""

    tls_port: int = 0  # a TLS port next to the plain one, when `tls_node` made it

    @classmethod
    def make(cls, directory: Path, args: list[str] | None = None, tls_port: int = 0) -> RedisNode:
        return cls(directory, extra_args=args or [], tls_port=tls_port)

    def started(self) -> RedisNode:
        self.start()
        return self

    def records(self, pattern: str = "idp:*") -> list[bytes]:
        reader = hiredis.Reader()
        reader.feed(self.command("KEYS", pattern))
        reply = reader.gets()
        assert isinstance(reply, list)
        return reply


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[list[RedisNode]]:
    """Collects the nodes a test starts, and stops them all at its end."""
    nodes: list[RedisNode] = []
    yield nodes
    for node in nodes:
        node.kill()


@pytest.fixture
def primary_and_replica(
    redis_nodes: list[RedisNode], tmp_path: Path
) -> tuple[RedisNode, RedisNode]:
    """A primary and one replica of it, replication link up."""
    # No diskless-sync delay: the replica's first sync starts at once, not after 5 s.
    primary = RedisNode.make(tmp_path / "primary", ["--repl-diskless-sync-delay", "0"]).started()
    redis_nodes.append(primary)
    replica = RedisNode.make(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port),
                                                    "--repl-diskless-sync-delay", "0"])  # fmt: skip
    redis_nodes.append(replica.started())
    wait_until_sync(lambda: b"master_link_status:up" in replica.command("INFO", "replication"))
    replicating(primary)
    return primary, replica


def replicating(primary: RedisNode) -> None:
    """Wait until a replica acknowledges `primary`'s writes (a fresh replica may take up to
    a second to send its first acknowledgement, which WAIT needs)."""
    primary.command("SET", "warm-up", "1")
    wait_until_sync(lambda: primary.command("WAIT", "1", "100").startswith(b":1"))
    primary.command("DEL", "warm-up")


# --- TLS: a CA, server and client certificates made with the openssl CLI --------------


@dataclass(frozen=True)
class Certificates:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _signed(directory: Path, ca: str, name: str, subject: str, san: str) -> None:
    """`name.key` and `name.crt` for `subject`, with `san` (`DNS:..,IP:..`), signed by `ca`."""
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-subj", subject, "-out", f"{name}.csr")  # fmt: skip
    (directory / f"{name}.ext").write_text(
        f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt",
             "-CAkey", f"{ca}.key", "-CAcreateserial", "-days", "2", "-sha256",
             "-extfile", f"{name}.ext", "-out", f"{name}.crt")  # fmt: skip


def make_certificates(directory: Path) -> Certificates:
    """ca (signs server, other and client), and wrong-ca that signs nothing we use."""
    directory.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "wrong-ca"):
        _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                 "-subj", f"/CN=test {ca}")  # fmt: skip
    _signed(directory, "ca", "server", "/CN=localhost", "DNS:localhost,IP:127.0.0.1")
    _signed(directory, "ca", "other", "/CN=other.invalid", "DNS:other.invalid")
    _signed(directory, "ca", "client", "/CN=proxy", "DNS:proxy")
    (directory / "ca.pem").write_text((directory / "ca.crt").read_text())
    return Certificates(directory)


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_node(directory: Path, certs: Certificates, *, server: str = "server",
             clients_need_certs: bool = False) -> RedisNode:  # fmt: skip
    """A node with a TLS port (`node.tls_port`) next to its plain one."""
    tls_port = free_port()
    return RedisNode.make(directory, [
        "--tls-port", str(tls_port), "--tls-cert-file", certs.path(f"{server}.crt"),
        "--tls-key-file", certs.path(f"{server}.key"), "--tls-ca-cert-file", certs.path("ca.crt"),
        "--tls-auth-clients", "yes" if clients_need_certs else "no",
    ], tls_port=tls_port)  # fmt: skip


# --- a relay that forwards commands and loses their replies ---------------------------


@dataclass
class Relay:
    """A TCP relay between a client and Redis that counts the commands it forwards.

    Once `lose_reply_to` names a command argument (a script SHA, say), the next command
    carrying it is forwarded to Redis, and then the client's connection is handled as
    `how` says: "drop" discards every reply from then on, "close" hangs up at once.
    """

    target_port: int
    port: int = 0
    commands: Counter[bytes] = field(default_factory=Counter)
    lose_reply_to: bytes | None = None
    how: str = "drop"
    lost: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        dropping = asyncio.Event()

        async def upstream() -> None:
            parser = hiredis.Reader()
            while data := await client_r.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    for arg in command:
                        self.commands[arg] += 1
                    if self.lose_reply_to is not None and self.lose_reply_to in command:
                        self.lose_reply_to = None
                        dropping.set()  # before the command goes on: its reply is lost
                redis_w.write(data)
                await redis_w.drain()
                if dropping.is_set() and not self.lost.is_set():
                    self.lost.set()
                    if self.how == "close":
                        client_w.transport.abort()
                        return

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if not dropping.is_set():
                    client_w.write(data)

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            redis_w.close()
            client_w.close()


@asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[Relay]:
    relay = Relay(port)
    server = await asyncio.start_server(relay._serve, "127.0.0.1", 0)
    relay.port = server.sockets[0].getsockname()[1]
    try:
        yield relay
    finally:
        server.close()
