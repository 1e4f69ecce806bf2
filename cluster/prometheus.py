"""`edp metrics`: request rate and latency quantiles of the served app, read back from Prometheus.

Two histograms, whichever exist (both in milliseconds, both tagged with `route`):
    serve  ray_serve_http_request_latency_ms   Serve's HTTP proxy: the latency a client sees
    app    ray_edp_request_latency_ms          the app's own, inside the replica (services/replica_metrics.py)
Rate:      sum by (route) (rate(M_count[W]))
Quantile:  histogram_quantile(q, sum by (route, le) (rate(M_bucket[W])))
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.local.stack import Stack, StackError

SOURCES = {"serve": "ray_serve_http_request_latency_ms", "app": "ray_edp_request_latency_ms"}
QUANTILES = (0.5, 0.95, 0.99)
DEFAULT_URL = "http://127.0.0.1:9090"

Query = Callable[[str], dict]  # PromQL -> the JSON body of /api/v1/query


class MetricsError(RuntimeError):
    pass


class PrometheusUnreachable(MetricsError):
    pass


def series_query(metric: str) -> str:
    """Which routes have the histogram at all (even with no recent requests)."""
    return f"count by (route) ({metric}_bucket)"


def rate_query(metric: str, window: str = "1m") -> str:
    """Requests per second by route over the last `window`."""
    return f"sum by (route) (rate({metric}_count[{window}]))"


def quantile_query(metric: str, q: float, window: str = "1m") -> str:
    """The q-quantile of the latency by route over the last `window`, from the histogram buckets."""
    if not 0 < q < 1:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    return f"histogram_quantile({q:g}, sum by (route, le) (rate({metric}_bucket[{window}])))"


def parse_vector(payload: dict, label: str = "route") -> dict[str, float]:
    """{label value: sample value} of an instant-vector answer; NaN stays NaN (no requests in the window)."""
    return {key[0]: value for key, value in parse_series(payload, (label,)).items()}


def parse_series(payload: dict, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    """{(label values...): sample value} of an instant-vector answer, keyed by the values of `labels`."""
    if payload.get("status") != "success":
        raise MetricsError(f"Prometheus refused the query: {payload.get('errorType', '?')}: "
                           f"{payload.get('error', payload)}")
    data = payload.get("data", {})
    if data.get("resultType") != "vector":
        raise MetricsError(f"expected an instant vector from Prometheus, got {data.get('resultType')!r}")
    return {tuple(item["metric"].get(label, "") for label in labels): float(item["value"][1])
            for item in data["result"]}


def is_duration(window: str) -> bool:
    """A PromQL duration such as 30s, 5m, 1h."""
    return re.fullmatch(r"\d+[smhd]", window) is not None


@dataclass
class RouteLatency:
    source: str  # serve | app
    route: str
    rate: float  # requests/s
    p50: float  # ms (NaN: no requests in the window)
    p95: float
    p99: float


def collect(query: Query, window: str = "1m") -> list[RouteLatency]:
    """Rate and p50/p95/p99 per route for each histogram that exists; [] when there is no data yet."""
    rows = []
    for source, metric in SOURCES.items():
        routes = parse_vector(query(series_query(metric)))
        if not routes:
            continue
        rate = parse_vector(query(rate_query(metric, window)))
        quantiles = [parse_vector(query(quantile_query(metric, q, window))) for q in QUANTILES]
        for route in sorted(routes):
            rows.append(RouteLatency(source, route, rate.get(route, 0.0),
                                     *(qs.get(route, math.nan) for qs in quantiles)))
    return rows


def targets_up(payload: dict, job: str = "ray") -> tuple[int, int]:
    """(targets up, targets) of scrape job `job` in an /api/v1/targets answer."""
    if payload.get("status") != "success":
        raise MetricsError(f"Prometheus /api/v1/targets failed: {payload.get('error', payload)}")
    active = [t for t in payload["data"]["activeTargets"] if t.get("labels", {}).get("job") == job]
    return sum(t.get("health") == "up" for t in active), len(active)


class Prometheus:
    """Prometheus's HTTP API at `base_url`: `query(promql)` (a Query) and `targets()`."""

    def __init__(self, base_url: str, timeout: float = 5.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout

    def query(self, promql: str) -> dict:
        return self._get("/api/v1/query", {"query": promql})

    def targets(self) -> dict:
        return self._get("/api/v1/targets", {"state": "active"})

    def _get(self, path: str, params: dict[str, str]) -> dict:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # 400/422 carry the error as JSON
            try:
                return json.loads(e.read())
            except ValueError:
                raise MetricsError(f"Prometheus at {self.base_url} answered {e.code} to {url}") from e
        except (OSError, ValueError) as e:
            raise PrometheusUnreachable(f"Prometheus at {self.base_url} is unreachable ({e}); start it with "
                                        "`edp stack up` or pass --prometheus URL") from e


def default_prometheus_url(state_dir: Path | None = None) -> str:
    """$EDP_PROMETHEUS_URL, else the local stack's Prometheus (its state file), else 127.0.0.1:9090."""
    if os.environ.get("EDP_PROMETHEUS_URL"):
        return os.environ["EDP_PROMETHEUS_URL"]

    try:
        record = Stack.at(state_dir).load()["services"].get("prometheus")
    except StackError:
        record = None
    return record["url"] if record else DEFAULT_URL


def fmt_ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"
