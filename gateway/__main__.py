"""Command line: ``python -m gateway [--config PATH] [--check]`` (also ``wx-gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import Any, Coroutine

from . import loader
from .errors import ConfigError
from . import logs, supervisor
from .server import serve


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
        config = loader.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if args.check:
        print(f"{path}: configuration is valid")
        return 0
    logs.setup(config.logging)
    if config.workers > 1 and not supervisor.is_worker():
        return supervisor.supervise(path, config.workers, config.shutdown_grace)
    try:
        _run(serve(config, path, reuse_port=supervisor.is_worker()))
    except OSError as exc:  # e.g. the port is taken
        print(f"listen: cannot listen on {config.listen_host}:{config.listen_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.getLogger("gateway").info("wx-gateway stopped")
    return 0


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
