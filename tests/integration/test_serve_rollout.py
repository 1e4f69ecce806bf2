"""Rollouts the Ray way and a shadowed challenger, on a real Ray head (dashboard + Serve REST API) and MLflow.

The escm application of the shared Serve config (cluster/configs/serve/responders.yaml) is deployed through the
REST API, as `serve deploy` and KubeRay do, so `edp promote --apply` (cluster/serve_rollout.py) can update its
user_config. Client threads send requests throughout: no request may fail.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cluster.local import serve as serve_local
from cluster.local.processes import free_ports
from cluster.local.services import find_prometheus, start_prometheus, start_ray_head
from cluster.polling import poll_until
from tests.integration.registry_models import register_champion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RAY_PORTS = ("gcs", "dashboard", "metrics", "client", "agent", "dashboard_metrics", "autoscaler_metrics")


@dataclass
class Deployed:
    url: str
    dashboard: str
    metrics_port: int
    mlflow: str
    name: str
    versions: list[str]
    prometheus: str | None                               # scraping the Ray head's metrics every second


@dataclass
class Traffic:
    """Client threads posting to /v1/respond until stopped; `results` holds (client, status, version or error)."""

    url: str
    results: list[tuple[int, int, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self):
        lock = threading.Lock()

        def client(i: int) -> None:
            with httpx.Client(base_url=self.url, timeout=60) as c:
                while not self.stop.is_set():
                    try:
                        r = c.post("/v1/respond", json={"context": [f"My cat ran away, day {len(self.results)}."]},
                                   headers={"x-client-id": f"client-{i}"})
                        out = (i, r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text)
                    except httpx.HTTPError as e:
                        out = (i, -1, repr(e))
                    with lock:
                        self.results.append(out)

        self.threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in self.threads:
            t.start()
        wait_until(lambda: len(self.results) >= 4, 60, "first answers")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]

    def versions_of(self, client: int) -> list[str]:
        return [v for i, _, v in self.results if i == client]


def wait_until(predicate, timeout: float, what: str, step: float = 0.5):
    value = poll_until(predicate, timeout, step)
    if not value:
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
    return value


def model_status(d: Deployed) -> dict:
    return httpx.get(f"{d.url}/v1/model", timeout=10).json()


def replica_ids(d: Deployed) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    app = ServeSubmissionClient(d.dashboard).get_serve_details()["applications"]["escm"]
    return {r["replica_id"] for r in app["deployments"]["Responder"]["replicas"]}


def set_user_config(d: Deployed, user_config: dict) -> None:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from cluster.serve_rollout import running_config

    client = ServeSubmissionClient(d.dashboard)
    config = running_config(client.get_serve_details())
    config["applications"][0]["deployments"][0]["user_config"] = user_config
    client.deploy_applications(config)


def register_broken_version(tracking_uri: str, name: str) -> str:
    """A version whose files hold no serving bundle (a run with only a stray file): it cannot load."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name("broken-models") or c.get_experiment(c.create_experiment("broken-models"))
    run_id = c.create_run(exp.experiment_id).info.run_id
    stray = Path(f"/tmp/edp-broken-{uuid.uuid4().hex[:8]}.txt")
    stray.write_text("not a model")
    c.log_artifact(run_id, str(stray), "junk")
    stray.unlink()
    c.set_terminated(run_id)
    return c.create_model_version(name, f"runs:/{run_id}/junk", run_id=run_id).version


@pytest.fixture(scope="module")
def deployed(mlflow_server, tiny_checkpoint, tmp_path_factory):
    """Versions 1 and 2 of a fresh model (champion -> 2), served from the Serve config on a Ray head of its own."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    ckpt, _ = tiny_checkpoint
    name = f"escm-{uuid.uuid4().hex[:8]}"
    versions = [register_champion(mlflow_server, ckpt, name, acc, f"sweep-{uuid.uuid4().hex[:8]}")
                for acc in (0.3, 0.4)]
    *ports, serve_port = free_ports(len(RAY_PORTS) + 1)
    ports = dict(zip(RAY_PORTS, ports, strict=True))
    env = {"EDP_HOME": str(ROOT), "RAY_metrics_report_interval_ms": "2000"}  # shadow counts show up sooner
    prometheus = None
    head = start_ray_head(tmp_path_factory.mktemp("ray-rollout"), ports, num_cpus=2, env=env)
    try:
        config = serve_local.deploy_config(
            "escm", {"model_name": name, "mlflow_tracking_uri": mlflow_server, "poll_interval_s": 1.0,
                     "max_batch_size": 4, "batch_wait_timeout_s": 0.01}, serve_port,
            deployment={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
                        "ray_actor_options": {"num_cpus": 0.5}})
        ServeSubmissionClient(head.url).deploy_applications(config)
        prometheus = start_prometheus(tmp_path_factory.mktemp("prometheus"), None,
                                      {"ray": [f"127.0.0.1:{ports['metrics']}"]}, "1s") if find_prometheus() else None
        d = Deployed(f"http://127.0.0.1:{serve_port}/escm", head.url, ports["metrics"], mlflow_server, name, versions,
                     prometheus.url if prometheus else None)
        wait_until(lambda: _healthy(d.url), 180, "the Serve application to load its champion")
        yield d
    finally:
        if prometheus is not None:
            prometheus.stop()
        head.stop(timeout=5)  # Ray ignores SIGTERM: do not wait long before the kill


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_apply_rolls_the_replicas_in_place_and_a_broken_version_leaves_the_old_one(deployed):
    from cluster.serve_rollout import apply_version

    d = deployed
    v1, v2 = d.versions
    assert model_status(d)["version"] == v2 and model_status(d)["target"] == "alias champion"
    replicas = replica_ids(d)
    broken = register_broken_version(d.mlflow, d.name)
    with Traffic(d.url) as traffic:
        assert apply_version(d.name, v1, d.dashboard, log=lambda line: None) == "escm"
        wait_until(lambda: model_status(d)["version"] == v1, 60, f"the replicas to serve v{v1}")
        assert model_status(d)["target"] == f"version {v1}"
        apply_version(d.name, broken, d.dashboard, log=lambda line: None)
        status = wait_until(lambda: (s := model_status(d))["load_error"] and s, 60, "the failed load to show")
        n = len(traffic.results)
        wait_until(lambda: len(traffic.results) >= n + 4, 60, "answers after the failed load")
    assert (status["version"], status["target"]) == (v1, f"version {broken}")
    assert status["load_error"]["version"] == broken and "no serving bundle" in status["load_error"]["error"]
    assert traffic.failures() == []
    for i in range(2):                                   # per client: v2, then v1 for good
        seen = traffic.versions_of(i)
        assert v1 in seen and v2 not in seen[seen.index(v1):]
    assert {v for _, _, v in traffic.results} == {v1, v2}
    assert replica_ids(d) == replicas                    # reconfigured in place, not restarted


def test_shadowed_challenger_is_never_seen_and_its_promotion_fails_no_request(deployed):
    from mlflow import MlflowClient

    from cluster.tracking.promotion import promote_challenger

    d = deployed
    v1, v2 = d.versions                                  # champion alias -> v2; v1 becomes the challenger
    MlflowClient(d.mlflow).set_registered_model_alias(d.name, "challenger", v1)
    set_user_config(d, {"model_version": None, "challenger": {"mode": "shadow", "share": 1.0}})
    wait_until(lambda: (s := model_status(d))["version"] == v2 and (s["challenger"] or {}).get("model"), 60,
               "champion v2 with challenger v1 beside it")
    with Traffic(d.url) as traffic:
        wait_until(lambda: shadow_answers(d, v1) > 0, 60, "the challenger's shadow answers in Ray's metrics")
        before = len(traffic.results)
        decision = promote_challenger(d.name, tracking_uri=d.mlflow, log=lambda line: None)
        assert (decision.version, decision.previous_version) == (v1, v2)
        wait_until(lambda: model_status(d)["version"] == v1, 60, f"the promoted challenger v{v1} to answer")
        n = len(traffic.results)
        wait_until(lambda: len(traffic.results) >= n + 4, 60, "answers after the promotion")
    assert traffic.failures() == []
    assert {v for _, _, v in traffic.results[:before]} == {v2}    # the shadow's answers never reach a client
    wait_until(lambda: model_status(d)["challenger"]["model"] is None, 30,
               "the challenger to go with its alias (the poll after the alias was removed)")
    aliases = MlflowClient(d.mlflow).get_registered_model(d.name).aliases
    assert aliases == {"champion": v1, "previous": v2}


def shadow_answers(d: Deployed, version: str) -> float:
    """ray_edp_model_requests_total of the challenger `version` answering (outcome ok), from Ray's endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "ray_edp_model_requests_total" and s.labels.get("role") == "challenger"
               and s.labels.get("version") == version and s.labels.get("outcome") == "ok")


def test_edp_compare_reads_the_shadowed_challenger_back_from_prometheus(deployed):
    """After the shadow traffic above: `edp compare` shows the challenger beside the champion it shadowed
    (the same weights, so it agrees with the champion's emotions)."""
    from typer.testing import CliRunner

    from cluster.cli import app
    from cluster.compare import compare
    from cluster.prometheus import Prometheus

    d = deployed
    if d.prometheus is None:
        pytest.skip("needs `prometheus` (apt-get install prometheus)")
    v1, v2 = d.versions
    query, expected = Prometheus(d.prometheus).query, {("champion", v2), ("challenger", v1), ("champion", v1)}

    def scraped():
        rows = {(m.role, m.version): m for m in compare(query, d.name, "5m").models}
        return rows if expected <= set(rows) and rows[("challenger", v1)].agreement >= 0 else None

    rows = wait_until(scraped, 60, f"{sorted(expected)} and the challenger's agreement in Prometheus")
    shadow = rows[("challenger", v1)]
    assert shadow.requests > 0 and shadow.error_rate == 0 and shadow.agreement > 0.9
    assert shadow.emotions and shadow.mean_tokens > 0
    out = CliRunner().invoke(app, ["compare", "--name", d.name, "--window", "5m", "--prometheus", d.prometheus],
                             env={"COLUMNS": "200"})
    print(out.output)
    assert out.exit_code == 0 and "champion vs challenger" in out.output and "total variation" in out.output
