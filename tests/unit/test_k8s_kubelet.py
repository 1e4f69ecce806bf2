"""The process kubelet's pure parts (tests/k8s): env and downward API, volume files, hosts files, IP allocation.
Offline, no root: what runs pods is in tests/k8s/test_kubelet.py."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from tests.k8s import hosts
from tests.k8s.netns import Ipam
from tests.k8s.pod_runtime import (
    ConfigError,
    Image,
    container_command,
    container_env,
    mounts_for,
    prepare_volumes,
    resource_value,
)

IMAGE = Image.project(Path("/src/checkout"), Path("/src/venv"))
SECRET = {"kind": "Secret", "metadata": {"name": "creds"}, "data": {"pw": base64.b64encode(b"s3cret").decode()}}
CONFIG = {"kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"MODE": "fast", "a.yaml": "x: 1"}}


def lookup(kind: str, namespace: str, name: str) -> dict | None:
    return {("secrets", "creds"): SECRET, ("configmaps", "cfg"): CONFIG}.get((kind, name))


def make_pod(**container) -> dict:
    return {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "web"}},
            "spec": {"nodeName": "edp-node-0", "containers": [{"name": "main", **container}]},
            "status": {"podIP": "10.244.1.2", "hostIP": "10.244.0.1"}}


def test_env_sources_in_kubernetes_order():
    env = [{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "pw"}}},
           {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
           {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
           {"name": "URL", "value": "http://$(IP):80/$(MISSING)/$$(IP)"},
           {"name": "MODE", "value": "explicit wins over envFrom"}]
    pod = make_pod(env=env, envFrom=[{"configMapRef": {"name": "cfg"}}])
    got = container_env(pod, pod["spec"]["containers"][0], IMAGE, lookup, {})
    assert got["PW"] == "s3cret" and got["IP"] == "10.244.1.2" and got["APP"] == "web"
    assert got["URL"] == "http://10.244.1.2:80/$(MISSING)/$(IP)"
    assert got["MODE"] == "explicit wins over envFrom" and got["a.yaml"] == "x: 1"
    assert got["PATH"].startswith("/home/ray/anaconda3/bin:") and got["HOSTNAME"] == "p"


@pytest.mark.parametrize("ref, message", [
    ({"secretKeyRef": {"name": "nope", "key": "pw"}}, "secret ns/nope not found"),
    ({"configMapKeyRef": {"name": "cfg", "key": "nope"}}, "key 'nope' not in configmap ns/cfg"),
    ({"fieldRef": {"fieldPath": "spec.bogus"}}, "unsupported fieldRef.fieldPath 'spec.bogus'"),
])
def test_env_errors_name_what_is_missing(ref, message):
    pod = make_pod(env=[{"name": "X", "valueFrom": ref}])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        container_env(pod, pod["spec"]["containers"][0], IMAGE, lookup, {})


def test_optional_key_refs_leave_the_variable_unset():
    pod = make_pod(env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}}}])
    assert "X" not in container_env(pod, pod["spec"]["containers"][0], IMAGE, lookup, {})


def test_resource_field_refs_round_up_and_fall_back_to_the_node():
    pod = make_pod(resources={"limits": {"cpu": "1500m"}, "requests": {"memory": "1Gi"}})
    c = pod["spec"]["containers"][0]
    assert resource_value(pod, c, {"resource": "limits.cpu"}, {}) == "2"
    assert resource_value(pod, c, {"resource": "requests.memory", "divisor": "1Mi"}, {}) == "1024"
    assert resource_value(pod, c, {"resource": "limits.memory", "divisor": "1Gi"}, {"memory": "32Gi"}) == "32"
    assert resource_value(pod, c, {"resource": "limits.cpu", "divisor": "0"}, {}) == "2"  # stored default


def test_command_then_args_expanded_and_a_container_without_either_is_refused():
    env = {"URI": "sqlite:///x.db"}
    c = {"name": "c", "command": ["mlflow", "server"], "args": ["--backend-store-uri=$(URI)", "$(NOPE)", "$$(URI)"]}
    assert container_command(c, env) == ["mlflow", "server", "--backend-store-uri=sqlite:///x.db", "$(NOPE)", "$(URI)"]
    assert container_command({"name": "c", "args": ["ray", "start"]}, env) == ["ray", "start"]
    with pytest.raises(ConfigError, match="container c has no command or args"):
        container_command({"name": "c"}, env)


def test_volume_files_honour_items_modes_and_the_token(tmp_path):
    pod = make_pod()
    pod["spec"]["volumes"] = [
        {"name": "s", "secret": {"secretName": "creds", "items": [{"key": "pw", "path": "a/b", "mode": 0o400}]}},
        {"name": "c", "configMap": {"name": "cfg"}},
        {"name": "sa", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}]
    asked = []
    vols = prepare_volumes(pod, tmp_path, lookup, lambda p, s: asked.append(s) or "tok.en.sig", b"CA")
    secret_file = tmp_path / "s" / "a" / "b"
    assert secret_file.read_text() == "s3cret" and secret_file.stat().st_mode & 0o777 == 0o400
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["MODE", "a.yaml"]
    assert {p.name: p.read_text() for p in (tmp_path / "sa").iterdir()} == {
        "token": "tok.en.sig", "ca.crt": "CA", "namespace": "ns"}
    assert asked == [{"path": "token", "expirationSeconds": 3607}] and vols.paths["sa"] == tmp_path / "sa"


@pytest.mark.parametrize("volume, message", [
    ({"name": "v", "persistentVolumeClaim": {"claimName": "data"}},
     "volume 'v': type \\['persistentVolumeClaim'\\] is not supported"),
    ({"name": "v", "secret": {"secretName": "creds", "items": [{"key": "pw", "path": "../x"}]}}, "must be relative"),
    ({"name": "v", "configMap": {"name": "absent"}}, "configmap ns/absent not found"),
])
def test_bad_volumes_are_refused_naming_the_volume_or_object(tmp_path, volume, message):
    pod = make_pod()
    pod["spec"]["volumes"] = [volume]
    with pytest.raises(ConfigError, match=message):
        prepare_volumes(pod, tmp_path, lookup, lambda p, s: "", b"")


def test_mounts_map_the_image_paths_hosts_and_volume_mounts(tmp_path):
    pod = make_pod()
    pod["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    vols = prepare_volumes(pod, tmp_path, lookup, lambda p, s: "", b"")
    c = {"name": "main", "volumeMounts": [{"name": "data", "mountPath": "/data", "subPath": "sub", "readOnly": True}]}
    mounts = mounts_for(c, IMAGE, vols, tmp_path / "hosts")
    assert mounts == [("/src/checkout", "/home/ray/app", "rw"), ("/src/venv", "/home/ray/anaconda3", "rw"),
                      (str(tmp_path / "hosts"), "/etc/hosts", "ro"), (str(tmp_path / "data" / "sub"), "/data", "ro")]
    with pytest.raises(ConfigError, match="volumeMount 'nope' of container main names no volume"):
        mounts_for({"name": "main", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, IMAGE, vols, tmp_path)


def test_hosts_lines_list_only_ready_endpoints_under_every_service_name():
    endpoints = [{"metadata": {"name": "web"}, "subsets": [{"addresses": [{"ip": "10.244.1.3"}],
                                                            "notReadyAddresses": [{"ip": "10.244.1.9"}]}]},
                 {"metadata": {"name": "idle"}, "subsets": []}]
    lines = hosts.service_lines("ml", endpoints)
    assert lines == ["10.244.1.3\tweb web.ml web.ml.svc web.ml.svc.cluster.local"]
    text = hosts.pod_hosts(make_pod(), "10.244.1.2", lines)
    assert text.splitlines()[2:] == ["10.244.1.2\tp", lines[0]]


def test_hosts_file_is_rewritten_in_place(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("old\n")
    inode = path.stat().st_ino
    assert hosts.write_in_place(path, "new\n") and path.read_text() == "new\n" and path.stat().st_ino == inode
    assert not hosts.write_in_place(path, "new\n")


def test_pod_addresses_come_from_the_nodes_own_cidr_and_are_reused():
    ipam = Ipam("10.244.0.0/16", 1)
    assert str(ipam.cidr) == "10.244.2.0/24"
    first, second = ipam.allocate(), ipam.allocate()
    assert (first, second) == ("10.244.2.2", "10.244.2.3")
    ipam.release(first)
    assert ipam.allocate() == first
