"""Command line: ``python -m gateway [--config PATH] [--check]`` (also ``wx-gateway``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from aiohttp import web

from . import config as config_
from .app import AccessLogger, create_app
from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="wx-gateway", description="Authentication gateway for WeChat Mini Program backends")
    parser.add_argument("--config", help="YAML configuration file "
                        "[$GATEWAY_CONFIG, else ./config.yaml]")
    parser.add_argument("--check", action="store_true",
                        help="validate the configuration and exit (0 when valid)")
    args = parser.parse_args(argv)
    path = args.config or os.environ.get("GATEWAY_CONFIG") or "config.yaml"
    try:
        config = config_.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.check:
        print(f"{path}: configuration is valid")
        return 0
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _use_uvloop()
    log = logging.getLogger("gateway")
    log.info("wx-gateway listening on %s:%d (%d route(s), %d app(s))", config.listen_host,
             config.listen_port, len(config.routes), len(config.apps))
    # run_app turns SIGTERM/SIGINT into a graceful stop: close the listener, let in-flight
    # requests finish within shutdown_timeout, run cleanup_ctx, return normally (exit 0).
    web.run_app(create_app(config), host=config.listen_host, port=config.listen_port,
                shutdown_timeout=config.shutdown_grace, access_log_class=AccessLogger,
                print=None)
    log.info("wx-gateway stopped")
    return 0


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


if __name__ == "__main__":
    sys.exit(main())
