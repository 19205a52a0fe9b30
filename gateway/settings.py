"""The gateway's configuration as typed, frozen values (built by ``config.parse``)."""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from yarl import URL

AuthMode = Literal["required", "optional", "public"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AUTH_MODES: tuple[AuthMode, ...] = ("required", "optional", "public")
MIN_SIGNING_KEY_BYTES = 32
GATEWAY_PATHS = ("/healthz", "/readyz", "/metrics", "/.well-known/jwks.json")
AUTH_ENDPOINTS = ("login", "logout", "refresh", "session", "verify", "phone", "decrypt",
                  "check-signature")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = field(repr=False)  # may carry a password; with sentinels: db and password only
    key_prefix: str = "wxgw:"
    timeout: float = 1.0
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = "mymaster"
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class WeChatConfig:
    api_base: URL = URL("https://api.weixin.qq.com")
    timeout: float = 5.0
    force_refresh: bool = True  # may revoke a token WeChat rejects but keeps handing out


@dataclass(frozen=True, slots=True)
class App:
    appid: str
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    signing_keys: tuple[bytes, ...] = field(repr=False)
    ttl: float = 7 * 86400.0
    store_phone: bool = False
    cache_size: int = 100_000  # verified sessions kept in each process; 0 turns the cache off


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
class AssertionConfig:
    enabled: bool = False
    header: str = "X-WX-Assertion"
    algorithm: str = "ES256"
    ttl: float = 60.0
    issuer: str = "wx-gateway"
    keys: tuple[str, ...] = field(default=(), repr=False)  # PEM private keys; the first signs


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: Literal["text", "json"] = "text"
    level: str = "info"
    log_openid: bool = False  # else only a short keyed hash of it


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
    timeout: float | None = None  # bounds the whole exchange when set (nginx has no such bound)
    connect_timeout: float = 5.0
    preserve_host: bool = False
    apps: tuple[str, ...] = ()  # when set, only tokens of these appids are accepted
    audience: str | None = None  # the identity assertion's aud; None: the upstream's origin
    # The longest silence while waiting for or reading the answer (nginx's proxy_read_timeout):
    # a stream lives as long as data keeps coming.
    read_timeout: float = 60.0
    # ``path`` as case-insensitive routers compare it, computed once per configuration
    folded: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded", fold(self.path))

    def matches(self, path: str) -> bool:
        return self.path == "/" or path == self.path or path.startswith(self.path + "/")

    def matches_folded(self, folded: str) -> bool:
        """``matches`` for a path already passed through ``fold``."""
        return (self.folded == "/" or folded == self.folded
                or folded.startswith(self.folded + "/"))


def fold(text: str) -> str:
    """Case-folded the way case-insensitive servers compare: upper- then lower-casing maps
    the look-alikes that fold onto ASCII (dotless ``ı``, long ``ſ``, the Kelvin sign) too, and
    NFKC the compatibility forms (full-width letters) that best-fit decoders turn into ASCII."""
    if text.isascii():
        return text.lower()
    return unicodedata.normalize("NFKC", text).upper().lower()


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
    workers: int = 1
    logging: LoggingConfig = LoggingConfig()
    identity_assertion: AssertionConfig = AssertionConfig()
    # Slow and silent clients, as nginx's directives of the same names (and defaults):
    client_header_timeout: float = 60.0  # the request line and headers, in full
    client_body_timeout: float = 60.0  # the longest silence between two reads of a body
    keepalive_timeout: float = 75.0  # an idle keep-alive connection; 0: no keep-alive
    max_connections: int = 10_000  # open client connections per process (worker_connections)
    # Whether some route's path has upper-case (or foldable) characters: then even a
    # lower-case request path may resolve to it in a case-insensitive upstream.
    folds: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folds", any(r.folded != r.path for r in self.routes))

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

    def routes_matching(self, path: str) -> list[Route]:
        """Every route ``path`` could be routed to: its longest-prefix route compared exactly
        and compared case-insensitively (where routes differing only in case tie, all of them)."""
        found = []
        folded = fold(path)
        # with every route path already folded, a folded path's exact match is among the below
        exact = None if folded == path and not self.folds else self.route_for(path)
        if exact is not None:
            found.append(exact)
        matching = [r for r in self.routes if r.matches_folded(folded)]
        if matching:
            # the longest once folded (NFKC may change a non-ASCII route path's length)
            best = max(len(r.folded) for r in matching)
            found += [r for r in matching if len(r.folded) == best and r is not exact]
        return found
