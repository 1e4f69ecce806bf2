"""The process kubelet: fake nodes registered with the test cluster's API server whose pods run as local processes.

    ca = cp.dir / "certs" / "apiserver.crt"
    kubelet = Kubelet(Api(cp.server, cp.token, str(ca)), workdir, checkout=REPO, venv=REPO / ".venv",
                      ca=ca.read_bytes()).start()
    ...                                    # the real kube-scheduler binds pods to edp-node-0, ...; they run
    kubelet.stop()                         # kills every pod's processes, removes netns/veths/bridge and the nodes

Nodes `edp-node-<n>` (capacity cpu/memory/pods, Ready, heartbeats in their status and a Lease in kube-node-lease,
InternalIP = the bridge's address, podCIDR 10.244.<n+1>.0/24). For each pod bound to one of them a `PodWorker`
thread: the pod's network namespace (tests/k8s/netns.py), its volumes, /etc/hosts (tests/k8s/hosts.py), the init
containers in order, then the containers (tests/k8s/pod_runtime.py), restartPolicy with back-off, startup,
readiness and liveness probes, and the pod's status written back (phase, podIP, conditions, containerStatuses).
A deleted pod's processes get SIGTERM, then SIGKILL after its grace period; its netns goes and the pod object is
removed (grace 0).
Container output goes to `<workdir>/pods/<namespace>_<pod>/<container>.log` (`kubectl logs` does not work).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.k8s import hosts
from tests.k8s.api import Api, ApiError
from tests.k8s.netns import Bridge, Ipam, PodNetwork
from tests.k8s.pod_runtime import (
    ConfigError,
    Image,
    container_command,
    container_env,
    mounts_for,
    prepare_volumes,
    run_probe,
    start_process,
)

log = logging.getLogger("edp.kubelet")
VERSION = "v1.33.13"
TICK_S = 0.25


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def now_micro() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1000000:06d}Z"


def exit_code(returncode: int) -> int:
    """A process's exit status as a container runtime reports it (128 + signal when killed)."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Node:
    name: str
    index: int
    ipam: Ipam


@dataclass
class Container:
    """One container of a pod and its current process."""
    spec: dict
    init: bool = False
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    done: bool = False          # exited and will not be started again
    started_ok: bool = False    # its startup probe succeeded (or it has none)
    next_start: float = 0.0     # monotonic time of the next (re)start
    started_at: float = 0.0
    probe_at: dict = field(default_factory=dict)     # probe kind -> next monotonic time
    probe_runs: dict = field(default_factory=dict)   # probe kind -> consecutive (successes, failures)

    @property
    def name(self) -> str:
        return self.spec["name"]

    def status(self) -> dict:
        s = {"name": self.name, "image": self.spec.get("image", ""), "imageID": "", "ready": self.ready,
             "restartCount": self.restarts, "started": self.started_ok and "running" in self.state,
             "state": self.state}
        if self.proc is not None:
            s["containerID"] = f"edp-process://{self.proc.pid}"
        if self.last_state:
            s["lastState"] = self.last_state
        return s


class PodWorker(threading.Thread):
    def __init__(self, kubelet: Kubelet, pod: dict, node: Node):
        meta = pod["metadata"]
        super().__init__(name=f"pod {meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet, self.pod, self.node = kubelet, pod, node
        self.gone = False
        self.net: PodNetwork | None = None
        self.dir = kubelet.dir / "pods" / f"{meta['namespace']}_{meta['name']}"
        self.hosts_file = self.dir / "hosts"
        self.volumes = None
        self.inits = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.containers = [Container(c) for c in pod["spec"]["containers"]]
        self.phase, self.message, self.reported = "Pending", "", None
        self.transitions: dict[str, tuple[str, str]] = {}
        self.started = now()

    # ---------- reading the pod ----------

    @property
    def ns(self) -> str:
        return self.pod["metadata"]["namespace"]

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.ns}/pods/{self.pod['metadata']['name']}"

    def deleting(self) -> bool:
        return self.gone or "deletionTimestamp" in self.pod["metadata"] or self.kubelet.stopping.is_set()

    def view(self) -> dict:
        """The pod as the downward API sees it: its latest object with the addresses this kubelet gave it."""
        gateway = self.kubelet.bridge.gateway
        status = dict(self.pod.get("status") or {}, hostIP=gateway, hostIPs=[{"ip": gateway}])
        if self.net is not None:
            status |= {"podIP": self.net.pod_ip, "podIPs": [{"ip": self.net.pod_ip}]}
        return {**self.pod, "status": status}

    def log_path(self, container: str) -> Path:
        return self.dir / f"{container}.log"

    # ---------- lifecycle ----------

    def run(self) -> None:
        try:
            self._run()
            self._report()
        except Exception as e:  # a bug or an API failure: say so in the pod's status, keep the kubelet running
            log.exception("%s failed in the kubelet", self.name)
            self.phase, self.message = "Failed", f"process kubelet error: {e}"
            self._report(force=True)
        finally:
            self._teardown()
        self._finish_deletion()

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ip = self.node.ipam.allocate()
        uid = self.pod["metadata"]["uid"]
        try:
            self.net = PodNetwork.create(f"edp-{uid[:8]}-{uid[-4:]}", ip, self.kubelet.bridge)
        except BaseException:
            self.node.ipam.release(ip)
            raise
        hosts.write_in_place(self.hosts_file, hosts.pod_hosts(self.pod, ip, []))
        self.kubelet.refresh_hosts(self.ns)
        self._report()
        if not self._prepare_volumes():
            return
        for c in self.inits:
            if not self._run_to_completion(c):
                if not self.deleting():
                    self.phase = "Failed"  # an init container failed and will not be restarted
                return
        self._run_containers()

    def _prepare_volumes(self) -> bool:
        """Volumes, retried while a Secret or ConfigMap they need is missing; False when the pod is deleted first."""
        while not self.deleting():
            try:
                root = self.kubelet.dir / "volumes" / self.pod["metadata"]["uid"]  # a new pod: new emptyDirs
                self.volumes = prepare_volumes(self.view(), root, self.kubelet.lookup,
                                               self.kubelet.token, self.kubelet.ca)
                return True
            except ConfigError as e:
                for c in self.inits + self.containers:
                    c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                self._report()
                time.sleep(1)
        return False

    def _run_to_completion(self, c: Container) -> bool:
        """An init container, restarted on failure unless restartPolicy is Never; whether it succeeded."""
        while not self.deleting():
            self._tick(c)
            if c.done:
                return c.state.get("terminated", {}).get("exitCode") == 0
            self._report()
            time.sleep(TICK_S)
        return False

    def _run_containers(self) -> None:
        while not self.deleting():
            for c in self.containers:
                self._tick(c)
                self._probe(c)
            self.phase = self._phase()
            self._report()
            if self.phase in ("Succeeded", "Failed"):
                return
            time.sleep(TICK_S)

    def _tick(self, c: Container) -> None:
        """Start, notice the exit of, or restart (with back-off) one container."""
        if c.proc is not None and c.proc.poll() is not None:
            self._exited(c)
        if c.proc is None and not c.done and time.monotonic() >= c.next_start:
            self._start(c)

    def _start(self, c: Container) -> None:
        try:
            c.env = container_env(self.view(), c.spec, self.kubelet.image, self.kubelet.lookup, self.kubelet.capacity)
            argv = container_command(c.spec, c.env)
            mounts = mounts_for(c.spec, self.kubelet.image, self.volumes, self.hosts_file)
        except ConfigError as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = time.monotonic() + 1
            return
        workdir = c.spec.get("workingDir") or self.kubelet.image.workdir
        scratch = self.kubelet.dir / "roots" / f"{self.pod['metadata']['uid'][:8]}-{c.name}"
        c.proc = start_process(self.net.netns, scratch, mounts, workdir, argv, c.env, self.log_path(c.name))
        c.started_at = time.monotonic()
        c.state = {"running": {"startedAt": now()}}
        c.probe_at, c.probe_runs = {}, {}
        c.started_ok = "startupProbe" not in c.spec
        c.ready = c.started_ok and "readinessProbe" not in c.spec and not c.init

    def _exited(self, c: Container) -> None:
        code = exit_code(c.proc.returncode)
        started = c.state.get("running", {}).get("startedAt", now())
        c.state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                  "startedAt": started, "finishedAt": now(),
                                  "containerID": f"edp-process://{c.proc.pid}"}}
        c.proc, c.ready = None, False
        policy = self.pod["spec"].get("restartPolicy", "Always")
        restart = policy == "Always" and not c.init or policy != "Never" and code != 0
        if not restart or self.deleting():
            c.done = True
            return
        c.last_state, c.restarts = c.state, c.restarts + 1
        delay = min(self.kubelet.backoff_s * 2 ** (c.restarts - 1), 300)
        if time.monotonic() - c.started_at > 600:  # ran 10 minutes: the back-off starts again
            delay = self.kubelet.backoff_s
        c.next_start = time.monotonic() + delay
        c.state = {"waiting": {"reason": "CrashLoopBackOff",
                               "message": f"back-off {delay:.0f}s restarting failed container {c.name}"}}

    def _probe(self, c: Container) -> None:
        """The startup probe until it succeeds (the others wait), then readiness (gates `ready`) and liveness; a
        startup or liveness probe failing failureThreshold times in a row kills the container."""
        if c.proc is None:
            return
        for kind in ("startupProbe",) if not c.started_ok else ("readinessProbe", "livenessProbe"):
            probe = c.spec.get(kind)
            t = time.monotonic()
            if not probe or t < c.probe_at.get(kind, c.started_at + probe.get("initialDelaySeconds", 0)):
                continue
            c.probe_at[kind] = t + probe.get("periodSeconds", 10)
            try:
                ok = run_probe(probe, self.net.pod_ip, c.spec, c.proc.pid, c.env)
            except ConfigError:
                ok = False
            succ, fail = c.probe_runs.get(kind, (0, 0))
            succ, fail = (succ + 1, 0) if ok else (0, fail + 1)
            c.probe_runs[kind] = (succ, fail)
            if kind == "readinessProbe":
                if ok and succ >= probe.get("successThreshold", 1):
                    c.ready = True
                elif fail >= probe.get("failureThreshold", 3):
                    c.ready = False
            elif ok and kind == "startupProbe":
                c.started_ok = True
                c.ready = "readinessProbe" not in c.spec
            elif fail >= probe.get("failureThreshold", 3):
                log.info("%s of %s/%s failed: killing it", kind, self.name, c.name)
                _kill_group(c.proc, signal.SIGKILL)

    def _phase(self) -> str:
        if all(c.done for c in self.containers):
            failed = any(c.state["terminated"]["exitCode"] for c in self.containers)
            return "Failed" if failed else "Succeeded"
        started = any(c.proc is not None or c.restarts or c.done for c in self.containers)
        return "Running" if started else "Pending"

    # ---------- status ----------

    def _status(self) -> dict:
        inits_done = all(c.done and c.state["terminated"]["exitCode"] == 0 for c in self.inits)
        ready = self.phase == "Running" and all(c.ready for c in self.containers)
        conditions = {"PodScheduled": True, "Initialized": inits_done, "ContainersReady": ready, "Ready": ready}
        status = {"phase": self.phase, "hostIP": self.kubelet.bridge.gateway,
                  "hostIPs": [{"ip": self.kubelet.bridge.gateway}],
                  "conditions": [{"type": t, "status": str(v)} for t, v in conditions.items()],
                  "containerStatuses": [c.status() for c in self.containers]}
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        if self.net:
            status |= {"podIP": self.net.pod_ip, "podIPs": [{"ip": self.net.pod_ip}]}
        if self.message:
            status["message"] = self.message
        return status

    def _report(self, force: bool = False) -> None:
        """PATCHes the pod's status when it changed; a condition's lastTransitionTime is when its status last did."""
        status = self._status()
        if status == self.reported and not force:
            return
        self.reported = status
        conditions = []
        for c in status["conditions"]:
            old = self.transitions.get(c["type"])
            if old is None or old[0] != c["status"]:
                self.transitions[c["type"]] = old = (c["status"], now())
            conditions.append({**c, "lastTransitionTime": old[1]})
        body = {**status, "conditions": conditions, "startTime": self.started}
        try:
            self.kubelet.api.patch(self.path + "/status", {"status": body})
        except ApiError as e:
            if e.status != 404:  # deleted meanwhile: nothing to report to
                raise

    # ---------- teardown ----------

    def _teardown(self) -> None:
        """Stops every process (SIGTERM, the grace period, SIGKILL), then removes the netns and the volumes."""
        running = [c.proc for c in self.inits + self.containers if c.proc is not None]
        for proc in running:
            _kill_group(proc, signal.SIGTERM)
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds",
                                         self.pod["spec"].get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + (min(grace, 5) if self.kubelet.stopping.is_set() else grace)
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in running:
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
        if self.volumes is not None:
            self.volumes.unmount()
        if self.net is not None:
            self.net.delete()
            self.node.ipam.release(self.net.pod_ip)

    def _finish_deletion(self) -> None:
        """Waits for the pod's deletion (a finished pod stays until deleted), then removes it with grace 0."""
        while not self.gone and "deletionTimestamp" not in self.pod["metadata"]:
            if self.kubelet.stopping.is_set():
                return
            time.sleep(TICK_S)
        if not self.gone:
            self.kubelet.api.delete(self.path, gracePeriodSeconds="0")
        self.kubelet.forget(self)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Kubelet:
    def __init__(self, api: Api, workdir: Path, checkout: Path, venv: Path, ca: bytes, nodes: int = 1,
                 bridge: str = "edp-br0", cidr: str = "10.244.0.0/16", backoff_s: float = 10.0,
                 capacity: dict | None = None):
        self.api, self.dir, self.ca = api, Path(workdir), ca
        self.image = Image.project(checkout, venv)
        gateway = cidr.split("/")[0].rsplit(".", 1)[0] + ".1"
        self.bridge = Bridge(bridge, f"{gateway}/{cidr.split('/')[1]}")
        self.nodes = {f"edp-node-{i}": Node(f"edp-node-{i}", i, Ipam(cidr, i)) for i in range(nodes)}
        self.capacity = capacity or {"cpu": "8", "memory": "32Gi", "pods": "110"}
        self.backoff_s = backoff_s  # the restart back-off's first delay (the kubelet's is 10 s), doubling to 300
        self.workers: dict[str, PodWorker] = {}
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.registered: list[str] = []
        self.created_bridge = False
        self.lock = threading.Lock()

    # ---------- start / stop ----------

    def start(self) -> Kubelet:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bridge.create()
        self.created_bridge = True
        for node in self.nodes.values():
            self.registered.append(node.name)
            self._register(node)
        for target in (self._watch_pods, self._heartbeats):
            t = threading.Thread(target=target, name=f"kubelet {target.__name__}", daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def stop(self) -> None:
        """Stops every pod (its processes, netns, volumes), the threads, the nodes and their leases, the bridge."""
        self.stopping.set()
        for worker in self.current_workers():
            worker.join(timeout=30)
        for t in self.threads:
            t.join(timeout=40)
        try:
            for name in self.registered:
                self.api.delete(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}")
                self.api.delete(f"/api/v1/nodes/{name}")
        finally:
            if self.created_bridge:
                self.bridge.delete()

    def __enter__(self) -> Kubelet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------- nodes ----------

    def _node_status(self) -> dict:
        t = now()
        conditions = [{"type": kind, "status": "False", "reason": f"KubeletHas{reason}", "lastHeartbeatTime": t,
                       "lastTransitionTime": t} for kind, reason in (("MemoryPressure", "SufficientMemory"),
                                                                     ("DiskPressure", "NoDiskPressure"),
                                                                     ("PIDPressure", "SufficientPID"))]
        conditions.append({"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": t,
                           "lastTransitionTime": t, "message": "process kubelet is posting ready status"})
        return {"capacity": self.capacity, "allocatable": self.capacity, "conditions": conditions}

    def _register(self, node: Node) -> None:
        labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}
        status = self._node_status() | {
            "addresses": [{"type": "InternalIP", "address": self.bridge.gateway},
                          {"type": "Hostname", "address": node.name}],
            "nodeInfo": {"kubeletVersion": VERSION, "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "edp-process://1", "osImage": "process kubelet"}}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name, "labels": labels},
                "spec": {"podCIDR": str(node.ipam.cidr), "podCIDRs": [str(node.ipam.cidr)]}, "status": status}
        self.api.create("/api/v1/nodes", body)
        self.api.patch(f"/api/v1/nodes/{node.name}/status", {"status": status})
        # The API server taints a new node not-ready; the node-lifecycle controller (off here) lifts it once Ready.
        self.api.patch(f"/api/v1/nodes/{node.name}", {"spec": {"taints": None}})
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": node.name, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": node.name, "leaseDurationSeconds": 40, "renewTime": now_micro()}}
        self.api.create("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", lease)

    def _heartbeats(self) -> None:
        """Every second the pods' hosts files; every 10 s the nodes' Ready heartbeat and their Leases."""
        last = 0.0
        while not self.stopping.wait(1):
            try:
                for ns in {w.ns for w in self.current_workers()}:
                    self.refresh_hosts(ns)
                if time.monotonic() - last >= 10:
                    last = time.monotonic()
                    for name in self.nodes:
                        self.api.patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status()})
                        self.api.patch(f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}",
                                       {"spec": {"renewTime": now_micro()}})
            except Exception:  # the API server restarting, a pod going away: try again next round
                log.exception("heartbeat")

    # ---------- pods ----------

    def _watch_pods(self) -> None:
        """list+watch of all pods; those bound to our nodes get a PodWorker, their updates go to it."""
        while not self.stopping.is_set():
            try:
                listed = self.api.get("/api/v1/pods")
                for pod in listed["items"]:
                    self._pod_event("ADDED", pod)
                rv = listed["metadata"]["resourceVersion"]
                while not self.stopping.is_set():
                    for event in self.api.watch("/api/v1/pods", rv, timeout_s=5):
                        if event["type"] == "ERROR":
                            raise ApiError("WATCH", "/api/v1/pods", event["object"].get("code", 0), "expired")
                        rv = event["object"]["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self._pod_event(event["type"], event["object"])
                        if self.stopping.is_set():
                            return
            except Exception:
                if not self.stopping.is_set():
                    log.exception("pod watch; listing again")
                    time.sleep(1)

    def _pod_event(self, kind: str, pod: dict) -> None:
        node = self.nodes.get(pod["spec"].get("nodeName", ""))
        if node is None:
            return
        uid = pod["metadata"]["uid"]
        with self.lock:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.pod = pod if kind != "DELETED" else worker.pod
                worker.gone = kind == "DELETED"
                return
            if kind == "DELETED" or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                return
            worker = self.workers[uid] = PodWorker(self, pod, node)
        worker.start()

    def current_workers(self) -> list[PodWorker]:
        with self.lock:
            return list(self.workers.values())

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.pod["metadata"]["uid"], None)

    def worker(self, namespace: str, name: str) -> PodWorker | None:
        found = [w for w in self.current_workers() if w.ns == namespace and w.pod["metadata"]["name"] == name]
        return found[0] if found else None

    def refresh_hosts(self, namespace: str) -> None:
        """Rewrites the hosts files of the namespace's pods from its Services' ready endpoints."""
        endpoints = self.api.get(f"/api/v1/namespaces/{namespace}/endpoints")["items"]
        lines = hosts.service_lines(namespace, endpoints)
        for w in self.current_workers():
            if w.ns == namespace and w.net is not None:
                hosts.write_in_place(w.hosts_file, hosts.pod_hosts(w.pod, w.net.pod_ip, lines))

    # ---------- what pods need from the API ----------

    def lookup(self, kind: str, namespace: str, name: str) -> dict | None:
        return self.api.find(f"/api/v1/namespaces/{namespace}/{kind}/{name}")

    def token(self, pod: dict, source: dict) -> str:
        """A service-account token bound to the pod, from the TokenRequest API."""
        meta = pod["metadata"]
        spec = {"expirationSeconds": max(600, int(source.get("expirationSeconds", 3600))),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": meta["name"], "uid": meta["uid"]}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        sa = pod["spec"].get("serviceAccountName") or "default"
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        return self.api.create(path, body)["status"]["token"]
