#!/usr/bin/env python3
"""The proxy a Python developer would write, as the gateway's yardstick: an aiohttp app with
one ``ClientSession``, a catch-all handler forwarding method, path, query and body to one
upstream with one fixed header added, and no auth.

    python bench/peer.py --port 8090 --upstream http://127.0.0.1:9000

Runs on uvloop when installed, as the gateway does, so the comparison is of the code only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from stream import serve  # noqa: E402

# What a hand-written proxy leaves out of both directions: hop-by-hop headers, and those
# aiohttp recomputes for the body it writes.
SKIP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length",
                  "upgrade", "te", "trailer", "proxy-connection"})


def create_app(upstream: str) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app[session_key].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
        headers["X-Proxied-By"] = "peer"
        body = await request.read() if request.body_exists else None
        async with request.app[session_key].request(
                request.method, upstream + request.path_qs, headers=headers, data=body,
                allow_redirects=False) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in SKIP}
            return web.Response(status=resp.status, body=payload, headers=out)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port")
    args = parser.parse_args()
    serve(lambda: [(create_app(args.upstream.rstrip("/")), args.port)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
