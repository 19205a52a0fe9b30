"""Checks shared by the test modules: the gateway's JSON error shape, Prometheus samples, and
log lines."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from datetime import datetime
from typing import Any, Iterable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import logs
from rawhttp import RawResponse

# --- the error shape (docs/endpoints.md: every error is JSON {"error": code, "message": text}) --------

JSON_UTF8 = "application/json;charset=utf-8"


def assert_json_error(status: int, content_type: str, body: bytes | str | Any, want_status: int,
                      want_code: str | None) -> dict[str, Any]:
    """That status, ``application/json; charset=utf-8``, and a JSON object of exactly
    ``error`` (``want_code``, unless None) and a non-empty ``message``; returns the object.
    ``body`` as received (bytes or text) or already parsed."""
    assert status == want_status, body
    assert content_type.replace(" ", "").lower() == JSON_UTF8, (content_type, body)
    data = json.loads(body) if isinstance(body, (bytes, str)) else body
    assert isinstance(data, dict) and set(data) == {"error", "message"}, data
    if want_code is not None:
        assert data["error"] == want_code, data
    assert isinstance(data["message"], str) and data["message"], data
    return data


async def expect_error(resp: Any, status: int, code: str | None) -> dict[str, Any]:
    """``assert_json_error`` on an aiohttp client response (a TestClient's too) or a
    RawResponse."""
    if isinstance(resp, RawResponse):
        return assert_json_error(resp.status, resp.header("Content-Type")[0], resp.body,
                                 status, code)
    return assert_json_error(resp.status, resp.headers["Content-Type"], await resp.read(),
                             status, code)


# --- identity headers, as an upstream could read them ------------------------------------------

IDENTITY_NAMES = ("x-wx-openid", "x-wx-unionid", "x-wx-appid", "x-mp-platform", "x-wx-corpid")
SPOOF = "spoofed-identity-0000"  # what a client forges into them


def identity_headers_seen(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every header an upstream framework could read as an identity header."""
    return [(k, v) for k, v in headers if k.strip().lower().replace("_", "-") in IDENTITY_NAMES]


# --- Prometheus text ---------------------------------------------------------------------------

Samples = dict[str, list[tuple[dict[str, str], float]]]


def metric_samples(text: str) -> Samples:
    """Sample name → [(labels, value)] from Prometheus text."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), s.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for ls, v in samples.get(name, []) if ls == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


# --- log lines ---------------------------------------------------------------------------------

LEVELS = {"debug", "info", "warning", "error", "critical"}
TEXT_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} "
                       r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")


def parse_json_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every line must be a JSON object with time, level, logger and message."""
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
        assert isinstance(record, dict), line
        for key in ("time", "level", "logger", "message"):
            assert key in record, (key, line)
        datetime.fromisoformat(record["time"])
        assert record["level"] in LEVELS, line
        assert isinstance(record["logger"], str) and record["logger"], line
        assert isinstance(record["message"], str), line
        records.append(record)
    return records


def parse_text_lines(lines: Iterable[str]) -> list[dict[str, Any]]:
    """Every line must be ``<asctime> LEVEL logger: message [key=value ...]``; access lines'
    fields are read back (values as strings, None ones are left out by the text format)."""
    records = []
    for line in lines:
        match = TEXT_LINE.match(line)
        assert match, f"not a text log line: {line!r}"
        level, logger, message = match.groups()
        record: dict[str, Any] = {"level": level.lower(), "logger": logger, "message": message}
        if logger == logs.ACCESS:
            record.update(dict(re.findall(r" (\w+)=(\S*)", message)))
        records.append(record)
    return records


def parse_lines(fmt: str, lines: Iterable[str]) -> list[dict[str, Any]]:
    return parse_json_lines(lines) if fmt == "json" else parse_text_lines(lines)


def is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


@contextlib.contextmanager
def unaccepting_port() -> Iterator[int]:
    """A listener whose accept queue is full: further SYNs are dropped, connect() hangs."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()
