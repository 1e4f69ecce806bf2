"""The process kubelet's container runtime: a container is a process in its pod's network namespace and in a mount
namespace of its own, whose root is the host's (read through an overlay, writes kept in memory) with the image's
paths, the pod's volumes and the pod's /etc/hosts bind-mounted in.

The image is not pulled: every image stands for the project's own (cluster/docker/Dockerfile) and is `Image`:
the checkout at /home/ray/app (the working directory), the project's `.venv` at /home/ray/anaconda3 (so
`/home/ray/anaconda3/bin` is first on PATH and `python`, `ray`, `mlflow` are the venv's), and the Dockerfile's
environment, plus PYTHONPATH=/home/ray/app (the venv installs the project editable from its own checkout, the image
non-editable from the one it was built from). Containers run as root whatever their securityContext says.
"""

from __future__ import annotations

import base64
import math
import os
import re
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
IMAGE_HOME = "/home/ray/app"
IMAGE_PYTHON = "/home/ray/anaconda3"

Lookup = Callable[[str, str, str], "dict | None"]  # (kind "secrets" | "configmaps", namespace, name) -> object


class ConfigError(RuntimeError):
    """The pod cannot start yet or at all (a missing Secret key, an unsupported volume): its container waits with
    reason CreateContainerConfigError and this message."""


@dataclass(frozen=True)
class Image:
    workdir: str
    env: dict[str, str]
    mounts: dict[str, str]  # path in the image -> host path

    @classmethod
    def project(cls, checkout: Path, venv: Path) -> Image:
        env = {"PATH": f"{IMAGE_PYTHON}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "HOME": "/home/ray", "EDP_HOME": IMAGE_HOME, "PYTHONPATH": IMAGE_HOME,
               "PYTHONDONTWRITEBYTECODE": "1", "PIP_NO_CACHE_DIR": "1"}
        return cls(IMAGE_HOME, env, {IMAGE_HOME: str(checkout), IMAGE_PYTHON: str(venv)})


# ---------- environment ----------

def _quantity(text: str) -> float:
    """A Kubernetes quantity ("500m", "2", "1Gi", "128M") as a number (cores, bytes)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    if not m:
        raise ConfigError(f"bad resource quantity {text!r}")
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "Ti": 2**40}
    if m.group(2) not in units:
        raise ConfigError(f"bad resource quantity {text!r}")
    return float(m.group(1)) * units[m.group(2)]


def field_value(pod: dict, path: str) -> str:
    """A downward-API fieldRef (metadata.name, metadata.labels['x'], spec.nodeName, status.podIP, ...)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    values = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
              "status.hostIP": status.get("hostIP", ""), "status.podIP": status.get("podIP", ""),
              "status.hostIPs": ",".join(a["ip"] for a in status.get("hostIPs", [])),
              "status.podIPs": ",".join(a["ip"] for a in status.get("podIPs", []))}
    if path not in values:
        raise ConfigError(f"unsupported fieldRef.fieldPath {path!r}")
    return values[path]


def resource_value(pod: dict, container: dict, ref: dict, allocatable: dict) -> str:
    """A resourceFieldRef: the container's limit or request, divided by the divisor and rounded up; an unset limit
    is the node's allocatable (as the kubelet does)."""
    name = ref.get("containerName") or container["name"]
    target = next((c for c in pod["spec"]["containers"] if c["name"] == name), None)
    if target is None:
        raise ConfigError(f"resourceFieldRef names unknown container {name!r}")
    kind, _, resource = ref["resource"].partition(".")
    value = (target.get("resources", {}).get(kind) or {}).get(resource)
    if value is None:
        value = allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = _quantity(ref.get("divisor") or "1") or 1  # the API server stores an unset divisor as "0"
    return str(math.ceil(_quantity(value) / divisor))


def _key_of(lookup: Lookup, kind: str, namespace: str, ref: dict) -> str | None:
    obj = lookup(kind, namespace, ref["name"])
    data = _data(obj) if obj else None
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        what = f"{kind[:-1]} {namespace}/{ref['name']}"
        raise ConfigError(f"{what} not found" if data is None else f"key {ref['key']!r} not in {what}")
    return data[ref["key"]].decode()


def _data(obj: dict) -> dict[str, bytes]:
    """A Secret's or ConfigMap's keys as bytes."""
    if obj.get("kind") == "Secret":
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()} | {
            k: v.encode() for k, v in (obj.get("stringData") or {}).items()}
    return {k: v.encode() for k, v in (obj.get("data") or {}).items()} | {
        k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}


def _expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) references to variables defined before, $$ escaping them, as the kubelet expands them."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def container_env(pod: dict, container: dict, image: Image, lookup: Lookup, allocatable: dict) -> dict[str, str]:
    """The container's environment: the image's, HOSTNAME, envFrom, then env (later wins, as in Kubernetes)."""
    ns = pod["metadata"]["namespace"]
    env = dict(image.env, HOSTNAME=pod["spec"].get("hostname") or pod["metadata"]["name"])
    for source in container.get("envFrom") or []:
        kind, ref = ("secrets", source["secretRef"]) if "secretRef" in source else ("configmaps",
                                                                                      source["configMapRef"])
        obj = lookup(kind, ns, ref["name"])
        if obj is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind[:-1]} {ns}/{ref['name']} (envFrom) not found")
        env.update({source.get("prefix", "") + k: v.decode() for k, v in _data(obj).items()})
    for var in container.get("env") or []:
        value = _env_value(pod, container, var, env, lookup, allocatable)
        if value is not None:
            env[var["name"]] = value
    return env


def _env_value(pod, container, var, env, lookup, allocatable) -> str | None:
    if "valueFrom" not in var:
        return _expand(var.get("value", ""), env)
    source, ns = var["valueFrom"], pod["metadata"]["namespace"]
    if "secretKeyRef" in source:
        return _key_of(lookup, "secrets", ns, source["secretKeyRef"])
    if "configMapKeyRef" in source:
        return _key_of(lookup, "configmaps", ns, source["configMapKeyRef"])
    if "fieldRef" in source:
        return field_value(pod, source["fieldRef"]["fieldPath"])
    if "resourceFieldRef" in source:
        return resource_value(pod, container, source["resourceFieldRef"], allocatable)
    raise ConfigError(f"env {var['name']}: unsupported valueFrom {sorted(source)}")


def container_command(container: dict, env: dict[str, str]) -> list[str]:
    """command + args, $(VAR) expanded from the container's env; the image has no entrypoint of its own here, so a
    container needs a command or args."""
    argv = [_expand(a, env) for a in list(container.get("command") or []) + list(container.get("args") or [])]
    if not argv:
        raise ConfigError(f"container {container['name']} has no command or args (the stand-in image has no "
                          f"default command)")
    return argv


# ---------- volumes ----------

@dataclass
class Volumes:
    """The pod's volumes as host directories under `root` (memory-backed emptyDirs are tmpfs mounts to unmount)."""
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)
    tmpfs: list[Path] = field(default_factory=list)

    def unmount(self) -> None:
        for path in self.tmpfs:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.tmpfs.clear()


def _write_items(target: Path, data: dict[str, bytes], items: list[dict] | None, mode: int | None,
                 what: str) -> None:
    chosen = {i["key"]: (i["path"], i.get("mode")) for i in items} if items else {k: (k, None) for k in data}
    for key, (path, item_mode) in chosen.items():
        if key not in data:
            raise ConfigError(f"key {key!r} not in {what}")
        if path.startswith("/") or ".." in Path(path).parts:
            raise ConfigError(f"item path {path!r} of {what} must be relative, without '..'")
        dest = target / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data[key])
        dest.chmod(item_mode if item_mode is not None else (mode if mode is not None else 0o644))


def _object_source(lookup: Lookup, kind: str, ns: str, source: dict, target: Path, mode: int | None) -> None:
    obj = lookup(kind, ns, source.get("name") or source.get("secretName"))
    what = f"{kind[:-1]} {ns}/{source.get('name') or source.get('secretName')}"
    if obj is None:
        if source.get("optional"):
            return
        raise ConfigError(f"{what} not found")
    _write_items(target, _data(obj), source.get("items"), mode, what)


def prepare_volumes(pod: dict, root: Path, lookup: Lookup, token: Callable[[dict, dict], str], ca: bytes,
                    extra_volume: Callable[[dict], Path | None] = lambda v: None) -> Volumes:
    """Each volume of the pod as a directory: emptyDir (tmpfs for medium Memory), Secret, ConfigMap, downwardAPI,
    projected (service-account token from the TokenRequest API via `token(pod, source)`, ConfigMaps, Secrets,
    downwardAPI; `ca` stands in for kube-root-ca.crt when the ConfigMap is absent) and hostPath."""
    ns, vols = pod["metadata"]["namespace"], Volumes(root)
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        target = root / name
        target.mkdir(parents=True, exist_ok=True)
        vols.paths[name] = target
        if "emptyDir" in volume:
            if (volume["emptyDir"] or {}).get("medium") == "Memory" and target not in vols.tmpfs:
                size = (volume["emptyDir"] or {}).get("sizeLimit")
                opts = ["-o", f"size={int(_quantity(size))}"] if size else []
                subprocess.run(["mount", "-t", "tmpfs", *opts, "tmpfs", str(target)], check=True, capture_output=True)
                vols.tmpfs.append(target)
        elif "secret" in volume:
            _object_source(lookup, "secrets", ns, volume["secret"], target, volume["secret"].get("defaultMode"))
        elif "configMap" in volume:
            _object_source(lookup, "configmaps", ns, volume["configMap"], target,
                           volume["configMap"].get("defaultMode"))
        elif "downwardAPI" in volume:
            _downward(pod, volume["downwardAPI"].get("items") or [], target)
        elif "projected" in volume:
            _projected(pod, volume["projected"], target, lookup, token, ca)
        elif "hostPath" in volume:
            vols.paths[name] = Path(volume["hostPath"]["path"])
        else:
            other = extra_volume(volume)
            if other is None:
                kinds = sorted(set(volume) - {"name"})
                raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the process kubelet")
            vols.paths[name] = other
    return vols


def _downward(pod: dict, items: list[dict], target: Path) -> None:
    for item in items:
        if "fieldRef" not in item:
            raise ConfigError(f"downwardAPI item {item.get('path')!r}: only fieldRef is supported")
        dest = target / item["path"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(field_value(pod, item["fieldRef"]["fieldPath"]))


def _projected(pod, projected: dict, target: Path, lookup: Lookup, token, ca: bytes) -> None:
    ns, mode = pod["metadata"]["namespace"], projected.get("defaultMode")
    for source in projected.get("sources") or []:
        if "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            (target / sat["path"]).write_text(token(pod, sat))
        elif "configMap" in source:
            cm = source["configMap"]
            if cm["name"] == "kube-root-ca.crt" and lookup("configmaps", ns, cm["name"]) is None:
                _write_items(target, {"ca.crt": ca}, cm.get("items"), mode, "the API server's CA")
            else:
                _object_source(lookup, "configmaps", ns, cm, target, mode)
        elif "secret" in source:
            _object_source(lookup, "secrets", ns, source["secret"], target, mode)
        elif "downwardAPI" in source:
            _downward(pod, source["downwardAPI"].get("items") or [], target)
        else:
            raise ConfigError(f"projected source {sorted(source)} is not supported")


# ---------- processes ----------

# Runs as `ip netns exec NETNS unshare -m --propagation private /bin/sh -ec SETUP ROOT_DIR ...`: builds the root
# (an overlay of / whose writes go to a tmpfs, /proc /sys /dev bound from the host, a private /dev/shm), mounts
# MOUNTS (pairs of host path, path in the container), then chroots and runs the command in the working directory.
SETUP = r"""
W=$0
mount -t tmpfs tmpfs "$W"
mkdir -p "$W/upper" "$W/work" "$W/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$W/upper,workdir=$W/work" "$W/root"
R=$W/root
for d in proc sys dev; do mount --rbind "/$d" "$R/$d"; done
mount -t tmpfs -o size=256m tmpfs "$R/dev/shm"
while [ "$1" != "--" ]; do
  if [ -d "$1" ]; then mkdir -p "$R$2"; else mkdir -p "$(dirname "$R$2")"; touch "$R$2"; fi
  mount --bind "$1" "$R$2"
  if [ "$3" = ro ]; then mount -o remount,bind,ro "$R$2"; fi
  shift 3
done
shift
exec chroot "$R" /bin/sh -c 'cd "$0" && exec "$@"' "$@"
"""


def mounts_for(container: dict, image: Image, volumes: Volumes, hosts_file: Path) -> list[tuple[str, str, str]]:
    """(host path, container path, rw|ro) for the image's paths, /etc/hosts and the container's volumeMounts."""
    mounts = [(host, path, "rw") for path, host in image.mounts.items()] + [(str(hosts_file), "/etc/hosts", "ro")]
    for vm in container.get("volumeMounts") or []:
        if vm["name"] not in volumes.paths:
            raise ConfigError(f"volumeMount {vm['name']!r} of container {container['name']} names no volume")
        source = volumes.paths[vm["name"]] / vm.get("subPath", "")
        if vm.get("subPath") and not source.exists():
            source.mkdir(parents=True)
        path = os.path.realpath(vm["mountPath"]) if vm["mountPath"].startswith("/var/run/") else vm["mountPath"]
        mounts.append((str(source), path, "ro" if vm.get("readOnly") else "rw"))
    return mounts


def start_process(netns: str, scratch: Path, mounts: list[tuple[str, str, str]], workdir: str, argv: list[str],
                  env: dict[str, str], log: Path) -> subprocess.Popen:
    """The container's process (its own process group) in `netns` and a new mount namespace; output to `log`."""
    scratch.mkdir(parents=True, exist_ok=True)
    flat = [x for m in mounts for x in m]
    cmd = ["ip", "netns", "exec", netns, "unshare", "-m", "--propagation", "private", "/bin/sh", "-ec", SETUP,
           str(scratch), *flat, "--", workdir, *argv]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


# ---------- probes ----------

def _port(value, container: dict) -> int:
    if isinstance(value, int) or str(value).isdigit():
        return int(value)
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ConfigError(f"probe port {value!r} is not a port of container {container['name']}")


def run_probe(probe: dict, pod_ip: str, container: dict, pid: int, env: dict[str, str]) -> bool:
    """One try of an exec, httpGet or tcpSocket probe against the running container; whether it succeeded."""
    timeout = probe.get("timeoutSeconds", 1)
    try:
        if "exec" in probe:
            cmd = ["nsenter", "-t", str(pid), "-m", "-n", "-r", "-w", "--", *probe["exec"]["command"]]
            return subprocess.run(cmd, env=env, capture_output=True, timeout=timeout).returncode == 0
        if "httpGet" in probe:
            get = probe["httpGet"]
            url = f"http://{pod_ip}:{_port(get['port'], container)}{get.get('path', '/')}"
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return 200 <= r.status < 400
        if "tcpSocket" in probe:
            with socket.create_connection((pod_ip, _port(probe["tcpSocket"]["port"], container)), timeout=timeout):
                return True
    except (OSError, subprocess.TimeoutExpired):
        return False
    raise ConfigError(f"probe {sorted(probe)} of container {container['name']}: no exec, httpGet or tcpSocket")
