"""Security hardening and proxy completeness: path normalisation, header spoofing in
every spelling, malformed and oversize requests (answered by the real process), trusted
proxies, Host handling, response headers, timeouts, cancellation and token hygiene."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from contextlib import AbstractAsyncContextManager
from typing import Any, AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from checks import SPOOF, expect_error, identity_headers_seen, unaccepting_port
from conftest import APPID, GatewayFactory, Upstream, base_config, login
from process import GatewayProcess, Launch
from rawhttp import build_request, raw_request
from gateway import loader
from gateway.testing.embedded import EmbeddedRedis
from gateway.errors import ConfigError

WAIT = 10.0  # upper bound for any single network wait in this file


# --- a real gateway process (the runner in gateway/server.py is only there) ------------------


RealGateway = Callable[[dict[str, Any]], AbstractAsyncContextManager[GatewayProcess]]


@pytest.fixture
def real_gateway(launch: Launch) -> RealGateway:
    """``async with real_gateway(config) as gw``: ``python -m gateway`` on a free port with this
    configuration, healthy; killed on exit."""
    @contextlib.asynccontextmanager
    async def running(data: dict[str, Any]) -> AsyncIterator[GatewayProcess]:
        gw = await launch(data, healthy_within=WAIT)
        try:
            async with aiohttp.ClientSession() as http:
                await gw.wait_healthy(http)
            yield gw
        finally:
            await gw.close()
    return running


@pytest.fixture
def real_config(redis_server: EmbeddedRedis, wechat: TestServer,
                upstream: Upstream) -> dict[str, Any]:
    return base_config(redis_server.url, f"wxgw-hard-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat.port}", upstream.url)


# --- path normalisation ----------------------------------------------------------------------

# Each one arrives on a public prefix and, resolved by some server or framework, would land
# under /api/ (auth required) or on the gateway's own endpoints. The gateway's rule: 400
# invalid_path, nothing forwarded. (test_proxy.py has its own, separate list.)
ESCAPES = [
    "/public/../api/orders",
    "/public/../api/orders?page=1",
    "/public/%2e%2e/api/orders",
    "/public/%2E%2E/api/orders",
    "/public/%2E%2e/api/orders",
    "/public/%2e%2E/api/orders",
    "/public/.%2E/api/orders",
    "/public/%2e./api/orders",
    "/public/%2E./api/orders",
    "/public/%2e/../api/orders",
    "/public/%2e/api/orders",
    "/public/./../api/orders",
    "/public/x/./y",
    "/public//api/orders",
    "/public/x//../../api/orders",
    "/public/..%2fapi/orders",
    "/public/..%2Fapi/orders",
    "/public/%2e%2e%2fapi%2forders",
    "/public/%2F%2E%2E%2Fapi",
    "/public/..%5capi/orders",
    "/public/..%5Capi/orders",
    "/public/..%5C..%5Capi",
    "/public/..\\api/orders",
    "/public/x\\..\\..\\api\\orders",
    "/public/%00/../api/orders",
    "/public/orders%00.json",
    "/public/.%00./api",
    "/public/%c0%ae%c0%ae/api/orders",
    "/public/..%c0%afapi/orders",
    "/public/%c0%ae%c0%ae%c0%afapi",
    "/public/%C0%AE%C0%AE/api/orders",
    "/public/%e0%80%ae%e0%80%ae/api/orders",
    "/public/..%e0%80%afapi/orders",
    "/public/%c1%9c..%c1%9capi",
    "/public/%f0%80%80%ae%f0%80%80%ae/api",
    "/public/%ed%a0%80/api",
    "/public/%252e%252e/api/orders",
    "/public/..%252fapi/orders",
    "/public/..%255capi/orders",
    "/public/%25%32%65%25%32%65/api/orders",
    "/public/..%25%32%66api/orders",
    "/public;/../api/orders",
    "/public/x;/../../api/orders",
    "/public/x;a=b/../../api/orders",
    "/public/..;/api/orders",
    "/public/%2e%2e;/api/orders",
    "/public/..;jsessionid=1/api/orders",
    "/public/.;/x",
    "/public/x/..",
    "/public/x/%2e%2e",
    "/public/x/.",
    "/public/x/%2e",
    "/public/a%09b",
    "/public/a%0D%0AX-WX-OpenID:%20spoof",
    "/public/a%0Ab",
    "/public/a%7fb",
    "/public/a%1bb",
    "/public/a/b/c/../../../../api/orders",
    "/public/%2e%2e/%2e%2e/%2e%2e/%2e%2e/api/orders",
    "/public/" + "../" * 20 + "api/orders",
    "/public/" + "%2e%2e/" * 20 + "healthz",
    "/public/../auth/session",
    "/public/%2e%2e/metrics",
    "/public/.%2e/.%2E/%2E./readyz",
]

# Dots, escapes and tildes that are ordinary names: they must pass, byte for byte.
LOOKALIKES = [
    "/public/a..b",
    "/public/...",
    "/public/..../x",
    "/public/%2e%2ex",
    "/public/x%2e%2e",
    "/public/..a/b..",
    "/public/.hidden",
    "/public/.well-known/security.txt",
    "/public/a.b.",
    "/public/file.tar.gz",
    "/public/%41",
    "/public/~user",
    "/public/%7Euser/%7e",
    "/public/a%20b",
    "/public/caf%C3%A9/%E4%B8%AD%E6%96%87",
    "/public/100%25",
    "/public/a;b=c/d",
    "/public/x?next=../../api/orders&enc=%2e%2e%2f%5c//x",
]


@pytest.mark.parametrize("target", ESCAPES)
async def test_path_escapes_are_refused(gw: TestClient, upstream: Upstream, target: str) -> None:
    resp = await raw_request(gw, "GET", target)
    await expect_error(resp, 400, "invalid_path")
    assert upstream.seen == []


async def test_path_escapes_are_refused_with_a_token_and_on_every_method(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    auth = ("Authorization", f"Bearer {session['token']}")
    for method, target in [("POST", "/public/%2e%2e/api/orders"), ("DELETE", "/maybe/../api/x"),
                           ("PUT", "/public/..%2fapi/x"), ("GET", "/api/x/../../public/y")]:
        await expect_error(await raw_request(gw, method, target, [auth]), 400, "invalid_path")
    assert upstream.seen == []


def test_path_tables_are_big_enough() -> None:
    assert len(set(ESCAPES)) == len(ESCAPES) >= 40
    assert len(set(LOOKALIKES)) == len(LOOKALIKES) >= 10


@pytest.mark.parametrize("target", LOOKALIKES)
async def test_path_lookalikes_pass_byte_for_byte(
        gw: TestClient, upstream: Upstream, target: str) -> None:
    resp = await raw_request(gw, "GET", target)
    assert resp.status == 200, resp.body
    assert [s.raw_path for s in upstream.seen] == [target]
    assert identity_headers_seen(upstream.last.headers) == []


# --- header spoofing against the real process ------------------------------------------------

# Plain header names: valid HTTP, so the request is served, minus the forgery.
PLAIN_SPELLINGS = [b"X-WX-OpenID", b"x-wx-openid", b"X-WX-OPENID", b"X_WX_OpenID",
                   b"x_wx_unionid", b"X-Wx-AppId", b"X_WX_APPID", b"x-wx_openid",
                   b"X_wx-UnionId", b"x-WX-aPpId", b"X-MP-Platform", b"x_mp_platform",
                   b"X-WX-CorpID", b"X_WX_CORPID"]
# Whitespace around names: the parser may refuse them; whatever it does, no forgery passes.
# Each is sent after an innocent header, so a leading space is also an obsolete line fold.
ODD_LINES = [b"X-WX-OpenID : " + SPOOF.encode(), b"X-WX-OpenID\t: " + SPOOF.encode(),
             b" X-WX-OpenID: " + SPOOF.encode(), b"\tX-WX-OpenID: " + SPOOF.encode(),
             b"X_WX_AppID : " + SPOOF.encode(), b" x-wx-unionid : " + SPOOF.encode()]


async def test_real_process_identity_spellings_never_reach_upstream(
        real_gateway: RealGateway, real_config: dict[str, Any], upstream: Upstream) -> None:
    async with real_gateway(real_config) as gw:
        session = await gw.login()
        genuine = sorted([("x-wx-openid", session["openid"]), ("x-wx-appid", APPID),
                          ("x-wx-unionid", session["unionid"]), ("x-mp-platform", "wechat")])
        token_line = f"Authorization: Bearer {session['token']}".encode()
        routes = {"required": ("/api/p", [token_line], genuine),
                  "optional-token": ("/maybe/p", [token_line], genuine),
                  "optional-anonymous": ("/maybe/p", [], []),
                  "public": ("/public/p", [token_line], [])}
        problems: list[str] = []
        for case, (path, auth, expected) in routes.items():
            for line in [n + b": " + SPOOF.encode() for n in PLAIN_SPELLINGS] + ODD_LINES:
                before = len(upstream.seen)
                payload = build_request("GET", path, [b"X-Other: kept", line, *auth])
                resp = await gw.raw(payload)
                label = f"{case} {line!r}"
                if line in ODD_LINES and resp.status == 400:
                    body = resp.json()  # refused by the gateway: in its JSON, nothing forwarded
                    if resp.header("Content-Type")[0].split(";")[0] != "application/json" \
                            or set(body) != {"error", "message"}:
                        problems.append(f"{label}: 400 but not the JSON error: {resp.body!r}")
                    if len(upstream.seen) != before:
                        problems.append(f"{label}: refused yet forwarded")
                    continue
                if resp.status != 200 or len(upstream.seen) != before + 1:
                    problems.append(f"{label}: {resp.status} {resp.body[:200]!r}")
                    continue
                seen = upstream.last
                got = sorted((k.strip().lower().replace("_", "-"), v)
                             for k, v in identity_headers_seen(seen.headers))
                if got != expected:
                    problems.append(f"{label}: upstream saw {identity_headers_seen(seen.headers)}")
                if any(SPOOF in v for _, v in seen.headers):
                    problems.append(f"{label}: the forged value reached the upstream: "
                                    f"{[h for h in seen.headers if SPOOF in h[1]]}")
                if seen.header("Authorization"):
                    problems.append(f"{label}: Authorization was forwarded")
        assert problems == []


@pytest.mark.parametrize("path", ["/api/p", "/maybe/p"])
@pytest.mark.parametrize("pair", ["same-bearer", "bearer-then-basic", "basic-then-bearer",
                                  "bearer-then-junk", "differing-case"])
async def test_duplicate_authorization_headers_are_refused(
        gw: TestClient, upstream: Upstream, path: str, pair: str) -> None:
    token = (await login(gw))["token"]
    values = {"same-bearer": [f"Bearer {token}", f"Bearer {token}"],
              "bearer-then-basic": [f"Bearer {token}", "Basic dXNlcjpwYXNz"],
              "basic-then-bearer": ["Basic dXNlcjpwYXNz", f"Bearer {token}"],
              "bearer-then-junk": [f"Bearer {token}", "Bearer junk.junk.junk"],
              "differing-case": [f"Bearer {token}", f"bearer {token}"]}[pair]
    names = ["Authorization", "authorization" if pair == "differing-case" else "Authorization"]
    resp = await raw_request(gw, "GET", path, list(zip(names, values)))
    await expect_error(resp, 400, "invalid_request")
    assert upstream.seen == []


async def test_real_process_oversize_and_too_many_headers_are_431_json(
        real_gateway: RealGateway, real_config: dict[str, Any], upstream: Upstream) -> None:
    async with real_gateway(real_config) as gw:
        big = build_request("GET", "/public/x", [b"X-Big: " + b"a" * 20_000])
        await expect_error(await gw.raw(big), 431, "request_header_fields_too_large")
        big_name = build_request("GET", "/public/x", [b"X-" + b"n" * 20_000 + b": v"])
        await expect_error(await gw.raw(big_name), 431, "request_header_fields_too_large")
        many = build_request("GET", "/public/x", [f"X-H{i}: v".encode() for i in range(300)])
        await expect_error(await gw.raw(many), 431, "request_header_fields_too_large")
        assert upstream.seen == []
        # ...and the process still serves normal requests afterwards.
        ok = await gw.raw(build_request("GET", "/public/x", [b"X-Fine: " + b"a" * 4000]))
        assert ok.status == 200
        assert upstream.last.header("X-Fine") == ["a" * 4000]


@pytest.mark.parametrize("payload", [
    b"GARBAGE\r\n\r\n",
    b"this is not http at all\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS hello
], ids=["word", "sentence", "no-target", "header-without-colon", "tls-hello"])
async def test_real_process_garbage_is_400_json(
        real_gateway: RealGateway, real_config: dict[str, Any], upstream: Upstream, payload: bytes) -> None:
    async with real_gateway(real_config) as gw:
        await expect_error(await gw.raw(payload), 400, "invalid_request")
        assert upstream.seen == []


# --- trusted proxies -------------------------------------------------------------------------


async def test_trusted_peer_forwarded_headers_are_appended_to(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(trusted_proxies=["127.0.0.1/32"])
    resp = await raw_request(client, "GET", "/public/fw", [
        ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "example.com")], host="gateway.internal:8080")
    assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-Forwarded-For") == ["203.0.113.7, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["https"]
    assert seen.header("X-Forwarded-Host") == ["example.com"]

    # Several client X-Forwarded-For lines are one list, in order.
    resp = await raw_request(client, "GET", "/public/fw", [
        ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.2, 10.1.2.3")])
    assert resp.status == 200
    assert upstream.last.header("X-Forwarded-For") == ["203.0.113.7, 198.51.100.2, 10.1.2.3, "
                                                       "127.0.0.1"]
    assert upstream.last.header("X-Forwarded-Proto") == ["http"]
    assert upstream.last.header("X-Forwarded-Host") == ["gateway.test"]


async def test_untrusted_peer_forwarded_headers_are_replaced(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(trusted_proxies=["10.0.0.0/8"])
    resp = await raw_request(client, "GET", "/public/fw", [
        ("X-Forwarded-For", "203.0.113.7"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "example.com")], host="mini.example.net:8443")
    assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["mini.example.net:8443"]


@pytest.mark.parametrize("proto", ["javascript", "ftp", "https, http", "HTTPS://", ""])
async def test_trusted_peer_invalid_proto_falls_back_to_real_scheme(
        make_gateway: GatewayFactory, upstream: Upstream, proto: str) -> None:
    client = await make_gateway(trusted_proxies=["127.0.0.1/32"])
    resp = await raw_request(client, "GET", "/public/fw", [("X-Forwarded-Proto", proto)])
    assert resp.status == 200
    assert upstream.last.header("X-Forwarded-Proto") == ["http"]


@pytest.mark.parametrize("host", ["evil.example/path", "a b", "x" * 300, "host\"quote", "@"])
async def test_trusted_peer_insane_forwarded_host_falls_back_to_host(
        make_gateway: GatewayFactory, upstream: Upstream, host: str) -> None:
    client = await make_gateway(trusted_proxies=["127.0.0.0/8"])
    resp = await raw_request(client, "GET", "/public/fw", [("X-Forwarded-Host", host)],
                             host="real.example:9000")
    assert resp.status == 200
    assert upstream.last.header("X-Forwarded-Host") == ["real.example:9000"]


def test_trusted_proxies_config_is_validated(config_dict: dict[str, Any]) -> None:
    data = {**config_dict, "trusted_proxies": ["nonsense"]}
    with pytest.raises(ConfigError) as bad:
        loader.parse(data, environ={})
    assert len(bad.value.problems) == 1
    assert bad.value.problems[0].startswith("trusted_proxies[0]: ")
    assert "nonsense" in bad.value.problems[0]

    data = {**config_dict, "trusted_proxies": ["10.0.0.0/8", "fd00::/8", "300.1.1.1"]}
    with pytest.raises(ConfigError) as bad:
        loader.parse(data, environ={})
    assert [p.split(":")[0] for p in bad.value.problems] == ["trusted_proxies[2]"]

    good = loader.parse({**config_dict, "trusted_proxies": ["10.0.0.0/8", "127.0.0.1"]},
                         environ={})
    assert good.is_trusted_proxy("10.9.8.7") and good.is_trusted_proxy("127.0.0.1")
    assert not good.is_trusted_proxy("127.0.0.2") and not good.is_trusted_proxy("11.0.0.1")
    assert loader.parse(config_dict, environ={}).trusted_proxies == ()


# --- Host ------------------------------------------------------------------------------------


async def test_host_is_the_upstreams_by_default(gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/h", host="mini.example.com:8443")
    assert resp.status == 200
    assert upstream.last.header("Host") == [f"127.0.0.1:{upstream.server.port}"]  # type: ignore[union-attr]
    assert upstream.last.header("X-Forwarded-Host") == ["mini.example.com:8443"]


async def test_preserve_host_sends_the_clients_host(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/kept/", "upstream": upstream.url, "auth": "public", "preserve_host": True},
        {"path": "/moved/", "upstream": upstream.url, "auth": "public", "preserve_host": False}])
    resp = await raw_request(client, "GET", "/kept/h", host="mini.example.com:8443")
    assert resp.status == 200
    assert upstream.last.header("Host") == ["mini.example.com:8443"]
    resp = await raw_request(client, "GET", "/moved/h", host="mini.example.com:8443")
    assert resp.status == 200
    assert upstream.last.header("Host") == [f"127.0.0.1:{upstream.server.port}"]  # type: ignore[union-attr]


def test_preserve_host_config_is_validated(config_dict: dict[str, Any]) -> None:
    routes = [{**config_dict["routes"][0], "preserve_host": "sometimes"}]
    with pytest.raises(ConfigError) as bad:
        loader.parse({**config_dict, "routes": routes}, environ={})
    assert [p.split(":")[0] for p in bad.value.problems] == ["routes[0].preserve_host"]
    parsed = loader.parse(config_dict, environ={})
    assert all(r.preserve_host is False for r in parsed.routes)


# --- response headers ------------------------------------------------------------------------


@pytest.fixture
async def via_upstream(aiohttp_server: Any) -> Any:
    """An upstream that answers with its own Via and two cookies, recording what it got."""
    received: list[list[tuple[str, str]]] = []

    async def handle(request: web.Request) -> web.Response:
        received.append([(k.decode("latin-1"), v.decode("latin-1"))
                         for k, v in request.raw_headers])
        resp = web.Response(text="with via", headers={"Via": "1.1 upstream-cache (Squid/6)"})
        resp.headers.add("Set-Cookie", "sid=abc; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "theme=dark; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT")
        return resp

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    server.received = received
    return server


async def test_response_headers_pass_unchanged_and_no_via_is_added(
        make_gateway: GatewayFactory, via_upstream: Any) -> None:
    client = await make_gateway(routes=[
        {"path": "/", "upstream": f"http://127.0.0.1:{via_upstream.port}", "auth": "public"}])
    resp = await raw_request(client, "GET", "/v")
    assert resp.status == 200 and resp.body == b"with via"
    assert resp.header("Set-Cookie") == [
        "sid=abc; Path=/; HttpOnly", "theme=dark; Path=/; Expires=Wed, 21 Oct 2037 07:28:00 GMT"]
    assert resp.header("Via") == ["1.1 upstream-cache (Squid/6)"]
    sent = via_upstream.received[-1]
    assert [v for k, v in sent if k.lower() == "via"] == []  # nothing added towards upstream

    resp = await raw_request(client, "GET", "/v", [("Via", "1.0 client-side-proxy")])
    assert resp.status == 200
    assert resp.header("Via") == ["1.1 upstream-cache (Squid/6)"]
    sent = via_upstream.received[-1]
    assert [v for k, v in sent if k.lower() == "via"] == ["1.0 client-side-proxy"]


async def test_gateway_own_answers_carry_no_via(gw: TestClient) -> None:
    for target in ("/healthz", "/api/x", "/nowhere", "/public/%2e%2e/api"):
        resp = await raw_request(gw, "GET", target)
        assert resp.status in (200, 400, 401, 404), target
        assert resp.header("Via") == [], target


# --- timeouts --------------------------------------------------------------------------------


def test_connect_timeout_config(config_dict: dict[str, Any]) -> None:
    def routes(**options: Any) -> list[dict[str, Any]]:
        return [{"path": "/api/", "upstream": "http://127.0.0.1:9000", **options}]

    default = loader.parse({**config_dict, "routes": routes()}, environ={}).routes[0]
    assert (default.timeout, default.connect_timeout) == (None, 5.0)
    short = loader.parse({**config_dict, "routes": routes(connect_timeout="250ms")},
                          environ={}).routes[0]
    assert short.connect_timeout == 0.25
    capped = loader.parse({**config_dict, "routes": routes(timeout="2s", connect_timeout="10s")},
                           environ={}).routes[0]
    assert (capped.timeout, capped.connect_timeout) == (2.0, 2.0)
    for bad in ("fast", 0, -1, "5 parsecs", True):
        with pytest.raises(ConfigError) as err:
            loader.parse({**config_dict, "routes": routes(connect_timeout=bad)}, environ={})
        assert [p.split(":")[0] for p in err.value.problems] == ["routes[0].connect_timeout"], bad


async def test_connect_timeout_is_applied(make_gateway: GatewayFactory) -> None:
    with unaccepting_port() as port:
        with pytest.raises(asyncio.TimeoutError):  # the trick works on this machine
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.5)
        client = await make_gateway(routes=[
            {"path": "/slowconn/", "upstream": f"http://127.0.0.1:{port}", "auth": "public",
             "timeout": "6s", "connect_timeout": "300ms"}])
        started = time.monotonic()
        resp = await client.get("/slowconn/x")
        elapsed = time.monotonic() - started
        await expect_error(resp, 504, "upstream_timeout")
        assert 0.25 <= elapsed < 2.5, elapsed  # the connect timeout, not the 6 s route timeout


async def test_real_process_client_disconnect_cancels_upstream_request(
        real_gateway: RealGateway, real_config: dict[str, Any], aiohttp_server: Any) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()  # the gateway dropped its upstream connection
            raise
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    slow_server = await aiohttp_server(app)  # cancels handlers when their client goes away
    real_config["routes"] = [{"path": "/public/", "auth": "public", "timeout": "20s",
                              "upstream": f"http://127.0.0.1:{slow_server.port}"}]
    async with real_gateway(real_config) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            writer.write(build_request("GET", "/public/slow"))
            await writer.drain()
            await asyncio.wait_for(started.wait(), 5)
            await asyncio.sleep(0.2)
            assert not cancelled.is_set()
        finally:
            writer.close()
        closed_at = time.monotonic()
        await asyncio.wait_for(cancelled.wait(), 3)
        assert time.monotonic() - closed_at < 3
        # The gateway is fine afterwards.
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{gw.port}/healthz") as resp:
                assert resp.status == 200


# --- token hygiene ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["Basic", "Token", "JWT", "MAC", "Digest", "Bearer-Token",
                                    "Bearerx", ""])
async def test_non_bearer_schemes_are_ignored(
        gw: TestClient, upstream: Upstream, scheme: str) -> None:
    token = (await login(gw))["token"]
    value = f"{scheme} {token}".strip()
    resp = await gw.get("/api/orders", headers={"Authorization": value})
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.seen == []
    # On an optional route the same header means anonymous, never an identity.
    resp = await gw.get("/maybe/orders", headers={"Authorization": value})
    assert resp.status == 200
    assert identity_headers_seen(upstream.last.headers) == []
    assert upstream.last.header("Authorization") == []


async def test_bearer_scheme_is_case_insensitive(gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    for scheme in ("bearer", "BEARER", "BeArEr"):
        resp = await gw.get("/api/orders", headers={"Authorization": f"{scheme} {session['token']}"})
        assert resp.status == 200, scheme
        assert upstream.last.header("X-WX-OpenID") == [session["openid"]]


@pytest.mark.parametrize("param", ["access_token", "token", "auth", "bearer", "jwt",
                                   "Authorization"])
async def test_token_in_query_string_is_not_accepted(
        gw: TestClient, upstream: Upstream, param: str) -> None:
    token = (await login(gw))["token"]
    resp = await gw.get(f"/api/orders?{param}={token}")
    await expect_error(resp, 401, "unauthorized")
    assert upstream.seen == []
    resp = await gw.get(f"/maybe/orders?{param}={token}")
    assert resp.status == 200
    assert identity_headers_seen(upstream.last.headers) == []
    resp = await gw.get(f"/auth/session?{param}={token}")
    await expect_error(resp, 401, "unauthorized")
