"""WebSocket relay: the upstream handshake first, then frames both ways until either side closes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .headers import WEBSOCKET_HANDSHAKE, connection_tokens
from .errors import InvalidRequest, UpstreamTimeout, UpstreamUnavailable
from .config import Route

log = logging.getLogger("gateway.websocket")
# aiohttp holds a whole message in memory: bound it, or one frame could exhaust the gateway.
MAX_MESSAGE = 4 * 1024 * 1024

def is_upgrade(request: web.Request) -> bool:
    return (request.method == "GET" and "upgrade" in connection_tokens(request.headers)
            and request.headers.get("Upgrade", "").lower() == "websocket")


async def relay(request: web.Request, http: aiohttp.ClientSession, url: URL,
                headers: CIMultiDict[str], route: Route,
                session_end: Callable[[], Coroutine[Any, Any, None]] | None = None
                ) -> web.StreamResponse:
    """Relay a WebSocket; ``session_end()`` completes when the user's session ends (logout),
    which closes both sides with 1008; it is called only once both sides are connected. A
    socket with no frame either way for the route's ``read_timeout`` is closed with 1001."""
    # The handshake is one upstream exchange: connecting, then the answer's silence; the
    # route's timeout, when set, bounds it as a whole (not the socket's life).
    handshake_timeout = route.connect_timeout + route.read_timeout
    if route.timeout is not None:
        handshake_timeout = min(handshake_timeout, route.timeout)
    protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", [])
                 for p in v.split(",") if p.strip()]
    for name in WEBSOCKET_HANDSHAKE:  # ws_connect makes its own; the client's would clash
        headers.popall(name, None)
    # Refuse a broken client handshake before dialling the upstream.
    client = web.WebSocketResponse(autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE)
    if not client.can_prepare(request).ok:
        raise InvalidRequest("invalid WebSocket handshake (Sec-WebSocket-Key/Version)")
    try:
        # Only the handshake is bounded so; a live socket may stay open for hours.
        async with asyncio.timeout(handshake_timeout):
            upstream = await http.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"), headers=headers,
                protocols=protocols, autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE,
                compress=0,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=handshake_timeout))
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status == 101:  # upgraded, but not a valid WebSocket answer
            raise UpstreamUnavailable("the upstream's WebSocket handshake was invalid") from None
        # The upstream refused the upgrade: the client gets its answer, not ours.
        return _refusal(exc.status, exc.message, exc.headers)
    except asyncio.TimeoutError:
        log.warning("websocket upstream handshake timed out after %gs", handshake_timeout)
        raise UpstreamTimeout("the upstream did not accept the WebSocket in time") from None
    except aiohttp.ClientError as exc:
        log.warning("websocket upstream unavailable: %s", type(exc).__name__)
        raise UpstreamUnavailable("the upstream is unavailable") from None

    # autoping/autoclose off: pings, pongs and close frames are relayed, not answered here,
    # so each side sees the other's close code and reason.
    client = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                                   autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE)
    try:
        await client.prepare(request)
    except BaseException:
        await upstream.close(code=aiohttp.WSCloseCode.GOING_AWAY)
        raise
    async with upstream:
        activity = _Activity()
        tasks = {asyncio.ensure_future(_pump(client, upstream, activity)),
                 asyncio.ensure_future(_pump(upstream, client, activity))}
        idle = asyncio.ensure_future(_idle(activity, route.read_timeout))
        ended = asyncio.ensure_future(session_end()) if session_end is not None else None
        watchers = {idle} | ({ended} if ended else set())
        try:
            done, _ = await asyncio.wait(tasks | watchers, return_when=asyncio.FIRST_COMPLETED)
            closing = None
            if ended is not None and ended in done and not ended.cancelled() \
                    and ended.exception() is None:
                closing = aiohttp.WSCloseCode.POLICY_VIOLATION, b"session ended"
            elif idle in done and not done & tasks:
                log.info("websocket idle for %gs: closed", route.read_timeout)
                closing = aiohttp.WSCloseCode.GOING_AWAY, b"idle timeout"
            if closing is not None:
                for task in tasks:
                    task.cancel()
                code, reason = closing
                await upstream.close(code=code, message=reason)
                await client.close(code=code, message=reason)
        finally:
            for task in (*tasks, *watchers):
                task.cancel()
            await asyncio.gather(*tasks, *watchers, return_exceptions=True)
    return client


class _Activity:
    """When a frame last went through, either way."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = asyncio.get_running_loop().time()


async def _idle(activity: _Activity, read_timeout: float) -> None:
    """Complete once no frame went either way for ``read_timeout`` seconds.

    nginx applies proxy_read_timeout to an upgraded connection ("the connection will be
    closed if the proxied server does not transmit any data within 60 seconds",
    nginx.org/en/docs/http/websocket.html), as Envoy does its idle_timeout, but both just
    drop the TCP connection, which wx.onSocketClose reports as an abnormal 1006. Here either
    side's frames (a client's heartbeat too) keep the socket, and it ends with a close frame:
    1001 Going Away (RFC 6455 §7.4.1) — the gateway ends it, nothing went wrong (1011).
    """
    loop = asyncio.get_running_loop()
    while (left := activity.last + read_timeout - loop.time()) > 0:
        await asyncio.sleep(left)


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                activity: _Activity) -> None:
    loop = asyncio.get_running_loop()
    while True:
        msg = await source.receive()
        activity.last = loop.time()
        if msg.type == WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type == WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            # The source closed: pass its code and reason on, then finish its handshake.
            reason = (msg.extra or "").encode()
            await sink.close(code=msg.data, message=reason)
            await source.close(code=msg.data, message=reason)
            return
        elif msg.type == WSMsgType.CLOSING:
            return  # the other pump is closing this socket on its peer's behalf
        else:  # CLOSED or ERROR (e.g. a message over MAX_MESSAGE): aiohttp closed the source
            await sink.close(code=aiohttp.WSCloseCode.GOING_AWAY)
            return


def _refusal(status: int, reason: str, headers: MultiMapping[str] | None) -> web.Response:
    response = web.Response(status=status, reason=reason or None)
    for name, value in (headers or CIMultiDict()).items():
        if name.lower() not in ("content-length", "transfer-encoding", "connection", "upgrade"):
            response.headers.add(name, value)
    return response
