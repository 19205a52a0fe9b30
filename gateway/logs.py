"""Logging: text or JSON lines, one access line per request, and no storms.

Nothing sensitive is ever logged: no token, code, secret, session_key or access token; the
openid only as a short keyed hash unless ``logging.log_openid`` is true.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .forwarded import client_address
from .state import (ADMIN_TOKEN, HOOK_OUTCOME, IDENTITY, LOGGED_PATH, REQUEST_ID, ROUTE_LABEL,
                    SERVICES, STARTED, UPSTREAM_SECONDS)
from .config import LoggingConfig

ACCESS = "gateway.access"
_FIELDS = "fields"  # LogRecord attribute holding a line's structured fields


# Token-shaped text: a JWT (its header, base64url JSON, always starts "eyJ") or whatever follows
# "Bearer". Redacted from every line, whoever wrote it: aiohttp, for one, logs the subprotocols
# a WebSocket client offers, where browser clients put their tokens, in full.
_TOKENISH = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){0,2}"
                       r"|(?i:bearer)(?:\s|%20|\+)+[^\s\"'\\,;&]+")
REDACTED = "[redacted]"


def redact(line: str) -> str:
    if "eyJ" not in line and "bearer" not in line.lower():  # most lines: 0.4 µs, not 2.5
        return line
    return _TOKENISH.sub(_redacted, line)


def _redacted(match: re.Match[str]) -> str:
    text = match.group()
    return REDACTED if text.startswith("eyJ") else f"{text[:6]} {REDACTED}"


FLUSH_INTERVAL = 0.5  # seconds an INFO line may wait in the buffer (Envoy's access logs: 1 s)
_BUFFER = 64 * 1024


def _msecs(created: float) -> int:
    """A LogRecord's ``msecs`` for ``created`` (Python 3.11's logging computes it so)."""
    return int((created - int(created)) * 1000)


class JsonFormatter(logging.Formatter):
    _second, _stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, int(record.msecs), record.levelname, record.name,
                         record.getMessage(), getattr(record, _FIELDS, None), exception)

    def line(self, created: float, msecs: int, level: str, name: str, message: str,
             fields: dict[str, Any] | None, exception: str | None = None) -> str:
        second = int(created)
        if second != self._second:  # one datetime per second, not per line
            self._second, self._stamp = second, datetime.fromtimestamp(
                second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        line: dict[str, Any] = {
            "time": f"{self._stamp}.{msecs:03d}+00:00",
            "level": level.lower(), "logger": name, "message": message}
        if fields:
            line.update(fields)
        if exception is not None:
            line["exception"] = exception
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    _second, _stamp = -1, ""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time(record.created, int(record.msecs))

    def _time(self, created: float, msecs: int) -> str:
        second = int(created)
        if second != self._second:  # logging's own format, computed once per second
            self._second, self._stamp = second, time.strftime(
                self.default_time_format, self.converter(second))
        return f"{self._stamp},{msecs:03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return self._fields(super().format(record), getattr(record, _FIELDS, None))
        return self.line(record.created, int(record.msecs), record.levelname, record.name,
                         record.getMessage(), getattr(record, _FIELDS, None))

    def line(self, created: float, msecs: int, level: str, name: str, message: str,
             fields: dict[str, Any] | None) -> str:
        """What ``format`` makes of such a record: the same line, without one."""
        return self._fields(f"{self._time(created, msecs)} {level} {name}: {message}", fields)

    @staticmethod
    def _fields(text: str, fields: dict[str, Any] | None) -> str:
        if fields:
            text += " " + " ".join([f"{k}={v}" for k, v in fields.items() if v is not None])
        return text


class StormFilter(logging.Filter):
    """A warning repeated (same logger, message and first arguments) within ``window``
    seconds is counted, not logged; the next one that passes says how many were held back."""

    def __init__(self, window: float = 60.0) -> None:
        super().__init__()
        self.window = window
        self._seen: dict[tuple[Any, ...], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # Warnings only: errors (a refused reload, say) are always worth a line each.
        if record.levelno != logging.WARNING or record.name == ACCESS:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        key = (record.name, record.msg, *map(str, args[:2]))
        now = time.monotonic()
        since, held = self._seen.get(key, (0.0, 0))
        if now - since < self.window:
            self._seen[key] = (since, held + 1)
            return False
        self._seen[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.window:g}s)"
        if len(self._seen) > 10_000:
            self._seen.clear()
        return True


class BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, written in batches: an access line per request must not cost a write (and a
    flush) each. INFO lines wait at most FLUSH_INTERVAL; a warning or worse flushes at once
    (after what was buffered, so order holds), as does 64 KiB of lines or a line logged
    outside the event loop. Process exit flushes (logging.shutdown); SIGKILL may lose up to
    FLUSH_INTERVAL of access lines. Every line, from any logger, is ``redact``-ed."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = redact(self.format(record))
        except Exception:
            self.handleError(record)
            return
        self.add(line, record.levelno)

    def add(self, line: str, levelno: int) -> None:
        """A formatted line, redacted, to go out in the next batch."""
        with self.lock:  # type: ignore[union-attr]  # re-entrant: emit holds it already
            self._lines.append(line)
            self._size += len(line)
        if levelno >= logging.WARNING or self._size >= _BUFFER:
            self.flush()
        elif self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
            else:
                self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._lines:
                lines, self._lines, self._size = self._lines, [], 0
                try:
                    self.stream.write("\n".join(lines) + "\n")
                except Exception:
                    pass  # stderr gone: nothing left to tell
            super().flush()


def setup(config: LoggingConfig) -> None:
    # Records carry nothing our formats do not print: no caller frame lookup, thread or
    # process names (the Logging HOWTO's "Optimization" switches).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for old in logging.getLogger().handlers:
        old.flush()
    handler = BufferedHandler()
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(StormFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # ours replaces it


class AccessLogger(AbstractAccessLogger):
    """One line per request: the path only (never the query string: it may hold anything),
    route, status, durations, auth outcome, appid and the openid as a keyed hash."""

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logging.getLogger(ACCESS), log_format)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = access_fields(request, response, time)
        handler = _sole_handler(self.logger)
        if handler is None:
            self.logger.info("%s %s %s", request.method, fields["path"], response.status,
                             extra={_FIELDS: fields})
            return
        # The line a LogRecord would have made, without making one: logging's dispatch and
        # records were a fifth of a proxied request's CPU.
        created = _now()
        formatter = handler.formatter
        assert isinstance(formatter, (TextFormatter, JsonFormatter))
        message = f"{request.method} {fields['path']} {response.status}"
        handler.add(redact(formatter.line(created, _msecs(created), "INFO", ACCESS, message,
                                          fields)), logging.INFO)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


_now = time.time


def _sole_handler(logger: logging.Logger) -> BufferedHandler | None:
    """The handler ``setup`` installed, when it alone takes ``logger``'s INFO lines and none
    of the loggers on the way filters them; None when anything else (a handler or filter
    added since, pytest's caplog) must see a real LogRecord."""
    if not logger.isEnabledFor(logging.INFO):
        return None
    node: logging.Logger | None = logger
    while node is not None and node.parent is not None:  # up to the root
        if node.handlers or node.filters or not node.propagate or node.disabled:
            return None
        node = node.parent
    root = logging.getLogger()
    if len(root.handlers) != 1 or root.filters:
        return None
    handler = root.handlers[0]
    if (type(handler) is not BufferedHandler or handler.level > logging.INFO
            or type(handler.formatter) not in (TextFormatter, JsonFormatter)
            or any(type(f) is not StormFilter for f in handler.filters)):
        return None  # StormFilter lets every access line through
    return handler


def access_fields(request: web.BaseRequest, response: web.StreamResponse,
                  seconds: float) -> dict[str, Any]:
    # What the request carries, read once: asking it for a key it lacks raises (and catches)
    # a KeyError inside, several times a request.
    state = {key: request[key] for key in request}
    # A request that never reached the app (unparsable HTTP) has no app to look at: only
    # requests our middleware saw carry a request id.
    live, started = None, None
    if isinstance(request, web.Request) and REQUEST_ID in state:
        live = request.app[SERVICES] if SERVICES in request.app else None
        started = state.get(STARTED)
    if started is not None:  # perf_counter: aiohttp's own figure ticks in whole ms on uvloop
        seconds = time.perf_counter() - started
    identity = state.get(IDENTITY)
    upstream = state.get(UPSTREAM_SECONDS)
    fields: dict[str, Any] = {
        "request_id": state.get(REQUEST_ID), "method": request.method,
        # raw: percent-escapes stay escaped, so no control character reaches the log
        "path": state.get(LOGGED_PATH) or request.raw_path.partition("?")[0][:256],
        "route": state.get(ROUTE_LABEL), "status": response.status,
        "duration_ms": round(seconds * 1000, 2),
        "upstream_ms": round(upstream * 1000, 2) if upstream is not None else None,
        "auth": "ok" if identity else ("denied" if response.status in (401, 403) else "none"),
        "appid": identity.session.appid if identity else None}
    if ADMIN_TOKEN in state:  # which admin token, by its position: never its value
        fields["admin_token"] = state[ADMIN_TOKEN]
    if live is not None and isinstance(request, web.Request):  # not for unparsable requests
        services = live.current
        fields["client_ip"] = client_address(request, services.config)
        if identity is not None and services.config.logging.log_openid:
            fields["openid"] = identity.session.openid
            user = identity.session.user
            if user is not None and user.user_id is not None:
                fields["user_id"] = user.user_id
        elif identity is not None:
            fields["openid_hash"] = openid_hash(services.keyring.log_key, identity.session.openid)
    else:
        fields["client_ip"] = request.remote
    hook = state.get(HOOK_OUTCOME)
    if hook is not None:
        fields["login_hook"] = hook.result
        fields["login_hook_ms"] = round(hook.seconds * 1000, 2)
    return fields


@functools.lru_cache(maxsize=4096)  # one HMAC per active user, not per request
def openid_hash(key: bytes, openid: str) -> str:
    """Stable across replicas (same signing key), useless without it: 12 hex characters."""
    return hmac.new(key, openid.encode(), hashlib.sha256).hexdigest()[:12]
