"""Health, readiness, metrics, and the shape of every error response."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from checks import JSON_UTF8, Samples, assert_json_error, metric_samples, value
from conftest import GatewayFactory, Upstream, bearer, closed_port_url, login
from gateway.testing.embedded import free_port
from rawhttp import raw_request


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return metric_samples(await resp.text())


async def raw_get(client: TestClient, target: str) -> tuple[int, dict[str, str], bytes]:
    resp = await raw_request(client, "GET", target, host="gw.test")
    return resp.status, {k.lower(): v for k, v in resp.headers}, resp.body


# --- health and readiness --------------------------------------------------------------------


async def test_healthz_is_200_json(gw: TestClient, upstream: Upstream) -> None:
    resp = await gw.get("/healthz")
    assert resp.status == 200
    assert resp.headers["Content-Type"].replace(" ", "").lower() == JSON_UTF8
    assert await resp.json() == {"status": "ok"}
    assert resp.headers["X-Request-ID"]
    assert upstream.seen == []


async def test_head_healthz_works(gw: TestClient) -> None:
    resp = await gw.head("/healthz")
    assert resp.status == 200
    assert await resp.read() == b""


async def test_readyz_is_200_when_redis_answers(gw: TestClient) -> None:
    resp = await gw.get("/readyz")
    assert resp.status == 200
    assert resp.headers["Content-Type"].replace(" ", "").lower() == JSON_UTF8
    assert await resp.json() == {"status": "ready"}


async def test_readyz_is_503_when_redis_is_unreachable_and_healthz_stays_200(
        make_gateway: GatewayFactory) -> None:
    client = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:"})
    resp = await client.get("/readyz")
    assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(), 503,
                      "store_unavailable")
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_wrong_method_on_health_endpoints_is_405(gw: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        resp = await gw.post(path, data=b"")
        assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(), 405,
                          "method_not_allowed")
        assert "GET" in resp.headers["Allow"]


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_is_prometheus_text(gw: TestClient) -> None:
    resp = await gw.get("/metrics")
    assert resp.status == 200
    content_type = resp.headers["Content-Type"].replace(" ", "").lower()
    assert content_type.startswith("text/plain;")
    assert "version=" in content_type
    text = await resp.text()
    assert "# TYPE wxgw_requests_total counter" in text or "# TYPE wxgw_requests counter" in text
    assert list(text_string_to_metric_families(text))  # parses


async def test_metrics_count_requests_by_route_and_status(
        gw: TestClient, upstream: Upstream) -> None:
    for i in range(3):
        assert (await gw.get(f"/public/page/{i}")).status == 200
    assert (await gw.get("/api/secret")).status == 401
    session = await login(gw)
    assert (await gw.get("/api/secret", headers=bearer(session["token"]))).status == 200
    assert (await gw.get("/maybe/status/503")).status == 503
    samples = await scrape(gw)
    total = "wxgw_requests_total"
    assert value(samples, total, route="/public/", status="200") == 3
    assert value(samples, total, route="/api/", status="401") == 1
    assert value(samples, total, route="/api/", status="200") == 1
    assert value(samples, total, route="/maybe/", status="503") == 1
    assert value(samples, total, route="/auth/login", status="200") == 1
    assert value(samples, total, route="/public/", status="401") is None


async def test_metrics_upstream_duration_histogram_per_route(
        gw: TestClient, upstream: Upstream) -> None:
    for _ in range(3):
        assert (await gw.get("/public/x")).status == 200
    assert (await gw.get("/api/x")).status == 401  # never forwarded: no upstream timing
    samples = await scrape(gw)
    name = "wxgw_upstream_duration_seconds"
    buckets = [(ls, v) for ls, v in samples.get(f"{name}_bucket", []) if ls["route"] == "/public/"]
    assert len(buckets) >= 5
    assert value(samples, f"{name}_bucket", route="/public/", le="+Inf") == 3
    assert value(samples, f"{name}_count", route="/public/") == 3
    total = value(samples, f"{name}_sum", route="/public/")
    assert total is not None and 0 < total < 5
    # cumulative buckets never decrease
    ordered = sorted(buckets, key=lambda lv: float(lv[0]["le"]))
    assert [v for _, v in ordered] == sorted(v for _, v in ordered)
    assert value(samples, f"{name}_count", route="/api/") is None


async def test_metrics_count_logins_by_outcome(gw: TestClient) -> None:
    await login(gw)
    await login(gw)
    resp = await gw.post("/auth/login", json={"code": f"errcode-40029-{uuid.uuid4().hex[:6]}"})
    assert resp.status == 401
    samples = await scrape(gw)
    assert value(samples, "wxgw_logins_total", outcome="ok") == 2
    assert value(samples, "wxgw_logins_total", outcome="invalid_code") == 1
    assert value(samples, "wxgw_requests_total", route="/auth/login", status="200") == 2
    assert value(samples, "wxgw_requests_total", route="/auth/login", status="401") == 1


async def test_metrics_route_label_never_holds_the_raw_path(
        gw: TestClient, upstream: Upstream) -> None:
    marker = f"zz{uuid.uuid4().hex[:10]}"
    assert (await gw.get(f"/{marker}/a")).status == 404
    assert (await gw.get(f"/public/{marker}")).status == 200
    status, _, _ = await raw_get(gw, f"/public/%2e%2e/{marker}")
    assert status == 400
    text = await (await gw.get("/metrics")).text()
    assert marker not in text
    samples = metric_samples(text)
    assert value(samples, "wxgw_requests_total", route="/public/", status="200") == 1
    statuses = {ls["status"] for ls, _ in samples["wxgw_requests_total"]}
    assert statuses == {"200", "400", "404"}


async def test_requests_matching_no_route_are_labelled_none(
        gw: TestClient, upstream: Upstream) -> None:
    """Unmatched and refused paths share one fixed label, not a router pattern or the path."""
    assert (await gw.get("/nowhere/a")).status == 404
    assert (await gw.get("/elsewhere")).status == 404
    status, _, _ = await raw_get(gw, "/public/%2e%2e/x")
    assert status == 400
    samples = await scrape(gw)
    routes = {ls["route"] for ls, _ in samples["wxgw_requests_total"]}
    assert routes == {"none"}
    assert value(samples, "wxgw_requests_total", route="none", status="404") == 2
    assert value(samples, "wxgw_requests_total", route="none", status="400") == 1


async def test_metrics_are_per_gateway(make_gateway: GatewayFactory) -> None:
    first, second = await make_gateway(), await make_gateway()
    for _ in range(2):
        assert (await first.get("/public/x")).status == 200
    assert value(await scrape(first), "wxgw_requests_total", route="/public/", status="200") == 2
    assert value(await scrape(second), "wxgw_requests_total", route="/public/",
                 status="200") is None


# --- every gateway error is JSON with charset utf-8 ------------------------------------------


@pytest.mark.parametrize("case", [
    "unknown_path", "unauthorized", "invalid_token", "method_not_allowed", "bad_login_json",
    "login_not_object", "unknown_app", "login_too_large", "invalid_code", "session_no_token",
    "verify_no_token", "two_authorization_headers",
])
async def test_gateway_errors_are_json_utf8(gw: TestClient, case: str) -> None:
    expected: dict[str, tuple[int, str]] = {
        "unknown_path": (404, "not_found"), "unauthorized": (401, "unauthorized"),
        "invalid_token": (401, "unauthorized"), "method_not_allowed": (405, "method_not_allowed"),
        "bad_login_json": (400, "invalid_request"), "login_not_object": (400, "invalid_request"),
        "unknown_app": (400, "unknown_app"), "login_too_large": (413, "payload_too_large"),
        "invalid_code": (401, "invalid_code"), "session_no_token": (401, "unauthorized"),
        "verify_no_token": (401, "unauthorized"),
        "two_authorization_headers": (400, "invalid_request"),
    }
    requests: dict[str, Any] = {
        "unknown_path": lambda: gw.get("/no/such/route"),
        "unauthorized": lambda: gw.get("/api/x"),
        "invalid_token": lambda: gw.get("/api/x", headers=bearer("x.y.z")),
        "method_not_allowed": lambda: gw.get("/auth/login"),
        "bad_login_json": lambda: gw.post("/auth/login", data=b"{not json"),
        "login_not_object": lambda: gw.post("/auth/login", json=["code"]),
        "unknown_app": lambda: gw.post("/auth/login", json={"code": "c", "appid": "wxnope"}),
        "login_too_large": lambda: gw.post("/auth/login", data=b"{" + b" " * 100_000 + b"}"),
        "invalid_code": lambda: gw.post("/auth/login", json={"code": "errcode-40029-a"}),
        "session_no_token": lambda: gw.get("/auth/session"),
        "verify_no_token": lambda: gw.get("/auth/verify"),
        "two_authorization_headers": lambda: gw.get(
            "/api/x", headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")]),
    }
    resp = await requests[case]()
    assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(),
                      *expected[case])
    assert resp.headers["X-Request-ID"]


async def test_proxy_errors_are_json_utf8(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/down/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public"},
        {"path": "/t/", "upstream": upstream.url, "auth": "public", "timeout": "200ms"},
        {"path": "/public/", "upstream": upstream.url, "auth": "public"}])
    resp = await client.get("/down/x")
    assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(), 502,
                      "upstream_unavailable")
    resp = await client.get("/t/slow/800")
    assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(), 504,
                      "upstream_timeout")
    status, headers, body = await raw_get(client, "/public/%2e%2e/x")
    assert_json_error(status, headers["content-type"], body, 400, "invalid_path")


async def test_store_errors_are_json_utf8(gw: TestClient, make_gateway: GatewayFactory) -> None:
    token = (await login(gw))["token"]
    down = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:"})
    for resp in (await down.get("/api/x", headers=bearer(token)),
                 await down.get("/auth/session", headers=bearer(token)),
                 await down.post("/auth/login", json={"code": f"c-{uuid.uuid4().hex[:8]}"})):
        assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(), 503,
                          "store_unavailable")
