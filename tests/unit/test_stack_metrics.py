"""PromQL building and parsing behind `edp metrics` (no Prometheus needed)."""

from __future__ import annotations

import math

import pytest

from cluster import prometheus as sm
from cluster.local.processes import free_port


def vector(*items: tuple[dict, str]) -> dict:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": m, "value": [1700000000.0, v]} for m, v in items]}}


def test_queries_group_by_route_and_use_the_window():
    m = "ray_serve_http_request_latency_ms"
    assert sm.rate_query(m, "5m") == f"sum by (route) (rate({m}_count[5m]))"
    assert sm.quantile_query(m, 0.99) == f"histogram_quantile(0.99, sum by (route, le) (rate({m}_bucket[1m])))"
    assert sm.quantile_query(m, 0.5, "30s").startswith("histogram_quantile(0.5, ")
    assert sm.series_query(m) == f"count by (route) ({m}_bucket)"
    for q in (0, 1, 1.5):
        with pytest.raises(ValueError, match="quantile"):
            sm.quantile_query(m, q)


def test_parse_vector_keeps_nan_and_labels():
    got = sm.parse_vector(vector(({"route": "/v1/respond"}, "12.5"), ({"route": "/"}, "NaN"), ({}, "3")))
    assert got["/v1/respond"] == 12.5 and math.isnan(got["/"]) and got[""] == 3.0
    assert sm.parse_vector(vector(({"instance": "a:1"}, "1")), label="instance") == {"a:1": 1.0}


def test_parse_vector_reports_errors():
    with pytest.raises(sm.MetricsError, match="bad_data: parse error"):
        sm.parse_vector({"status": "error", "errorType": "bad_data", "error": "parse error"})
    with pytest.raises(sm.MetricsError, match="matrix"):
        sm.parse_vector({"status": "success", "data": {"resultType": "matrix", "result": []}})


def fake_prometheus(answers: dict[str, dict]):
    asked = []

    def query(promql: str) -> dict:
        asked.append(promql)
        return answers.get(promql, vector())

    return query, asked


def test_collect_reads_only_the_histograms_that_exist():
    app = sm.SOURCES["app"]
    answers = {
        sm.series_query(app): vector(({"route": "/v1/respond"}, "24"), ({"route": "/healthz"}, "12")),
        sm.rate_query(app): vector(({"route": "/v1/respond"}, "2.5")),
        sm.quantile_query(app, 0.5): vector(({"route": "/v1/respond"}, "40"), ({"route": "/healthz"}, "NaN")),
        sm.quantile_query(app, 0.95): vector(({"route": "/v1/respond"}, "90")),
        sm.quantile_query(app, 0.99): vector(({"route": "/v1/respond"}, "120")),
    }
    query, asked = fake_prometheus(answers)
    rows = sm.collect(query)
    assert [(r.source, r.route) for r in rows] == [("app", "/healthz"), ("app", "/v1/respond")]
    respond = rows[1]
    assert (respond.rate, respond.p50, respond.p95, respond.p99) == (2.5, 40.0, 90.0, 120.0)
    assert rows[0].rate == 0.0 and math.isnan(rows[0].p50) and math.isnan(rows[0].p99)
    # Serve's histogram has no series: only its existence was asked, not its rate or quantiles
    serve = sm.SOURCES["serve"]
    assert sm.series_query(serve) in asked and not any(f"rate({serve}" in q for q in asked)


def test_collect_is_empty_without_data():
    query, _ = fake_prometheus({})
    assert sm.collect(query) == []


def test_targets_up_counts_the_ray_job():
    payload = {"status": "success", "data": {"activeTargets": [
        {"labels": {"job": "ray"}, "health": "up"}, {"labels": {"job": "ray"}, "health": "down"},
        {"labels": {"job": "other"}, "health": "up"}]}}
    assert sm.targets_up(payload) == (1, 2)


def test_unreachable_prometheus_is_a_clear_error():
    prom = sm.Prometheus(f"http://127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(sm.PrometheusUnreachable, match="unreachable.*edp stack up"):
        prom.query("up")


def test_default_url_prefers_env_then_the_stack(tmp_path, monkeypatch):
    monkeypatch.delenv("EDP_PROMETHEUS_URL", raising=False)
    assert sm.default_prometheus_url(tmp_path) == sm.DEFAULT_URL
    (tmp_path / "stack.json").write_text('{"ports": {}, "services": {"prometheus": {"url": "http://127.0.0.1:19090"}}}')
    assert sm.default_prometheus_url(tmp_path) == "http://127.0.0.1:19090"
    monkeypatch.setenv("EDP_PROMETHEUS_URL", "http://prom:9090")
    assert sm.default_prometheus_url(tmp_path) == "http://prom:9090"


def test_fmt_ms():
    assert sm.fmt_ms(math.nan) == "-" and sm.fmt_ms(12.345) == "12.3"
