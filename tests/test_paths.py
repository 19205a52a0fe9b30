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

import re
from typing import Any
from urllib.parse import unquote

import pytest
from aiohttp.test_utils import TestClient

from checks import expect_error
from conftest import APPID, APPID2, TWO_APPS, GatewayFactory, Upstream, closed_port_url, login
from rawhttp import raw_request

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
