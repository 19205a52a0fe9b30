"""The gateway's configuration, declared once: each key's YAML name, type, default and checks.

``loader.py`` turns a YAML file into these frozen values by walking the fields below: a field's
type says how its value is read (``float``: a duration, ``int``: a count, ``bool``: true or
false, ``str``: a string, ``Literal[...]``: one of its values, a dataclass: a section) and its
default is what an absent key takes. ``option()`` adds what a type cannot say.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import typing
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from yarl import URL

from .keys import ALGORITHMS

AuthMode = Literal["required", "optional", "public"]
# The mini-program platforms a login code may come from: douyin is ByteDance's (Douyin, Toutiao).
Platform = Literal["wechat", "wecom", "qq", "douyin", "alipay"]
PLATFORMS: tuple[Platform, ...] = typing.get_args(Platform)
LogFormat = Literal["text", "json"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AUTH_MODES: tuple[AuthMode, ...] = typing.get_args(AuthMode)
MIN_SIGNING_KEY_BYTES = 32
MAX_CONNECTIONS = 1_000_000
GATEWAY_PATHS = ("/healthz", "/readyz", "/metrics", "/.well-known/jwks.json")
AUTH_ENDPOINTS = ("login", "logout", "refresh", "session", "verify", "phone", "decrypt",
                  "check-signature")
LOG_LEVELS = ("debug", "info", "warning", "error")

Check = Callable[[Any], "str | None"]  # a problem with an already typed value, or None


def option(default: Any = dataclasses.MISSING, *, yaml: str | None = "", read: str = "",
           part: int | None = None, check: Check | None = None,
           choices: tuple[str, ...] = (), read_default: bool = False,
           restart_only: bool = False, repr: bool = True) -> Any:
    """A field with more than its type says.

    ``yaml``: its key when not the field's name (``auth.prefix``: ``prefix`` in the ``auth``
    section; None: derived, not read); ``read``: the name of the loader's reader for it (given
    the key path, the raw value, the fields read before it and the enclosing section's);
    ``part``: which item of that reader's tuple it takes, when one key fills several fields;
    ``check``: a problem with the typed value; ``choices``: the values allowed;
    ``read_default``: its reader reads the default too when the key is absent (a default may
    clash with what was configured before it, e.g. two identity headers of one name);
    ``restart_only``: a running process cannot apply a change to it.
    """
    metadata = {"yaml": yaml, "read": read, "part": part, "check": check, "choices": choices,
                "read_default": read_default, "restart_only": restart_only}
    return field(default=default, repr=repr, metadata=metadata)


def yaml_name(f: dataclasses.Field[Any]) -> str | None:
    """The field's key path in YAML (None: not read from YAML)."""
    name = f.metadata.get("yaml", "")
    return f.name if name == "" else name


_APPID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" lets a final newline through


def _appid(appid: str) -> str | None:
    return (None if _APPID.match(appid)
            else "must be letters, digits, '_' or '-' (e.g. wx1234567890abcdef)")


def _max_connections(n: int) -> str | None:
    return (None if 1 <= n <= MAX_CONNECTIONS
            else f"expected a number from 1 to {MAX_CONNECTIONS}, got {n}")


@dataclass(frozen=True, slots=True)
class RedisConfig:
    # may carry a password; with sentinels: db and password only
    url: str = option(read="redis_url", repr=False)
    key_prefix: str = "wxgw:"
    timeout: float = 1.0
    sentinels: tuple[tuple[str, int], ...] = option((), read="addresses")
    service_name: str = "mymaster"
    cluster: bool = False


@dataclass(frozen=True, slots=True)
class WeChatConfig:
    api_base: URL = URL("https://api.weixin.qq.com")
    timeout: float = 5.0
    force_refresh: bool = True  # may revoke a token WeChat rejects but keeps handing out


@dataclass(frozen=True, slots=True)
class LoginHookConfig:
    """The app's own user directory, asked on login (and on refresh, once its answer is older
    than ``refresh_after``) for the user's id, roles and claims, or a ban."""

    url: URL = option()
    timeout: float = 2.0
    refresh_after: float = 3600.0


@dataclass(frozen=True, slots=True)
class App:
    appid: str = option(check=_appid)
    # required on every platform but alipay, whose apps sign with private_key instead
    secret: str = option("", repr=False)
    platform: Platform = "wechat"
    # the platform's server API; None: its public host (wechat: wechat.api_base)
    api_base: URL | None = None
    # WeCom: the corp whose access token exchanges the login code
    corpid: str | None = None
    # Alipay: the app's RSA2 private key that signs requests, and Alipay's public key (支付宝公钥)
    # its replies are verified with; each a PEM or bare base64 key, or a file holding one
    private_key: str | None = option(None, read="alipay_private_key", repr=False)
    alipay_public_key: str | None = option(None, read="alipay_public_key")


@dataclass(frozen=True, slots=True)
class SessionConfig:
    signing_keys: tuple[bytes, ...] = option(read="signing_keys", repr=False)
    ttl: float = 7 * 86400.0
    store_phone: bool = False
    # verified sessions kept in each process; 0 turns the cache off
    cache_size: int = option(100_000, restart_only=True)


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
    header: str = option("X-WX-Assertion", read="assertion_header", read_default=True)
    algorithm: str = option("ES256", choices=ALGORITHMS)
    ttl: float = 60.0
    issuer: str = "wx-gateway"
    # PEM private keys; the first signs
    keys: tuple[str, ...] = option((), read="private_keys", repr=False)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: LogFormat = "text"
    level: str = option("info", read="log_level")
    log_openid: bool = False  # else only a short keyed hash of it


@dataclass(frozen=True, slots=True)
class TLSConfig:
    """The certificate ``listen_tls`` serves; SIGHUP re-reads the files."""

    cert_file: str = ""  # PEM: the certificate, then its intermediates
    key_file: str = option("", repr=False)  # PEM: its private key, unencrypted

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # host:port of the admin listener; None: no listener
    listen: tuple[str, int] | None = option(None, read="listen", restart_only=True)
    # bearer tokens the admin API accepts (each at least MIN_SIGNING_KEY_BYTES)
    tokens: tuple[bytes, ...] = option((), read="admin_tokens", read_default=True, repr=False)


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    openid: str = option("X-WX-OpenID", read="identity_header", read_default=True)
    unionid: str = option("X-WX-UnionID", read="identity_header", read_default=True)
    appid: str = option("X-WX-AppID", read="identity_header", read_default=True)
    phone: str = option("X-WX-Phone", read="identity_header", read_default=True)
    platform: str = option("X-MP-Platform", read="identity_header", read_default=True)
    corpid: str = option("X-WX-CorpID", read="identity_header", read_default=True)
    # The login hook's answer; a clash with the names above matters only with a hook, and
    # is checked with it (a config naming openid X-User-ID stays valid without one).
    user_id: str = option("X-User-ID", read="user_header", read_default=True)
    roles: str = option("X-User-Roles", read="user_header", read_default=True)

    def names(self) -> tuple[str, ...]:
        return (self.openid, self.unionid, self.appid, self.phone, self.platform, self.corpid,
                self.user_id, self.roles)


@dataclass(frozen=True, slots=True)
class Route:
    # normalised: starts with "/", no trailing "/" unless it is "/"
    path: str = option(read="route_path", part=0)
    # the path as configured ("/api/"): what metrics and logs call the route, so operators
    # find their own spelling; one value per route keeps the label set bounded
    label: str = option(yaml="path", read="route_path", part=1)
    # One key, three fields: the upstream as configured; its origin "http://host:port", what
    # the forwarded path is appended to; its base path, "" or "/base" (no trailing slash),
    # prepended to the forwarded path.
    upstream: URL = option(read="upstream", part=0)
    origin: str = option(yaml="upstream", read="upstream", part=1)
    base_path: str = option(yaml="upstream", read="upstream", part=2)
    auth: AuthMode = "required"
    timeout: float | None = None  # bounds the whole exchange when set (nginx has no such bound)
    connect_timeout: float = 5.0
    preserve_host: bool = False
    # when set, only tokens of these appids are accepted
    apps: tuple[str, ...] = option((), read="route_apps")
    # when set, only tokens whose session has one of these roles (from the login hook)
    roles: tuple[str, ...] = option((), read="route_roles")
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


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    # restart_only: what a running process cannot change (its socket, its processes, its Redis
    # connections, its own routes for /auth/*, the size of what it already allocated).
    listen_host: str = option("0.0.0.0", yaml="listen", read="listen", part=0,
                              restart_only=True)
    listen_port: int = option(8080, yaml="listen", read="listen", part=1, restart_only=True)
    # host:port of the HTTPS listener (``tls``'s certificate); None: plain HTTP only
    listen_tls: tuple[str, int] | None = option(None, read="listen_tls", restart_only=True)
    # New files are loaded on SIGHUP (see reload.py); turning HTTPS on or off takes a restart.
    tls: TLSConfig = option(TLSConfig(), read="tls", read_default=True)
    redis: RedisConfig = option(read="redis", restart_only=True)
    wechat: WeChatConfig = WeChatConfig()
    apps: tuple[App, ...] = option(read="apps")
    session: SessionConfig
    auth_prefix: str = option("/auth", yaml="auth.prefix", read="auth_prefix",
                              restart_only=True)
    identity_headers: IdentityHeaders = option(IdentityHeaders(), read_default=True)
    login_hook: LoginHookConfig | None = option(None, read="login_hook")
    routes: tuple[Route, ...] = option((), read="routes")
    shutdown_grace: float = option(10.0, restart_only=True)
    trusted_proxies: tuple[IPNetwork, ...] = option((), read="networks")
    rate_limit: RateLimit = option(RateLimit(), yaml="auth.rate_limit")
    workers: int = option(1, read="workers", restart_only=True)
    logging: LoggingConfig = LoggingConfig()
    identity_assertion: AssertionConfig = option(AssertionConfig(), read="assertion",
                                                 read_default=True)
    # Slow and silent clients, as nginx's directives of the same names (and defaults):
    # the request line and headers, in full
    client_header_timeout: float = option(60.0, restart_only=True)
    # the longest silence between two reads of a body
    client_body_timeout: float = option(60.0, restart_only=True)
    # an idle keep-alive connection; 0: no keep-alive
    keepalive_timeout: float = option(75.0, read="duration_or_zero", restart_only=True)
    # open client connections per process (worker_connections)
    max_connections: int = option(10_000, check=_max_connections, restart_only=True)
    admin: AdminConfig = AdminConfig()
    # Whether some route's path has upper-case (or foldable) characters: then even a
    # lower-case request path may resolve to it in a case-insensitive upstream.
    folds: bool = field(init=False, repr=False, compare=False, default=False)
    # appid → app: looked up on every authenticated request (its platform header)
    by_appid: dict[str, App] = field(init=False, repr=False, compare=False,
                                     default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folds", any(r.folded != r.path for r in self.routes))
        object.__setattr__(self, "by_appid", {a.appid: a for a in self.apps})

    def is_trusted_proxy(self, address: str | None) -> bool:
        if not self.trusted_proxies or not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def app(self, appid: str) -> App | None:
        return self.by_appid.get(appid)

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
