"""Route matching: a pure function of the path, no sockets."""

from __future__ import annotations

from proxy.routing import Router
from tests.conftest import make_config


def test_first_matching_route_wins() -> None:
    """Routes match in order; `*` spans slashes; unmatched paths give None."""
    config = make_config("http://up:1", routes=[
        {"path": "/v1/payments/*", "id": "pay"}, {"path": "/v1/*", "id": "v1"},
        {"path": "/exact", "id": "exact"},
    ])  # fmt: skip
    router = Router(config.routes)
    assert router.match("/v1/payments/a/b").id == "pay"  # type: ignore[union-attr]
    assert router.match("/v1/payments").id == "v1"  # type: ignore[union-attr]
    assert router.match("/exact").id == "exact"  # type: ignore[union-attr]
    assert router.match("/exact/more") is None
    assert router.match("/v2") is None
