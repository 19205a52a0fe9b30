"""WebSocket relay: the upstream handshake first, then frames both ways until either side closes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from .errors import InvalidRequest, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("gateway.websocket")
# aiohttp holds a whole message in memory: bound it, or one frame could exhaust the gateway.
MAX_MESSAGE = 4 * 1024 * 1024

# ws_connect makes its own handshake; the client's would clash with it.
_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
              "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept")


def connection_tokens(headers: MultiMapping[str]) -> set[str]:
    """The options named in ``Connection`` headers, lower-cased."""
    return {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}


def is_upgrade(request: web.Request) -> bool:
    return (request.method == "GET" and "upgrade" in connection_tokens(request.headers)
            and request.headers.get("Upgrade", "").lower() == "websocket")


async def relay(request: web.Request, http: aiohttp.ClientSession, url: URL,
                headers: CIMultiDict[str], handshake_timeout: float,
                session_end: Callable[[], Coroutine[Any, Any, None]] | None = None
                ) -> web.StreamResponse:
    """Relay a WebSocket; ``session_end()`` completes when the user's session ends (logout),
    which closes both sides with 1008. It is called only once both sides are connected."""
    protocols = [p.strip() for v in request.headers.getall("Sec-WebSocket-Protocol", [])
                 for p in v.split(",") if p.strip()]
    for name in _HANDSHAKE:
        headers.popall(name, None)
    # Refuse a broken client handshake before dialling the upstream.
    client = web.WebSocketResponse(autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE)
    if not client.can_prepare(request).ok:
        raise InvalidRequest("invalid WebSocket handshake (Sec-WebSocket-Key/Version)")
    try:
        # The route timeout bounds the handshake; a live socket may stay open for hours.
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
        tasks = {asyncio.ensure_future(_pump(client, upstream)),
                 asyncio.ensure_future(_pump(upstream, client))}
        ended = asyncio.ensure_future(session_end()) if session_end is not None else None
        try:
            done, _ = await asyncio.wait(tasks | ({ended} if ended else set()),
                                         return_when=asyncio.FIRST_COMPLETED)
            if ended is not None and ended in done and not ended.cancelled() \
                    and ended.exception() is None:
                for task in tasks:
                    task.cancel()
                reason = b"session ended"
                await upstream.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=reason)
                await client.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=reason)
        finally:
            for task in (*tasks, *([ended] if ended else [])):
                task.cancel()
            await asyncio.gather(*tasks, *([ended] if ended else []), return_exceptions=True)
    return client


async def _pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    while True:
        msg = await source.receive()
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
