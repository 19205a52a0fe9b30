"""Slow and silent clients cannot hold the gateway: request heads and bodies that stop arriving
and idle keep-alive connections are cut after their timeouts, and each process caps its open
connections. Real ``python -m gateway`` processes, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import resource
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from checks import assert_json_error, metric_samples, value
from conftest import fresh
from process import Client, GatewayProcess, Launch, launch_with_client
from rawhttp import RawResponse, build_request
from gateway import loader
from gateway.errors import ConfigError

WAIT = 10.0  # upper bound for any single network wait in this file


def parse(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "the gateway closed without an answer"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines)]
    return RawResponse(int(status_line.split()[1]), headers, body)


def assert_408(response: RawResponse, http11: bool = False) -> None:
    """408 request_timeout. The callers read until the gateway closed; a request on HTTP/1.1
    is also told so (a head that never completed is answered as HTTP/1.0, which closes)."""
    assert_json_error(response.status, response.header("Content-Type")[0], response.body,
                      408, "request_timeout")
    if http11:
        assert response.header("Connection") == ["close"], response.headers


@contextlib.asynccontextmanager
async def connection(gw: GatewayProcess) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                                asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def send_then_read(gw: GatewayProcess, payload: bytes) -> bytes:
    """Send ``payload`` (then nothing more) and read until the gateway closes."""
    async with connection(gw) as (reader, writer):
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """One response with a Content-Length, leaving the connection open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    response = parse(head)
    length = int(response.header("Content-Length")[0])
    response.body = await asyncio.wait_for(reader.readexactly(length), WAIT)
    return response


async def start(launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession,
                **top: Any) -> tuple[GatewayProcess, Client]:
    data = copy.deepcopy(config_dict)
    data.update(top)
    return await launch_with_client(launch, data, http)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# --- request heads ---------------------------------------------------------------------------


async def test_a_request_head_that_stops_arriving_gets_408_then_close(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, client = await start(launch, config_dict, http, client_header_timeout="500ms")
    # A partial request line, and a head that stops before its blank line.
    for partial in (b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nX-A: 1\r\n"):
        assert_408(parse(await send_then_read(gw, partial)))
    # A head trickled byte by byte (2.2 s in all) never extends its deadline: it is timed
    # from the accept, and cut before its end.
    head = b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nX-Padding: 0123456789\r\n\r\n"
    async with connection(gw) as (reader, writer):
        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in head:
                    writer.write(bytes([byte]))
                    await asyncio.sleep(0.05)
        trickling = asyncio.create_task(trickle())
        answer = await asyncio.wait_for(reader.read(), WAIT)
        assert not trickling.done(), "the whole head was sent: the test proves nothing"
        trickling.cancel()
    assert_408(parse(answer))
    # The gateway still serves, and its log has an access line per 408, no traceback.
    await client.call("GET", "/healthz", expect=200)
    lines = await gw.wait_for_line(lambda line: " 408" in line, count=3)
    assert all("UNKNOWN" in line for line in lines), lines
    gw.assert_no_internal_failure()


async def test_a_connection_that_never_sends_a_byte_is_closed_without_an_answer(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, _ = await start(launch, config_dict, http, client_header_timeout="300ms")
    assert await send_then_read(gw, b"") == b""
    samples = metric_samples(await (await http.get(f"{gw.url}/metrics")).text())
    assert value(samples, "wxgw_client_timeouts_total", phase="header") == 0


# --- request bodies --------------------------------------------------------------------------


async def test_a_login_body_that_stops_arriving_gets_408(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, client = await start(launch, config_dict, http, client_body_timeout="500ms")
    head = build_request("POST", "/auth/login", [b"Content-Type: application/json",
                                                  b"Content-Length: 40"])
    assert_408(parse(await send_then_read(gw, head + b'{"code": "abc')), http11=True)
    await client.login(fresh())  # the same endpoint still logs people in
    samples = metric_samples(await (await http.get(f"{gw.url}/metrics")).text())
    assert value(samples, "wxgw_logins_total", outcome="request_timeout") == 1
    assert value(samples, "wxgw_client_timeouts_total", phase="body") == 1
    gw.assert_no_internal_failure()


@pytest.mark.parametrize("size", [1000, 1 << 20], ids=["small", "streamed"])
async def test_a_proxied_body_that_stops_arriving_gets_408(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession,
        upstream: Any, size: int) -> None:
    gw, _ = await start(launch, config_dict, http, client_body_timeout="500ms")
    head = build_request("POST", "/public/upload", [f"Content-Length: {size}".encode()])
    sent = b"x" * (size // 4)
    assert_408(parse(await send_then_read(gw, head + sent)), http11=True)
    # The upstream never got a complete request from it.
    assert all(len(seen.body) == size for seen in upstream.seen)
    gw.assert_no_internal_failure()


async def test_a_body_sent_after_100_continue_that_stops_arriving_gets_408(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    """curl asks "Expect: 100-continue" before large uploads: the interim answer does not
    count as the answer having begun, so the stalled upload still gets its 408."""
    gw, _ = await start(launch, config_dict, http, client_body_timeout="500ms")
    head = build_request("POST", "/public/upload", [f"Content-Length: {1 << 20}".encode(),
                                                     b"Expect: 100-continue"])
    async with connection(gw) as (reader, writer):
        writer.write(head)
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        writer.write(b"x" * 200_000)
        assert_408(parse(await asyncio.wait_for(reader.read(), WAIT)), http11=True)
    gw.assert_no_internal_failure()


async def test_a_chunked_body_that_stops_arriving_gets_408(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, _ = await start(launch, config_dict, http, client_body_timeout="500ms")
    head = build_request("POST", "/public/upload", [b"Transfer-Encoding: chunked"])
    assert_408(parse(await send_then_read(gw, head + b"10000\r\n" + b"y" * 0x10000 + b"\r\n")),
               http11=True)
    gw.assert_no_internal_failure()


async def test_a_streamed_body_stopping_after_the_answer_began_cuts_the_connection(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession,
        aiohttp_server: Any) -> None:
    """An upstream that answers before reading the body: the 200 is on its way when the body
    stops, so the connection is cut (no second answer can follow)."""
    from aiohttp import web

    async def early(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"started")
        async for _ in request.content.iter_any():
            pass
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", early)
    server = await aiohttp_server(app)
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/early/", "upstream": f"http://127.0.0.1:{server.port}",
                       "auth": "public", "timeout": "30s"}]
    data["client_body_timeout"] = "500ms"
    gw, _ = await launch_with_client(launch, data, http)
    head = build_request("POST", "/early/x", [f"Content-Length: {1 << 20}".encode()])
    answer = await send_then_read(gw, head + b"z" * 100_000)
    response = parse(answer)
    assert response.status == 200
    assert b"0\r\n\r\n" not in response.body  # never completed: the connection was cut
    gw.assert_no_internal_failure()


async def test_an_upload_slower_than_the_body_timeout_in_total_still_passes(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession,
        upstream: Any) -> None:
    data = copy.deepcopy(config_dict)
    for route in data["routes"]:
        route["timeout"] = "30s"  # the route's bound on the whole exchange is not the point
    gw, _ = await start(launch, data, http, client_body_timeout="500ms")
    pieces, piece = 25, b"p" * 12_000  # 300 kB (streamed), one piece every 150 ms: ~3.75 s
    head = build_request("POST", "/public/upload",
                         [f"Content-Length: {pieces * len(piece)}".encode()])
    async with connection(gw) as (reader, writer):
        writer.write(head)
        started = time.monotonic()
        for _ in range(pieces):
            await asyncio.sleep(0.15)
            writer.write(piece)
            await writer.drain()
        took = time.monotonic() - started
        response = await read_response(reader)
    assert response.status == 200, response.body
    assert json.loads(response.body)["body_bytes"] == pieces * len(piece)
    print(f"\n{pieces * len(piece)} bytes uploaded over {took:.2f}s "
          f"with client_body_timeout 0.5s: 200")
    # Also through the gateway's own endpoint: a login body in slow pieces.
    body = json.dumps({"code": fresh()}).encode()
    async with connection(gw) as (reader, writer):
        writer.write(build_request("POST", "/auth/login", [
            f"Content-Length: {len(body)}".encode(), b"Content-Type: application/json"]))
        for i in range(0, len(body), 4):
            await asyncio.sleep(0.15)
            writer.write(body[i:i + 4])
        response = await read_response(reader)
    assert response.status == 200, response.body
    gw.assert_no_internal_failure()


async def test_the_body_of_a_request_asking_for_an_upgrade_is_timed_too(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    """aiohttp stops parsing heads after an upgrade request: its body is still timed."""
    gw, _ = await start(launch, config_dict, http, client_body_timeout="500ms")
    head = build_request("POST", "/public/up", [b"Connection: Upgrade", b"Upgrade: foo",
                                                b"Content-Length: 100"])
    assert_408(parse(await send_then_read(gw, head + b"abc")), http11=True)
    # Trickled, but flowing: it passes.
    async with connection(gw) as (reader, writer):
        writer.write(head)
        for _ in range(10):
            await asyncio.sleep(0.15)
            writer.write(b"b" * 10)
        response = parse(await asyncio.wait_for(reader.read(), WAIT))
    assert response.status == 200 and json.loads(response.body)["body_bytes"] == 100
    gw.assert_no_internal_failure()


# --- keep-alive ------------------------------------------------------------------------------


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, _ = await start(launch, config_dict, http, keepalive_timeout="500ms",
                        client_header_timeout="30s")
    request = build_request("GET", "/healthz", [b"Connection: keep-alive"])
    async with connection(gw) as (reader, writer):
        writer.write(request)
        assert (await read_response(reader)).status == 200
        writer.write(request)  # still open for the next request
        assert (await read_response(reader)).status == 200
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # then closed, silently


async def test_a_head_begun_on_a_kept_alive_connection_is_timed_from_its_first_byte(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, _ = await start(launch, config_dict, http, keepalive_timeout="1s",
                        client_header_timeout="1500ms")
    async with connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/healthz", [b"Connection: keep-alive"]))
        assert (await read_response(reader)).status == 200
        await asyncio.sleep(0.7)  # most of the keep-alive period idle, then a partial head
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        # Past the keep-alive deadline, the head is governed by client_header_timeout: 408.
        assert_408(parse(await asyncio.wait_for(reader.read(), WAIT)))


async def test_an_idle_connection_after_a_body_in_its_own_packets_gets_no_408(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    """The bytes that end a body are no request head: the connection then idles under
    keepalive_timeout and closes silently, never with an unasked 408 that a client sending
    its next request at that moment would take for that request's answer."""
    gw, _ = await start(launch, config_dict, http, keepalive_timeout="2s",
                        client_header_timeout="500ms")
    for framing, body in (("Content-Length: 5", b"hello"),
                          ("Transfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n")):
        async with connection(gw) as (reader, writer):
            writer.write(build_request("POST", "/public/x", [b"Connection: keep-alive",
                                                              framing.encode()]))
            await writer.drain()
            await asyncio.sleep(0.1)  # the body in packets of its own, as large uploads come
            writer.write(body)
            assert (await read_response(reader)).status == 200
            started = time.monotonic()
            assert await asyncio.wait_for(reader.read(), WAIT) == b"", framing
            assert time.monotonic() - started > 1.5, framing  # keepalive_timeout's, not 0.5 s
    samples = metric_samples(await (await http.get(f"{gw.url}/metrics")).text())
    assert value(samples, "wxgw_client_timeouts_total", phase="header") == 0
    gw.assert_no_internal_failure()


async def test_keepalive_timeout_0_closes_after_every_answer(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    gw, _ = await start(launch, config_dict, http, keepalive_timeout=0)
    async with connection(gw) as (reader, writer):
        writer.write(build_request("GET", "/healthz", [b"Connection: keep-alive"]))
        response = parse(await asyncio.wait_for(reader.read(), WAIT))
    assert response.status == 200
    assert response.header("Connection") == ["close"]


# --- the connection cap ----------------------------------------------------------------------


async def test_connections_over_max_connections_are_refused_and_logged_once(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    async with aiohttp.ClientSession() as checks:  # its kept-alive connection goes with it
        gw, _ = await start(launch, config_dict, checks, max_connections=5,
                            client_header_timeout="60s")
    await asyncio.sleep(0.2)
    held = [await asyncio.open_connection("127.0.0.1", gw.port) for _ in range(5)]
    try:
        for reader, writer in held[:2]:  # existing connections keep working meanwhile
            writer.write(build_request("GET", "/healthz", [b"Connection: keep-alive"]))
            assert (await read_response(reader)).status == 200
        for _ in range(20):  # closed at once, unanswered (a reset: the request was unread)
            with contextlib.suppress(ConnectionResetError):
                assert await send_then_read(gw, build_request("GET", "/healthz")) == b""
        line, = await gw.wait_for_line(lambda line: "connection limit reached" in line)
        assert "WARNING" in line and "max_connections" in line, line
        reader, writer = held[0]
        writer.write(build_request("GET", "/healthz", [b"Connection: keep-alive"]))
        assert (await read_response(reader)).status == 200
    finally:
        for _, writer in held:
            writer.close()
    await asyncio.sleep(0.3)
    # Room again: served as usual. The refusals were counted, and logged on one line only.
    response = parse(await send_then_read(gw, build_request("GET", "/metrics")))
    assert response.status == 200
    samples = metric_samples(response.body.decode())
    assert value(samples, "wxgw_connections_refused_total") == 20
    assert sum("connection limit reached" in line for line in gw.lines()) == 1
    gw.assert_no_internal_failure()


# --- configuration ---------------------------------------------------------------------------


def test_client_limits_have_nginx_defaults_and_are_validated_by_key(
        config_dict: dict[str, Any]) -> None:
    config = loader.parse(config_dict, environ={})
    assert (config.client_header_timeout, config.client_body_timeout,
            config.keepalive_timeout, config.max_connections) == (60.0, 60.0, 75.0, 10_000)
    tuned = loader.parse({**config_dict, "client_header_timeout": "2s",
                           "client_body_timeout": "250ms", "keepalive_timeout": "0s",
                           "max_connections": "300"}, environ={})
    assert (tuned.client_header_timeout, tuned.client_body_timeout,
            tuned.keepalive_timeout, tuned.max_connections) == (2.0, 0.25, 0.0, 300)
    with pytest.raises(ConfigError) as caught:
        loader.parse({**config_dict, "client_header_timeout": "0", "client_body_timeout": "soon",
                       "keepalive_timeout": -1, "max_connections": 0}, environ={})
    problems = caught.value.problems
    for key in ("client_header_timeout", "client_body_timeout", "keepalive_timeout",
                "max_connections"):
        assert any(p.startswith(f"{key}: ") for p in problems), (key, problems)
    for bad in ("many", True, 2_000_000, -5):
        with pytest.raises(ConfigError) as caught:
            loader.parse({**config_dict, "max_connections": bad}, environ={})
        assert caught.value.problems[0].startswith("max_connections: "), caught.value.problems
    with pytest.raises(ConfigError) as caught:
        loader.parse({**config_dict, "keepalive_timeout": True}, environ={})
    assert caught.value.problems[0].startswith("keepalive_timeout: "), caught.value.problems


# --- the open-file limit --------------------------------------------------------------------


async def test_the_open_file_limit_is_raised_toward_max_connections_with_a_warning_if_short(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 400_000:
        pytest.skip("the hard open-file limit is too high to exceed")
    too_many = hard  # needs hard + 1024 descriptors: beyond the hard limit
    gw, _ = await start(launch, config_dict, http, max_connections=too_many)
    line, = await gw.wait_for_line(lambda line: "open-file limit" in line)
    assert "WARNING" in line and f"max_connections {too_many}" in line, line
    limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
    row = next(r for r in limits.splitlines() if r.startswith("Max open files"))
    assert row.split()[3:5] == [str(hard), str(hard)], row  # soft raised to the hard limit
    # Within the limit: no warning.
    fitting = max(1, (hard - 1024) // 2)
    gw2, _ = await start(launch, config_dict, http, max_connections=fitting)
    await gw2.wait_for_line(lambda line: "listening" in line)
    assert not any("open-file limit" in line for line in gw2.lines()), gw2.output()


# --- the drill -------------------------------------------------------------------------------


SLOWLORIS = 2000
USERS = 20  # concurrent real users, each logging in then calling the upstream
ROUNDS = 10


async def _slowloris(port: int, opened: asyncio.Event) -> tuple[str, float]:
    """One connection trickling a header line every 0.3 s until the gateway ends it; how it
    ended (the status answered, "reset" or "closed") and after how many seconds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.set()
    started = time.monotonic()
    answer = b""
    try:
        writer.write(b"GET /public/slow HTTP/1.1\r\nHost: gateway.test\r\n")
        n = 0
        while True:
            try:
                # What has arrived, kept across waits: a read cancelled by the wait must not
                # lose an answer whose end had not come yet.
                chunk = await asyncio.wait_for(reader.read(65536), 0.3)
            except asyncio.TimeoutError:
                chunk = None
            if chunk:
                answer += chunk
            if chunk == b"" or b"\r\n\r\n" in answer:
                return (str(parse(answer).status) if answer else "closed",
                        time.monotonic() - started)
            if chunk is None:
                n += 1
                writer.write(f"X-Trickle-{n}: {n}\r\n".encode())
    except (ConnectionError, OSError):
        # Bytes it sent as the gateway closed: the kernel answers them with a reset, which
        # may overtake the 408 (nginx itself closes without answering).
        return "reset", time.monotonic() - started
    finally:
        writer.close()


async def _users(client: Client, latencies: list[float],
                 attack: asyncio.Future[Any] | None = None) -> None:
    """USERS users doing ROUNDS rounds each, and more until ``attack`` is over."""
    async def user() -> None:
        done = 0
        while done < ROUNDS or (attack is not None and not attack.done()):
            done += 1
            started = time.perf_counter()
            token = (await client.login(fresh())).json()["token"]
            latencies.append(time.perf_counter() - started)
            started = time.perf_counter()
            await client.call("GET", "/api/items", token=token, expect=200)
            latencies.append(time.perf_counter() - started)
    await asyncio.gather(*(user() for _ in range(USERS)))


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


async def test_drill_2000_slowloris_connections_do_not_hold_real_users(
        launch: Launch, config_dict: dict[str, Any], http: aiohttp.ClientSession) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SLOWLORIS + 1000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < need:
        pytest.skip(f"needs {need} open files (ulimit -n)")
    gw, client = await start(launch, config_dict, http, client_header_timeout="2s")

    quiet: list[float] = []
    await _users(client, quiet)

    loris: list[asyncio.Task[tuple[str, float]]] = []
    opened_at = time.monotonic()
    for batch in range(0, SLOWLORIS, 100):  # paced: the listen backlog is 128
        events = [asyncio.Event() for _ in range(100)]
        loris += [asyncio.create_task(_slowloris(gw.port, e)) for e in events]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), WAIT)
    opened_in = time.monotonic() - opened_at
    attacked: list[float] = []
    # Every one of them is cut by the gateway (a trickle goes on forever otherwise), while
    # real users log in and call the upstream all along.
    attack = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(*loris), 30))
    try:
        await _users(client, attacked, attack)
        ends = await attack
    finally:
        for task in loris:
            task.cancel()

    # Every real request got its 200 (Client.call's expect); none was lost.
    assert len(quiet) == USERS * ROUNDS * 2 and len(attacked) >= len(quiet)
    how = [end for end, _ in ends]
    assert set(how) <= {"408", "reset"}, {h: how.count(h) for h in set(how)}
    lived = sorted(seconds for _, seconds in ends)
    samples = metric_samples(await (await http.get(f"{gw.url}/metrics")).text())
    assert value(samples, "wxgw_client_timeouts_total", phase="header") == SLOWLORIS
    print(f"\n{SLOWLORIS} slowloris connections opened in {opened_in:.1f}s; all cut "
          f"(client_header_timeout 2s) after {lived[0]:.2f}-{lived[-1]:.2f}s: "
          f"{how.count('408')} read their 408, {how.count('reset')} were reset while "
          f"still sending")
    print(f"real users' p99 (logins and proxied GETs, {USERS} at a time): "
          f"{_p99(quiet) * 1000:.1f} ms without slowloris ({len(quiet)} requests), "
          f"{_p99(attacked) * 1000:.1f} ms with {SLOWLORIS} slowloris connections "
          f"({len(attacked)} requests)")
    gw.assert_no_internal_failure()


