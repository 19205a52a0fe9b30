"""What hostile clients and broken upstreams try, against the real ``python -m gateway`` (its
own server and dispatcher answer malformed requests and ``Expect``) and real upstreams:

- identity header names spelled so that some framework still reads them as the identity
  (``X.WX.OpenID``, ``HTTP-X-WX-OPENID``, ...): never forwarded, as an aiohttp upstream, a
  Starlette app on uvicorn and the CGI/WSGI variable mappings see it; configured names that
  collide once folded are configuration errors;
- header values with bytes that are not UTF-8: refused, never forwarded altered (either way);
- HTTP/0.9 request lines and HTTP/2.0 in an HTTP/1 request line: 400, connection closed;
- ``Expect: 100-continue``: "100 Continue" only once authorised; otherwise the refusal
  without it, the body unread and the connection closed at once;
- WebSocket upgrades with a body: 400; an upstream switching protocols unasked: 502;
- a WebSocket failing after authentication leaves no un-awaited coroutine behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, make_server

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from checks import SPOOF, assert_json_error, expect_error
from conftest import APPID, Upstream, base_config, uvicorn_serving
from gateway import loader
from gateway.headers import spelling
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.errors import ConfigError
from process import GatewayProcess, Launch
from rawhttp import build_request

WAIT = 10.0  # upper bound for any single network wait in this file
# Each is read as X-WX-OpenID (or X-WX-UnionID, X-WX-AppID) by some stack: CGI/WSGI
# (PEP 3333) variables, Apache's environment (any non-alphanumeric character → "_"),
# frameworks that accept a name already carrying the HTTP_ prefix, case-insensitive lookups.
HOSTILE_NAMES = [
    "X.WX.OpenID", "X-WX-OpenID.", "X--WX-OpenID", "X-WX-OpenID_", "HTTP-X-WX-OPENID",
    "HTTP_X_WX_OPENID", "http.x.wx.openid", "Http-X-Wx-OpenId", "X~WX~OpenID", "X-WX-Open-ID",
    "_X_WX_OPENID", "X-WX-OPENID-", "x.wx.unionid", "X!WX!UnionID", "HTTP-X-WX-APPID",
    "X-WX-App_ID", "X*WX*AppID", "X|WX|OpenID", "X'WX'OpenID", "X^WX^OpenID", "X#WX#OpenID",
    "X`WX`OpenID", "X+WX+OpenID", "X&WX&OpenID", "X%WX%OpenID", "X$WX$OpenID",
    "HTTP_X_MP_PLATFORM", "X.MP.Platform", "x-mp-platform.", "HTTP-X-WX-CORPID", "X~WX~CorpID",
    "X_WX_Corp_ID",
]
IDENTITY = {"openid": "X-WX-OpenID", "unionid": "X-WX-UnionID", "appid": "X-WX-AppID",
            "platform": "X-MP-Platform", "corpid": "X-WX-CorpID"}


def cgi_variables(name: str) -> set[str]:
    """The environment variables stacks make of a header name: PEP 3333 / RFC 3875
    (``-`` → ``_``, upper case) and Apache httpd's ap_create_environment (every other
    non-alphanumeric character → ``_`` too), with and without a doubled prefix."""
    pep3333 = "HTTP_" + name.upper().replace("-", "_")
    apache = "HTTP_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    return {v for v in (pep3333, apache) for v in (v, v.removeprefix("HTTP_"))}


IDENTITY_VARIABLES = {v for n in IDENTITY.values() for v in cgi_variables(n)}


def readable_as_identity(name: str) -> bool:
    return bool(cgi_variables(name) & IDENTITY_VARIABLES) or spelling(name) in {
        spelling(n) for n in IDENTITY.values()}


def test_every_loose_spelling_folds_onto_the_identity_header_it_imitates() -> None:
    assert {spelling(n) for n in HOSTILE_NAMES} == {"xwxopenid", "xwxunionid", "xwxappid",
                                                    "xmpplatform", "xwxcorpid"}
    assert all(readable_as_identity(n) for n in HOSTILE_NAMES)
    assert not readable_as_identity("X-WX-Phone") and not readable_as_identity("X-WX-Open")
    assert spelling("HTTP2-Settings") == "2settings"  # the prefix goes only as a whole


# --- configuration: names that collide once folded -----------------------------------------


def config_problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loader.parse(data, environ={})
    return info.value.problems


@pytest.mark.parametrize("unionid", ["X.WX.OpenID", "HTTP-X-WX-OPENID", "x_wx_openid_"])
def test_identity_headers_colliding_once_folded_are_refused(
        config_dict: dict[str, Any], unionid: str) -> None:
    data = {**config_dict, "identity_headers": {"openid": "X-WX-OpenID", "unionid": unionid}}
    problems = config_problems(data)
    assert [p for p in problems if p.startswith("identity_headers.unionid:")
            and "already used" in p] == [p for p in problems], problems


@pytest.mark.parametrize("name", ["Transfer.Encoding", "HTTP-Host", "X.Forwarded.For", "T-E"])
def test_identity_header_folding_onto_a_reserved_name_is_refused(
        config_dict: dict[str, Any], name: str) -> None:
    problems = config_problems({**config_dict, "identity_headers": {"appid": name}})
    assert len(problems) == 1 and problems[0].startswith("identity_headers.appid:"), problems


@pytest.mark.parametrize("name", ["HTTP.X.WX.AppID", "X-User-Claim-Assertion", "X_USER_CLAIMS"])
def test_assertion_header_colliding_once_folded_is_refused(config_dict: dict[str, Any],
                                                           name: str) -> None:
    # a claim-like name: the assertion would overwrite a login hook claim of that name
    data = {**config_dict, "identity_assertion": {"header": name}}
    problems = config_problems(data)
    assert any(p.startswith("identity_assertion.header:") for p in problems), problems


# --- a real gateway process -----------------------------------------------------------------


Running = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
async def running(launch: Launch, redis_server: EmbeddedRedis,
                  wechat: TestServer) -> AsyncIterator[Running]:
    """``await running(upstream_url, **overrides)``: a healthy ``python -m gateway`` with
    base_config's routes (/api required, /public public, /maybe optional) on that upstream."""
    started: list[GatewayProcess] = []

    async def start(upstream_url: str, **overrides: Any) -> GatewayProcess:
        data = base_config(redis_server.url, f"wxgw-hostile-{uuid.uuid4().hex[:8]}:",
                           f"http://127.0.0.1:{wechat.port}", upstream_url)
        data.update(overrides)
        gw = await launch(data, healthy_within=WAIT)
        started.append(gw)
        async with aiohttp.ClientSession() as http:
            await gw.wait_healthy(http)
        return gw

    yield start
    for gw in started:
        gw.assert_no_internal_failure()


def token_line(session: dict[str, Any]) -> bytes:
    return f"Authorization: Bearer {session['token']}".encode()


# --- 1. identity header names, as upstream frameworks read them --------------------------------


async def test_loose_identity_spellings_never_reach_an_aiohttp_upstream(
        running: Running, upstream: Upstream) -> None:
    gw = await running(upstream.url)
    session = await gw.login()
    genuine = {"X-WX-OpenID": session["openid"], "X-WX-AppID": APPID,
               "X-WX-UnionID": session["unionid"], "X-MP-Platform": "wechat"}
    for path, auth, expected in (("/api/p", [token_line(session)], genuine),
                                 ("/maybe/p", [], {}), ("/public/p", [token_line(session)], {})):
        lines = [f"{name}: {SPOOF}".encode() for name in HOSTILE_NAMES]
        resp = await gw.raw(build_request("GET", path, [b"X-Other: kept", *lines, *auth]))
        assert resp.status == 200, (path, resp.body)
        seen = upstream.last.headers
        assert not any(SPOOF in v for _, v in seen), (path, seen)
        readable = {k: v for k, v in seen if readable_as_identity(k)}
        assert readable == expected, (path, seen)
        assert upstream.last.header("X-Other") == ["kept"]


@dataclass
class StarletteSeen:
    headers: list[list[tuple[str, str]]] = field(default_factory=list)
    identities: list[list[str]] = field(default_factory=list)


@pytest.fixture
async def starlette_upstream() -> AsyncIterator[tuple[str, StarletteSeen]]:
    """A Starlette app on uvicorn recording every header and what it reads as X-WX-OpenID."""
    seen = StarletteSeen()

    async def handle(request: Request) -> JSONResponse:
        seen.headers.append([(k.decode("latin-1"), v.decode("latin-1"))
                             for k, v in request.headers.raw])
        seen.identities.append(request.headers.getlist("x-wx-openid"))
        return JSONResponse({"ok": True})

    port = free_port()
    async with uvicorn_serving(Starlette(routes=[Route("/{path:path}", handle)]), port):
        yield f"http://127.0.0.1:{port}", seen


async def test_loose_identity_spellings_never_reach_a_starlette_upstream(
        running: Running, starlette_upstream: tuple[str, StarletteSeen]) -> None:
    url, seen = starlette_upstream
    gw = await running(url)
    session = await gw.login()
    lines = [f"{name}: {SPOOF}".encode() for name in HOSTILE_NAMES]
    for path, auth in (("/api/p", [token_line(session)]), ("/public/p", [])):
        resp = await gw.raw(build_request("GET", path, [*lines, *auth]))
        assert resp.status == 200, (path, resp.body)
        assert seen.identities[-1] == ([session["openid"]] if auth else []), seen.identities
        assert not any(SPOOF in v for _, v in seen.headers[-1]), seen.headers[-1]
        # Served through CGI/WSGI instead, no variable would hold anything but the identity.
        variables = {v for k, _ in seen.headers[-1] for v in cgi_variables(k)}
        assert bool(variables & IDENTITY_VARIABLES) == bool(auth), seen.headers[-1]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def wsgi_upstream() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Python's reference WSGI server (wsgiref, what Django's runserver builds on), recording
    each request's ``HTTP_*`` environ variables."""
    environs: list[dict[str, str]] = []

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environs.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", environs
    finally:
        server.shutdown()
        server.server_close()


async def test_loose_identity_spellings_never_reach_a_wsgi_environ(
        running: Running, wsgi_upstream: tuple[str, list[dict[str, str]]]) -> None:
    url, environs = wsgi_upstream
    gw = await running(url)
    session = await gw.login()
    lines = [f"{name}: {SPOOF}".encode() for name in HOSTILE_NAMES]
    for path, auth in (("/api/p", [token_line(session)]), ("/public/p", [])):
        resp = await gw.raw(build_request("GET", path, [*lines, *auth]))
        assert resp.status == 200, (path, resp.body)
        environ = environs[-1]
        assert not any(SPOOF in v for v in environ.values()), environ
        # wsgiref joins X-WX-OpenID and X_WX_OpenID into one variable: only the real one
        assert environ.get("HTTP_X_WX_OPENID") == (session["openid"] if auth else None), environ
        assert environ.get("HTTP_X_MP_PLATFORM") == ("wechat" if auth else None), environ
        assert "HTTP_X_WX_CORPID" not in environ, environ


# --- 2. header values that are not UTF-8 ------------------------------------------------------


@dataclass
class RawUpstream:
    """A raw TCP upstream: records the bytes of each request head and answers ``answer``."""

    answer: bytes
    port: int = 0
    heads: list[bytes] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            self.heads.append(await reader.readuntil(b"\r\n\r\n"))
            writer.write(self.answer)
            await writer.drain()
            await asyncio.sleep(0.2)
        writer.close()


@contextlib.asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[RawUpstream]:
    up = RawUpstream(answer)
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()


OK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


@pytest.mark.parametrize("value", [b"a\xffb", b"\x80", b"caf\xe9", b"\xc3\x28", b"\xed\xa0\x80"],
                         ids=["ff", "80", "latin-1", "bad-utf8", "utf8-surrogate"])
async def test_header_value_that_is_not_utf8_is_refused_not_altered(
        running: Running, value: bytes) -> None:
    async with raw_upstream(OK_ANSWER) as up:
        gw = await running(f"http://127.0.0.1:{up.port}")
        resp = await gw.raw(build_request("GET", "/public/p", [b"X-Odd: " + value]))
        await expect_error(resp, 400, "invalid_request")
        assert up.heads == []


async def test_utf8_header_value_is_forwarded_byte_exact(running: Running) -> None:
    value = "微信 café ✓".encode()
    async with raw_upstream(OK_ANSWER) as up:
        gw = await running(f"http://127.0.0.1:{up.port}")
        resp = await gw.raw(build_request("GET", "/public/p", [b"X-Name: " + value]))
        assert resp.status == 200, resp.body
        assert b"\r\nX-Name: " + value + b"\r\n" in up.heads[0], up.heads


async def test_upstream_header_value_that_is_not_utf8_is_502(running: Running) -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-Odd: a\xffb\r\nContent-Length: 2\r\n\r\nok"
    async with raw_upstream(answer) as up:
        gw = await running(f"http://127.0.0.1:{up.port}")
        resp = await gw.raw(build_request("GET", "/public/p"))
        await expect_error(resp, 502, "upstream_unavailable")


# --- 3. HTTP/0.9 ----------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"GET /public/p\r\n\r\n", b"GET /public/p HTTP/0.9\r\n\r\n",
                                  b"POST /api/p\r\nContent-Length: 2\r\n\r\nhi",
                                  b"GET /public/p HTTP/2.0\r\nHost: gateway.test\r\n\r\n"])
async def test_http09_and_http2_request_lines_are_refused_and_the_connection_closed(
        running: Running, upstream: Upstream, line: bytes) -> None:
    gw = await running(upstream.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(line)
        # read() returns only once the gateway closes the connection
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), data
    assert b"\r\nConnection: close" in head, data
    content_type = re.search(rb"\r\nContent-Type: ([^\r]*)", head)
    assert content_type is not None, data
    assert_json_error(400, content_type.group(1).decode(), body, 400, "invalid_request")
    assert upstream.seen == []


# --- 4. Expect: 100-continue ------------------------------------------------------------------


async def send_head(gw: GatewayProcess, path: str, lines: list[bytes], length: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = build_request("POST", path, [*lines, b"Expect: 100-continue",
                                        f"Content-Length: {length}".encode(),
                                        b"Connection: keep-alive"])
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_expect_on_a_protected_route_without_token_gets_401_without_100_and_closes(
        running: Running, upstream: Upstream) -> None:
    gw = await running(upstream.url)
    body = b"x" * 100_000
    for lines in ([], [b"Authorization: Bearer not-a-token"]):
        reader, writer = await send_head(gw, "/api/upload", lines, len(body))
        try:
            started = time.monotonic()
            # The whole answer and the close come without the client sending its body
            # (aiohttp would otherwise wait up to 10 s for it, reading it).
            data = await asyncio.wait_for(reader.read(), WAIT)
            assert time.monotonic() - started < 5.0  # aiohttp's lingering read: 10 s
        finally:
            writer.close()
        assert b"100 Continue" not in data, data
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 401 "), data
        assert b"\r\nWWW-Authenticate: Bearer" in head and b"Connection: close" in head, data
        assert b'"unauthorized"' in rest, data
    assert upstream.seen == []


async def test_expect_with_the_body_sent_anyway_is_not_read_nor_forwarded(
        running: Running, upstream: Upstream) -> None:
    gw = await running(upstream.url)
    reader, writer = await send_head(gw, "/api/upload", [], 11)
    writer.write(b"hello world")  # a client that does not wait
    try:
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 401 ") and b"100 Continue" not in data, data
    assert upstream.seen == []


async def test_expect_on_an_authorised_request_gets_100_then_the_upstream_answer(
        running: Running, upstream: Upstream) -> None:
    gw = await running(upstream.url)
    session = await gw.login()
    body = b"y" * 100_000
    reader, writer = await send_head(gw, "/api/upload", [token_line(session)], len(body))
    try:
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert upstream.seen == []  # nothing forwarded before the body was asked for
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 "), head
    finally:
        writer.close()
    assert upstream.last.body == body
    assert upstream.last.header("Expect") == []


async def test_expect_on_public_and_unknown_routes(running: Running, upstream: Upstream) -> None:
    gw = await running(upstream.url)
    # no route: 404 without 100
    reader, writer = await send_head(gw, "/nowhere", [], 10)
    try:
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    assert data.startswith(b"HTTP/1.1 404 ") and b"100 Continue" not in data, data
    # an expectation the gateway does not know: 417, after authentication
    resp = await gw.raw(build_request("POST", "/public/p", [b"Expect: something-else"],
                                      body=b"ab"))
    await expect_error(resp, 417, "expectation_failed")
    assert upstream.seen == []


async def test_expect_on_the_gateways_own_endpoints(running: Running,
                                                   upstream: Upstream) -> None:
    gw = await running(upstream.url)
    # an unknown expectation: refused in the contract's JSON, like any other error
    for target in ("/auth/session", "/healthz", "/auth/verify"):
        resp = await gw.raw(build_request("GET", target, [b"Expect: something-else"]))
        await expect_error(resp, 417, "expectation_failed")
        assert resp.header("X-Request-ID"), resp.headers
    # "100-continue": the interim answer, then the endpoint's, and the connection stays open
    body = json.dumps({"code": f"hostile-{uuid.uuid4().hex[:12]}"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(build_request("POST", "/auth/login", [
            b"Connection: keep-alive", b"Content-Type: application/json",
            b"Expect: 100-continue", f"Content-Length: {len(body)}".encode()]))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head, head
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        assert b'"token"' in await asyncio.wait_for(reader.readexactly(length), WAIT)
        writer.write(build_request("GET", "/healthz", [b"Connection: close"]))
        again = await asyncio.wait_for(reader.read(), WAIT)
        assert again.startswith(b"HTTP/1.1 200 "), again
    finally:
        writer.close()


# --- 5. WebSocket upgrades with a body; 101 nobody asked for ---------------------------------

UPGRADE = [b"Connection: Upgrade", b"Upgrade: websocket", b"Sec-WebSocket-Version: 13",
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_websocket_upgrade_with_a_body_is_refused(
        running: Running, upstream: Upstream, framing: str) -> None:
    gw = await running(upstream.url)
    if framing == "content-length":
        payload = build_request("GET", "/public/ws", UPGRADE, body=b"hello")
    else:
        payload = build_request("GET", "/public/ws", [*UPGRADE, b"Transfer-Encoding: chunked"])
        payload += b"5\r\nhello\r\n0\r\n\r\n"
    resp = await gw.raw(payload)
    await expect_error(resp, 400, "invalid_request")  # not 504 after the route's timeout
    assert upstream.seen == []


async def test_upstream_switching_protocols_unasked_is_502(running: Running) -> None:
    answer = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: evil\r\n\r\n"
    async with raw_upstream(answer) as up:
        gw = await running(f"http://127.0.0.1:{up.port}")
        for lines in ([], [b"Connection: Upgrade", b"Upgrade: h2c"]):
            resp = await gw.raw(build_request("GET", "/public/p", lines))
            await expect_error(resp, 502, "upstream_unavailable")
        assert len(up.heads) == 2 and all(b"upgrade" not in h.lower() for h in up.heads)


# --- 7. a WebSocket failing after authentication ------------------------------------------------


async def test_websocket_failing_after_authentication_leaves_no_unawaited_coroutine(
        running: Running, upstream: Upstream) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    async with raw_upstream(b"HTTP/1.1 101 Switching Protocols\r\n\r\n") as broken:
        gw = await running(upstream.url, routes=[
            {"path": "/down", "upstream": down, "auth": "required", "timeout": "1s"},
            {"path": "/refuse", "upstream": upstream.url, "auth": "required"},
            {"path": "/broken", "upstream": f"http://127.0.0.1:{broken.port}",
             "auth": "required", "timeout": "1s"}])
        session = await gw.login()
        auth = [token_line(session)]
        for path, status in (("/down/ws", 502), ("/refuse/ws", 200), ("/broken/ws", 502)):
            resp = await gw.raw(build_request("GET", path, [*UPGRADE, *auth]))
            assert resp.status == status, (path, resp.body)
    await gw.stop()
    output = gw.output()
    assert "never awaited" not in output and "Traceback" not in output, output
