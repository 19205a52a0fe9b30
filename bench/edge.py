"""The edge rows of bench/run.py: nginx running deploy/nginx's forward-auth recipe, as shipped,
in front of the benchmark's upstream, asking the gateway (``GET /auth/verify``) about each
request. Two of them: the recipe with its 1 s decision cache, and the same with
``proxy_cache off;`` (every request asks the gateway). Each listens like the anchor nginx
(``reuseport backlog=4096``, the same worker count) and keeps the recipe's keepalive pool to
the gateway.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import ROOT, Stack, _NGINX_COMMON, free_port

TEMPLATE = ROOT / "deploy" / "nginx" / "wx-gateway.conf.template"
CACHE_DIR = "/var/cache/nginx/wx-gateway-auth"  # the recipe's; each run uses its own
CACHE_ON = "        proxy_cache wx_gateway_auth;\n"
CACHE_OFF = "        proxy_cache off;\n"

NO_CACHE = "edge: nginx auth_request, no cache"
CACHE_1S = "edge: nginx auth_request, 1 s cache"


def recipe(prefix: str, port: int, gateway_port: int, upstream_port: int, cache: bool) -> str:
    text = TEMPLATE.read_text(encoding="utf-8")
    values = {"WX_GATEWAY_ADDR": f"127.0.0.1:{gateway_port}",
              "WX_BACKEND_ADDR": f"127.0.0.1:{upstream_port}",
              "NGINX_LISTEN": f"127.0.0.1:{port} reuseport backlog=4096"}
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    if CACHE_DIR not in text or CACHE_ON not in text:
        raise RuntimeError(f"{TEMPLATE}: no decision cache where bench/edge.py expects it")
    text = text.replace(CACHE_DIR, str(Path(prefix) / "auth-cache"))
    return text if cache else text.replace(CACHE_ON, CACHE_OFF)


def edge_proxies(stack: Stack, nginx: str, workers: int | str, gateway_port: int,
                 upstream_port: int) -> dict[str, tuple[str, Any]]:
    """Starts both edge nginx; row name → (URL to benchmark, the nginx process)."""
    started = {}
    for name, slug, cache in ((NO_CACHE, "edge-nocache", False), (CACHE_1S, "edge-cache", True)):
        port = free_port()

        def conf(prefix: str, port: int = port, cache: bool = cache) -> str:
            return _NGINX_COMMON.format(
                prefix=prefix, workers=workers,
                body=recipe(prefix, port, gateway_port, upstream_port, cache))

        proc = stack.nginx(slug, nginx, conf, port)
        started[name] = (f"http://127.0.0.1:{port}/api/bench", proc)
    return started
