"""Who the client is: X-Forwarded-* believed only from ``trusted_proxies``."""

from __future__ import annotations

import ipaddress
import re

from aiohttp import web

from .config import Config

_SANE_HOST = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")


def _chain(request: web.Request) -> list[str]:
    return [a.strip() for v in request.headers.getall("X-Forwarded-For", [])
            for a in v.split(",") if a.strip()]


def client_address(request: web.Request, config: Config) -> str:
    """The client's IP: the direct peer, or — behind trusted proxies — the nearest address in
    X-Forwarded-For that is not itself a trusted proxy (a proxy is never the client)."""
    peer = request.remote or ""
    if not config.is_trusted_proxy(peer):
        return peer
    chain = _chain(request)
    for address in reversed(chain):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return peer  # a malformed hop: nothing to its left can be believed
        if not config.is_trusted_proxy(address):
            return address
    return chain[0] if chain else peer


def forwarded_headers(request: web.Request, config: Config) -> dict[str, str]:
    """X-Forwarded-For/Proto/Host for the upstream: appended to when the direct peer is a
    trusted proxy, otherwise replaced, since anyone can send them."""
    peer = request.remote or ""
    proto, host, chain = request.scheme, request.host, peer
    if config.is_trusted_proxy(peer):
        sent = ", ".join(_chain(request))
        chain = f"{sent}, {peer}" if sent and peer else (sent or peer)
        sent_proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
        proto = sent_proto if sent_proto in ("http", "https") else proto
        sent_host = request.headers.get("X-Forwarded-Host", "").strip()
        host = sent_host if _SANE_HOST.match(sent_host) else host
    headers = {"X-Forwarded-Proto": proto}
    if chain:
        headers["X-Forwarded-For"] = chain
    if host:
        headers["X-Forwarded-Host"] = host
    return headers
