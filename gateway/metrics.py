"""Prometheus metrics, one registry per application so several gateways can share a process."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "wxgw_requests", "Requests answered, by route (configured path or gateway endpoint) "
            "and status", ["route", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "wxgw_request_duration_seconds",
            "Time to answer a request (proxied: body relayed), by route",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram(
            "wxgw_upstream_duration_seconds", "Time for an upstream to answer with headers",
            ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.logins = Counter(
            "wxgw_logins", "Login attempts by outcome (ok or the error code)", ["outcome"],
            registry=self.registry)
        self.wechat_seconds = Histogram(
            "wxgw_wechat_duration_seconds", "Calls to WeChat's (and the other platforms') server APIs by endpoint and outcome",
            ["endpoint", "outcome"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.login_hook_seconds = Histogram(
            "wxgw_login_hook_duration_seconds", "Calls to the login hook, answered or not",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.login_hook_calls = Counter(
            "wxgw_login_hook_calls", "Calls to the login hook by outcome: ok, blocked, or why "
            "it was unavailable (unreachable, timeout, status, too_large, not_json, malformed)",
            ["outcome"], registry=self.registry)
        for outcome in ("ok", "blocked", "unreachable", "timeout", "status", "too_large",
                        "not_json", "malformed"):  # exported at 0 from the start, for alerts
            self.login_hook_calls.labels(outcome)
        self.logins_banned = Counter(
            "wxgw_logins_banned", "Logins refused because the user is banned",
            registry=self.registry)
        self.admin_requests = Counter(
            "wxgw_admin_requests", "Admin API calls by endpoint, outcome (ok or the error "
            "code) and token (its position in admin.tokens, or none)",
            ["endpoint", "outcome", "token"], registry=self.registry)
        self.bans = Counter(
            "wxgw_bans", "Bans applied and lifted through the admin API, by action",
            ["action"], registry=self.registry)
        self.sessions_revoked = Counter(
            "wxgw_sessions_revoked", "Sessions ended by the admin API (revoke or ban)",
            registry=self.registry)
        self.sessions_created = Counter(
            "wxgw_sessions_created", "Sessions created by login, by appid", ["appid"],
            registry=self.registry)
        self.redis_errors = Counter(
            "wxgw_redis_errors", "Requests answered 503 store_unavailable because Redis failed",
            registry=self.registry)
        self.cache_lookups = Counter(
            "wxgw_session_cache_lookups", "Session cache lookups by result (hit or miss)",
            ["result"], registry=self.registry)
        self.connections_refused = Counter(
            "wxgw_connections_refused", "Client connections closed at once: max_connections "
            "were open", registry=self.registry)
        self.client_timeouts = Counter(
            "wxgw_client_timeouts", "Requests cut because the client went silent, by phase "
            "(header: client_header_timeout, body: client_body_timeout)", ["phase"],
            registry=self.registry)
        for phase in ("header", "body"):  # exported at 0 from the start, for alerts
            self.client_timeouts.labels(phase)
        for action in ("ban", "unban"):
            self.bans.labels(action)

        # Label children of the per-request series, looked up once: labels() costs more than
        # the increment it leads to.
        self._answered: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self._upstream: dict[str, Histogram] = {}

    def answered(self, route: str, status: int, seconds: float) -> None:
        children = self._answered.get((route, status))
        if children is None:
            children = self._answered[(route, status)] = (
                self.requests.labels(route, str(status)), self.request_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def upstream_answered(self, route: str, seconds: float) -> None:
        child = self._upstream.get(route)
        if child is None:
            child = self._upstream[route] = self.upstream_seconds.labels(route)
        child.observe(seconds)

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # workers: N — every worker's samples, summed (prometheus-client multiprocess mode)
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
