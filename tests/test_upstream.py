"""Header rules for the upstream hop, on requests built by aiohttp's own test helper."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream import request_headers, response_headers


def test_headers_named_in_connection_are_not_forwarded() -> None:
    """Connection-listed, hop-by-hop and (when re-framed) length headers stay behind."""
    request = make_mocked_request("POST", "/pay", headers=CIMultiDict([
        ("Host", "api.example"), ("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"),
        ("TE", "trailers"), ("Content-Length", "2"), ("X-Keep", "yes"),
        ("X-Forwarded-For", "10.0.0.1"),
    ]))  # fmt: skip
    sent = request_headers(request, keep_length=False)
    assert "X-Hop" not in sent and "TE" not in sent and "Connection" not in sent
    assert "Content-Length" not in sent
    assert sent["X-Keep"] == "yes"
    assert sent["X-Forwarded-Host"] == "api.example"
    assert sent["X-Forwarded-For"].startswith("10.0.0.1, ")
    assert request_headers(request, keep_length=True)["Content-Length"] == "2"


def test_response_keeps_repeated_headers_and_gains_a_date() -> None:
    """Set-Cookie twice stays twice; an answer without Date gets one to replay."""
    upstream = CIMultiDictProxy(CIMultiDict([
        ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Connection", "close, X-Drop"),
        ("X-Drop", "x"), ("Content-Length", "5"),
    ]))  # fmt: skip
    pairs = response_headers(upstream, keep_length=False)
    names = [name for name, _ in pairs]
    assert names.count("Set-Cookie") == 2
    assert "X-Drop" not in names and "Content-Length" not in names
    assert "Date" in names
