"""The Serve application on a real local Ray (HTTP on 127.0.0.1) with a real MLflow registry.

One application serves a tiny ESCM registered as `champion`; a second one (auth on, a model that is not
registered yet) covers 401/503 and loading once the alias appears. The hot-swap test moves the alias
while client threads keep sending requests: no request may fail and the served version must change.
"""

from __future__ import annotations

import re
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cluster.local.processes import free_port
from cluster.polling import poll_until
from tests.integration.registry_models import register_champion

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMITS = {"max_turns": 4, "max_turn_chars": 200, "max_body_bytes": 4096}
TEST_OPTIONS = {"ray_actor_options": {"num_cpus": 0.5},
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8,
                                       "upscale_delay_s": 30, "downscale_delay_s": 30}}
GOOD = {"context": ["I finally passed my driving test today!"], "situation": None}


@dataclass
class Served:
    url: str
    name: str
    mlflow: str
    checkpoint: object
    metrics_port: int


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def register(mlflow: str, ckpt, name: str, acc: float, force: bool = False) -> str:
    return register_champion(mlflow, ckpt, name, acc, unique("sweep"), force)


def wait_until(predicate, timeout: float, what, step: float = 0.5):
    """Poll `predicate` until truthy; fail naming `what` (a string, or a callable giving one)."""
    value = poll_until(predicate, timeout, step)
    if value:
        return value
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")


@pytest.fixture(scope="module")
def served(ray_local, mlflow_server, tiny_checkpoint):
    from ray import serve

    from services.app import make_app

    ckpt, _ = tiny_checkpoint
    name = unique("escm")
    assert register(mlflow_server, ckpt, name, 0.3) == "1"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_name": name, "model_alias": "champion", "mlflow_tracking_uri": mlflow_server,
            "poll_interval_s": 1.0, "max_batch_size": 8, "batch_wait_timeout_s": 0.02, **LIMITS}
    serve.run(make_app(args, **TEST_OPTIONS), name="edp-test", route_prefix="/")
    metrics_port = ray_local.nodes()[0]["MetricsExportPort"]
    try:
        yield Served(f"http://127.0.0.1:{port}", name, mlflow_server, ckpt, metrics_port)
    finally:
        serve.shutdown()


def test_respond_schema_health_model_and_openapi(served):
    with httpx.Client(base_url=served.url, timeout=60) as c:
        dialogue = ["I lost my wallet on the bus.", "Oh no!", "It had my ID."]
        r = c.post("/v1/respond", json={"context": dialogue, "situation": "lost wallet"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"response", "emotion", "emotion_top", "evidence", "screened", "screen", "model"}
        assert (body["screened"], body["screen"]) == (False, None)
        assert isinstance(body["response"], str) and body["response"]
        assert body["emotion"] == body["emotion_top"][0]["label"] and 0 <= body["emotion_top"][0]["prob"] <= 1
        assert all({"pair", "weight"} <= set(e) for e in body["evidence"])        # ESCM word pairs
        assert (body["model"]["name"], body["model"]["version"]) == (served.name, "1")
        assert body["model"]["run_id"]
        crisis = c.post("/v1/respond", json={"context": ["I lost my job and I want to end my life."]})
        assert crisis.status_code == 200, crisis.text        # the crisis screen (on by default) answers, no model
        assert (crisis.json()["screened"], crisis.json()["screen"], crisis.json()["model"]) == (True, "crisis", None)
        assert "988" in crisis.json()["response"] and crisis.json()["emotion"] is None

        health = c.get("/healthz")
        assert health.status_code == 200 and health.json()["model"]["version"] == "1"
        model = c.get("/v1/model").json()
        assert (model["name"], model["alias"], model["version"], model["model_type"]) == (
            served.name, "champion", "1", "escm")
        assert model["run_id"] == body["model"]["run_id"] and model["max_batch_size"] == 8
        spec = c.get("/openapi.json").json()
        post = spec["paths"]["/v1/respond"]["post"]
        assert "context" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert {"200", "400", "401", "413", "422", "503"} <= set(post["responses"])
        assert "/healthz" in spec["paths"] and "/v1/model" in spec["paths"]


BAD_REQUESTS = [
    ("not json", b"hello", 400, "invalid JSON"),
    ("truncated json", b'{"context": ["hi"', 400, "invalid JSON"),
    ("not utf-8", b'{"context": ["\xff"]}', 400, "UTF-8"),
    ("json array", b"[]", 422, "JSON object"),
    ("missing context", b"{}", 422, "context: Field required"),
    ("empty context", b'{"context": []}', 422, "context: List should have at least 1 item"),
    ("empty turn", b'{"context": ["hi", ""]}', 422, "context[1]: must not be empty"),
    ("blank turn", b'{"context": ["   "]}', 422, "context[0]: must not be empty"),
    ("number turn", b'{"context": ["hi", 42]}', 422, "context[1]: Input should be a valid string"),
    ("context not a list", b'{"context": "hi"}', 422, "context: Input should be a valid list"),
    ("too many turns", b'{"context": ["a", "b", "c", "d", "e"]}', 422, "too many turns: 5 > max_turns=4"),
    ("turn too long", b'{"context": ["' + b"x" * 201 + b'"]}', 422, "context[0]: too long: 201"),
    ("situation wrong type", b'{"context": ["hi"], "situation": ["x"]}', 422, "situation"),
    ("unknown field", b'{"context": ["hi"], "temperature": 2}', 422, "temperature: unknown field"),
    ("oversized body", b'{"context": ["' + b"x" * 5000 + b'"]}', 413, "max_body_bytes=4096"),
]


@pytest.mark.parametrize("body, status, message", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_the_right_4xx_naming_the_problem(served, body, status, message):
    r = httpx.post(f"{served.url}/v1/respond", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.json()
    if status == 422 and message != "JSON object":
        assert r.json()["detail"] and all({"field", "message"} == set(d) for d in r.json()["detail"])


def test_oversized_streamed_body_without_content_length_and_replica_survives(served):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = httpx.post(f"{served.url}/v1/respond", content=chunks(), timeout=30)  # chunked: no Content-Length
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    assert httpx.post(f"{served.url}/v1/respond", json=GOOD, timeout=60).status_code == 200
    assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200


def test_auth_on_and_no_model_yet_gives_503_until_the_alias_appears(served):
    from ray import serve

    from services.app import make_app

    token, name = uuid.uuid4().hex, unique("iamm")
    env = {"EDP_TEST_SERVE_TOKEN": token}
    args = {"model_name": name, "mlflow_tracking_uri": served.mlflow, "poll_interval_s": 1.0,
            "auth_token_env": "EDP_TEST_SERVE_TOKEN", **LIMITS}
    options = {**TEST_OPTIONS, "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": env}},
               "autoscaling_config": {**TEST_OPTIONS["autoscaling_config"], "max_replicas": 1}}
    serve.run(make_app(args, **options), name="edp-secure", route_prefix="/secure")
    try:
        with httpx.Client(base_url=f"{served.url}/secure", timeout=60) as c:
            ok = {"authorization": f"Bearer {token}"}
            r = c.post("/v1/respond", json=GOOD)
            assert r.status_code == 401 and "missing bearer token" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
            r = c.post("/v1/respond", json=GOOD, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401 and "invalid bearer token" in r.json()["error"]
            assert c.get("/v1/model").status_code == 401
            r = c.post("/v1/respond", json=GOOD, headers=ok)
            assert r.status_code == 503 and "no model loaded" in r.json()["error"]
            assert c.get("/healthz").status_code == 503                       # probes need no token
            assert c.post("/v1/respond", json={"context": []}, headers=ok).status_code == 422

            version = register(served.mlflow, served.checkpoint, name, 0.5)
            wait_until(lambda: c.get("/healthz").status_code == 200, 60, "the new alias to load")
            r = c.post("/v1/respond", json=GOOD, headers=ok)
            assert r.status_code == 200
            assert (r.json()["model"]["name"], r.json()["model"]["version"]) == (name, version)
            assert c.get("/v1/model", headers=ok).json()["version"] == version
        # auth stays off on the other application
        assert httpx.post(f"{served.url}/v1/respond", json=GOOD, timeout=60).status_code == 200
    finally:
        serve.delete("edp-secure")


def test_hot_swap_under_load_fails_no_request(served):
    before = httpx.get(f"{served.url}/v1/model", timeout=10).json()["version"]
    stop, lock = threading.Event(), threading.Lock()
    results: list[tuple[int, int, str]] = []   # (thread, status, version or error text)

    def client(i: int) -> None:
        with httpx.Client(base_url=served.url, timeout=60) as c:
            while not stop.is_set() and len(results) < 3000:
                try:
                    r = c.post("/v1/respond", json={"context": [f"My dog is sick, day {len(results)}."]})
                    out = (i, r.status_code, r.json()["model"]["version"] if r.status_code == 200 else r.text)
                except httpx.HTTPError as e:
                    out = (i, -1, repr(e))
                with lock:
                    results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 8, 60, "traffic before the swap")
        new = register(served.mlflow, served.checkpoint, served.name, 0.6)
        assert new != before
        wait_until(lambda: any(r[2] == new for r in results), 60, f"responses from v{new}")
        n = len(results)
        wait_until(lambda: len(results) >= n + 8, 60, "traffic after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    failures = [r for r in results if r[1] != 200]
    served_versions = [r[2] for r in results]
    print(f"hot swap: {len(results)} requests, {len(failures)} failed, v{before}: "
          f"{served_versions.count(before)}, v{new}: {served_versions.count(new)}")
    assert failures == []
    assert {before, new} <= set(served_versions)
    for i in range(len(threads)):  # per client: once the new version answered, the old one never again
        mine = [v for t, _, v in results if t == i]
        if new in mine:
            assert before not in mine[mine.index(new):]
    assert httpx.get(f"{served.url}/v1/model", timeout=10).json()["version"] == new
    leftovers = list((Path(tempfile.gettempdir()) / "edp-registry").glob(f"{served.name}-v*"))
    assert leftovers == []  # replicas keep loaded versions in memory, not on disk


def _scrape(port: int) -> dict[str, list[tuple[dict, float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_metrics_reach_rays_metrics_endpoint(served):
    """After the traffic above: the app's series and Serve's built-in latency histograms, non-zero."""
    httpx.post(f"{served.url}/v1/respond", content=b"{", timeout=30)  # a 400 and a 422 for the status label
    httpx.post(f"{served.url}/v1/respond", json={"context": []}, timeout=30)
    httpx.post(f"{served.url}/v1/respond", json={"context": ["I keep thinking about suicide."]}, timeout=30)
    burst = [threading.Thread(target=lambda: [httpx.post(f"{served.url}/v1/respond", json=GOOD, timeout=60)
                                              for _ in range(2)]) for _ in range(8)]
    for t in burst:  # concurrent clients: some batches hold more than one request
        t.start()
    for t in burst:
        t.join(timeout=120)
    serving = httpx.get(f"{served.url}/v1/model", timeout=10).json()["version"]
    app_series = ("ray_edp_request_latency_ms_count", "ray_edp_generation_latency_ms_count",
                  "ray_edp_tokens_generated_total", "ray_edp_batch_size_count", "ray_edp_model_version",
                  "ray_edp_crisis_screened_total")

    missing: list[str] = []

    def ready():
        m = _scrape(served.metrics_port)
        missing[:] = [s for s in (*app_series, "ray_serve_http_request_latency_ms_count") if s not in m]
        marked = [(lb["version"], v) for lb, v in m.get("ray_edp_model_version", [])
                  if lb["name"] == served.name]
        if (serving, 1.0) not in marked:
            missing.append(f"ray_edp_model_version{{version={serving!r}}} = 1 (have {marked})")
        return m if not missing else None

    m = wait_until(ready, 45, lambda: f"the app's series on Ray's metrics endpoint (missing: {missing})", 2)
    by_status = {(lb["route"], lb["status"]): v for lb, v in m["ray_edp_request_latency_ms_count"]}
    assert by_status.get(("/v1/respond", "200"), 0) > 0 and by_status.get(("/v1/respond", "422"), 0) > 0
    assert sum(v for _, v in m["ray_edp_generation_latency_ms_count"]) > 0
    assert sum(v for _, v in m["ray_edp_tokens_generated_total"]) > 0
    assert sum(v for lb, v in m["ray_edp_crisis_screened_total"] if lb["name"] == served.name) >= 1
    versions = {lb["version"]: v for lb, v in m["ray_edp_model_version"] if lb["name"] == served.name}
    assert versions[serving] == 1
    assert all(v == 0 for k, v in versions.items() if k != serving)       # swapped out -> 0
    sizes = {lb["le"]: v for lb, v in m["ray_edp_batch_size_bucket"] if lb.get("application") == "edp-test"}
    total = sum(v for lb, v in m["ray_edp_batch_size_count"] if lb.get("application") == "edp-test")
    assert sizes["1.0"] < total, "concurrent clients never shared a batch"
    assert sum(v for _, v in m["ray_serve_http_request_latency_ms_count"]) > 0
    assert any(re.match(r"ray_serve_deployment_processing_latency_ms", k) for k in m)
