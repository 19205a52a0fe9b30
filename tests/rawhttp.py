"""A raw HTTP/1.1 client for tests: aiohttp's own client would normalise what they send."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Sequence

from aiohttp.test_utils import TestClient

WAIT = 10.0


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2:]


def build_request(method: str, target: str, header_lines: Sequence[bytes] = (),
                  host: str | None = "gateway.test", body: bytes = b"") -> bytes:
    """These header lines verbatim, plus Host, ``Connection: close`` (unless a Connection
    line is given) and Content-Length for a body."""
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    if host is not None:
        lines.append(f"Host: {host}".encode("latin-1"))
    lines.extend(header_lines)
    if not any(line.lower().startswith(b"connection:") for line in header_lines):
        lines.append(b"Connection: close")
    if body:
        lines.append(f"Content-Length: {len(body)}".encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def raw_exchange(host: str, port: int, payload: bytes) -> RawResponse:
    """Send exactly ``payload`` and read the answer until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head, f"no answer to {payload[:120]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines)]
    response = RawResponse(int(status_line.split()[1]), parsed, rest)
    if any("chunked" in v.lower() for v in response.header("Transfer-Encoding")):
        response.body = dechunk(rest)
    return response


async def raw_request(client: TestClient, method: str, target: str,
                      headers: Sequence[tuple[str, str | bytes]] = (), body: bytes = b"",
                      host: str | None = "gateway.test") -> RawResponse:
    lines = [name.encode("latin-1") + b": "
             + (value if isinstance(value, bytes) else value.encode("latin-1"))
             for name, value in headers]
    return await raw_exchange(client.server.host, client.server.port,
                              build_request(method, target, lines, host, body))
