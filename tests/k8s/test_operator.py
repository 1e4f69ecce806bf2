"""The chart against the real kube-apiserver and the real KubeRay v1.5.1 operator (tests/k8s/control_plane.py).

Each test installs the chart with the real `helm` into its own namespace, as the README does (minus monitoring,
which needs the Prometheus Operator's CRDs: `test_monitoring_*` covers that), and reads back what the API server
stored and what the operator generated. There is no kubelet yet: where the operator waits for a ready RayCluster,
`report_running` reports the Ray pods Running and Ready, as a kubelet would (nothing runs in them), and for the
RayService `ServeDashboard` answers the head's Serve REST API on a loopback address.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "empathy-platform"
IMAGE_HOME = "/home/ray/app"  # the image's project root (cluster/docker/Dockerfile: WORKDIR, EDP_HOME)
# The README's `helm install` flags; monitoring is tested on its own (it needs the Prometheus Operator's CRDs).
README_SETS = ("image.repository=registry.example/edp", "s3.bucket=edp-test", "ray.workerGroups.gpu.enabled=true")
SMOKE_JOB = ("sweeps.jobs[0].name=smoke", "sweeps.jobs[0].config=cluster/configs/sweeps/smoke.yaml")


# ---------- helpers ----------

def install(cp, release: str, namespace: str, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    """`helm install` as the README gives it: the namespace, the S3 Secret, then the chart with its flags."""
    if cp.kubectl("get", "namespace", namespace, check=False).returncode:
        cp.kubectl("create", "namespace", namespace)
        cp.kubectl("-n", namespace, "create", "secret", "generic", "empathy-s3-credentials",
                   "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test")
    args = [a for s in README_SETS + sets for a in ("--set", s)]
    return cp.helm("install", release, str(CHART), "-n", namespace, *args, check=check)


def get(cp, namespace: str, *what: str) -> dict:
    return json.loads(cp.kubectl("-n", namespace, "get", *what, "-o", "json").stdout)


def wait_for(what: str, probe, timeout: float = 90):
    """probe() until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def report_running(cp, namespace: str, selector: str) -> int:
    """Stands in for the kubelet this slice lacks: reports each selected pod Running and Ready through the status
    subresource, as a kubelet would after starting its containers. Nothing runs. Returns how many pods."""
    pods = get(cp, namespace, "pods", "-l", selector)["items"]
    for i, pod in enumerate(pods):
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        status = {"phase": "Running", "podIP": f"10.244.0.{10 + i}", "startTime": now,
                  "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                                 for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
                  "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True,
                                         "restartCount": 0, "started": True, "state": {"running": {"startedAt": now}}}
                                        for c in pod["spec"]["containers"]]}
        cp.kubectl("-n", namespace, "patch", "pod", pod["metadata"]["name"], "--subresource=status",
                   "--type=merge", "-p", json.dumps({"status": status}))
    return len(pods)


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a bash script, as bash splits them at ; && || | & and newlines."""
    lexer = shlex.shlex(script.replace("\n", ";"), posix=True, punctuation_chars=";&|")
    commands, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&", ";;"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in commands + [current] if c]


def _runs(command: list[str], *program: str) -> bool:
    """Whether a simple command runs `program` (after shell keywords such as `then`, `!`)."""
    while command and command[0] in ("then", "else", "do", "!", "if", "while"):
        command = command[1:]
    return tuple(command[:len(program)]) == program


def rayjob_cluster_pods_running(cp, namespace: str, rayjob: str) -> str:
    """Waits for the RayCluster the operator creates for `rayjob` and its pods, reports them running; its name."""
    cluster = wait_for(f"the RayCluster of RayJob {rayjob}",
                       lambda: get(cp, namespace, "rayjob", rayjob).get("status", {}).get("rayClusterName"))
    wait_for(f"the head pod of {cluster}", lambda: get(cp, namespace, "pods", "-l",
                                                       f"ray.io/cluster={cluster},ray.io/node-type=head")["items"])
    report_running(cp, namespace, f"ray.io/cluster={cluster}")
    return cluster


# ---------- blocker 1: the RayJob submitter ----------

def test_smoke_rayjob_submitter_hands_the_whole_sweep_command_to_ray_job_submit(control_plane):
    """The chart's smoke RayJob in the default K8sJobMode: KubeRay 1.5.1 pastes the entrypoint unquoted after
    `ray job submit ... --` into the submitter's `bash -ce` script. The Ray job must be the whole sweep command (one
    simple command: a `cd ... &&` would submit only the `cd`), and that command must run the sweep from any
    directory: it is run here with `--dry-run` from a scratch directory, the image's project root mapped to the
    checkout."""
    cp, ns = control_plane, "sweep"
    t0 = time.monotonic()
    install(cp, "edp", ns, "rayCluster.enabled=false", "serve.enabled=false", *SMOKE_JOB)
    (rayjob,) = [j["metadata"]["name"] for j in get(cp, ns, "rayjobs")["items"]]
    assert get(cp, ns, "rayjob", rayjob)["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
    cluster = rayjob_cluster_pods_running(cp, ns, rayjob)
    print(f"helm install -> the RayJob's RayCluster and pods: {time.monotonic() - t0:.1f} s")
    job = wait_for("the submitter Job", lambda: cp.kubectl("-n", ns, "get", "job", rayjob, "-o", "json",
                                                           check=False).stdout)
    print(f"helm install -> submitter Job: {time.monotonic() - t0:.1f} s")
    (container,) = json.loads(job)["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/bash", "-ce", "--"], container["command"]
    (script,) = container["args"]
    (submit,) = [c for c in shell_commands(script) if _runs(c, "ray", "job", "submit")]
    entry = submit[submit.index("--") + 1:]
    assert entry[:4] == ["python", "-m", "cluster.jobs.sweep", "--config"], (
        f"`ray job submit` receives {entry} from the submitter script:\n{script}")
    config = entry[4]
    assert config == f"{IMAGE_HOME}/cluster/configs/sweeps/smoke.yaml", config

    head = get(cp, ns, "raycluster", cluster)["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in head["env"]}
    local = [a.replace(IMAGE_HOME, str(REPO), 1) for a in entry[1:]]
    scratch = Path(cp.dir) / "scratch"
    scratch.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, *local, "--dry-run"], cwd=scratch, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                                            "EDP_HOME": str(REPO), "EDP_NODE_TYPES": env["EDP_NODE_TYPES"]})
    assert proc.returncode == 0 and "trial(s)" in proc.stdout, proc.stderr[-3000:]


# ---------- blocker 2: MLflow's allowed hosts ----------

def test_mlflow_allows_the_port_forward_hosts(control_plane):
    """The README port-forwards MLflow to 127.0.0.1:5000; an explicit --allowed-hosts list replaces MLflow's own
    defaults, so the stored Deployment must list 127.0.0.1 and localhost with the port (else HTTP 403)."""
    cp, ns = control_plane, "mlflow"
    install(cp, "edp", ns, "rayCluster.enabled=false", "serve.enabled=false")
    dep = get(cp, ns, "deployment", "edp-empathy-platform-mlflow")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    (flag,) = [a for a in c["args"] if a.startswith("--allowed-hosts=")]
    hosts = flag.removeprefix("--allowed-hosts=").split(",")
    for host in ("127.0.0.1:5000", "localhost:5000", "127.0.0.1", "localhost",
                 "edp-empathy-platform-mlflow.mlflow.svc:5000"):
        assert host in hosts, hosts


# ---------- blocker 3: the RayService's stable services and its token Secret ----------

class ServeDashboard:
    """Stands in for a Ray head's dashboard, only its Serve REST API, until the process kubelet runs real heads:
    `PUT /api/serve/applications/` keeps the config the operator deploys, `GET` reports its applications RUNNING."""

    def __init__(self, host: str, port: int = 8265):
        self.deployed: list[dict] = []
        dashboard = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self):  # noqa: N802 - http.server's naming
                dashboard.deployed.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self._reply({})

            def do_GET(self):  # noqa: N802
                apps = dashboard.deployed[-1]["applications"] if dashboard.deployed else []
                self._reply({"applications": {a["name"]: {"status": "RUNNING", "message": "", "deployments": {
                    "Responder": {"status": "HEALTHY", "message": ""}}} for a in apps}})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def readme_kubernetes_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("## Kubernetes"):text.index("\n## ", text.index("## Kubernetes") + 1)]


def test_rayservice_stable_services_and_the_readme_token_command(control_plane):
    """The README's install with the RayService (and the GPU group, with no node selector that only GPU Feature
    Discovery would satisfy): the operator names the stable services `<rayservice>-head-svc` and
    `<rayservice>-serve-svc` and points them at its generated cluster once Serve reports the applications RUNNING
    (a stand-in dashboard on loopback answers for the head); the README port-forwards exactly those, and its
    commands read the token from the Secret KubeRay names after the generated cluster."""
    cp, ns = control_plane, "serve"
    dash_ip = "127.88.0.1"  # loopback, its own address so that port 8265 is free
    try:
        dashboard = ServeDashboard(dash_ip)
    except OSError as e:
        pytest.skip(f"cannot listen on {dash_ip}:8265 for the stand-in dashboard: {e}")
    try:
        t0 = time.monotonic()
        install(cp, "edp", ns)
        service = "edp-empathy-platform-serve"
        cluster = wait_for("the RayService's generated RayCluster", lambda: get(cp, ns, "rayservice", service).get(
            "status", {}).get("pendingServiceStatus", {}).get("rayClusterName"))
        assert cluster.startswith(f"{service}-") and cluster != service
        cp.add_host(dash_ip, f"{cluster}-head-svc.{ns}.svc.cluster.local")
        wait_for("the head pod", lambda: get(cp, ns, "pods", "-l", f"ray.io/cluster={cluster},ray.io/node-type=head")
                 ["items"])
        report_running(cp, ns, f"ray.io/cluster={cluster}")
        names = (f"{service}-head-svc", f"{service}-serve-svc")
        wait_for(f"the operator's {names}", lambda: all(
            cp.kubectl("-n", ns, "get", "service", n, check=False).returncode == 0 for n in names), timeout=120)
        print(f"helm install -> the RayService's stable services: {time.monotonic() - t0:.1f} s")
    finally:
        dashboard.close()
    for name in names:
        assert get(cp, ns, "service", name)["spec"]["selector"]["ray.io/cluster"] == cluster
    assert [a["name"] for a in dashboard.deployed[-1]["applications"]] == ["escm", "iamm"]
    groups = {g["groupName"]: g["template"]["spec"] for g in get(cp, ns, "raycluster", cluster)["spec"]
              ["workerGroupSpecs"]}
    assert "nodeSelector" not in groups["gpu"], groups["gpu"]["nodeSelector"]  # GPU Feature Discovery's: opt-in
    active = wait_for("the active cluster in the RayService's status", lambda: get(cp, ns, "rayservice", service).get(
        "status", {}).get("activeServiceStatus", {}).get("rayClusterName"))
    assert active == cluster

    readme = readme_kubernetes_section()
    forwards = set(re.findall(r"port-forward svc/(\S+) 8265:8265", readme))
    assert forwards == {names[0]}, forwards
    assert f"svc/{names[1]} 8000:8000" in readme
    token_lines = [line for line in readme.splitlines() if "RAY_CLUSTER" in line]
    assert len(token_lines) == 2, token_lines
    kubectl = f"kubectl --kubeconfig {cp.kubeconfig}"
    script = "\n".join(line.replace("kubectl", kubectl).replace("-n ml ", f"-n {ns} ") for line in token_lines)
    proc = subprocess.run(["bash", "-ec", script + '\nprintf %s "$RAY_AUTH_TOKEN"'], capture_output=True, text=True,
                          timeout=60)
    secret = get(cp, ns, "secret", cluster)
    assert proc.returncode == 0 and proc.stdout, proc.stderr
    assert proc.stdout == base64.b64decode(secret["data"]["auth_token"]).decode()


# ---------- blocker 4: monitoring needs the Prometheus Operator's CRDs ----------

def test_monitoring_without_the_prometheus_operator_crds_fails_with_the_fix(control_plane):
    """The README's `monitoring.enabled=true` on a cluster without the monitoring.coreos.com/v1 API: the chart's
    capabilities check refuses it, naming the CRDs to install, and nothing is installed."""
    cp, ns = control_plane, "monitoring-bare"
    proc = install(cp, "edp", ns, "monitoring.enabled=true", check=False)
    assert proc.returncode != 0
    assert "monitoring.coreos.com/v1" in proc.stderr and "prometheus-operator-crds" in proc.stderr, proc.stderr
    assert not get(cp, ns, "deployments,statefulsets,rayclusters,rayservices")["items"]


def test_monitors_carry_the_label_kube_prometheus_stack_selects(control_plane):
    """With the monitoring.coreos.com/v1 kinds served (shape-only CRDs standing in for the Prometheus Operator's),
    the README's install stores the ServiceMonitor, PodMonitor and PrometheusRule labelled
    `release: kube-prometheus-stack`, what kube-prometheus-stack's Prometheus selects by default."""
    cp, ns = control_plane, "monitoring"
    shapes = Path(__file__).parent / "crds" / "monitoring-shapes.yaml"
    cp.kubectl("apply", "--server-side", "-f", str(shapes))
    try:
        cp.kubectl("wait", "--for", "condition=established", "--timeout", "60s", "-f", str(shapes))
        install(cp, "edp", ns, "monitoring.enabled=true")
        stored = get(cp, ns, "servicemonitors,podmonitors,prometheusrules")["items"]
        assert sorted(m["kind"] for m in stored) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
        for monitor in stored:
            assert monitor["metadata"]["labels"].get("release") == "kube-prometheus-stack", monitor["metadata"]
    finally:
        cp.helm("uninstall", "edp", "-n", ns, check=False)
        cp.kubectl("delete", "-f", str(shapes), "--wait=true")


# ---------- latent items: KubeRay 1.5.1's limits and CRDs ----------

def test_rayjob_names_fit_kuberays_47_character_limit(control_plane):
    """A long release name and the longest job name the schema allows: the RayJob name the chart builds stays within
    KubeRay's 47 characters, so the operator's own validation admits it and creates its RayCluster."""
    cp, ns = control_plane, "long-names"
    release, job = "empathy-dialogue-platform-staging", "escm-ablation-seeds-0-12"
    install(cp, release, ns, "rayCluster.enabled=false", "serve.enabled=false", f"sweeps.jobs[0].name={job}",
            "sweeps.jobs[0].config=cluster/configs/sweeps/smoke.yaml")
    (name,) = [j["metadata"]["name"] for j in get(cp, ns, "rayjobs")["items"]]
    assert len(name) <= 47 and name.endswith(f"-{job}"), name
    wait_for(f"the operator to accept RayJob {name} ({len(name)} characters) and create its RayCluster",
             lambda: get(cp, ns, "rayjob", name).get("status", {}).get("rayClusterName"), timeout=30)


REFUSED = {
    "ray.authOptions.secretName=my-token": "secretName",                    # KubeRay >= 1.6
    "ray.authOptions.enableK8sTokenAuth=true": "enableK8sTokenAuth",        # KubeRay >= 1.6
    "serve.upgradeStrategy.type=NewClusterWithIncrementalUpgrade": "/serve/upgradeStrategy/type",
    "serve.deploymentUnhealthySecondThreshold=300": "deploymentUnhealthySecondThreshold",  # no-op in 1.5.1
    "serve.serviceUnhealthySecondThreshold=900": "serviceUnhealthySecondThreshold",        # no-op in 1.5.1
}


@pytest.mark.parametrize("setting", sorted(REFUSED))
def test_settings_kuberay_1_5_1_lacks_are_refused_by_the_schema(control_plane, setting):
    proc = install(control_plane, "edp", f"refused-{sorted(REFUSED).index(setting)}", setting, check=False)
    assert proc.returncode != 0 and "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert REFUSED[setting] in proc.stderr, proc.stderr


def _value_sets() -> list[Path]:
    return sorted((REPO / "tests" / "helm" / "values").glob("*.yaml"))


def test_every_rendered_kuberay_object_passes_the_v1_5_1_crds_strictly(control_plane):
    """Every test value set of tests/helm, rendered by the real helm and sent to the API server with the v1.5.1 CRDs
    as a strict server-side dry run: a field v1.5.1 lacks is an error instead of being pruned silently. Guarded by
    a field only KubeRay 1.6 has (schema validation skipped), which the server must refuse."""
    cp, ns = control_plane, "crd-check"
    if cp.kubectl("get", "namespace", ns, check=False).returncode:
        cp.kubectl("create", "namespace", ns)

    def dry_run(values: Path | None, *sets: str, skip_schema: bool = False) -> subprocess.CompletedProcess:
        args = ["template", "edp", str(CHART), "-n", ns, "--kube-version", "v1.33.13",
                "--api-versions", "monitoring.coreos.com/v1"]
        args += ["-f", str(values)] if values else []
        args += [a for s in sets for a in ("--set", s)] + (["--skip-schema-validation"] if skip_schema else [])
        docs = [d for d in yaml.safe_load_all(cp.helm(*args).stdout) if d and d["apiVersion"] == "ray.io/v1"]
        text = yaml.safe_dump_all(docs)
        return cp.kubectl("-n", ns, "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=text,
                          check=False)

    checked = 0
    for values in _value_sets():
        proc = dry_run(values)
        assert proc.returncode == 0, f"{values.name}: {proc.stderr}"
        checked += proc.stdout.count("(server dry run)")
    assert checked >= 5
    guard = dry_run(None, "ray.authOptions.secretName=my-token", skip_schema=True)
    assert guard.returncode != 0 and 'unknown field "spec.authOptions.secretName"' in guard.stderr, guard.stderr
