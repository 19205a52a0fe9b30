"""SIGHUP: re-read the configuration file and apply it to new requests, or refuse it whole."""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web

from . import config as config_
from . import logs
from .errors import ConfigError
from .services import Services
from .state import SERVICES
from .settings import Config

log = logging.getLogger("gateway.reload")

# What a running process cannot change: its socket, its processes, its Redis connections,
# its own routes for /auth/* and the size of what it already allocated.
RESTART_ONLY = ("listen_host", "listen_port", "workers", "redis", "auth_prefix",
                "shutdown_grace", "client_header_timeout", "client_body_timeout",
                "keepalive_timeout", "max_connections")


def reload(app: web.Application, path: str) -> bool:
    """Apply the file at ``path``; False (and the old configuration kept) when it is invalid."""
    try:
        new = config_.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused: %s", problem)
        log.error("reload refused: the running configuration stays in force")
        return False
    live = app[SERVICES]
    old = live.current.config
    pending = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if new.session.cache_size != old.session.cache_size:
        pending.append("session.cache_size")
    if pending:
        log.warning("reload: %s changed but only take effect after a restart; "
                    "applying everything else", ", ".join(pending))
    effective = dataclasses.replace(
        new, **{name: getattr(old, name) for name in RESTART_ONLY},
        session=dataclasses.replace(new.session, cache_size=old.session.cache_size))
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

