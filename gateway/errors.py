"""Every error the gateway answers with, its status and its code, defined once.

A handler raises one of these; the error middleware in ``app.py`` turns it into
``{"error": code, "message": message}`` with the class's status.
"""

from __future__ import annotations

from typing import ClassVar, Mapping


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_headers: ClassVar[Mapping[str, str]] = {}

    def __init__(self, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = {**self.default_headers, **(headers or {})}


class InvalidRequest(GatewayError):
    status, code = 400, "invalid_request"


class InvalidPath(GatewayError):
    status, code = 400, "invalid_path"


class UnknownApp(GatewayError):
    status, code = 400, "unknown_app"


class NotOnPlatform(GatewayError):
    """The app's platform offers no such thing (e.g. a phone number from Alipay's session)."""

    status, code = 400, "not_on_platform"


class InvalidPhoneCode(GatewayError):
    status, code = 400, "invalid_phone_code"


class WatermarkMismatch(GatewayError):
    status, code = 400, "watermark_mismatch"


class DecryptFailed(GatewayError):
    status, code = 400, "decrypt_failed"


class InvalidSignature(GatewayError):
    status, code = 400, "invalid_signature"


class Unauthorized(GatewayError):
    status, code = 401, "unauthorized"
    default_headers = {"WWW-Authenticate": "Bearer"}


class InvalidCode(GatewayError):
    status, code = 401, "invalid_code"


class SessionKeyExpired(GatewayError):
    """WeChat no longer holds the session's session_key: the user must log in again."""

    status, code = 401, "session_key_expired"


class UserBlocked(GatewayError):
    status, code = 403, "user_blocked"


class AppForbidden(GatewayError):
    status, code = 403, "app_forbidden"


class ForbiddenRole(GatewayError):
    """The route wants a role (from the login hook) the session does not have."""

    status, code = 403, "forbidden_role"


class NotFound(GatewayError):
    status, code = 404, "not_found"


class MethodNotAllowed(GatewayError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(GatewayError):
    """The client went silent while sending its request (headers or body)."""

    status, code = 408, "request_timeout"


class PayloadTooLarge(GatewayError):
    status, code = 413, "payload_too_large"


class ExpectationFailed(GatewayError):
    status, code = 417, "expectation_failed"


class HeadersTooLarge(GatewayError):
    status, code = 431, "request_header_fields_too_large"


class RateLimited(GatewayError):
    status, code = 429, "rate_limited"


class InternalError(GatewayError):
    status, code = 500, "internal_error"


class WeChatError(GatewayError):
    """WeChat answered something we cannot use (or could not be reached)."""

    status, code = 502, "wechat_error"


class UpstreamUnavailable(GatewayError):
    status, code = 502, "upstream_unavailable"


class WeChatUnavailable(GatewayError):
    status, code = 503, "wechat_unavailable"


class StoreUnavailable(GatewayError):
    status, code = 503, "store_unavailable"


class LoginHookUnavailable(GatewayError):
    """The login hook could not be asked, or gave an answer that cannot be used."""

    status, code = 503, "login_hook_unavailable"


class WeChatTimeout(GatewayError):
    status, code = 504, "wechat_timeout"


class UpstreamTimeout(GatewayError):
    status, code = 504, "upstream_timeout"


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one ``key: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
