"""The YAML configuration as docs/configuration.md has it: defaults, ${VAR} substitution,
durations, strict keys and one ``key.path: message`` line per problem, all reported at once."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from yarl import URL

from conftest import APPID, APPID2, OLD_SIGNING_KEY, SECRET, SECRET2, SIGNING_KEY, base_config
from gateway import loader
from gateway.config import Config, yaml_name
from gateway.errors import ConfigError

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
UPSTREAM = "http://127.0.0.1:9000"

# A problem line: `key.path[0].sub: message` (or "(top level): ..." for the document itself).
_KEY_LINE = re.compile(r"^(\(top level\)|[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?"
                       r"(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*): \S")


def minimal() -> dict[str, Any]:
    """The least a valid file needs: everything else takes its default."""
    return {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "apps": [{"appid": APPID, "secret": SECRET}],
        "session": {"signing_keys": [SIGNING_KEY]},
        "routes": [{"path": "/api/", "upstream": UPSTREAM}],
    }


def parse(data: Any, environ: dict[str, str] | None = None) -> Config:
    return loader.parse(data, environ=environ or {})


def problems(data: Any, environ: dict[str, str] | None = None) -> list[str]:
    """The ConfigError's problem lines; each must begin with its key path."""
    with pytest.raises(ConfigError) as info:
        loader.parse(data, environ=environ or {})
    lines = info.value.problems
    assert lines, "ConfigError without any problem line"
    for line in lines:
        assert "\n" not in line, f"problem spans several lines: {line!r}"
        assert _KEY_LINE.match(line), f"problem does not start with a key path: {line!r}"
    # The exception's text is the same lines, one per line.
    assert str(info.value).splitlines() == lines
    return lines


def with_problem(lines: list[str], key: str, *fragments: str) -> str:
    """The one line about ``key`` (exactly that key, not a longer path), containing fragments."""
    found = [line for line in lines if line.startswith(f"{key}: ")]
    assert len(found) == 1, f"expected exactly one problem for {key!r}, got {lines!r}"
    for fragment in fragments:
        assert fragment in found[0], f"{fragment!r} not in {found[0]!r}"
    return found[0]


def modified(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    data = minimal()
    change(data)
    return data


def route(**fields: Any) -> dict[str, Any]:
    return {"path": "/api/", "upstream": UPSTREAM, **fields}


# --- defaults ------------------------------------------------------------------------------


def test_minimal_config_takes_every_documented_default() -> None:
    cfg = parse(minimal())
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"
    assert cfg.redis.key_prefix == "wxgw:"
    assert cfg.redis.timeout == 1.0
    assert cfg.wechat.api_base == URL("https://api.weixin.qq.com")
    assert cfg.wechat.timeout == 5.0
    assert cfg.wechat.force_refresh is True
    assert cfg.session.ttl == 7 * 86400.0
    assert cfg.session.signing_keys == (SIGNING_KEY.encode(),)
    assert cfg.auth_prefix == "/auth"
    assert cfg.identity_headers.openid == "X-WX-OpenID"
    assert cfg.identity_headers.unionid == "X-WX-UnionID"
    assert cfg.identity_headers.appid == "X-WX-AppID"
    assert cfg.shutdown_grace == 10.0
    assert [(a.appid, a.secret) for a in cfg.apps] == [(APPID, SECRET)]
    (r,) = cfg.routes
    assert r.path == "/api"
    assert r.upstream == URL(UPSTREAM)
    assert r.auth == "required"
    assert (r.read_timeout, r.connect_timeout, r.timeout) == (60.0, 5.0, None)


def test_empty_sections_take_their_defaults() -> None:
    data = minimal()
    data.update({"wechat": None, "auth": None, "identity_headers": None, "shutdown_grace": None})
    data["redis"]["key_prefix"] = None
    data["session"]["ttl"] = None
    data["routes"][0].update({"auth": None, "timeout": None, "read_timeout": None})
    cfg = parse(data)
    assert cfg.wechat.api_base == URL("https://api.weixin.qq.com")
    assert cfg.wechat.timeout == 5.0
    assert cfg.auth_prefix == "/auth"
    assert cfg.identity_headers.names() == ("X-WX-OpenID", "X-WX-UnionID", "X-WX-AppID",
                                           "X-WX-Phone", "X-MP-Platform", "X-WX-CorpID",
                                           "X-User-ID", "X-User-Roles")
    assert cfg.redis.key_prefix == "wxgw:"
    assert cfg.session.ttl == 7 * 86400.0
    assert cfg.routes[0].auth == "required"
    assert (cfg.routes[0].timeout, cfg.routes[0].read_timeout) == (None, 60.0)
    assert cfg.shutdown_grace == 10.0
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)


def test_explicit_values_override_the_defaults() -> None:
    data = base_config("rediss://cache.internal:6380/2", "myapp:", "http://127.0.0.1:1234",
                       "http://10.0.0.5:9000/base/")
    data.update({
        "listen": "127.0.0.1:9999",
        "auth": {"prefix": "/login-api/"},
        "identity_headers": {"openid": "X-User", "unionid": "X-Union", "appid": "X-App"},
        "shutdown_grace": "3s",
    })
    data["redis"]["timeout"] = "250ms"
    data["apps"].append({"appid": APPID2, "secret": SECRET2})
    data["session"]["signing_keys"] = [SIGNING_KEY, OLD_SIGNING_KEY]
    cfg = parse(data)
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 9999)
    assert cfg.redis.url == "rediss://cache.internal:6380/2"
    assert cfg.redis.key_prefix == "myapp:"
    assert cfg.redis.timeout == 0.25
    assert cfg.wechat.api_base == URL("http://127.0.0.1:1234")
    assert cfg.wechat.timeout == 1.0
    assert cfg.session.ttl == 3600.0
    assert cfg.session.signing_keys == (SIGNING_KEY.encode(), OLD_SIGNING_KEY.encode())
    assert cfg.auth_prefix == "/login-api"
    assert cfg.identity_headers.names() == ("X-User", "X-Union", "X-App", "X-WX-Phone",
                                           "X-MP-Platform", "X-WX-CorpID", "X-User-ID",
                                           "X-User-Roles")
    assert cfg.shutdown_grace == 3.0
    assert cfg.app(APPID2) is not None and cfg.app(APPID2).secret == SECRET2  # type: ignore[union-attr]
    assert cfg.app("wxnope") is None
    by_path = {r.path: r for r in cfg.routes}
    assert {p: r.auth for p, r in by_path.items()} == {
        "/api": "required", "/public": "public", "/maybe": "optional"}
    assert all(r.timeout == 2.0 for r in cfg.routes)
    assert by_path["/api"].origin == "http://10.0.0.5:9000"
    assert by_path["/api"].base_path == "/base"


# --- ${VAR} substitution -------------------------------------------------------------------


def test_env_var_is_substituted() -> None:
    data = minimal()
    data["apps"][0]["secret"] = "${WX_APP_SECRET}"
    cfg = parse(data, {"WX_APP_SECRET": "from-the-environment"})
    assert cfg.apps[0].secret == "from-the-environment"


def test_env_var_default_used_only_when_unset() -> None:
    data = minimal()
    data["listen"] = "${GATEWAY_LISTEN:-127.0.0.1:7000}"
    data["redis"]["key_prefix"] = "${PREFIX:-}fallback:"
    assert parse(data).listen_port == 7000
    assert parse(data).redis.key_prefix == "fallback:"
    cfg = parse(data, {"GATEWAY_LISTEN": "10.1.2.3:8001", "PREFIX": "x-"})
    assert (cfg.listen_host, cfg.listen_port) == ("10.1.2.3", 8001)
    assert cfg.redis.key_prefix == "x-fallback:"


def test_env_var_set_to_empty_string_is_used_not_the_default() -> None:
    data = minimal()
    data["redis"]["key_prefix"] = "a${EMPTY:-default}b"
    assert parse(data, {"EMPTY": ""}).redis.key_prefix == "ab"


def test_several_env_vars_inside_one_value() -> None:
    data = minimal()
    data["routes"][0]["upstream"] = "http://${UP_HOST}:${UP_PORT:-9000}/${UP_BASE}"
    cfg = parse(data, {"UP_HOST": "10.0.0.7", "UP_BASE": "svc"})
    assert cfg.routes[0].upstream == URL("http://10.0.0.7:9000/svc")
    assert cfg.routes[0].base_path == "/svc"


def test_env_vars_are_substituted_inside_nested_lists() -> None:
    data = minimal()
    data["session"]["signing_keys"] = ["${KEY_NEW}", "${KEY_OLD:-" + OLD_SIGNING_KEY + "}"]
    data["apps"] = [{"appid": "${APP1}", "secret": "${SECRET1}"},
                    {"appid": APPID2, "secret": "${SECRET2:-fallback-secret}"}]
    data["routes"] = [route(path="${P1:-/api/}", upstream="${UP}", auth="${MODE:-public}",
                            timeout="${T}")]
    cfg = parse(data, {"KEY_NEW": SIGNING_KEY, "APP1": APPID, "SECRET1": "s1",
                       "UP": "http://backend:81", "T": "45s"})
    assert cfg.session.signing_keys == (SIGNING_KEY.encode(), OLD_SIGNING_KEY.encode())
    assert [(a.appid, a.secret) for a in cfg.apps] == [(APPID, "s1"), (APPID2, "fallback-secret")]
    (r,) = cfg.routes
    assert (r.path, r.upstream, r.auth, r.timeout) == ("/api", URL("http://backend:81"),
                                                         "public", 45.0)


def test_substituted_values_are_not_expanded_again() -> None:
    data = minimal()
    data["apps"][0]["secret"] = "${S}"
    cfg = parse(data, {"S": "literal-${OTHER}-$$"})
    assert cfg.apps[0].secret == "literal-${OTHER}-$$"


@pytest.mark.parametrize("listen, api_base", [
    ("127.0.0.1:8080", "http://127.0.0.1:8080"), ("0.0.0.0:8080", "http://localhost:8080/"),
    (None, "http://127.0.0.1:8080/"), ("[::]:9000", "http://[::1]:9000"),
])
def test_an_app_api_base_that_is_the_gateway_itself_is_refused(listen: str | None,
                                                                  api_base: str) -> None:
    # the login call would come back in as a request, its secret in the query, and go through
    # a catch-all route to an upstream
    data = minimal()
    if listen is not None:
        data["listen"] = listen
    data["apps"][0]["api_base"] = api_base
    (problem,) = problems(data)
    assert problem.startswith("apps[0].api_base: is the gateway's own listen address"), problem


def test_an_app_api_base_on_another_port_or_host_is_taken() -> None:
    for listen, api_base in (("127.0.0.1:8080", "http://127.0.0.1:9100"),
                             ("127.0.0.1:8080", "http://10.0.0.5:8080")):
        data = {**minimal(), "listen": listen}
        data["apps"][0]["api_base"] = api_base
        assert parse(data).apps[0].api_base is not None


@pytest.mark.parametrize("secret", ["0123456789abcdef0123456789abcdef\n",
                                    " 0123456789abcdef0123456789abcdef", "0123 4567"])
def test_a_secret_with_a_space_or_newline_is_refused_without_echoing_it(secret: str) -> None:
    # as a secret file read into ${VAR} often ends: every platform would refuse the secret
    data = minimal()
    data["apps"][0]["secret"] = "${S}"
    with pytest.raises(ConfigError) as raised:
        parse(data, {"S": secret})
    (problem,) = raised.value.problems
    assert problem.startswith("apps[0].secret: has a space or control character"), problem
    assert secret.strip()[:4] not in problem


@pytest.mark.parametrize("where,change", [
    ("apps[0].secret", lambda d: d["apps"][0].update(secret="${X}")),
    ("apps[0].appid", lambda d: d["apps"][0].update(appid="${X}")),
    ("session.signing_keys[0]", lambda d: d["session"].update(signing_keys=["${X}"])),
    ("session.signing_keys[1]",
     lambda d: d["session"].update(signing_keys=[SIGNING_KEY, "${X}"])),
    ("routes[1].upstream", lambda d: d["routes"].append(route(path="/b", upstream="${X}"))),
    ("routes[0].timeout", lambda d: d["routes"][0].update(timeout="${X}")),
    ("redis.url", lambda d: d["redis"].update(url="${X}")),
    ("listen", lambda d: d.update(listen="${X}")),
    ("wechat.api_base", lambda d: d.update(wechat={"api_base": "${X}/"})),
])
def test_unset_env_var_reported_once_naming_key_and_variable(
        where: str, change: Callable[[dict[str, Any]], None]) -> None:
    lines = problems(modified(change))
    # Only that problem: no follow-up complaint ("must not be empty", "not a URL", ...).
    assert lines == [f"{where}: environment variable X is not set"]


def test_unset_env_var_used_twice_in_one_value_reported_once() -> None:
    data = minimal()
    data["routes"][0]["upstream"] = "http://${UP_HOST}:9000/${UP_HOST}"
    assert problems(data) == ["routes[0].upstream: environment variable UP_HOST is not set"]


def test_every_unset_env_var_is_reported() -> None:
    data = minimal()
    data["apps"][0]["secret"] = "${WX_APP_SECRET}"
    data["session"]["signing_keys"] = ["${GATEWAY_SIGNING_KEY}"]
    data["routes"][0]["upstream"] = "http://${UP_HOST}:${UP_PORT}"
    lines = problems(data)
    assert sorted(lines) == sorted([
        "apps[0].secret: environment variable WX_APP_SECRET is not set",
        "session.signing_keys[0]: environment variable GATEWAY_SIGNING_KEY is not set",
        "routes[0].upstream: environment variable UP_HOST is not set",
        "routes[0].upstream: environment variable UP_PORT is not set",
    ])


def test_double_dollar_is_a_literal_dollar() -> None:
    data = minimal()
    data["apps"][0]["secret"] = "pa$$word-$${NOT_A_VAR}-${REAL}"
    cfg = parse(data, {"REAL": "r", "NOT_A_VAR": "must-not-appear"})
    assert cfg.apps[0].secret == "pa$word-${NOT_A_VAR}-r"
    # An escaped reference is not a reference: no "not set" problem when the variable is unset.
    data["apps"][0]["secret"] = "$${NOT_A_VAR}"
    assert parse(data).apps[0].secret == "${NOT_A_VAR}"


# --- durations -----------------------------------------------------------------------------


@pytest.mark.parametrize("value,seconds", [
    ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
    (45, 45.0), (1.5, 1.5), ("90", 90.0), ("1.5s", 1.5), ("1ms", 0.001),
])
def test_duration_formats(value: Any, seconds: float) -> None:
    data = minimal()
    data["routes"][0]["timeout"] = value
    data["routes"][0]["read_timeout"] = value
    data["session"]["ttl"] = value
    data["wechat"] = {"timeout": value}
    data["redis"]["timeout"] = value
    data["shutdown_grace"] = value
    cfg = parse(data)
    for got in (cfg.routes[0].timeout, cfg.routes[0].read_timeout, cfg.session.ttl, cfg.wechat.timeout, cfg.redis.timeout,
                cfg.shutdown_grace):
        assert got == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["10x", "-1", -1, 0, "0", "0s", "0ms", True, False, "", "5 minutes",
                                   "s", [], {"s": 1}])
@pytest.mark.parametrize("key", ["routes[0].timeout", "routes[0].read_timeout", "session.ttl",
                                 "wechat.timeout", "redis.timeout", "shutdown_grace"])
def test_bad_durations_are_rejected_naming_the_key(key: str, value: Any) -> None:
    data = minimal()
    if key.startswith("routes[0]."):
        data["routes"][0][key.partition(".")[2]] = value
    elif key == "shutdown_grace":
        data["shutdown_grace"] = value
    else:
        section, name = key.split(".")
        data.setdefault(section, {})[name] = value
    lines = problems(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{key}: ")


def test_parse_duration_directly() -> None:
    assert loader.parse_duration("250ms") == 0.25
    assert loader.parse_duration("7d") == 604800.0
    assert loader.parse_duration(3) == 3.0
    for bad in ("10x", "-1", 0, True, "", "1w"):
        with pytest.raises(ValueError):
            loader.parse_duration(bad)


# --- unknown keys --------------------------------------------------------------------------


@pytest.mark.parametrize("key,change", [
    ("listne", lambda d: d.update(listne="0.0.0.0:1")),
    ("redis.urls", lambda d: d["redis"].update(urls="redis://x")),
    ("wechat.apibase", lambda d: d.update(wechat={"apibase": "http://x"})),
    ("apps[0].secert", lambda d: d["apps"][0].update(secert="s")),
    ("session.signing_key", lambda d: d["session"].update(signing_key=SIGNING_KEY)),
    ("session.tll", lambda d: d["session"].update(tll="1h")),
    ("auth.prefx", lambda d: d.update(auth={"prefx": "/a"})),
    ("identity_headers.email", lambda d: d.update(identity_headers={"email": "X-Mail"})),
    ("routes[0].upstrem", lambda d: d["routes"][0].update(upstrem="http://x")),
    ("routes[1].timout",
     lambda d: d["routes"].append(route(path="/b", timout="5s"))),
])
def test_unknown_keys_are_rejected(key: str, change: Callable[[dict[str, Any]], None]) -> None:
    lines = problems(modified(change))
    with_problem(lines, key, "unknown key")


def test_unknown_key_message_lists_the_allowed_keys() -> None:
    lines = problems(modified(lambda d: d["routes"][0].update(upstrem="http://x")))
    line = with_problem(lines, "routes[0].upstrem", "unknown key")
    for allowed in ("path", "upstream", "auth", "timeout"):
        assert allowed in line


@pytest.mark.parametrize("key,change", [
    # field names that are not YAML keys: read from another key, or derived
    ("listen_host", lambda d: d.update(listen_host="0.0.0.0")),
    ("listen_port", lambda d: d.update(listen_port=8080)),
    ("auth_prefix", lambda d: d.update(auth_prefix="/a")),
    ("rate_limit", lambda d: d.update(rate_limit={"ip_limit": 1})),
    ("folds", lambda d: d.update(folds=True)),
    ("routes[0].origin", lambda d: d["routes"][0].update(origin="http://evil:1")),
    ("routes[0].base_path", lambda d: d["routes"][0].update(base_path="/admin")),
    ("routes[0].folded", lambda d: d["routes"][0].update(folded="/x")),
    # a nested key's path spelled as one key is not that key
    ("auth.prefix", lambda d: d.update({"auth.prefix": "/a"})),
    ("auth.rate_limit.bogus", lambda d: d.update(auth={"rate_limit": {"bogus": 1}})),
])
def test_field_names_and_dotted_paths_are_not_keys(
        key: str, change: Callable[[dict[str, Any]], None]) -> None:
    with_problem(problems(modified(change)), key, "unknown key")


def test_auth_section_lists_its_own_keys_and_reads_both() -> None:
    line = with_problem(problems(modified(lambda d: d.update(auth={"prefx": "/a"}))),
                        "auth.prefx")
    assert line.endswith("(allowed: prefix, rate_limit)"), line
    cfg = parse(modified(lambda d: d.update(auth={"prefix": "/login/",
                                                  "rate_limit": {"ip_limit": 3}})))
    assert (cfg.auth_prefix, cfg.rate_limit.ip_limit, cfg.rate_limit.app_limit) == (
        "/login", 3, 1200)
    with_problem(problems(modified(lambda d: d.update(auth={"rate_limit": "lots"}))),
                 "auth.rate_limit", "expected a mapping")


def test_a_default_header_name_clashing_with_a_configured_one_is_refused() -> None:
    # the appid header keeps its default, the openid header takes that name
    with_problem(problems(modified(lambda d: d.update(
        identity_headers={"openid": "X-WX-AppID"}))), "identity_headers.appid", "already used")
    # no identity_assertion section at all: its default header is still checked
    with_problem(problems(modified(lambda d: d.update(
        identity_headers={"phone": "X-WX-Assertion"}))), "identity_assertion.header")


def test_an_absent_redis_url_is_required_once_and_sentinels_stand_in_for_it() -> None:
    lines = problems(modified(lambda d: d.update(redis={"key_prefix": "p:"})))
    assert lines == ["redis.url: is required (redis://, rediss:// or unix://), "
                     "unless redis.sentinels is given"]
    cfg = parse(modified(lambda d: d.update(redis={"sentinels": ["[::1]:26379"]})))
    assert (cfg.redis.url, cfg.redis.sentinels) == ("redis://", (("::1", 26379),))


# --- signing keys --------------------------------------------------------------------------


def test_signing_key_shorter_than_32_bytes_is_rejected() -> None:
    data = modified(lambda d: d["session"].update(signing_keys=["k" * 31]))
    with_problem(problems(data), "session.signing_keys[0]", "32", "31")


def test_signing_key_of_exactly_32_bytes_is_accepted() -> None:
    data = modified(lambda d: d["session"].update(signing_keys=["k" * 32]))
    assert parse(data).session.signing_keys == (b"k" * 32,)


def test_signing_key_length_counts_bytes_not_characters() -> None:
    # 16 two-byte characters = 32 bytes: long enough; 15 of them = 30 bytes: too short.
    assert parse(modified(lambda d: d["session"].update(signing_keys=["é" * 16]))) \
        .session.signing_keys == (("é" * 16).encode(),)
    data = modified(lambda d: d["session"].update(signing_keys=["é" * 15]))
    with_problem(problems(data), "session.signing_keys[0]", "30")


def test_short_second_signing_key_is_named_by_its_index() -> None:
    data = modified(lambda d: d["session"].update(signing_keys=[SIGNING_KEY, "too-short"]))
    lines = problems(data)
    assert len(lines) == 1
    with_problem(lines, "session.signing_keys[1]", "32")


def test_missing_or_empty_signing_keys_rejected() -> None:
    with_problem(problems(modified(lambda d: d.pop("session"))), "session.signing_keys")
    with_problem(problems(modified(lambda d: d["session"].update(signing_keys=[]))),
                 "session.signing_keys")


# --- duplicates ----------------------------------------------------------------------------


@pytest.mark.parametrize("first,second", [("/api", "/api/"), ("/api/", "/api"), ("/api", "/api"),
                                          ("/api/", "/api//")])
def test_duplicate_route_paths_are_rejected(first: str, second: str) -> None:
    data = minimal()
    data["routes"] = [route(path=first), route(path=second, upstream="http://other:1")]
    line = with_problem(problems(data), "routes[1].path", "duplicate")
    assert "/api" in line


def test_an_appid_with_a_final_newline_is_rejected() -> None:
    data = minimal()  # what a YAML block scalar ("appid: |") gives
    data["apps"] = [{"appid": APPID + "\n", "secret": SECRET}]
    with_problem(problems(data), "apps[0].appid", "letters, digits")


def test_duplicate_appids_are_rejected() -> None:
    data = minimal()
    data["apps"] = [{"appid": APPID, "secret": SECRET}, {"appid": APPID2, "secret": SECRET2},
                    {"appid": APPID, "secret": "another"}]
    with_problem(problems(data), "apps[2].appid", "duplicate", APPID)


# --- upstream URLs -------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "127.0.0.1:9000",           # no scheme
    "backend",                  # no scheme, no port
    "ftp://backend:21",         # wrong scheme
    "ws://backend:80",          # wrong scheme
    "http://",                  # missing host
    "http:///base",             # missing host
    "http://backend:9000/base?x=1",  # query string
    "http://backend/#frag",     # fragment
    "http://user:pass@backend:9000",  # credentials
    "http://user@backend:9000",       # credentials (user only)
    "http://backend:99999",     # port out of range
    "http://backend:abc",       # port not a number
    "",                         # empty
])
def test_bad_upstream_urls_are_rejected(url: str) -> None:
    data = modified(lambda d: d["routes"].append(route(path="/other/", upstream=url)))
    lines = problems(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith("routes[1].upstream: ")


def test_upstream_with_port_zero_is_rejected() -> None:
    # Port 0 is not a port anyone can be reached on (listen rejects it too).
    data = modified(lambda d: d["routes"][0].update(upstream="http://backend:0"))
    with_problem(problems(data), "routes[0].upstream")


def test_missing_upstream_is_rejected() -> None:
    data = modified(lambda d: d["routes"][0].pop("upstream"))
    with_problem(problems(data), "routes[0].upstream")


@pytest.mark.parametrize("url,origin,base_path", [
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000", ""),
    ("http://127.0.0.1:9000/", "http://127.0.0.1:9000", ""),
    ("https://backend.internal", "https://backend.internal", ""),
    ("http://backend:8080/v1/", "http://backend:8080", "/v1"),
    ("http://backend:8080/svc/v1", "http://backend:8080", "/svc/v1"),
    ("http://[::1]:8000", "http://[::1]:8000", ""),
])
def test_good_upstream_urls(url: str, origin: str, base_path: str) -> None:
    (r,) = parse(modified(lambda d: d["routes"][0].update(upstream=url))).routes
    assert r.upstream == URL(url)
    assert r.origin == origin
    assert r.base_path == base_path


def test_wechat_api_base_is_validated_like_an_upstream() -> None:
    with_problem(problems(modified(lambda d: d.update(wechat={"api_base": "api.weixin.qq.com"}))),
                 "wechat.api_base")
    with_problem(problems(modified(lambda d: d.update(wechat={"api_base": "ftp://x"}))),
                 "wechat.api_base")


@pytest.mark.parametrize("value,expected", [(False, False), ("false", False), (True, True),
                                            ("true", True)])
def test_wechat_force_refresh_is_a_boolean(value: Any, expected: bool) -> None:
    cfg = parse(modified(lambda d: d.update(wechat={"force_refresh": value})))
    assert cfg.wechat.force_refresh is expected


@pytest.mark.parametrize("value", ["no", 0, "sometimes", [True]])
def test_wechat_force_refresh_rejects_anything_else(value: Any) -> None:
    with_problem(problems(modified(lambda d: d.update(wechat={"force_refresh": value}))),
                 "wechat.force_refresh", "expected true or false")


# --- routes --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["maybe", "Required", "none", "", True, 1])
def test_invalid_auth_mode_is_rejected(mode: Any) -> None:
    data = modified(lambda d: d["routes"][0].update(auth=mode))
    lines = problems(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith("routes[0].auth: ")


@pytest.mark.parametrize("mode", ["required", "optional", "public"])
def test_valid_auth_modes(mode: str) -> None:
    assert parse(modified(lambda d: d["routes"][0].update(auth=mode))).routes[0].auth == mode


@pytest.mark.parametrize("path", ["api/", "api", "/api/../admin", "/..", "/api/..", "/a/./b",
                                  "//api", "/a//b", "/%2e%2e/x", "/api?x=1", "/a\\b", ""])
def test_bad_route_paths_are_rejected(path: str) -> None:
    data = modified(lambda d: d["routes"][0].update(path=path))
    lines = problems(data)
    assert len(lines) == 1, lines
    assert lines[0].startswith("routes[0].path: ")


def test_route_path_is_required() -> None:
    data = modified(lambda d: d["routes"][0].pop("path"))
    with_problem(problems(data), "routes[0].path")


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/auth/login"])
def test_route_on_a_gateway_endpoint_is_rejected(path: str) -> None:
    data = modified(lambda d: d["routes"].append(route(path=path)))
    with_problem(problems(data), "routes[1].path")


def test_routes_come_back_longest_prefix_first() -> None:
    data = minimal()
    data["routes"] = [route(path="/"), route(path="/api/"), route(path="/api/v2/admin/"),
                      route(path="/api/v2"), route(path="/static")]
    cfg = parse(data)
    paths = [r.path for r in cfg.routes]
    assert sorted(paths) == sorted(["/", "/api", "/api/v2/admin", "/api/v2", "/static"])
    assert [len(p) for p in paths] == sorted((len(p) for p in paths), reverse=True)
    assert paths[0] == "/api/v2/admin" and paths[-1] == "/"


def test_route_for_picks_the_longest_matching_prefix() -> None:
    data = minimal()
    data["routes"] = [route(path="/api/", upstream="http://a:1"),
                      route(path="/api/v2/", upstream="http://b:2"),
                      route(path="/api/v2/admin", upstream="http://c:3")]
    cfg = parse(data)

    def target(path: str) -> str | None:
        r = cfg.route_for(path)
        return None if r is None else r.path

    assert target("/api") == "/api"
    assert target("/api/") == "/api"
    assert target("/api/orders/1") == "/api"
    assert target("/api/v2") == "/api/v2"
    assert target("/api/v2/orders") == "/api/v2"
    assert target("/api/v2/admin") == "/api/v2/admin"
    assert target("/api/v2/admin/users") == "/api/v2/admin"
    assert target("/api/v2x") == "/api"        # not /api/v2: a segment boundary is required
    assert target("/apiary") is None           # /api does not match /apiary
    assert target("/other") is None
    assert target("/") is None


def test_root_route_catches_everything_else() -> None:
    data = minimal()
    data["routes"] = [route(path="/", upstream="http://root:1"), route(path="/api")]
    cfg = parse(data)
    assert cfg.route_for("/apiary").path == "/"  # type: ignore[union-attr]
    assert cfg.route_for("/api/x").path == "/api"  # type: ignore[union-attr]
    assert cfg.route_for("/").path == "/"  # type: ignore[union-attr]


# --- required sections, redis, listen ------------------------------------------------------


def test_missing_apps_is_rejected() -> None:
    with_problem(problems(modified(lambda d: d.pop("apps"))), "apps", "required")


def test_empty_apps_is_rejected() -> None:
    with_problem(problems(modified(lambda d: d.update(apps=[]))), "apps", "required")


def test_app_without_secret_is_rejected() -> None:
    line = with_problem(problems(modified(lambda d: d["apps"][0].pop("secret"))), "apps[0].secret")
    assert line == "apps[0].secret: is required"


@pytest.mark.parametrize("key, change", [
    ("apps[0].secret", lambda d: d["apps"][0].update(secret=None)),  # `secret:` left blank
    ("routes[0].upstream", lambda d: d["routes"][0].pop("upstream")),
    ("routes[0].path", lambda d: d["routes"][0].update(path=None)),
])
def test_a_missing_required_string_says_it_is_required(
        key: str, change: Callable[[dict[str, Any]], None]) -> None:
    assert with_problem(problems(modified(change)), key) == f"{key}: is required"


def test_a_string_of_the_wrong_kind_still_names_what_it_got() -> None:
    line = with_problem(problems(modified(lambda d: d["apps"][0].update(secret=["a"]))),
                        "apps[0].secret")
    assert line == "apps[0].secret: expected a string, got a list"


def test_apps_must_be_a_list() -> None:
    with_problem(problems(modified(lambda d: d.update(apps={"appid": APPID}))), "apps")


def test_missing_redis_url_is_rejected() -> None:
    with_problem(problems(modified(lambda d: d["redis"].pop("url"))), "redis.url", "required")
    with_problem(problems(modified(lambda d: d.pop("redis"))), "redis.url", "required")


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "localhost:6379", "mysql://db/0",
                                 "tcp://127.0.0.1:6379"])
def test_redis_url_with_wrong_scheme_is_rejected(url: str) -> None:
    with_problem(problems(modified(lambda d: d["redis"].update(url=url))), "redis.url")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://:pw@cache:6380/1",
                                 "unix:///run/redis/redis.sock"])
def test_redis_url_schemes_accepted(url: str) -> None:
    assert parse(modified(lambda d: d["redis"].update(url=url))).redis.url == url


def test_redis_url_is_not_in_the_config_repr() -> None:
    cfg = parse(modified(lambda d: d["redis"].update(url="redis://:hunter2-password@cache/0")))
    assert "hunter2-password" not in repr(cfg)
    assert SECRET not in repr(cfg)
    assert SIGNING_KEY not in repr(cfg)


@pytest.mark.parametrize("listen", ["8080", 8080, "localhost", "host:", ":8080", "host:0",
                                    "host:65536", "host:80a", "host:-1", ""])
def test_invalid_listen_is_rejected(listen: Any) -> None:
    lines = problems(modified(lambda d: d.update(listen=listen)))
    assert len(lines) == 1, lines
    assert lines[0].startswith("listen: ")


@pytest.mark.parametrize("listen,host,port", [("127.0.0.1:9999", "127.0.0.1", 9999),
                                              ("localhost:1", "localhost", 1),
                                              ("[::1]:8443", "::1", 8443),
                                              ("0.0.0.0:65535", "0.0.0.0", 65535)])
def test_valid_listen(listen: str, host: str, port: int) -> None:
    cfg = parse(modified(lambda d: d.update(listen=listen)))
    assert (cfg.listen_host, cfg.listen_port) == (host, port)


@pytest.mark.parametrize("data", [[1, 2], "text", 42])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    lines = problems(data)
    assert len(lines) == 1 and lines[0].startswith("(top level): ")


@pytest.mark.parametrize("section", ["redis", "session", "wechat", "auth", "identity_headers"])
def test_section_must_be_a_mapping(section: str) -> None:
    lines = problems(modified(lambda d: d.update({section: ["x"]})))
    assert any(line.startswith(f"{section}: ") for line in lines), lines


def test_invalid_auth_prefix_and_identity_headers() -> None:
    with_problem(problems(modified(lambda d: d.update(auth={"prefix": "auth"}))), "auth.prefix")
    with_problem(problems(modified(lambda d: d.update(auth={"prefix": "/"}))), "auth.prefix")
    with_problem(problems(modified(lambda d: d.update(
        identity_headers={"openid": "X WX OpenID"}))), "identity_headers.openid")
    with_problem(problems(modified(lambda d: d.update(
        identity_headers={"unionid": "x-wx-openid"}))), "identity_headers.unionid")
    with_problem(problems(modified(lambda d: d.update(
        identity_headers={"appid": "Authorization"}))), "identity_headers.appid")


# --- all problems at once ------------------------------------------------------------------


def test_several_problems_are_reported_together() -> None:
    data = {
        "listen": "nowhere",
        "bogus": 1,
        "redis": {"url": "http://127.0.0.1:6379"},
        "apps": [{"appid": APPID, "secret": "${WX_APP_SECRET}"}],
        "session": {"signing_keys": ["short"], "ttl": "10x"},
        "routes": [
            {"path": "/api/", "upstream": "http://127.0.0.1:9000", "upstrem": "x"},
            {"path": "api2", "upstream": "ftp://x", "auth": "maybe", "timeout": "0"},
            {"path": "/api", "upstream": "http://127.0.0.1:9001"},
        ],
    }
    lines = problems(data)
    expected_keys = ["listen", "bogus", "redis.url", "apps[0].secret", "session.signing_keys[0]",
                     "session.ttl", "routes[0].upstrem", "routes[1].path", "routes[1].upstream",
                     "routes[1].auth", "routes[1].timeout", "routes[2].path"]
    for key in expected_keys:
        assert any(line.startswith(f"{key}: ") for line in lines), (key, lines)
    assert len(lines) == len(expected_keys), lines


def test_valid_parts_do_not_produce_problems_next_to_invalid_ones() -> None:
    data = minimal()
    data["routes"].append(route(path="/b/", upstream="nope"))
    lines = problems(data)
    assert len(lines) == 1 and lines[0].startswith("routes[1].upstream: "), lines


# --- the Config object ---------------------------------------------------------------------


def test_config_is_frozen() -> None:
    cfg = parse(minimal())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.listen_port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.redis.key_prefix = "other:"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.routes[0].auth = "public"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.session.ttl = 1.0  # type: ignore[misc]
    assert isinstance(cfg.routes, tuple) and isinstance(cfg.apps, tuple)
    assert isinstance(cfg.session.signing_keys, tuple)
    assert cfg.listen_port == 8080 and cfg.routes[0].auth == "required"


def test_parse_does_not_modify_its_input() -> None:
    data = minimal()
    data["apps"][0]["secret"] = "${S}"
    before = copy.deepcopy(data)
    parse(data, {"S": "x"})
    assert data == before


# --- load() --------------------------------------------------------------------------------


def test_load_reads_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    data = minimal()
    data["apps"][0]["secret"] = "${WX_APP_SECRET}"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    cfg = loader.load(path, environ={"WX_APP_SECRET": "loaded"})
    assert cfg.apps[0].secret == "loaded"
    assert cfg.routes[0].path == "/api"


def test_load_uses_the_process_environment_by_default(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gw.yaml"
    data = minimal()
    data["apps"][0]["secret"] = "${WXGW_TEST_SECRET_VAR}"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    monkeypatch.setenv("WXGW_TEST_SECRET_VAR", "from-os-environ")
    assert loader.load(path).apps[0].secret == "from-os-environ"
    monkeypatch.delenv("WXGW_TEST_SECRET_VAR")
    with pytest.raises(ConfigError) as info:
        loader.load(path)
    assert info.value.problems == [
        "apps[0].secret: environment variable WXGW_TEST_SECRET_VAR is not set"]


def test_load_yaml_syntax_error_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listen: \"0.0.0.0:8080\"\nroutes: [\n  {path: /api\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        loader.load(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}")
    assert "YAML" in line
    assert re.match(rf"{re.escape(str(path))}:\d+: not valid YAML: \w", line), line


def test_load_bad_indentation_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "indent.yaml"
    path.write_text("redis:\n  url: redis://x\n   key_prefix: a\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        loader.load(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}:3: not valid YAML: "), line


def test_load_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "does-not-exist.yaml"
    with pytest.raises(ConfigError) as info:
        loader.load(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}: ")
    assert "cannot read" in line


def test_load_empty_file_reports_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        loader.load(path, environ={})
    lines = info.value.problems
    for key in ("redis.url", "apps", "session.signing_keys"):
        assert any(line.startswith(f"{key}: ") for line in lines), lines


# --- the repository's own config.yaml ------------------------------------------------------


def test_repo_config_yaml_is_valid_with_its_two_secrets() -> None:
    key = "k" * 48
    cfg = loader.load(REPO_CONFIG, environ={"GATEWAY_SIGNING_KEY": key,
                                             "WX_APP_SECRET": "repo-secret"})
    assert cfg.session.signing_keys == (key.encode(),)
    assert cfg.apps[0].secret == "repo-secret"
    assert cfg.apps[0].appid == "wx1234567890abcdef"
    assert (cfg.listen_host, cfg.listen_port) == ("0.0.0.0", 8080)
    assert cfg.redis.url == "redis://127.0.0.1:6379/0"
    assert cfg.wechat.api_base == URL("https://api.weixin.qq.com")
    assert cfg.shutdown_grace == 10.0
    assert {r.path: r.auth for r in cfg.routes} == {
        "/api": "required", "/public": "public", "/feed": "optional"}


def test_repo_config_yaml_takes_overrides_from_the_environment() -> None:
    cfg = loader.load(REPO_CONFIG, environ={
        "GATEWAY_SIGNING_KEY": "k" * 48, "WX_APP_SECRET": "s", "GATEWAY_LISTEN": "127.0.0.1:8181",
        "REDIS_URL": "redis://cache:6379/3", "API_UPSTREAM": "http://svc:7000"})
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 8181)
    assert cfg.redis.url == "redis://cache:6379/3"
    assert {r.origin for r in cfg.routes} == {"http://svc:7000"}


def test_repo_config_yaml_is_invalid_without_its_two_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        loader.load(REPO_CONFIG, environ={})
    assert sorted(info.value.problems) == [
        "apps[0].secret: environment variable WX_APP_SECRET is not set",
        "session.signing_keys[0]: environment variable GATEWAY_SIGNING_KEY is not set",
    ]


def test_repo_config_yaml_rejects_a_short_signing_key() -> None:
    with pytest.raises(ConfigError) as info:
        loader.load(REPO_CONFIG, environ={"GATEWAY_SIGNING_KEY": "short", "WX_APP_SECRET": "s"})
    (line,) = info.value.problems
    assert line.startswith("session.signing_keys[0]: ")


# --- values a hostile or careless file could carry ----------------------------------------


@pytest.mark.parametrize("key,value", [
    ("ttl", float("inf")), ("ttl", float("nan")), ("ttl", "400d")])
def test_infinite_nan_and_huge_durations_are_rejected(
        config_dict: dict[str, Any], key: str, value: Any) -> None:
    data = copy.deepcopy(config_dict)
    data["session"][key] = value
    assert any(p.startswith(f"session.{key}: ") for p in problems(data))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://[::1/0",
                                 "redis://h/0?socket_timeout=abc"])
def test_unusable_redis_urls_are_config_errors(config_dict: dict[str, Any], url: str) -> None:
    data = copy.deepcopy(config_dict)
    data["redis"]["url"] = url
    assert [p for p in problems(data) if p.startswith("redis.url: ")]


def test_tls_redis_url_with_sentinels_is_refused(config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["redis"] = {"url": "rediss://:secret@h/0", "sentinels": ["127.0.0.1:26379"]}
    assert [p for p in problems(data) if p.startswith("redis.url: ")]


@pytest.mark.parametrize("target", ["http://h:9000/a b", "http://h:9000/base%2f..",
                                    "http://h:9000/a/../b", "http://h:9000/é", "http://h:9000/a//b"])
def test_upstream_base_paths_must_be_plain(config_dict: dict[str, Any], target: str) -> None:
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/x", "upstream": target}]
    assert [p for p in problems(data) if p.startswith("routes[0].upstream: ")]


def test_credentials_in_a_rejected_url_are_not_echoed(config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/x", "upstream": "ftp://user:hunter2@h"}]
    assert not any("hunter2" in p for p in problems(data))


@pytest.mark.parametrize("name", ["X-Forwarded-For", "X-Request-ID", "Upgrade", "TE",
                                  "Sec-WebSocket-Key", "Content-Type", "Via"])
def test_identity_header_names_cannot_be_reserved_headers(
        config_dict: dict[str, Any], name: str) -> None:
    data = copy.deepcopy(config_dict)
    data["identity_headers"] = {"openid": name}
    assert [p for p in problems(data) if p.startswith("identity_headers.openid: ")]


def test_header_names_differing_only_by_underscore_are_duplicates(
        config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["identity_headers"] = {"openid": "X_WX_AppID"}  # the appid header keeps X-WX-AppID
    assert [p for p in problems(data) if p.startswith("identity_headers.appid: ")]
    data = copy.deepcopy(config_dict)
    data["identity_assertion"] = {"header": "X_WX_OpenID"}
    assert [p for p in problems(data) if p.startswith("identity_assertion.header: ")]


def test_duplicate_yaml_keys_and_non_utf8_files_are_one_line_each(tmp_path: Any) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("listen: '127.0.0.1:1'\nlisten: '127.0.0.1:2'\n")
    with pytest.raises(ConfigError) as info:
        loader.load(dup)
    assert len(info.value.problems) == 1 and "duplicate key 'listen'" in info.value.problems[0]
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        loader.load(binary)
    assert len(info.value.problems) == 1 and "UTF-8" in info.value.problems[0]


# --- the documentation's key table ---------------------------------------------------------

KEY_TABLE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def declared_keys(cls: type[Any] = Config, prefix: str = "") -> dict[str, Any]:
    """Every YAML key path the declaration reads (``routes[].read_timeout``,
    ``auth.rate_limit.ip_limit``; a section only through its keys), with its default."""
    hints = typing.get_type_hints(cls)
    keys: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = yaml_name(f)
        if not f.init or name is None:
            continue
        hint = hints[f.name]
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        section = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(section) == 1 and dataclasses.is_dataclass(section[0]):  # an optional section
            hint = section[0]
        if dataclasses.is_dataclass(hint):
            keys |= declared_keys(hint, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(item):
            keys |= declared_keys(item, f"{prefix}{name}[].")
        elif f.metadata.get("part") is not None:  # one key read into several fields
            keys[prefix + name] = None
        else:
            keys[prefix + name] = f.default
    return keys


def documented_keys() -> dict[str, str | None]:
    """The keys the configuration page's table names, in its order, each with its default when
    the row gives one per key (``.ip_window`` after ``auth.rate_limit.ip_limit`` is short for
    ``auth.rate_limit.ip_window``; ``| `a` / `.b` | `1` / `2` |`` pairs them)."""
    text = KEY_TABLE.read_text(encoding="utf-8")
    table = text[text.index("| key | default | meaning |"):]
    keys: dict[str, str | None] = {}
    for row in table[:table.index("\n\n")].splitlines()[2:]:
        _, key_cell, default_cell, *_ = row.split("|")
        names: list[str] = []
        for name in re.findall(r"`([^`]+)`", key_cell):
            names.append(names[-1].rpartition(".")[0] + name if name.startswith(".") else name)
        defaults = [d.strip() for d in default_cell.split(" / ")]
        for i, name in enumerate(names):
            keys[name] = defaults[i] if len(defaults) == len(names) else None
    return keys


def test_key_table_names_every_declared_key_and_no_other() -> None:
    declared, documented = declared_keys(), documented_keys()
    assert {"listen", "apps[].secret", "routes[].read_timeout", "auth.prefix",
            "auth.rate_limit.ip_limit", "identity_assertion.keys"} <= declared.keys()
    assert declared.keys() - documented.keys() == set(), "missing from the key table"
    assert documented.keys() - declared.keys() == set(), "the key table names unknown keys"


def test_key_table_lists_the_keys_in_declaration_order() -> None:
    """One table, read top to bottom as gateway/config.py declares the keys: a new key's row
    goes where its field is."""
    declared = [k for k in declared_keys() if k in documented_keys()]
    documented = list(documented_keys())
    for i, (want, got) in enumerate(zip(declared, documented)):
        assert want == got, f"row {i}: expected {want!r} (declaration order), found {got!r}"
    assert len(documented) == len(declared)


def test_key_table_defaults_are_the_declared_ones() -> None:
    declared = declared_keys()
    checked = 0
    for key, written in documented_keys().items():
        default = declared[key]
        if written is None or default is None or not re.fullmatch(r"`[^`]+`", written):
            continue  # "required", "none", "the upstream's origin": prose, not a value
        assert default is not dataclasses.MISSING, f"{key} is documented with a default"
        value = written.strip("`")
        if isinstance(default, bool):
            assert value == str(default).lower(), key
        elif isinstance(default, float):
            assert loader.parse_duration(value) == default, key
        elif isinstance(default, tuple):
            assert value == "[]" and default == (), key
        else:
            assert value == str(default), key
        checked += 1
    assert checked >= 30, checked
