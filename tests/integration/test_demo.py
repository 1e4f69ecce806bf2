"""End to end on the real local stack: sweep via Ray's job API, promotion, Serve, HTTP, Prometheus, stack down."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from cluster import demo
from cluster.local import stack
from cluster.local.processes import free_ports
from cluster.prometheus import Prometheus, parse_vector
from trainers.data.emotions import EMOTIONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DASHBOARD = Path(__file__).resolve().parents[2] / "helm/empathy-platform/files/grafana/empathy-serve.json"
ONLY_ON_ERRORS_OR_SERVE_BATCHING = {"ray_serve_num_http_error_requests_total", "ray_serve_batch_size",
                                    "ray_edp_model_agreement_total",        # with a shadowed challenger only
                                    "ray_edp_model_load_failures_total"}    # after a failed load only


def check_grafana_dashboard_against(prometheus_url: str) -> None:
    """The chart's Grafana dashboard works on the local Prometheus: every panel query is valid PromQL there,
    and every series it reads exists (except error counters, which need errors, Serve's own batching, and the
    challenger's agreement)."""
    prom = Prometheus(prometheus_url)
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    assert exprs
    for expr in exprs:
        parse_vector(prom.query(expr.replace("$__rate_interval", "5m")), label="route")  # raises on bad PromQL
    names = {n for e in exprs for n in re.findall(r"\b(ray_[a-z_]+)", e)}
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names} - ONLY_ON_ERRORS_OR_SERVE_BATCHING
    missing = [n for n in sorted(names)
               if not parse_vector(prom.query(f'count({{__name__=~"{n}(_bucket|_sum|_count)?"}})'), label="x")]
    assert not missing, f"dashboard series absent from the local Prometheus: {missing}"


def test_whole_loop_on_the_sample(tmp_path):
    names = ["ray_gcs", "ray_dashboard", "ray_metrics", "ray_client", "serve_http", "mlflow", "s3", "prometheus"]
    ports = dict(zip(names, free_ports(len(names))))
    try:
        result = demo.run("sample", tmp_path / "stack", requests=12, ports=ports,
                          sweep_set=["base.max_steps=40", "base.eval_every=20"])
        assert sorted(r.variant for r in result.runs) == sorted(
            ["transformer", "escm", "escm-no_dcgcn", "iamm", "iamm-no_ws"])
        assert result.decision.action == "promoted" and result.decision.version == "1"
        for _body, answer in result.responses:
            assert isinstance(answer["response"], str) and answer["response"]
            assert answer["emotion"] in EMOTIONS                      # the champion is ESCM or IAMM
            assert abs(sum(e["prob"] for e in answer["emotion_top"]) - 1) < 1 or len(answer["emotion_top"]) < 32
            assert isinstance(answer["evidence"], list)
            assert answer["model"]["name"] == demo.REGISTERED_NAME and answer["model"]["version"] == "1"
        assert "p50" in result.latency and math.isfinite(result.latency["p99"])
        if demo.RELEASED.is_dir():  # the released model answered first, and still serves beside the champion
            assert result.released_version == "1" and len(result.released_responses) == len(demo.EXAMPLES)
            for _body, answer in result.released_responses:
                assert answer["response"] and answer["emotion"] in EMOTIONS
                assert answer["model"]["name"] == demo.RELEASED_NAME and answer["model"]["version"] == "1"
            status, again = demo.post(f"{result.urls['serve'].rsplit('/', 1)[0]}/{demo.RELEASED_APP}", demo.EXAMPLES[0])
            assert status == 200 and again["model"]["name"] == demo.RELEASED_NAME
            assert result.timings["to a served real model"] < result.timings["total"]
        check_grafana_dashboard_against(result.urls["prometheus"])
    finally:
        stack.down(tmp_path / "stack", log=lambda line: None)
    assert not any(s.healthy for s in stack.status(tmp_path / "stack"))
