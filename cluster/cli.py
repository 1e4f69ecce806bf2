"""`edp`: the platform's command line (typer + rich).

Each command parses its options into a validated config, builds what it needs, runs it, and
prints a summary. Errors from bad input are printed as one clear message with exit code 2.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from trainers.config import ConfigError, load_config
from trainers.data.records import DataError

app = typer.Typer(help="Empathetic response generation platform: data, training, sweeps, registry, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Download, validate and prepare EMPATHETIC-DIALOGUES.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(2)


def rich_progress() -> tuple[Progress, callable]:
    """A rich progress bar and the `(phase, done, total)` callback trainers.data.prepare expects."""
    bar = Progress(TextColumn("{task.description:>14}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=False)
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=max(total, 1))
        bar.update(tasks[phase], completed=done, total=max(total, 1))

    return bar, update


def prepare_with_summary(cfg) -> object:
    from trainers.data.prepare import prepare

    bar, update = rich_progress()
    with bar:
        prepared = prepare(cfg, progress=update)
    print_summary(prepared)
    return prepared


def print_summary(prepared) -> None:
    m = prepared.manifest
    table = Table(title=f"prepared data ({'cache hit' if prepared.cache_hit else 'built'}): {prepared.path}")
    table.add_column("split")
    for col in ("conversations", "examples", "skipped", "distinct texts"):
        table.add_column(col, justify="right")
    for split, c in m["counts"].items():
        table.add_row(split, str(c["conversations"]), str(c["examples"]), str(c["skipped"]), str(c["texts"]))
    console.print(table)
    vec = m["vectors"]
    oov = "n/a" if vec["oov_rate"] is None else f"{vec['oov_rate']:.1%} of {m['vocab_size']} words ({vec['source']})"
    t = m["timings"]
    rows = [
        ("source", m["source"]),
        ("vocabulary", f"{m['vocab_size']} words (min_freq {m['settings']['min_freq']})"),
        ("vectors OOV rate", oov),
        ("parser", m["substitutions"]["parser"]),
        ("knowledge", m["substitutions"]["knowledge"]["backend"]),
        ("parse time", f"{t['parse_s']:.1f} s for {t['parsed_texts']} texts"
                       f" ({t['parsed_texts'] / max(t['parse_s'], 1e-9):.0f} texts/s)"),
        ("total time", f"{t.get('cache_hit_s', t['total_s']):.2f} s" + (" (cache hit)" if prepared.cache_hit else "")),
    ]
    info = Table(show_header=False)
    for k, v in rows:
        info.add_row(k, str(v))
    console.print(info)
    for split, bad in m["invalid"].items():
        for line in bad[:5]:
            console.print(f"[yellow]skipped[/] {split}: {line}")
        if len(bad) > 5:
            console.print(f"[yellow]... and {len(bad) - 5} more skipped in {split}[/]")


@data_app.command("prepare")
def data_prepare(
    data: Annotated[str | None, typer.Option("--data", help="'sample', a dir/.jsonl/.tar.gz, or s3://bucket/prefix; "
                                                         "default: $ED_DATA_DIR or the embedded sample")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="cache directory for prepared entries")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="skip malformed records (counted)")] = False,
    n_process: Annotated[int | None, typer.Option("--n-process", help="spaCy worker processes")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Load, validate, annotate and cache a dataset; print a summary table."""
    import os

    from trainers.data.prepare import DataConfig

    try:
        cfg = load_config(DataConfig, config, overrides,
                          source=data or (None if config else os.environ.get("ED_DATA_DIR")),
                          cache_dir=str(out) if out else None,
                          skip_invalid=skip_invalid or None, n_process=n_process)
        prepare_with_summary(cfg)
    except (ConfigError, DataError) as e:
        _fail(str(e))


@data_app.command("download")
def data_download(
    out: Annotated[Path, typer.Option("--out", help="directory for the release tarball")] = Path("data"),
    url: Annotated[str | None, typer.Option("--url", help="release URL (default: the official one)")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="expected checksum")] = None,
) -> None:
    """Download the official EMPATHETIC-DIALOGUES release tarball (train/valid/test CSV)."""
    from trainers.data.remote import OFFICIAL_URL, download_release

    bar, update = rich_progress()
    try:
        with bar:
            path = download_release(url or OFFICIAL_URL, out, sha256=sha256,
                                    progress=lambda done, total: update("download", done, total or done))
    except DataError as e:
        _fail(str(e))
    console.print(f"saved {path}; prepare it with: edp data prepare --data {path}")


@data_app.command("validate")
def data_validate(
    data: Annotated[str, typer.Argument(help="dir, .jsonl, .csv, .tar.gz or s3://bucket/prefix")],
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check every record of a source; list each invalid one with its conv_id and reason."""
    from trainers.data.sources import load_splits

    try:
        reports = load_splits(data, skip_invalid=True)
    except DataError as e:
        _fail(str(e))
    summary = {s: {"conversations": len(r.conversations), "invalid": [str(i) for i in r.invalid]}
               for s, r in reports.items()}
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        for split, s in summary.items():
            console.print(f"{split}: {s['conversations']} valid conversations, {len(s['invalid'])} invalid")
            for line in s["invalid"]:
                console.print(f"  [red]{line}[/]")
    if any(s["invalid"] for s in summary.values()):
        raise typer.Exit(1)


@app.command()
def train(
    model: Annotated[str | None, typer.Option("--model", help="transformer | escm | iamm")] = None,
    data: Annotated[str | None, typer.Option("--data", help="dataset source (default: the sample)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="run directory")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda[:N]")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps")] = None,
    local: Annotated[bool, typer.Option("--local", help="single process, plain PyTorch (no Ray)")] = False,
    workers: Annotated[int | None, typer.Option("--workers", help="Ray Train DDP workers")] = None,
    gpus_per_worker: Annotated[float | None, typer.Option("--gpus-per-worker", help="GPUs per worker")] = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="ignore checkpoints already in --out")] = False,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Train one model. `--local` runs the plain-PyTorch trainer in this process."""
    from trainers import train as local_train

    if not local:  # Ray Train (TorchTrainer, DDP): cluster.jobs.train, in this process
        from cluster.jobs import train as ray_train_job

        argv = [*(["--config", str(config)] if config else []), *(["--model", model] if model else []),
                *(["--data", data] if data else []), *(["--out", str(out)] if out else []),
                *(["--max-steps", str(max_steps)] if max_steps else []),
                *(["--workers", str(workers)] if workers else []),
                *(["--gpus-per-worker", str(gpus_per_worker)] if gpus_per_worker is not None else []),
                *[a for o in overrides or [] for a in ("--set", o)]]
        raise typer.Exit(ray_train_job.main(argv))
    argv = [*(["--config", str(config)] if config else []), *(["--model", model] if model else []),
            *(["--data", data] if data else []), *(["--out", str(out)] if out else []),
            *(["--device", device] if device else []), *(["--max-steps", str(max_steps)] if max_steps else []),
            *(["--no-resume"] if no_resume else []), *[a for o in overrides or [] for a in ("--set", o)]]
    raise typer.Exit(local_train.main(argv))


TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")]


@app.command()
def evaluate(
    data: Annotated[str, typer.Option("--data", help="dir, .jsonl, official CSV dir/.tar.gz, s3://")],
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="a local training checkpoint (.pt) or a serving bundle directory")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="a registered version: models:/<name>@<alias> or models:/<name>/<version>")] = None,
    split: Annotated[str, typer.Option("--split", help="split name in the source")] = "valid",
    out: Annotated[Path, typer.Option("--out", help="where metrics.json and predictions.jsonl go")] = Path("eval"),
    device: Annotated[str, typer.Option("--device")] = "cpu",
    strategy: Annotated[str | None, typer.Option("--strategy", help="greedy | beam | sample")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Evaluate a checkpoint or a registered model on any ED-format source: Acc / PPL / Dist-1 / Dist-2 / BLEU."""
    from services.registry import RegistryError

    if (checkpoint is None) == (model is None):
        _fail("give exactly one of --checkpoint (a local file or bundle) and --model (models:/<name>@<alias>)")
    try:
        result = _evaluate(checkpoint, model, tracking_uri, data, split, out, device=device,
                           decode={"strategy": strategy} if strategy else None, skip_invalid=skip_invalid)
    except (ConfigError, DataError, ValueError, RegistryError) as e:
        _fail(str(e))
    table = Table(title=f"{split}: {result['examples']} examples ({result['skipped']} skipped)")
    for k in result["metrics"]:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.4g}" for v in result["metrics"].values()))
    console.print(table)
    console.print(f"wrote {out}/metrics.json and {out}/predictions.jsonl")


def _evaluate(checkpoint: str | None, model: str | None, tracking_uri: str | None, *args, **kwargs) -> dict:
    """Evaluate a local checkpoint/bundle, or a registered version's bundle (never unpickled) downloaded here."""
    from trainers.evaluate import evaluate_checkpoint

    if model is None:
        return evaluate_checkpoint(checkpoint, *args, **kwargs)
    from cluster.promote import resolve_tracking_uri
    from services import registry

    resolved = registry.resolve(model, resolve_tracking_uri(tracking_uri))
    try:
        label = f"{model} (version {resolved.version}, run {resolved.run_id})"
        return evaluate_checkpoint(resolved.bundle, *args, label=label, **kwargs)
    finally:
        registry.discard(resolved)


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="sweep YAML (cluster/configs/sweeps/)")],
    overrides: SetOpt = None,
) -> None:
    """Run a Ray Tune sweep (ablation grid or ASHA search), tracked as one MLflow parent run."""
    from cluster.sweep import load_sweep, run_sweep
    from cluster.tracking import TABLE_METRICS

    try:
        cfg = load_sweep(config, overrides)  # validated before Ray starts
        summary = run_sweep(cfg)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    table = Table(title=f"sweep {cfg.name}: {summary['trials']} trials in {summary['wall_s']:.0f} s")
    table.add_column("variant")
    for col in TABLE_METRICS:
        table.add_column(col, justify="right")
    for r in summary["rows"]:
        table.add_row(r["variant"], *(f"{r[c]:.2f} ± {r[c + '_std']:.2f}" for c in TABLE_METRICS))
    console.print(table)
    console.print(f"parent run {summary['parent_run_id']} ({summary['tracking_uri']}); "
                  f"best child {summary['best_run_id']}")
    if summary["errors"]:
        _fail(f"{len(summary['errors'])} trial(s) failed: {summary['errors'][0]}")


def _plain(line: str) -> None:
    console.print(line, soft_wrap=True, markup=False, highlight=False)


@app.command()
def promote(
    experiment: Annotated[str, typer.Option("--experiment", help="the sweep's MLflow experiment")],
    metric: Annotated[str, typer.Option("--metric", help="metric to rank child runs by, e.g. valid_acc")],
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    mode: Annotated[str | None, typer.Option(
        "--mode", help="max | min: overrides the metric's own direction (valid_ppl min, valid_acc max, ...)")] = None,
    where: Annotated[str | None, typer.Option("--where", help="filter: \"params.model = 'escm'\"")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="promote even if worse than the champion or measured on other data")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the ranking and the decision only")] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register the best child run of a sweep and move alias `champion` to it (exit 1 when refused)."""
    from cluster.promote import PromotionError
    from cluster.promote import promote as do_promote

    try:
        decision = do_promote(experiment, metric, mode, where, name=name, force=force, dry_run=dry_run,
                              tracking_uri=tracking_uri, log=_plain)
    except (PromotionError, ValueError) as e:
        _fail(str(e))
    console.print(f"[bold]{decision.action}[/]: {name} champion is "
                  + (f"v{decision.version}" if decision.version else "none") + (" (dry run)" if dry_run else ""))
    if decision.action == "refused":
        raise typer.Exit(1)


@app.command()
def rollback(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    tracking_uri: TrackingOpt = None,
) -> None:
    """Move alias `champion` back to `previous`."""
    from cluster.promote import PromotionError
    from cluster.promote import rollback as do_rollback

    try:
        do_rollback(name, tracking_uri=tracking_uri, log=_plain)
    except PromotionError as e:
        _fail(str(e))


@app.command()
def serve(
    name: Annotated[str, typer.Option("--name", help="registered model name")] = "escm",
    alias: Annotated[str, typer.Option("--alias", help="alias to serve and follow")] = "champion",
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve config file")] = None,
    tracking_uri: TrackingOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (default: the config's)")] = None,
    address: Annotated[str | None, typer.Option("--address", help="attach to this Ray cluster")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Ray metrics port")] = None,
    overrides: SetOpt = None,
) -> None:
    """Serve models:/NAME@ALIAS with Ray Serve on 127.0.0.1 until Ctrl-C."""
    import os

    from pydantic import ValidationError

    from cluster import serve_local
    from trainers.config import parse_overrides

    try:
        spec = serve_local.from_config(config, name, alias, {"mlflow_tracking_uri": tracking_uri,
                                                             **parse_overrides(overrides or [])})
    except (ConfigError, ValidationError, OSError) as e:
        _fail(str(e))
    if not spec.args.get("mlflow_tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        from cluster.promote import resolve_tracking_uri

        spec.args["mlflow_tracking_uri"] = resolve_tracking_uri(None)  # the local sweeps' embedded store
    url = serve_local.run(spec, port=port, address=address, metrics_port=metrics_port)
    console.print(f"serving models:/{name}@{alias} at {url}/v1/respond (OpenAPI: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


stack_app = typer.Typer(help="The platform's services on this machine (Ray, MLflow, S3, Prometheus), on 127.0.0.1.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")
StateDirOpt = Annotated[Path | None, typer.Option("--state-dir", help="state directory (default: $EDP_STACK_DIR "
                                                                      "or ./.edp/stack)")]


@stack_app.command("up")
def stack_up(
    state_dir: StateDirOpt = None,
    ports: Annotated[list[str] | None, typer.Option(
        "--ports", help="NAME=PORT[,NAME=PORT...] (repeatable); names: ray_gcs ray_dashboard ray_metrics "
                        "ray_client serve_http mlflow s3 prometheus")] = None,
    num_cpus: Annotated[int, typer.Option("--num-cpus", min=1, help="CPUs the Ray head offers")] = 2,
) -> None:
    """Start Ray head, MLflow, SeaweedFS S3 and Prometheus (what is not running yet) and write the env file."""
    from cluster import stack

    start = time.perf_counter()
    try:
        stack.up(state_dir, stack.parse_ports(ports), num_cpus=num_cpus, log=_plain)
        rows = stack.status(state_dir)
    except (ValueError, stack.StackError) as e:
        _fail(str(e))
    console.print(stack.status_table(rows))
    root, url = stack.Stack.at(state_dir).root, {r.name: r.url for r in rows}
    console.print(f"stack up in {time.perf_counter() - start:.1f} s. Ray dashboard {url['ray']}, MLflow UI "
                  f"{url['mlflow']}, S3 {url['s3']}, Prometheus {url['prometheus']}, Serve (once deployed) "
                  f"{url['serve']}", soft_wrap=True)
    console.print(f"use it:  source {root / 'env'}\nstop it: edp stack down --state-dir {root}", soft_wrap=True)
    if not all(r.healthy for r in rows[:4]):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(state_dir: StateDirOpt = None) -> None:
    """Stop what `edp stack up` started (its recorded process groups); data and logs stay."""
    from cluster import stack

    start = time.perf_counter()
    try:
        stopped = stack.down(state_dir, log=_plain)
    except stack.StackError as e:
        _fail(str(e))
    console.print(f"stack down in {time.perf_counter() - start:.1f} s" if stopped else "nothing to stop")


@stack_app.command("status")
def stack_status(state_dir: StateDirOpt = None) -> None:
    """Service, URL, pid and health of each service of the stack (exit 1 unless all four are healthy)."""
    from cluster import stack

    try:
        rows = stack.status(state_dir)
    except stack.StackError as e:
        _fail(str(e))
    console.print(stack.status_table(rows))
    if not all(r.healthy for r in rows[:4]):
        raise typer.Exit(1)


@app.command()
def metrics(
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", help="Prometheus URL (default: $EDP_PROMETHEUS_URL, the local stack's, or :9090)")] = None,
    window: Annotated[str, typer.Option("--window", help="rate window, a PromQL duration")] = "1m",
) -> None:
    """Request rate and p50/p95/p99 latency of the Serve app by route, from Prometheus."""
    import re

    from cluster import stack_metrics as sm

    if not re.fullmatch(r"\d+[smhd]", window):
        _fail(f"--window {window!r} is not a PromQL duration like 30s, 1m, 5m")
    url = prometheus or sm.default_prometheus_url()
    prom = sm.Prometheus(url)
    try:
        rows = sm.collect(prom.query, window)
        up, total = sm.targets_up(prom.targets())
    except sm.MetricsError as e:
        _fail(str(e))
    if not rows:
        console.print(f"no request latency data in Prometheus at {url} yet ({', '.join(sm.SOURCES.values())}); "
                      f"Ray scrape targets up: {up}/{total}. Send requests to the Serve app: Ray exports them after "
                      "~10-15 s, Prometheus scrapes every 5 s.", soft_wrap=True)
        return
    table = Table(title=f"request latency over the last {window} ({url})")
    for col in ("source", "route", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("source", "route") else "right")
    for r in rows:
        table.add_row(r.source, r.route, f"{r.rate:.2f}", sm.fmt_ms(r.p50), sm.fmt_ms(r.p95), sm.fmt_ms(r.p99))
    console.print(table)


@app.command()
def demo(
    data: Annotated[str | None, typer.Option("--data", help="dataset (default: $ED_DATA_DIR or the sample)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="local stack state directory")] = None,
    requests: Annotated[int, typer.Option("--requests", help="HTTP requests sent to the endpoint")] = 60,
) -> None:
    """The whole loop on this machine: stack up, data, sweep (ray job), promote, serve, requests, latency."""
    from cluster import demo as demo_loop
    from cluster.promote import PromotionError
    from cluster.stack import StackError

    try:
        result = demo_loop.run(data, state_dir, console, requests)
    except (ConfigError, DataError, StackError, PromotionError, demo_loop.DemoError) as e:
        _fail(str(e))
    demo_loop.report(result, console)


if __name__ == "__main__":
    app()
