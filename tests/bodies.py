"""Large bodies made and checked 64 KiB at a time, and an aiohttp upstream that generates
downloads and swallows uploads without ever holding one. test_streaming.py and
bench/stream.py both use them."""

from __future__ import annotations

import hashlib
from typing import AsyncIterator

from aiohttp import web

CHUNK = 64 * 1024

# A fixed pseudo-random block; chunk i is its index followed by the block's tail, so lost,
# repeated or reordered chunks change the digest.
BLOCK = hashlib.shake_256(b"wx-gateway streaming test").digest(CHUNK)


def chunk_at(i: int, size: int = CHUNK) -> bytes:
    return (i.to_bytes(8, "big") + BLOCK[8:])[:size]


def chunks(n: int) -> list[int]:
    """The sizes of the 64 KiB chunks that make up n bytes."""
    return [CHUNK] * (n // CHUNK) + ([n % CHUNK] if n % CHUNK else [])


def expected_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for i, size in enumerate(chunks(n)):
        digest.update(chunk_at(i, size))
    return digest.hexdigest()


async def body_stream(n: int) -> AsyncIterator[bytes]:
    for i, size in enumerate(chunks(n)):
        yield chunk_at(i, size)


# --- the upstream ---------------------------------------------------------------------------


async def download(request: web.Request) -> web.StreamResponse:
    """``GET /public/download/{n}[/chunked]``: n bytes of chunks, with Content-Length or
    chunked framing."""
    n = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.match_info["mode"] == "/chunked":
        response.enable_chunked_encoding()
    else:
        response.content_length = n
    await response.prepare(request)
    for i, size in enumerate(chunks(n)):
        await response.write(chunk_at(i, size))
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    """``POST /public/upload[?verify=1]``: counts the body (and with ``verify``, hashes it:
    a benchmark leaves that CPU out) and says how it was framed."""
    digest = hashlib.sha256() if "verify" in request.query else None
    count = 0
    async for chunk in request.content.iter_chunked(CHUNK):
        count += len(chunk)
        if digest is not None:
            digest.update(chunk)
    return web.json_response({
        "bytes": count, "sha256": digest.hexdigest() if digest is not None else None,
        "content_length": request.headers.get("Content-Length"),
        "transfer_encoding": request.headers.get("Transfer-Encoding")})


def stream_app() -> web.Application:
    app = web.Application()
    app.router.add_get(r"/public/download/{n:\d+}{mode:(/chunked)?}", download)
    app.router.add_post("/public/upload", upload)
    return app
