"""Reading a YAML tree with the environment substituted, keeping every problem by key path."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Any, Callable, Mapping, TypeVar

from .settings import IPNetwork

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_T = TypeVar("_T")
MAX_DURATION = 365 * 86400.0
_MISSING: Any = object()  # an unset ${VAR}: already reported, not to be validated further


def parse_duration(value: Any) -> float:
    """``250ms``, ``30s``, ``5m``, ``2h``, ``7d`` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 250ms")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use e.g. 250ms, 30s, 5m, 2h, 7d)")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_DURATION:
        raise ValueError("must be greater than zero and at most 365d")
    return seconds


class Reader:
    """Walks the YAML tree, recording problems under their key path instead of stopping.

    Each reader returns the value, or None after recording why there is none.
    """

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f"{key or '(top level)'}: {message}")

    def expand(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value

        missing: list[str] = []

        def substitute(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in self.environ:
                return self.environ[name]
            if default is not None:
                return default
            if name not in missing:
                missing.append(name)
            return ""

        expanded = _ENV_RE.sub(substitute, value)
        for name in missing:
            self.fail(key, f"environment variable {name} is not set")
        return _MISSING if missing else expanded

    def string(self, key: str, value: Any, *, allow_empty: bool = False) -> str | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(key, f"expected a string, got {_kind(value)}")
            return None
        text = str(value)
        if not text and not allow_empty:
            self.fail(key, "must not be empty")
            return None
        return text

    def duration(self, key: str, value: Any) -> float | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(key, str(exc))
            return None

    def section(self, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(key, f"expected a mapping, got {_kind(value)}")
            return None
        for name in value:
            if name not in allowed:
                where = f"{key}.{name}" if key else str(name)
                self.fail(where, f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def items(self, key: str, value: Any) -> list[Any] | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {_kind(value)}")
            return None
        return value

    def optional(self, key: str, section: dict[str, Any], name: str,
                 read: Callable[[str, Any], _T | None], default: _T) -> _T | None:
        if section.get(name) is None:
            return default
        return read(f"{key}.{name}" if key else name, section[name])

    def networks(self, key: str, value: Any) -> tuple[IPNetwork, ...] | None:
        items = self.items(key, value)
        if items is None:
            return None
        networks: list[IPNetwork] = []
        for i, item in enumerate(items):
            text = self.string(f"{key}[{i}]", item)
            if text is None:
                continue
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(f"{key}[{i}]", f"{text!r} is not an IP address or CIDR network "
                                         "(e.g. 10.0.0.0/8, 127.0.0.1, fd00::/8)")
        return tuple(networks)

    def boolean(self, key: str, value: Any) -> bool | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        self.fail(key, f"expected true or false, got {value!r}")
        return None

    def count(self, key: str, value: Any) -> int | None:
        value = self.expand(key, value)
        if value is _MISSING:
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(key, f"expected a whole number >= 0, got {value!r}")
            return None
        return value


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__)
