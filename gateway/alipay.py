"""Alipay's open API (支付宝开放平台): a mini-program's ``my.getAuthCode`` code exchanged with
``alipay.system.oauth.token``, requests signed and replies verified with RSA2.

Alipay docs: "换取授权访问令牌" (opendocs.alipay.com/apis/api_9/alipay.system.oauth.token),
"公共错误码" (the open platform's common error codes) and "自行实现验签" (verifying a reply
without the SDK). Public key mode only (公钥模式): certificate mode
(公钥证书, ``app_cert_sn``/``alipay_root_cert_sn``) is not supported.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from .config import App
from .errors import InvalidCode, WeChatError, WeChatUnavailable
from .keys import load_rsa_private_key, load_rsa_public_key
from .metrics import Metrics
from .platform import Code2Session, Exchange, error_number, text

__all__ = ["ALIPAY_API", "BEIJING", "AlipayClient", "sign_content", "signed_span", "rsa2_sign",
           "rsa2_verify"]
log = logging.getLogger("gateway.alipay")
ALIPAY_API = URL("https://openapi.alipay.com")  # the gateway is its /gateway.do
METHOD = "alipay.system.oauth.token"
NODE = METHOD.replace(".", "_") + "_response"  # how every SDK names the reply's object
# Alipay stamps requests in Beijing time ("yyyy-MM-dd HH:mm:ss"); China has kept UTC+8
# without daylight saving since 1991, so a fixed offset needs no tz database.
BEIJING = timezone(timedelta(hours=8))
_WHITESPACE = " \t\n\r"


def sign_content(params: dict[str, str]) -> str:
    """The string Alipay signs: every non-empty parameter but ``sign``, sorted by name,
    ``k=v`` joined with ``&``, values unescaped ("自行实现签名", opendocs.alipay.com/common/
    02kf5q; alipay-sdk-python-all's ``get_sign_content``)."""
    return "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "sign" and v)


def rsa2_sign(key: rsa.RSAPrivateKey, content: str) -> str:
    """SHA256withRSA (PKCS#1 v1.5) over the UTF-8 bytes, base64."""
    return base64.b64encode(key.sign(content.encode(), padding.PKCS1v15(),
                                     hashes.SHA256())).decode()


def rsa2_verify(key: rsa.RSAPublicKey, content: bytes, sign: str) -> bool:
    try:
        key.verify(base64.b64decode(sign, validate=True), content, padding.PKCS1v15(),
                   hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def signed_span(body: str) -> dict[str, tuple[int, int]]:
    """Where each top-level value of a JSON object lies in ``body``, as ``(start, end)``.

    Alipay signs the exact text of the reply's ``..._response`` object as it sent it
    (escapes such as ``\\/`` and all), so the signed bytes are cut out of the body, never
    re-serialised. The official SDKs cut them with a regex up to the last ``},"sign":"``
    (alipay-sdk-python-all ``DefaultAlipayClient.__parse_response``) or by matching braces
    (alipay-sdk-nodejs-all ``getSignStr``); here the standard JSON decoder finds each value's
    end, so a ``"sign"`` inside the object cannot move the cut. ValueError: not one JSON
    object, or a key given twice (which copy would a reader take?).
    """
    decoder, spans = json.JSONDecoder(), dict[str, tuple[int, int]]()

    def skip(i: int) -> int:
        while i < len(body) and body[i] in _WHITESPACE:
            i += 1
        return i

    i = skip(0)
    if body[i:i + 1] != "{":
        raise ValueError("not a JSON object")
    i = skip(i + 1)
    while body[i:i + 1] != "}":
        if spans:
            if body[i:i + 1] != ",":
                raise ValueError("expected ','")
            i = skip(i + 1)
        name, i = decoder.raw_decode(body, i)
        if not isinstance(name, str) or name in spans:
            raise ValueError("a key is not a string or given twice")
        i = skip(i)
        if body[i:i + 1] != ":":
            raise ValueError("expected ':'")
        start = skip(i + 1)
        _, end = decoder.raw_decode(body, start)
        spans[name] = (start, end)
        i = skip(end)
    if skip(i + 1) != len(body):
        raise ValueError("text after the object")
    return spans


# alipay.system.oauth.token's own error table (业务错误码): isv.code-invalid "授权码(auth_code)
# 错误、状态不对或过期", isv.unmatched-app-id "调用接口的应用标识(app_id)与令牌授权的应用不相符"
# (a code from another app) are the client's: 401. isp.unknow-error "未知错误: 重试" and the
# gateway's 20000 "服务不可用: 稍后重试" are Alipay's busy signal: 503. The rest
# (isv.grant-type-invalid, the refresh-token ones, and the public 20001/40001/40002/40003/
# 40004/40006 codes: a missing or wrong signature, app id, permission) are our
# configuration's: 502.
_INVALID_CODE = {"isv.code-invalid": "the login code is invalid, used or expired",
                 "isv.unmatched-app-id": "the login code is for another mini-program"}


class AlipayClient(Exchange):
    platform = "Alipay"

    def __init__(self, http: aiohttp.ClientSession, api_base: URL, timeout: float,
                 metrics: Metrics | None = None, apps: Iterable[App] = ()) -> None:
        super().__init__(http, api_base, timeout, metrics)
        # parsed once per configuration: the loader has already checked every key
        self._keys = {a.appid: (load_rsa_private_key(a.private_key),
                                load_rsa_public_key(a.alipay_public_key))
                      for a in apps if a.private_key and a.alipay_public_key}

    async def code2session(self, app: App, code: str) -> Code2Session:
        with self.measured("alipay.oauth_token"):
            return await self._code2session(app, code)

    async def _code2session(self, app: App, code: str) -> Code2Session:
        private_key, public_key = self._keys[app.appid]
        params = {"app_id": app.appid, "method": METHOD, "format": "JSON", "charset": "utf-8",
                  "sign_type": "RSA2", "version": "1.0",
                  "timestamp": datetime.now(BEIJING).strftime("%Y-%m-%d %H:%M:%S"),
                  "grant_type": "authorization_code", "code": code}
        params["sign"] = rsa2_sign(private_key, sign_content(params))
        raw = await self.fetch("POST", self.url(app, "gateway.do"), "alipay.system.oauth.token",
                               form=params)
        reply = self._verified(raw, public_key, app.appid)
        openid = text(reply.get("open_id")) or text(reply.get("user_id"))
        if openid is None:
            log.warning("%s reply for appid %s has neither open_id nor user_id", METHOD,
                        app.appid)
            raise WeChatError("Alipay's reply had no open_id or user_id")
        # No session key: Alipay's encrypted user data (the phone number) is sealed with the
        # app's AES key from the console, not a per-login key.
        return Code2Session(openid, text(reply.get("union_id")), "")

    def _verified(self, raw: bytes, public_key: rsa.RSAPublicKey, appid: str) -> dict[str, Any]:
        """The reply's object once its signature verifies; our error for anything else."""
        try:
            body = raw.decode("utf-8")  # the charset the request named
            spans = signed_span(body)
        except (ValueError, RecursionError):
            log.warning("%s reply is not a JSON object", METHOD)
            raise WeChatError("Alipay's reply was not JSON") from None
        node = NODE if NODE in spans else "error_response"
        if node not in spans:
            log.warning("%s reply has neither %s nor error_response", METHOD, NODE)
            raise WeChatError("Alipay's reply was not what was asked for")
        start, end = spans[node]
        content = json.loads(body[start:end])
        sign = json.loads(body[slice(*spans["sign"])]) if "sign" in spans else None
        if not isinstance(content, dict):
            raise WeChatError("Alipay's reply was not what was asked for")
        code, sub_code = content.get("code"), str(content.get("sub_code", ""))[:64]
        if not (isinstance(sign, str) and rsa2_verify(public_key, body[start:end].encode(),
                                                        sign)):
            # Alipay leaves some errors unsigned (isv.invalid-signature, isv.invalid-app-id:
            # it cannot tell whose key to use). They are logged, never trusted: an unsigned
            # "invalid code" must not count towards a client's ban.
            log.warning("Alipay signature failure: %s reply for appid %s is %s "
                        "(code %.8r, sub_code %r)", METHOD, appid,
                        "unsigned" if sign is None else "signed wrongly", code, sub_code)
            raise WeChatError("Alipay's reply failed its signature check")
        number = error_number(code)
        if number is None or number not in (0, 10000):
            log.warning("Alipay %s code %s sub_code %s: %s", METHOD, str(code)[:8], sub_code,
                        str(content.get("sub_msg") or content.get("msg"))[:200])
            if sub_code in _INVALID_CODE:
                raise InvalidCode(_INVALID_CODE[sub_code])
            if number == 20000 or sub_code == "isp.unknow-error":
                raise WeChatUnavailable("Alipay is busy; try again shortly")
            raise WeChatError(f"Alipay answered {str(code)[:8]} {sub_code}".rstrip())
        if node != NODE:
            raise WeChatError("Alipay's error_response had no error code")
        return content
