"""Which requests are the gateway's own endpoints and which are proxied, checked on the real
process: proxied paths skip aiohttp's router, yet every path is told apart as the router would
and still reaches the metrics."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from conftest import Upstream
from process import Launch

pytestmark = pytest.mark.timeout(120)


async def test_endpoints_and_proxy_paths_are_told_apart_as_the_router_would(
        launch: Launch, config_dict: dict[str, Any], upstream: Upstream) -> None:
    gw = await launch(config_dict)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        # A percent-encoded endpoint path is still the endpoint (the router decodes it too).
        async with http.get(f"{gw.url}/heal%74hz") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "ok"
        # A wrong method on an endpoint: the router's 405, in the gateway's JSON error shape.
        async with http.delete(f"{gw.url}/auth/login") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
        # Not an endpoint: the proxy, which has no route for it.
        async with http.get(f"{gw.url}/healthz/x") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
        async with http.get(f"{gw.url}/public/hello?x=1") as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-ID"]
        async with http.get(f"{gw.url}/metrics") as resp:
            text = await resp.text()
    assert [s.raw_path for s in upstream.seen] == ["/public/hello?x=1"]
    # Proxied requests still reach the metrics, labelled by route, not by raw path.
    assert 'wxgw_requests_total{route="/public/",status="200"} 1.0' in text
    assert 'wxgw_requests_total{route="none",status="404"} 1.0' in text
