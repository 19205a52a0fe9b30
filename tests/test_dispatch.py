"""Which requests are the gateway's own endpoints and which are proxied, checked on the real
process: proxied paths skip aiohttp's router, yet every path is told apart as the router would
and still reaches the metrics."""

from __future__ import annotations

import multiprocessing
import re
from typing import Any

import aiohttp
import pytest

from gateway import app

from checks import expect_error, metric_samples, value
from conftest import APPID, Upstream
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


async def test_verify_skips_the_router_yet_answers_as_the_router_did(
        launch: Launch, config_dict: dict[str, Any]) -> None:
    gw = await launch(config_dict)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        login = await gw.login()
        bearer = {"Authorization": f"Bearer {login['token']}"}
        answers = []
        # The answer is built once per identity: the second must be the first, but for its
        # own request id. Forward-auth callers may send the original method; HEAD has no body.
        for method, path in (("GET", "/auth/verify"), ("GET", "/auth/verify"),
                             ("POST", "/auth/verify"), ("GET", "/auth/verif%79")):
            async with http.request(method, f"{gw.url}{path}", headers=bearer) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
                assert resp.headers["X-WX-OpenID"] == login["openid"]
                assert resp.headers["X-WX-AppID"] == APPID
                answers.append((await resp.json(), resp.headers["X-Request-ID"]))
        bodies, request_ids = zip(*answers)
        assert all(body == bodies[0] for body in bodies), bodies
        assert bodies[0]["openid"] == login["openid"] and bodies[0]["appid"] == APPID
        assert len(set(request_ids)) == len(request_ids), request_ids
        async with http.head(f"{gw.url}/auth/verify", headers=bearer) as resp:
            assert resp.status == 200
            assert resp.headers["X-WX-OpenID"] == login["openid"]
            assert await resp.read() == b""
        # An Expect header still goes through the router's expect handler.
        async with http.get(f"{gw.url}/auth/verify",
                            headers={**bearer, "Expect": "100-continue"}) as resp:
            assert resp.status == 200
            assert resp.headers["X-WX-OpenID"] == login["openid"]
        async with http.get(f"{gw.url}/auth/verify", headers={"Expect": "bogus"}) as resp:
            await expect_error(resp, 417, "expectation_failed")
        async with http.get(f"{gw.url}/auth/verify") as resp:
            await expect_error(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert "X-WX-OpenID" not in resp.headers
        # A client's own identity headers never come back as the verified ones.
        async with http.get(f"{gw.url}/auth/verify",
                            headers={**bearer, "X-WX-OpenID": "forged"}) as resp:
            assert resp.headers.getall("X-WX-OpenID") == [login["openid"]]
        async with http.post(f"{gw.url}/auth/logout", headers=bearer) as resp:
            assert resp.status == 204
        # The prebuilt answer went with the session.
        async with http.get(f"{gw.url}/auth/verify", headers=bearer) as resp:
            await expect_error(resp, 401, "unauthorized")
            assert "X-WX-OpenID" not in resp.headers
        async with http.get(f"{gw.url}/metrics") as resp:
            samples = metric_samples(await resp.text())
    assert value(samples, "wxgw_requests_total", route="/auth/verify", status="200") == 7
    assert value(samples, "wxgw_requests_total", route="/auth/verify", status="401") == 2
    assert value(samples, "wxgw_requests_total", route="/auth/verify", status="417") == 1
    access = await gw.wait_for_line(
        lambda line: "gateway.access" in line and "/auth/verif" in line, count=10)
    assert len(access) == 10, access
    assert sum("route=/auth/verify" in line and "auth=ok" in line for line in access) == 7


async def _request_ids(gw: Any, http: aiohttp.ClientSession, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        async with http.get(f"{gw.url}/public/rid") as resp:
            assert resp.status == 200
            ids.append(resp.headers["X-Request-ID"])
    return ids


async def test_generated_request_ids_differ_across_restarts(
        launch: Launch, config_dict: dict[str, Any], upstream: Upstream) -> None:
    async with aiohttp.ClientSession() as http:
        first = await launch(config_dict)
        await first.wait_healthy(http)
        before = await _request_ids(first, http, 3)
        assert await first.stop() == 0
        second = await launch(config_dict)
        await second.wait_healthy(http)
        after = await _request_ids(second, http, 3)
    assert len(set(before + after)) == 6, (before, after)
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in before + after), (before, after)
    # what the upstream was told is what the client was told
    assert [s.header("X-Request-ID")[0] for s in upstream.seen[-6:]] == before + after


def _next_request_ids() -> list[str]:
    return [next(app._request_ids) for _ in range(3)]


def test_a_forked_process_draws_its_own_request_ids() -> None:
    with multiprocessing.get_context("fork").Pool(1) as pool:
        theirs = pool.apply(_next_request_ids)
    ours = _next_request_ids()
    assert not set(theirs) & set(ours), (theirs, ours)
