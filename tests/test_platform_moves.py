"""An app moved to another platform or WeCom corp by a reload: the sessions its users made
before name a user of the old platform, and must not reach upstreams under the new one."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer

from checks import expect_error
from conftest import APPID, SECRET, Upstream, bearer, fresh, login
from gateway import loader
from gateway.app import create_app
from gateway.reload import reload as reload_config
from gateway.testing import simulator
from test_wecom import CORPID, WECOM_APPID, WECOM_SECRET, wecom_app

OTHER_CORPID = "ww00000000other0"


async def serve(aiohttp_client: Any, data: dict[str, Any]) -> TestClient:
    client: TestClient = await aiohttp_client(create_app(loader.parse(data, environ={})))
    return client


def reload(gw: TestClient, data: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert reload_config(gw.server.app, str(path))
    finally:  # a reload sets up the process's logging; this process is pytest's
        root.handlers[:], root.level = handlers, level


async def refused_everywhere(gw: TestClient, token: str) -> None:
    for method, path in (("GET", "/auth/session"), ("GET", "/auth/verify"),
                         ("GET", "/api/who"), ("POST", "/auth/refresh")):
        resp = await gw.request(method, path, headers=bearer(token))
        await expect_error(resp, 401, "unauthorized")


async def test_a_session_of_an_app_moved_to_another_platform_is_refused(
        aiohttp_client: Any, config_dict: dict[str, Any], upstream: Upstream,
        tmp_path: Path) -> None:
    data = copy.deepcopy(config_dict)
    gw = await serve(aiohttp_client, data)
    old = await login(gw, appid=APPID)
    resp = await gw.get("/api/who", headers=bearer(old["token"]))  # cached, headers memoised
    assert resp.status == 200
    assert upstream.last.header("X-MP-Platform") == ["wechat"]

    data["apps"] = [{**data["apps"][0], "platform": "qq",
                     "api_base": data["wechat"]["api_base"]}]
    reload(gw, data, tmp_path)
    # the WeChat openid would otherwise reach the upstream as a QQ user's
    await refused_everywhere(gw, old["token"])

    new = await login(gw, appid=APPID)  # the fake WeChat answers QQ's identical call
    resp = await gw.get("/api/who", headers=bearer(new["token"]))
    assert resp.status == 200
    assert upstream.last.header("X-MP-Platform") == ["qq"]


async def test_a_wecom_session_of_a_corp_the_app_left_is_refused(
        aiohttp_client: Any, aiohttp_server: Any, config_dict: dict[str, Any],
        upstream: Upstream, tmp_path: Path) -> None:
    sim: TestServer = await aiohttp_server(simulator.create_app(
        {WECOM_APPID: WECOM_SECRET}, platforms={WECOM_APPID: "wecom"},
        corpids={WECOM_APPID: CORPID}))
    data = copy.deepcopy(config_dict)
    data["apps"] = [wecom_app(f"http://127.0.0.1:{sim.port}")]
    gw = await serve(aiohttp_client, data)
    old = await login(gw, fresh(), appid=WECOM_APPID)
    resp = await gw.get("/api/who", headers=bearer(old["token"]))
    assert resp.status == 200
    assert upstream.last.header("X-WX-CorpID") == [CORPID]

    data["apps"] = [{**data["apps"][0], "corpid": OTHER_CORPID}]
    reload(gw, data, tmp_path)
    await refused_everywhere(gw, old["token"])


async def test_a_session_stays_valid_across_a_reload_that_keeps_its_platform(
        aiohttp_client: Any, config_dict: dict[str, Any], tmp_path: Path) -> None:
    data = copy.deepcopy(config_dict)
    data["apps"] = [{"appid": APPID, "secret": SECRET, "platform": "qq",
                     "api_base": data["wechat"]["api_base"]}]
    gw = await serve(aiohttp_client, data)
    old = await login(gw, appid=APPID)
    data["apps"] = [{**data["apps"][0], "secret": "rotated-secret"}]
    reload(gw, data, tmp_path)
    resp = await gw.get("/auth/session", headers=bearer(old["token"]))
    assert resp.status == 200 and (await resp.json())["platform"] == "qq"
