"""Alipay mini-programs: RSA2 request signing, replies verified over their raw text (Alipay's
own published reply included), every documented reply mapped, keys checked at config time,
and a login through a real gateway process against the simulator."""

from __future__ import annotations

import base64
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway import loader
from gateway.alipay import NODE, rsa2_sign, rsa2_verify, sign_content, signed_span
from gateway.errors import ConfigError
from gateway.keys import load_rsa_public_key
from gateway.testing import simulator
from gateway.testing.simulator.alipay import AlipayKeys, private_pem, public_pem

from checks import expect_error
from conftest import APPID, SECRET, GatewayFactory, Upstream, bearer, fresh
from process import Launch, Launcher, launch_with_client
from test_reload import reload
from test_simulator_command import _start

ALIPAY = "2021000000000001"
KEYS = AlipayKeys.generate([ALIPAY])
APP_KEY = KEYS.app_private_keys[ALIPAY]
ALIPAY_PUBLIC = public_pem(KEYS.private_key.public_key())

# Alipay's own reply and the public key it verifies with, from alipay-sdk-nodejs-all
# (test/alipay.test.ts "checkResponseSign should work", test/fixtures/alipay-public-key.pem):
# a real alipay.open.file.upload answer, signed by Alipay.
PUBLISHED_KEY = """-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAk7LzhmMa2c4qQd4fqAqenfbuFoA7stPKvoS1LrZEsVnOOGUU
jwoa1oU9xsSPjcOWhIerU/VAN4J95GIAXx59ipcleIyfLn2FhHXPgLJpvo+b2jJFyn/1/DbeJDh+0yDVAOf50Z7HhI0m
dUhFMkXlT7BU0ZMtJf/TmISFEfhDU/w6qFd6D42L97byAkq0K6LroglSVF24GqJEa7hSeUIkZWj7RasykXrc2uVJ1+ej
kXE0LyPxa2AHykMGbJLf5SiZvaNzUZgnKIR36mLOHpQ/2JCXxhXZYUWHzy0kMH54JcUEeksFWBYLGvLjV1phbcUIc3Q7
6tIuqApY6E222OoZZQIDAQAB
-----END PUBLIC KEY-----
"""
PUBLISHED_SIGN = (
    "F+LDzpTNiavn7xVZPGuPCSSVRSmWzJGgtuji6tVELGEaqMaNj0jRKXUEr5nloZJBBmwEnddOyCjjepMmrTKTvoOq"
    "Q0Efxpr/R1iEeHTHVbb/Q8TTh6Up5gHJDkILdaWS2q1cWeQ6VT+HQY9P3WRXS7uhILHuDODIhpAyCu5KhWGt0rMC"
    "IG+Im6NODJP2oohtSCtmTFXg58HH587Z2y2bdbjzOxLvzD9IrU1imghXQ2S/Q+wMIvRk9on6cWnBLkrNvJKapA2R"
    "eNGWOwyuASvB9zDVzhMPbR+3mfRGkVDxsq5HYLjBKGskJMXHw0HuugZij6ScRuaLPODhmHwr/pJ9yw==")
PUBLISHED_CONTENT = '{"code":"10000","msg":"Success","file_id":"CAxAToWB1JsAAAAAAAAAAAAADgSLAQBr"}'
PUBLISHED_REPLY = ('{"alipay_open_file_upload_response":' + PUBLISHED_CONTENT
                   + ',"sign":"' + PUBLISHED_SIGN + '"}')


def alipay_app(api_base: str, **extra: Any) -> dict[str, Any]:
    return {"appid": ALIPAY, "platform": "alipay", "api_base": api_base,
            "private_key": private_pem(APP_KEY), "alipay_public_key": ALIPAY_PUBLIC, **extra}


# --- signing and verifying ------------------------------------------------------------------

def test_the_signed_string_is_every_non_empty_parameter_but_sign_sorted_by_name() -> None:
    params = {"timestamp": "2014-07-24 03:07:50", "app_id": "2014072300007148",
              "sign": "x", "method": "alipay.system.oauth.token", "code": "", "charset": "utf-8"}
    assert sign_content(params) == (
        "app_id=2014072300007148&charset=utf-8&method=alipay.system.oauth.token&"
        "timestamp=2014-07-24 03:07:50")


def test_the_request_signature_is_what_openssl_makes_of_the_signed_string(
        tmp_path: Path) -> None:
    """SHA256withRSA, PKCS#1 v1.5, is deterministic: an independent signer must agree."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command")
    content = sign_content({"app_id": ALIPAY, "method": "alipay.system.oauth.token",
                            "charset": "utf-8", "sign_type": "RSA2", "version": "1.0",
                            "timestamp": "2014-07-24 03:07:50", "code": "4b203fe6c115",
                            "grant_type": "authorization_code", "format": "JSON"})
    (tmp_path / "key.pem").write_text(private_pem(APP_KEY))
    (tmp_path / "content").write_text(content)
    subprocess.run([openssl, "dgst", "-sha256", "-sign", str(tmp_path / "key.pem"), "-out",
                    str(tmp_path / "sig"), str(tmp_path / "content")], check=True)
    assert rsa2_sign(APP_KEY, content) == base64.b64encode(
        (tmp_path / "sig").read_bytes()).decode()


def test_alipays_published_reply_verifies_over_its_raw_text_and_not_once_altered() -> None:
    key = load_rsa_public_key(PUBLISHED_KEY)
    start, end = signed_span(PUBLISHED_REPLY)["alipay_open_file_upload_response"]
    assert PUBLISHED_REPLY[start:end] == PUBLISHED_CONTENT
    assert rsa2_verify(key, PUBLISHED_CONTENT.encode(), PUBLISHED_SIGN)
    assert not rsa2_verify(key, PUBLISHED_CONTENT.replace("10000", "10001").encode(),
                           PUBLISHED_SIGN)
    assert not rsa2_verify(key, PUBLISHED_CONTENT.encode(), PUBLISHED_SIGN[:-4] + "AAA=")
    assert not rsa2_verify(key, PUBLISHED_CONTENT.encode(), "not base64!")
    # re-serialising would change the bytes: the signature holds only for the text as sent
    assert not rsa2_verify(key, json.dumps(json.loads(PUBLISHED_CONTENT)).encode(),
                           PUBLISHED_SIGN)


def test_the_signed_text_is_found_around_whitespace_and_a_sign_key_inside_it() -> None:
    body = ('{ "alipay_open_file_upload_response"\n :\n ' + PUBLISHED_CONTENT
            + ' ,\n "sign" : "' + PUBLISHED_SIGN + '" }')
    start, end = signed_span(body)["alipay_open_file_upload_response"]
    assert body[start:end] == PUBLISHED_CONTENT
    inner = '{"code":"10000","sign":"xxx","x":"},\\"sign\\":\\""}'
    body = '{"n":' + inner + ',"sign":"s"}'
    assert body[slice(*signed_span(body)["n"])] == inner


@pytest.mark.parametrize("body", [
    '{"a":{},"a":{}}', '{"a":{}} x', '[1]', '{"a":{}', '{"a" {}}', '{"a":{} "b":1}', ''])
def test_a_reply_that_is_not_one_json_object_with_unique_keys_is_refused(body: str) -> None:
    with pytest.raises(ValueError):
        signed_span(body)


def test_a_signature_holds_only_under_the_key_that_made_it() -> None:
    content = '{"user_id":"2088102150477652"}'
    sign = rsa2_sign(APP_KEY, content)
    assert rsa2_verify(APP_KEY.public_key(), content.encode(), sign)
    assert not rsa2_verify(KEYS.private_key.public_key(), content.encode(), sign)


# --- logging in through the simulator ---------------------------------------------------------

@pytest.fixture
async def alipay_sim(aiohttp_server: Any) -> TestServer:
    app = simulator.create_app({APPID: SECRET}, platforms={ALIPAY: "alipay"},
                               alipay_keys=KEYS, single_use=True)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.fixture
def sim_url(alipay_sim: TestServer) -> str:
    return f"http://127.0.0.1:{alipay_sim.port}"


async def test_login_puts_the_open_id_and_union_id_in_the_identity_headers(
        make_gateway: GatewayFactory, sim_url: str, upstream: Upstream) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    code = fresh()
    resp = await gw.post("/auth/login", json={"code": code, "appid": ALIPAY})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["openid"] == simulator.openid_for(ALIPAY, code)
    resp = await gw.get("/api/x", headers=bearer(body["token"]))
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [simulator.openid_for(ALIPAY, code)]
    assert upstream.last.header("X-WX-UnionID") == [simulator.unionid_for(code)]
    assert upstream.last.header("X-MP-Platform") == ["alipay"]
    assert upstream.last.header("X-WX-AppID") == [ALIPAY]


async def test_an_app_still_on_user_id_logs_in_as_its_2088_user_id(
        make_gateway: GatewayFactory, sim_url: str) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    resp = await gw.post("/auth/login", json={"code": fresh("userid-"), "appid": ALIPAY})
    assert resp.status == 200, await resp.text()
    openid = (await resp.json())["openid"]
    assert openid.startswith("2088") and len(openid) == 16


@pytest.mark.parametrize("prefix, status, code", [
    ("errcode-40002-", 401, "invalid_code"),   # isv.code-invalid
    ("errcode-40004-", 401, "invalid_code"),   # isv.unmatched-app-id: another app's code
    ("errcode-20000-", 503, "wechat_unavailable"),  # isp.unknow-error
    ("errcode-20001-", 502, "wechat_error"),
    ("errcode-40001-", 502, "wechat_error"),
    ("errcode-40003-", 502, "wechat_error"),
    ("errcode-40006-", 502, "wechat_error"),
    ("errstr-busy-", 502, "wechat_error"),     # a code that is not a number
    ("http-502-", 502, "wechat_error"),
    ("garbage-", 502, "wechat_error"),
    ("reset-", 502, "wechat_error"),
    ("slow-3000-", 504, "wechat_timeout"),
    ("noopenid-", 502, "wechat_error"),        # neither open_id nor user_id
    ("badsign-", 502, "wechat_error"),
    ("nosign-", 502, "wechat_error"),
])
async def test_each_failure_maps_to_the_login_error_table(
        make_gateway: GatewayFactory, sim_url: str, prefix: str, status: int,
        code: str) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    resp = await gw.post("/auth/login", json={"code": fresh(prefix), "appid": ALIPAY})
    await expect_error(resp, status, code)


async def test_a_used_code_is_invalid(make_gateway: GatewayFactory, sim_url: str) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    code = fresh()
    assert (await gw.post("/auth/login", json={"code": code, "appid": ALIPAY})).status == 200
    await expect_error(await gw.post("/auth/login", json={"code": code, "appid": ALIPAY}),
                       401, "invalid_code")


async def test_a_wrong_signature_is_never_trusted_and_is_logged_as_one(
        make_gateway: GatewayFactory, sim_url: str, caplog: pytest.LogCaptureFixture) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    with caplog.at_level(logging.WARNING, logger="gateway.alipay"):
        resp = await gw.post("/auth/login", json={"code": fresh("badsign-"), "appid": ALIPAY})
        await expect_error(resp, 502, "wechat_error")
    assert any("signature failure" in r.getMessage() and "signed wrongly" in r.getMessage()
               for r in caplog.records)


async def test_a_request_signed_with_another_key_gets_alipays_unsigned_error_as_502(
        make_gateway: GatewayFactory, sim_url: str, caplog: pytest.LogCaptureFixture) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    gw = await make_gateway(apps=[alipay_app(sim_url, private_key=private_pem(other))])
    with caplog.at_level(logging.WARNING, logger="gateway.alipay"):
        resp = await gw.post("/auth/login", json={"code": fresh(), "appid": ALIPAY})
        await expect_error(resp, 502, "wechat_error")
    assert any("unsigned" in r.getMessage() and "isv.invalid-signature" in r.getMessage()
               for r in caplog.records)


async def test_alipay_sessions_have_no_session_key_features(
        make_gateway: GatewayFactory, sim_url: str) -> None:
    gw = await make_gateway(apps=[alipay_app(sim_url)])
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": ALIPAY})
    headers = bearer((await resp.json())["token"])
    for path, body in [("/auth/decrypt", {"encrypted_data": "AAAA", "iv": "AAAA"}),
                       ("/auth/check-signature", {"raw_data": "{}", "signature": "x"}),
                       ("/auth/phone", {"code": "c"})]:
        error = await expect_error(await gw.post(path, json=body, headers=headers), 400,
                                   "not_on_platform")
        assert "alipay" in error["message"], path


# --- Alipay's documented replies, as published -----------------------------------------------

def scripted(node: str, content: str, signer: rsa.RSAPrivateKey | None = KEYS.private_key,
             ) -> web.Application:
    """An Alipay that answers one reply: ``content`` under ``node``, signed by ``signer``."""
    async def handle(_: web.Request) -> web.Response:
        sign = f',"sign":"{rsa2_sign(signer, content)}"' if signer else ""
        return web.Response(text=f'{{"{node}":{content}{sign}}}', content_type="text/html")
    app = web.Application()
    app.router.add_post("/gateway.do", handle)
    return app


# alipay.system.oauth.token's response example ("响应示例") and error example
DOC_SUCCESS = ('{"user_id":"2088102150477652","access_token":"20120823ac6ffaa4d2d84e7384bf98'
               '3531473993","expires_in":"3600","refresh_token":"20120823ac6ffdsdf2d84e7384bf9'
               '83531473993","re_expires_in":"3600","auth_start":"2010-11-11 11:11:11"}')
DOC_ERROR = ('{"code":"40002","msg":"Invalid Arguments","sub_code":"isv.code-invalid",'
             '"sub_msg":"授权码code无效"}')


@pytest.mark.parametrize("node, content, status, code", [
    (NODE, DOC_SUCCESS, 200, None),
    (NODE, DOC_SUCCESS.replace('"user_id":"2088102150477652"',
                               '"open_id":"074a1CcTG1LelxKe4xQC0zgNdId0nxi95b5lsNpazWYoCo5"'),
     200, None),
    # Alipay escapes "/": the signature holds over the escaped text only
    (NODE, DOC_SUCCESS.replace('"auth_start"', '"avatar":"https:\\/\\/tfs.alipayobjects.com'
                                               '\\/images\\/a.png","auth_start"'), 200, None),
    ("error_response", DOC_ERROR, 401, "invalid_code"),
    (NODE, DOC_ERROR, 401, "invalid_code"),  # an error under the method's own object
    ("error_response", DOC_ERROR.replace('"40002"', "40002"), 401, "invalid_code"),
    ("error_response", DOC_ERROR.replace("isv.code-invalid", "isv.grant-type-invalid"),
     502, "wechat_error"),
    ("error_response", '{"code":"20000","msg":"Service Currently Unavailable","sub_code":'
                       '"isp.unknow-error","sub_msg":"系统繁忙"}', 503, "wechat_unavailable"),
    ("error_response", '{"code":"40004","msg":"Business Failed","sub_code":'
                       '"isp.unknow-error","sub_msg":"未知错误"}', 503, "wechat_unavailable"),
    ("error_response", '{"msg":"no code"}', 502, "wechat_error"),
    (NODE, DOC_SUCCESS.replace('"user_id":"2088102150477652",', ""), 502, "wechat_error"),
    (NODE, DOC_SUCCESS.replace('"2088102150477652"', "2088102150477652"), 502, "wechat_error"),
    ("alipay_other_response", DOC_SUCCESS, 502, "wechat_error"),
])
async def test_documented_replies(make_gateway: GatewayFactory, aiohttp_server: Any,
                                  node: str, content: str, status: int,
                                  code: str | None) -> None:
    server = await aiohttp_server(scripted(node, content))
    gw = await make_gateway(apps=[alipay_app(f"http://127.0.0.1:{server.port}")])
    resp = await gw.post("/auth/login", json={"code": "4b203fe6c11548bcabd8da5bb087a83b",
                                              "appid": ALIPAY})
    if code is None:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["openid"] == json.loads(content).get(
            "open_id", json.loads(content).get("user_id"))
    else:
        await expect_error(resp, status, code)


async def test_a_documented_error_left_unsigned_is_not_trusted(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    """An unsigned "invalid code" could be anyone's: it must not count towards a ban."""
    server = await aiohttp_server(scripted("error_response", DOC_ERROR, signer=None))
    gw = await make_gateway(apps=[alipay_app(f"http://127.0.0.1:{server.port}")])
    await expect_error(await gw.post("/auth/login", json={"code": "c", "appid": ALIPAY}),
                       502, "wechat_error")


# --- configuration --------------------------------------------------------------------------

def parse_apps(config_dict: dict[str, Any], *apps: dict[str, Any]) -> list[str]:
    data = {**config_dict, "apps": list(apps)}
    try:
        loader.parse(data, environ={})
    except ConfigError as exc:
        return exc.problems
    return []


def test_keys_are_taken_as_pem_bare_base64_or_a_file(config_dict: dict[str, Any],
                                                       tmp_path: Path) -> None:
    pem = private_pem(APP_KEY)
    bare = "".join(pem.splitlines()[1:-1])  # as Alipay's key tool shows it
    (tmp_path / "app.pem").write_text(pem)
    for key in (pem, bare, str(tmp_path / "app.pem")):
        assert parse_apps(config_dict, alipay_app("http://x", private_key=key)) == []
    public_bare = "".join(ALIPAY_PUBLIC.splitlines()[1:-1])
    assert parse_apps(config_dict, alipay_app("http://x", alipay_public_key=public_bare)) == []
    config = loader.parse({**config_dict, "apps": [alipay_app("http://x")]}, environ={})
    assert "PRIVATE" not in repr(config.apps[0])


@pytest.mark.parametrize("change, problem", [
    ({"private_key": None}, "apps[0].private_key: is required when platform is alipay"),
    ({"alipay_public_key": None},
     "apps[0].alipay_public_key: is required when platform is alipay"),
    ({"private_key": "/no/such/file.pem"}, "apps[0].private_key: neither a PEM or base64 key"),
    ({"private_key": ALIPAY_PUBLIC}, "apps[0].private_key: not an unencrypted RSA private key"),
    ({"alipay_public_key": private_pem(APP_KEY)}, "apps[0].alipay_public_key: not an RSA"),
    ({"private_key": private_pem(rsa.generate_private_key(public_exponent=65537,
                                                          key_size=1024))},
     "apps[0].private_key: RSA2 needs an RSA key of at least 2048 bits"),
    ({"alipay_public_key": "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAk7LzhmMa2c4qQd4fqAqen"
                           "fbuFoA7stPKvoS1LrZEsVnOOGUUjwoa1oU9xsSPjcOWhIerU/VAN4J95GIAXx59ipcl"},
     "apps[0].alipay_public_key: not an RSA public key"),
    ({"secret": "s"}, "apps[0].secret: does not apply to platform alipay"),
    # the app's own public key where Alipay's belongs: no reply of Alipay's would verify
    ({"alipay_public_key": public_pem(APP_KEY.public_key())},
     "apps[0].alipay_public_key: is the public half of apps[0].private_key"),
])
def test_a_bad_or_missing_alipay_key_is_a_config_error_naming_it(
        config_dict: dict[str, Any], change: dict[str, Any], problem: str) -> None:
    app = {k: v for k, v in {**alipay_app("http://x"), **change}.items() if v is not None}
    problems = parse_apps(config_dict, app)
    assert any(p.startswith(problem) for p in problems), problems


def test_a_key_pasted_wrongly_is_not_echoed_in_the_error(config_dict: dict[str, Any]) -> None:
    mangled = private_pem(APP_KEY).replace("\n", "\\n").replace("-----BEGIN", "BEGIN")
    problems = parse_apps(config_dict, alipay_app("http://x", private_key=mangled))
    assert len(problems) == 1 and problems[0].startswith("apps[0].private_key: neither"), problems
    assert mangled[40:80] not in problems[0]


def test_only_alipay_apps_go_without_a_secret_and_only_they_take_rsa_keys(
        config_dict: dict[str, Any]) -> None:
    assert parse_apps(config_dict, {"appid": APPID}) == ["apps[0].secret: is required"]
    problems = parse_apps(config_dict, {"appid": APPID, "secret": SECRET,
                                        "alipay_public_key": ALIPAY_PUBLIC})
    assert problems == ["apps[0].alipay_public_key: applies only to platform alipay, not wechat"]


# --- a real gateway process and the simulator command's key files ---------------------------

async def test_a_gateway_process_logs_in_through_the_simulator_command_and_its_key_files(
        launcher: Launcher, launch: Launch, config_dict: dict[str, Any],
        tmp_path: Path) -> None:
    keys_dir = tmp_path / "alipay-keys"
    sim, port = await _start(launcher, "--app", f"alipay:{ALIPAY}", "--alipay-keys",
                             str(keys_dir))
    made = sorted(p.name for p in keys_dir.iterdir())
    assert made == [f"{ALIPAY}_private_key.pem", "alipay_private_key.pem",
                    "alipay_public_key.pem"]
    assert (keys_dir / "alipay_private_key.pem").stat().st_mode & 0o077 == 0
    data = {**config_dict, "apps": [{
        "appid": ALIPAY, "platform": "alipay", "api_base": f"http://127.0.0.1:{port}",
        "private_key": str(keys_dir / f"{ALIPAY}_private_key.pem"),
        "alipay_public_key": str(keys_dir / "alipay_public_key.pem")}]}
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        code = fresh()
        login = (await client.login(code, ALIPAY)).json()
        assert login["openid"] == simulator.openid_for(ALIPAY, code)
        assert login["unionid"] == simulator.unionid_for(code)
        assert (await client.login(fresh("errcode-40002-"), ALIPAY, expect=401)).json()[
            "error"] == "invalid_code"
        mark = gw.mark()
        assert (await client.login(fresh("badsign-"), ALIPAY, expect=502)).json()[
            "error"] == "wechat_error"
        await gw.wait_for_line(lambda line: "Alipay signature failure" in line, after=mark)
    sim.terminate()
    assert await sim.exit_code(within=15) == 0
    # a second start reuses the files: the gateway's configuration stays valid
    before = (keys_dir / "alipay_public_key.pem").read_text()
    await _start(launcher, "--app", f"alipay:{ALIPAY}", "--alipay-keys", str(keys_dir))
    assert (keys_dir / "alipay_public_key.pem").read_text() == before


async def test_a_reload_reads_rotated_key_files(launch: Launch, config_dict: dict[str, Any],
                                              tmp_path: Path, aiohttp_server: Any) -> None:
    keys = AlipayKeys.generate([ALIPAY])
    server = await aiohttp_server(simulator.create_app({}, platforms={ALIPAY: "alipay"},
                                                       alipay_keys=keys))
    key_file = tmp_path / "app_private_key.pem"
    key_file.write_text(private_pem(keys.app_private_keys[ALIPAY]))
    data = {**config_dict, "apps": [{
        "appid": ALIPAY, "platform": "alipay", "api_base": f"http://127.0.0.1:{server.port}",
        "private_key": str(key_file),
        "alipay_public_key": public_pem(keys.private_key.public_key())}]}
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        await client.login(fresh(), ALIPAY)
        # the app's key pair is replaced in Alipay's console: the old key no longer signs
        rotated = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        keys.apps[ALIPAY] = rotated.public_key()
        await client.login(fresh(), ALIPAY, expect=502)
        key_file.write_text(private_pem(rotated))
        await reload(gw, {**data, "listen": f"127.0.0.1:{gw.port}"})
        await client.login(fresh(), ALIPAY)
