"""OpenTelemetry tracing: the span tree a collector receives, and what tracing off costs.

The proxy exports over real OTLP/HTTP to a collector this module runs on loopback with
aiohttp; the collector decodes each export with the OTLP protobuf messages, so the tests see
exactly what a real collector would. The counting upstream records the headers it received,
which shows the trace context the proxy passed on.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from proxy import tracing
from proxy.app import PROXY, TRACING
from proxy.config import ConfigError, describe, parse_config
from proxy.keys import scope_of, storage_key
from proxy.reload import reload_file
from proxy.server import Running, serve
from tests.conftest import (
    ProxyFactory,
    RedisServer,
    Upstream,
    free_port,
    key,
    make_config,
    raw_config,
)
from tests.support.proxies import REPO, child_env

HOOKS_FILE = tracing.__file__  # proxy/tracing.py
SERVER, CLIENT = ProtoSpan.SPAN_KIND_SERVER, ProtoSpan.SPAN_KIND_CLIENT


@dataclass(frozen=True)
class Recorded:
    """One span as the collector received it."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    error: bool
    service: str


@dataclass
class Collector:
    """An OTLP/HTTP trace receiver: every span of every export, and the raw bodies."""

    url: str = ""
    spans: list[Recorded] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def trace(self, trace_id: str) -> list[Recorded]:
        return [span for span in self.spans if span.trace_id == trace_id]

    def servers(self) -> list[Recorded]:
        return [span for span in self.spans if span.kind == SERVER]


COLLECTOR = web.AppKey("collector", Collector)


def _value(value: AnyValue) -> Any:
    return getattr(value, value.WhichOneof("value") or "string_value")


def _recorded(span: ProtoSpan, service: str) -> Recorded:
    attributes = {kv.key: _value(kv.value) for kv in span.attributes}
    failed = span.status.code == span.status.STATUS_CODE_ERROR
    return Recorded(span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                    span.parent_span_id.hex(), attributes, failed, service)  # fmt: skip


async def _receive(request: web.Request) -> web.Response:
    collector = request.app[COLLECTOR]
    body = await request.read()
    collector.bodies.append(body)
    export = ExportTraceServiceRequest()
    export.ParseFromString(body)
    for resource_spans in export.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            service = str(resource.get("service.name"))
            collector.spans.extend(_recorded(span, service) for span in scope_spans.spans)
    return web.Response(
        body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
    )


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    state = Collector()
    app = web.Application()
    app[COLLECTOR] = state
    app.router.add_post("/v1/traces", _receive)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    state.url = f"http://127.0.0.1:{port}"
    yield state
    await runner.cleanup()


async def exported(proxy: Running, collector: Collector,
                   done: Callable[[Collector], bool], seconds: float = 10.0) -> None:  # fmt: skip
    """Export the proxy's ended spans until `done` holds (a span may end just after the
    client has its answer: the record of a first attempt, say)."""
    tracing = proxy.app[TRACING]
    deadline = time.monotonic() + seconds
    while True:
        await asyncio.to_thread(tracing.flush)  # blocking: it posts to our collector
        if done(collector):
            return
        assert time.monotonic() < deadline, f"spans never arrived: {collector.spans}"
        await asyncio.sleep(0.01)


def tracing_config(collector: Collector, **settings: Any) -> dict[str, Any]:
    return {"endpoint": collector.url, "service_name": "payments-proxy", **settings}


async def post(client: aiohttp.ClientSession, proxy: Running, idem: str | None,
               headers: dict[str, str] | None = None) -> int:  # fmt: skip
    sent = dict(headers or {})
    if idem is not None:
        sent["Idempotency-Key"] = idem
    async with client.post(proxy.url + "/orders", data=b'{"amount": 5}', headers=sent) as reply:
        await reply.read()
        return reply.status


def traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def parent_of(header: str) -> tuple[str, str, bool]:
    """(trace id, parent span id, sampled) of a W3C `traceparent` (other flags may be set)."""
    version, trace_id, span_id, flags = header.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
    return trace_id, span_id, bool(int(flags, 16) & 1)


# --- the span tree ------------------------------------------------------------------------


@pytest.mark.parametrize("system", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_first_attempt_and_its_replay_make_the_span_tree_the_upstream_continues(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, upstream: Upstream,
    collector: Collector, system: str, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """First attempt: server span -> store begin, upstream POST, store complete, and the
    upstream's traceparent names the POST span; the replay: server span -> store begin only."""
    redis: RedisServer | None = request.getfixturevalue("redis") if system == "redis" else None
    store_url = "memory://" if redis is None else redis.url
    proxy = await start_proxy(store={"url": store_url}, tracing=tracing_config(collector))
    idem = key("traced")
    assert await post(client, proxy, idem) == 201
    await exported(proxy, collector, lambda c: len(c.servers()) == 1 and len(c.spans) == 4)
    [server] = collector.servers()
    tree = collector.trace(server.trace_id)
    children = {span.name: span for span in tree if span is not server}
    assert set(children) == {"store begin", "POST", "store complete"}
    assert {(span.parent_id, span.kind) for span in children.values()} == {(server.span_id, CLIENT)}
    assert server.parent_id == "" and server.name == "POST all" and not server.error
    record = storage_key("default", scope_of([("Authorization", ())]), idem)
    assert server.attributes == server.attributes | {
        "http.request.method": "POST", "http.response.status_code": 201, "url.path": "/orders",
        "idempotency_proxy.route": "all", "idempotency_proxy.outcome": "forwarded",
        "idempotency_proxy.key_hash": record.hash,
    }  # fmt: skip
    begin, call = children["store begin"], children["POST"]
    assert begin.attributes["db.system.name"] == system
    assert begin.attributes["idempotency_proxy.decision"] == "acquired"
    assert call.attributes["http.response.status_code"] == 201
    assert call.attributes["url.full"] == upstream.url + "/orders"
    assert server.service == "payments-proxy"
    # The upstream's parent is the proxy's upstream span, in the proxy's trace.
    assert parent_of(upstream.headers[-1]["traceparent"]) == (server.trace_id, call.span_id, True)

    assert await post(client, proxy, idem) == 201  # the retry: replayed
    await exported(proxy, collector, lambda c: len(c.servers()) == 2 and len(c.spans) == 6)
    replay = next(span for span in collector.servers() if span is not server)
    assert replay.attributes["idempotency_proxy.outcome"] == "replayed"
    [lookup] = [span for span in collector.trace(replay.trace_id) if span is not replay]
    assert (lookup.name, lookup.parent_id) == ("store begin", replay.span_id)
    assert lookup.attributes["idempotency_proxy.decision"] == "replay"
    assert upstream.executions(idem) == 1
    exports = b"".join(collector.bodies)
    assert idem.encode() not in exports  # the key hash only, never the key


async def test_an_incoming_traceparent_is_the_server_spans_parent_even_at_sampling_0(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, upstream: Upstream,
    collector: Collector,
) -> None:  # fmt: skip
    """A sampled parent is followed; without one, sampling 0 makes no span, and the client's
    unsampled trace context reaches the upstream untouched."""
    proxy = await start_proxy(tracing=tracing_config(collector, sample_ratio=0))
    assert await post(client, proxy, key("root")) == 201
    assert "traceparent" not in upstream.headers[-1]
    unsampled = traceparent(os.urandom(16).hex(), os.urandom(8).hex(), sampled=False)
    assert await post(client, proxy, key("unsampled"), {"traceparent": unsampled}) == 201
    assert upstream.headers[-1]["traceparent"] == unsampled

    trace_id, parent_id = os.urandom(16).hex(), os.urandom(8).hex()
    sent = {"traceparent": traceparent(trace_id, parent_id), "tracestate": "vendor=abc"}
    assert await post(client, proxy, key("child"), sent) == 201
    await exported(proxy, collector, lambda c: len(c.servers()) == 1 and len(c.spans) == 4)
    [server] = collector.servers()  # the two requests before it made none
    assert (server.trace_id, server.parent_id) == (trace_id, parent_id)
    [call] = [span for span in collector.trace(trace_id) if span.name == "POST"]
    received = upstream.headers[-1]
    assert parent_of(received["traceparent"]) == (trace_id, call.span_id, True)
    assert received["tracestate"] == "vendor=abc"  # the parent's state travels with it


async def test_an_unprotected_request_and_an_upstream_failure_are_traced(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, collector: Collector
) -> None:
    """A streamed pass-through gets an upstream span; an unreachable upstream marks the
    upstream span failed (not delivered) and the server span's 502 an error."""
    proxy = await start_proxy(tracing=tracing_config(collector))
    async with client.get(proxy.url + "/stream/2") as reply:
        assert reply.status == 200 and await reply.read() == b"chunk0;chunk1;"
    await exported(proxy, collector, lambda c: len(c.servers()) == 1 and len(c.spans) == 2)
    [server] = collector.servers()
    assert server.attributes["idempotency_proxy.outcome"] == "passthrough"
    assert "idempotency_proxy.key_hash" not in server.attributes
    [call] = [span for span in collector.trace(server.trace_id) if span is not server]
    assert (call.name, call.parent_id, call.kind) == ("GET", server.span_id, CLIENT)

    closed = f"http://127.0.0.1:{free_port()}"
    down = await start_proxy(upstream=closed, tracing=tracing_config(collector))
    assert await post(client, down, key("down")) == 502
    await exported(down, collector, lambda c: len(c.servers()) == 2 and len(c.spans) == 6)
    failed = next(span for span in collector.servers() if span is not server)
    assert failed.error and failed.attributes["http.response.status_code"] == 502
    tree = {span.name: span for span in collector.trace(failed.trace_id)}
    assert tree["POST"].error and tree["POST"].attributes["idempotency_proxy.delivered"] is False
    assert tree["POST"].attributes["error.type"] == "UpstreamUnreachable"
    assert "store release" in tree  # the record was released: the retry may execute


@pytest.mark.redis
async def test_a_store_that_fails_marks_its_span_and_the_503_server_span(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, upstream: Upstream,
    collector: Collector, redis: RedisServer,
) -> None:  # fmt: skip
    """Redis down: the `store begin` span is an error naming the proxy's store error, the
    server span's 503 an error, and no upstream span exists (the upstream was not called)."""
    proxy = await start_proxy(store={"url": redis.url, "timeout": "200ms"},
                              tracing=tracing_config(collector))  # fmt: skip
    assert await post(client, proxy, key("warm")) == 201
    redis.stop()
    idem = key("down")
    assert await post(client, proxy, idem) == 503
    await exported(proxy, collector, lambda c: len(c.servers()) == 2 and len(c.spans) == 6)
    [failed] = [span for span in collector.servers() if span.attributes[
        "http.response.status_code"] == 503]  # fmt: skip
    assert failed.error and failed.attributes["idempotency_proxy.outcome"] == "store_unavailable"
    [begin] = [span for span in collector.trace(failed.trace_id) if span is not failed]
    assert (begin.name, begin.parent_id, begin.error) == ("store begin", failed.span_id, True)
    assert begin.attributes["error.type"] == "StoreUnavailable"
    assert upstream.executions(idem) == 0


async def test_spans_still_queued_are_exported_when_the_proxy_stops(
    upstream: Upstream, client: aiohttp.ClientSession, collector: Collector
) -> None:
    """The shutdown (what SIGTERM runs) flushes the exporter: no span is left behind."""
    config = make_config(upstream.url, tracing=tracing_config(collector))
    async with serve(config) as proxy:
        assert await post(client, proxy, key("last")) == 201
        assert collector.spans == []  # batched: nothing is sent before the flush
    assert {span.name for span in collector.spans} == {
        "POST all", "store begin", "POST", "store complete"
    }  # fmt: skip


async def test_at_sampling_0_a_request_calls_nothing_of_opentelemetry(
    start_proxy: ProxyFactory, client: aiohttp.ClientSession, collector: Collector
) -> None:
    """Unsampled requests take the hooks' short path: no OpenTelemetry code runs for them,
    only the four hook functions, each of which hands on the call it wraps."""
    proxy = await start_proxy(tracing=tracing_config(collector, sample_ratio=0))
    assert await post(client, proxy, key("warm")) == 201
    called: Counter[tuple[str, str]] = Counter()

    def profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            called[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    sys.setprofile(profile)  # this thread only: the exporter's thread is not watched
    try:
        for index in range(10):
            assert await post(client, proxy, key(f"untraced{index}")) == 201
    finally:
        sys.setprofile(None)
    assert not [name for name in called if f"{os.sep}opentelemetry{os.sep}" in name[0]]
    hooks = {name: count for (path, name), count in called.items() if path == HOOKS_FILE}
    assert hooks == {"trace": 10, "begin": 10, "complete": 10, "fetch": 10}
    assert collector.spans == []


# --- off, and on without the extra -----------------------------------------------------

_SERVE_ONE = """
import asyncio, json, sys
import aiohttp
from proxy.config import parse_config
from proxy.server import serve

async def main(upstream, idem):
    config = parse_config({"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
                           "upstream": upstream, "store": {"url": "memory://"}}, env={})
    async with serve(config) as proxy, aiohttp.ClientSession() as client:
        async with client.post(proxy.url + "/orders", data=b"{}",
                               headers={"Idempotency-Key": idem}) as reply:
            status = reply.status
    # redis-py imports OpenTelemetry's metrics API itself when it is installed; what tracing
    # would load (our hooks, the SDK's tracer, an exporter) must stay out.
    loaded = sorted(m for m in sys.modules if m == "proxy.tracing"
                    or m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter")))
    print(json.dumps({"status": status, "loaded": loaded}))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_with_tracing_off_opentelemetry_is_never_imported(upstream: Upstream) -> None:
    """A proxy process that served a request without `tracing:` has loaded none of the
    tracing code: not our hooks, not OpenTelemetry's tracer SDK, not an exporter."""
    idem = key("off")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVE_ONE, upstream.url, idem, cwd=REPO, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    assert json.loads(out) == {"status": 201, "loaded": []}
    assert upstream.executions(idem) == 1


def test_tracing_without_the_extra_installed_is_a_config_error_that_says_how_to_fix_it() -> None:
    """With OpenTelemetry missing, a `tracing:` block is refused at start with the pip command."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the extra were not installed\n"
        "from proxy.config import ConfigError, parse_config\n"
        "try:\n"
        "    parse_config({'tracing': {'sample_ratio': 0.1}}, env={})\n"
        "except ConfigError as exc:\n"
        "    print(exc.problems)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(),
                            capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
    assert result.stdout.strip() == repr([
        "tracing: OpenTelemetry is not installed; install the extra: "
        "pip install 'idempotency-proxy[otel]'"
    ])  # fmt: skip


# --- the config block -------------------------------------------------------------------


def test_the_tracing_block_is_validated_and_its_secrets_masked() -> None:
    """Defaults, the OTLP path added to a bare endpoint, every problem named by its field,
    and export header values never printed."""
    assert parse_config({}, env={}).tracing is None
    assert parse_config({"tracing": {"enabled": False, "sample_ratio": 1}}, env={}).tracing is None
    config = parse_config({"tracing": {
        "endpoint": "https://otel:s3cret@collector.example:4318", "sample_ratio": 0.25,
        "headers": {"X-Api-Key": "k3y-value"},
    }}, env={})  # fmt: skip
    assert config.tracing is not None
    assert config.tracing.endpoint == "https://otel:s3cret@collector.example:4318/v1/traces"
    assert config.tracing.sample_ratio == 0.25
    assert config.tracing.service_name == "idempotency-proxy"
    shown = json.dumps(describe(config))
    assert "s3cret" not in shown and "k3y-value" not in shown
    assert describe(config)["tracing"]["headers"] == {"X-Api-Key": "***"}

    with pytest.raises(ConfigError) as refused:
        parse_config({"tracing": {
            "sample_ratio": 1.5, "endpoint": "grpc://collector:4317", "service": "x",
            "headers": {"X-Api-Key": 42}, "enabled": "yes",
        }}, env={})  # fmt: skip
    problems = refused.value.problems
    assert problems == [
        "tracing.sample_ratio: expected a number from 0 to 1, got 1.5",
        'tracing.endpoint: expected an http:// or https:// URL, got "grpc://collector:4317"',
        "tracing.service: unknown key",
        "tracing.headers: expected a non-empty string (the value is not shown)",
        "tracing.enabled: expected true or false, got 'yes'",
    ]


async def test_a_reload_keeps_tracing_as_started_and_says_it_needs_a_restart(
    start_proxy: ProxyFactory, upstream: Upstream, collector: Collector, tmp_path: Path
) -> None:
    """Tracing is set up at start: a file that turns it off is applied except for `tracing`."""
    proxy = await start_proxy(tracing=tracing_config(collector))
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream.url, log_level="warning")))
    reloaded = reload_file(proxy.app[PROXY], str(path))
    assert reloaded.applied and reloaded.restart_required == ["tracing"]
    assert proxy.app[PROXY].config.tracing == proxy.app[TRACING].config
    assert proxy.app[PROXY].config.log_level == "warning"
