"""YAML configuration → a typed, validated, frozen ``Config``.

Every problem is reported as one ``key.path: message`` line, all of them at once, so an
operator fixes a file in one pass. Nothing reads YAML or the environment after this.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar

import yaml
from yarl import URL

from .errors import ConfigError

AuthMode = Literal["required", "optional", "public"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AUTH_MODES: tuple[AuthMode, ...] = ("required", "optional", "public")
MIN_SIGNING_KEY_BYTES = 32
GATEWAY_PATHS = ("/healthz", "/readyz", "/metrics")
AUTH_ENDPOINTS = ("login", "logout", "refresh", "session", "verify", "phone", "decrypt",
                  "check-signature")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = field(repr=False)  # may carry a password
    key_prefix: str = "wxgw:"
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class WeChatConfig:
    api_base: URL = URL("https://api.weixin.qq.com")
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class App:
    appid: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    signing_keys: tuple[bytes, ...] = field(repr=False)
    ttl: float = 7 * 86400.0
    store_phone: bool = False


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Login abuse control; a limit of 0 turns that check off."""

    ip_limit: int = 30
    ip_window: float = 60.0
    app_limit: int = 1200
    app_window: float = 60.0
    max_retries: int = 5  # consecutive invalid codes from one IP within find_time → ban
    find_time: float = 600.0
    ban_time: float = 900.0


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    openid: str = "X-WX-OpenID"
    unionid: str = "X-WX-UnionID"
    appid: str = "X-WX-AppID"
    phone: str = "X-WX-Phone"

    def names(self) -> tuple[str, ...]:
        return (self.openid, self.unionid, self.appid, self.phone)


@dataclass(frozen=True, slots=True)
class Route:
    path: str  # normalised: starts with "/", no trailing "/" unless it is "/"
    upstream: URL  # as configured
    origin: str  # "http://host:port", what the forwarded path is appended to
    base_path: str  # "" or "/base" (no trailing slash), prepended to the forwarded path
    auth: AuthMode = "required"
    timeout: float = 30.0
    connect_timeout: float = 5.0
    preserve_host: bool = False
    apps: tuple[str, ...] = ()  # when set, only tokens of these appids are accepted

    def matches(self, path: str) -> bool:
        return self.path == "/" or path == self.path or path.startswith(self.path + "/")


@dataclass(frozen=True, slots=True)
class Config:
    listen_host: str
    listen_port: int
    redis: RedisConfig
    wechat: WeChatConfig
    apps: tuple[App, ...]
    session: SessionConfig
    auth_prefix: str
    identity_headers: IdentityHeaders
    routes: tuple[Route, ...]
    shutdown_grace: float = 10.0
    trusted_proxies: tuple[IPNetwork, ...] = ()
    rate_limit: RateLimit = RateLimit()

    def is_trusted_proxy(self, address: str | None) -> bool:
        if not self.trusted_proxies or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def app(self, appid: str) -> App | None:
        return next((a for a in self.apps if a.appid == appid), None)

    def route_for(self, path: str) -> Route | None:
        """The route with the longest prefix matching ``path`` (routes are kept longest first)."""
        return next((r for r in self.routes if r.matches(path)), None)


# --- loading -------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_APPID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_T = TypeVar("_T")
_MISSING: Any = object()  # an unset ${VAR}: already reported, not to be validated further


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raise ``ConfigError`` listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{line}: not valid YAML: {problem}"]) from None
    return parse({} if data is None else data, os.environ if environ is None else environ)


def parse(data: Any, environ: Mapping[str, str]) -> Config:
    """Validate already-parsed YAML data (a mapping); raise ``ConfigError`` on problems."""
    r = _Reader(environ)
    config = r.config(data)
    if r.problems or config is None:
        raise ConfigError(r.problems or ["configuration is empty"])
    return config


def parse_duration(value: Any) -> float:
    """``250ms``, ``30s``, ``5m``, ``2h``, ``7d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 30s, 5m, 2h, 7d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("must be greater than zero")
    return seconds


class _Reader:
    """Walks the YAML tree, recording problems under their key path instead of stopping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key or '(top level)'}: {message}")

    # scalars

    def expand(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value

        missing: list[str] = []

        def substitute(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            if name not in missing:
                missing.append(name)
            return ""

        expanded = _ENV_RE.sub(substitute, value)
        for name in missing:
            self.fail(key, f"environment variable {name} is not set")
        return _MISSING if missing else expanded

    def string(self, key: str, value: Any, *, allow_empty: bool = False) -> str | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(key, f"expected a string, got {_kind(value)}")
            return None
        text = str(value)
        if not text and not allow_empty:
            self.fail(key, "must not be empty")
            return None
        return text

    def duration(self, key: str, value: Any) -> float | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
            return None

    def section(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {_kind(value)}")
            return None
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                self.fail(where, f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def items(self, key: str, value: Any) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {_kind(value)}")
            return None
        return value

    def optional(self, key: str, section: dict[str, Any], name: str,
                 read: Callable[[str, Any], _T | None], default: _T) -> _T | None:
        if section.get(name) is None:
            return default
        return read(f"{key}.{name}" if key else name, section[name])

    # sections

    def config(self, data: Any) -> Config | None:
        top = self.section("", data, ("listen", "redis", "wechat", "apps", "session", "auth",
                                      "identity_headers", "routes", "shutdown_grace",
                                      "trusted_proxies"))
        if top is None:
            return None
        listen = self.listen("0.0.0.0:8080" if top.get("listen") is None else top["listen"])
        redis_ = self.redis(top.get("redis"))
        wechat = self.wechat(top.get("wechat"))
        apps = self.apps(top.get("apps"))
        session = self.session(top.get("session"))
        auth = self.auth(top.get("auth"))
        prefix, rate_limit = auth if auth is not None else (None, None)
        headers = self.identity_headers(top.get("identity_headers"))
        routes = self.routes(top.get("routes"), prefix, apps)
        grace = self.optional("", top, "shutdown_grace", self.duration, 10.0)
        proxies = self.networks("trusted_proxies", top.get("trusted_proxies"))
        if (listen is None or redis_ is None or wechat is None or apps is None
                or session is None or prefix is None or headers is None or routes is None
                or grace is None or proxies is None or rate_limit is None or self.problems):
            return None
        return Config(listen[0], listen[1], redis_, wechat, apps, session, prefix, headers,
                      routes, grace, proxies, rate_limit)

    def networks(self, key: str, value: Any) -> tuple[IPNetwork, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        networks: list[IPNetwork] = []
        for i, item in enumerate(items):
            text = self.string(f"{key}[{i}]", item)
            if text is None:
                continue
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(f"{key}[{i}]", f"{text!r} is not an IP address or CIDR network "
                                         "(e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)")
        return tuple(networks)

    def boolean(self, key: str, value: Any) -> bool | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        self.fail(key, f"expected true or false, got {value!r}")
        return None

    def listen(self, value: Any) -> tuple[str, int] | None:
        text = self.string("listen", value)
        if text is None:
            return None
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail("listen", f"expected host:port (e.g. 0.0.0.0:8080), got {text!r}")
            return None
        return host, int(port)

    def redis(self, value: Any) -> RedisConfig | None:
        s = self.section("redis", value, ("url", "key_prefix", "timeout"))
        if s is None:
            return None
        if s.get("url") is None:
            self.fail("redis.url", "is required (redis://, rediss:// or unix://)")
            return None
        url = self.string("redis.url", s["url"])
        if url is not None and URL(url).scheme not in ("redis", "rediss", "unix"):
            self.fail("redis.url", "must start with redis://, rediss:// or unix://")
            url = None
        prefix = self.optional("redis", s, "key_prefix", self.string, "wxgw:")
        timeout = self.optional("redis", s, "timeout", self.duration, 1.0)
        if url is None or prefix is None or timeout is None:
            return None
        return RedisConfig(url, prefix, timeout)

    def wechat(self, value: Any) -> WeChatConfig | None:
        s = self.section("wechat", value, ("api_base", "timeout"))
        if s is None:
            return None
        base = self.optional("wechat", s, "api_base", self.string, "https://api.weixin.qq.com")
        timeout = self.optional("wechat", s, "timeout", self.duration, 5.0)
        url = _http_url(self, "wechat.api_base", base) if base is not None else None
        if url is None or timeout is None:
            return None
        return WeChatConfig(url, timeout)

    def apps(self, value: Any) -> tuple[App, ...] | None:
        items = self.items("apps", value)
        if items is None:
            return None
        if not items:
            self.fail("apps", "at least one mini-program (appid and secret) is required")
            return None
        apps: list[App] = []
        for i, item in enumerate(items):
            key = f"apps[{i}]"
            s = self.section(key, item, ("appid", "secret"))
            if s is None:
                continue
            appid = self.string(f"{key}.appid", s.get("appid"))
            secret = self.string(f"{key}.secret", s.get("secret"))
            if appid is not None and not _APPID_RE.match(appid):
                self.fail(f"{key}.appid", "must be letters, digits, '_' or '-' (e.g. wx1234567890abcdef)")
            elif appid is not None and any(a.appid == appid for a in apps):
                self.fail(f"{key}.appid", f"duplicate appid {appid!r}")
            elif appid is not None and secret is not None:
                apps.append(App(appid, secret))
        return tuple(apps)

    def session(self, value: Any) -> SessionConfig | None:
        s = self.section("session", value, ("signing_keys", "ttl", "store_phone"))
        if s is None:
            return None
        items = self.items("session.signing_keys", s.get("signing_keys"))
        keys: list[bytes] = []
        if items is not None and not items:
            self.fail("session.signing_keys", "at least one signing key is required")
        for i, item in enumerate(items or []):
            key = f"session.signing_keys[{i}]"
            text = self.string(key, item)
            if text is None:
                continue
            raw = text.encode("utf-8")
            if len(raw) < MIN_SIGNING_KEY_BYTES:
                self.fail(key, f"must be at least {MIN_SIGNING_KEY_BYTES} bytes, got {len(raw)}")
            elif raw in keys:
                self.fail(key, "duplicate signing key")
            else:
                keys.append(raw)
        ttl = self.optional("session", s, "ttl", self.duration, 7 * 86400.0)
        store_phone = self.optional("session", s, "store_phone", self.boolean, False)
        if not keys or ttl is None or store_phone is None:
            return None
        return SessionConfig(tuple(keys), ttl, store_phone)

    def auth(self, value: Any) -> tuple[str, RateLimit] | None:
        s = self.section("auth", value, ("prefix", "rate_limit"))
        if s is None:
            return None
        prefix = self.optional("auth", s, "prefix", self.string, "/auth")
        rate_limit = self.rate_limit(s.get("rate_limit"))
        if prefix is None or rate_limit is None:
            return None
        normal = _route_path(prefix)
        if normal is None or normal == "/":
            self.fail("auth.prefix", f"must be a path like /auth, got {prefix!r}")
            return None
        return normal, rate_limit

    def rate_limit(self, value: Any) -> RateLimit | None:
        key = "auth.rate_limit"
        s = self.section(key, value, ("ip_limit", "ip_window", "app_limit", "app_window",
                                      "max_retries", "find_time", "ban_time"))
        if s is None:
            return None
        d = RateLimit()
        values = {name: self.optional(key, s, name, self.count, getattr(d, name))
                  for name in ("ip_limit", "app_limit", "max_retries")}
        values |= {name: self.optional(key, s, name, self.duration, getattr(d, name))
                   for name in ("ip_window", "app_window", "find_time", "ban_time")}
        if any(v is None for v in values.values()):
            return None
        return RateLimit(**values)  # type: ignore[arg-type]

    def count(self, key: str, value: Any) -> int | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(key, f"expected a whole number >= 0, got {value!r}")
            return None
        return value

    def identity_headers(self, value: Any) -> IdentityHeaders | None:
        s = self.section("identity_headers", value, ("openid", "unionid", "appid", "phone"))
        if s is None:
            return None
        default = IdentityHeaders()
        names: dict[str, str] = {}
        for name in ("openid", "unionid", "appid", "phone"):
            key = f"identity_headers.{name}"
            text = self.optional("identity_headers", s, name, self.string, getattr(default, name))
            if text is None:
                continue
            if not _HEADER_NAME_RE.match(text):
                self.fail(key, f"{text!r} is not a valid HTTP header name")
            elif text.lower() in {n.lower() for n in names.values()}:
                self.fail(key, f"{text!r} is already used for another identity header")
            elif text.lower() in ("authorization", "host", "cookie", "content-length",
                                  "transfer-encoding", "connection"):
                self.fail(key, f"{text!r} is reserved")
            else:
                names[name] = text
        if len(names) != 4:
            return None
        return IdentityHeaders(**names)

    def routes(self, value: Any, auth_prefix: str | None,
               apps: tuple[App, ...] | None) -> tuple[Route, ...] | None:
        items = self.items("routes", value)
        if items is None:
            return None
        routes: list[Route] = []
        reserved = set(GATEWAY_PATHS)
        if auth_prefix is not None:
            reserved |= {f"{auth_prefix}/{name}" for name in AUTH_ENDPOINTS}
        for i, item in enumerate(items):
            key = f"routes[{i}]"
            s = self.section(key, item, ("path", "upstream", "auth", "timeout",
                                         "connect_timeout", "preserve_host", "apps"))
            if s is None:
                continue
            raw_path = self.string(f"{key}.path", s.get("path"))
            path = _route_path(raw_path) if raw_path is not None else None
            if raw_path is not None and path is None:
                self.fail(f"{key}.path", f"must be an absolute path without '.', '..', '//', "
                                         f"'%', '\\\\' or '?', got {raw_path!r}")
            elif path is not None and path in reserved:
                self.fail(f"{key}.path", f"{path!r} is one of the gateway's own endpoints")
                path = None
            elif path is not None and any(r.path == path for r in routes):
                self.fail(f"{key}.path", f"duplicate route path {path!r}")
                path = None
            upstream = self.string(f"{key}.upstream", s.get("upstream"))
            url = _http_url(self, f"{key}.upstream", upstream) if upstream is not None else None
            auth = self.optional(key, s, "auth", self.string, "required")
            if auth is not None and auth not in AUTH_MODES:
                self.fail(f"{key}.auth", f"must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
                auth = None
            timeout = self.optional(key, s, "timeout", self.duration, 30.0)
            connect = self.optional(key, s, "connect_timeout", self.duration, 5.0)
            preserve_host = self.optional(key, s, "preserve_host", self.boolean, False)
            only = self.route_apps(f"{key}.apps", s.get("apps"), apps)
            if (path is None or url is None or auth is None or timeout is None
                    or connect is None or preserve_host is None or only is None):
                continue
            origin = str(url.with_path("").with_query(None)).rstrip("/")
            routes.append(Route(path, url, origin, url.path.rstrip("/"), auth, timeout,
                                min(connect, timeout), preserve_host, only))
        return tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))

    def route_apps(self, key: str, value: Any, apps: tuple[App, ...] | None) -> tuple[str, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        known = {a.appid for a in apps or ()}
        only: list[str] = []
        for i, item in enumerate(items):
            appid = self.string(f"{key}[{i}]", item)
            if appid is not None and apps is not None and appid not in known:
                self.fail(f"{key}[{i}]", f"appid {appid!r} is not one of the configured apps")
            elif appid is not None:
                only.append(appid)
        return tuple(only)


def _route_path(text: str) -> str | None:
    """Normalise a configured path prefix; None when it is not a plain absolute path."""
    if not text.startswith("/") or any(c in text for c in "%\\?#\x00") or text.startswith("//"):
        return None
    trimmed = text.rstrip("/") or "/"
    segments = trimmed.split("/")[1:]
    if trimmed != "/" and any(seg in ("", ".", "..") for seg in segments):
        return None
    return trimmed


def _http_url(r: _Reader, key: str, text: str) -> URL | None:
    try:
        url = URL(text)
    except ValueError as exc:
        r.fail(key, f"not a valid URL: {exc}")
        return None
    if url.scheme not in ("http", "https") or not url.host:
        r.fail(key, f"must be an http:// or https:// URL with a host, got {text!r}")
    elif url.user is not None or url.password is not None:
        r.fail(key, "must not contain credentials")
    elif url.query_string or url.fragment:
        r.fail(key, "must not contain a query string or fragment")
    else:
        try:
            port = url.port
        except ValueError:
            port = None
        if port is None or not 0 < port < 65536:
            r.fail(key, f"invalid port in {text!r}")
            return None
        return url
    return None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__)
