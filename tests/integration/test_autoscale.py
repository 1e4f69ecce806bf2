"""Serve autoscaling on a real local Ray (HTTP on 127.0.0.1) with a real MLflow registry.

A tiny ESCM is served by its own application (1..2 replicas, target 1 ongoing request per replica, short
delays). Concurrent clients must bring up a second RUNNING replica; when they stop, Serve must go back to
one. Every request must succeed throughout. Prints the measured scale-up and scale-down times.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest

from cluster.local import serve as serve_local
from cluster.local.processes import free_port
from cluster.polling import poll_until
from tests.integration.registry_models import register_champion

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The `metrics_interval_s` field:DeprecationWarning")]

APP, PREFIX, DEPLOYMENT = "edp-autoscale", "/autoscale", "Responder"
OPTIONS = {
    "max_ongoing_requests": 4,
    "ray_actor_options": {"num_cpus": 0.25},       # 2 replicas = 0.5 of the fixture's 2 CPUs
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                           "upscale_delay_s": 1, "downscale_delay_s": 5,
                           # push/average request counts often (defaults 10 s / 30 s): react in seconds
                           "metrics_interval_s": 0.5, "look_back_period_s": 2},
}
CLIENTS, LOAD_DEADLINE_S, DOWNSCALE_DEADLINE_S = 8, 60.0, 60.0


def replica_states() -> dict[str, int]:
    return serve_local.replica_states(APP, DEPLOYMENT)


def wait_for(predicate, timeout: float, what: str, step: float = 0.25) -> float:
    """Poll until `predicate()` is truthy; the seconds it took. Fails naming `what` and the replica states."""
    t0 = time.monotonic()
    if poll_until(predicate, timeout, step):
        return time.monotonic() - t0
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; replicas: {replica_states()}")


@pytest.fixture(scope="module")
def autoscaled(ray_local, mlflow_server, tiny_checkpoint):
    """Base URL of the autoscaled application, serving a freshly registered tiny ESCM as `champion`."""
    from ray import serve

    from services.app import make_app

    ckpt, _ = tiny_checkpoint
    name, exp = f"escm-as-{uuid.uuid4().hex[:8]}", f"sweep-as-{uuid.uuid4().hex[:8]}"
    register_champion(mlflow_server, ckpt, name, 0.3, exp)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model_name": name, "model_alias": "champion", "mlflow_tracking_uri": mlflow_server,
            "poll_interval_s": 30.0, "max_batch_size": 4, "batch_wait_timeout_s": 0.01}
    serve.run(make_app(args, **OPTIONS), name=APP, route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{port}{PREFIX}"
    finally:
        serve.delete(APP)
        serve.shutdown()  # the next module starts Serve with its own HTTP port


def test_scales_up_under_concurrent_load_and_back_down(autoscaled):
    wait_for(lambda: replica_states() == {"RUNNING": 1}, 30, "one RUNNING replica before the load")
    assert httpx.post(f"{autoscaled}/v1/respond", json={"context": ["hello"]}, timeout=60).status_code == 200

    stop, lock = threading.Event(), threading.Lock()
    statuses: list[int | str] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=autoscaled, timeout=60) as c:
            n = 0
            while not stop.is_set():
                try:
                    r = c.post("/v1/respond", json={"context": [f"I miss my old friends, day {i}-{n}."]})
                    out: int | str = r.status_code if r.status_code == 200 else f"{r.status_code}: {r.text}"
                except httpx.HTTPError as e:
                    out = repr(e)
                with lock:
                    statuses.append(out)
                n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    load_start = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_for(lambda: replica_states().get("RUNNING", 0) == 2, LOAD_DEADLINE_S,
                 f"a second RUNNING replica under {CLIENTS} concurrent clients")
        up_s = time.monotonic() - load_start
        n = len(statuses)
        wait_for(lambda: len(statuses) >= n + 2 * CLIENTS, 30, "traffic with two replicas")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    load_s = time.monotonic() - load_start             # the last client has stopped: time the scale-down
    down_s = wait_for(lambda: replica_states() == {"RUNNING": 1}, DOWNSCALE_DEADLINE_S,
                      "the app to scale back to one RUNNING replica after the load")
    failures = [s for s in statuses if s != 200]
    print(f"\nautoscale: {len(statuses)} requests in {load_s:.1f} s from {CLIENTS} clients, "
          f"{len(failures)} failed; 1 -> 2 RUNNING replicas {up_s:.1f} s after the load started; "
          f"2 -> 1 {down_s:.1f} s after it stopped")
    assert not any(t.is_alive() for t in threads)
    assert failures == [], failures[:5]
    assert httpx.post(f"{autoscaled}/v1/respond", json={"context": ["still there?"]},
                      timeout=60).status_code == 200
