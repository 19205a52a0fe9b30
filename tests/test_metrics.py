"""Metrics: every metric documented, each one counting what it says,
summed across ``workers: N``, and ``deploy/grafana-dashboard.json`` showing them.

- docs/operations.md's metrics table lists every metric family ``gateway.metrics.Metrics`` defines, with
  its type and label names (and nothing that does not exist);
- after traffic against an in-process gateway: logins by outcome (one label value per error
  code), WeChat calls by endpoint and outcome, sessions created by appid, Redis errors, session
  cache hits and misses, upstream latency per route;
- with ``workers: 2`` (the real supervisor) ``/metrics`` counts every request whichever worker
  answered it and whichever answers the scrape;
- the Grafana dashboard parses, uses a ``${DS_PROMETHEUS}`` input, gives every panel a title
  and a datasource, and its PromQL names only series the gateway exports.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.metrics import MetricWrapperBase

from checks import Samples, metric_samples, value
from conftest import (APPID, APPID2, SECRET, SECRET2, SIGNING_KEY, GatewayFactory, Upstream,
                      base_config, bearer, closed_port_url, login)
from gateway.admin import create_admin_app
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.metrics import Metrics
from gateway.state import SERVICES
from process import Launch, launch_with_client

ROOT = Path(__file__).resolve().parent.parent
METRICS_PAGE = ROOT / "docs" / "operations.md"
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"


# --- the metric families the code defines ------------------------------------------------------


def defined_families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Exposed family name (counters with ``_total``) → (type, label names)."""
    metrics = Metrics()
    found = {}
    for attr in vars(metrics).values():
        if isinstance(attr, MetricWrapperBase):
            kind = attr._type  # counter, histogram, gauge, summary
            name = attr._name + ("_total" if kind == "counter" else "")
            found[name] = (kind, tuple(attr._labelnames))
    # every collector in the registry is one of those attributes
    registered = {m.name for c in metrics.registry._collector_to_names for m in c.describe()}
    assert {n.removesuffix("_total") for n in found} == registered
    return found


def documented_table() -> dict[str, tuple[str, tuple[str, ...]]]:
    """The "Metrics" table of docs/operations.md: name → (type, label names).

    A label cell names labels in backticks; what follows a colon or sits in parentheses
    describes their values (``route`` (route path ... or ``none``), ``outcome``: ``ok`` ...)."""
    text = METRICS_PAGE.read_text(encoding="utf-8")
    match = re.search(r"^#+ Metrics\s*$(.*?)(?=^#)", text, re.M | re.S)
    assert match, "docs/operations.md has no Metrics section"
    rows = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        name = cells[0].strip("`")
        labels_cell = re.sub(r"\([^)]*\)", "", cells[2])
        labels = []
        for part in labels_cell.split(","):
            head = part.split(":", 1)[0]
            labels += re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", head)
        rows[name] = (cells[1].strip().lower(), tuple(labels))
    return rows


def test_every_metric_is_documented_with_type_and_labels() -> None:
    defined, documented = defined_families(), documented_table()
    assert documented, "the metrics table is empty"
    problems = []
    for name, (kind, labels) in sorted(defined.items()):
        if name not in documented:
            problems.append(f"{name} ({kind}, labels {list(labels)}) is not in the metrics table")
            continue
        doc_kind, doc_labels = documented[name]
        if doc_kind != kind:
            problems.append(f"{name}: the docs say {doc_kind}, it is a {kind}")
        if set(doc_labels) != set(labels):
            problems.append(f"{name}: the docs label {list(doc_labels)}, it has {list(labels)}")
    for name in sorted(set(documented) - set(defined)):
        problems.append(f"{name} is in the metrics table but the gateway does not export it")
    assert not problems, "docs/operations.md metrics table:\n" + "\n".join(problems)


# --- what they count, in-process -------------------------------------------------------------


async def scrape(client: TestClient) -> Samples:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return metric_samples(await resp.text())


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {ls[label] for ls, _ in samples.get(name, [])}


async def test_logins_count_one_outcome_per_error_code_and_wechat_calls_by_endpoint(
        make_gateway: GatewayFactory, wechat: TestServer) -> None:
    client = await make_gateway()
    slow = await make_gateway(wechat={"api_base": f"http://127.0.0.1:{wechat.port}",
                                      "timeout": "300ms"})

    attempts = {  # code → (status, outcome label)
        f"ok-{uuid.uuid4().hex}": (200, "ok"),
        f"ok2-{uuid.uuid4().hex}": (200, "ok"),
        f"errcode-40029-{uuid.uuid4().hex}": (401, "invalid_code"),
        f"errcode-40163-{uuid.uuid4().hex}": (401, "invalid_code"),
        f"errcode--1-{uuid.uuid4().hex}": (503, "wechat_unavailable"),
        f"errcode-40226-{uuid.uuid4().hex}": (403, "user_blocked"),
        f"errcode-45011-{uuid.uuid4().hex}": (429, "rate_limited"),
        f"http-502-{uuid.uuid4().hex}": (502, "wechat_error"),
        f"garbage-{uuid.uuid4().hex}": (502, "wechat_error"),
    }
    for code, (status, outcome) in attempts.items():
        resp = await client.post("/auth/login", json={"code": code})
        assert resp.status == status, (code, await resp.text())
        if status != 200:
            assert (await resp.json())["error"] == outcome
    # no WeChat call for these two
    resp = await client.post("/auth/login", json={"code": "x", "appid": "wx0000000000000000"})
    assert (await resp.json())["error"] == "unknown_app"
    resp = await client.post("/auth/login", data=b"not json")
    assert (await resp.json())["error"] == "invalid_request"
    resp = await slow.post("/auth/login", json={"code": f"slow-1000-{uuid.uuid4().hex}"})
    assert (await resp.json())["error"] == "wechat_timeout"

    samples = await scrape(client)
    want: dict[str, int] = {}
    for _, outcome in attempts.values():
        want[outcome] = want.get(outcome, 0) + 1
    want |= {"unknown_app": 1, "invalid_request": 1}
    logins = {ls["outcome"]: v for ls, v in samples["wxgw_logins_total"]}
    assert logins == want

    # WeChat: one observation per call, by endpoint and outcome; none for the two above
    observed = {(ls["endpoint"], ls["outcome"]): v
                for ls, v in samples["wxgw_wechat_duration_seconds_count"]}
    observed_want = {("jscode2session", o): n for o, n in want.items()
                     if o not in ("unknown_app", "invalid_request")}
    assert observed == observed_want
    for (endpoint, outcome), n in observed.items():
        assert value(samples, "wxgw_wechat_duration_seconds_bucket", endpoint=endpoint,
                     outcome=outcome, le="+Inf") == n
    timed = await scrape(slow)
    assert value(timed, "wxgw_logins_total", outcome="wechat_timeout") == 1
    assert value(timed, "wxgw_wechat_duration_seconds_count", endpoint="jscode2session",
                 outcome="wechat_timeout") == 1
    total = value(timed, "wxgw_wechat_duration_seconds_sum", endpoint="jscode2session",
                  outcome="wechat_timeout")
    assert total is not None and 0.25 < total < 1.0

    # the other WeChat endpoints: stable_token, checksession, getuserphonenumber
    session = await login(client)
    token = session["token"]
    assert (await client.get("/auth/session?check=true", headers=bearer(token))).status == 200
    resp = await client.post("/auth/phone", json={"code": f"p-{uuid.uuid4().hex}"},
                             headers=bearer(token))
    assert resp.status == 200, await resp.text()
    resp = await client.post("/auth/phone", json={"code": f"errcode-40029-{uuid.uuid4().hex}"},
                             headers=bearer(token))
    assert resp.status == 400
    samples = await scrape(client)
    calls = {(ls["endpoint"], ls["outcome"]): v
             for ls, v in samples["wxgw_wechat_duration_seconds_count"]}
    assert calls[("stable_token", "ok")] == 1
    assert calls[("checksession", "ok")] == 1
    assert calls[("getuserphonenumber", "ok")] == 1
    assert calls[("getuserphonenumber", "invalid_phone_code")] == 1
    # the endpoint label is the API's last path segment, never a URL with a query
    assert all("/" not in e and "?" not in e for e, _ in calls)


async def test_sessions_created_by_appid(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(apps=[{"appid": APPID, "secret": SECRET},
                                      {"appid": APPID2, "secret": SECRET2}])
    for _ in range(3):
        await login(client, appid=APPID)
    await login(client, appid=APPID2)
    resp = await client.post("/auth/login", json={"code": f"errcode-40029-{uuid.uuid4().hex}",
                                                  "appid": APPID2})
    assert resp.status == 401
    session = await login(client, appid=APPID)
    assert (await client.post("/auth/refresh", headers=bearer(session["token"]))).status == 200
    samples = await scrape(client)
    created = {ls["appid"]: v for ls, v in samples["wxgw_sessions_created_total"]}
    assert created == {APPID: 4, APPID2: 1}  # a refresh creates no session; a failure neither


async def test_redis_errors_count_every_503_store_unavailable(
        make_gateway: GatewayFactory) -> None:
    healthy = await make_gateway()
    token = (await login(healthy))["token"]
    down = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:",
                                     "timeout": "200ms"})
    assert value(await scrape(down), "wxgw_redis_errors_total") == 0
    for i in range(1, 4):
        resp = await down.get("/api/x", headers=bearer(token))
        assert resp.status == 503 and (await resp.json())["error"] == "store_unavailable"
        assert value(await scrape(down), "wxgw_redis_errors_total") == i
    resp = await down.post("/auth/login", json={"code": f"c-{uuid.uuid4().hex}"})
    assert resp.status == 503
    resp = await down.get("/readyz")
    assert resp.status == 503
    samples = await scrape(down)
    assert value(samples, "wxgw_redis_errors_total") == 5
    assert value(samples, "wxgw_logins_total", outcome="store_unavailable") == 1
    # what does not touch Redis is no Redis error
    assert (await down.get("/healthz")).status == 200
    assert (await down.get("/api/x")).status == 401  # no token: refused before Redis
    assert value(await scrape(down), "wxgw_redis_errors_total") == 5
    assert value(await scrape(healthy), "wxgw_redis_errors_total") == 0


async def wait_cache_live(client: TestClient, within: float = 5.0) -> None:
    cache = client.app[SERVICES].connections.cache
    assert cache is not None
    deadline = time.monotonic() + within
    while not cache.live:
        assert time.monotonic() < deadline, "the session cache never became live"
        await asyncio.sleep(0.01)


async def test_session_cache_hits_and_misses(make_gateway: GatewayFactory,
                                             upstream: Upstream) -> None:
    client = await make_gateway()
    await wait_cache_live(client)
    token = (await login(client))["token"]
    before = await scrape(client)
    hits0 = value(before, "wxgw_session_cache_lookups_total", result="hit") or 0
    misses0 = value(before, "wxgw_session_cache_lookups_total", result="miss") or 0

    assert (await client.get("/api/a", headers=bearer(token))).status == 200  # miss, then cached
    samples = await scrape(client)
    assert value(samples, "wxgw_session_cache_lookups_total", result="miss") == misses0 + 1
    for i in range(1, 5):
        assert (await client.get("/api/a", headers=bearer(token))).status == 200
        samples = await scrape(client)
        assert value(samples, "wxgw_session_cache_lookups_total", result="hit") == hits0 + i
    assert value(samples, "wxgw_session_cache_lookups_total", result="miss") == misses0 + 1

    # logout invalidates: the next lookup misses (and is refused by Redis)
    assert (await client.post("/auth/logout", headers=bearer(token))).status == 204
    deadline = time.monotonic() + 2
    while (await client.get("/api/a", headers=bearer(token))).status != 401:
        assert time.monotonic() < deadline
    samples = await scrape(client)
    assert value(samples, "wxgw_session_cache_lookups_total", result="miss") >= misses0 + 2

    # with the cache off there is nothing to count
    off = await make_gateway(session={"signing_keys": [SIGNING_KEY], "ttl": "1h",
                                      "cache_size": 0})
    token = (await login(off))["token"]
    for _ in range(3):
        assert (await off.get("/api/a", headers=bearer(token))).status == 200
    assert "wxgw_session_cache_lookups_total" not in await scrape(off)


async def test_upstream_duration_per_route(make_gateway: GatewayFactory,
                                           upstream: Upstream) -> None:
    client = await make_gateway()
    token = (await login(client))["token"]
    for _ in range(3):
        assert (await client.get("/public/x")).status == 200
    for _ in range(2):
        assert (await client.get("/api/slow/200", headers=bearer(token))).status == 200
    assert (await client.get("/maybe/status/503")).status == 503
    assert (await client.get("/api/x")).status == 401  # never forwarded
    samples = await scrape(client)
    name = "wxgw_upstream_duration_seconds"
    counts = {ls["route"]: v for ls, v in samples[f"{name}_count"]}
    assert counts == {"/public/": 3, "/api/": 2, "/maybe/": 1}
    api_sum = value(samples, f"{name}_sum", route="/api/")
    assert api_sum is not None and 0.4 <= api_sum < 2
    assert value(samples, f"{name}_bucket", route="/api/", le="0.1") == 0
    assert value(samples, f"{name}_bucket", route="/api/", le="0.25") == 2
    # the request histogram covers the whole request, at least the upstream's part
    req_sum = value(samples, "wxgw_request_duration_seconds_sum", route="/api/")
    assert req_sum is not None and req_sum >= api_sum


async def test_routes_are_labelled_as_configured_and_never_by_request_path(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    """``/api/`` and ``/v2`` as written in the file; a hundred distinct request paths add no
    label value (an unmatched path is ``none``)."""
    client = await make_gateway(routes=[
        {"path": "/api/", "upstream": upstream.url, "auth": "public"},
        {"path": "/v2", "upstream": upstream.url, "auth": "public"},
        {"path": "/v2/deep//", "upstream": upstream.url, "auth": "public"},
    ])
    for i in range(50):
        assert (await client.get(f"/api/item/{i}")).status == 200
        assert (await client.get(f"/v2/item/{i}")).status == 200
        assert (await client.get(f"/nowhere/{i}")).status == 404
    assert (await client.get("/v2/deep/x")).status == 200
    assert (await client.get("/api")).status == 200  # the prefix itself: still "/api/"
    samples = await scrape(client)
    routes = label_values(samples, "wxgw_upstream_duration_seconds_count", "route")
    assert routes == {"/api/", "/v2", "/v2/deep//"}
    assert value(samples, "wxgw_requests_total", route="/api/", status="200") == 51
    assert value(samples, "wxgw_requests_total", route="/v2", status="200") == 50
    assert value(samples, "wxgw_requests_total", route="none", status="404") == 50
    assert not {r for r in label_values(samples, "wxgw_requests_total", "route")
                if "item" in r or "nowhere" in r}


# --- workers: 2 ---------------------------------------------------------------------------------


async def test_workers_metrics_sum_every_worker(launch: Launch, redis_server: EmbeddedRedis,
                                                wechat: TestServer, upstream: Upstream) -> None:
    data = base_config(redis_server.url, f"wxgw-metrics-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data["workers"] = 2
    async with aiohttp.ClientSession() as http:
        # A connection per request: both workers answer.
        gw, client = await launch_with_client(launch, data, http, fresh=True)
        await gw.wait_for_line(lambda line: "listening" in line, count=2)
        for i in range(40):
            await client.call("GET", f"/public/{i}", expect=200)
            if i % 4 == 0:
                await client.call("GET", "/api/x", expect=401)
            if i % 5 == 0:
                await client.call("GET", "/nowhere", expect=404)
        for _ in range(3):
            await client.login(f"w-{uuid.uuid4().hex}")

        for _ in range(10):  # each scrape may land on either worker: all must agree
            made = len(client.sent)
            reply = await client.call("GET", "/metrics", expect=200)
            samples = metric_samples(reply.body.decode())
            counted = sum(v for _, v in samples["wxgw_requests_total"])
            assert counted == made, (counted, made)
            by_route = {(ls["route"], ls["status"]): v
                        for ls, v in samples["wxgw_requests_total"]}
            sent = [s for s in client.sent[:made]]
            assert by_route[("/public/", "200")] == sum(s.path.startswith("/public/")
                                                       for s in sent)
            assert by_route[("/api/", "401")] == sum(s.path == "/api/x" for s in sent)
            assert by_route[("none", "404")] == sum(s.path == "/nowhere" for s in sent)
            assert value(samples, "wxgw_logins_total", outcome="ok") == 3
            assert value(samples, "wxgw_sessions_created_total", appid=APPID) == 3
            assert sum(v for _, v in samples["wxgw_request_duration_seconds_count"]) == made
            assert value(samples, "wxgw_upstream_duration_seconds_count",
                         route="/public/") == 40
    assert await gw.stop() == 0, gw.output()


# --- the Grafana dashboard ----------------------------------------------------------------------


METRIC_NAME = re.compile(r"wxgw_[a-z_]+")


async def exported_series(make_gateway: GatewayFactory) -> set[str]:
    """Every series name a gateway exports once each metric has seen traffic."""
    client = await make_gateway()
    await wait_cache_live(client)
    token = (await login(client))["token"]
    await client.post("/auth/login", json={"code": f"errcode-40029-{uuid.uuid4().hex}"})
    for _ in range(2):
        assert (await client.get("/api/x", headers=bearer(token))).status == 200
    assert (await client.get("/auth/session?check=true", headers=bearer(token))).status == 200
    down = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:",
                                     "timeout": "200ms"})
    assert (await down.get("/readyz")).status == 503
    admin = TestClient(TestServer(create_admin_app(client.app)))  # the admin API's own app
    await admin.start_server()
    assert (await admin.get("/admin/sessions")).status == 401
    await admin.close()
    text = (await (await client.get("/metrics")).text()) + (await (await down.get("/metrics")).text())
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for family in defined_families():  # every family has produced series
        base = family.removesuffix("_total")
        assert any(n == family or n.startswith(base + "_") for n in names), family
    return names


def dashboard() -> dict[str, Any]:
    assert DASHBOARD.exists(), f"{DASHBOARD} is missing"
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def panels(data: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in data.get("panels", []):
        found.append(panel)
        found += panel.get("panels", [])  # collapsed rows hold theirs
    return found


def exprs(data: dict[str, Any]) -> list[str]:
    found = [t["expr"] for p in panels(data) for t in p.get("targets", []) if "expr" in t]
    for var in data.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            found.append(query)
    return found


def test_dashboard_is_a_grafana_dashboard_with_a_prometheus_input() -> None:
    data = dashboard()
    assert isinstance(data.get("schemaVersion"), int) and data["schemaVersion"] >= 36
    assert data.get("title")
    inputs = {i["name"]: i for i in data.get("__inputs", [])}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource"
    assert inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ids = [p["id"] for p in panels(data)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(data):
        assert panel.get("title"), panel
        assert {"h", "w", "x", "y"} <= set(panel.get("gridPos", {})), panel["title"]
        if panel.get("type") == "row":
            continue
        ds = panel.get("datasource")
        assert isinstance(ds, dict) and ds.get("uid") == "${DS_PROMETHEUS}", panel["title"]
        assert ds.get("type") == "prometheus", panel["title"]
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            assert target.get("expr"), panel["title"]
            assert target.get("refId"), panel["title"]
            tds = target.get("datasource", ds)
            assert tds.get("uid") == "${DS_PROMETHEUS}", panel["title"]
    for expr in exprs(data):
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr
        assert expr.count("[") == expr.count("]"), expr


async def test_dashboard_queries_only_series_the_gateway_exports(
        make_gateway: GatewayFactory) -> None:
    data = dashboard()
    exported = await exported_series(make_gateway)
    used = {name for expr in exprs(data) for name in METRIC_NAME.findall(expr)}
    assert used, "no PromQL in the dashboard"
    unknown = sorted(used - exported)
    assert not unknown, f"the dashboard queries series the gateway does not export: {unknown}"
    # every family the gateway defines is on the dashboard
    for family, (kind, _) in defined_families().items():
        base = family.removesuffix("_total")
        assert any(u == family or u.startswith(base + "_") for u in used), (
            f"{family} is not on the dashboard")


def test_dashboard_has_the_panels_an_operator_needs() -> None:
    data = dashboard()
    by_title = {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in panels(data)}
    everything = "\n".join(e for es in by_title.values() for e in es)

    def panel_with(*needles: str) -> bool:
        return any(all(n in "\n".join(es) for n in needles) for es in by_title.values())

    assert panel_with("wxgw_requests_total", "route", "status"), "request rate by route/status"
    assert panel_with("wxgw_requests_total", 'status=~"5'), "error rate"
    for histogram in ("wxgw_request_duration_seconds_bucket",
                      "wxgw_upstream_duration_seconds_bucket"):
        for q in ("0.5", "0.99"):
            assert re.search(rf"histogram_quantile\(\s*{re.escape(q)}\s*,[^\n]*{histogram}"
                             rf"[^\n]*\ble\b", everything) or re.search(
                rf"histogram_quantile\(\s*{re.escape(q)}\s*,\s*sum by \([^)]*\ble\b[^)]*\)"
                rf"\s*\(\s*rate\(\s*{histogram}", everything), (histogram, q)
    assert panel_with("wxgw_logins_total", "outcome"), "logins by outcome"
    assert panel_with("wxgw_wechat_duration_seconds_bucket", "histogram_quantile"), "WeChat latency"
    assert panel_with("wxgw_wechat_duration_seconds_count", "outcome"), "WeChat outcomes"
    assert panel_with("wxgw_redis_errors_total"), "Redis errors"
    assert panel_with("wxgw_sessions_created_total"), "sessions created"
    assert panel_with('wxgw_session_cache_lookups_total{result="hit"}',
                      "wxgw_session_cache_lookups_total"), "cache hit ratio"
    for expr in everything.splitlines():
        if "_bucket" in expr or "_total" in expr:
            assert "rate(" in expr or "increase(" in expr, f"a raw counter: {expr}"
