"""The test cluster's control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the
KubeRay v1.5.1 CRDs and the real KubeRay operator (envtest's control plane plus the scheduler and the operator; pods
run only where tests/k8s/kubelet.py registers nodes, else they stay Pending).

    with ControlPlane(toolchain.binaries(), tmp_dir) as cp:
        cp.kubectl("get", "pods", "-A")
        cp.helm("install", "edp", "helm/empathy-platform", "-n", "ml")

Everything listens on free 127.0.0.1 ports in `tmp_dir` (data, certificates, kubeconfig, one log per process);
`stop()` ends the processes it started, by PID, last started first.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

NEEDED = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "ray-operator", "helm")
KUBECTL = "kubectl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ControlPlane:
    def __init__(self, binaries: dict[str, Path], crds: Path, workdir: Path):
        self.bin = {name: str(binaries[name]) for name in NEEDED}
        self.crds = crds  # the operator's CRDs at its version (tests.k8s.toolchain copies them from its module)
        self.dir = Path(workdir)
        self.kubeconfig = self.dir / "kubeconfig"
        self.server = self.token = ""  # the API server's URL and the admin token, set by start()
        self.procs: list[tuple[str, subprocess.Popen]] = []

    # ---------- processes ----------

    def _spawn(self, name: str, *args: str, wrap: tuple[str, ...] = ()) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "wb")
        proc = subprocess.Popen([*wrap, self.bin[name], *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def _wait(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                       + self.log_tail(name))
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {self.dir}")

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # ---------- start / stop ----------

    def start(self) -> ControlPlane:
        d = self.dir
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        self._spawn("etcd", "--data-dir", str(d / "etcd"), "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                    "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer_port}")
        subprocess.run(["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"], check=True, capture_output=True)
        subprocess.run(["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
                       check=True, capture_output=True)
        token = self.token = secrets.token_hex(16)
        self.server = f"https://127.0.0.1:{api_port}"
        (d / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        self._spawn("kube-apiserver", "--etcd-servers", f"http://127.0.0.1:{etcd_port}",
                    "--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1",
                    "--secure-port", str(api_port), "--cert-dir", str(d / "certs"),
                    "--service-account-key-file", str(d / "sa.pub"),
                    "--service-account-signing-key-file", str(d / "sa.key"),
                    "--service-account-issuer", "https://kubernetes.default.svc",
                    "--token-auth-file", str(d / "tokens.csv"), "--authorization-mode", "RBAC",
                    "--service-cluster-ip-range", "10.96.0.0/16")
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
            f"clusters: [{{name: test, cluster: {{server: 'https://127.0.0.1:{api_port}', "
            "insecure-skip-tls-verify: true}}]\n"
            f"users: [{{name: admin, user: {{token: {token}}}}}]\n"
            "contexts: [{name: test, context: {cluster: test, user: admin}}]\n")
        self._wait("kube-apiserver", lambda: self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0)
        # Jobs, endpoints, garbage collection, namespaces, service accounts; no node or cloud controllers.
        self._spawn("kube-controller-manager", "--kubeconfig", str(self.kubeconfig), "--bind-address", "127.0.0.1",
                    "--secure-port", "0", "--service-account-private-key-file", str(d / "sa.key"),
                    "--use-service-account-credentials=false", "--leader-elect=false",
                    "--controllers", "*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route")
        # The real scheduler binds pods to the nodes a process kubelet registers (none: pods stay Pending).
        self._spawn("kube-scheduler", "--kubeconfig", str(self.kubeconfig), "--bind-address", "127.0.0.1",
                    "--secure-port", "0", "--leader-elect=false")
        self._wait("the default ServiceAccount",
                   lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0)
        self.kubectl("apply", "--server-side", "-f", str(self.crds))
        # (retried: `kubectl wait` fails at once while a new CRD has no status.conditions yet)
        self._wait("the KubeRay CRDs", lambda: self.kubectl(
            "wait", "--for", "condition=established", "--timeout", "10s", "crd", "rayclusters.ray.io",
            "rayjobs.ray.io", "rayservices.ray.io", check=False).returncode == 0)
        # The operator reaches Ray heads by their cluster DNS names (<head-svc>.<ns>.svc.cluster.local): it runs in
        # its own mount namespace whose /etc/hosts is `self.hosts`, extended by add_host() (the machine's stays as is).
        self.hosts = d / "hosts"
        self.hosts.write_text(Path("/etc/hosts").read_text())
        probe = free_port()
        in_own_hosts = ("unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
                        'mount --bind "$0" /etc/hosts && exec "$@"', str(self.hosts))
        self._spawn("ray-operator", "--kubeconfig", str(self.kubeconfig), "--metrics-addr", f"127.0.0.1:{free_port()}",
                    "--health-probe-bind-address", f"127.0.0.1:{probe}", "--enable-leader-election=false",
                    wrap=in_own_hosts)
        self._wait("the KubeRay operator", lambda: _http_ok(f"http://127.0.0.1:{probe}/readyz"))
        return self

    def add_host(self, ip: str, name: str) -> None:
        """Resolve `name` to `ip` for the operator (written in place: its bind mount follows the file's inode)."""
        with open(self.hosts, "a") as f:
            f.write(f"{ip} {name}\n")

    def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()

    def __enter__(self) -> ControlPlane:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------- clients ----------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return _run([KUBECTL, "--kubeconfig", str(self.kubeconfig), *args], input, check)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        homes = {f"HELM_{k}_HOME": str(self.dir / "helm" / k.lower()) for k in ("CONFIG", "CACHE", "DATA")}
        env = {**os.environ, **homes}
        return _run([self.bin["helm"], "--kubeconfig", str(self.kubeconfig), *args], None, check, env)


def _run(cmd: list[str], input: str | None, check: bool, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120, env=env)
    if check and proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:1] + cmd[3:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
