"""SIGHUP: re-read the configuration file and apply it to new requests, or refuse it whole."""

from __future__ import annotations

import dataclasses
import logging
import ssl
import typing
from typing import Any

from aiohttp import web

from . import loader
from . import logs
from .errors import ConfigError
from .services import Services
from .state import SERVICES, TLS_CONTEXT
from .tls import load_chain, server_context
from .config import Config

log = logging.getLogger("gateway.reload")


def restart_only(cls: type[Any] = Config, prefix: str = "") -> tuple[str, ...]:
    """The attribute paths (``session.cache_size``) declared ``restart_only``, in field order."""
    hints = typing.get_type_hints(cls)
    found: list[str] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("restart_only"):
            found.append(prefix + f.name)
        elif dataclasses.is_dataclass(hints[f.name]):
            found += restart_only(hints[f.name], f"{prefix}{f.name}.")
    return tuple(found)


def _get(value: Any, path: str) -> Any:
    for name in path.split("."):
        value = getattr(value, name)
    return value


def _replace(value: Any, path: str, new: Any) -> Any:
    name, _, rest = path.partition(".")
    return dataclasses.replace(value, **{name: _replace(getattr(value, name), rest, new)
                                         if rest else new})


# What a running process cannot change (its socket, processes, Redis connections, /auth/*
# routes, what it already allocated): the fields the declaration marks restart_only.
RESTART_ONLY = restart_only()


def _reload_tls(app: web.Application, old: Config, new: Config) -> Config:
    """Load the new certificate files into the listener's context: connections accepted from
    now on get them, open ones keep theirs. HTTPS itself cannot be turned on or off in place
    (the listener is already bound), so that part of ``new`` waits for a restart."""
    context = app.get(TLS_CONTEXT)
    if (context is not None) != new.tls.enabled:
        log.warning("reload: tls %s only after a restart; the listener keeps %s",
                    "is turned on" if new.tls.enabled else "is turned off",
                    "HTTPS" if context is not None else "plain HTTP")
        return dataclasses.replace(new, tls=old.tls)
    if context is None:
        return new
    try:
        # A pair that loads into a context of its own first: a key that fails after the
        # certificate loaded must not leave the listener's context half replaced.
        server_context(new.tls.cert_file, new.tls.key_file)
        load_chain(context, new.tls.cert_file, new.tls.key_file)
    except (OSError, ssl.SSLError) as exc:  # changed since the loader checked them
        log.error("reload: cannot load tls.cert_file/tls.key_file (%s); new connections keep "
                  "getting the previous certificate", exc)
        return dataclasses.replace(new, tls=old.tls)
    log.info("reload: TLS certificate reloaded from %s", new.tls.cert_file)
    return new


def reload(app: web.Application, path: str) -> bool:
    """Apply the file at ``path``; False (and the old configuration kept) when it is invalid."""
    try:
        new = loader.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: the running configuration stays in force")
        return False
    live = app[SERVICES]
    old = live.current.config
    pending = [path for path in RESTART_ONLY if _get(new, path) != _get(old, path)]
    if pending:
        log.warning("reload: %s changed but only take effect after a restart; "
                    "applying everything else", ", ".join(pending))
    effective = new
    for path in RESTART_ONLY:
        effective = _replace(effective, path, _get(old, path))
    effective = _reload_tls(app, old, effective)
    services = Services.build(effective, live.connections)
    if services.asserter is not None and live.current.asserter is not None:
        services.asserter.succeed(live.current.asserter)
    live.current = services
    if live.connections.cache is not None:
        # Identities were verified under the old keys, apps and header names.
        live.connections.cache.clear()
    logs.setup(effective.logging)
    log.info("configuration reloaded: %d route(s), %d app(s), %d signing key(s)",
             len(effective.routes), len(effective.apps), len(effective.session.signing_keys))
    return True

