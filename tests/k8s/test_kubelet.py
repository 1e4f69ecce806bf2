"""The process kubelet (tests/k8s/kubelet.py) under the real control plane: pods created through the API server are
scheduled by the real kube-scheduler onto its nodes and run as processes in their own namespaces."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s.netns import netns_exists

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "helm" / "empathy-platform"


# ---------- helpers ----------

def apply(cp, namespace: str, *objects: dict) -> None:
    if cp.kubectl("get", "namespace", namespace, check=False).returncode:
        cp.kubectl("create", "namespace", namespace)
    cp.kubectl("-n", namespace, "apply", "-f", "-", input=yaml.safe_dump_all(objects))


def pod(name: str, command: list[str], restart: str = "Never", **container) -> dict:
    spec = {"restartPolicy": restart, "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": "registry.example/edp:test", "command": command, **container}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def get_pod(cp, namespace: str, name: str) -> dict:
    proc = cp.kubectl("-n", namespace, "get", "pod", name, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def wait_for(what: str, probe, timeout: float = 120, describe=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{describe()}")


def wait_phase(cp, namespace: str, name: str, *phases: str, timeout: float = 120) -> dict:
    def reached():
        p = get_pod(cp, namespace, name)
        return p if p.get("status", {}).get("phase") in phases else None
    return wait_for(f"pod {namespace}/{name} in phase {phases}", reached, timeout,
                    lambda: json.dumps(get_pod(cp, namespace, name).get("status"), indent=1))


def condition(p: dict, kind: str) -> str:
    return next((c["status"] for c in p.get("status", {}).get("conditions", []) if c["type"] == kind), "")


def container_log(kubelet, namespace: str, name: str, container: str = "main") -> str:
    return (kubelet.dir / "pods" / f"{namespace}_{name}" / f"{container}.log").read_text()


# ---------- tests ----------

def test_nodes_are_registered_ready_with_capacity_and_heartbeats(control_plane, kubelet):
    """Each node: capacity, Ready, its address, no not-ready taint (the scheduler would skip it), and a Lease in
    kube-node-lease renewed by the heartbeats."""
    cp = control_plane
    nodes = {n["metadata"]["name"]: n for n in json.loads(cp.kubectl("get", "nodes", "-o", "json").stdout)["items"]}
    assert sorted(nodes) == ["edp-node-0", "edp-node-1"]
    for node in nodes.values():
        assert node["status"]["capacity"] == {"cpu": "8", "memory": "32Gi", "pods": "110"}
        assert condition(node, "Ready") == "True" and not node["spec"].get("taints")
        assert {"type": "InternalIP", "address": "10.244.0.1"} in node["status"]["addresses"]
    assert nodes["edp-node-1"]["spec"]["podCIDR"] == "10.244.2.0/24"

    def renew_time():
        return json.loads(cp.kubectl("-n", "kube-node-lease", "get", "lease", "edp-node-0", "-o", "json").stdout)[
            "spec"]["renewTime"]
    first = renew_time()
    wait_for("the node Lease to be renewed", lambda: renew_time() != first, timeout=25)


def test_init_containers_run_first_in_order(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-init"
    p = pod("inits", ["sh", "-c", "cat /work/order"], volumeMounts=[{"name": "work", "mountPath": "/work"}])
    p["spec"]["volumes"] = [{"name": "work", "emptyDir": {}}]
    p["spec"]["initContainers"] = [
        {"name": f"init-{i}", "image": "registry.example/edp:test", "command": ["sh", "-c", f"echo {i} >> /work/order"],
         "volumeMounts": [{"name": "work", "mountPath": "/work"}]} for i in (1, 2)]
    apply(cp, ns, p)
    done = wait_phase(cp, ns, "inits", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Succeeded" and condition(done, "Initialized") == "True"
    assert [s["state"]["terminated"]["exitCode"] for s in done["status"]["initContainerStatuses"]] == [0, 0]
    assert container_log(kubelet, ns, "inits").split() == ["1", "2"]


def test_failing_init_container_with_restart_never_fails_the_pod(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-init-fail"
    p = pod("badinit", ["sh", "-c", "echo main ran"])
    p["spec"]["initContainers"] = [{"name": "init", "image": "x", "command": ["sh", "-c", "exit 7"]}]
    apply(cp, ns, p)
    done = wait_phase(cp, ns, "badinit", "Succeeded", "Failed")
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert not (kubelet.dir / "pods" / f"{ns}_badinit" / "main.log").exists()  # the main container never ran

SHOW = """
import json, os, pathlib, sys
sa = pathlib.Path('/var/run/secrets/kubernetes.io/serviceaccount')
print(json.dumps({
    'env': {k: os.environ.get(k) for k in ('PASSWORD', 'MODE', 'POD_IP', 'POD_NAME', 'POD_NS', 'NODE', 'CPU_LIMIT',
                                          'MEM_MI', 'CFG_MODE', 'SEC_pw', 'GREETING')},
    'cwd': os.getcwd(), 'prefix': sys.prefix, 'trainers': __import__('trainers').__file__,
    'sa': sorted(p.name for p in sa.iterdir()), 'sa_ns': (sa / 'namespace').read_text(),
    'token': (sa / 'token').read_text().count('.'),
    'secret_file': pathlib.Path('/etc/creds/nested/pw').read_text(),
    'config_files': sorted(os.listdir('/etc/app')),
    'shm': os.statvfs('/dev/shm').f_blocks * os.statvfs('/dev/shm').f_frsize,
    'ip': open('/etc/hosts').read().split()[-2:],
}))
"""


def test_pod_sees_its_environment_volumes_and_image_paths_and_succeeds(control_plane, kubelet):
    """Env from a Secret, a ConfigMap, envFrom and the downward API; the service-account token, Secret and ConfigMap
    volumes (items honoured) and a memory-backed /dev/shm; the checkout and venv at the image's paths. The
    container exits 0: the pod is Succeeded with the exit code recorded and its podIP its own."""
    cp, ns = control_plane, "kubelet-env"
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"pw": "s3cret"}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
              "data": {"MODE": "fast", "a.yaml": "x: 1", "b.yaml": "y: 2"}}
    env = [{"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}}},
           {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "MODE"}}},
           {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
           {"name": "CPU_LIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
           {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "requests.memory", "divisor": "1Mi"}}},
           {"name": "GREETING", "value": "hello $(POD_NAME)"}]
    p = pod("show", ["python", "-c", SHOW], env=env,
            envFrom=[{"prefix": "CFG_", "configMapRef": {"name": "cfg"}},
                     {"prefix": "SEC_", "secretRef": {"name": "creds"}}],
            resources={"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "1500m"}},
            volumeMounts=[{"name": "creds", "mountPath": "/etc/creds", "readOnly": True},
                          {"name": "cfg", "mountPath": "/etc/app"}, {"name": "shm", "mountPath": "/dev/shm"}])
    p["spec"]["volumes"] = [
        {"name": "creds", "secret": {"secretName": "creds", "items": [{"key": "pw", "path": "nested/pw"}]}},
        {"name": "cfg", "configMap": {"name": "cfg", "items": [{"key": "a.yaml", "path": "a.yaml"}]}},
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Mi"}}]
    apply(cp, ns, secret, config, p)
    done = wait_phase(cp, ns, "show", "Succeeded", "Failed")
    (status,) = done["status"]["containerStatuses"]
    assert done["status"]["phase"] == "Succeeded", (status, container_log(kubelet, ns, "show"))
    assert status["state"]["terminated"]["exitCode"] == 0 and status["restartCount"] == 0
    seen = json.loads(container_log(kubelet, ns, "show").strip().splitlines()[-1])
    pod_ip = done["status"]["podIP"]
    assert pod_ip.startswith("10.244.") and done["status"]["hostIP"] == "10.244.0.1"
    assert done["spec"]["nodeName"] in ("edp-node-0", "edp-node-1")  # bound by the real kube-scheduler
    assert seen["env"] == {"PASSWORD": "s3cret", "MODE": "fast", "POD_IP": pod_ip, "POD_NAME": "show", "POD_NS": ns,
                           "NODE": done["spec"]["nodeName"], "CPU_LIMIT": "2", "MEM_MI": "64", "CFG_MODE": "fast",
                           "SEC_pw": "s3cret", "GREETING": "hello show"}
    assert seen["cwd"] == "/home/ray/app" and seen["prefix"] == "/home/ray/anaconda3"
    assert seen["trainers"] == "/home/ray/app/trainers/__init__.py"
    assert seen["sa"] == ["ca.crt", "namespace", "token"] and seen["sa_ns"] == ns and seen["token"] == 2
    assert seen["secret_file"] == "s3cret" and seen["config_files"] == ["a.yaml"]
    assert seen["shm"] == 32 * 2**20  # the memory-backed emptyDir's sizeLimit
    assert seen["ip"] == [pod_ip, "show"]


def test_failing_container_restarts_on_failure_with_back_off(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-restart"
    apply(cp, ns, pod("crash", ["sh", "-c", "echo try; exit 3"], restart="OnFailure"))

    def restarted():
        statuses = get_pod(cp, ns, "crash").get("status", {}).get("containerStatuses") or [{}]
        return statuses[0] if statuses[0].get("restartCount", 0) >= 2 else None
    status = wait_for("two restarts", restarted, timeout=60)
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert get_pod(cp, ns, "crash")["status"]["phase"] == "Running"  # OnFailure: it keeps trying
    assert container_log(kubelet, ns, "crash").count("try") >= 2


def test_failing_container_with_restart_never_fails_the_pod_with_its_exit_code(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-never"
    apply(cp, ns, pod("fails", ["python", "-c", "import sys; sys.exit(5)"]))
    done = wait_phase(cp, ns, "fails", "Succeeded", "Failed")
    (status,) = done["status"]["containerStatuses"]
    assert done["status"]["phase"] == "Failed" and status["restartCount"] == 0
    assert status["state"]["terminated"]["exitCode"] == 5
    assert status["state"]["terminated"]["reason"] == "Error" and condition(done, "Ready") == "False"


def test_readiness_probe_gates_ready(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-ready"
    script = "import pathlib, time; time.sleep(3); pathlib.Path('/tmp/ready').touch(); time.sleep(600)"
    probe = {"exec": {"command": ["test", "-f", "/tmp/ready"]}, "periodSeconds": 1, "failureThreshold": 1}
    apply(cp, ns, pod("gated", ["python", "-c", script], restart="Always", readinessProbe=probe))
    running = wait_phase(cp, ns, "gated", "Running")
    assert condition(running, "Ready") == "False"
    t0 = time.monotonic()
    wait_for("Ready", lambda: condition(get_pod(cp, ns, "gated"), "Ready") == "True", timeout=60)
    assert time.monotonic() - t0 > 1  # not before the file exists
    assert get_pod(cp, ns, "gated")["status"]["containerStatuses"][0]["ready"] is True


def test_failing_liveness_probe_restarts_the_container(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-live"
    probe = {"tcpSocket": {"port": 9999}, "periodSeconds": 1, "failureThreshold": 2}  # nothing listens there
    apply(cp, ns, pod("unhealthy", ["sleep", "600"], restart="Always", livenessProbe=probe))

    def restarted():
        statuses = get_pod(cp, ns, "unhealthy").get("status", {}).get("containerStatuses") or [{}]
        return statuses[0] if statuses[0].get("restartCount", 0) >= 1 else None
    status = wait_for("a restart after the liveness probe failed", restarted, timeout=60)
    assert status["lastState"]["terminated"]["exitCode"] == 137  # SIGKILL


CLIENT = """
import json, os, socket, time, urllib.request
seen = {}
for name in ('web', 'web.NS', 'web.NS.svc.cluster.local'):
    for _ in range(120):
        try:
            seen[name] = [socket.gethostbyname(name), urllib.request.urlopen(f'http://{name}:8080/hello.txt',
                                                                              timeout=2).read().decode()]
            break
        except OSError:
            time.sleep(0.5)
print(json.dumps(seen))
"""


def test_two_pods_reach_each_other_by_service_name(control_plane, kubelet):
    """A web server pod behind a Service, and a client pod resolving the Service's names (its /etc/hosts, the
    server's ready endpoint) and fetching a file over the pods' own addresses."""
    cp, ns = control_plane, "kubelet-svc"
    serve = ["sh", "-c", "mkdir -p /srv && echo hi from web > /srv/hello.txt && "
                         "exec python -m http.server 8080 --bind 0.0.0.0 --directory /srv"]
    web = pod("web", serve, restart="Always", ports=[{"name": "http", "containerPort": 8080}],
              readinessProbe={"httpGet": {"path": "/hello.txt", "port": "http"}, "periodSeconds": 1})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 8080, "targetPort": 8080}]}}
    apply(cp, ns, web, service, pod("client", ["python", "-c", CLIENT.replace("NS", ns)]))
    client = wait_phase(cp, ns, "client", "Succeeded", "Failed", timeout=180)
    seen = json.loads(container_log(kubelet, ns, "client").strip().splitlines()[-1])
    web_ip = get_pod(cp, ns, "web")["status"]["podIP"]
    assert web_ip != client["status"]["podIP"]
    assert seen == {name: [web_ip, "hi from web\n"] for name in ("web", f"web.{ns}", f"web.{ns}.svc.cluster.local")}


def test_deleting_a_pod_kills_its_processes_and_removes_its_netns(control_plane, kubelet):
    """SIGTERM is ignored by the container, so it takes the grace period (2 s) and then SIGKILL."""
    cp, ns = control_plane, "kubelet-delete"
    apply(cp, ns, pod("sleeper", ["sh", "-c", "trap '' TERM; sleep 600 & wait; sleep 600"], restart="Always"))
    running = wait_phase(cp, ns, "sleeper", "Running")
    pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    worker = kubelet.worker(ns, "sleeper")
    netns = worker.net.netns
    assert netns_exists(netns) and os.path.exists(f"/proc/{pid}")
    t0 = time.monotonic()
    cp.kubectl("-n", ns, "delete", "pod", "sleeper", "--wait=true", "--timeout=60s")
    took = time.monotonic() - t0
    assert took >= 1.5, took  # the grace period was waited for
    assert not os.path.exists(f"/proc/{pid}") and not netns_exists(netns)
    assert not get_pod(cp, ns, "sleeper")


def test_job_runs_to_complete_through_the_job_controller(control_plane, kubelet):
    cp, ns = control_plane, "kubelet-job"
    template = pod("unused", ["python", "-c", "print('job ran')"])
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
           "spec": {"backoffLimit": 0, "template": {"spec": template["spec"]}}}
    apply(cp, ns, job)

    def complete():
        j = json.loads(cp.kubectl("-n", ns, "get", "job", "once", "-o", "json").stdout)
        return j if any(c["type"] in ("Complete", "Failed") and c["status"] == "True"
                        for c in j.get("status", {}).get("conditions", [])) else None
    j = wait_for("the Job to finish", complete)
    assert [c["type"] for c in j["status"]["conditions"] if c["status"] == "True"][-1] == "Complete"
    assert j["status"]["succeeded"] == 1


HOST_CHECK = """
import json, urllib.error, urllib.request
codes = {}
for host in HOSTS:
    request = urllib.request.Request('http://SVC:5000/api/2.0/mlflow/experiments/search?max_results=5',
                                     headers={'Host': host})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            codes[host] = [r.status, [e['name'] for e in json.load(r)['experiments']]]
    except urllib.error.HTTPError as e:
        codes[host] = [e.code, []]
print(json.dumps(codes))
"""


@pytest.mark.slow  # MLflow's server takes 20 s to minutes to start on a busy 2-core machine
def test_the_charts_mlflow_runs_from_the_venv_behind_its_probes_and_allowed_hosts(control_plane, kubelet):
    """The chart's MLflow Deployment, installed with the real helm (a sqlite store through externalDatabase: there is
    no Postgres image here), runs under the kubelet from the venv: the Deployment and ReplicaSet controllers create
    its pod, its startup and readiness probes (httpGet /health) make it Ready, and a pod reaches it by the Service's
    names: a Host header the chart allows is answered, another is refused with 403 (MLflow's own check)."""
    cp, ns, svc = control_plane, "kubelet-mlflow", "edp-empathy-platform-mlflow"
    cp.kubectl("create", "namespace", ns)
    cp.kubectl("-n", ns, "create", "secret", "generic", "empathy-s3-credentials",
               "--from-literal=AWS_ACCESS_KEY_ID=test", "--from-literal=AWS_SECRET_ACCESS_KEY=test")
    cp.kubectl("-n", ns, "create", "secret", "generic", "mlflow-db", "--from-literal=uri=sqlite:////tmp/mlflow.db")
    sets = ("image.repository=registry.example/edp", "s3.bucket=edp-test", "rayCluster.enabled=false",
            "serve.enabled=false", "postgres.enabled=false", "externalDatabase.existingSecret=mlflow-db")
    cp.helm("install", "edp", str(CHART), "-n", ns, *(a for s in sets for a in ("--set", s)))

    def ready_pod():
        pods = json.loads(cp.kubectl("-n", ns, "get", "pods", "-l", "app.kubernetes.io/component=mlflow", "-o",
                                     "json").stdout)["items"]
        return pods[0] if pods and condition(pods[0], "Ready") == "True" else None
    mlflow = wait_for("the MLflow pod Ready", ready_pod, timeout=300, describe=lambda: "\n".join(
        p.read_text()[-2000:] for p in (kubelet.dir / "pods").glob(f"{ns}_*/mlflow.log")))
    assert mlflow["status"]["containerStatuses"][0]["started"] is True
    allowed, refused = f"{svc}.{ns}.svc:5000", "elsewhere.example:5000"
    script = HOST_CHECK.replace("HOSTS", repr([allowed, refused])).replace("SVC", svc)
    apply(cp, ns, pod("client", ["python", "-c", script]))
    wait_phase(cp, ns, "client", "Succeeded", "Failed", timeout=180)
    codes = json.loads(container_log(kubelet, ns, "client").strip().splitlines()[-1])
    assert codes == {allowed: [200, ["Default"]], refused: [403, []]}
