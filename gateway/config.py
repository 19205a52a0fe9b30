"""YAML configuration → a typed, validated, frozen ``Config`` (see ``settings.py``).

Every problem is reported as one ``key.path: message`` line, all of them at once, so an
operator fixes a file in one pass. Nothing reads YAML or the environment after this.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit
from typing import Any, Mapping

import yaml
from redis.connection import parse_url as redis_parse_url
from yarl import URL

from .errors import ConfigError
from .headers import NAME as HEADER_NAME, RESERVED_SPELLINGS, spelling
from .reader import Reader, parse_duration
from .keys import ALGORITHMS, load_private_key
from .settings import (AUTH_ENDPOINTS, AUTH_MODES, GATEWAY_PATHS, MIN_SIGNING_KEY_BYTES, App,
                       AssertionConfig, AuthMode, Config, IdentityHeaders, IPNetwork,
                       LoggingConfig, RateLimit, RedisConfig, Route, SessionConfig,
                       WeChatConfig)

__all__ = ["App", "AuthMode", "Config", "ConfigError", "IdentityHeaders", "IPNetwork", "RateLimit",
           "RedisConfig", "Route", "SessionConfig", "WeChatConfig", "load", "parse",
           "parse_duration"]

_APPID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LEVELS = ("debug", "info", "warning", "error")
MAX_CONNECTIONS = 1_000_000
_ZERO = re.compile(r"^\s*0+(?:\.0*)?\s*(?:ms|s|m|h|d)?\s*$")


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; raise ``ConfigError`` listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration file: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path}{line}: not valid YAML: {problem}"]) from None
    return parse({} if data is None else data, os.environ if environ is None else environ)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (the later would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(data: Any, environ: Mapping[str, str]) -> Config:
    """Validate already-parsed YAML data (a mapping); raise ``ConfigError`` on problems."""
    r = _ConfigReader(environ)
    config = r.config(data)
    if r.problems or config is None:
        raise ConfigError(r.problems or ["configuration is empty"])
    return config


class _ConfigReader(Reader):
    """The gateway's sections, each validated with the generic readers."""

    def config(self, data: Any) -> Config | None:
        top = self.section("", data, ("listen", "redis", "wechat", "apps", "session", "auth",
                                      "identity_headers", "routes", "shutdown_grace",
                                      "trusted_proxies", "workers", "logging",
                                      "identity_assertion", "client_header_timeout",
                                      "client_body_timeout", "keepalive_timeout",
                                      "max_connections"))
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
        workers = self.workers(top.get("workers"))
        logging_ = self.logging(top.get("logging"))
        assertion = self.assertion(top.get("identity_assertion"), headers)
        clients = self.clients(top)
        if (listen is None or redis_ is None or wechat is None or apps is None
                or session is None or prefix is None or headers is None or routes is None
                or grace is None or proxies is None or rate_limit is None or workers is None
                or logging_ is None or assertion is None or clients is None or self.problems):
            return None
        return Config(listen[0], listen[1], redis_, wechat, apps, session, prefix, headers,
                      routes, grace, proxies, rate_limit, workers, logging_, assertion,
                      **clients)

    def clients(self, top: dict[str, Any]) -> dict[str, Any] | None:
        """The limits on slow and silent clients (top-level keys, nginx's names)."""
        d = Config.__dataclass_fields__
        found: dict[str, Any] = {
            name: self.optional("", top, name, self.duration, d[name].default)
            for name in ("client_header_timeout", "client_body_timeout")}
        # 0 turns keep-alive off, as in nginx.
        found["keepalive_timeout"] = self.optional("", top, "keepalive_timeout",
                                                   self.duration_or_zero,
                                                   d["keepalive_timeout"].default)
        cap = found["max_connections"] = self.optional("", top, "max_connections", self.count,
                                                       d["max_connections"].default)
        if cap is not None and not 1 <= cap <= MAX_CONNECTIONS:
            self.fail("max_connections", f"expected a number from 1 to {MAX_CONNECTIONS}, "
                                         f"got {cap}")
            return None
        return None if any(v is None for v in found.values()) else found

    def duration_or_zero(self, key: str, value: Any) -> float | None:
        """A duration, or 0 (which turns the feature off)."""
        if isinstance(value, bool):
            return self.duration(key, value)  # reported as not a duration
        text = self.string(key, value)
        if text is None:
            return None
        return 0.0 if _ZERO.match(text) else self.duration(key, text)

    def assertion(self, value: Any, headers: IdentityHeaders | None) -> AssertionConfig | None:
        key = "identity_assertion"
        s = self.section(key, value, ("enabled", "header", "algorithm", "ttl", "issuer", "keys"))
        if s is None:
            return None
        d = AssertionConfig()
        enabled = self.optional(key, s, "enabled", self.boolean, d.enabled)
        header = self.optional(key, s, "header", self.string, d.header)
        algorithm = self.optional(key, s, "algorithm", self.string, d.algorithm)
        ttl = self.optional(key, s, "ttl", self.duration, d.ttl)
        issuer = self.optional(key, s, "issuer", self.string, d.issuer)
        if header is not None and (not HEADER_NAME.match(header)
                                   or spelling(header) in RESERVED_SPELLINGS
                                   or spelling(header) in {spelling(n) for n in (
                                       headers.names() if headers else ())}):
            self.fail(f"{key}.header", f"{header!r} is not a free, valid header name")
            header = None
        if algorithm is not None and algorithm not in ALGORITHMS:
            self.fail(f"{key}.algorithm", f"must be one of {', '.join(ALGORITHMS)}, "
                                          f"got {algorithm!r}")
            algorithm = None
        keys = self.private_keys(f"{key}.keys", s.get("keys"), algorithm)
        if enabled and not s.get("keys"):
            self.fail(f"{key}.keys", "at least one private key is required when enabled")
        if (enabled is None or header is None or algorithm is None or ttl is None
                or issuer is None or keys is None):
            return None
        return AssertionConfig(enabled, header, algorithm, ttl, issuer, keys)

    def private_keys(self, key: str, value: Any, algorithm: str | None) -> tuple[str, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        keys: list[str] = []
        for i, item in enumerate(items):
            text = self.string(f"{key}[{i}]", item)
            if text is None:
                continue
            if not text.lstrip().startswith("-----BEGIN"):  # a file holding the PEM
                try:
                    text = Path(text).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    self.fail(f"{key}[{i}]", f"neither a PEM key nor a readable file ({exc})")
                    continue
            if algorithm is not None:
                try:
                    load_private_key(text, algorithm)
                except ValueError as exc:
                    self.fail(f"{key}[{i}]", str(exc))
                    continue
            keys.append(text)
        return tuple(keys)

    def logging(self, value: Any) -> LoggingConfig | None:
        s = self.section("logging", value, ("format", "level", "log_openid"))
        if s is None:
            return None
        fmt = self.optional("logging", s, "format", self.string, "text")
        level = self.optional("logging", s, "level", self.string, "info")
        log_openid = self.optional("logging", s, "log_openid", self.boolean, False)
        if fmt is not None and fmt not in ("text", "json"):
            self.fail("logging.format", f"must be text or json, got {fmt!r}")
            fmt = None
        if level is not None and level.lower() not in _LEVELS:
            self.fail("logging.level", f"must be one of {', '.join(_LEVELS)}, got {level!r}")
            level = None
        if fmt is None or level is None or log_openid is None:
            return None
        return LoggingConfig(fmt, level.lower(), log_openid)  # type: ignore[arg-type]

    def workers(self, value: Any) -> int | None:
        if value is None:
            return 1
        if isinstance(value, str) and self.expand("workers", value) == "auto":
            return os.cpu_count() or 1
        count = self.count("workers", value)
        if count is not None and not 1 <= count <= 256:
            self.fail("workers", f"expected auto or a number from 1 to 256, got {count}")
            return None
        return count

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
        s = self.section("redis", value, ("url", "key_prefix", "timeout", "sentinels",
                                          "service_name", "cluster"))
        if s is None:
            return None
        sentinels = self.addresses("redis.sentinels", s.get("sentinels"))
        cluster = self.optional("redis", s, "cluster", self.boolean, False)
        service = self.optional("redis", s, "service_name", self.string, "mymaster")
        if sentinels and cluster:
            self.fail("redis.cluster", "cannot be combined with redis.sentinels")
            return None
        if sentinels and str(s.get("url", "")).startswith("rediss://"):
            # The primary is found through the sentinels; TLS to it is not supported (yet),
            # and a password must not silently cross the network in clear.
            self.fail("redis.url", "rediss:// (TLS) cannot be combined with redis.sentinels")
            return None
        if s.get("url") is None and sentinels:
            s = {**s, "url": "redis://"}  # sentinels name the servers; no db or password
        if s.get("url") is None:
            self.fail("redis.url", "is required (redis://, rediss:// or unix://), "
                                   "unless redis.sentinels is given")
            return None
        url = self.string("redis.url", s["url"])
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            self.fail("redis.url", "must start with redis://, rediss:// or unix://")
            url = None
        elif url is not None:
            try:
                redis_parse_url(url)  # type: ignore[no-untyped-call]  # as at start-up
            except (ValueError, TypeError) as exc:
                self.fail("redis.url", f"not a usable Redis URL: {_without_secrets(str(exc))}")
                url = None
        prefix = self.optional("redis", s, "key_prefix", self.string, "wxgw:")
        timeout = self.optional("redis", s, "timeout", self.duration, 1.0)
        if (url is None or prefix is None or timeout is None or sentinels is None
                or cluster is None or service is None):
            return None
        return RedisConfig(url, prefix, timeout, sentinels, service, cluster)

    def addresses(self, key: str, value: Any) -> tuple[tuple[str, int], ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        found: list[tuple[str, int]] = []
        for i, item in enumerate(items):
            text = self.string(f"{key}[{i}]", item)
            host, _, port = (text or "").rpartition(":")
            if text is not None and (not host or not port.isdigit()
                                     or not 0 < int(port) < 65536):
                self.fail(f"{key}[{i}]", f"expected host:port, got {text!r}")
            elif text is not None:
                found.append((host.strip("[]"), int(port)))
        return tuple(found)

    def wechat(self, value: Any) -> WeChatConfig | None:
        s = self.section("wechat", value, ("api_base", "timeout", "force_refresh"))
        if s is None:
            return None
        base = self.optional("wechat", s, "api_base", self.string, "https://api.weixin.qq.com")
        timeout = self.optional("wechat", s, "timeout", self.duration, 5.0)
        force = self.optional("wechat", s, "force_refresh", self.boolean, True)
        url = _http_url(self, "wechat.api_base", base) if base is not None else None
        if url is None or timeout is None or force is None:
            return None
        return WeChatConfig(url, timeout, force)

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
        s = self.section("session", value, ("signing_keys", "ttl", "store_phone",
                                            "cache_size"))
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
        cache_size = self.optional("session", s, "cache_size", self.count, 100_000)
        if not keys or ttl is None or store_phone is None or cache_size is None:
            return None
        return SessionConfig(tuple(keys), ttl, store_phone, cache_size)

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
            if not HEADER_NAME.match(text):
                self.fail(key, f"{text!r} is not a valid HTTP header name")
            elif spelling(text) in {spelling(n) for n in names.values()}:
                self.fail(key, f"{text!r} is already used for another identity header")
            elif spelling(text) in RESERVED_SPELLINGS:
                self.fail(key, f"{text!r} is a header the gateway or HTTP itself uses")
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
                                         "connect_timeout", "preserve_host", "apps", "audience",
                                         "read_timeout"))
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
            # Absent: no whole-exchange bound (None); present but invalid: also None, so the
            # check below tells the two apart by the key's presence.
            timeout = self.optional(key, s, "timeout", self.duration, 0.0) or None
            connect = self.optional(key, s, "connect_timeout", self.duration, 5.0)
            read = self.optional(key, s, "read_timeout", self.duration, 60.0)
            preserve_host = self.optional(key, s, "preserve_host", self.boolean, False)
            only = self.route_apps(f"{key}.apps", s.get("apps"), apps)
            audience = self.optional(key, s, "audience", self.string, "")
            if (path is None or url is None or auth is None
                    or (timeout is None and s.get("timeout") is not None)
                    or connect is None or read is None or preserve_host is None or only is None
                    or audience is None):
                continue
            base = _base_path(self, f"{key}.upstream", url, upstream or "")
            if base is None:
                continue
            origin = str(url.with_path("").with_query(None)).rstrip("/")
            if timeout is not None:  # no phase may outlast the whole exchange
                connect, read = min(connect, timeout), min(read, timeout)
            routes.append(Route(path, url, origin, base, auth, timeout, connect, preserve_host,
                                only, audience or None, read))
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


def _base_path(r: Reader, key: str, url: URL, text: str) -> str | None:
    """The upstream's base path exactly as written (still percent-encoded), if it is plain."""
    raw = url.raw_path.rstrip("/")
    # yarl resolves "a/../b" itself; look at what was written too.
    segments = raw.split("/")[1:] + urlsplit(text).path.rstrip("/").split("/")[1:]
    if (not raw.isascii() or any(c in raw for c in " \\%")
            or any(seg in ("", ".", "..") for seg in segments)):
        r.fail(key, "the base path must be plain ASCII segments, without '.', '..', '//', "
                    "'%' escapes or spaces")
        return None
    return raw


def _without_secrets(text: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//***@", text)


def _http_url(r: Reader, key: str, text: str) -> URL | None:
    try:
        url = URL(text)
    except ValueError as exc:
        r.fail(key, f"not a valid URL: {_without_secrets(str(exc))}")
        return None
    if url.scheme not in ("http", "https") or not url.host:
        r.fail(key, "must be an http:// or https:// URL with a host, "
                    f"got {_without_secrets(text)!r}")
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
            r.fail(key, f"invalid port in {_without_secrets(text)!r}")
            return None
        return url
    return None
