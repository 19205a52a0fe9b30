"""Property-based fuzzing of POST /auth/login.

Hypothesis draws arbitrary bodies (random bytes, any JSON value, objects whose ``code`` and
``appid`` are of any JSON type, huge and deeply nested documents, unicode, several text
encodings, fixed-length or chunked) with arbitrary ``Content-Type`` headers, and sends them to
an in-process gateway whose WeChat is the simulator (single-use codes) and whose Redis is real.

The property, for every request:

* the status is one of the login statuses in docs/endpoints.md (200/400/401/403/413/429/502/503/504),
  never 500, and an error carries the documented ``error`` code for that status in exactly the
  ``{"error", "message"}`` shape, as ``application/json``;
* where the outcome follows from the input alone, it is that outcome: a body over 16 KiB is
  413, a body that is not a JSON object or has a bad ``code`` is 400 ``invalid_request``, a bad
  ``appid`` is 400 ``unknown_app``/``invalid_request``, an ordinary valid code is 200 the first
  time (with the simulator's openid for that code) and 401 ``invalid_code`` after that (or,
  with the login rate limit on, 429 ``rate_limited`` without using the code up);

and after the run Redis is consistent: every key under the test's ``key_prefix`` is a session
hash with all six fields and a TTL, one per 200 answer, for the openids those answers gave
(plus, with the rate limit on, only the limiter's own expiring keys).

It runs twice: with ``auth.rate_limit`` off (as the other tests configure it) and with tight
limits that trip during the run. Each run is 300 derandomized examples (a few seconds).

Hypothesis is synchronous, the gateway client lives on the test's event loop: the ``@given``
function runs in a worker thread (``asyncio.to_thread``) and submits each request to the loop
with ``asyncio.run_coroutine_threadsafe``, so the loop keeps serving while hypothesis waits.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import APPID, APPID2, GatewayFactory
from gateway import sessions as S
from gateway.testing import simulator

MAX_BODY = 16 * 1024  # the login endpoint's documented body limit (endpoints.MAX_BODY_BYTES)
MAX_CODE = 128
SESSION_FIELDS = {f.encode() for f in (S.OPENID, S.UNIONID, S.APPID, S.CREATED_AT,
                                       S.EXPIRES_AT, S.SESSION_KEY)}

# The login error table in docs/endpoints.md: status -> the error codes allowed with it.
ERRORS: dict[int, set[str]] = {
    400: {"invalid_request", "unknown_app"},
    401: {"invalid_code"},
    403: {"user_blocked"},
    413: {"payload_too_large"},
    429: {"rate_limited"},
    502: {"wechat_error"},
    503: {"wechat_unavailable", "store_unavailable"},
    504: {"wechat_timeout"},
}
ALLOWED_STATUSES = {200, *ERRORS}

# Codes the simulator turns into a fault (gateway/testing/simulator/); anything else logs in.
_SIM_FAULT = re.compile(r"^((errcode|slow|http)-(-?\d+)-|errstr--?[^-]*-|garbage-|reset-|noopenid-)")

_ABSENT = object()  # a key left out of the object altogether

# --- strategies ----------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
                | st.text(max_size=64))
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.text(max_size=16), children, max_size=5)),
    max_leaves=20)

printable_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
valid_codes = st.text(printable_ascii, min_size=1, max_size=MAX_CODE)
simulator_faults = st.builds(
    lambda prefix, rest: prefix + rest,
    st.sampled_from(["errcode-40029-", "errcode-40163-", "errcode-40226-", "errcode-45011-",
                     "errcode--1-", "errcode-40001-", "errcode-0-", "http-500-", "http-404-",
                     "garbage-", "reset-", "noopenid-", "nounionid-", "slow-10-",
                     "slow-1500-"]),
    st.text(printable_ascii, max_size=16))
# Strings that are nearly valid codes: too long, empty, control or non-ASCII characters.
bad_codes = (st.just("") | st.text(printable_ascii, min_size=MAX_CODE + 1, max_size=300)
             | st.text(min_size=1, max_size=40).filter(
                 lambda s: not (s.isascii() and s.isprintable())))
huge_strings = st.builds(lambda c, n: c * n, st.characters(), st.integers(1_000, 40_000))
codes = valid_codes | simulator_faults | bad_codes | huge_strings | json_values
appids = (st.just(_ABSENT) | st.just(APPID) | st.just(APPID2) | st.just(APPID.upper())
          | st.just(APPID + " ") | json_values)


@st.composite
def login_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = draw(st.dictionaries(st.text(max_size=12), json_values, max_size=3))
    for key, strategy in (("code", codes), ("appid", appids)):
        value = draw(st.just(_ABSENT) | strategy) if key == "code" else draw(strategy)
        if value is _ABSENT:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def _nest(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"code":' * depth + b'"x"' + b"}" * depth
    return b'{"code": "c", "appid": ' + b"[" * depth + b"]" * depth + b"}"


deep_nesting = st.builds(_nest, st.integers(1, 8_000), st.sampled_from(["array", "object",
                                                                       "appid"]))
json_texts = st.builds(lambda value, ascii_: json.dumps(value, ensure_ascii=ascii_),
                       json_values | login_objects(), st.booleans())
encoded_json = st.builds(lambda text, enc: text.encode(enc, errors="surrogatepass"
                                                      if enc.startswith("utf") else "replace"),
                         json_texts, st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig",
                                                      "utf-16", "utf-32", "latin-1"]))
# Raw JSON text a serializer would not write: lone surrogates, huge numbers, NaN, duplicates.
odd_json = st.sampled_from([
    b'{"code": "\\ud800"}', b'{"code": "ok-\\udfff-code"}', b'{"appid": "\\ud800", "code": "a"}',
    b'{"code": "a", "appid": "\\ud83d"}', b'{"code": 1e999}', b'{"code": "a", "appid": 1e999}',
    b'{"code": NaN}', b'{"code": -Infinity}', b'{"code": "a", "code": 1}',
    b'{"code": "\\u0000"}', b'{"code": "a\\u0000b"}', b'\xef\xbb\xbf{"code": "bom"}',
    b"", b" ", b"null", b"{}", b"[]", b'"code"', b"{\"code\": \"a\"", b"\x00" * 100,
])
huge_numbers = st.builds(lambda n, where: (b'{"code": "a", "appid": %s}' if where else
                                          b'{"code": %s}') % (b"9" * n),
                         st.integers(4_000, 6_000), st.booleans())  # past int_max_str_digits
oversize = st.builds(lambda n, fill: json.dumps({"code": "big", "pad": fill * n}).encode(),
                     st.integers(MAX_BODY - 20, 200_000), st.sampled_from(["x", "\u00e9", "\U0001f600"]))


def _plausible(code: str, appid: Any, extra: dict[str, Any], ascii_: bool) -> bytes:
    obj = {**extra, "code": code}
    if appid is not _ABSENT:
        obj["appid"] = appid
    return json.dumps(obj, ensure_ascii=ascii_).encode()


# What a mini-program would send, give or take: most of these reach WeChat (the simulator).
plausible_logins = st.builds(_plausible, valid_codes | simulator_faults,
                             st.sampled_from([_ABSENT, _ABSENT, APPID, None, APPID2]),
                             st.dictionaries(st.text(max_size=8).filter(
                                 lambda k: k not in ("code", "appid")), json_values, max_size=2),
                             st.booleans())


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """``one_of`` with weights (hypothesis merges repeated branches of a plain ``one_of``)."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda s: s)


bodies = weighted((1, st.binary(max_size=2_000)), (2, encoded_json), (1, deep_nesting),
                  (1, odd_json), (1, huge_numbers), (1, oversize),
                  (2, st.builds(lambda obj: json.dumps(obj).encode(), login_objects())),
                  (5, plausible_logins))

header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    exclude_characters="\x7f"), max_size=200)
content_types = (st.none()
                 | st.sampled_from(["application/json", "application/json; charset=utf-8",
                                    "text/plain", "text/plain; charset=gbk",
                                    "application/x-www-form-urlencoded", "multipart/form-data",
                                    "multipart/form-data; boundary=xyz", "application/xml",
                                    "application/octet-stream", "", "*/*", "application/json; charset=utf-16",
                                    "application/json;;;", "; charset=", "text/html; charset=\"x\""])
                 | header_text)


@dataclass
class Request:
    body: bytes
    content_type: str | None
    chunked: bool


requests = st.builds(Request, bodies, content_types, st.booleans())


# --- the oracle ----------------------------------------------------------------------------


def expected(body: bytes) -> tuple[set[int], set[str] | None, str | None]:
    """(allowed statuses, allowed error codes or None for "per status", the code logged in).

    Mirrors what the error table in docs/endpoints.md fixes from the input alone, decoding with ``json.loads``
    on the bytes (any Content-Type: nothing restricts it, and wx.request's defaults vary)."""
    if len(body) > MAX_BODY:
        return {413}, {"payload_too_large"}, None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return {400}, {"invalid_request"}, None
    if not isinstance(doc, dict):
        return {400}, {"invalid_request"}, None
    code, appid = doc.get("code"), doc.get("appid")
    if (not isinstance(code, str) or not code or len(code) > MAX_CODE
            or not (code.isascii() and code.isprintable())):
        return {400}, {"invalid_request"}, None
    if appid is not None and not isinstance(appid, str):
        return {400}, {"invalid_request"}, None
    if appid is not None and appid != APPID:
        return {400}, {"unknown_app"}, None
    return ALLOWED_STATUSES - {400, 413}, None, code


@dataclass
class Tally:
    limited: bool  # the gateway's own login rate limit is on
    statuses: dict[int, int] = field(default_factory=dict)
    openids: list[str] = field(default_factory=list)  # one per 200
    used_codes: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


async def send(client: TestClient, req: Request) -> tuple[int, str, bytes]:
    headers = {} if req.content_type is None else {"Content-Type": req.content_type}
    skip = ["Content-Type"] if req.content_type is None else []
    data: Any = req.body
    if req.chunked:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(req.body), 4096):
                yield req.body[i:i + 4096]
        data = chunks()
    async with client.post("/auth/login", data=data, headers=headers,
                           skip_auto_headers=skip) as resp:
        return resp.status, resp.content_type, await resp.read()


def check(req: Request, status: int, content_type: str, raw: bytes, tally: Tally) -> None:
    statuses, error_codes, code = expected(req.body)
    assert status != 500, raw[:500]
    assert status in ALLOWED_STATUSES, (status, raw[:500])
    assert content_type == "application/json", (status, content_type, raw[:200])
    doc = json.loads(raw)
    if status == 200:
        assert set(doc) == {"token", "token_type", "expires_in", "openid", "unionid"}, doc
        assert doc["token_type"] == "Bearer" and isinstance(doc["token"], str) and doc["token"]
        assert isinstance(doc["expires_in"], int) and doc["expires_in"] > 0, doc
    else:
        assert set(doc) == {"error", "message"}, doc
        assert isinstance(doc["message"], str) and doc["message"], doc
        assert doc["error"] in ERRORS[status], (status, doc)
    assert status in statuses, (status, doc, statuses)
    if error_codes is not None:
        assert doc["error"] in error_codes, (doc, error_codes)
    with tally.lock:
        tally.statuses[status] = tally.statuses.get(status, 0) + 1
        if status == 200:
            tally.openids.append(doc["openid"])
        if code is None or _SIM_FAULT.match(code):
            return  # the simulator's fault codes may answer anything from the table
        if tally.limited and status == 429:
            return  # refused before WeChat saw the code, which stays unused
        fresh = code not in tally.used_codes
        tally.used_codes.add(code)
    # An ordinary code: the simulator logs in once per code, then answers 40163.
    if fresh:
        assert status == 200, (code, status, doc)
        assert doc["openid"] == simulator.openid_for(APPID, code), (code, doc)
        if code.startswith("nounionid-"):
            assert doc["unionid"] is None, doc
        else:
            assert doc["unionid"] == simulator.unionid_for(code), (code, doc)
    else:
        assert (status, doc.get("error")) == (401, "invalid_code"), (code, doc)


# The login rate limit (auth.rate_limit) off, as in the other tests, and on with limits tight
# enough to trip during the run (windows short enough that logins keep succeeding too).
LIMITS = {
    "off": {"ip_limit": 0, "app_limit": 0, "max_retries": 0},
    "on": {"ip_limit": 20, "ip_window": "1s", "app_limit": 60, "app_window": "2s",
           "max_retries": 3, "find_time": "2s", "ban_time": "300ms"},
}
# What the rate limiter may keep under the prefix: sliding windows, failure counts, bans.
_LIMITER_KEY = re.compile(r"^(rl:ip|rl:app|fail|ban):")


@pytest.mark.parametrize("limits", ["off", "on"], ids=["rate_limit_off", "rate_limit_on"])
async def test_login_survives_arbitrary_input_and_keeps_redis_consistent(
        make_gateway: GatewayFactory, redis: aioredis.Redis, key_prefix: str,
        limits: str) -> None:
    gw = await make_gateway(auth={"rate_limit": LIMITS[limits]})
    loop = asyncio.get_running_loop()
    tally = Tally(limited=limits == "on")

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example, HealthCheck.filter_too_much])
    @given(req=requests)
    def property_(req: Request) -> None:
        future = asyncio.run_coroutine_threadsafe(send(gw, req), loop)
        status, content_type, raw = future.result(timeout=30)
        check(req, status, content_type, raw, tally)

    failure: BaseException | None = None
    try:
        await asyncio.to_thread(property_)
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the Redis audit
        failure = exc

    # Whatever happened to single requests, Redis must be consistent: one complete, expiring
    # session hash per 200 answer, each user's index of them, and nothing else under the
    # prefix but, when it is on, the rate limiter's own expiring keys.
    problems: list[str] = []
    keys: list[bytes] = []
    openids: list[str] = []
    async for key in redis.scan_iter(match=f"{key_prefix}*", count=1000):
        name = key.decode()[len(key_prefix):]
        if tally.limited and _LIMITER_KEY.match(name):
            if await redis.pttl(key) == -1:
                problems.append(f"{key!r} never expires")
            continue
        if name.startswith("user:"):  # a user's index: live sids, expiring with the last
            members = await redis.zrange(key, 0, -1)
            if not members or await redis.ttl(key) <= 0:
                problems.append(f"{key!r}: an empty or unexpiring index")
            for sid in members:
                if not await redis.exists(f"{key_prefix}session:{sid.decode()}"):
                    problems.append(f"{key!r} indexes {sid!r}, which is no session")
            continue
        keys.append(key)
        if not name.startswith("session:"):
            problems.append(f"{key!r} is not a session key")
            continue
        if await redis.type(key) != b"hash":
            problems.append(f"{key!r} is a {await redis.type(key)!r}, not a hash")
            continue
        data = await redis.hgetall(key)
        if set(data) != SESSION_FIELDS:
            problems.append(f"{key!r} has fields {sorted(data)}")
        if await redis.ttl(key) <= 0:
            problems.append(f"{key!r} has no TTL ({await redis.ttl(key)})")
        openids.append(data.get(S.OPENID.encode(), b"").decode())
    ok = tally.statuses.get(200, 0)
    if len(keys) != ok:
        problems.append(f"{len(keys)} session keys for {ok} successful logins")
    if sorted(openids) != sorted(tally.openids):
        problems.append("the sessions' openids are not the ones the 200 answers gave")
    if failure is not None:
        if problems:
            raise AssertionError(f"Redis inconsistent: {problems}") from failure
        raise failure
    assert not problems, problems
    # The run exercised the interesting outcomes, not only one status.
    assert {200, 400, 401, 413} <= set(tally.statuses), tally.statuses
    if tally.limited:  # both sides of the limit were exercised
        assert ok >= 3 and tally.statuses.get(429, 0) >= 3, tally.statuses
    else:
        assert ok >= 10, tally.statuses


async def test_deeply_nested_json_is_invalid_request_not_500(gw: TestClient) -> None:
    """A small (< 16 KiB) but deeply nested JSON document makes ``json.loads`` raise
    RecursionError, which is not a ValueError (``_json_object`` must catch it too). README's
    error table: a body that is not a JSON object, or has no valid ``code``, is 400
    ``invalid_request`` - never 500."""
    for kind, depth in (("array", 2_000), ("array", 8_000), ("appid", 5_000),
                        ("object", 1_800)):
        body = _nest(depth, kind)
        assert len(body) <= MAX_BODY
        async with gw.post("/auth/login", data=body,
                           headers={"Content-Type": "application/json"}) as resp:
            doc = await resp.json()
            assert (resp.status, doc.get("error")) == (400, "invalid_request"), \
                (kind, depth, resp.status, doc)
