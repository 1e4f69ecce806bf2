"""End to end on the real local stack: sweep via Ray's job API, promotion, Serve, HTTP, Prometheus, stack down."""

from __future__ import annotations

import math

import pytest

from cluster import demo, stack
from cluster.local_services import free_ports
from trainers.data.emotions import EMOTIONS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_whole_loop_on_the_sample(tmp_path):
    names = ["ray_gcs", "ray_dashboard", "ray_metrics", "ray_client", "serve_http", "mlflow", "s3", "prometheus"]
    ports = dict(zip(names, free_ports(len(names))))
    try:
        result = demo.run("sample", tmp_path / "stack", requests=12, ports=ports,
                          sweep_set=["base.max_steps=40", "base.eval_every=20"])
        assert sorted(r["variant"] for r in result.runs) == sorted(
            ["transformer", "escm", "escm-no_dcgcn", "iamm", "iamm-no_ws"])
        assert result.decision.action == "promoted" and result.decision.version == "1"
        for _body, answer in result.responses:
            assert isinstance(answer["response"], str) and answer["response"]
            assert answer["emotion"] in EMOTIONS                      # the champion is ESCM or IAMM
            assert abs(sum(e["prob"] for e in answer["emotion_top"]) - 1) < 1 or len(answer["emotion_top"]) < 32
            assert isinstance(answer["evidence"], list)
            assert answer["model"]["name"] == demo.REGISTERED_NAME and answer["model"]["version"] == "1"
        assert "p50" in result.latency and math.isfinite(result.latency["p99"])
    finally:
        stack.down(tmp_path / "stack", log=lambda line: None)
    assert not any(s.healthy for s in stack.status(tmp_path / "stack"))
