"""Route decisions as upstream frameworks read paths.

A gateway that matches routes on the literal path is bypassed by the way common frameworks
resolve paths: Tomcat, Jetty and Spring drop ``;params`` (``/pub/admin;x/users`` runs the
``/pub/admin`` handler), case-insensitive routers fold case, IIS drops trailing dots and
spaces, best-fit decoders turn full-width letters into ASCII, Spring's suffix pattern match
runs ``/admin`` for ``/admin.json``. Every such path must either be refused (400
``invalid_path``) or be authorised as the strictest route it could resolve to, while the
literal path still picks the route that forwards it, unchanged.

Here a real gateway with nested routes (each forwarding under a base path of its own, so the
upstream shows which route forwarded) is asked every path of a table, without a token, with a
token of each of two apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request as WerkzeugRequest
from werkzeug.wrappers import Response as WerkzeugResponse

from checks import expect_error
from conftest import (APPID, APPID2, TWO_APPS, GatewayFactory, Upstream, base_config,
                      closed_port_url, login, uvicorn_serving)
from gateway import loader, proxy
from gateway.errors import InvalidPath
from gateway.testing.embedded import free_port
from packages import debian_package
from process import Launcher, child_env
from rawhttp import RawResponse, build_request, raw_exchange, raw_request

IDENTITY = ("x-wx-openid", "x-wx-unionid", "x-wx-appid")
# route prefix → (auth, apps, the base path its upstream URL carries)
ROUTES: dict[str, tuple[str, list[str], str]] = {
    "/": ("public", [], "/r0"),
    "/pub/": ("public", [], "/r1"),
    "/pub/admin/": ("required", [], "/r2"),
    "/pub/maybe/": ("optional", [], "/r3"),
    "/pub/app2/": ("required", [APPID2], "/r4"),
}


def routes_config(upstream_url: str, without: str | None = None) -> list[dict[str, Any]]:
    return [{"path": path, "upstream": upstream_url + base, "auth": auth, "timeout": "5s",
             **({"apps": apps} if apps else {})}
            for path, (auth, apps, base) in ROUTES.items() if path != without]


def literal_route(target: str) -> str:
    """The route the literal (decoded) path matches: the longest prefix, byte for byte."""
    path = unquote(target.partition("?")[0])
    return max((p for p in ROUTES if p == "/" or path.startswith(p) or path + "/" == p),
               key=len)


# (path as sent, what it must be treated as)
#   admin: needs a token of any app;  app2: needs a token of APPID2;  maybe: forwarded to all,
#   identity when a token comes;  pub: forwarded to all, never with identity;  bad: 400.
TABLE: list[tuple[str, str]] = [
    # the literal routes
    ("/pub/admin/users", "admin"),
    ("/pub/admin", "admin"),
    ("/pub/admin/", "admin"),
    ("/pub/%61dmin/users", "admin"),
    # ;params: Tomcat, Jetty, Spring drop them from every segment
    ("/pub/admin;x/users", "admin"),
    ("/pub/admin;/x", "admin"),
    ("/pub/admin;jsessionid=0123ABCD/users", "admin"),
    ("/pub/admin;a=b;c=d/users", "admin"),
    ("/pub/admin;x", "admin"),
    ("/pub;x/admin/users", "admin"),
    ("/pub%3b/admin/users", "admin"),
    ("/pub/admin%3bx/", "admin"),
    ("/pub/admin%3Bx/users", "admin"),
    ("/pub/admin%3b/users", "admin"),
    # case folding: IIS, ASP.NET, case-insensitive routers
    ("/pub/ADMIN/", "admin"),
    ("/pub/Admin/users", "admin"),
    ("/PUB/ADMIN/users", "admin"),
    ("/Pub/admin/users", "admin"),
    ("/pub/%41DMIN/users", "admin"),
    ("/pub/AdMiN;x/users", "admin"),
    # trailing dots and spaces: IIS / Windows
    ("/pub/admin./", "admin"),
    ("/pub/admin../users", "admin"),
    ("/pub/admin.../users", "admin"),
    ("/pub/admin%2e/users", "admin"),
    ("/pub/admin%20/users", "admin"),
    ("/pub/admin.%20/users", "admin"),
    ("/pub./admin/users", "admin"),
    ("/pub/.../admin/users", "admin"),
    ("/pub/admin;x./users", "admin"),
    ("/pub/ADMIN.%20;x/users", "admin"),
    # Spring's suffix pattern match
    ("/pub/admin.json", "admin"),
    ("/pub/ADMIN.json", "admin"),
    ("/pub/admin.json/", "admin"),
    # compatibility forms and Unicode case: full-width "ａ", dotless "ı", Kelvin sign
    ("/pub/%EF%BD%81dmin/users", "admin"),
    ("/pub/%EF%BC%A1%EF%BC%A4%EF%BC%AD%EF%BC%A9%EF%BC%AE/users", "admin"),
    ("/pub/adm%C4%B1n/users", "admin"),
    ("/pub/admin%EF%BC%9Bx/users", "admin"),  # full-width semicolon
    ("/pub/admin%EF%BC%8Ejson", "admin"),  # full-width dot: Spring's suffix match after NFKC
    # the route restricted to APPID2, reached the same ways
    ("/pub/app2/x", "app2"),
    ("/pub/APP2/x", "app2"),
    ("/pub/app2;x/y", "app2"),
    ("/pub/app2%3b/y", "app2"),
    ("/pub/app2./y", "app2"),
    ("/pub/app2%20/y", "app2"),
    ("/pub/App2.json", "app2"),
    ("/PUB;a/APP2;b./y", "app2"),
    # optional, reached the same ways
    ("/pub/maybe/x", "maybe"),
    ("/pub/MAYBE/x", "maybe"),
    ("/pub/maybe;x/y", "maybe"),
    ("/pub/maybe./y", "maybe"),
    # public, though they look close to a protected route
    ("/pub/x", "pub"),
    ("/pub/", "pub"),
    ("/pub/administrator", "pub"),
    ("/pub/ADMINISTRATOR/x", "pub"),
    ("/pub/adminx/y", "pub"),
    ("/pub/admi", "pub"),
    ("/pub/ad;min/x", "pub"),
    ("/pub/x;y/z", "pub"),
    ("/pub/x/admin/users", "pub"),
    ("/pub/app.js", "pub"),
    ("/pub/admin-panel.html", "pub"),
    ("/pub/%E4%B8%AD%E6%96%87/x", "pub"),
    ("/pub/x?next=/pub/admin;x/", "pub"),
    ("/", "pub"),
    ("/other/thing", "pub"),
    ("/ADMIN/users", "pub"),
    # refused: what servers collapse into dot or empty segments, or decode differently
    ("/pub/x/../admin/users", "bad"),
    ("/pub/x/..;/admin/users", "bad"),
    ("/pub/x/.;x/admin/users", "bad"),
    ("/pub/x/%2e%2e/admin/users", "bad"),
    ("/pub/x/%2e%2e;x/admin/users", "bad"),
    ("/pub/x/..%20/admin/users", "bad"),
    ("/pub/x/.%20/admin/users", "bad"),
    ("/pub/x/%20/admin", "bad"),
    ("/pub/;x/admin/users", "bad"),
    ("/pub/%3bx/admin/users", "bad"),
    ("/pub//admin/users", "bad"),
    ("/pub/%2fadmin/users", "bad"),
    ("/pub/x%5c..%5cadmin/users", "bad"),
    ("/pub/x\\..\\admin/users", "bad"),
    ("/pub/%u0061dmin/users", "bad"),
    ("/pub/%U0041DMIN/users", "bad"),
    ("/pub/%25u0061dmin/users", "bad"),
    ("/pub/x/%252e%252e/admin/users", "bad"),
    ("/pub/x/%EF%BC%8E%EF%BC%8E/admin/users", "bad"),  # full-width ".."
    ("/pub/x%EF%BC%8F..%EF%BC%8Fadmin/users", "bad"),  # full-width "/../"
    ("/pub/x%EF%BC%BCadmin", "bad"),  # full-width back slash
    ("/pub/admin%00/users", "bad"),
    ("/pub/admin%09/users", "bad"),
    # a fragment is never part of a request target, and servers that parse the target as a
    # URL (aiohttp's yarl, Node's url.parse, httptools) cut it off: "/pub/admin#x" runs the
    # "/pub/admin" handler there, while the literal path matches no route below "/pub/"
    ("/pub/admin#x", "bad"),
    ("/pub/admin#/users", "bad"),
    ("/pub/app2#", "bad"),
    ("/pub/x?next=#admin", "pub"),  # in the query it cuts only the query
]


def test_the_table_covers_every_form() -> None:
    assert len({p for p, _ in TABLE}) == len(TABLE) >= 60
    assert {c for _, c in TABLE} == {"admin", "app2", "maybe", "pub", "bad"}
    # every protected row but the literal ones is matched by a public literal route
    sneaky = [p for p, c in TABLE if c in ("admin", "app2")
              and ROUTES[literal_route(p)][0] == "public"]
    assert len(sneaky) >= 35, sneaky


@pytest.fixture
async def nested(make_gateway: GatewayFactory, upstream: Upstream) -> TestClient:
    return await make_gateway(apps=TWO_APPS, routes=routes_config(upstream.url))


async def test_every_path_is_authorised_as_its_strictest_resolution(
        nested: TestClient, upstream: Upstream) -> None:
    tokens = {None: None,
              APPID: (await login(nested, appid=APPID))["token"],
              APPID2: (await login(nested, appid=APPID2))["token"]}
    outcomes: list[str] = []
    for target, kind in TABLE:
        for appid, token in tokens.items():
            headers = [("Authorization", f"Bearer {token}")] if token else []
            before = len(upstream.seen)
            resp = await raw_request(nested, "GET", target, headers)
            reached = upstream.seen[before:]
            where = f"{target} ({kind}) with {appid or 'no token'}"
            if kind == "bad":
                await expect_error(resp, 400, "invalid_path")
            elif kind in ("admin", "app2") and token is None:
                await expect_error(resp, 401, "unauthorized")
                assert resp.header("WWW-Authenticate") == ["Bearer"], where
            elif kind == "app2" and appid != APPID2:
                await expect_error(resp, 403, "app_forbidden")
            else:
                assert resp.status == 200, (where, resp.status, resp.body)
                assert len(reached) == 1, where
                seen = reached[0]
                # forwarded unchanged, by the route its literal path matches
                assert seen.raw_path == ROUTES[literal_route(target)][2] + target, where
                sent_identity = {k.lower(): v for k, v in seen.headers
                                 if k.lower() in IDENTITY}
                if kind == "pub" or token is None:
                    assert sent_identity == {}, where
                else:
                    assert sent_identity["x-wx-appid"] == appid, where
                outcomes.append(kind)
                continue
            assert reached == [], f"{where} reached the upstream"
    # the table exercised every way through: protected rows reached with the right token
    assert outcomes.count("admin") == 2 * sum(c == "admin" for _, c in TABLE)
    assert outcomes.count("app2") == sum(c == "app2" for _, c in TABLE)


async def test_a_path_whose_literal_form_matches_no_route_is_not_found(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    # Without the root route, /PUB/admin/ matches nothing literally: it is not forwarded
    # anywhere, though a case-insensitive server would take it for /pub/admin/.
    client = await make_gateway(apps=TWO_APPS, routes=routes_config(upstream.url, without="/"))
    session = await login(client, appid=APPID)
    for target in ("/PUB/admin/users", "/pub;x/admin/users", "/pub./admin/"):
        for headers in ([], [("Authorization", f"Bearer {session['token']}")]):
            await expect_error(await raw_request(client, "GET", target, headers),
                               404, "not_found")
    assert upstream.seen == []


async def test_a_token_of_another_app_is_refused_however_the_path_is_spelled(
        nested: TestClient, upstream: Upstream) -> None:
    session = await login(nested, appid=APPID)
    for target in ("/pub/app2;x/y", "/pub/APP2/y", "/pub/app2%20/y", "/pub/app2.json"):
        resp = await raw_request(nested, "POST", target,
                                 [("Authorization", f"Bearer {session['token']}")], b"{}")
        body = await expect_error(resp, 403, "app_forbidden")
        assert APPID in body["message"] and "/pub/app2" in body["message"]
    assert upstream.seen == []


async def test_a_public_path_promoted_to_required_fails_closed_without_redis(
        make_gateway: GatewayFactory, nested: TestClient, upstream: Upstream) -> None:
    down = await make_gateway(apps=TWO_APPS, routes=routes_config(upstream.url),
                              redis={"url": closed_port_url(), "key_prefix": "x:"})
    session = await login(nested, appid=APPID)  # a genuine token, signed with the same key
    for target in ("/pub/admin;x/users", "/pub/ADMIN/users"):
        await expect_error(await raw_request(down, "GET", target,
                                             [("Authorization", f"Bearer {session['token']}")]),
                           503, "store_unavailable")
        await expect_error(await raw_request(down, "GET", target), 401, "unauthorized")
    assert upstream.seen == []
    resp = await raw_request(down, "GET", "/pub/x;y/z")
    assert resp.status == 200  # public stays public without Redis
    assert [s.raw_path for s in upstream.seen] == ["/r1/pub/x;y/z"]


async def test_websocket_upgrades_get_the_same_decision(
        nested: TestClient, upstream: Upstream) -> None:
    upgrade = [("Connection", "Upgrade"), ("Upgrade", "websocket"),
               ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]
    for target in ("/pub/admin;x/socket", "/pub/ADMIN/socket", "/pub/admin./socket"):
        await expect_error(await raw_request(nested, "GET", target, upgrade), 401,
                           "unauthorized")
    assert upstream.seen == []


async def test_route_prefixes_with_upper_case_protect_lower_case_spellings(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    # A route written /Admin/ must hold for /admin/ too: an ASP.NET upstream runs the same
    # handler for both, and the lower-case path takes the fast path's shortcut otherwise.
    client = await make_gateway(routes=[
        {"path": "/", "upstream": upstream.url, "auth": "public"},
        {"path": "/Admin/", "upstream": upstream.url, "auth": "required"}])
    for target in ("/admin/x", "/ADMIN/x", "/Admin/x"):
        await expect_error(await raw_request(client, "GET", target), 401, "unauthorized")
    assert upstream.seen == []
    session = await login(client)
    resp = await raw_request(client, "GET", "/admin/x",
                             [("Authorization", f"Bearer {session['token']}")])
    assert resp.status == 200
    assert re.search(r"x-wx-openid", str(upstream.last.headers), re.I)
    assert (await raw_request(client, "GET", "/other")).status == 200


async def test_routes_differing_only_in_case_take_the_strictest(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/admin/", "upstream": upstream.url, "auth": "public"},
        {"path": "/Admin/", "upstream": upstream.url, "auth": "required"}])
    for target in ("/admin/x", "/admin/x;y", "/admin/X.json", "/admin"):
        await expect_error(await raw_request(client, "GET", target), 401, "unauthorized")
    for target in ("/ADMIN/x", "/admin;x/y"):  # no route's literal prefix
        await expect_error(await raw_request(client, "GET", target), 404, "not_found")
    assert upstream.seen == []


# --- real upstream frameworks, with a handler mounted at /pub/admin/ ----------------------------
#
# Each answers "admin" from the handler it maps at /pub/admin/ and "other" from anything else.
# Asked directly, each shows which spellings it resolves to the admin handler (the reason for
# the rules above); through the gateway, none of them ever runs that handler without a token.

SERVLETS = Path(__file__).resolve().parent / "servlet"
# container → (Debian package, one of its jars, the jars to compile and run with, main class)
CONTAINERS = {
    "tomcat": ("libtomcat10-java", "tomcat10-catalina",
               ("tomcat10-catalina", "tomcat10-servlet-api", "tomcat10-coyote", "tomcat10-util",
                "tomcat10-util-scan", "tomcat10-api", "tomcat10-juli", "tomcat10-jaspic-api",
                "tomcat10-annotations-api"), "AdminServer"),
    "jetty": ("libjetty9-java", "jetty9-server",
              ("jetty9-server", "jetty9-servlet", "jetty9-http", "jetty9-io", "jetty9-util",
               "jetty9-security", "servlet-api"), "JettyAdminServer"),
}
# What each framework is known to resolve to its /pub/admin/ handler, beyond the plain path.
RESOLVES_TO_ADMIN = {
    "starlette": {"/pub/%61dmin/users"},
    "werkzeug": {"/pub/%61dmin/users"},
    # Tomcat drops ;params from every segment (the way Spring does), then resolves "..;" as
    # ".." and collapses the "//" a ";x" segment leaves: both are refused.
    "tomcat": {"/pub/%61dmin/users", "/pub/admin;x/users", "/pub/admin;/x",
               "/pub/admin;jsessionid=0123ABCD/users", "/pub/admin;a=b;c=d/users",
               "/pub/admin;x", "/pub/admin;x./users", "/pub;x/admin/users",
               "/pub/x/..;/admin/users", "/pub/;x/admin/users", "/pub//admin/users"},
    # Jetty drops ;params too (and answers 400 to "..;")
    "jetty": {"/pub/%61dmin/users", "/pub/admin;x/users", "/pub/admin;/x",
              "/pub/admin;jsessionid=0123ABCD/users", "/pub/admin;a=b;c=d/users",
              "/pub/admin;x", "/pub/admin;x./users", "/pub;x/admin/users"},
}


# Beyond the table: every combination of these spellings, segment by segment.
FIRST = ["pub", "PUB", "pub;x", "pub.", "pub%3b", "pub%20", "Pub.;x"]
SECOND = ["admin", "ADMIN", "Admin;x", "admin;", "admin.", "admin..", "admin%3bx", "admin%20",
          "admin.json", "adm%C4%B1n", "%EF%BD%81dmin", "x/..;/admin", ";x/admin", "admin%2e",
          "admin;x.", "admin%EF%BC%9B"]
THIRD = ["users", "", ";y", "USERS.", "x;y"]
COMBINED = [f"/{a}/{b}/{c}" for a in FIRST for b in SECOND for c in THIRD]


def starlette_app() -> Starlette:
    async def admin(request: Request) -> PlainTextResponse:
        return PlainTextResponse("admin")

    async def other(request: Request) -> PlainTextResponse:
        return PlainTextResponse("other")

    return Starlette(routes=[Mount("/pub/admin", routes=[Route("/{rest:path}", admin)]),
                             Route("/{rest:path}", other)])


WERKZEUG_URLS = Map([Rule("/pub/admin/", endpoint="admin"),
                     Rule("/pub/admin/<path:rest>", endpoint="admin"),
                     Rule("/", endpoint="other"), Rule("/<path:rest>", endpoint="other")])


@WerkzeugRequest.application  # type: ignore[misc]
def werkzeug_app(request: WerkzeugRequest) -> WerkzeugResponse | HTTPException:
    try:
        endpoint, _ = WERKZEUG_URLS.bind_to_environ(request.environ).match()
    except HTTPException as exc:
        return exc
    return WerkzeugResponse(str(endpoint), content_type="text/plain")


async def serve_starlette(stack: contextlib.AsyncExitStack) -> int:
    port = free_port()
    await stack.enter_async_context(uvicorn_serving(starlette_app(), port))
    return port


async def serve_werkzeug(stack: contextlib.AsyncExitStack) -> int:
    # werkzeug's own development server (threaded), in a thread of this process
    server = make_server("127.0.0.1", 0, werkzeug_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join(10)

    stack.callback(stop)
    return int(server.server_port)


async def serve_servlet(container: str, launcher: Launcher, tmp_path: Path) -> int:
    """A servlet container embedded in a JVM; its classes and a JDK come from Debian."""
    package, probe, jars, main = CONTAINERS[container]
    javac = debian_package("openjdk-17-jdk-headless", lambda: shutil.which("javac"))
    debian_package(package, lambda: str(jar) if (
        jar := Path(f"/usr/share/java/{probe}.jar")).exists() else None)
    classpath = ":".join(f"/usr/share/java/{jar}.jar" for jar in jars)
    classes = tmp_path / "classes"
    compiled = subprocess.run(
        [javac, "-cp", classpath, "-d", str(classes), str(SERVLETS / f"{main}.java")],
        capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    port = free_port()
    (tmp_path / "base").mkdir()
    server = await launcher.run(
        [str(Path(javac).with_name("java")), "-cp", f"{classpath}:{classes}", main, str(port),
         str(tmp_path / "base")],
        env=child_env(), cwd=tmp_path, log=tmp_path / f"{container}.log")
    deadline = time.monotonic() + 60
    while "listening" not in server.stdout():
        if server.proc.returncode is not None or time.monotonic() > deadline:
            pytest.fail(f"{container} did not start:\n{server.output()}")
        await asyncio.sleep(0.05)
    return port


@pytest.fixture(params=["starlette", "werkzeug", "tomcat", "jetty"])
async def framework(request: pytest.FixtureRequest, launcher: Launcher,
                    tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    async with contextlib.AsyncExitStack() as stack:
        if request.param == "starlette":
            port = await serve_starlette(stack)
        elif request.param == "werkzeug":
            port = await serve_werkzeug(stack)
        else:
            port = await serve_servlet(request.param, launcher, tmp_path)
        yield request.param, port


async def direct(port: int, target: str) -> RawResponse:
    return await raw_exchange("127.0.0.1", port, build_request("GET", target))


# Compiling and starting a JVM per servlet container is slow on a loaded machine.
@pytest.mark.timeout(900)
async def test_no_framework_runs_the_admin_handler_without_a_token(
        make_gateway: GatewayFactory, framework: tuple[str, int]) -> None:
    name, port = framework
    url = f"http://127.0.0.1:{port}"
    gw = await make_gateway(routes=[
        {"path": "/", "upstream": url, "auth": "public"},
        {"path": "/pub/", "upstream": url, "auth": "public"},
        {"path": "/pub/admin/", "upstream": url, "auth": "required"}])
    paths = [p for p, _ in TABLE] + COMBINED

    runs_admin = {p for p in paths if (await direct(port, p)).body == b"admin"}
    assert (await direct(port, "/pub/x")).body == b"other"
    assert {"/pub/admin/users", *RESOLVES_TO_ADMIN[name]} <= runs_admin, runs_admin

    session = await login(gw)
    auth = [("Authorization", f"Bearer {session['token']}")]
    for target in paths:
        anonymous = await raw_request(gw, "GET", target)
        assert anonymous.body != b"admin", f"{name} ran the admin handler for {target}"
        if target in runs_admin:
            # The gateway's candidate set holds what this framework does: a token is needed.
            assert anonymous.status in (400, 401), (target, anonymous.status)
            signed = await raw_request(gw, "GET", target, auth)
            if signed.status != 400:
                # forwarded as sent: the framework resolves it as it did directly
                assert signed.body == b"admin", (target, signed.status, signed.body)
    assert (await raw_request(gw, "GET", "/pub/x")).body == b"other"


async def test_a_fragment_is_refused_before_an_upstream_cuts_it_off(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    """aiohttp (like Node's url.parse and uvicorn's httptools) parses the request target as a
    URL and drops what follows "#": an exact /pub/admin handler runs for "/pub/admin#x",
    a path whose literal form only the public routes match."""
    from aiohttp import web

    async def admin(request: web.Request) -> web.Response:
        return web.Response(text="admin")

    async def other(request: web.Request) -> web.Response:
        return web.Response(text="other")

    app = web.Application()
    app.router.add_get("/pub/admin", admin)
    app.router.add_get("/{tail:.*}", other)
    server = await aiohttp_server(app)
    assert (await direct(server.port, "/pub/admin#x")).body == b"admin"
    gw = await make_gateway(routes=[
        {"path": "/", "upstream": f"http://127.0.0.1:{server.port}", "auth": "public"},
        {"path": "/pub/admin", "upstream": f"http://127.0.0.1:{server.port}",
         "auth": "required"}])
    for target in ("/pub/admin#x", "/pub/admin#", "/pub/admin#/../x", "/pub/adm%69n#x"):
        await expect_error(await raw_request(gw, "GET", target), 400, "invalid_path")
    assert (await raw_request(gw, "GET", "/pub/x?y=#z")).body == b"other"


def test_remembered_routing_is_per_configuration_bounded_and_never_for_refused_paths() -> None:
    def config(auth: str) -> Any:
        data = base_config("redis://127.0.0.1:1/0", "wxgw:", "http://127.0.0.1:1",
                           "http://127.0.0.1:2")
        data["routes"][0]["auth"] = auth
        return loader.parse(data, environ={})

    required, public = config("required"), config("public")
    path, matched = proxy._routing(required, "/api/x")
    assert path == "/api/x" and matched is not None and matched[1].auth == "required"
    # the same path under another configuration is decided by that one
    assert (matched := proxy._routing(public, "/api/x")[1]) and matched[1].auth == "public"
    assert proxy._routing(public, "/nowhere")[1] is None
    for _ in range(2):  # refused every time, never remembered as anything else
        with pytest.raises(InvalidPath):
            proxy._routing(public, "/api/../admin")
    for i in range(proxy._ROUTED_PATHS + 10):
        proxy._routing(public, f"/api/{i}")
    long = "/api/" + "a" * proxy._ROUTED_LENGTH
    assert proxy._routing(public, long)[0] == long
    owner, known = proxy._routed
    assert owner is public and len(known) <= proxy._ROUTED_PATHS and long not in known
