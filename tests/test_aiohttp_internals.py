"""The aiohttp internals the gateway builds on, each checked on the installed aiohttp.

pyproject.toml pins aiohttp to the minor release these pass on. Before raising that bound, run
this file: a failure names the internal and the gateway module that depends on it, which is
quicker to act on than a slow-client or proxy test failing for no visible reason. The same list
heads gateway/server.py and gateway/pool.py.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

import pytest
from aiohttp import HttpVersion, HttpVersion11, web, web_protocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser, RawRequestMessage, StreamWriter
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import server

# name -> (gateway module that depends on it, why). One test per entry below; the last test
# checks that none is left without one.
INTERNALS: dict[str, tuple[str, str]] = {
    "web.Server._kwargs": (
        "gateway/server.py", "_Server builds its own protocol class with the runner's settings"),
    "web.Server.request_handler/request_factory": (
        "gateway/server.py", "Runner wraps the app's handler and factory in its own server"),
    "web.Server.connection_made/connection_lost": (
        "gateway/server.py", "_Server counts open connections for max_connections"),
    "web.AppRunner._make_server/_kwargs": (
        "gateway/server.py", "Runner builds the server with our protocol and dispatcher"),
    "RawRequestMessage._replace/should_close": (
        "gateway/server.py", "keepalive_timeout 0 marks every request to close"),
    "RequestHandler.__init__(manager, **kwargs)": (
        "gateway/server.py", "_Protocol subclasses it and is built with the server's kwargs"),
    "RequestHandler/Server attribute names": (
        "gateway/server.py", "_Protocol and _Server add attributes; one aiohttp adds would clash"),
    "RequestHandler._messages": (
        "gateway/server.py", "parsed requests queued for start(): heads are timed and a 408 "
                             "is queued there"),
    "RequestHandler._waiter": (
        "gateway/server.py", "set while start() waits for a request: a head timeout wakes it"),
    "web_protocol._ErrInfo": (
        "gateway/server.py", "a timed-out head is queued as a parse error, answered by "
                             "handle_error"),
    "RequestHandler._next_keepalive_close_time/_process_keepalive": (
        "gateway/server.py", "keep-alive close is pushed past a head's client_header_timeout"),
    "RequestHandler overridden methods": (
        "gateway/server.py", "data_received, pause/resume_reading, handle_error, log_exception, "
                             "connection_made/lost are overridden with these signatures"),
    "RequestHandler.log_exception(exc_info=)": (
        "gateway/server.py", "a body timeout met while lingering is recognised by exc_info"),
    "http_exceptions.LineTooLong/'Too many headers'": (
        "gateway/server.py", "handle_error answers these two parse errors 431, any other 400"),
    "StreamWriter.output_size": (
        "gateway/server.py, gateway/proxy.py", "tells whether an answer has begun; proxy.py "
                                               "resets it after 100 Continue, as aiohttp does"),
    "UrlMappingMatchInfo(match_dict, route)/add_app/freeze": (
        "gateway/server.py dispatcher", "proxied requests and /auth/verify skip the router with a prebuilt match"),
    "web.Request._match_info": (
        "gateway/server.py dispatcher", "set where the router would; request.app reads it"),
    "web.BaseRequest._version/_cache": (
        "gateway/server.py _refuse_version", "an HTTP/0.9 or 2.0 request line is answered in HTTP/1.1"),
    "client_proto.ResponseHandler": (
        "gateway/pool.py", "the upstream connection protocol: parser, flow control, errors"),
    "ResponseHandler.set_response_params": (
        "gateway/pool.py", "HEAD without a body, read to EOF, no decompression"),
    "ResponseHandler.read/should_close/is_connected/close/abort": (
        "gateway/pool.py", "read an answer; decide whether the connection goes back idle"),
    "http.StreamWriter(protocol, loop)": (
        "gateway/pool.py", "writes the request upstream"),
    "StreamWriter.write_headers/send_headers/enable_chunking/write/write_eof": (
        "gateway/pool.py", "headers go at once before a streamed body; chunked when no length"),
}

CHECKED: set[str] = set()


async def _ok(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response()


def internal(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    assert name in INTERNALS, f"{name} is not in INTERNALS"
    CHECKED.add(name)
    return lambda test: test


def gone(name: str, what: str = "is gone") -> str:
    module, why = INTERNALS[name]
    return f"aiohttp {name} {what}: {module} relies on it ({why})"


def params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


def slots(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        names |= set(getattr(klass, "__slots__", ()))
    return names


def own_attributes(cls: type) -> set[str]:
    """The attributes ``cls.__init__`` assigns on ``self`` (read from its source)."""
    source = inspect.getsource(vars(cls)["__init__"])
    names = {line.split("self.", 1)[1].split()[0].rstrip(":,")
             for line in source.splitlines() if line.strip().startswith("self.")}
    return {n.split("=")[0].strip() for n in names}


@internal("web.Server._kwargs")
async def test_server_keeps_its_protocol_kwargs() -> None:
    srv = web.Server(_ok, keepalive_timeout=3.5)
    assert getattr(srv, "_kwargs", None) == {"keepalive_timeout": 3.5}, gone("web.Server._kwargs")


@internal("web.Server.request_handler/request_factory")
async def test_server_exposes_its_handler_and_factory() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response()
    srv = web.Server(handler)
    assert srv.request_handler is handler, gone("web.Server.request_handler/request_factory")
    assert callable(srv.request_factory), gone("web.Server.request_handler/request_factory")
    assert {"handler", "request_factory"} <= set(params(web.Server.__init__)), \
        gone("web.Server.request_handler/request_factory", "changed its __init__ parameters")


@internal("web.Server.connection_made/connection_lost")
def test_server_connection_hooks_take_handler_and_transport() -> None:
    name = "web.Server.connection_made/connection_lost"
    assert params(web.Server.connection_made) == ["self", "handler", "transport"], \
        gone(name, "changed its parameters")
    assert params(web.Server.connection_lost) == ["self", "handler", "exc"], \
        gone(name, "changed its parameters")


@internal("web.AppRunner._make_server/_kwargs")
async def test_app_runner_makes_its_server_from_its_kwargs() -> None:
    name = "web.AppRunner._make_server/_kwargs"
    assert inspect.iscoroutinefunction(getattr(web.AppRunner, "_make_server", None)), gone(name)
    assert params(web.AppRunner._make_server) == ["self"], gone(name, "changed its parameters")
    runner = web.AppRunner(web.Application(), keepalive_timeout=7.0)
    assert getattr(runner, "_kwargs", {}).get("keepalive_timeout") == 7.0, gone(name)
    await runner.setup()
    try:
        assert isinstance(runner.server, web.Server), gone(name, "no longer makes a web.Server")
    finally:
        await runner.cleanup()


@internal("RawRequestMessage._replace/should_close")
def test_raw_request_message_can_be_replaced() -> None:
    # The fields in the order both parsers (C and pure Python) define them.
    message = RawRequestMessage("GET", "/", HttpVersion11, CIMultiDictProxy(CIMultiDict()), (),
                                False, None, False, False, URL("/"))
    closing = message._replace(should_close=True)
    assert closing.should_close and not message.should_close, \
        gone("RawRequestMessage._replace/should_close", "changed")
    assert closing.upgrade is False, gone("RawRequestMessage._replace/should_close", "changed")


@internal("RequestHandler.__init__(manager, **kwargs)")
def test_request_handler_is_built_from_manager_and_kwargs() -> None:
    names = params(RequestHandler.__init__)
    assert names[:2] == ["self", "manager"] and "loop" in names, \
        gone("RequestHandler.__init__(manager, **kwargs)", "changed its parameters")
    runner_kwargs = {"keepalive_timeout", "access_log_class", "auto_decompress"}
    assert runner_kwargs <= set(names), \
        gone("RequestHandler.__init__(manager, **kwargs)", "no longer takes the runner's kwargs")


@internal("RequestHandler/Server attribute names")
def test_the_gateway_attributes_do_not_shadow_aiohttp_ones() -> None:
    for ours, base in ((server._Protocol, RequestHandler), (server._Server, web.Server),
                       (server.Runner, web.AppRunner)):
        theirs = slots(base) | set(dir(base))
        added = own_attributes(ours)
        assert added, f"no attributes read from {ours.__name__}.__init__"
        clash = added & theirs - {"_kwargs"}
        assert not clash, (f"aiohttp {base.__name__} now has {sorted(clash)}: gateway/server.py's "
                           f"{ours.__name__} sets attributes of the same name")


@internal("RequestHandler._messages")
def test_request_handler_queues_parsed_messages() -> None:
    assert "_messages" in slots(RequestHandler), gone("RequestHandler._messages")
    assert "self._messages.popleft()" in inspect.getsource(RequestHandler.start), \
        gone("RequestHandler._messages", "is no longer what start() reads")


@internal("RequestHandler._waiter")
def test_request_handler_waits_on_its_waiter() -> None:
    assert "_waiter" in slots(RequestHandler), gone("RequestHandler._waiter")
    assert "self._waiter = loop.create_future()" in inspect.getsource(RequestHandler.start), \
        gone("RequestHandler._waiter", "is no longer what start() waits on")


@internal("web_protocol._ErrInfo")
def test_err_info_is_answered_through_handle_error() -> None:
    info_type = getattr(web_protocol, "_ErrInfo", None)
    assert info_type is not None, gone("web_protocol._ErrInfo")
    info = info_type(status=408, exc=ValueError(), message="timeout")
    assert (info.status, info.message) == (408, "timeout"), gone("web_protocol._ErrInfo", "changed")
    assert "_ErrInfo" in inspect.getsource(RequestHandler.start), \
        gone("web_protocol._ErrInfo", "is no longer handled by start()")


@internal("RequestHandler._next_keepalive_close_time/_process_keepalive")
async def test_keepalive_check_reschedules_to_the_close_time() -> None:
    name = "RequestHandler._next_keepalive_close_time/_process_keepalive"
    assert {"_next_keepalive_close_time", "_keepalive_handle"} <= slots(RequestHandler), gone(name)
    loop = asyncio.get_running_loop()
    handler = RequestHandler(web.Server(_ok), loop=loop)
    handler._keepalive = True
    handler._next_keepalive_close_time = loop.time() + 100
    handler._process_keepalive()
    timer = handler._keepalive_handle
    try:
        assert isinstance(timer, asyncio.TimerHandle) \
            and timer.when() == handler._next_keepalive_close_time, \
            gone(name, "no longer reschedules itself to the close time")
    finally:
        if timer is not None:
            timer.cancel()


@internal("RequestHandler overridden methods")
def test_overridden_request_handler_methods_keep_their_signatures() -> None:
    name = "RequestHandler overridden methods"
    want = {
        "data_received": ["self", "data"],
        "pause_reading": ["self"],
        "resume_reading": ["self", "resume_parser"],
        "handle_error": ["self", "request", "status", "exc", "message"],
        "connection_made": ["self", "transport"],
        "connection_lost": ["self", "exc"],
        "force_close": ["self"],
    }
    for method, names in want.items():
        assert callable(getattr(RequestHandler, method, None)), gone(f"{name}", f"lost {method}")
        assert params(getattr(RequestHandler, method)) == names, \
            gone(name, f"changed {method}{inspect.signature(getattr(RequestHandler, method))}")


@internal("RequestHandler.log_exception(exc_info=)")
def test_request_handler_logs_exceptions_with_exc_info() -> None:
    source = inspect.getsource(RequestHandler)
    assert "self.log_exception(" in source and "exc_info=exc" in source, \
        gone("RequestHandler.log_exception(exc_info=)", "no longer passes exc_info")


@internal("http_exceptions.LineTooLong/'Too many headers'")
async def test_oversize_heads_are_told_apart_from_other_parse_errors() -> None:
    name = "http_exceptions.LineTooLong/'Too many headers'"
    loop = asyncio.get_running_loop()
    many = b"".join(b"X-%d: a\r\n" % i for i in range(200))
    cases = {b"GET / HTTP/1.1\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n": LineTooLong,
             b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n": LineTooLong,
             b"GET / HTTP/1.1\r\n" + many + b"\r\n": BadHttpMessage}
    for data, kind in cases.items():
        # The server's own limits (aiohttp's defaults, which the gateway keeps).
        parser = HttpRequestParser(BaseProtocol(loop), loop, 2**16, max_line_size=8190,
                                   max_field_size=8190, max_headers=128)
        with pytest.raises(BadHttpMessage) as caught:
            parser.feed_data(data)
        assert type(caught.value) is kind, gone(name, f"now raises {caught.value!r}")
        if kind is BadHttpMessage:
            assert "too many headers" in str(caught.value).lower(), \
                gone(name, f"changed its message: {caught.value}")


@internal("StreamWriter.output_size")
async def test_writer_output_size_counts_what_was_sent() -> None:
    request = make_mocked_request("GET", "/")
    assert hasattr(request.writer, "output_size"), gone("StreamWriter.output_size")
    source = inspect.getsource(StreamWriter)
    assert "self.output_size +=" in source, gone("StreamWriter.output_size", "is not counted")
    from aiohttp import web_urldispatcher
    assert "request.writer.output_size = 0" in inspect.getsource(
        web_urldispatcher._default_expect_handler), \
        gone("StreamWriter.output_size", "is no longer reset after 100 Continue by aiohttp")


@internal("UrlMappingMatchInfo(match_dict, route)/add_app/freeze")
def test_a_prebuilt_match_info_serves_the_catch_all() -> None:
    name = "UrlMappingMatchInfo(match_dict, route)/add_app/freeze"
    app = web.Application()
    route = app.router.add_route("*", r"/{tail:[\s\S]*}", _ok)
    assert params(UrlMappingMatchInfo.__init__) == ["self", "match_dict", "route"], \
        gone(name, "changed its parameters")
    match = UrlMappingMatchInfo({}, route)
    match.add_app(app)
    match.freeze()
    assert match.route is route and match.current_app is app, gone(name, "changed")


@internal("web.Request._match_info")
def test_setting_match_info_gives_the_request_its_app() -> None:
    app = web.Application()
    route = app.router.add_route("*", "/{tail:.*}", _ok)
    match = UrlMappingMatchInfo({}, route)
    match.add_app(app)
    match.freeze()
    request = make_mocked_request("GET", "/x")
    request._match_info = match
    assert request.match_info is match and request.app is app, gone("web.Request._match_info")


@internal("web.BaseRequest._version/_cache")
def test_a_request_version_can_be_rewritten() -> None:
    name = "web.BaseRequest._version/_cache"
    request = make_mocked_request("GET", "/", version=HttpVersion(0, 9))
    assert request.version == HttpVersion(0, 9)  # now cached (reify)
    assert "version" in request._cache, gone(name, "no longer caches version in _cache")
    request._version = HttpVersion11
    request._cache.pop("version", None)
    assert request.version == HttpVersion11, gone(name, "changed")


@internal("client_proto.ResponseHandler")
def test_response_handler_is_built_from_a_loop() -> None:
    assert params(ResponseHandler.__init__) == ["self", "loop"], \
        gone("client_proto.ResponseHandler", "changed its parameters")


@internal("ResponseHandler.set_response_params")
def test_response_handler_takes_the_pool_response_params() -> None:
    names = set(params(ResponseHandler.set_response_params))
    assert {"skip_payload", "read_until_eof", "auto_decompress"} <= names, \
        gone("ResponseHandler.set_response_params", "changed its parameters")


@internal("ResponseHandler.read/should_close/is_connected/close/abort")
def test_response_handler_has_what_the_pool_calls() -> None:
    name = "ResponseHandler.read/should_close/is_connected/close/abort"
    assert isinstance(inspect.getattr_static(ResponseHandler, "should_close"), property), gone(name)
    assert inspect.iscoroutinefunction(ResponseHandler.read), gone(name, "read is not async")
    for method in ("is_connected", "close", "abort"):
        assert params(getattr(ResponseHandler, method)) == ["self"], gone(name, f"changed {method}")


@internal("http.StreamWriter(protocol, loop)")
def test_stream_writer_is_built_from_protocol_and_loop() -> None:
    assert params(StreamWriter.__init__)[:3] == ["self", "protocol", "loop"], \
        gone("http.StreamWriter(protocol, loop)", "changed its parameters")


@internal("StreamWriter.write_headers/send_headers/enable_chunking/write/write_eof")
async def test_the_pool_exchange_on_a_real_socket() -> None:
    """What pool.py does, on a loopback server: a chunked request with headers sent at once,
    then an answer read through ResponseHandler."""
    name = "StreamWriter.write_headers/send_headers/enable_chunking/write/write_eof"
    received = bytearray()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not received.endswith(b"0\r\n\r\n"):
            received.extend(await reader.read(4096))
        writer.write(b"HTTP/1.1 201 Made\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: ResponseHandler(loop), "127.0.0.1", port)
    try:
        conn.set_response_params(skip_payload=False, read_until_eof=True, auto_decompress=False)
        writer = StreamWriter(conn, loop)
        writer.enable_chunking()
        await writer.write_headers("POST /x HTTP/1.1",
                                   CIMultiDict({"Host": "h", "Transfer-Encoding": "chunked"}))
        writer.send_headers()
        await writer.write(b"abc")
        await writer.write_eof()
        message, payload = await asyncio.wait_for(conn.read(), 5)
        assert (message.code, message.reason) == (201, "Made"), gone(name, "changed")
        assert await payload.read() == b"ok", gone(name, "changed")
        assert received.startswith(b"POST /x HTTP/1.1\r\n"), gone(name, "changed")
        assert received.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), gone(name, "changed")
        assert conn.is_connected() and not conn.should_close, gone(name, "changed")
    finally:
        conn.close()
        listener.close()
        await listener.wait_closed()


def test_every_internal_has_its_test() -> None:
    assert CHECKED == set(INTERNALS), f"without a test: {sorted(set(INTERNALS) - CHECKED)}"


@pytest.mark.parametrize("module", ["gateway/server.py", "gateway/pool.py"])
def test_the_modules_list_the_internals_they_use(module: str) -> None:
    from pathlib import Path
    head = (Path(__file__).parent.parent / module).read_text().split('"""')[1]
    for name, (where, _) in INTERNALS.items():
        if module in where:
            first = name.split("(")[0].split("/")[0].split(" ")[0]
            assert first.rsplit(".", 1)[-1] in head, f"{module}'s docstring does not list {name}"
