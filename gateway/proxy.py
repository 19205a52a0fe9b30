"""Reverse proxy: match route → authenticate → rewrite headers → forward → stream back."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import expectation, pool, websocket
from .auth import Identity, bearer_token, identity_headers
from .config import Config, IdentityHeaders, Route
from .headers import CLAIM_SPELLING, GATEWAY_SET, HOP_BY_HOP, connection_tokens, spelling
from .config import AuthMode
from .forwarded import forwarded_headers
from .errors import (AppForbidden, ForbiddenRole, InvalidPath, InvalidRequest, NotFound,
                     RequestTimeout, StoreUnavailable, Unauthorized, UpstreamTimeout,
                     UpstreamUnavailable)
from .services import Services
from .sessions import Session
from .state import IDENTITY, REQUEST_ID, ROUTE_LABEL, SERVICES, UPSTREAM_SECONDS

log = logging.getLogger("gateway.proxy")

_SMALL_BODY = 64 * 1024
SESSION_RECHECK = 15.0  # seconds between checks that an open WebSocket's session still lives
# IIS decodes the non-standard %uXXXX escape (e.g. %u0061 for "a"); nothing else does.
_IIS_ESCAPE = re.compile(r"%u[0-9a-f]{4}")
_NOT_RELAYED = HOP_BY_HOP | {"x-request-id"}  # response headers the gateway sets itself
_STRICTNESS: dict[AuthMode, int] = {"public": 0, "optional": 1, "required": 2}
# a dot or space ending a segment (";params" may follow), in any Unicode spelling NFKC maps
_TRAILING_DOT = re.compile(r"[. ](?:[/;]|$)|[^\x00-\x7f]")


def request_path(raw_path: str) -> str:
    """The decoded path to match routes on; ``InvalidPath`` for anything ambiguous.

    The path is forwarded exactly as received, so rather than normalising it (and forwarding
    something the client did not send), every form that different servers could resolve
    differently is refused: a fragment ("#"), dot segments, empty segments, encoded or back slashes, NUL and
    control characters, invalid UTF-8 (overlong encodings), double-encoded dots or slashes,
    and IIS's %u escapes.
    """
    path = raw_path.partition("?")[0]
    if not path.startswith("/"):
        raise InvalidPath("the request path must start with '/'")
    if "#" in path:
        # RFC 9112 §3.2: no fragment in a request target; servers that parse the target as a
        # URL (yarl, Node's url.parse, httptools) cut it off, and "/admin#x" is "/admin" there.
        raise InvalidPath("the request path contains a '#'")
    lowered = path.lower()
    if "//" in path or "\\" in path or "%2f" in lowered or "%5c" in lowered:
        raise InvalidPath("the request path contains an empty segment or an (encoded) slash")
    if "%u" in lowered and _IIS_ESCAPE.search(lowered):
        raise InvalidPath("the request path contains a %u escape")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPath("the request path is not valid UTF-8 once decoded") from None
    _refuse_ambiguous(decoded)
    if not decoded.isascii():
        # what best-fit and NFKC decoders make of it: full-width "／．．／" is "/../"
        _refuse_ambiguous(unicodedata.normalize("NFKC", decoded))
    return decoded


def _refuse_ambiguous(decoded: str) -> None:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise InvalidPath("the request path contains a control character")
    if "//" in decoded or "\\" in decoded:
        raise InvalidPath("the request path contains an empty segment or a back slash")
    # ";params" included: Tomcat, Jetty and Spring drop them before resolving "..;" (and
    # Tomcat and Spring's UrlPathHelper collapse the "//" that "/;x/" leaves); so are trailing
    # spaces, which Windows drops (".. " may become "..").
    # Three or more dots are a name to Windows, and stay allowed (learn.microsoft.com/en-us/
    # dotnet/standard/io/file-path-formats, "Trim characters").
    segments = decoded.split("/")
    for i, seg in enumerate(segments):
        bare = seg.split(";", 1)[0]
        if bare in (".", "..") or (" " in bare and not bare.rstrip(". ")):
            raise InvalidPath("the request path contains a '.' or '..' segment")
        if seg and not bare and 0 < i < len(segments) - 1:
            raise InvalidPath("the request path contains a segment of only ';params'")
    lowered = decoded.lower()
    if any(enc in lowered for enc in ("%2e", "%2f", "%5c")) or _IIS_ESCAPE.search(lowered):
        raise InvalidPath("the request path contains a double-encoded dot or slash")


@dataclass(frozen=True, slots=True)
class Access:
    """What a request must present: the strictest of every route its path could resolve to."""

    auth: AuthMode
    limits: tuple[Route, ...] = ()  # routes with ``apps``: the token's appid must be in each
    # routes with ``roles``: the session must have one of each route's roles
    role_limits: tuple[Route, ...] = ()


def _resolutions(decoded: str) -> set[str]:
    """The paths ``decoded`` may become in common upstream frameworks (case folding is left to
    ``Config.routes_matching``): each transformation applied or not, in every combination."""
    forms = {decoded}
    if not decoded.isascii():
        # Best-fit and NFKC decoders (IIS, some Java and .NET stacks) turn full-width letters
        # and other compatibility forms into ASCII ones, which may then spell a route.
        forms.add(unicodedata.normalize("NFKC", decoded))  # refused by request_path if unsafe
    if ";" in decoded or not decoded.isascii():  # after NFKC, a full-width ";" is one too
        # Tomcat, Jetty and Spring drop ";params" from every segment before mapping (the
        # Servlet 6 specification's "URI Path Canonicalization").
        forms |= {"/".join(seg.split(";", 1)[0] for seg in f.split("/")) for f in forms}
    if _TRAILING_DOT.search(decoded):
        # Windows (IIS) drops trailing dots and spaces from names; a name left empty ("...")
        # is taken as if absent.
        forms |= {_without_trailing_dots(f) for f in forms}
    if "." in decoded.rstrip("/").rpartition("/")[2] or not decoded.isascii():
        # Spring MVC's suffix pattern match (on by default before Spring 5.3: docs.spring.io,
        # "@RequestMapping", "Suffix Match"): "/admin.json" runs the handler of "/admin".
        forms |= {_without_suffix(f) for f in forms}
    return forms


def _without_trailing_dots(path: str) -> str:
    first, *middle, last = (seg.rstrip(". ") for seg in path.split("/"))
    return "/".join([first, *(seg for seg in middle if seg), last])


def _without_suffix(path: str) -> str:
    body = path.rstrip("/")
    head, _, last = body.rpartition("/")
    stem = last.partition(".")[0]
    return f"{head}/{stem}{path[len(body):]}" if stem else path


def access_for(config: Config, decoded: str, route: Route) -> Access:
    """The auth ``route`` needs, made as strict as any route the path could resolve to in a
    common upstream framework (Express and ASP.NET Core route case-insensitively, too). Most
    paths (lower-case ASCII, no ";", no dot or space) have no other resolution: they are
    decided by their own route alone."""
    if (not config.folds and decoded.isascii() and ";" not in decoded and "." not in decoded
            and " " not in decoded and decoded == decoded.lower()):
        return Access(route.auth, (route,) if route.apps else (),
                      (route,) if route.roles else ())
    strictest = route.auth
    limited = [route] if route.apps else []
    role_limited = [route] if route.roles else []
    for form in _resolutions(decoded):
        for other in config.routes_matching(form):
            if _STRICTNESS[other.auth] > _STRICTNESS[strictest]:
                strictest = other.auth
            if other.apps and all(other is not r for r in limited):
                limited.append(other)
            if other.roles and all(other is not r for r in role_limited):
                role_limited.append(other)
    return Access(strictest, tuple(limited), tuple(role_limited))


_ROUTED_PATHS = 4096  # paths whose routing is remembered, per configuration...
_ROUTED_LENGTH = 256  # ...if no longer than this: a few MB at most, whatever clients send
_Routing = tuple[str, tuple[Route, Access] | None]
_routed: tuple[Config | None, dict[str, _Routing]] = (None, {})


def _routing(config: Config, raw_path: str) -> _Routing:
    """``request_path``, ``route_for`` and ``access_for`` of a path (without its query): a
    pure function of the path and the configuration, so the answers for the paths clients
    keep asking are remembered (refused paths raise each time)."""
    global _routed
    owner, known = _routed
    if owner is not config:
        owner, known = _routed = (config, {})
    found = known.get(raw_path)
    if found is None:
        path = request_path(raw_path)
        route = config.route_for(path)
        found = (path, None if route is None else (route, access_for(config, path, route)))
        if len(raw_path) <= _ROUTED_LENGTH:
            if len(known) >= _ROUTED_PATHS:
                known.clear()
            known[raw_path] = found
    return found


def close_after_upgrade_attempt(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's parser treats a connection that asked for an upgrade as taken over, whatever
    the answer, so it can carry no further request: close it after this response."""
    if "upgrade" in connection_tokens(request.headers):
        response.force_close()


@functools.lru_cache(maxsize=8)
def _dropped(names: IdentityHeaders, assertion: str) -> frozenset[str]:
    """Request headers never forwarded, as spelled by ``spelling``: built once per config."""
    return frozenset(map(spelling, (*HOP_BY_HOP, *GATEWAY_SET, *names.names(), assertion)))


def forward_headers(request: web.Request, identity: Identity | None, services: Services,
                    route: Route, request_id: str) -> CIMultiDict[str]:
    config = services.config
    drop = _dropped(config.identity_headers, config.identity_assertion.header)
    if "Connection" in request.headers:
        drop = drop | {spelling(t) for t in connection_tokens(request.headers)}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        # Clients (and some proxies) spell header names loosely; any spelling that an upstream
        # framework could read as an identity header is a forgery attempt and goes.
        folded = spelling(name)
        if folded not in drop and not folded.startswith(CLAIM_SPELLING):
            if not value.isascii() and _undecodable(value):
                raise InvalidRequest(f"the value of {name} is not valid UTF-8")
            out.add(name, value)
    out.update(forwarded_headers(request, config))
    out["X-Request-ID"] = request_id
    if route.preserve_host and request.host:
        out["Host"] = request.host
    if identity is not None:
        # the same for every request of this identity under this configuration
        built = identity.memo.get("headers")
        if built is None or built[0] is not config:
            built = identity.memo["headers"] = (config, identity_headers(identity, config))
        out.update(built[1])
        if services.asserter is not None:
            out[config.identity_assertion.header] = services.asserter.assertion(
                identity.session, route.audience or route.origin)
    return out


def _undecodable(value: str) -> bool:
    """Whether a parsed header value holds bytes that were not UTF-8 (obs-text such as
    ``\\xff``). aiohttp's parser keeps them as surrogate escapes and its header writer
    silently drops those, so such a value could only be forwarded altered."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return True
    return False


async def handle(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES].current
    request[ROUTE_LABEL] = "none"  # until a route matches: never the raw path (cardinality)
    path, matched = _routing(services.config, request.raw_path.partition("?")[0])
    if matched is None:
        raise NotFound(f"no route for {path}")
    route, access = matched
    request[ROUTE_LABEL] = route.label
    identity = None
    if access.auth != "public":
        # A cached identity is checked without a coroutine: only a cache miss awaits Redis.
        identity = _cached(request, access)
        identity = (_authorised(request, access, identity) if identity is not None
                    else await _authenticate(request, access))
    headers = forward_headers(request, identity, services, route, request[REQUEST_ID])
    if websocket.is_upgrade(request):
        if request.content_length or "Transfer-Encoding" in request.headers:
            # Once upgraded, the connection carries frames: a body has nowhere to go (and
            # aiohttp's parser would wait for it, as frames, until the timeout).
            raise InvalidRequest("a WebSocket upgrade request must not have a body")
        url = URL(f"{route.origin}{route.base_path}{request.raw_path}", encoded=True)
        # A factory: no coroutine exists unless the relay gets as far as needing it.
        end = (functools.partial(session_end, services, identity, access.role_limits)
               if identity is not None else None)
        return await websocket.relay(request, services.http, url, headers, route, end)

    if "Expect" in request.headers:
        await expectation.answer(request)
    body = await _request_body(request) if request.body_exists else None
    started = time.perf_counter()
    # read_timeout bounds each silence (pool.send until the headers, _relay between reads of
    # the body); the route's timeout, when set, bounds the whole exchange, body included.
    deadline = (None if route.timeout is None
                else asyncio.get_running_loop().time() + route.timeout)
    try:
        upstream = await services.pool.send(
            route.upstream, request.method, route.base_path + request.raw_path, headers, body,
            route.connect_timeout, route.read_timeout, deadline)
    except TimeoutError:
        log.warning("upstream for %s timed out (read_timeout %gs, timeout %s)", route.path,
                    route.read_timeout, route.timeout)
        raise UpstreamTimeout(f"the upstream for {route.path} did not answer in time") from None
    except pool.FAILURES as exc:
        _raise_if_client_stalled(request)
        log.warning("upstream for %s unavailable: %s", route.path, type(exc).__name__)
        raise UpstreamUnavailable(f"the upstream for {route.path} is unavailable") from None
    request[UPSTREAM_SECONDS] = elapsed = time.perf_counter() - started
    services.metrics.upstream_answered(route.label, elapsed)
    try:
        answer = _response_headers(request, upstream)
        length = upstream.content_length
        if length is not None and length <= _SMALL_BODY and request.method != "HEAD":
            received = upstream.body
            if received.is_eof() and received.exception() is None:  # came with the headers
                return _small_response(request, upstream, answer, received.read_nowait())
            return await _relay_small(request, upstream, answer, deadline, route.read_timeout)
        return await _relay(request, upstream, answer, deadline, route.read_timeout)
    finally:
        upstream.release()


async def _request_body(request: web.Request) -> pool.Body:
    """A small body is read whole, to go out with the headers in one write (and be sent again
    if a pooled connection fails under it); anything else streams."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= _SMALL_BODY:
        return await request.content.read()  # not request.read(): client_max_size is ours
    return request.content


def _raise_if_client_stalled(request: web.Request) -> None:
    """A streamed body that stopped arriving (client_body_timeout) aborts the exchange with
    the upstream: that is the client's failure, not the upstream's."""
    stalled = request.content.exception()
    if isinstance(stalled, RequestTimeout):
        raise RequestTimeout(stalled.message) from None


async def session_end(services: Services, identity: Identity,
                      role_limits: tuple[Route, ...] = ()) -> None:
    """Complete when the session ends, or no longer has a role the route needs: checked at
    once on its invalidation (logout, a new login hook answer, any replica), and in any case
    within SESSION_RECHECK seconds (the cache may be off). An invalidation that only changed
    the session (a refresh that asked the login hook again, a stored phone number) keeps the
    socket open."""
    ended = asyncio.Event()
    cache = services.authenticator.cache
    unwatch = cache.watch(identity.session.sid, ended.set) if cache is not None else None
    try:
        while True:
            try:
                await asyncio.wait_for(ended.wait(), SESSION_RECHECK)
                ended.clear()
                invalidated = True
            except asyncio.TimeoutError:
                invalidated = False
            try:
                session = await services.sessions.get(identity.session.sid)
            except StoreUnavailable:
                if invalidated:
                    return  # the session changed and cannot be read: fail closed
                continue  # an open socket is not cut for a Redis blip; new ones fail closed
            if session is None or not _has_roles(session, role_limits):
                return
    finally:
        if unwatch is not None:
            unwatch()


def _has_roles(session: Session, role_limits: tuple[Route, ...]) -> bool:
    """Whether the session has one of the roles of each route in ``role_limits``."""
    roles = session.user.roles if session.user is not None else ()
    return all(any(role in limit.roles for role in roles) for limit in role_limits)


def _cached(request: web.Request, access: Access) -> Identity | None:
    """The session cache's identity for a ``required`` route's token; None otherwise."""
    if access.auth != "required":
        return None
    token = bearer_token(request.headers.getall("Authorization", []))
    return (request.app[SERVICES].current.authenticator.cached(token)
            if token is not None else None)


async def _authenticate(request: web.Request, access: Access) -> Identity | None:
    if access.auth == "public":
        return None
    authenticator = request.app[SERVICES].current.authenticator
    token = bearer_token(request.headers.getall("Authorization", []))
    if access.auth == "required":
        # fresh: _cached asked the cache already; a miss goes to Redis (and fills the cache)
        identity = await authenticator.authenticate(token, fresh=True)
    elif token is None:
        return None
    else:
        try:
            identity = await authenticator.authenticate(token)
        except Unauthorized:
            return None  # optional: an invalid token just means anonymous
        # StoreUnavailable propagates: a token that cannot be checked is never downgraded.
    return _authorised(request, access, identity)


def _authorised(request: web.Request, access: Access,
                identity: Identity | None) -> Identity | None:
    """``identity``, once its app and roles are allowed on the route (raises otherwise)."""
    if identity is None:
        return None
    for limit in access.limits:
        if identity.session.appid not in limit.apps:
            raise AppForbidden(f"tokens of {identity.session.appid} are not accepted on "
                               f"{limit.path}")
    for limit in access.role_limits:
        if not _has_roles(identity.session, (limit,)):
            raise ForbiddenRole(f"{limit.path} needs a role this session does not have")
    request[IDENTITY] = identity
    return identity


def _next_read(deadline: float | None, read_timeout: float) -> float:
    """When the next read of the upstream's body must have returned: after ``read_timeout``
    of silence, and never past the whole exchange's deadline."""
    silence = asyncio.get_running_loop().time() + read_timeout
    return silence if deadline is None else min(silence, deadline)


def _response_headers(request: web.Request, upstream: pool.Exchange) -> list[tuple[str, str]]:
    named = connection_tokens(upstream.headers)  # mostly "keep-alive": hop-by-hop already
    drop = _NOT_RELAYED if named <= HOP_BY_HOP else _NOT_RELAYED | named
    # A list: the response makes its CIMultiDict of it once (it copies whatever it is given).
    headers = [(k, v) for k, v in upstream.headers.items() if k.lower() not in drop]
    if any(not v.isascii() and _undecodable(v) for _, v in headers):
        log.warning("upstream for %s sent a header value that is not UTF-8", request[ROUTE_LABEL])
        raise UpstreamUnavailable("the upstream's response has a header value that is not UTF-8")
    headers.append(("X-Request-ID", request[REQUEST_ID]))  # the gateway's, never the upstream's
    return headers


def _small_response(request: web.Request, upstream: pool.Exchange,
                    headers: list[tuple[str, str]], body: bytes) -> web.Response:
    """A small body goes out with the headers in one write."""
    small = web.Response(status=upstream.status, reason=upstream.reason, body=body,
                         headers=headers)
    close_after_upgrade_attempt(request, small)
    return small


async def _relay_small(request: web.Request, upstream: pool.Exchange,
                       headers: list[tuple[str, str]], deadline: float | None,
                       read_timeout: float) -> web.Response:
    """A small body still on its way is read whole (bounded by its Content-Length): an
    upstream failing mid-body still gets an honest 502."""
    parts = []
    try:
        while True:
            async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                chunk = await upstream.body.readany()
            if not chunk:
                break
            parts.append(chunk)
    except TimeoutError:
        raise UpstreamTimeout("the upstream did not finish its response in time") from None
    except pool.FAILURES:
        raise UpstreamUnavailable("the upstream broke off its response") from None
    return _small_response(request, upstream, headers, b"".join(parts))


async def _relay(request: web.Request, upstream: pool.Exchange, headers: list[tuple[str, str]],
                 deadline: float | None, read_timeout: float) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=headers)
    close_after_upgrade_attempt(request, response)
    await response.prepare(request)
    try:
        while True:
            # read(n) returns what has arrived, up to n bytes: each chunk goes on at once.
            async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                chunk = await upstream.body.read(pool.CHUNK)
            if not chunk:
                break
            # A client that takes nothing for as long is cut too (nginx's send_timeout, here
            # the read timeout): else it could hold the upstream's stream open forever.
            async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                await response.write(chunk)
    except (TimeoutError, *pool.FAILURES) as exc:
        # Headers are gone already: the only honest signal left is a broken connection.
        log.warning("relaying the body for %s stopped: %s", request[ROUTE_LABEL],
                    type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
