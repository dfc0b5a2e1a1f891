"""Redis set-ups beyond one plain server: TLS with a CA of the test's own, a primary with a
replica, ACL users, and a relay that loses replies on purpose.

Every server is a real `redis-server` on free loopback ports. A TLS server also listens on a
plain port, so a test can drive it (demote it, stop its replica) without TLS of its own.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hiredis
import pytest

from tests.conftest import free_port


@dataclass
class RedisNode:
    """One redis-server: `port` is plain TCP; `args` are added to its command line."""

    directory: Path
    args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisNode:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--loglevel", "warning",
             *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def command(self, *args: str) -> bytes:
        """One inline command on the plain port; the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall((" ".join(args) + "\r\n").encode())
            return sock.recv(65536)

    def records(self, pattern: str = "idp:*") -> list[bytes]:
        reader = hiredis.Reader()
        reader.feed(self.command("KEYS", pattern))
        reply = reader.gets()
        assert isinstance(reply, list)
        return reply


def wait_until(check: object, timeout: float = 5.0) -> None:
    """Poll `check()` (a callable) until it is true, or fail after `timeout` seconds."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def redis_nodes(tmp_path: Path) -> Iterator[list[RedisNode]]:
    """Collects the nodes a test starts, and stops them all at its end."""
    nodes: list[RedisNode] = []
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def primary_and_replica(
    redis_nodes: list[RedisNode], tmp_path: Path
) -> tuple[RedisNode, RedisNode]:
    """A primary and one replica of it, replication link up."""
    # No diskless-sync delay: the replica's first sync starts at once, not after 5 s.
    primary = RedisNode(tmp_path / "primary", ["--repl-diskless-sync-delay", "0"]).start()
    redis_nodes.append(primary)
    replica = RedisNode(tmp_path / "replica", ["--replicaof", "127.0.0.1", str(primary.port),
                                               "--repl-diskless-sync-delay", "0"])  # fmt: skip
    redis_nodes.append(replica.start())
    wait_until(lambda: b"master_link_status:up" in replica.command("INFO", "replication"))
    wait_until(lambda: b"connected_slaves:1" in primary.command("INFO", "replication"))
    return primary, replica


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
    """A node with a TLS port (in `node.tls_port`) next to its plain one."""
    tls_port = free_port()
    node = RedisNode(directory, [
        "--tls-port", str(tls_port), "--tls-cert-file", certs.path(f"{server}.crt"),
        "--tls-key-file", certs.path(f"{server}.key"), "--tls-ca-cert-file", certs.path("ca.crt"),
        "--tls-auth-clients", "yes" if clients_need_certs else "no",
    ])  # fmt: skip
    node.tls_port = tls_port  # type: ignore[attr-defined]
    return node


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
