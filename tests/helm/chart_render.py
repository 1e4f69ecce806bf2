"""Helpers for the chart tests: render with Helm's own engine (helm-python-sdk) and walk the objects."""

from pathlib import Path

import yaml

HERE = Path(__file__).parent
REPO = HERE.parents[1]
CHART_DIR = REPO / "helm" / "empathy-platform"
VALUE_SETS = sorted(p.stem for p in (HERE / "values").glob("*.yaml"))
INVALID_SETS = sorted(p.stem for p in (HERE / "values" / "invalid").glob("*.yaml"))
RELEASE, NAMESPACE = "edp", "ml"


def load_values(name: str, invalid: bool = False) -> dict:
    path = HERE / "values" / ("invalid" if invalid else "") / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) or {}


def render_docs(chart, values: dict) -> list[dict]:
    """All rendered objects (test hooks included), in template order."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(where, pod spec) for every pod template an object carries, KubeRay kinds included."""
    kind, spec = doc["kind"], doc.get("spec", {})
    if kind == "Pod":
        return [("pod", spec)]
    if kind in ("Deployment", "StatefulSet", "Job"):
        return [("template", spec["template"]["spec"])]
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
               "RayService": spec.get("rayClusterConfig")}.get(kind)
    found = []
    if cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]["spec"]))
        for group in cluster.get("workerGroupSpecs", []):
            found.append((f"worker:{group['groupName']}", group["template"]["spec"]))
    if kind == "RayJob" and "submitterPodTemplate" in spec:
        found.append(("submitter", spec["submitterPodTemplate"]["spec"]))
    return found


def containers(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container of an object."""
    return [(where, pod, c) for where, pod in pod_specs(doc)
            for c in pod.get("initContainers", []) + pod.get("containers", [])]
