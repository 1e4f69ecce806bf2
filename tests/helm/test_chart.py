"""Chart tests: render with Helm's engine, validate against Kubernetes and KubeRay schemas, check behaviour.

One test per behaviour; the value sets live in tests/helm/values/ (invalid ones in values/invalid/,
each with the message it must fail with on its first line).
"""

import base64
import functools
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from chart_render import (
    CHART_DIR,
    HERE,
    INVALID_SETS,
    REPO,
    VALUE_SETS,
    containers,
    load_values,
    of_kind,
    pod_specs,
    render_docs,
)

helm = pytest.importorskip("helm_python", reason="helm-python-sdk (dev extra) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

K8S_VERSION = "1.33.0"
KUBERAY_KINDS = ("RayCluster", "RayJob", "RayService")
MONITORING_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"://[^/:@\s]+:(?!\$\()[^@\s]+@")  # scheme://user:literal-password@


# ---------- schemas ----------

def _strict(node):
    """Forbid unknown fields where the CRD lists its fields (the API server would silently prune them)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def crd_validator(kind: str):
    schema = json.loads((HERE / "schemas" / f"{kind.lower()}-v1.json").read_text())
    return jsonschema.Draft202012Validator(_strict(schema))


# ---------- every value set: schemas ----------

@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_core_kinds_pass_kubernetes_validate_strict(rendered, value_set):
    core = [d for d in rendered[value_set] if d["kind"] not in KUBERAY_KINDS + MONITORING_KINDS]
    assert core, "no core objects rendered"
    for doc in core:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{value_set}: {doc['kind']}/{doc['metadata']['name']} at {path}: {e.message}")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_kuberay_kinds_match_crd_openapi_schemas(rendered, value_set):
    for doc in (d for d in rendered[value_set] if d["kind"] in KUBERAY_KINDS):
        assert doc["apiVersion"] == "ray.io/v1"
        errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{doc['kind']}: " + "; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def test_strict_crd_validation_catches_a_misspelled_field(rendered):
    """Guards the validator itself: an unknown field in a RayCluster must be reported."""
    (cluster,) = of_kind(rendered["default"], "RayCluster")
    broken = json.loads(json.dumps(cluster))
    broken["spec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "0"}
    assert not crd_validator("RayCluster").is_valid(broken)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_monitoring_kinds_have_their_required_fields(rendered, value_set):
    for doc in (d for d in rendered[value_set] if d["kind"] in MONITORING_KINDS):
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # what kube-prometheus-stack selects
        spec = doc["spec"]
        if doc["kind"] == "PrometheusRule":
            for group in spec["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert rule["alert"] and rule["expr"] and rule["labels"]["severity"]
        else:
            endpoints = spec["endpoints" if doc["kind"] == "ServiceMonitor" else "podMetricsEndpoints"]
            assert spec["selector"]["matchLabels"] and [e["port"] for e in endpoints] == ["metrics"]


# ---------- every value set: security and hygiene ----------

@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_container_has_resources_and_runs_as_non_root(rendered, value_set):
    for doc in rendered[value_set]:
        for where, pod, c in containers(doc):
            name = f"{doc['kind']}/{doc['metadata']['name']} {where}/{c['name']}"
            assert c.get("resources", {}).get("limits") and c["resources"].get("requests"), name
            non_root = c.get("securityContext", {}).get("runAsNonRoot", pod.get("securityContext", {}).get(
                "runAsNonRoot"))
            assert non_root is True, f"{name}: runAsNonRoot"
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        if doc["kind"] in KUBERAY_KINDS and doc["spec"].get("enableInTreeAutoscaling", True):
            spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
            assert spec["autoscalerOptions"]["resources"]["limits"], "autoscaler sidecar resources"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_long_running_non_ray_containers_have_probes_and_read_only_root(rendered, value_set):
    # Ray containers are left to KubeRay, which injects its own probes; test hooks run once.
    for doc in (d for d in rendered[value_set] if d["kind"] in ("Deployment", "StatefulSet")):
        for _, _, c in containers(doc):
            assert c.get("readinessProbe") and c.get("livenessProbe"), doc["metadata"]["name"]
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, doc["metadata"]["name"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_secret_appears_as_a_plain_env_value(rendered, value_set):
    docs = rendered[value_set]
    secret_values = {base64.b64decode(v).decode()
                     for s in of_kind(docs, "Secret") for v in s["data"].values()}
    for doc in docs:
        for where, _, c in containers(doc):
            for env in c.get("env", []):
                value = env.get("value", "")
                assert value not in secret_values or not value, f"{c['name']}: {env['name']} leaks a Secret"
                where_ = f"{doc['metadata']['name']} {where}/{c['name']}: {env['name']}"
                assert not (SECRETISH.search(env["name"]) and "value" in env), f"{where_} is a plain value"
                # A URI may embed a password only as a kubelet reference: postgresql://u:$(POSTGRES_PASSWORD)@h
                assert not URI_WITH_PASSWORD.search(value), f"{where_} embeds a literal password"
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert not [v for v in secret_values if v in text], "a generated credential appears outside its Secret"


def test_secret_env_checks_flag_plain_passwords():
    """Guards the hygiene checks themselves."""
    assert SECRETISH.search("POSTGRES_PASSWORD") and SECRETISH.search("AWS_SECRET_ACCESS_KEY")
    assert not SECRETISH.search("MLFLOW_TRACKING_URI")
    assert URI_WITH_PASSWORD.search("postgresql://mlflow:hunter2@db:5432/mlflow")
    assert not URI_WITH_PASSWORD.search("postgresql://mlflow:$(POSTGRES_PASSWORD)@db:5432/mlflow")
    assert not URI_WITH_PASSWORD.search("http://edp-mlflow.ml.svc:5000")


# ---------- behaviour ----------

SERVE_FILE = "responders.yaml"


def _serve_config(apps: list[str]) -> dict:
    """The local Serve config file with only the named applications, in that order."""
    config = yaml.safe_load((REPO / "cluster" / "configs" / "serve" / SERVE_FILE).read_text())
    by_name = {a["name"]: a for a in config["applications"]}
    return {**config, "applications": [by_name[name] for name in apps]}


def test_serve_config_v2_is_the_local_serve_config_with_the_chosen_applications(rendered):
    for value_set, apps in (("default", ["escm", "iamm"]), ("serve-only", ["iamm"])):
        (svc,) = of_kind(rendered[value_set], "RayService")
        assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == _serve_config(apps)


def test_serve_applications_follow_the_values_order_and_each_keeps_its_route(chart):
    (svc,) = of_kind(render_docs(chart, {"serve": {"applications": ["iamm", "escm"]}}), "RayService")
    apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert [(a["name"], a["route_prefix"], a["args"]["model_name"]) for a in apps] == [
        ("iamm", "/iamm", "iamm"), ("escm", "/escm", "escm")]


def test_local_serve_configs_are_the_charts_files():
    local_files = sorted((REPO / "cluster" / "configs" / "serve").glob("*.yaml"))
    assert [p.name for p in local_files] == [SERVE_FILE]  # one file for every responder, no near-copies
    for local in local_files:
        chart_copy = CHART_DIR / "files" / "serve" / local.name
        assert local.read_bytes() == chart_copy.read_bytes(), f"{local} drifted from {chart_copy}"


@pytest.mark.filterwarnings("error::FutureWarning")  # e.g. look_back_period_s not above metrics_interval_s
def test_serve_configs_pass_rays_serve_deploy_schema(rendered):
    schema = pytest.importorskip("ray.serve.schema")
    from ray.serve.config import AutoscalingConfig

    (svc,) = of_kind(rendered["default"], "RayService")
    for text in [p.read_text() for p in sorted((CHART_DIR / "files" / "serve").glob("*.yaml"))] + [
            svc["spec"]["serveConfigV2"]]:
        config = schema.ServeDeploySchema.model_validate(yaml.safe_load(text))
        apps = config.applications
        assert len({a.route_prefix for a in apps}) == len({a.name for a in apps}) == len(apps) == 2
        assert {a.args["model_name"] for a in apps} == {"escm", "iamm"}
        for app in apps:
            assert app.import_path == "services.app:build_app" and app.args["model_alias"] == "champion"
            assert "working_dir" not in (app.runtime_env or {}), "serve deploy rejects a local working_dir"
            autoscaling = AutoscalingConfig(**app.deployments[0].autoscaling_config)
            assert autoscaling.min_replicas <= autoscaling.max_replicas


def test_default_renders_cluster_with_autoscaled_cpu_group_and_shm(rendered):
    (cluster,) = of_kind(rendered["default"], "RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == "2.60.0" and spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    assert (group["groupName"], group["minReplicas"], group["maxReplicas"]) == ("cpu", 0, 4)
    pod = group["template"]["spec"]
    assert {"name": "shared-mem", "emptyDir": {"medium": "Memory", "sizeLimit": "4Gi"}} in pod["volumes"]
    ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    assert ports["metrics"] == 8080 and ports["serve"] == 8000
    head_ports = {p["name"]: p["containerPort"]
                  for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert (head_ports["dashboard"], head_ports["gcs-server"]) == (8265, 6379)
    assert not of_kind(rendered["default"], "RayJob")


def test_gpu_sweep_renders_one_rayjob_per_sweep_on_gpu_workers(rendered):
    docs = rendered["gpu-sweep"]
    assert not of_kind(docs, "RayCluster") and not of_kind(docs, "RayService")
    jobs = {j["metadata"]["name"]: j["spec"] for j in of_kind(docs, "RayJob")}
    assert set(jobs) == {"edp-empathy-platform-escm-ablation", "edp-empathy-platform-iamm-search"}
    job = jobs["edp-empathy-platform-iamm-search"]
    # One simple command (no `cd ... &&`: KubeRay 1.5.1 pastes it unquoted after `ray job submit --`), absolute config.
    assert job["entrypoint"] == \
        "python -m cluster.jobs.sweep --config /home/ray/app/cluster/configs/sweeps/iamm-hparams.yaml" \
        " '--set' 'num_samples=16' '--set' 'seeds=[0,1]'"
    lifecycle = (job["shutdownAfterJobFinishes"], job["ttlSecondsAfterFinished"], job["backoffLimit"])
    assert lifecycle == (True, 600, 1)
    (group,) = job["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["groupName"] == "gpu" and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nodeSelector" not in pod  # GPU Feature Discovery's label is opt-in: the GPU limit places the pod
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rayjob_entrypoint_runs_with_the_jobs_own_parser_and_fits_its_cluster(rendered, value_set):
    """The rendered entrypoint, run by a shell from a scratch directory with `--dry-run`, the image's project root
    mapped to the checkout: the job's argparse, the sweep file's loading and validation, and the placement check
    against the node types the RayJob's cluster can have (EDP_NODE_TYPES, as its pods see it)."""
    jobs = of_kind(rendered[value_set], "RayJob")
    for job in jobs:
        entrypoint = job["spec"]["entrypoint"]
        assert not {"&&", ";", "||", "|"} & set(shlex.split(entrypoint)), entrypoint  # one simple command
        (head,) = [c for _, _, c in containers(job) if c["name"] == "ray-head"]
        env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               "PYTHONPATH": str(REPO), "EDP_NODE_TYPES": _env(head)["EDP_NODE_TYPES"]}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(["bash", "-c", entrypoint.replace(" /home/ray/app/", f" {REPO}/", 1) + " --dry-run"],
                              capture_output=True, text=True, env=env, timeout=120, cwd=HERE / "values")
        assert proc.returncode == 0, f"{job['metadata']['name']}: {entrypoint}\n{proc.stderr[-3000:]}"
        assert "trial(s)" in proc.stdout and "fits:" in proc.stdout, proc.stdout
    if value_set == "gpu-sweep":
        assert len(jobs) == 2


def test_a_gpu_sweep_on_a_cpu_only_rayjob_cluster_is_refused_before_it_starts(chart):
    values = load_values("gpu-sweep")
    values["ray"]["workerGroups"] = {"cpu": {"enabled": True}, "gpu": {"enabled": False}}
    job = of_kind(render_docs(chart, values), "RayJob")[0]
    (head,) = [c for _, _, c in containers(job) if c["name"] == "ray-head"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDP_NODE_TYPES": _env(head)["EDP_NODE_TYPES"]}
    env.pop("RAY_ADDRESS", None)
    args = [a.replace("/home/ray/app/", f"{REPO}/", 1) for a in shlex.split(job["spec"]["entrypoint"])[1:]]
    proc = subprocess.run([sys.executable, *args, "--dry-run"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "no node of this cluster has it" in proc.stderr, proc.stderr[-2000:]


def test_documented_sweep_files_exist():
    """Every sweep file named in values.yaml, the README and the test value sets is one the image ships."""
    texts = [(CHART_DIR / "values.yaml").read_text(), (REPO / "README.md").read_text(),
             *(p.read_text() for p in (HERE / "values").glob("*.yaml"))]
    named = {m for t in texts for m in re.findall(r"cluster/configs/sweeps/([A-Za-z0-9_.-]+\.ya?ml)", t)}
    missing = sorted(n for n in named if not (REPO / "cluster" / "configs" / "sweeps" / n).is_file())
    assert named and not missing, missing


# KubeRay release that introduced each field/value the chart can render (KubeRay release notes).
KUBERAY_SINCE = {"authOptions": (1, 5, 1), "submissionMode=SidecarMode": (1, 5, 0),
                 "upgradeStrategy=NewClusterWithIncrementalUpgrade": (1, 5, 0), "upgradeStrategy": (1, 3, 0)}


def _kuberay_features(doc: dict) -> set[str]:
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    found = {"authOptions"} if "authOptions" in cluster else set()
    if spec.get("submissionMode") == "SidecarMode":
        found.add("submissionMode=SidecarMode")
    if "upgradeStrategy" in spec:
        found |= {"upgradeStrategy", f"upgradeStrategy={spec['upgradeStrategy']['type']}"} & set(KUBERAY_SINCE)
    return found


def test_required_kuberay_version_covers_every_field_the_chart_renders(chart):
    required = re.search(r"kuberay-operator>=([\d.]+)", yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
                         ["annotations"]["empathy-platform/requires"]).group(1)
    required = tuple(int(x) for x in required.split("."))
    widest = load_values("gpu-sweep")
    widest.update(rayCluster={"enabled": True}, serve={"enabled": True, "upgradeStrategy": {"type": "NewCluster"}})
    widest["sweeps"]["submissionMode"] = "SidecarMode"
    features = {f for doc in render_docs(chart, widest) if doc["kind"] in KUBERAY_KINDS for f in _kuberay_features(doc)}
    assert {"authOptions", "submissionMode=SidecarMode"} <= features
    assert required >= max(KUBERAY_SINCE[f] for f in features), (required, features)


def test_readme_build_tag_is_the_charts_default_image_tag(chart):
    (tag,) = re.findall(r"docker build -f cluster/docker/Dockerfile -t \S+?:(\S+)", (REPO / "README.md").read_text())
    assert tag == chart.values["image"]["tag"]


def test_rayservice_takes_its_upgrade_strategy_from_values(chart):
    values = {"serve": {"upgradeStrategy": {"type": "None"}}}
    (svc,) = of_kind(render_docs(chart, values), "RayService")
    assert svc["spec"]["upgradeStrategy"] == {"type": "None"}


def test_mlflow_server_flags(rendered):
    (dep,) = of_kind(rendered["external-db-s3"], "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    flags = [a.removeprefix("--") for a in c["args"]]
    args = dict(f.split("=", 1) if "=" in f else (f, True) for f in flags)
    assert args["artifacts-destination"] == "s3://edp-artifacts/mlflow-artifacts" and args["serve-artifacts"]
    assert (args["host"], args["port"], args["workers"]) == ("0.0.0.0", "5000", "4")
    hosts = args["allowed-hosts"].split(",")
    for host in ("127.0.0.1:5000", "localhost:5000",  # `kubectl port-forward`: the explicit list replaces the defaults
                 "edp-empathy-platform-mlflow:5000", "edp-empathy-platform-mlflow.ml.svc:5000",
                 "edp-empathy-platform-mlflow.ml.svc.cluster.local:5000", "mlflow.example.org"):
        assert host in hosts
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    backend_ref = env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]
    assert backend_ref == {"name": "mlflow-db-uri", "key": "uri"}
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert not of_kind(rendered["external-db-s3"], "StatefulSet"), "no in-chart Postgres with an external DB"


def test_in_chart_postgres_backs_mlflow_through_a_generated_secret(rendered):
    docs = rendered["default"]
    (secret,) = of_kind(docs, "Secret")
    (sts,) = of_kind(docs, "StatefulSet")
    assert sts["metadata"]["name"] == "edp-empathy-platform-postgres"
    assert len(base64.b64decode(secret["data"]["password"])) == 32
    (dep,) = of_kind(docs, "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == \
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@edp-empathy-platform-postgres:5432/mlflow"


def test_seaweedfs_replaces_the_external_endpoint_everywhere(rendered):
    docs = rendered["seaweedfs"]
    endpoint = "http://edp-empathy-platform-seaweedfs.ml.svc:8333"
    names = {s["metadata"]["name"] for s in of_kind(docs, "StatefulSet")}
    assert names == {"edp-empathy-platform-postgres", "edp-empathy-platform-seaweedfs"}
    s3_secret = next(s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-s3"))
    users = [c for d in docs for _, _, c in containers(d)
             if any(e["name"] == "AWS_ACCESS_KEY_ID" for e in c.get("env", []))]
    assert len(users) >= 3  # seaweedfs, mlflow, ray head + workers
    for c in users:
        env = {e["name"]: e for e in c["env"]}
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == s3_secret["metadata"]["name"]
        if "AWS_ENDPOINT_URL" in env:
            assert env["AWS_ENDPOINT_URL"]["value"] == endpoint


def test_seaweedfs_mode_creates_its_bucket_with_the_shipped_script(rendered):
    (job,) = of_kind(rendered["seaweedfs"], "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    script = (CHART_DIR / "files" / "scripts" / "create_bucket.py").read_text()
    # the script is tested against SeaweedFS in tests/integration/test_s3.py
    assert c["command"] == ["python", "-c", script, load_values("seaweedfs")["s3"]["bucket"]]
    assert _env(c)["AWS_ENDPOINT_URL"] == "http://edp-empathy-platform-seaweedfs.ml.svc:8333"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray"  # NetworkPolicy
    assert not of_kind(rendered["default"], "Job")


def test_ray_pods_get_tracking_uri_and_checkpoint_location(rendered):
    for value_set, uri in (("default", "http://edp-empathy-platform-mlflow.ml.svc:5000"),
                           ("serve-only", "http://mlflow.mlops.svc:5000")):
        for doc in (d for d in rendered[value_set] if d["kind"] in KUBERAY_KINDS):
            for _, _, c in containers(doc):
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                if c["name"].startswith("ray-"):
                    assert env["MLFLOW_TRACKING_URI"] == uri and env["EDP_HOME"] == "/home/ray/app"
                    assert env["EDP_CHECKPOINT_URI"].startswith("s3://")


def test_network_policies_admit_only_the_ingress_to_serve_and_only_ray_to_mlflow(rendered):
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(rendered["seaweedfs"], "NetworkPolicy")}
    ray = policies["edp-empathy-platform-ray"]
    serve_rules = [r for r in ray["ingress"] if {"protocol": "TCP", "port": 8000} in r.get("ports", [])]
    peers = [peer for r in serve_rules for peer in r["from"]]
    assert all("namespaceSelector" in p for p in peers), "Serve reachable only from selected namespaces"
    pod_names = [p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name") for p in peers]
    assert "ingress-nginx" in pod_names
    ray_only = {"app.kubernetes.io/name": "empathy-platform", "app.kubernetes.io/instance": "edp",
                "app.kubernetes.io/component": "ray"}
    (mlflow_rule,) = policies["edp-empathy-platform-mlflow"]["ingress"]
    assert mlflow_rule["from"] == [{"podSelector": {"matchLabels": ray_only}}]
    s3_from = policies["edp-empathy-platform-seaweedfs"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": ray_only}} in s3_from and len(s3_from) == 2
    pg_from = policies["edp-empathy-platform-postgres"]["ingress"][0]["from"]
    assert pg_from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "mlflow"


def test_every_ray_pod_carries_the_label_the_network_policies_select(rendered):
    for doc in (d for d in rendered["gpu-sweep"] + rendered["default"] if d["kind"] in KUBERAY_KINDS):
        for where, _ in pod_specs(doc):
            labels = _pod_labels(doc, where)
            assert labels.get("app.kubernetes.io/component") == "ray", f"{doc['kind']} {where}"


def _pod_labels(doc: dict, where: str) -> dict:
    spec = doc["spec"]
    if where == "submitter":
        return spec["submitterPodTemplate"]["metadata"]["labels"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    if where == "head":
        return cluster["headGroupSpec"]["template"]["metadata"]["labels"]
    group = next(g for g in cluster["workerGroupSpecs"] if f"worker:{g['groupName']}" == where)
    return group["template"]["metadata"]["labels"]


def test_service_account_has_no_token_and_no_role(rendered):
    docs = rendered["default"]
    (sa,) = of_kind(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]


def test_alerts_and_dashboard_use_the_platform_metric_names(rendered):
    docs = rendered["serve-only"]
    (rule,) = of_kind(docs, "PrometheusRule")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    assert "ray_serve_http_request_latency_ms_bucket" in exprs and "> 800" in exprs
    assert "ray_serve_num_http_error_requests_total" in exprs and "ray_edp_model_version" in exprs
    (cm,) = of_kind(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["empathy-serve.json"])
    panel_exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                   "ray_serve_num_http_error_requests_total",
                   "ray_serve_deployment_processing_latency_ms_bucket",
                   "ray_serve_batch_", "ray_edp_request_latency_ms", "ray_edp_generation_latency_ms",
                   "ray_edp_tokens_generated_total", "ray_edp_batch_size", "ray_edp_model_version",
                   "ray_edp_model_requests_total", "ray_edp_model_latency_ms_bucket", "ray_edp_model_emotions_total",
                   "ray_edp_model_response_tokens", "ray_edp_model_agreement_total",
                   "ray_edp_model_load_failures_total"):
        assert metric in panel_exprs, metric
    for q in ("0.5", "0.95", "0.99"):
        quantile = f"histogram_quantile({q}, sum by (le) (rate(ray_serve_http_request_latency_ms_bucket"
        assert quantile in panel_exprs


def test_monitoring_is_off_by_default(rendered):
    assert not [d for d in rendered["default"] if d["kind"] in MONITORING_KINDS + ("ConfigMap",)]


def test_chart_test_hooks_probe_readiness_and_the_model_check_is_separate(chart, rendered):
    hooks = {p["metadata"]["name"]: p for p in of_kind(rendered["default"], "Pod")}
    assert set(hooks) == {"edp-empathy-platform-test-mlflow", "edp-empathy-platform-test-serve"}
    for pod in hooks.values():
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    serve_url = hooks["edp-empathy-platform-test-serve"]["spec"]["containers"][0]["command"][-1]
    assert serve_url == "http://edp-empathy-platform-serve-serve-svc.ml.svc:8000/-/healthz"  # the Serve proxy
    promoted = of_kind(render_docs(chart, {"serve": {"testPromotedModel": True}}), "Pod")
    models = {p["metadata"]["name"]: p["spec"]["containers"][0]["command"][-1] for p in promoted
              if p["metadata"]["name"] not in hooks}
    serve = "http://edp-empathy-platform-serve-serve-svc.ml.svc:8000"
    assert models == {f"edp-empathy-platform-test-serve-{app}": f"{serve}/{app}/healthz"  # 503 until its model loads
                      for app in ("escm", "iamm")}


def test_chart_test_check_exits_by_http_status(rendered):
    """The hook pod's command, run for real against a local server: 200 passes, 503 (no model yet) fails."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            self.send_response(200 if self.path == "/ok" else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (pod,) = [p for p in of_kind(rendered["default"], "Pod") if p["metadata"]["name"].endswith("-test-serve")]
        command = pod["spec"]["containers"][0]["command"]
        assert command[0] == "python"
        base = f"http://127.0.0.1:{server.server_address[1]}"
        ok = subprocess.run([sys.executable, *command[1:-1], f"{base}/ok"], capture_output=True, timeout=30)
        bad = subprocess.run([sys.executable, *command[1:-1], f"{base}/healthz"], capture_output=True, timeout=30)
    finally:
        server.shutdown()
    assert ok.returncode == 0 and bad.returncode != 0


# ---------- bad values ----------

@pytest.mark.parametrize("value_set", INVALID_SETS)
def test_invalid_values_fail_with_a_clear_message(chart, value_set):
    path = HERE / "values" / "invalid" / f"{value_set}.yaml"
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as caught:
        chart.render(load_values(value_set, invalid=True), name="edp", namespace="ml")
    assert expected in str(caught.value)


# ---------- values.yaml documentation ----------

def _documented_paths(text: str) -> set[tuple[str, ...]]:
    """Key paths in values.yaml whose line sits under a `# --` comment block."""
    documented, stack, comment = set(), [], []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        m = re.match(r"^( *)([A-Za-z0-9_.\"/-]+):", line)
        if not m or line.lstrip().startswith("-"):
            comment = []
            continue
        indent, key = len(m.group(1)), m.group(2).strip('"')
        stack = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
        if any(c.startswith("# --") for c in comment):
            documented.add(tuple(k for _, k in stack))
        comment = []
    return documented


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, prefix + (k,))
    else:
        yield prefix


def test_every_value_is_documented_in_place():
    text = (CHART_DIR / "values.yaml").read_text()
    documented = _documented_paths(text)
    undocumented = [".".join(p) for p in _leaf_paths(yaml.safe_load(text))
                    if not any(p[:i] in documented for i in range(1, len(p) + 1))]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_every_value_is_in_the_schema(chart):
    schema = chart.schema

    def walk(node, sch, path):
        props = sch.get("properties", {})
        for k, v in node.items():
            sub = props.get(k, sch.get("additionalProperties"))
            assert sub is not False, f"{'.'.join(path + (k,))} is not in values.schema.json"
            if isinstance(v, dict) and isinstance(sub, dict) and "properties" in sub:
                walk(v, sub, path + (k,))

    walk(chart.values, schema, ())
    assert set(VALUE_SETS) >= {"default", "gpu-sweep", "serve-only", "external-db-s3", "seaweedfs"}


def test_helm_lint_strict_reports_no_warnings():
    report = helm.lint(CHART_DIR, strict=True, namespace="ml", kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]
