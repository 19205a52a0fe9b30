"""Alipay's open API gateway as documented: ``/gateway.do`` answering
``alipay.system.oauth.token`` ("换取授权访问令牌",
opendocs.alipay.com/apis/api_9/alipay.system.oauth.token), requests verified with the app's
public key (应用公钥), replies signed with the simulator's own key (its 支付宝公钥 is what the
gateway's ``alipay_public_key`` names)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterable, Mapping

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ...alipay import METHOD, NODE, BEIJING, rsa2_sign, rsa2_verify, sign_content
from .core import CALLS, STATE, digest, fault, openid_for, unionid_for


@dataclass
class AlipayKeys:
    """The simulator's key (it signs replies) and each Alipay app's public key (it verifies
    requests); ``app_private_keys`` holds those the simulator made, for the gateway's config."""

    private_key: rsa.RSAPrivateKey
    apps: dict[str, rsa.RSAPublicKey] = field(default_factory=dict)
    app_private_keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)

    @classmethod
    def generate(cls, appids: Iterable[str] = ()) -> AlipayKeys:
        keys = cls(_new_key())
        for appid in appids:
            keys.app_private_keys[appid] = _new_key()
            keys.apps[appid] = keys.app_private_keys[appid].public_key()
        return keys

    @classmethod
    def directory(cls, path: Path, appids: Iterable[str]) -> AlipayKeys:
        """Keys kept as PEM files in ``path``, each made on first use: ``alipay_private_key.pem``
        and ``alipay_public_key.pem`` (the simulator's), and per app ``<appid>_public_key.pem``
        (yours, if you bring one) or ``<appid>_private_key.pem`` (made here otherwise)."""
        path.mkdir(parents=True, exist_ok=True)
        keys = cls(_key_file(path / "alipay_private_key.pem"))
        _write(path / "alipay_public_key.pem", public_pem(keys.private_key.public_key()))
        for appid in appids:
            public = path / f"{appid}_public_key.pem"
            if public.exists():
                loaded = serialization.load_pem_public_key(public.read_bytes())
                assert isinstance(loaded, rsa.RSAPublicKey), f"{public}: not an RSA key"
                keys.apps[appid] = loaded
            else:
                keys.app_private_keys[appid] = _key_file(path / f"{appid}_private_key.pem")
                keys.apps[appid] = keys.app_private_keys[appid].public_key()
        return keys


ALIPAY_KEYS = web.AppKey("alipay_keys", AlipayKeys)


def private_pem(key: rsa.RSAPrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(key: rsa.RSAPublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_file(path: Path) -> rsa.RSAPrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey), f"{path}: not an RSA key"
        return key
    key = _new_key()
    _write(path, private_pem(key))
    path.chmod(0o600)
    return key


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def add_routes(app: web.Application, keys: AlipayKeys) -> None:
    app[ALIPAY_KEYS] = keys
    app.router.add_route("*", "/gateway.do", gateway)


# The public error codes ("公共错误码") an ``errcode-<N>-`` code asks for, each with a
# sub_code the gateway maps; 40002's is the invalid login code.
_ERRORS: Mapping[str, tuple[str, str, str]] = {
    "20000": ("Service Currently Unavailable", "isp.unknow-error", "服务暂不可用"),
    "20001": ("Insufficient Token Permissions", "aop.invalid-auth-token", "无效的访问令牌"),
    "40001": ("Missing Required Arguments", "isv.missing-signature", "缺少签名参数"),
    "40002": ("Invalid Arguments", "isv.code-invalid", "授权码code无效"),
    "40003": ("Insufficient Conditions", "isv.insufficient-conditions", "条件不足"),
    "40004": ("Business Failed", "isv.unmatched-app-id", "调用接口的应用标识与令牌授权的应用不相符"),
    "40006": ("Insufficient Permissions", "isv.insufficient-isv-permissions", "ISV权限不足"),
}
_REQUIRED = {"app_id": "isv.missing-app-id", "method": "isv.missing-method",
             "sign": "isv.missing-signature", "sign_type": "isv.missing-signature-type",
             "timestamp": "isv.missing-timestamp", "version": "isv.missing-version"}
_PREFIXED = re.compile(r"^(errcode|errstr)-(-?[^-]*)-")
_TIMESTAMP = "%Y-%m-%d %H:%M:%S"


async def gateway(request: web.Request) -> web.StreamResponse:
    """Every request verified in the order Alipay's gateway checks it; errors it cannot sign
    (it does not know whose key to use, or the signature is wrong) go out unsigned."""
    request.app[CALLS]["alipay.system.oauth.token"] += 1
    state, keys = request.app[STATE], request.app[ALIPAY_KEYS]
    params = {**request.query, **(await request.post())}
    p = {k: v for k, v in params.items() if isinstance(v, str)}
    for name, sub_code in _REQUIRED.items():
        if not p.get(name):
            return _error(None, "40001", "Missing Required Arguments", sub_code, f"缺少{name}参数")
    appid, code = p["app_id"], p.get("code", "")
    if state.platform(appid) != "alipay" or appid not in keys.apps:
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-app-id", "无效的AppID参数")
    if p["method"] != METHOD:
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-method", "不存在的方法名")
    if p["sign_type"] != "RSA2":
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-signature-type",
                      "无效的签名类型")
    if p.get("charset", "utf-8").lower() != "utf-8":
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-charset", "字符集错误")
    try:  # "非法的时间戳参数": the format, or more than 15 minutes from Alipay's clock
        sent = datetime.strptime(p["timestamp"], _TIMESTAMP).replace(tzinfo=BEIJING)
        skewed = abs((datetime.now(BEIJING) - sent).total_seconds()) > 15 * 60
    except ValueError:
        skewed = True
    if skewed:
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-timestamp",
                      "非法的时间戳参数")
    if not rsa2_verify(keys.apps[appid], sign_content(p).encode(), p["sign"]):
        return _error(None, "40002", "Invalid Arguments", "isv.invalid-signature",
                      "验签出错，建议检查签名字符串或签名私钥与应用公钥是否匹配")
    signer = keys.private_key
    if p.get("grant_type") not in ("authorization_code", "refresh_token"):
        return _error(signer, "40002", "Invalid Arguments", "isv.grant-type-invalid",
                      "grant_type参数不正确")
    prefixed = _PREFIXED.match(code)
    if prefixed and prefixed.group(1) == "errcode":
        number = prefixed.group(2)
        msg, sub_code, sub_msg = _ERRORS.get(number, ("Business Failed", "isv.unknown", "?"))
        return _error(signer, number, msg, sub_code, sub_msg)
    if prefixed:
        return _error(signer, prefixed.group(2), "simulated error", "", "")
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if not code or (state.single_use and code in state.used):
        return _error(signer, "40002", "Invalid Arguments", "isv.code-invalid", "授权码code无效")
    if state.single_use:
        state.used.add(code)
    body: dict[str, object] = {
        "access_token": "authusrB" + digest(f"at/{appid}/{code}")[:32],
        "expires_in": 1296000, "refresh_token": "authusrB" + digest(f"rt/{appid}/{code}")[:32],
        "re_expires_in": 2592000, "auth_start": datetime.now(BEIJING).strftime(_TIMESTAMP)}
    if code.startswith("userid-"):  # an app still on user_id (2088...), not yet on open_id
        body["user_id"] = "2088" + str(int(digest(f"uid/{code}").encode().hex(), 16))[:12]
    elif not code.startswith("noopenid-"):
        body["open_id"] = openid_for(appid, code)
    if not code.startswith(("nounionid-", "noopenid-")):
        body["union_id"] = unionid_for(code)
    return _signed(signer, NODE, body, forged=code.startswith("badsign-"),
                   unsigned=code.startswith("nosign-"))


def _error(signer: rsa.RSAPrivateKey | None, code: str, msg: str, sub_code: str,
           sub_msg: str) -> web.Response:
    body = {"code": code, "msg": msg}
    if sub_code:
        body |= {"sub_code": sub_code, "sub_msg": sub_msg}
    return _signed(signer, "error_response", body)


def _signed(signer: rsa.RSAPrivateKey | None, node: str, body: Mapping[str, object], *,
            forged: bool = False, unsigned: bool = False) -> web.Response:
    # Alipay escapes "/" in its JSON ("http:\/\/...") and signs the text as sent, escapes and
    # all: a verifier that re-serialises the object fails on any reply that holds a "/".
    content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).replace("/", "\\/")
    text = f'{{"{node}":{content}'
    if signer is not None and not unsigned:
        sign = rsa2_sign(signer, content + " " if forged else content)
        text += f',"sign":"{sign}"'
    # Alipay's gateway labels its JSON text/html
    return web.Response(text=text + "}", content_type="text/html", charset="utf-8")
