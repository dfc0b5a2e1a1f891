"""What the fuzzer sends: hypothesis strategies for hostile requests, and the properties.

Each property is a plain function of a `Fuzzer` and one generated case, so that
tests/test_fuzz.py and bench/fuzz run exactly the same checks, with different numbers of
cases. The strategies lean on pieces known to have broken proxies (userinfo in a target, a
scheme without `//`, `*`, percent-encoded separators, control characters in field values,
obs-fold, transfer codings besides `chunked`), and let hypothesis combine them with
arbitrary bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.fuzzing import Fuzzer, Response

# --- requests -------------------------------------------------------------------------

KEY_HEADER = b"Idempotency-Key"


@dataclass(frozen=True)
class Key:
    """One idempotency key field line: `name: prefix <fresh nonce> suffix`. The nonce
    (16 hex characters, new on every run of the case) keeps cases from replaying each
    other; without it the value is exactly prefix + suffix."""

    name: bytes = KEY_HEADER
    prefix: bytes = b""
    nonce: bool = True
    suffix: bytes = b""

    def render(self, nonce: bytes) -> bytes:
        return self.name + b": " + self.prefix + (nonce if self.nonce else b"") + self.suffix

    @property
    def counts(self) -> bool:
        """Whether the proxy reads this line as the key header."""
        return self.name.lower() == KEY_HEADER.lower()


@dataclass(frozen=True)
class Request:
    """A request as raw bytes: any method, target, fields, keys, framing and body. The
    last field line is always `Connection: close`, so the proxy ends the exchange."""

    method: bytes = b"POST"
    target: bytes = b"/v1/pay"
    version: bytes = b"HTTP/1.1"
    host: bytes | None = b"127.0.0.1"
    fields: tuple[tuple[bytes, bytes], ...] = ()
    keys: tuple[Key, ...] = ()
    framing: tuple[tuple[bytes, bytes], ...] = ((b"Content-Length", b"2"),)
    body: bytes = b"{}"

    def render(self, fuzzer: Fuzzer, nonce: bytes) -> bytes:
        lines = [b" ".join(part for part in (self.method, self.target, self.version) if part)]
        if self.host is not None:
            lines.append(b"Host: " + self.host)
        lines += [name + b": " + value for name, value in self.fields]
        lines += [key.render(nonce) for key in self.keys]
        lines += [name + b": " + value for name, value in self.framing]
        lines.append(b"Connection: close")
        return fuzzer.render(b"\r\n".join(lines) + b"\r\n\r\n" + self.body)

    @property
    def head(self) -> bool:
        return self.method == b"HEAD"


def nonce() -> bytes:
    return os.urandom(8).hex().encode()


def send(fuzzer: Fuzzer, request: Request, key: bytes, must_answer: bool = False,
         port: int | None = None) -> list[Response]:  # fmt: skip
    """Send `request` on a new connection and check the answer (see `Fuzzer.answers`)."""
    data = request.render(fuzzer, key)
    received = fuzzer.exchange(data, request.head, port)
    return fuzzer.answers(data, received, head=request.head, must_answer=must_answer)


# --- pieces ---------------------------------------------------------------------------

METHODS = st.one_of(
    st.sampled_from([b"CONNECT", b"OPTIONS"]),  # the two whose targets need not be paths
    st.sampled_from([b"GET", b"POST", b"PATCH", b"PUT", b"DELETE", b"HEAD", b"TRACE", b"PRI"]),
    st.sampled_from([b"post", b"connect", b"options", b"Post", b"get"]),
    st.sampled_from([b"PO ST", b"POST\x00", b"P(ST", b"", b"\xff", b"G\tET", b"POST/"]),
    st.binary(min_size=1, max_size=8),
)  # fmt: skip
HOSTS = st.sampled_from([b"127.0.0.1", b"localhost", b"[::1]", b"127.1", b"2130706433",
                         b"0x7f.1", b"127.0.0.1.", b"a.b", b"legacy", b""])  # fmt: skip
# Half the ports name a listener, so that a target that escapes is seen to escape.
PORTS = st.one_of(
    st.sampled_from([b"{canary}", b"{canary2}", b"{upstream}"]),
    st.sampled_from([b"9090", b"0", b"", b"65536", b"-1", b"80x", b"{canary}{canary}"]),
)  # fmt: skip
USERINFO = st.one_of(
    st.just(b""),
    st.sampled_from([b"@", b"x:@", b"x@", b"svc:pw@", b"a@b@", b"%40@", b"u:p:q@", b"[::1]@"]),
)  # fmt: skip
SCHEMES = st.sampled_from([b"http", b"https", b"x", b"HTTP", b"ftp", b"admin", b"file",
                           b"unix", b"h", b""])  # fmt: skip
PATH_PIECES = st.one_of(
    st.sampled_from([b"/", b"v1", b"pay", b"%2f", b"%2F", b"%40", b"%3a", b"%3A", b"%00",
                     b"%ff", b"%", b"%zz", b"%2e%2e", b"..", b".", b"@", b":", b"//", b"\\",
                     b"#frag", b"?q=1", b"?", b";p", b"{canary}", b"127.0.0.1", b"~", b"%25",
                     b"\xff", b"\x00", b" ", b"*", b"{upstream}"]),
    st.binary(max_size=6),
)  # fmt: skip


@st.composite
def authorities(draw: st.DrawFn) -> bytes:
    """`userinfo@host:port`, with hosts and ports that name the canaries and the upstream."""
    host = draw(HOSTS)
    port = b"{canary6}" if host == b"[::1]" and draw(st.booleans()) else draw(PORTS)
    colon = b":" if port or draw(st.booleans()) else b""
    return draw(USERINFO) + host + colon + port


PATHS = st.one_of(st.just(b""), st.lists(PATH_PIECES, min_size=1, max_size=6).map(b"".join))
TARGETS = st.one_of(
    PATHS.map(lambda path: b"/" + path),  # origin-form
    st.tuples(SCHEMES, authorities(), PATHS).map(lambda t: t[0] + b"://" + t[1] + t[2]),
    st.tuples(SCHEMES, authorities(), PATHS).map(lambda t: t[0] + b":" + t[1] + t[2]),
    authorities(),  # authority-form, as CONNECT uses
    st.just(b"*"),  # asterisk-form, as OPTIONS uses
    st.lists(st.one_of(PATH_PIECES, SCHEMES, authorities()), min_size=1, max_size=5).map(b"".join),
    st.sampled_from([100, 1000, 8000, 8190, 8200, 12000]).map(lambda n: b"/" + b"a" * n),
    st.binary(max_size=30),
)

VERSIONS = st.one_of(
    st.just(b"HTTP/1.1"),
    st.sampled_from([b"HTTP/1.0", b"", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1"]),
)
# Request lines: any method with any target, and CONNECT with the targets it takes.
REQUEST_LINES = st.one_of(
    st.tuples(METHODS, TARGETS, VERSIONS),
    st.tuples(st.just(b"CONNECT"), st.one_of(
        authorities(), st.tuples(SCHEMES, authorities()).map(lambda t: t[0] + b":" + t[1])
    ), st.just(b"HTTP/1.1")),
)  # fmt: skip

NAMES = st.one_of(
    st.sampled_from([b"X-Fuzz", b"Authorization", b"Host", b"Idempotency-Key", b"Expect",
                     b"Upgrade", b"TE", b"Trailer", b"Via", b"Forwarded", b"X-Forwarded-For",
                     b"X-Forwarded-Host", b"X-Request-Id", b"Cookie", b"Proxy-Authorization",
                     b"Content-Type", b"Content-Encoding", b"Keep-Alive", b"traceparent",
                     b"Max-Forwards", b"X-Fuzz ", b" X-Fuzz", b"X Fuzz", b"X\x01Fuzz",
                     b"X-F\xc3\xbcz", b""]),
    st.lists(st.sampled_from(list(b"!#$%&'*+-.^_`|~09AZaz")), min_size=1, max_size=12).map(
        bytes
    ),
    st.binary(max_size=12),
)  # fmt: skip
# Mostly what a parser lets through, so that the cases reach the proxy's own code.
PRINTABLE_PIECES = st.sampled_from([
    b"a", b"value", b" ", b"\t", b'"', b"\\", b",", b";", b"=", b"127.0.0.1:{canary}",
    b"http://127.0.0.1:{canary}/", b"100-continue", b"websocket", b"chunked", b"gzip", b"h2c",
    b"\xff", b"\xc3\xa9", b"\xe2\x80\x8b", b"Basic eDp5", b"close",
])  # fmt: skip
VALUE_PIECES = st.one_of(
    PRINTABLE_PIECES,
    PRINTABLE_PIECES,
    st.sampled_from([b"\x00", b"\x01", b"\x7f", b"\x1b", b"\r", b"\n", b"\r\n ", b"\r\n\t"]),
    st.binary(max_size=6),
)  # fmt: skip
VALUES = st.lists(VALUE_PIECES, max_size=6).map(b"".join)


@st.composite
def field_lists(draw: st.DrawFn) -> tuple[tuple[bytes, bytes], ...]:
    """Field lines, some of them repeated (the same name again, maybe in another case)."""
    fields = draw(st.lists(st.tuples(NAMES, VALUES), max_size=6))
    for name, value in list(fields):
        if draw(st.booleans()):
            fields.append((draw(st.sampled_from([name, name.lower(), name.upper()])), value))
    return tuple(fields)


KEY_PIECES = st.one_of(
    st.sampled_from([b"", b'"', b'\\"', b"\\\\", b"\\", b" ", b"\t", b"\x01", b"\x7f", b"\x00",
                     b"\xff", b"\xc3\xa9", b"=", b",", b";", b"?a=1", b":", b"*", b"(", b"%20"]),
    st.binary(max_size=4),
)  # fmt: skip
KEY_NAMES = st.one_of(
    st.just(KEY_HEADER),
    st.sampled_from([b"idempotency-key", b"IDEMPOTENCY-KEY", b"Idempotency_Key",
                     b"Idempotency-Key ", b"X-Idempotency-Key"]),
)  # fmt: skip


@st.composite
def keys(draw: st.DrawFn) -> Key:
    """Quoted Structured Field strings, escapes, control and non-ASCII bytes, empty, and
    lengths around the 255-character limit (the nonce is 16 of them)."""
    prefix = draw(st.lists(KEY_PIECES, max_size=3).map(b"".join))
    suffix = draw(st.lists(KEY_PIECES, max_size=3).map(b"".join))
    padding = draw(st.one_of(st.just(0), st.integers(230, 260), st.integers(0, 400)))
    quoted = draw(st.sampled_from([b"", b'"']))
    return Key(
        draw(KEY_NAMES), quoted + prefix, draw(st.booleans()), b"k" * padding + suffix + quoted
    )


# --- body framing ---------------------------------------------------------------------

TRANSFER_CODINGS = st.one_of(
    st.just([b"chunked"]),
    # Another coding before the final chunked: the body is still delimited, but not the body.
    st.sampled_from([[b"gzip, chunked"], [b"identity, chunked"], [b"deflate, chunked"],
                     [b"x-custom, chunked"], [b"compress, chunked"], [b"gzip,chunked"],
                     [b"br, chunked"]]),
    st.sampled_from([[b"chunked, gzip"], [b"gzip"], [b"identity"], [b"chunked, chunked"],
                     [b"Chunked"], [b" chunked"], [b"chunked;a=1"], [b"gzip", b"chunked"],
                     [b"chunked", b"chunked"], [b""]]),
)  # fmt: skip


@dataclass(frozen=True)
class Framing:
    """A body and how it is framed on the wire; `valid` when the framing says exactly how
    long the body is, the one way HTTP/1.1 allows (one right Content-Length, or
    `Transfer-Encoding: chunked` alone with well-formed chunks)."""

    fields: tuple[tuple[bytes, bytes], ...]
    wire: bytes
    body: bytes
    valid: bool

    @property
    def codings(self) -> list[bytes]:
        """The transfer codings the request names, lower-case, in order."""
        values = [v for n, v in self.fields if n.lower() == b"transfer-encoding"]
        return [c.strip().lower() for v in values for c in v.split(b",") if c.strip()]


@st.composite
def chunked(draw: st.DrawFn, body: bytes) -> tuple[bytes, bool]:
    """`body` in chunks (with extensions, upper-case sizes, trailers), maybe broken."""
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
    parts = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    upper = draw(st.booleans())
    chunks = []
    for part in parts:
        if part:
            size = b"%X" % len(part) if upper else b"%x" % len(part)
            extension = draw(st.sampled_from([b"", b";ext=1", b";a", b';q="x"']))
            chunks.append(size + extension + b"\r\n" + part + b"\r\n")
    # A framing field in the trailer is refused (RFC 9110 6.5.1), so it breaks the body.
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n", b"Content-Length: 9\r\n"]))
    wire = b"".join(chunks) + b"0\r\n" + trailer + b"\r\n"
    if trailer.startswith(b"Content-Length"):
        return wire, False
    broken = draw(st.one_of(st.none(), st.none(), st.sampled_from([
        b"zz\r\n", b"-1\r\n", b"1\r\nxyz\r\n", b" 1\r\nx\r\n", b"0x1\r\nx\r\n",
        b"fffffffffffffffff\r\n", b"1\nx\n",
    ])))  # fmt: skip
    if broken is not None:
        return draw(st.sampled_from([broken + wire, wire[:-2], wire[:-5] + broken])), False
    return wire, True


@st.composite
def framings(draw: st.DrawFn) -> Framing:
    """Content-Length right, wrong, duplicated, negative, odd; chunked well-formed and
    broken; other transfer codings; both; neither."""
    body = draw(st.one_of(st.sampled_from([b"", b"{}", b'{"amount": 100}']),
                          st.binary(max_size=40)))  # fmt: skip
    length = b"%d" % len(body)
    kind = draw(st.sampled_from(["length", "chunked", "chunked", "both", "none"]))
    if kind == "none":
        return Framing((), body, body, not body)
    lengths = draw(st.one_of(
        st.just([length]),
        st.sampled_from([[length, length], [length, b"%d" % (len(body) + 1)], [b"-1"],
                         [b"+" + length], [b"0x%x" % len(body)], [b" " + length],
                         [length + b","], [length + b", " + length], [b"0" + length],
                         [b"99999999999999999999"], [b""], [b"1e2"]]),
        st.integers(-2, 3).map(lambda d: [b"%d" % (len(body) + d)]),
    ))  # fmt: skip
    lengths_fields = tuple((b"Content-Length", value) for value in lengths)
    if kind == "length":
        return Framing(lengths_fields, body, body, lengths == [length])
    codings = draw(TRANSFER_CODINGS)
    wire, well_formed = draw(chunked(body))
    fields = tuple((b"Transfer-Encoding", value) for value in codings)
    if kind == "both":
        fields = (*lengths_fields, *fields) if draw(st.booleans()) else (*fields, *lengths_fields)
    return Framing(fields, wire, body, kind == "chunked" and codings == [b"chunked"] and
                   well_formed)  # fmt: skip


# --- the properties -------------------------------------------------------------------


def check_targets(fuzzer: Fuzzer, case: tuple[tuple[bytes, bytes, bytes], bool]) -> None:
    """Any method with any request target: a well-formed answer or a clean close, nothing
    reaches a canary, and the upstream sees only origin-form targets."""
    (method, target, version), keyed = case
    before = fuzzer.begin_case()
    keys = (Key(),) if keyed else ()
    send(fuzzer, Request(method, target, version, keys=keys), nonce())
    fuzzer.settle(before)


def check_reach(fuzzer: Fuzzer, case: tuple[tuple[bytes, bytes, bytes], bool]) -> None:
    """Any method with any request target reaches nothing but the configured upstream, and
    that only with an origin-form target; whatever the answer (the other properties judge
    it, and a failure there must not hide one here)."""
    (method, target, version), keyed = case
    before = fuzzer.begin_case()
    keys = (Key(),) if keyed else ()
    fuzzer.exchange(Request(method, target, version, keys=keys).render(fuzzer, nonce()))
    fuzzer.reached_only_the_upstream(before)


def check_fields(fuzzer: Fuzzer, case: tuple[bytes | None, tuple[tuple[bytes, bytes], ...],
                                              bool]) -> None:  # fmt: skip
    """Arbitrary field lines (control characters, obs-fold, non-ASCII, repeated, empty)
    and Host values on a protected request: the same checks."""
    host, fields, keyed = case
    before = fuzzer.begin_case()
    keys = (Key(),) if keyed else ()
    send(fuzzer, Request(host=host, fields=fields, keys=keys), nonce())
    fuzzer.settle(before)


def check_keys(fuzzer: Fuzzer, case: tuple[tuple[Key, ...], bytes | None]) -> None:
    """Any idempotency key form, sent twice: both answers have the same status, and a
    request whose key the proxy reads is executed at most once."""
    request_keys, authorization = case
    before = fuzzer.begin_case()
    fields = ((b"Authorization", authorization),) if authorization is not None else ()
    request = Request(keys=request_keys, fields=fields)
    key = nonce()
    first = send(fuzzer, request, key)
    second = send(fuzzer, request, key)
    statuses = [answer[0].status if answer else None for answer in (first, second)]
    assert statuses[0] == statuses[1], f"the same request answered {statuses}"
    if sum(k.counts for k in request_keys) == 1:
        executed = len(fuzzer.upstream.seen) - before.upstream
        assert executed <= 1, f"one key executed {executed} times (answers {statuses})"
    fuzzer.settle(before)


def check_framing(fuzzer: Fuzzer, case: tuple[bytes, Framing]) -> None:
    """Any body framing on a protected or a streamed request: a valid framing is forwarded
    with exactly its body; a transfer coding other than chunked is never forwarded."""
    method, framing = case
    before = fuzzer.begin_case()
    keys = (Key(),) if method != b"PUT" else ()
    request = Request(method, keys=keys, framing=framing.fields, body=framing.wire)
    answers = send(fuzzer, request, nonce())
    forwarded = fuzzer.upstream.seen[before.upstream :]
    if any(coding != b"chunked" for coding in framing.codings):
        assert not forwarded, (
            f"forwarded a body with transfer codings {framing.codings}: the upstream got "
            f"{forwarded[0].body!r}"
        )
    if framing.valid:
        assert answers, "a well-framed request got no answer"
        assert 200 <= answers[0].status < 300, f"a well-framed request got {answers[0].status}"
        assert [seen.body for seen in forwarded] == [framing.body], (
            f"the upstream got {[seen.body for seen in forwarded]!r}, not {framing.body!r}"
        )
    fuzzer.settle(before)


def check_upstream_field(fuzzer: Fuzzer, case: tuple[bytes, bytes, bool]) -> None:
    """An upstream answer carrying a field line the case chose: a protected request and its
    retry both get a well-formed answer with the same status (what was stored can be
    sent), and a streamed one gets a well-formed answer."""
    name, value, protected = case
    target = b"/hdr/" + name.hex().encode() + b"/" + value.hex().encode()
    before = fuzzer.begin_case()
    if not protected:
        send(fuzzer, Request(b"GET", target, framing=(), body=b""), nonce(), must_answer=True)
        fuzzer.settle(before)
        return
    request = Request(b"POST", target, keys=(Key(),))
    key = nonce()
    first = send(fuzzer, request, key, must_answer=True)
    second = send(fuzzer, request, key, must_answer=True)
    assert first[0].status == second[0].status, (
        f"first answer {first[0].status}, its replay {second[0].status}"
    )
    executed = len(fuzzer.upstream.seen) - before.upstream
    assert executed == 1, f"the upstream executed the key {executed} times"
    fuzzer.settle(before)


def check_store_down(fuzzer: Fuzzer, case: tuple[tuple[Key, ...], tuple[tuple[bytes, bytes],
                                                                       ...]]) -> None:  # fmt: skip
    """Keys and fields sent to a proxy whose store is down: a well-formed answer (a 503
    problem for a protected request) that names neither the store nor its address."""
    request_keys, fields = case
    before = fuzzer.begin_case()
    port = fuzzer.storeless_port()
    answers = send(fuzzer, Request(fields=fields, keys=request_keys), nonce(), port=port)
    if answers and sum(k.counts for k in request_keys) == 1 and answers[0].status < 300:
        raise AssertionError("a protected request was forwarded with its store down")
    fuzzer.reached_only_the_upstream(before)


UPSTREAM_FIELD_NAMES = st.one_of(
    st.sampled_from([b"X-Fuzz", b"Set-Cookie", b"Location", b"Link", b"X-Fuzz ", b"X\x01",
                     b"X Y", b"X-\xc3\xa9"]),
    st.lists(st.sampled_from(list(b"!#$%&'*+-.^_`|~09AZaz")), min_size=1, max_size=8).map(
        bytes
    ),
)  # fmt: skip
UPSTREAM_FIELD_VALUES = st.lists(
    st.one_of(st.sampled_from([b"a", b" ", b"\t", b"\x00", b"\x01", b"\x7f", b"\x1b", b"\x0b",
                               b"\x0c", b"\xff", b"\xc3\xa9", b"\r", b"\n", b"\r\n ", b'"',
                               b"{canary}"]),
              st.binary(max_size=4)),
    max_size=5,
).map(b"".join)  # fmt: skip

# The default scope header: none, a tenant's usual value, or any bytes.
AUTHORIZATIONS = st.one_of(
    st.none(), st.sampled_from([b"Bearer tenant-a", b"Basic dGVuYW50OmI=", b""]), VALUES
)

Property = tuple[st.SearchStrategy[Any], Callable[[Fuzzer, Any], None]]
PROPERTIES: dict[str, Property] = {
    "reach": (st.tuples(REQUEST_LINES, st.booleans()), check_reach),
    "targets": (st.tuples(REQUEST_LINES, st.booleans()), check_targets),
    "fields": (st.tuples(st.one_of(st.none(), VALUES), field_lists(), st.booleans()),
               check_fields),
    "keys": (st.tuples(st.lists(keys(), min_size=1, max_size=3).map(tuple), AUTHORIZATIONS),
             check_keys),
    "framing": (st.tuples(st.sampled_from([b"POST", b"PATCH", b"PUT"]), framings()),
                check_framing),
    "store_down": (st.tuples(st.lists(keys(), min_size=1, max_size=2).map(tuple),
                             field_lists()), check_store_down),
    "upstream_fields": (st.tuples(UPSTREAM_FIELD_NAMES, UPSTREAM_FIELD_VALUES, st.booleans()),
                        check_upstream_field),
}  # fmt: skip
