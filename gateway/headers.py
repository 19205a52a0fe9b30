"""Facts about HTTP header names: which are hop-by-hop, which the gateway sets itself, which
an identity header may not take, and how upstream frameworks may read a name."""

from __future__ import annotations

import functools
import re

from multidict import MultiMapping

# A token as RFC 9110 §5.6.2 defines it: what a configured header name must be.
# \Z, not $: "$" also matches before a final newline.
NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still meet.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Set by the gateway itself, so client copies must never pass.
GATEWAY_SET = frozenset({"host", "authorization", "forwarded", "x-forwarded-for",
                         "x-forwarded-proto", "x-forwarded-host", "x-request-id", "expect"})
# A WebSocket client's handshake: the gateway's own upstream handshake makes these anew.
WEBSOCKET_HANDSHAKE = ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
                       "Sec-WebSocket-Protocol", "Sec-WebSocket-Accept")
# Headers HTTP or the gateway itself controls: an identity header must not be one of them.
RESERVED = HOP_BY_HOP | GATEWAY_SET | {h.lower() for h in WEBSOCKET_HANDSHAKE} | {
    "cookie", "set-cookie", "content-length", "content-type", "content-encoding", "via",
    "www-authenticate"}
_NOT_ALNUM = re.compile(r"[^0-9a-z]")
# The login hook's claims reach upstreams as X-User-Claim-<Name>; a client header whose
# spelling starts like it is a forgery whatever follows.
CLAIM_PREFIX = "X-User-Claim-"
MAX_ROLE = 64


@functools.lru_cache(maxsize=4096)  # folded on every request, for every header
def spelling(name: str) -> str:
    """A header name reduced to what any upstream framework may read it as: case folded,
    every character but letters and digits removed, and a CGI-style ``HTTP_``/``HTTP-``
    prefix dropped. Two names with the same spelling must be treated as the same header.

    CGI and WSGI (RFC 3875 §4.1.18, PEP 3333) hand headers over as ``HTTP_`` + the name
    upper-cased with ``-`` as ``_``, so ``X-WX-OpenID`` and ``X_WX_OpenID`` meet in one
    variable; Apache httpd's ``ap_create_environment`` (server/util_script.c) turns every
    other non-alphanumeric character into ``_`` too (``X.WX.OpenID``); Django, Werkzeug,
    Rack and PHP read those variables, and hand-rolled ones accept a name that already
    carries the prefix.
    """
    folded = _NOT_ALNUM.sub("", name.lower())
    return folded[4:] if folded.startswith("http") else folded


RESERVED_SPELLINGS = frozenset(map(spelling, RESERVED))
CLAIM_SPELLING = spelling(CLAIM_PREFIX)


def valid_role(role: str) -> bool:
    """A role that survives a comma-separated header intact: printable ASCII, no comma, no
    space at either end (header parsers trim it), at most MAX_ROLE characters."""
    return (0 < len(role) <= MAX_ROLE and role.isascii() and role.isprintable()
            and "," not in role and role == role.strip())


def connection_tokens(headers: MultiMapping[str]) -> frozenset[str]:
    """The options named in ``Connection`` headers, lower-cased."""
    values = headers.getall("Connection", ())
    if not values:  # most requests (HTTP/1.1 keeps alive unasked), asked several times each
        return _NO_TOKENS
    return frozenset([t.strip().lower() for v in values for t in v.split(",")])


_NO_TOKENS: frozenset[str] = frozenset()
