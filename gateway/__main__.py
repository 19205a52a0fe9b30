"""Command line: ``python -m gateway [--config PATH] [--check]`` (also ``wx-gateway``), and
``wx-gateway admin sessions|revoke|ban|unban``, a client of the admin API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
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
    commands = parser.add_subparsers(dest="command", metavar="admin")
    _admin_parser(commands.add_parser(
        "admin", help="list or end a user's sessions, ban or unban a user (the admin API)"))
    args = parser.parse_args(argv)
    if args.command == "admin":
        return admin(args)
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
        _run(serve(config, path, reuse_port=supervisor.is_worker(),
                   admin=supervisor.serves_admin()))
    except OSError as exc:  # e.g. the port is taken
        key, (host, port) = "listen", (config.listen_host, config.listen_port)
        if exc.filename == "admin.listen" and config.admin.listen is not None:
            key, (host, port) = exc.filename, config.admin.listen
        elif exc.filename == "listen_tls" and config.listen_tls is not None:
            key, (host, port) = exc.filename, config.listen_tls
        print(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    logging.getLogger("gateway").info("wx-gateway stopped")
    return 0


ADMIN_ACTIONS = {  # action: method, whether the user goes in the path (else the query)
    "sessions": ("GET", False), "revoke": ("DELETE", False),
    "ban": ("PUT", True), "unban": ("DELETE", True)}


def _admin_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=tuple(ADMIN_ACTIONS))
    parser.add_argument("--appid", required=True)
    parser.add_argument("--openid", required=True)
    parser.add_argument("--ttl", help="ban: how long (30d, 12h, seconds); default: until unban")
    parser.add_argument("--url", default="http://127.0.0.1:8081",
                        help="the admin listener (admin.listen) [%(default)s]")
    # Never the token itself on the command line: every user of the machine sees argv (ps).
    parser.add_argument("--token-env", default="WXGW_ADMIN_TOKEN", metavar="NAME",
                        help="environment variable holding an admin token [%(default)s]")


def admin(args: argparse.Namespace) -> int:
    """Call the admin API; print its JSON answer. 0: done, 1: refused or unreachable,
    2: the command itself is wrong."""
    # stripped: a token read from a file usually ends in a newline (the API strips it too)
    token = os.environ.get(args.token_env, "").strip()
    if not token:
        print(f"wx-gateway admin: set ${args.token_env} to an admin token", file=sys.stderr)
        return 2
    if not (token.isascii() and token.isprintable()):
        print(f"wx-gateway admin: ${args.token_env} holds characters no admin token has",
              file=sys.stderr)
        return 2
    if args.ttl is not None and args.action != "ban":
        print("wx-gateway admin: --ttl is for ban only", file=sys.stderr)
        return 2
    method, in_path = ADMIN_ACTIONS[args.action]
    base = args.url.rstrip("/")
    if not _http_url(base):  # urllib would read file: URLs, or raise on a malformed one
        print(f"wx-gateway admin: --url must be an http:// or https:// URL, not {base!r}",
              file=sys.stderr)
        return 2
    if in_path:
        appid, openid = (urllib.parse.quote(part, safe="") for part in (args.appid, args.openid))
        url = f"{base}/admin/bans/{appid}/{openid}"
    else:
        query = urllib.parse.urlencode({"appid": args.appid, "openid": args.openid})
        url = f"{base}/admin/sessions?{query}"
    body = json.dumps({"ttl": args.ttl}).encode() if args.ttl is not None else None
    request = urllib.request.Request(url, data=body, method=method, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with _NO_REDIRECTS.open(request, timeout=30) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        print(exc.read().decode("utf-8", "replace") or json.dumps({"status": exc.code}))
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"wx-gateway admin: cannot reach {base}: {reason}", file=sys.stderr)
        return 1
    if raw:
        print(raw.decode())
    else:  # 204: say what now holds
        print(json.dumps({"appid": args.appid, "openid": args.openid,
                          "banned": args.action == "ban"}))
    return 0


class _Refuse(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, never followed: urllib would send the admin token along to
    wherever it points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_Refuse)


def _http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and (
            parts.port is None or parts.port > 0)
    except ValueError:  # an unclosed IPv6 bracket, a port out of range
        return False


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


if __name__ == "__main__":
    sys.exit(main())
