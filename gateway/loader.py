"""How a YAML file becomes a ``Config``: the strict YAML loader, ``${VAR}`` expansion,
durations, and a reader that walks the dataclasses of ``config.py`` for keys, types and defaults.

Every problem is reported as one ``key.path: message`` line, all of them at once, so an
operator fixes a file in one pass. Nothing reads YAML or the environment after this.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import ssl
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, NamedTuple
from urllib.parse import urlsplit

import yaml
from redis.connection import parse_url as redis_parse_url
from yarl import URL

from .config import (AUTH_ENDPOINTS, GATEWAY_PATHS, LOG_LEVELS, MIN_SIGNING_KEY_BYTES, App,
                     AssertionConfig, Config, IdentityHeaders, IPNetwork, LoginHookConfig,
                     RedisConfig, Route, TLSConfig, yaml_name)
from .errors import ConfigError
from .headers import (CLAIM_SPELLING, MAX_ROLE, NAME as HEADER_NAME, RESERVED_SPELLINGS,
                      spelling, valid_role)
from .keys import load_private_key, load_rsa_private_key, load_rsa_public_key
from .tls import server_context

__all__ = ["ConfigError", "load", "parse", "parse_duration"]

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
MAX_DURATION = 365 * 86400.0
_ZERO = re.compile(r"^\s*0+(?:\.0*)?\s*(?:ms|s|m|h|d)?\s*$")
# a bare base64 DER key as Alipay's console shows it: a DER SEQUENCE's base64 starts "MI"
_BASE64_KEY = re.compile(r"\s*MI[A-Za-z0-9+/=\s]{100,}")
_MISSING: Any = object()  # an unset ${VAR}: already reported, not to be validated further


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
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_DURATION:
        raise ValueError("must be greater than zero and at most 365d")
    return seconds


class Reader:
    """Walks the YAML tree, recording problems under their key path instead of stopping.

    Each reader returns the value, or None after recording why there is none.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key or '(top level)'}: {message}")

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
        if value is None:  # absent, or `key:` with nothing after it
            self.fail(key, "is required")
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

    def strings(self, key: str, items: list[Any]) -> Iterator[tuple[str, str]]:
        """Each item of a list that is a string, with its key path (``key[i]``); the others
        are reported."""
        for i, item in enumerate(items):
            text = self.string(f"{key}[{i}]", item)
            if text is not None:
                yield f"{key}[{i}]", text

    def secret(self, key: str, text: str) -> bytes | None:
        """A signing key or admin token: at least MIN_SIGNING_KEY_BYTES of UTF-8."""
        raw = text.encode("utf-8")
        if len(raw) < MIN_SIGNING_KEY_BYTES:
            self.fail(key, f"must be at least {MIN_SIGNING_KEY_BYTES} bytes, got {len(raw)}")
            return None
        return raw

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
        line = f":{where.line + 1}" if where is not None else ""
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


class Context(NamedTuple):
    """What a field's own reader may consult: the fields of its section read before it, and
    those of the enclosing section (read before the section itself)."""

    found: Mapping[str, Any]
    parent: Mapping[str, Any]


_Declared = tuple[list[dataclasses.Field[Any]], list[str], dict[str, Any]]
_DECLARED: dict[type[Any], _Declared] = {}


def _declared(cls: type[Any]) -> _Declared:
    """The fields of ``cls`` read from YAML, their key paths and their resolved types (once:
    resolving the annotations dominates reading a long list of routes)."""
    if cls not in _DECLARED:
        fields = [f for f in dataclasses.fields(cls) if f.init and yaml_name(f) is not None]
        _DECLARED[cls] = (fields, [yaml_name(f) or "" for f in fields],
                          typing.get_type_hints(cls))
    return _DECLARED[cls]


_TYPED: dict[Any, str] = {float: "duration", int: "count", bool: "boolean", str: "string"}


class _ConfigReader(Reader):
    """The generic walk over the declaration, and the readers of fields that name one."""

    def read(self, key: str, value: Any, cls: type[Any],
             parent: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The fields of dataclass ``cls`` read from the section ``value`` at ``key``: each
        absent key takes its field's default, each present one is read by its type (or its
        own reader) and checked; None once any problem was recorded here."""
        if isinstance(value, cls):  # a section's default: every key at its own default
            value = None
        fields, names, hints = _declared(cls)
        s = self.section(key, value, tuple(dict.fromkeys(n.partition(".")[0] for n in names)))
        if s is None:
            return None
        before = len(self.problems)
        found: dict[str, Any] = {}
        inner: dict[str, dict[str, Any] | None] = {}
        results: dict[str, Any] = {}  # one key's reader result, when it fills several fields
        for f, name in zip(fields, names):
            where = f"{key}.{name}" if key else name
            head, _, rest = name.partition(".")
            if rest:  # a key of a sub-section, such as auth.prefix
                if head not in inner:
                    allowed = tuple(dict.fromkeys(n.partition(".")[2] for n in names
                                                  if n.partition(".")[0] == head))
                    inner[head] = self.section(f"{key}.{head}" if key else head, s.get(head),
                                               allowed)
                section = inner[head]
                if section is None:
                    continue
                raw = section.get(rest)
            else:
                raw = s.get(name)
            if raw is None and f.default is not dataclasses.MISSING:
                if not f.metadata.get("read_default"):
                    found[f.name] = f.default
                    continue
                raw = f.default
            count = len(self.problems)
            own = f.metadata.get("read")
            if own:
                if name not in results:
                    read: Callable[[str, Any, Context], Any] = getattr(self, own)
                    results[name] = read(where, raw, Context(found, parent or {}))
                got = results[name]
                part = f.metadata.get("part")
                got = got[part] if got is not None and part is not None else got
            else:
                got = self.typed(where, raw, hints[f.name], found)
            if len(self.problems) > count:
                continue
            choices = f.metadata.get("choices") or ()
            check = f.metadata.get("check")
            if choices and got not in choices:
                self.fail(where, f"must be {_one_of(choices)}, got {got!r}")
            elif check is not None and (problem := check(got)) is not None:
                self.fail(where, problem)
            else:
                found[f.name] = got
        return None if len(self.problems) > before else found

    def typed(self, key: str, value: Any, hint: Any, found: Mapping[str, Any]) -> Any:
        """``value`` read by the field's type."""
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is not Literal and len(args) == 1:  # X | None
            hint = args[0]
        if typing.get_origin(hint) is Literal:
            text = self.string(key, value)
            if text is not None and text not in typing.get_args(hint):
                self.fail(key, f"must be {_one_of(typing.get_args(hint))}, got {text!r}")
                return None
            return text
        if hint is URL:
            text = self.string(key, value)
            return None if text is None else _http_url(self, key, text)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            values = self.read(key, value, hint, found)
            return None if values is None else hint(**values)
        reader: Callable[[str, Any], Any] = getattr(self, _TYPED[hint])
        return reader(key, value)

    def config(self, data: Any) -> Config | None:
        values = self.read("", data, Config)
        return None if values is None or self.problems else Config(**values)

    def listen(self, key: str, value: Any, _: Context) -> tuple[str, int] | None:
        text = self.string(key, value)
        if text is None:
            return None
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(key, f"expected host:port (e.g. 0.0.0.0:8080), got {text!r}")
            return None
        return host, int(port)

    def workers(self, key: str, value: Any, _: Context) -> int | None:
        if isinstance(value, str) and self.expand(key, value) == "auto":
            return os.cpu_count() or 1
        count = self.count(key, value)
        if count is not None and not 1 <= count <= 256:
            self.fail(key, f"expected auto or a number from 1 to 256, got {count}")
            return None
        return count

    def duration_or_zero(self, key: str, value: Any, _: Context) -> float | None:
        """A duration, or 0 (which turns the feature off)."""
        if isinstance(value, bool):
            return self.duration(key, value)  # reported as not a duration
        text = self.string(key, value)
        if text is None:
            return None
        return 0.0 if _ZERO.match(text) else self.duration(key, text)

    def networks(self, key: str, value: Any, _: Context) -> tuple[IPNetwork, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        networks: list[IPNetwork] = []
        for where, text in self.strings(key, items):
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(where, f"{text!r} is not an IP address or CIDR network "
                                 "(e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)")
        return tuple(networks)

    def redis(self, key: str, value: Any, context: Context) -> RedisConfig | None:
        values = self.read(key, value, RedisConfig, context.found)
        if values is None:
            return None
        if values["sentinels"] and values["cluster"]:
            self.fail(f"{key}.cluster", f"cannot be combined with {key}.sentinels")
            return None
        if values["sentinels"] and values["url"].startswith("rediss://"):
            # The primary is found through the sentinels; TLS to it is not supported (yet),
            # and a password must not silently cross the network in clear.
            self.fail(f"{key}.url", f"rediss:// (TLS) cannot be combined with {key}.sentinels")
            return None
        if not values["url"] and values["sentinels"]:
            values["url"] = "redis://"  # sentinels name the servers; no db or password
        if not values["url"]:
            self.fail(f"{key}.url", "is required (redis://, rediss:// or unix://), "
                                    f"unless {key}.sentinels is given")
            return None
        return RedisConfig(**values)

    def redis_url(self, key: str, value: Any, _: Context) -> str | None:
        """The URL as written; "" when absent (allowed only with sentinels)."""
        if value is None:
            return ""
        url = self.string(key, value)
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            self.fail(key, "must start with redis://, rediss:// or unix://")
            return None
        if url is not None:
            try:
                redis_parse_url(url)  # type: ignore[no-untyped-call]  # as at start-up
            except (ValueError, TypeError) as exc:
                self.fail(key, f"not a usable Redis URL: {_without_secrets(str(exc))}")
                return None
        return url

    def addresses(self, key: str, value: Any, _: Context) -> tuple[tuple[str, int], ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        found: list[tuple[str, int]] = []
        for where, text in self.strings(key, items):
            host, _sep, port = text.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                self.fail(where, f"expected host:port, got {text!r}")
            else:
                found.append((host.strip("[]"), int(port)))
        return tuple(found)

    def apps(self, key: str, value: Any, context: Context) -> tuple[App, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        if not items:
            self.fail(key, "at least one mini-program (appid and secret) is required")
            return None
        apps: list[App] = []
        for i, item in enumerate(items):
            values = self.read(f"{key}[{i}]", item, App)
            if values is None or not self.platform_keys(f"{key}[{i}]", values):
                continue
            if _is_listen_address(values["api_base"], context.found.get("listen_host"),
                                  context.found.get("listen_port")):
                # its login call would come back in, the secret in its query, and go through
                # a catch-all route to an upstream
                self.fail(f"{key}[{i}].api_base", "is the gateway's own listen address: set "
                                                  "the platform's host, or the simulator's")
                continue
            if any(a.appid == values["appid"] for a in apps):
                self.fail(f"{key}[{i}].appid", f"duplicate appid {values['appid']!r}")
            else:
                apps.append(App(**values))
        return tuple(apps)

    def platform_keys(self, key: str, values: Mapping[str, Any]) -> bool:
        """The keys an app's platform needs are there, and no key of another platform."""
        platform = values["platform"]
        if platform == "wecom" and values["corpid"] is None:
            self.fail(f"{key}.corpid", "is required when platform is wecom")
            return False
        if platform != "wecom" and values["corpid"] is not None:
            self.fail(f"{key}.corpid", f"applies only to platform wecom, not {platform}")
            return False
        if platform == "wecom" and not re.fullmatch(r"[\x21-\x7e]{1,128}", values["corpid"]):
            # WeCom's answer must name this corp, and its name becomes X-WX-CorpID
            self.fail(f"{key}.corpid", "must be 1 to 128 printable ASCII without spaces, as "
                                       "WeCom's admin console shows it (我的企业 → 企业ID)")
            return False
        return self.alipay_keys(key, values)

    def alipay_keys(self, key: str, values: Mapping[str, Any]) -> bool:
        """Alipay apps sign with their own key pair and have no secret; the others need one."""
        platform, keys = values["platform"], ("private_key", "alipay_public_key")
        if platform == "alipay":
            missing = [name for name in keys if values[name] is None]
            for name in missing:
                self.fail(f"{key}.{name}", "is required when platform is alipay")
            if values["secret"]:
                self.fail(f"{key}.secret", "does not apply to platform alipay (its requests "
                                           f"are signed with {key}.private_key)")
                return False
            if not missing and (load_rsa_public_key(values["alipay_public_key"]).public_numbers()
                                == load_rsa_private_key(values["private_key"]).public_key()
                                .public_numbers()):
                # A common mix-up in Alipay's console, which shows both public keys side by
                # side ("应用公钥" and "支付宝公钥"): no reply of Alipay's would then verify.
                self.fail(f"{key}.alipay_public_key", f"is the public half of {key}.private_key "
                          "(the app's own key): use Alipay's public key (支付宝公钥) from "
                          "the console")
                return False
            return not missing
        if not values["secret"]:
            self.fail(f"{key}.secret", "is required")
            return False
        if not values["secret"].isprintable() or " " in values["secret"]:
            # never echoed; typically the newline a secret file ends with
            self.fail(f"{key}.secret", "has a space or control character; no platform's "
                                       "secret does (a newline from the file it was read from?)")
            return False
        given = [name for name in keys if values[name] is not None]
        for name in given:
            self.fail(f"{key}.{name}", f"applies only to platform alipay, not {platform}")
        return not given

    def signing_keys(self, key: str, value: Any, _: Context) -> tuple[bytes, ...] | None:
        items = self.items(key, value)
        keys: list[bytes] = []
        if items is not None and not items:
            self.fail(key, "at least one signing key is required")
        for where, text in self.strings(key, items or []):
            raw = self.secret(where, text)
            if raw is None:
                continue
            if raw in keys:
                self.fail(where, "duplicate signing key")
            else:
                keys.append(raw)
        return tuple(keys) if keys else None

    def admin_tokens(self, key: str, value: Any, context: Context) -> tuple[bytes, ...] | None:
        items = self.items(key, None if value == () else value)  # (): absent, the default
        if items is None:
            return None
        listen = context.found.get("listen")
        if listen is not None and listen == (context.parent.get("listen_host"),
                                             context.parent.get("listen_port")):
            self.fail(key.rpartition(".")[0] + ".listen", "must not be the main listen address")
            return None
        if listen is not None and not items:
            self.fail(key, "at least one token is required when admin.listen is set")
            return None
        tokens: list[bytes] = []
        for where, text in self.strings(key, items):
            raw = self.secret(where, text)
            if raw is not None:
                tokens.append(raw)
        return tuple(tokens)

    def auth_prefix(self, key: str, value: Any, _: Context) -> str | None:
        prefix = self.string(key, value)
        if prefix is None:
            return None
        normal = _route_path(prefix)
        if normal is None or normal == "/":
            self.fail(key, f"must be a path like /auth, got {prefix!r}")
            return None
        return normal

    def identity_header(self, key: str, value: Any, context: Context) -> str | None:
        text = self.string(key, value)
        if text is None:
            return None
        if not HEADER_NAME.match(text):
            self.fail(key, f"{text!r} is not a valid HTTP header name")
        elif spelling(text) in {spelling(n) for n in context.found.values()}:
            self.fail(key, f"{text!r} is already used for another identity header")
        elif spelling(text) in RESERVED_SPELLINGS:
            self.fail(key, f"{text!r} is a header the gateway or HTTP itself uses")
        elif spelling(text).startswith(CLAIM_SPELLING):
            self.fail(key, f"{text!r} would read as a claim header (X-User-Claim-...)")
        else:
            return text
        return None

    def user_header(self, key: str, value: Any, context: Context) -> str | None:
        """An identity header for the login hook's answer: checked like the others, except
        that a clash is left to ``login_hook`` (it matters only when there is a hook)."""
        return self.identity_header(key, value, Context({}, context.parent))

    def login_hook(self, key: str, value: Any, context: Context) -> LoginHookConfig | None:
        values = self.read(key, value, LoginHookConfig, context.found)
        if values is None:
            return None
        names: IdentityHeaders | None = context.found.get("identity_headers")
        if names is not None:
            spelled = {f.name: spelling(getattr(names, f.name))
                       for f in dataclasses.fields(names)}
            for field_name in ("user_id", "roles"):
                name = getattr(names, field_name)
                if spelled[field_name] in {v for k, v in spelled.items() if k != field_name}:
                    self.fail(f"identity_headers.{field_name}",
                              f"{name!r} is already used for another identity header (the "
                              "login hook's answer needs a header of its own)")
                    return None
        return LoginHookConfig(**values)

    def log_level(self, key: str, value: Any, _: Context) -> str | None:
        level = self.string(key, value)
        if level is not None and level.lower() not in LOG_LEVELS:
            self.fail(key, f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
            return None
        return None if level is None else level.lower()

    def listen_tls(self, key: str, value: Any, context: Context) -> tuple[str, int] | None:
        address = self.listen(key, value, context)
        if address is not None and address == (context.found.get("listen_host"),
                                               context.found.get("listen_port")):
            self.fail(key, "must not be the plain HTTP listen address")
            return None
        return address

    def tls(self, key: str, value: Any, context: Context) -> TLSConfig | None:
        values = (dataclasses.asdict(value) if isinstance(value, TLSConfig)  # absent: default
                  else self.read(key, value, TLSConfig, context.found))
        if values is None:
            return None
        cert, private = values["cert_file"], values["key_file"]
        if bool(cert) != bool(private):
            missing = "key_file" if cert else "cert_file"
            self.fail(f"{key}.{missing}", "is required when tls."
                      f"{'cert_file' if cert else 'key_file'} is set (both or neither)")
            return None
        listening = context.found.get("listen_tls") is not None
        reported = any(p.startswith("listen_tls:") for p in self.problems)  # given, but bad
        if cert and not listening and not reported:
            self.fail("listen_tls", "is required when tls.cert_file is set: the HTTPS "
                                    "listener's host:port (e.g. 0.0.0.0:8443)")
            return None
        if listening and not cert:
            self.fail(f"{key}.cert_file", "is required when listen_tls is set (with "
                                          f"{key}.key_file)")
            return None
        if cert:
            before = len(self.problems)
            for name, path in (("cert_file", cert), ("key_file", private)):
                try:
                    Path(path).read_bytes()
                except OSError as exc:
                    self.fail(f"{key}.{name}", f"cannot read {path!r}: {exc.strerror or exc}")
            if len(self.problems) > before:
                return None
            try:  # what the listener will do with them, so --check catches a broken pair
                server_context(cert, private)
            except ssl.SSLError as exc:
                self.fail(f"{key}.cert_file", f"{cert!r} and {key}.key_file {private!r} are "
                          f"not a PEM certificate chain and its unencrypted private key "
                          f"({exc.reason or exc})")
                return None
        return TLSConfig(**values)

    def assertion(self, key: str, value: Any, context: Context) -> AssertionConfig | None:
        values = self.read(key, value, AssertionConfig, context.found)
        if values is not None and values["enabled"] and not values["keys"]:
            self.fail(f"{key}.keys", "at least one private key is required when enabled")
            return None
        return None if values is None else AssertionConfig(**values)

    def assertion_header(self, key: str, value: Any, context: Context) -> str | None:
        header = self.string(key, value)
        headers: IdentityHeaders | None = context.parent.get("identity_headers")
        if header is not None and (not HEADER_NAME.match(header)
                                   or spelling(header) in RESERVED_SPELLINGS
                                   or spelling(header).startswith(CLAIM_SPELLING)
                                   or spelling(header) in {spelling(n) for n in (
                                       headers.names() if headers else ())}):
            self.fail(key, f"{header!r} is not a free, valid header name")
            return None
        return header

    def private_keys(self, key: str, value: Any, context: Context) -> tuple[str, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        algorithm: str | None = context.found.get("algorithm")
        keys: list[str] = []
        for where, text in self.strings(key, items):
            if not text.lstrip().startswith("-----BEGIN"):  # a file holding the PEM
                try:
                    text = Path(text).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    self.fail(where, f"neither a PEM key nor a readable file ({exc})")
                    continue
            if algorithm is not None:
                try:
                    load_private_key(text, algorithm)
                except ValueError as exc:
                    self.fail(where, str(exc))
                    continue
            keys.append(text)
        return tuple(keys)

    def alipay_private_key(self, key: str, value: Any, _: Context) -> str | None:
        return self.rsa_key(key, value, load_rsa_private_key)

    def alipay_public_key(self, key: str, value: Any, _: Context) -> str | None:
        return self.rsa_key(key, value, load_rsa_public_key)

    def rsa_key(self, key: str, value: Any, load: Callable[[str], object]) -> str | None:
        """A key as Alipay's console shows it (PEM or bare base64), or a file holding one."""
        text = self.string(key, value)
        if text is None:
            return None
        if not text.lstrip().startswith("-----BEGIN") and not _BASE64_KEY.fullmatch(text):
            try:  # a file holding the key
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                # not the exception itself: its file name would be a mis-pasted key's text
                why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                self.fail(key, f"neither a PEM or base64 key nor a readable file ({why})")
                return None
        try:
            load(text)
        except ValueError as exc:
            self.fail(key, str(exc))
            return None
        return text

    def routes(self, key: str, value: Any, context: Context) -> tuple[Route, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        routes: list[Route] = []
        for i, item in enumerate(items):
            values = self.read(f"{key}[{i}]", item, Route, context.found)
            if values is None:
                continue
            if any(r.path == values["path"] for r in routes):
                self.fail(f"{key}[{i}].path", f"duplicate route path {values['path']!r}")
                continue
            timeout = values["timeout"]
            if timeout is not None:  # no phase may outlast the whole exchange
                values["connect_timeout"] = min(values["connect_timeout"], timeout)
                values["read_timeout"] = min(values["read_timeout"], timeout)
            routes.append(Route(**values))
        return tuple(sorted(routes, key=lambda r: len(r.path), reverse=True))

    def route_path(self, key: str, value: Any, context: Context) -> tuple[str, str] | None:
        """The path prefix normalised for matching, and as written for metrics and logs."""
        raw = self.string(key, value)
        path = _route_path(raw) if raw is not None else None
        reserved = set(GATEWAY_PATHS)
        prefix: str | None = context.parent.get("auth_prefix")
        if prefix is not None:
            reserved |= {f"{prefix}/{name}" for name in AUTH_ENDPOINTS}
        if raw is not None and path is None:
            self.fail(key, f"must be an absolute path without '.', '..', '//', "
                           f"'%', '\\\\' or '?', got {raw!r}")
        elif path is not None and path in reserved:
            self.fail(key, f"{path!r} is one of the gateway's own endpoints")
            return None
        return None if path is None or raw is None else (path, raw)

    def upstream(self, key: str, value: Any, _: Context) -> tuple[URL, str, str] | None:
        """The upstream URL, its origin and its base path."""
        text = self.string(key, value)
        url = _http_url(self, key, text) if text is not None else None
        base = _base_path(self, key, url, text or "") if url is not None else None
        if url is None or base is None:
            return None
        return url, str(url.with_path("").with_query(None)).rstrip("/"), base

    def route_apps(self, key: str, value: Any, context: Context) -> tuple[str, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        apps: tuple[App, ...] | None = context.parent.get("apps")
        known = {a.appid for a in apps or ()}
        only: list[str] = []
        for where, appid in self.strings(key, items):
            if apps is not None and appid not in known:
                self.fail(where, f"appid {appid!r} is not one of the configured apps")
            else:
                only.append(appid)
        return tuple(only)

    def route_roles(self, key: str, value: Any, context: Context) -> tuple[str, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        roles: list[str] = []
        for where, role in self.strings(key, items):
            if not valid_role(role):
                self.fail(where, f"{role!r} is not a role name (1 to {MAX_ROLE} "
                                 "printable ASCII characters, no comma)")
            else:
                roles.append(role)
        if roles and context.found.get("auth") != "required":
            # a role can only be checked on a token; optional or public would let anyone by
            self.fail(key, "roles need auth: required on the same route")
            return None
        return tuple(roles)


def _one_of(choices: tuple[Any, ...]) -> str:
    return " or ".join(choices) if len(choices) == 2 else f"one of {', '.join(choices)}"

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


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__)


_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_ANY = frozenset({"0.0.0.0", "::", ""})


def _is_listen_address(url: URL | None, host: str | None, port: int | None) -> bool:
    """Whether ``url`` is the gateway's own plain listener (as this host reaches it)."""
    if url is None or port is None or url.port != port:
        return False
    return url.host == host or (url.host in _LOOPBACK and (host in _ANY or host in _LOOPBACK))
