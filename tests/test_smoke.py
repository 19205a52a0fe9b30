from __future__ import annotations

from aiohttp.test_utils import TestClient

from conftest import APPID, Upstream, bearer, login


async def test_login_then_protected_call_reaches_upstream_with_identity(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await gw.get("/api/orders?page=2", headers=bearer(session["token"]))
    assert resp.status == 200
    seen = upstream.last
    assert seen.raw_path == "/api/orders?page=2"
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("Authorization") == []
