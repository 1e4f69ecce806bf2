"""`edp demo` / `make demo`: the whole loop on one machine, on real services.

1. `edp stack up`: Ray head, MLflow server (sqlite), SeaweedFS S3, Prometheus on 127.0.0.1;
   then the released model (models/escm-ed, trained on the full ED train split) is registered as a version of
   `escm-ed` and served under /released, first, so a real model answers within minutes;
2. prepare the data (the embedded sample, or ED_DATA_DIR / --data);
3. submit the demo sweep with Ray's job API (what `ray job submit` does): ESCM and IAMM, full and
   ablated, plus the Transformer baseline, one MLflow parent run with nested child runs;
4. promote the best child run to `models:/<name>@champion` (refused when worse than the current one);
5. deploy the champion's application (escm or iamm, under /escm or /iamm) from the Serve config file the
   chart's RayService uses, on the stack's Ray, beside the released model's;
6. send real HTTP requests, then read p50/p99 latency back from Prometheus with PromQL;
7. return a `DemoResult` (runs, the champion and why, example responses, latency, timings, URLs), which
   `cluster.console.print_demo` prints with how to stop the stack.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cluster.console import print_prepared, rich_progress
from cluster.local import serve as serve_local
from cluster.local import stack
from cluster.local.processes import http_ok
from cluster.polling import poll_until
from cluster.prometheus import Prometheus, parse_vector, quantile_query, series_query
from cluster.tracking.promotion import Decision, promote
from cluster.tracking.reports import TABLE_METRICS, final_value
from cluster.tracking.runs import client as mlflow_client
from services import registry
from trainers.config import DataConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SWEEP = PROJECT_ROOT / "cluster" / "configs" / "sweeps" / "demo.yaml"
REGISTERED_NAME = "edp-demo"
RELEASED = PROJECT_ROOT / "models" / "escm-ed"  # the released model served beside the sample-trained champion
RELEASED_NAME, RELEASED_APP = "escm-ed", "released"  # its registered name and Serve application (under /released)
# one replica holding a quarter of a CPU: the stack's Ray has 2, and the sweep's trials need them while it idles
RELEASED_DEPLOYMENT = {"num_replicas": 1, "autoscaling_config": None, "ray_actor_options": {"num_cpus": 0.25}}
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
class TrialRun:
    """One child run of the demo sweep, with its final valid metrics (None: not logged), in the order of
    cluster.tracking.reports.TABLE_METRICS."""
    variant: str
    run_id: str
    valid_acc: float | None
    valid_ppl: float | None
    valid_ppl_token: float | None
    valid_dist_1: float | None
    valid_dist_2: float | None
    valid_dist_1_nltk: float | None = None
    valid_dist_2_nltk: float | None = None


@dataclass
class DemoResult:
    urls: dict[str, str]                                                 # stack service -> base URL
    runs: list[TrialRun] = field(default_factory=list)
    decision: Decision | None = None                                     # the promotion of the best run
    responses: list[tuple[dict, dict]] = field(default_factory=list)     # (request body, answer) examples
    released_responses: list[tuple[dict, dict]] = field(default_factory=list)  # the released model's, same bodies
    released_version: str | None = None                                  # models:/escm-ed/<version> that answered
    latency: dict[str, float | str] = field(default_factory=dict)        # p50, p99 (ms) and the PromQL
    timings: dict[str, float] = field(default_factory=dict)              # step -> seconds


def run(data: str | None = None, state_dir: Path | None = None, console: Console | None = None,
        requests: int = 60, ports: dict[str, int] | None = None, sweep_set: list[str] | None = None) -> DemoResult:
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
    apps: dict[str, dict] = {}  # name -> its Serve config (one application): every deploy names them all

    if RELEASED.is_dir():
        start = time.perf_counter()
        with console.status(f"registering {RELEASED.relative_to(PROJECT_ROOT)} as models:/{RELEASED_NAME}@champion "
                            "and serving it under /released ..."):
            result.released_version = register_released(env["MLFLOW_TRACKING_URI"], console)
            apps[RELEASED_APP] = application(RELEASED_APP, released_model_type(), RELEASED_NAME, env, state["ports"],
                                             RELEASED_DEPLOYMENT)
            released_base = result.urls[RELEASED_APP] = deploy(env, state["ports"], apps)[RELEASED_APP]
            result.released_responses = [(body, post(released_base, body)[1]) for body in EXAMPLES]
        lap("released model served", start)
        timings["to a served real model"] = time.perf_counter() - t0
    else:
        console.print(f"[yellow]no released model at {RELEASED}: the demo serves only the sample-trained champion[/]")

    source = data or os.environ.get("ED_DATA_DIR") or "sample"
    from trainers.data.prepare import prepare  # spaCy, numpy: not at `edp` start-up

    start = time.perf_counter()
    bar, update = rich_progress()
    with bar:
        prepared = prepare(load_config(DataConfig, source=source, n_process=2), progress=update)
    print_prepared(prepared)
    lap("prepare data", start)

    start = time.perf_counter()
    result.runs = submit_sweep(source, env, console, sweep_set or [])
    lap("sweep (ray job)", start)

    start = time.perf_counter()
    # the champion is one of the papers' models (the baseline has no emotion head and no evidence to show)
    result.decision = promote("demo", "valid_ppl", "min", where="params.model != 'transformer'",
                              name=REGISTERED_NAME, tracking_uri=env["MLFLOW_TRACKING_URI"],
                              log=lambda line: console.print(f"  [cyan]promote[/] {line}"))
    lap("promote", start)

    start = time.perf_counter()
    app = champion_model(env["MLFLOW_TRACKING_URI"])
    apps[app] = application(app, app, REGISTERED_NAME, env, state["ports"])
    with console.status(f"deploying the Serve application {app} (models:/{REGISTERED_NAME}@champion) ..."):
        base = result.urls["serve"] = deploy(env, state["ports"], apps)[app]
    lap("serve deploy", start)

    start = time.perf_counter()
    with console.status("first request; waiting until Prometheus has scraped the latency histogram ..."):
        post(base, EXAMPLES[0])  # Prometheus's rate() needs the series to exist before the measured requests
        wait_for_series(env["EDP_PROMETHEUS_URL"])
    result.responses = send_requests(base, requests, console)
    lap("requests", start)

    start = time.perf_counter()
    with console.status("reading latency back from Prometheus (waiting for a scrape) ..."):
        result.latency = latency_from_prometheus(env["EDP_PROMETHEUS_URL"], nudge=lambda: post(base, EXAMPLES[0]),
                                                 route=f"/{app}")
    lap("prometheus", start)
    timings["total"] = time.perf_counter() - t0
    return result


def submit_sweep(source: str, env: dict[str, str], console: Console, sweep_set: list[str],
                 timeout: float = 1800) -> list[TrialRun]:
    """`ray job submit --working-dir <project> -- python -m cluster.jobs.sweep --config demo.yaml`, then
    the sweep's child runs (variant, model, metrics) from MLflow."""
    from ray.job_submission import JobStatus, JobSubmissionClient  # Ray: only for this step

    from cluster.distributed.tuning import load_sweep  # torch: not at `edp` start-up

    data_source = source if source == "sample" or "://" in source else str(Path(source).resolve())
    overrides = [f"base.data.source={data_source}", *sweep_set]
    sweep = load_sweep(SWEEP, overrides)  # a bad --set fails here, before anything is submitted
    entrypoint = (f"python -m cluster.jobs.sweep --config {SWEEP.relative_to(PROJECT_ROOT)}"
                  + "".join(f" --set {shlex.quote(o)}" for o in overrides))  # the job server runs it in a shell
    jobs = JobSubmissionClient(env["RAY_API_SERVER_ADDRESS"])
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": str(PROJECT_ROOT),
        "env_vars": {k: v for k, v in env.items() if k.startswith(("MLFLOW_", "AWS_", "EDP_"))},
    })
    console.print(f"  submitted ray job [bold]{job_id}[/]: {entrypoint}")
    since_ms = int(time.time() * 1000) - 5000

    mlflow = mlflow_client(env["MLFLOW_TRACKING_URI"])
    total = len(sweep.grid()) * sweep.num_samples
    with Progress(TextColumn("  sweep trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("trials", total=total)

        def finished() -> JobStatus | None:
            status = jobs.get_job_status(job_id)
            bar.update(task, completed=len(_children(mlflow, since_ms)))
            return status if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED) else None

        status = poll_until(finished, timeout, 2)
    if status is None:
        jobs.stop_job(job_id)
        raise DemoError(f"the sweep job {job_id} did not finish within {timeout:.0f} s")
    if status != JobStatus.SUCCEEDED:
        raise DemoError(f"the sweep job {job_id} {status}:\n{jobs.get_job_logs(job_id)[-3000:]}")
    return [TrialRun(r.data.tags.get("variant", r.info.run_name), r.info.run_id,
                     *(final_value(r.data.metrics, key) for key, _ in TABLE_METRICS.values()))
            for r in _children(mlflow, since_ms)]


def _children(mlflow, since_ms: int) -> list:
    """The finished child runs of the demo sweep started after `since_ms` (this submission's)."""
    exp = mlflow.get_experiment_by_name("demo")
    if exp is None:
        return []
    runs = mlflow.search_runs([exp.experiment_id], f"attributes.start_time >= {since_ms}", max_results=200)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and r.info.status == "FINISHED"]


def champion_model(tracking_uri: str) -> str:
    """The model family (`params.model`: escm or iamm) of the run `models:/edp-demo@champion` was registered from
    (this run's promotion, or an earlier one when this run's candidate was refused)."""
    mlflow = registry.client(tracking_uri)
    champion = registry.lookup(mlflow, REGISTERED_NAME, "champion")
    return mlflow.get_run(champion.run_id).data.params["model"]


def register_released(tracking_uri: str, console: Console) -> str:
    """models:/escm-ed@champion -> the released model: registered once per bundle (a version whose tag
    `bundle_sha256` is the card's is reused), so a rerun on the same stack adds no version."""
    from cluster.tracking.releases import register_release  # MLflow, torch: only for this step
    from trainers.release import read_card

    sha = read_card(RELEASED)["bundle_sha256"]
    mlflow = registry.client(tracking_uri)
    try:
        champion = registry.lookup(mlflow, RELEASED_NAME, "champion")
        if champion.tags.get("bundle_sha256") == sha:
            return str(champion.version)
    except registry.RegistryError:
        pass  # not registered yet
    registered = register_release(RELEASED, RELEASED_NAME, alias="champion", tracking_uri=tracking_uri,
                                  log=lambda line: console.print(f"  [cyan]release[/] {line}"))
    return registered.version


def released_model_type() -> str:
    """The model family of the released bundle (escm or iamm): which application of the Serve config serves it."""
    from trainers.release import released_bundle  # torch: only for this step

    return json.loads((released_bundle(RELEASED) / "config.json").read_text())["model_name"]


def application(name: str, template: str, model_name: str, env: dict[str, str], ports: dict[str, int],
                deployment: dict | None = None) -> dict:
    """The shared Serve config (the chart's RayService file) cut down to its application `template`, renamed
    `name` under /`name`, serving models:/`model_name`@champion from the stack's MLflow (`deployment`: options
    replacing the file's)."""
    config = serve_local.deploy_config(template, {"model_name": model_name, "model_alias": "champion",
                                                  "mlflow_tracking_uri": env["MLFLOW_TRACKING_URI"]},
                                       ports["serve_http"], deployment=deployment)
    (app,) = config["applications"]
    return {**config, "applications": [{**app, "name": name, "route_prefix": f"/{name}"}]}


def deploy(env: dict[str, str], ports: dict[str, int], apps: dict[str, dict]) -> dict[str, str]:
    """`serve deploy` of `apps` (the whole set: Serve removes an application a deploy leaves out and leaves an
    unchanged one running) to the stack's Ray through the dashboard's REST API, the HTTP proxy on this machine's
    port; returns each application's base URL (with its route prefix) once it answers /healthz."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # Ray: only for this step

    configs = list(apps.values())  # each one application of the same file: one envelope, their applications
    config = {**configs[0], "applications": [c["applications"][0] for c in configs]}
    ServeSubmissionClient(env["RAY_DASHBOARD_ADDRESS"]).deploy_applications(config)
    bases = {name: f"http://127.0.0.1:{ports['serve_http']}{c['applications'][0]['route_prefix'].rstrip('/')}"
             for name, c in apps.items()}
    for base in bases.values():
        _wait_ready(base)
    return bases


def _wait_ready(base: str, timeout: float = 180) -> None:
    if not poll_until(lambda: http_ok(f"{base}/healthz", timeout=5), timeout, 1):
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
    prom = Prometheus(url)
    poll_until(lambda: parse_vector(prom.query(series_query(LATENCY_METRIC))), timeout, 2)
    time.sleep(6)  # one more scrape interval, so the measured requests land after the first sample


def latency_from_prometheus(url: str, timeout: float = 180, nudge=None, route: str = "") -> dict[str, float | str]:
    """p50/p99 of Serve's HTTP latency for `route`/v1/respond over the last 5 minutes, once Prometheus has it
    (what it has after `timeout` s otherwise). rate() needs the histogram to grow between two scrapes: when the
    measured requests all fell before the series' first sample, `nudge()` (one more request) every 20 s gives
    it that growth."""
    prom = Prometheus(url)
    out: dict[str, float | str] = {}
    last_nudge = time.monotonic()

    def both() -> bool:
        nonlocal last_nudge
        if nudge is not None and time.monotonic() - last_nudge > 20:
            nudge()
            last_nudge = time.monotonic()
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            values = parse_vector(prom.query(quantile_query(LATENCY_METRIC, q, "5m")))
            found = [v for r, v in values.items()
                     if r.startswith(route) and "respond" in r and not math.isnan(v)]
            if found:
                out[name] = found[0]
        return len(out) == 2

    poll_until(both, timeout, 3)
    out["query"] = quantile_query(LATENCY_METRIC, 0.99, "5m")
    return out
