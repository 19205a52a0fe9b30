"""Endpoints that use the session's WeChat credentials on the user's behalf: the phone number,
legacy user-data decryption and signatures, and the session_key health check."""

from __future__ import annotations

from typing import Any

from .auth import Identity
from .config import App
from .errors import (DecryptFailed, NotOnPlatform, GatewayError, InvalidRequest, InvalidSignature,
                     SessionKeyExpired, WatermarkMismatch, WeChatError)
from .services import Services
from .crypto import decrypt as decrypt_user_data
from .crypto import signature_matches

MAX_CODE_LENGTH = 128
# Platforms whose getPhoneNumber hands the mini-program encryptedData+iv under the session_key
# (no code to exchange): the number is user data, read with /auth/decrypt.
PHONE_BY_DECRYPTION = frozenset({"qq", "douyin"})


async def phone(s: Services, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
    code = _string(body, "code", MAX_CODE_LENGTH)
    platform = identity.session.platform
    if platform in PHONE_BY_DECRYPTION:
        raise NotOnPlatform(f"phone numbers by code (/auth/phone) are not available on platform "
                            f"{platform}: send getPhoneNumber's encrypted_data and iv to "
                            f"/auth/decrypt")
    app = _wechat_app(s, identity, "phone numbers by code (/auth/phone)")
    info = await s.access_tokens.call(app, lambda token: s.wechat.phone_number(app, token, code))
    watermark = info.get("watermark")
    if not isinstance(watermark, dict) or watermark.get("appid") != identity.session.appid:
        raise WatermarkMismatch("the phone number was issued for another mini-program")
    number, pure = info.get("phoneNumber"), info.get("purePhoneNumber")
    if not isinstance(number, str) or not isinstance(pure, str):
        raise WeChatError("WeChat's reply had no phone number")
    if s.config.session.store_phone:
        await s.sessions.set_phone(identity.session, number)
        s.authenticator.forget(identity.session.sid)
    return {"phone_number": number, "pure_phone_number": pure,
            "country_code": str(info.get("countryCode", ""))}


async def decrypt(s: Services, identity: Identity, body: dict[str, Any]) -> dict[str, Any]:
    encrypted, iv = _string(body, "encrypted_data", 1 << 16), _string(body, "iv", 64)
    key = await _session_key(s, identity)
    try:
        data = decrypt_user_data(key, encrypted, iv)
    except DecryptFailed:
        # Either the data is not ours or WeChat has moved the user to a new session_key
        # (a newer wx.login). Only WeChat can tell which; a stale key means: log in again.
        await _raise_if_stale(s, identity)
        raise
    watermark = data.get("watermark")
    if not isinstance(watermark, dict) or watermark.get("appid") != identity.session.appid:
        raise WatermarkMismatch("the data was encrypted for another mini-program")
    return data


async def check_signature(s: Services, identity: Identity,
                          body: dict[str, Any]) -> dict[str, Any]:
    raw_data = _string(body, "raw_data", 1 << 16, ascii_only=False)  # holds nicknames
    signature = _string(body, "signature", 64)
    if not signature_matches(await _session_key(s, identity), raw_data, signature):
        raise InvalidSignature("signature does not match sha1(raw_data + session_key)")
    return {"valid": True}


async def check_session_key(s: Services, identity: Identity) -> None:
    """Raise ``SessionKeyExpired`` unless WeChat still holds this session's session_key."""
    key = await _session_key(s, identity)
    app = _wechat_app(s, identity, "a session_key check")
    await s.access_tokens.call(
        app, lambda token: s.wechat.check_session(app, token, identity.session.openid, key))


async def _raise_if_stale(s: Services, identity: Identity) -> None:
    try:
        await check_session_key(s, identity)
    except SessionKeyExpired:
        raise
    except GatewayError:
        return  # WeChat could not tell: report the decryption failure itself


async def _session_key(s: Services, identity: Identity) -> bytes:
    if identity.session.platform == "alipay":
        # Alipay's login gives no session key: its encrypted data (the phone number) is
        # sealed with the AES key set in Alipay's console, which the app's backend holds.
        raise NotOnPlatform("user data decryption and signatures are not available on "
                            "platform alipay (its login gives no session key)")
    try:
        key = await s.sessions.session_key(identity.session)
    except ValueError:  # sealed under a signing key that is no longer configured
        key = None
    if key is None:
        raise SessionKeyExpired("the session has no usable session_key; log in again")
    return key


def _app(s: Services, identity: Identity) -> App:
    app = s.config.app(identity.session.appid)
    if app is None:  # the app was removed from the configuration after this login
        raise SessionKeyExpired("this session's mini-program is no longer configured")
    return app


def _wechat_app(s: Services, identity: Identity, feature: str) -> App:
    """The session's app, when its platform is WeChat: the only one with this API."""
    app = _app(s, identity)
    if app.platform != "wechat":
        raise NotOnPlatform(f"{feature} is not available on platform {app.platform}")
    return app


def _string(body: dict[str, Any], field: str, limit: int, *, ascii_only: bool = True) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field} is required and must be a non-empty string")
    if len(value) > limit or (ascii_only and not value.isascii()):
        kind = "ASCII" if ascii_only else "a string"
        raise InvalidRequest(f"{field} must be {kind} of at most {limit} characters")
    return value
