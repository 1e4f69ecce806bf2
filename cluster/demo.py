"""`edp demo` / `make demo`: the whole loop on one machine, on real services.

1. `edp stack up`: Ray head, MLflow server (sqlite), SeaweedFS S3, Prometheus on 127.0.0.1;
2. prepare the data (the embedded sample, or ED_DATA_DIR / --data);
3. submit the demo sweep with Ray's job API (what `ray job submit` does): ESCM and IAMM, full and
   ablated, plus the Transformer baseline, one MLflow parent run with nested child runs;
4. promote the best child run to `models:/<name>@champion` (refused when worse than the current one);
5. deploy the Serve app (the same Serve config file as the chart's RayService) on the stack's Ray;
6. send real HTTP requests, then read p50/p99 latency back from Prometheus with PromQL;
7. print the runs, the champion and why, example responses, latency, the URLs, and how to stop.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SWEEP = PROJECT_ROOT / "cluster" / "configs" / "sweeps" / "demo.yaml"
SERVE_CONFIG = PROJECT_ROOT / "cluster" / "configs" / "serve" / "escm.yaml"
REGISTERED_NAME = "edp-demo"
LATENCY_METRIC = "ray_serve_http_request_latency_ms"  # Serve's own HTTP latency histogram
EXAMPLES = [
    {"context": ["I finally got the job offer I have been waiting for all year!"]},
    {"context": ["My dog passed away this morning. He was with me for fourteen years."]},
    {"context": ["Someone broke into my car last night and took my laptop."]},
    {"context": ["I have a big exam tomorrow and I don't feel ready at all."],
     "situation": "I am nervous about my final exam."},
    {"context": ["We are going to Japan next month!", "That sounds amazing, have you been before?",
                 "Never, I have wanted to go since I was a kid."]},
    {"context": ["I forgot my best friend's birthday and she was really hurt."]},
]


class DemoError(RuntimeError):
    pass


@dataclass
class DemoResult:
    urls: dict[str, str]
    runs: list[dict] = field(default_factory=list)
    decision: object = None
    responses: list[tuple[dict, dict]] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def run(data: str | None = None, state_dir: Path | None = None, console: Console | None = None,
        requests: int = 60, ports: dict[str, int] | None = None, sweep_set: list[str] | None = None) -> DemoResult:
    from cluster import stack

    console = console or Console()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, start: float) -> None:
        timings[name] = time.perf_counter() - start

    with console.status("starting the local stack (Ray, MLflow, SeaweedFS, Prometheus) ..."):
        start = time.perf_counter()
        state = stack.up(state_dir, ports, log=lambda line: console.print(f"  {line}"))
        lap("stack up", start)
    env = stack.stack_env(stack.Stack.at(state_dir), state["ports"])
    result = DemoResult(stack.urls(state["ports"]), timings=timings)

    source = data or os.environ.get("ED_DATA_DIR") or "sample"
    from cluster.cli import prepare_with_summary
    from trainers.config import load_config
    from trainers.data.prepare import DataConfig

    start = time.perf_counter()
    prepare_with_summary(load_config(DataConfig, source=source, n_process=2))
    lap("prepare data", start)

    start = time.perf_counter()
    result.runs = submit_sweep(source, env, console, sweep_set or [])
    lap("sweep (ray job)", start)

    from cluster.promote import promote

    start = time.perf_counter()
    # the champion is one of the papers' models (the baseline has no emotion head and no evidence to show)
    result.decision = promote("demo", "valid_ppl", "min", where="params.model != 'transformer'",
                              name=REGISTERED_NAME, tracking_uri=env["MLFLOW_TRACKING_URI"],
                              log=lambda line: console.print(f"  [cyan]promote[/] {line}"))
    lap("promote", start)

    start = time.perf_counter()
    with console.status("deploying the Serve app (models:/edp-demo@champion) ..."):
        base = deploy(env, state["ports"])
    lap("serve deploy", start)

    start = time.perf_counter()
    with console.status("first request; waiting until Prometheus has scraped the latency histogram ..."):
        post(base, EXAMPLES[0])  # Prometheus's rate() needs the series to exist before the measured requests
        wait_for_series(env["EDP_PROMETHEUS_URL"])
    result.responses = send_requests(base, requests, console)
    lap("requests", start)

    start = time.perf_counter()
    with console.status("reading latency back from Prometheus (waiting for a scrape) ..."):
        result.latency = latency_from_prometheus(env["EDP_PROMETHEUS_URL"])
    lap("prometheus", start)
    timings["total"] = time.perf_counter() - t0
    return result


def submit_sweep(source: str, env: dict[str, str], console: Console, sweep_set: list[str],
                 timeout: float = 1800) -> list[dict]:
    """`ray job submit --working-dir <project> -- python -m cluster.jobs.sweep --config demo.yaml`, then
    the sweep's child runs (variant, model, metrics) from MLflow."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.sweep import load_sweep
    from cluster.tracking import client as mlflow_client

    data_source = source if source == "sample" or "://" in source else str(Path(source).resolve())
    overrides = [f"base.data.source={data_source}", *sweep_set]
    sweep = load_sweep(SWEEP, overrides)  # a bad --set fails here, before anything is submitted
    entrypoint = (f"python -m cluster.jobs.sweep --config {SWEEP.relative_to(PROJECT_ROOT)}"
                  + "".join(f" --set {o}" for o in overrides))
    jobs = JobSubmissionClient(env["RAY_ADDRESS"])
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(PROJECT_ROOT),
        "env_vars": {k: v for k, v in env.items() if k.startswith(("MLFLOW_", "AWS_", "EDP_"))},
    })
    console.print(f"  submitted ray job [bold]{job_id}[/]: {entrypoint}")
    since_ms = int(time.time() * 1000) - 5000
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    mlflow = mlflow_client(env["MLFLOW_TRACKING_URI"])
    total = len(sweep.grid()) * sweep.num_samples
    deadline = time.monotonic() + timeout
    with Progress(TextColumn("  sweep trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("trials", total=total)
        while True:
            status = jobs.get_job_status(job_id)
            bar.update(task, completed=len(_children(mlflow, since_ms)))
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                break
            if time.monotonic() > deadline:
                jobs.stop_job(job_id)
                raise DemoError(f"the sweep job {job_id} did not finish within {timeout:.0f} s")
            time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise DemoError(f"the sweep job {job_id} {status}:\n{jobs.get_job_logs(job_id)[-3000:]}")
    return [{"variant": r.data.tags.get("variant", r.info.run_name), "run_id": r.info.run_id,
             **{k: r.data.metrics.get(k) for k in ("valid_acc", "valid_ppl", "valid_dist1", "valid_dist2")}}
            for r in _children(mlflow, since_ms)]


def _children(mlflow, since_ms: int) -> list:
    """The finished child runs of the demo sweep started after `since_ms` (this submission's)."""
    exp = mlflow.get_experiment_by_name("demo")
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], f"attributes.start_time >= {since_ms}", max_results=200)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]


def deploy(env: dict[str, str], ports: dict[str, int]) -> str:
    """`serve deploy` of the shared Serve config (the chart's RayService file) to the stack's Ray, through
    the dashboard's REST API, with the demo's model name and this machine's host/port; returns the base URL."""
    import yaml
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = yaml.safe_load(SERVE_CONFIG.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": ports["serve_http"]}
    app = config["applications"][0]
    app["args"].update(model_name=REGISTERED_NAME, model_alias="champion",
                       mlflow_tracking_uri=env["MLFLOW_TRACKING_URI"])
    ServeSubmissionClient(env["RAY_ADDRESS"]).deploy_applications(config)
    base = f"http://127.0.0.1:{ports['serve_http']}{app['route_prefix'].rstrip('/')}"
    _wait_ready(base)
    return base


def _wait_ready(base: str, timeout: float = 180) -> None:
    from cluster.local_services import http_ok

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_ok(f"{base}/healthz", timeout=5):
            return
        time.sleep(1)
    raise DemoError(f"the Serve app at {base} did not become healthy within {timeout:.0f} s")


def post(base: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(f"{base}/v1/respond", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def send_requests(base: str, n: int, console: Console) -> list[tuple[dict, dict]]:
    """`n` requests from 4 concurrent clients (so batching has something to batch); every answer is checked."""
    bodies = [EXAMPLES[i % len(EXAMPLES)] for i in range(n)]
    with console.status(f"sending {n} requests to {base}/v1/respond ..."), cf.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(base, b), bodies))
    failed = [(s, a) for s, a in answers if s != 200]
    if failed:
        raise DemoError(f"{len(failed)} of {n} requests failed, e.g. {failed[0]}")
    return list(zip(bodies[: len(EXAMPLES)], [a for _, a in answers[: len(EXAMPLES)]]))


def wait_for_series(url: str, timeout: float = 90) -> None:
    from cluster.stack_metrics import Prometheus, parse_vector, series_query

    prom, deadline = Prometheus(url), time.monotonic() + timeout
    while not parse_vector(prom.query(series_query(LATENCY_METRIC))) and time.monotonic() < deadline:
        time.sleep(2)
    time.sleep(6)  # one more scrape interval, so the measured requests land after the first sample


def latency_from_prometheus(url: str, timeout: float = 90) -> dict[str, float]:
    """p50/p99 of Serve's HTTP latency for /v1/respond over the last 5 minutes, once Prometheus has it."""
    from cluster.stack_metrics import Prometheus, parse_vector, quantile_query

    prom = Prometheus(url)
    metric = LATENCY_METRIC
    deadline = time.monotonic() + timeout
    while True:
        out = {}
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            values = parse_vector(prom.query(quantile_query(metric, q, "5m")))
            found = [v for route, v in values.items() if "respond" in route and not math.isnan(v)]
            if found:
                out[name] = found[0]
        if len(out) == 2 or time.monotonic() > deadline:
            out["query"] = quantile_query(metric, 0.99, "5m")
            return out
        time.sleep(3)


def report(result: DemoResult, console: Console) -> None:
    runs = Table(title="sweep `demo`: one MLflow parent run, one nested child run per trial")
    for col in ("variant", "valid Acc", "valid PPL", "Dist-1", "Dist-2", "run"):
        runs.add_column(col, justify="right" if col != "variant" else "left")
    fmt = lambda v, scale=1.0: "-" if v is None else f"{v * scale:.2f}"  # noqa: E731
    for r in sorted(result.runs, key=lambda r: r["valid_ppl"] if r["valid_ppl"] is not None else math.inf):
        runs.add_row(r["variant"], fmt(r["valid_acc"], 100), fmt(r["valid_ppl"]), fmt(r["valid_dist1"], 100),
                     fmt(r["valid_dist2"], 100), r["run_id"][:8])
    console.print(runs)
    d = result.decision
    console.print(f"[bold]champion[/]: models:/{REGISTERED_NAME}@champion -> version {d.version} ({d.action})")
    for line in d.lines:
        console.print(f"  {line}")
    examples = Table(title="example responses from POST /v1/respond", show_lines=True)
    for col in ("context", "response", "emotion (top prob)", "evidence"):
        examples.add_column(col, overflow="fold")
    for body, answer in result.responses:
        top = answer["emotion_top"][0] if answer.get("emotion_top") else None
        ev = ", ".join(_evidence_text(e) for e in answer.get("evidence", [])[:3])
        examples.add_row(" / ".join(body["context"]), answer["response"],
                         f"{top['label']} ({top['prob']:.2f})" if top else "-", ev or "-")
    console.print(examples)
    lat = result.latency
    if "p50" in lat:
        console.print(f"[bold]latency[/] (Prometheus, Serve HTTP, /v1/respond): p50 {lat['p50']:.0f} ms, "
                      f"p99 {lat['p99']:.0f} ms  [dim]{lat['query']}[/]")
    else:
        console.print("[yellow]latency: Prometheus has no samples yet; try `edp metrics` in a minute[/]")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items())
    console.print(f"[bold]time[/]: {steps}")
    urls = Table(title="the stack is still running", show_header=False)
    for name, label in (("ray", "Ray dashboard"), ("mlflow", "MLflow UI"), ("serve", "Serve endpoint"),
                        ("prometheus", "Prometheus"), ("s3", "S3 (SeaweedFS)")):
        urls.add_row(label, result.urls[name] + ("/v1/respond" if name == "serve" else ""))
    urls.add_row("stop it", "edp stack down   (or: .venv/bin/edp stack down)")
    console.print(urls)


def _evidence_text(e: dict) -> str:
    if "pair" in e:
        return f"{e['pair'][0]}~{e['pair'][1]}"
    return str(e.get("word", e))
