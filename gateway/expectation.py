"""``Expect: 100-continue``: "100 Continue" goes out only once a request is authorised, so a
client that waits for it never sends a body to a request that will be refused (RFC 9110
§10.1.1); any other expectation is 417 ``expectation_failed``, in JSON."""

from __future__ import annotations

import contextlib

from aiohttp import HttpVersion11, web

from .errors import ExpectationFailed
from .state import CONTINUED


async def answer(request: web.Request) -> None:
    """Answer ``Expect``; called once the request is authorised."""
    expect = request.headers.get("Expect")
    if expect is None:
        return
    if expect.strip().lower() != "100-continue":
        raise ExpectationFailed(f"the expectation {expect[:64]!r} is not supported")
    if request.version >= HttpVersion11 and request.body_exists:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final response has not started (as aiohttp does)
    request[CONTINUED] = True


async def expect_handler(request: web.Request) -> None:
    """The router's ``Expect`` handler for the gateway's own endpoints, which need nothing
    checked before their body: "100 Continue" at once. aiohttp's default answers any other
    expectation itself, in plain text and outside the middleware; here it is left to
    ``refuse_unanswered``, which the pipeline runs, to refuse in JSON."""
    with contextlib.suppress(ExpectationFailed):
        await answer(request)


def refuse_unanswered(request: web.Request) -> None:
    """``ExpectationFailed`` for an endpoint request whose ``Expect`` was not answered by
    ``expect_handler`` (proxied requests answer theirs once authorised)."""
    if "Expect" in request.headers and not request.get(CONTINUED):
        raise ExpectationFailed(
            f"the expectation {request.headers['Expect'][:64]!r} is not supported")


def body_refused(request: web.BaseRequest) -> bool:
    """A client waiting for "100 Continue" was answered without it: its body, if it sends it
    anyway, must not be read, so the connection closes after the answer."""
    return "Expect" in request.headers and not request.get(CONTINUED) and request.body_exists
