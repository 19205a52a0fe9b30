"""The login hook: the app's own user id, roles and claims, asked on login and refresh, kept in
the session, sent upstream (and in the signed assertion), and required by routes with roles.

The hook is a real aiohttp server; the gateway, Redis and the WeChat simulator are real too.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from checks import expect_error, is_json, metric_samples, parse_json_lines, value
from conftest import (APPID, WECOM_APPS, WECOM_CORPID, GatewayFactory, Served, Upstream, bearer,
                      claims_of, closed_port_url, fresh, login, make_wecom_session)
from gateway import loader, logs
from gateway.errors import ConfigError
from gateway.login_hook import MAX_ANSWER_BYTES
from gateway.upstream import Verifier
from gateway.testing.embedded import free_port
from process import Launch, launch_with_client
from test_assertion import assertion_config, get_assertion
from test_reload import reload, token_for

USER = {"user_id": "u-42", "roles": ["user", "editor"], "claims": {"Tier": "gold"}}
SECRET_IN_ANSWER = "hook-answer-secret-value"


@dataclass
class Hook(Served):
    """A login hook that records what it is asked and answers ``status`` with ``body`` (a JSON
    value, or raw bytes) after ``delay`` seconds."""

    status: int = 200
    body: Any = field(default_factory=lambda: dict(USER))
    delay: float = 0.0
    asked: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.asked.append(await request.json())
        await asyncio.sleep(self.delay)
        if isinstance(self.body, list) and all(isinstance(c, bytes) for c in self.body):
            streamed = web.StreamResponse(status=self.status)  # chunked: no Content-Length
            await streamed.prepare(request)
            for chunk in self.body:
                await streamed.write(chunk)
            await streamed.write_eof()
            return streamed
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return web.Response(status=self.status, body=raw, content_type="application/json")


@pytest.fixture
async def hook(aiohttp_server: Any) -> Hook:
    h = Hook()
    app = web.Application()
    app.router.add_post("/hook", h.handle)
    h.server = await aiohttp_server(app)
    return h


def hook_config(hook: Hook, **extra: Any) -> dict[str, Any]:
    return {"url": f"{hook.url}/hook", "timeout": "500ms", **extra}


async def session_keys(redis: aioredis.Redis, prefix: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{prefix}session:*")]


def sid_of(token: str) -> str:
    return str(claims_of(token)["sid"])


def user_headers(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every header an upstream could read as X-User-ID, X-User-Roles or a claim header."""
    def folded(name: str) -> str:
        return "".join(c for c in name.lower() if c.isalnum())
    return [(k, v) for k, v in headers
            if folded(k) in ("xuserid", "xuserroles") or folded(k).startswith("xuserclaim")]


# --- login --------------------------------------------------------------------------------------


async def test_login_asks_the_hook_and_upstreams_receive_its_answer(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook))
    body = await login(gw)
    assert hook.asked == [{"appid": APPID, "openid": body["openid"], "unionid": body["unionid"],
                           "phone": None, "platform": "wechat"}]
    resp = await gw.get("/api/x", headers=bearer(body["token"]))
    assert resp.status == 200, await resp.text()
    assert sorted(user_headers(upstream.last.headers)) == [
        ("X-User-Claim-Tier", "gold"), ("X-User-ID", "u-42"), ("X-User-Roles", "user,editor")]
    verify = await gw.get("/auth/verify", headers=bearer(body["token"]))
    assert verify.status == 200
    assert verify.headers["X-User-ID"] == "u-42"
    assert verify.headers["X-User-Roles"] == "user,editor"
    assert verify.headers["X-User-Claim-Tier"] == "gold"


async def test_an_empty_answer_is_a_user_without_id_roles_or_claims(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    hook.body = {}
    gw = await make_gateway(login_hook=hook_config(hook))
    token = (await login(gw))["token"]
    assert (await gw.get("/api/x", headers=bearer(token))).status == 200
    assert user_headers(upstream.last.headers) == []


async def test_renamed_user_headers(make_gateway: GatewayFactory, hook: Hook,
                                    upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook),
                            identity_headers={"user_id": "X-App-User", "roles": "X-App-Roles"})
    token = (await login(gw))["token"]
    await gw.get("/api/x", headers=bearer(token))
    assert upstream.last.header("X-App-User") == ["u-42"]
    assert upstream.last.header("X-App-Roles") == ["user,editor"]
    assert upstream.last.header("X-User-ID") == []


async def test_hook_403_blocks_the_login_and_makes_no_session(
        make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis, key_prefix: str) -> None:
    hook.status, hook.body = 403, {"reason": "banned"}
    gw = await make_gateway(login_hook=hook_config(hook))
    resp = await gw.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 403, "user_blocked")
    assert await session_keys(redis, key_prefix) == []


BAD_ANSWERS: dict[str, tuple[int, Any]] = {
    "status_500": (500, USER),
    "status_201": (201, USER),
    "redirect": (302, USER),
    "not_json": (200, b"<html>" + SECRET_IN_ANSWER.encode()),
    "too_large": (200, {"user_id": "u", "claims": {"Pad": "x" * 200},
                        "pad": "y" * MAX_ANSWER_BYTES}),
    "too_large_chunked": (200, [b'{"user_id": "u", "pad": "'] + [b"y" * 4096] * 5 + [b'"}']),
    "a_list": (200, [USER]),
    "a_string": (200, "u-1"),
    "user_id_number": (200, {"user_id": 42}),
    "user_id_empty": (200, {"user_id": ""}),
    "user_id_too_long": (200, {"user_id": "u" * 129}),
    "user_id_newline": (200, {"user_id": "u-1\r\nX-WX-OpenID: forged"}),
    "user_id_non_ascii": (200, {"user_id": "用户"}),
    "user_id_padded": (200, {"user_id": " u-1"}),
    "claim_value_padded": (200, {"claims": {"Tier": "gold "}}),
    "deeply_nested": (200, b"[" * 8000 + b"]" * 8000),
    "roles_a_string": (200, {"roles": "admin"}),
    "role_with_comma": (200, {"roles": ["user,admin"]}),
    "role_blank": (200, {"roles": ["  "]}),
    "role_padded": (200, {"roles": [" admin"]}),
    "role_not_string": (200, {"roles": [1]}),
    "role_control": (200, {"roles": ["ad\tmin"]}),
    "role_too_long": (200, {"roles": ["r" * 65]}),
    "too_many_roles": (200, {"roles": [f"r{i}" for i in range(33)]}),
    "claims_a_list": (200, {"claims": ["Tier"]}),
    "claim_name_space": (200, {"claims": {"Ti er": "gold"}}),
    "claim_name_colon": (200, {"claims": {"Tier:": "gold"}}),
    # a regex "$" also matches before a final newline: such a name must not pass as a token
    "claim_name_trailing_newline": (200, {"claims": {"Tier\n": "gold"}}),
    "claim_name_too_long": (200, {"claims": {"T" * 65: "gold"}}),
    "claim_value_number": (200, {"claims": {"Tier": 1}}),
    "claim_value_newline": (200, {"claims": {"Tier": f"gold\n{SECRET_IN_ANSWER}"}}),
    "claim_value_too_long": (200, {"claims": {"Tier": "g" * 257}}),
    "claims_spelled_alike": (200, {"claims": {"Tier": "gold", "tier": "free"}}),
    "claims_punctuated_alike": (200, {"claims": {"a-b": "1", "a_b": "2"}}),
    "too_many_claims": (200, {"claims": {f"C{i}": "v" for i in range(17)}}),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
async def test_an_unusable_answer_refuses_the_login_with_one_log_line(
        case: str, make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis,
        key_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    hook.status, hook.body = BAD_ANSWERS[case]
    gw = await make_gateway(login_hook=hook_config(hook))
    with caplog.at_level(logging.INFO, logger="gateway.login_hook"):
        resp = await gw.post("/auth/login", json={"code": fresh()})
        await expect_error(resp, 503, "login_hook_unavailable")
    assert await session_keys(redis, key_prefix) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.login_hook"]
    assert len(lines) == 1, lines
    assert SECRET_IN_ANSWER not in lines[0] and "forged" not in lines[0]
    reason = ("status" if case.startswith(("status", "redirect"))
              else "not_json" if case in ("not_json", "deeply_nested")
              else "too_large" if case.startswith("too_large") else "malformed")
    assert f"({reason})" in lines[0], lines


async def test_a_slow_hook_times_out(make_gateway: GatewayFactory, hook: Hook,
                                     redis: aioredis.Redis, key_prefix: str) -> None:
    hook.delay = 1.0
    gw = await make_gateway(login_hook=hook_config(hook, timeout="200ms"))
    started = asyncio.get_running_loop().time()
    resp = await gw.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 503, "login_hook_unavailable")
    assert asyncio.get_running_loop().time() - started < 0.9
    assert await session_keys(redis, key_prefix) == []


async def test_an_unreachable_hook_refuses_the_login(
        make_gateway: GatewayFactory, redis: aioredis.Redis, key_prefix: str) -> None:
    url = closed_port_url().replace("redis://", "http://").rsplit("/", 1)[0] + "/hook"
    gw = await make_gateway(login_hook={"url": url})
    resp = await gw.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 503, "login_hook_unavailable")
    assert await session_keys(redis, key_prefix) == []


async def test_hook_outcomes_are_counted_and_timed(make_gateway: GatewayFactory,
                                                   hook: Hook) -> None:
    gw = await make_gateway(login_hook=hook_config(hook))
    await login(gw)
    hook.status = 403
    await gw.post("/auth/login", json={"code": fresh()})
    hook.status, hook.body = 200, b"nope"
    await gw.post("/auth/login", json={"code": fresh()})
    samples = metric_samples(await (await gw.get("/metrics")).text())
    for outcome in ("ok", "blocked", "not_json"):
        assert value(samples, "wxgw_login_hook_calls_total", outcome=outcome) == 1.0, outcome
    assert value(samples, "wxgw_login_hook_duration_seconds_count") == 3.0


# --- stripping forged headers ---------------------------------------------------------------------

FORGED = [("X-User-ID", "admin-1"), ("X_User_Roles", "admin"), ("X-User-Claim-Tier", "platinum"),
          ("x-user-claim-anything", "1"), ("X.User.Claim.Org", "evil"),
          ("HTTP_X_USER_ID", "admin-2")]


@pytest.mark.parametrize("path", ["/public/x", "/maybe/x", "/api/x"])
async def test_forged_user_headers_never_reach_upstreams(
        path: str, make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook))
    token = (await login(gw))["token"]
    for authorization in ({}, bearer(token)):
        if path == "/api/x" and not authorization:
            continue
        resp = await gw.get(path, headers=[*FORGED, *authorization.items()])
        assert resp.status == 200, await resp.text()
        seen = sorted(user_headers(upstream.last.headers))
        if authorization and path != "/public/x":
            assert seen == [("X-User-Claim-Tier", "gold"), ("X-User-ID", "u-42"),
                            ("X-User-Roles", "user,editor")]
        else:
            assert seen == []


async def test_forged_user_headers_are_stripped_without_a_hook(
        gw: TestClient, upstream: Upstream) -> None:
    token = (await login(gw))["token"]
    resp = await gw.get("/api/x", headers=[*FORGED, *bearer(token).items()])
    assert resp.status == 200
    assert user_headers(upstream.last.headers) == []


# --- roles on routes --------------------------------------------------------------------------------


def role_routes(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"path": "/", "upstream": upstream.url, "auth": "public"},
            {"path": "/admin/", "upstream": upstream.url, "roles": ["admin", "owner"]},
            {"path": "/api/", "upstream": upstream.url}]


async def test_a_route_with_roles_needs_one_of_them(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook), routes=role_routes(upstream))
    user = (await login(gw))["token"]
    await expect_error(await gw.get("/admin/x", headers=bearer(user)), 403, "forbidden_role")
    assert (await gw.get("/api/x", headers=bearer(user))).status == 200
    hook.body = {"user_id": "boss", "roles": ["owner"]}
    owner = (await login(gw))["token"]
    assert (await gw.get("/admin/x", headers=bearer(owner))).status == 200
    await expect_error(await gw.get("/admin/x"), 401, "unauthorized")


@pytest.mark.parametrize("path", ["/ADMIN/x", "/Admin/x", "/admin;x=1/x", "/admin./x"])
async def test_roles_hold_for_every_route_a_path_could_resolve_to(
        path: str, make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook), routes=role_routes(upstream))
    user = (await login(gw))["token"]
    before = len(upstream.seen)
    resp = await gw.get(path, headers=bearer(user))
    if resp.status == 400:  # refused outright as ambiguous: also never forwarded
        await expect_error(resp, 400, "invalid_path")
    else:
        await expect_error(resp, 403, "forbidden_role")
    await expect_error(await gw.get(path), 401 if resp.status != 400 else 400, None)
    assert len(upstream.seen) == before


async def test_a_session_without_hook_data_has_no_role(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(routes=role_routes(upstream))
    token = (await login(gw))["token"]
    await expect_error(await gw.get("/admin/x", headers=bearer(token)), 403, "forbidden_role")


@pytest.mark.parametrize("route, problem", [
    ({"auth": "public", "roles": ["admin"]}, "routes[0].roles: roles need auth: required"),
    ({"auth": "optional", "roles": ["admin"]}, "routes[0].roles: roles need auth: required"),
    ({"roles": ["a,b"]}, "routes[0].roles[0]: 'a,b' is not a role name"),
    ({"roles": "admin"}, "routes[0].roles: expected a list"),
])
def test_route_roles_are_checked(config_dict: dict[str, Any], route: dict[str, Any],
                                 problem: str) -> None:
    config_dict["routes"] = [{"path": "/x/", "upstream": "http://127.0.0.1:9", **route}]
    with pytest.raises(ConfigError) as caught:
        loader.parse(config_dict, environ={})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize("hook, problem", [
    ({"url": "ftp://hooks.example/x"}, "login_hook.url: must be an http:// or https:// URL"),
    ({"url": "http://u:p@hooks.example/x"}, "login_hook.url: must not contain credentials"),
    ({}, "login_hook.url: is required"),
    ({"url": "http://h/x", "timeout": "0s"}, "login_hook.timeout: must be greater than zero"),
    ({"url": "http://h/x", "refresh_after": "soon"}, "login_hook.refresh_after: 'soon' is not"),
    ({"url": "http://h/x", "retries": 3}, "login_hook.retries: unknown key"),
])
def test_login_hook_config_is_checked(config_dict: dict[str, Any], hook: dict[str, Any],
                                      problem: str) -> None:
    config_dict["login_hook"] = hook
    with pytest.raises(ConfigError) as caught:
        loader.parse(config_dict, environ={})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_user_headers_may_clash_only_without_a_hook(config_dict: dict[str, Any]) -> None:
    config_dict["identity_headers"] = {"openid": "X-User-Id"}
    assert loader.parse(config_dict, environ={}).identity_headers.openid == "X-User-Id"
    config_dict["login_hook"] = {"url": "http://users.internal/login"}
    with pytest.raises(ConfigError) as caught:
        loader.parse(config_dict, environ={})
    assert caught.value.problems == [
        "identity_headers.user_id: 'X-User-ID' is already used for another identity header "
        "(the login hook's answer needs a header of its own)"]
    config_dict["identity_headers"]["user_id"] = "X-App-User"
    assert loader.parse(config_dict, environ={}).login_hook is not None


def test_login_hook_defaults(config_dict: dict[str, Any]) -> None:
    assert loader.parse(config_dict, environ={}).login_hook is None
    config_dict["login_hook"] = {"url": "https://users.internal/login"}
    hook = loader.parse(config_dict, environ={}).login_hook
    assert hook is not None and (hook.timeout, hook.refresh_after) == (2.0, 3600.0)


# --- refresh --------------------------------------------------------------------------------------


async def test_refresh_asks_again_once_the_answer_is_older_than_refresh_after(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook, refresh_after="2s"))
    token = (await login(gw))["token"]
    assert (await gw.post("/auth/refresh", headers=bearer(token))).status == 200
    assert len(hook.asked) == 1  # still fresh: not asked
    hook.body = {"user_id": "u-42", "roles": ["admin"]}
    await asyncio.sleep(2.1)
    resp = await gw.post("/auth/refresh", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    assert len(hook.asked) == 2
    # the old token and the new one alike see the new answer at once (cache invalidated)
    for t in (token, (await resp.json())["token"]):
        await gw.get("/api/x", headers=bearer(t))
        assert sorted(user_headers(upstream.last.headers)) == [
            ("X-User-ID", "u-42"), ("X-User-Roles", "admin")]


async def test_a_ban_on_refresh_ends_the_session(
        make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis, key_prefix: str) -> None:
    gw = await make_gateway(login_hook=hook_config(hook, refresh_after="1s"))
    token = (await login(gw))["token"]
    assert (await gw.get("/api/x", headers=bearer(token))).status == 200  # cached now
    hook.status = 403
    await asyncio.sleep(1.1)
    await expect_error(await gw.post("/auth/refresh", headers=bearer(token)), 403,
                       "user_blocked")
    await expect_error(await gw.get("/api/x", headers=bearer(token)), 401, "unauthorized")
    assert await session_keys(redis, key_prefix) == []


async def test_a_hook_outage_on_refresh_fails_the_refresh_but_keeps_the_session(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook, refresh_after="1s"))
    token = (await login(gw))["token"]
    hook.status = 500
    await asyncio.sleep(1.1)
    await expect_error(await gw.post("/auth/refresh", headers=bearer(token)), 503,
                       "login_hook_unavailable")
    assert (await gw.get("/api/x", headers=bearer(token))).status == 200
    assert upstream.last.header("X-User-ID") == ["u-42"]
    hook.status = 200  # back: the next refresh asks again and succeeds
    assert (await gw.post("/auth/refresh", headers=bearer(token))).status == 200
    assert len(hook.asked) == 3


async def test_refresh_passes_the_stored_phone(
        make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis, key_prefix: str) -> None:
    gw = await make_gateway(login_hook=hook_config(hook, refresh_after="1s"))
    token = (await login(gw))["token"]
    await redis.hset(f"{key_prefix}session:{sid_of(token)}", "p", "+8613800000000")
    await asyncio.sleep(1.1)
    assert (await gw.post("/auth/refresh", headers=bearer(token))).status == 200
    assert hook.asked[-1]["phone"] == "+8613800000000"


async def test_refresh_tells_the_hook_a_wecom_users_platform_and_corp(
        make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis, key_prefix: str) -> None:
    gw = await make_gateway(login_hook=hook_config(hook))
    body = await login(gw)
    await make_wecom_session(redis, key_prefix, body["token"])
    wecom = await make_gateway(apps=WECOM_APPS, login_hook=hook_config(hook, refresh_after="1s"))
    await asyncio.sleep(1.1)
    assert (await wecom.post("/auth/refresh", headers=bearer(body["token"]))).status == 200
    assert hook.asked[-1] == {"appid": APPID, "openid": body["openid"],
                              "unionid": body["unionid"], "phone": None, "platform": "wecom",
                              "corpid": WECOM_CORPID}


# --- the signed assertion ---------------------------------------------------------------------------


async def test_the_assertion_carries_user_id_roles_and_claims(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook),
                            identity_assertion=assertion_config())
    token = (await login(gw))["token"]
    assertion = await get_assertion(gw, upstream, "/api/x", token)
    verifier = Verifier(str(gw.make_url("/.well-known/jwks.json")), audience=upstream.url)
    identity = await verifier.verify(assertion)
    assert identity.user_id == "u-42"
    assert identity.roles == ("user", "editor")
    assert identity.user_claims == {"Tier": "gold"}


# --- what it costs in Redis ---------------------------------------------------------------------


RICH = {"user_id": "3f2b8c1e-5a47-4d8e-9b61-0c2f7e4a9d13",
        "roles": ["user", "editor", "billing", "support"],
        "claims": {"Tier": "gold", "Org": "acme-shanghai", "Region": "cn-east-2",
                   "Plan": "enterprise-annual"}}


async def test_memory_per_session_with_and_without_hook_data(
        make_gateway: GatewayFactory, hook: Hook, redis: aioredis.Redis, key_prefix: str) -> None:
    plain = await make_gateway()
    hooked = await make_gateway(login_hook=hook_config(hook))
    figures = {}
    for name, gw, answer in (("no hook", plain, None), ("small answer", hooked, USER),
                             ("rich answer", hooked, RICH)):
        hook.body = answer
        token = (await login(gw))["token"]
        key = f"{key_prefix}session:{sid_of(token)}"
        # the compact encoding (listpack; ziplist before Redis 7), not a hash table
        assert await redis.object("encoding", key) in (b"listpack", b"ziplist"), name
        figures[name] = await redis.memory_usage(key)
    print(f"\nMEMORY USAGE per session (bytes): {figures}")
    assert figures["no hook"] < figures["small answer"] < figures["rich answer"]
    assert figures["rich answer"] - figures["no hook"] < 256


# --- the access log (a real gateway process) -------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("log_openid", [False, True])
async def test_access_log_has_the_hook_outcome_and_user_id_only_with_log_openid(
        log_openid: bool, launch: Launch, config_dict: dict[str, Any], hook: Hook) -> None:
    config_dict["logging"] = {"format": "json", "log_openid": log_openid}
    config_dict["login_hook"] = hook_config(hook)
    gw = await launch(config_dict)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        async with http.post(f"{gw.url}/auth/login", json={"code": fresh()}) as resp:
            token = (await resp.json())["token"]
        async with http.get(f"{gw.url}/api/x", headers=bearer(token)) as resp:
            assert resp.status == 200
    await gw.wait_for_line(lambda line: '"path": "/api/x"' in line, within=logs.FLUSH_INTERVAL + 5)
    records = parse_json_lines(line for line in gw.stderr().splitlines() if is_json(line))
    access = {r["path"]: r for r in records if r["logger"] == logs.ACCESS}
    assert access["/auth/login"]["login_hook"] == "ok"
    assert isinstance(access["/auth/login"]["login_hook_ms"], float)
    assert "login_hook" not in access["/api/x"]
    if log_openid:
        assert access["/api/x"]["user_id"] == "u-42"
    else:
        assert "user_id" not in access["/api/x"] and "u-42" not in gw.stderr()


# --- reload --------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_a_reload_adds_the_hook_and_routes_roles(
        launch: Launch, config_dict: dict[str, Any], hook: Hook, upstream: Upstream) -> None:
    config_dict["listen"] = f"127.0.0.1:{free_port()}"
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, config_dict, http)
        before = await token_for(client)
        assert hook.asked == []
        new = copy.deepcopy(config_dict)
        new["login_hook"] = hook_config(hook)
        new["routes"].append({"path": "/admin/", "upstream": upstream.url, "roles": ["admin"]})
        await reload(gw, new)
        after = await token_for(client)
        assert len(hook.asked) == 1
        await client.call("GET", "/api/x", token=after, expect=200)
        assert upstream.last.header("X-User-ID") == ["u-42"]
        await client.call("GET", "/api/x", token=before, expect=200)  # an older session:
        assert upstream.last.header("X-User-ID") == []                # no hook answer, no role
        for token in (before, after):
            reply = await client.call("GET", "/admin/x", token=token, expect=403)
            assert reply.json()["error"] == "forbidden_role"
    assert await gw.stop() == 0, gw.output()


async def test_a_refresh_that_asks_again_keeps_open_websockets_unless_a_role_is_lost(
        make_gateway: GatewayFactory, hook: Hook, aiohttp_server: Any,
        config_dict: dict[str, Any]) -> None:
    from aiohttp import WSMsgType
    from test_assertion import WsUpstream
    ws_up = await WsUpstream.serve(aiohttp_server)
    routes = copy.deepcopy(config_dict["routes"])
    routes.insert(0, {"path": "/ws/", "upstream": ws_up.url, "auth": "required"})
    routes.insert(0, {"path": "/ed/", "upstream": ws_up.url, "auth": "required",
                      "roles": ["editor"]})
    gw = await make_gateway(routes=routes, login_hook=hook_config(hook, refresh_after="1s"))
    token = (await login(gw))["token"]
    async with gw.ws_connect("/ws/chat", headers=bearer(token)) as ws, \
            gw.ws_connect("/ed/chat", headers=bearer(token)) as ed:
        await asyncio.sleep(1.1)
        hook.body = {"user_id": "u-42", "roles": ["user"]}  # no longer an editor
        resp = await gw.post("/auth/refresh", headers=bearer(token))
        assert resp.status == 200, await resp.text()
        assert len(hook.asked) == 2
        # the session goes on: so does its socket (only its end closes it)
        await ws.send_str("still")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:still"), (msg, ws.close_code)
        # the socket on a route needing a role the session has lost is closed
        msg = await asyncio.wait_for(ed.receive(), 5)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ed.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


async def test_concurrent_refreshes_of_one_session_ask_the_hook_once(
        make_gateway: GatewayFactory, hook: Hook, upstream: Upstream) -> None:
    gw = await make_gateway(login_hook=hook_config(hook, refresh_after="1s"))
    token = (await login(gw))["token"]
    await asyncio.sleep(1.1)
    hook.delay = 0.2
    hook.body = {"user_id": "u-42", "roles": ["admin"]}
    answers = await asyncio.gather(*(gw.post("/auth/refresh", headers=bearer(token))
                                     for _ in range(20)))
    assert [r.status for r in answers] == [200] * 20
    assert len(hook.asked) == 2  # the login's, and one for all twenty refreshes
    await gw.get("/api/x", headers=bearer(token))
    assert ("X-User-Roles", "admin") in user_headers(upstream.last.headers)
    # a refused user: every waiting refresh is refused, the session ends
    await asyncio.sleep(1.1)
    hook.status = 403
    answers = await asyncio.gather(*(gw.post("/auth/refresh", headers=bearer(token))
                                     for _ in range(5)))
    assert [r.status for r in answers] == [403] * 5
    assert len(hook.asked) == 3
