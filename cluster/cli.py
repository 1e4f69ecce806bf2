"""`edp`: the platform's command line (typer + rich).

Each command parses its options into a validated config, builds what it needs, runs it, and
prints a summary. Errors from bad input are printed as one clear message with exit code 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from cluster import demo as demo_loop
from cluster import prometheus as sm
from cluster.compare import compare as do_compare
from cluster.console import (
    console,
    plain,
    print_comparison,
    print_demo,
    print_evaluation,
    print_latency,
    print_prepared,
    print_sweep,
    released_table,
    rich_progress,
    stack_table,
)
from cluster.jobs import train as train_job
from cluster.jobs.runner import run_job
from cluster.local import serve as serve_local
from cluster.local import stack
from cluster.local.processes import log_tail
from cluster.local.stack import StackError
from cluster.serve_rollout import apply_version
from cluster.tracking.promotion import PromotionError, promote_challenger
from cluster.tracking.promotion import promote as do_promote
from cluster.tracking.promotion import rollback as do_rollback
from cluster.tracking.runs import resolve_tracking_uri
from services import registry
from services.registry import RegistryError
from trainers import release
from trainers import train as train_entry
from trainers.config import ConfigError, DataConfig, load_config, parse_overrides
from trainers.data.records import DataError
from trainers.data.release import OFFICIAL_URL, download_release
from trainers.data.sources import load_splits

app = typer.Typer(help="Empathetic response generation platform: data, training, sweeps, registry, serving.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Download, validate and prepare EMPATHETIC-DIALOGUES.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override: dotted.key=value (repeatable)")]


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(2)


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
    from trainers.data.prepare import prepare  # spaCy, numpy: only for this command

    bar, update = rich_progress()
    try:
        cfg = load_config(DataConfig, config, overrides,
                          source=data or (None if config else os.environ.get("ED_DATA_DIR")),
                          cache_dir=str(out) if out else None,
                          skip_invalid=skip_invalid or None, n_process=n_process)
        with bar:
            prepared = prepare(cfg, progress=update)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    print_prepared(prepared)


@data_app.command("download")
def data_download(
    out: Annotated[Path, typer.Option("--out", help="directory for the release tarball")] = Path("data"),
    url: Annotated[str | None, typer.Option("--url", help="release URL (default: the official one)")] = None,
    sha256: Annotated[str | None, typer.Option("--sha256", help="expected checksum")] = None,
) -> None:
    """Download the official EMPATHETIC-DIALOGUES release tarball (train/valid/test CSV)."""
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


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train one model: Ray Train (TorchTrainer, DDP), or with `--local` the plain-PyTorch trainer in this process.
    The options are `python -m cluster.jobs.train`'s (one parser) plus --local: `edp train --help`."""
    args = _train_parser().parse_args(ctx.args)
    if not args.local:  # what `python -m cluster.jobs.train` runs, from the same parser and config builder
        raise typer.Exit(run_job(lambda: train_job.config_from_args(args), train_job.run))
    ray_only = train_entry.flag_fields(args, train_job.RAY_FLAGS)
    if ray_only:
        _fail("--workers and --gpus-per-worker are Ray Train options (as are --cpus-per-worker, --storage-path, "
              "--max-failures, --tracking-uri and --name): drop them or drop --local")
    try:  # what `python -m trainers.train` runs, from the same flags and config builder
        result = train_entry.run(train_entry.config_from_args(args), resume=not args.no_resume)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    console.print({k: round(v, 4) for k, v in result["final"].items()})


def _train_parser():
    p = train_job.parser("edp train", "Train one model on Ray Train (what `python -m cluster.jobs.train` runs), or "
                                      "with --local in this process (what `python -m trainers.train` runs).")
    p.add_argument("--local", action="store_true", help="single process, plain PyTorch (no Ray): `python -m "
                   "trainers.train`; --config is then a TrainConfig and --set sets its fields")
    return p


TrackingOpt = Annotated[str | None, typer.Option("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")]
ApplyOpt = Annotated[bool, typer.Option(
    "--apply", help="also pin the champion version in the running Serve application's user_config (rolls its "
                    "replicas in place); without it, replicas follow the alias by polling")]
ServeAddressOpt = Annotated[str | None, typer.Option(
    "--serve-address", help="Ray dashboard URL for --apply (default: $RAY_DASHBOARD_ADDRESS)")]


@app.command()
def evaluate(
    data: Annotated[str, typer.Option("--data", help="dir, .jsonl, official CSV dir/.tar.gz, s3://")],
    checkpoint: Annotated[str | None, typer.Option(
        "--checkpoint", help="a local training checkpoint (.pt) or a serving bundle directory")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", help="a registered version (models:/<name>@<alias> or models:/<name>/<version>) or a released "
                        "bundle directory (models/escm-ed: its card's metrics are reproduced)")] = None,
    split: Annotated[str, typer.Option("--split", help="split name in the source")] = "valid",
    out: Annotated[Path, typer.Option("--out", help="where metrics.json and predictions.jsonl go")] = Path("eval"),
    device: Annotated[str, typer.Option("--device")] = "cpu",
    strategy: Annotated[str | None, typer.Option("--strategy", help="greedy | beam | sample")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
    unseen_vectors: Annotated[bool | None, typer.Option(
        "--unseen-vectors/--no-unseen-vectors",
        help="override the model's unseen_vectors setting (context words outside the vocabulary embedded with "
             "their pretrained vector)")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Evaluate a checkpoint or a registered model on any ED-format source: Acc / PPL / Dist-1 / Dist-2 / BLEU."""
    if (checkpoint is None) == (model is None):
        _fail("give exactly one of --checkpoint (a local file or bundle) and --model (models:/<name>@<alias>)")
    try:
        result = _evaluate(checkpoint, model, tracking_uri, data, split, out, device=device,
                           decode={"strategy": strategy} if strategy else None, skip_invalid=skip_invalid,
                           unseen_vectors=unseen_vectors)
    except (ConfigError, DataError, ValueError, RegistryError) as e:
        _fail(str(e))
    print_evaluation(result, split)
    console.print(f"wrote {out}/metrics.json and {out}/predictions.jsonl")


def _evaluate(checkpoint: str | None, model: str | None, tracking_uri: str | None, *args, **kwargs) -> dict:
    """Evaluate a local checkpoint/bundle, a released bundle directory (checked against its card, float32 compute
    as its card's), or a registered version's bundle (never unpickled) downloaded here."""
    from trainers.evaluation import evaluate_model  # torch: only for this command

    if model is None:
        return evaluate_model(checkpoint, *args, **kwargs)
    if not model.startswith("models:/"):
        name, digest = release.bundle_identity(release.released_bundle(model))
        return evaluate_model(model, *args, label=f"{name} (bundle sha256 {digest[:12]})", bf16=False, **kwargs)

    resolved = registry.resolve(model, resolve_tracking_uri(tracking_uri))
    try:
        label = f"{model} (version {resolved.version}, run {resolved.run_id})"
        return evaluate_model(resolved.bundle, *args, label=label, **kwargs)
    finally:
        registry.discard(resolved)


@app.command()
def sweep(
    config: Annotated[Path, typer.Option("--config", "-c", help="sweep YAML (cluster/configs/sweeps/)")],
    overrides: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the trials, their resources and whether they "
                                          "fit the cluster at RAY_ADDRESS; run nothing")] = False,
) -> None:
    """Run a Ray Tune sweep (ablation grid or ASHA search), tracked as one MLflow parent run."""
    from cluster.distributed.tuning import load_sweep, run_sweep  # torch, Ray: only for this command
    from cluster.jobs.sweep import dry_run as print_plan  # imports the tuning module (torch)

    try:
        cfg = load_sweep(config, overrides)  # validated before Ray starts
        if dry_run:
            raise typer.Exit(print_plan(cfg))
        summary = run_sweep(cfg)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    print_sweep(cfg.name, summary)
    if summary["errors"]:
        _fail(f"{len(summary['errors'])} trial(s) failed: {summary['errors'][0]}")




@app.command()
def report(
    parent: Annotated[str, typer.Option("--parent", help="the sweep's parent run id (`edp sweep` prints it)")],
    last: Annotated[int, typer.Option("--last", help="evaluations per seed averaged, from the end")] = 3,
    out: Annotated[Path, typer.Option("--out", help="directory for curves.md, curves.csv, curves.png")] = Path(
        "reports"),
    tracking_uri: TrackingOpt = None,
) -> None:
    """A sweep's learning curves from MLflow: per variant, valid Acc/PPL/Dist-1/Dist-2 as mean ± std over its seeds'
    last N evaluations, and a PNG of each per evaluation step."""
    from cluster.tracking.curves import ReportError, write_report  # mlflow, matplotlib: only for this command

    try:
        result = write_report(resolve_tracking_uri(tracking_uri), parent, out, last)
    except ReportError as e:
        _fail(str(e))
    console.print(result.markdown, markup=False, soft_wrap=True)
    console.print("wrote " + ", ".join(str(p) for p in result.paths.values()))


@app.command()
def promote(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    experiment: Annotated[str | None, typer.Option("--experiment", help="the sweep's MLflow experiment")] = None,
    metric: Annotated[str | None, typer.Option("--metric", help="metric to rank child runs by, e.g. valid_acc")]
    = None,
    mode: Annotated[str | None, typer.Option(
        "--mode", help="max | min: overrides the metric's own direction (valid_ppl min, valid_acc max, ...)")] = None,
    where: Annotated[str | None, typer.Option("--where", help="filter: \"params.model = 'escm'\"")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="promote even if worse than the champion or measured on other data")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the ranking and the decision only")] = False,
    alias: Annotated[str, typer.Option(
        "--alias", help="champion | challenger: the alias the best run gets (a challenger is served beside the "
                        "champion when the Serve config has a challenger block)")] = "champion",
    from_challenger: Annotated[bool, typer.Option(
        "--from-challenger", help="promote the version behind alias `challenger` instead of a sweep's best run "
                                  "(no --experiment/--metric)")] = False,
    apply: ApplyOpt = False,
    serve_address: ServeAddressOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register the best child run of a sweep and move alias `champion` (or `challenger`) to it, or promote the
    challenger (exit 1 when refused)."""
    if from_challenger and (experiment is not None or metric is not None):
        _fail("--from-challenger promotes the version behind alias `challenger`: drop --experiment and --metric")
    if not from_challenger and (experiment is None or metric is None):
        _fail("give --experiment and --metric (promote a sweep's best run), or --from-challenger")
    try:
        decision = promote_challenger(name, tracking_uri=tracking_uri, log=plain) if from_challenger else \
            do_promote(experiment, metric, mode, where, name=name, force=force, dry_run=dry_run,
                       tracking_uri=tracking_uri, log=plain, alias=alias)
    except (PromotionError, ValueError) as e:
        _fail(str(e))
    console.print(f"[bold]{decision.action}[/]: {name} champion is "
                  + (f"v{decision.version}" if decision.version else "none")
                  + (f", challenger v{decision.challenger_version}" if decision.challenger_version else "")
                  + (" (dry run)" if dry_run else ""))
    if decision.action == "refused":
        raise typer.Exit(1)
    if apply and not dry_run and decision.version:
        _apply(name, decision.version, serve_address)



def _apply(name: str, version: str, serve_address: str | None) -> None:
    try:
        apply_version(name, version, serve_address, log=plain)
    except (RuntimeError, OSError, ValueError) as e:  # RolloutError, the dashboard's refusal or absence
        _fail(f"--apply: {e}")


@app.command()
def rollback(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    apply: ApplyOpt = False,
    serve_address: ServeAddressOpt = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Move alias `champion` back to `previous` (with --apply, pin it in the running Serve application too)."""
    try:
        decision = do_rollback(name, tracking_uri=tracking_uri, log=plain)
    except PromotionError as e:
        _fail(str(e))
    if apply:
        _apply(name, decision.version, serve_address)


@app.command()
def serve(
    name: Annotated[str | None, typer.Option("--name", help="registered model name (default: the app's)")] = None,
    alias: Annotated[str, typer.Option("--alias", help="alias to serve and follow")] = "champion",
    app_name: Annotated[str | None, typer.Option(
        "--app", help="application of the Serve config (escm, iamm; default: the one serving --name, else the first)",
    )] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Serve config file")] = None,
    tracking_uri: TrackingOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (default: the config's)")] = None,
    address: Annotated[str | None, typer.Option("--address", help="attach to this Ray cluster")] = None,
    metrics_port: Annotated[int | None, typer.Option("--metrics-port", help="Ray metrics port")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="serve this local bundle directory (a released model, e.g. models/escm-ed) instead of "
                        "models:/NAME@ALIAS: no MLflow; --name and --tracking-uri do not apply")] = None,
    overrides: SetOpt = None,
) -> None:
    """Serve one application of the Serve config (models:/NAME@ALIAS, or with --model a bundle directory, under its
    route prefix) on 127.0.0.1 until Ctrl-C."""
    try:
        local = None if model is None else registry.local_version(model)
        args = {"mlflow_tracking_uri": tracking_uri, **parse_overrides(overrides or [])}
        if local is not None:  # the app serving this model type; the card's name and the directory replace its args
            name = json.loads((local.bundle / "config.json").read_text())["model_name"]  # its model type
            args.update(model_name=local.name, model_dir=str(local.bundle))
        spec = serve_local.from_config(config, name, alias, args, app=app_name)
    except (ConfigError, ValidationError, OSError, RegistryError, DataError) as e:
        _fail(str(e))
    if local is None and not spec.args.get("mlflow_tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        spec.args["mlflow_tracking_uri"] = resolve_tracking_uri()  # the local sweeps' embedded store
    url = serve_local.run(spec, port=port, address=address, metrics_port=metrics_port)
    what = f"models:/{spec.args['model_name']}@{alias}" if local is None else \
        f"{local.bundle} ({local.name} {local.version})"
    console.print(f"serving {what} at {url}/v1/respond (OpenAPI: {url}/docs); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve  # already loaded by serve_local.run

        ray_serve.shutdown()


models_app = typer.Typer(help="Released models: bundles with model cards under the repo's models/ folder.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("release")
def models_release(
    checkpoint: Annotated[Path, typer.Argument(help="a training checkpoint (.pt) or a bundle directory")],
    out: Annotated[Path, typer.Option("--out", help="the release directory, e.g. models/escm-ed (must not exist)")],
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 weights (refused when --data shows a metric moving "
                                                      f"by more than {release.PRECISION_TOLERANCE})")] = False,
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8: the big matrices (embedding, output "
                                                 "projection) int8 with a scale per row, the rest float16; checked "
                                                 "against float32 like --fp16")] = None,
    data: Annotated[str | None, typer.Option("--data", help="evaluate on this ED source for the card's metrics "
                                                            "and samples")] = None,
    split: Annotated[str, typer.Option("--split", help="split of --data")] = "valid",
    train_command: Annotated[str | None, typer.Option("--train-command", help="the exact training command")] = None,
    commit: Annotated[str | None, typer.Option("--commit", help="the git commit the model was trained at")] = None,
) -> None:
    """Write a serving bundle (at most 15 MB), card.json and card.md: a released model."""
    try:
        card = release.release(checkpoint, out, fp16=fp16, quantize=quantize, source=data, split=split,
                               command=train_command, commit=commit, log=plain)
    except (DataError, ConfigError) as e:
        _fail(str(e))
    if card["evaluation"]:
        print_evaluation(card["evaluation"], split)
    else:
        console.print("[yellow]no --data: the card has no metrics and no samples[/]")
    if not (train_command and commit):
        console.print("[yellow]the card records no training command or commit: give --train-command and --commit[/]")


@models_app.command("list")
def models_list(
    models_dir: Annotated[Path, typer.Option("--dir", help="the models folder")] = release.MODELS_DIR,
) -> None:
    """The released models of a folder, their card's figures and whether their files match the card (exit 1 if
    any does not)."""
    rows = release.released_models(models_dir)
    if not rows:
        console.print(f"no released models in {models_dir} (make one with: edp models release CHECKPOINT --out "
                      f"{models_dir}/NAME --data DIR)", soft_wrap=True)
        return
    console.print(released_table(rows, models_dir))
    failed = [r for r in rows if not r.ok]
    if failed:
        console.print(f"[red]{len(failed)} of {len(rows)} fail their check:[/]")
        for r in failed:
            plain(f"  {r.path}: " + "; ".join(r.problems))
        raise typer.Exit(1)


@models_app.command("verify")
def models_verify(directory: Annotated[Path, typer.Argument(help="a released model's directory")]) -> None:
    """Recompute the sha256 of the bundle's files and compare them with card.json (exit 1 on a mismatch)."""
    try:
        problems = release.verify(directory)
    except DataError as e:
        _fail(str(e))
    for line in problems:
        console.print(f"[red]mismatch[/] {directory}/{line}", soft_wrap=True, highlight=False)
    if problems:
        raise typer.Exit(1)
    console.print(f"{directory}: every bundle file matches card.json")


@models_app.command("register")
def models_register(
    directory: Annotated[Path, typer.Argument(help="a released model's directory")],
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    alias: Annotated[str | None, typer.Option("--alias", help="move this alias (e.g. champion) to it")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Register a released model as a new version of NAME, its card's metrics as tags."""
    from cluster.tracking.releases import register_release  # mlflow: only for this command

    try:
        registered = register_release(directory, name, alias=alias, tracking_uri=tracking_uri, log=plain)
    except PromotionError as e:
        _fail(str(e))
    console.print(f"[bold]registered[/]: models:/{name}/{registered.version}"
                  + (f" (alias {alias})" if alias else ""))


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
    num_cpus: Annotated[int, typer.Option("--num-cpus", min=1, help="CPUs the Ray head offers (no --workers)")] = 2,
    workers: Annotated[int, typer.Option("--workers", min=0, help="worker nodes (own raylets) beside a 0-CPU head, "
                                         "as the chart's cluster")] = 0,
    worker_cpus: Annotated[float, typer.Option("--worker-cpus", min=0.1, help="CPUs of each worker node")] = 1.0,
) -> None:
    """Start Ray head (and --workers nodes), MLflow, SeaweedFS S3 and Prometheus (what is not running yet) and write
    the env file."""
    start = time.perf_counter()
    try:
        stack.up(state_dir, stack.parse_ports(ports), num_cpus=num_cpus, log=plain, workers=workers,
                 worker_cpus=worker_cpus)
        rows = stack.status(state_dir)
    except (ValueError, stack.StackError) as e:
        _fail(str(e))
    console.print(stack_table(rows))
    root, url = stack.Stack.at(state_dir).root, {r.name: r.url for r in rows}
    console.print(f"stack up in {time.perf_counter() - start:.1f} s. Ray dashboard {url['ray']}, MLflow UI "
                  f"{url['mlflow']}, S3 {url['s3']}, Prometheus {url['prometheus']}, Serve (once deployed) "
                  f"{url['serve']}", soft_wrap=True)
    console.print(f"use it:  source {root / 'env'}\nstop it: edp stack down --state-dir {root}", soft_wrap=True)
    if not all(r.healthy for r in rows if r.name != "serve"):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(state_dir: StateDirOpt = None) -> None:
    """Stop what `edp stack up` started (its recorded process groups); data and logs stay."""
    start = time.perf_counter()
    try:
        stopped = stack.down(state_dir, log=plain)
    except stack.StackError as e:
        _fail(str(e))
    console.print(f"stack down in {time.perf_counter() - start:.1f} s" if stopped else "nothing to stop")


@stack_app.command("status")
def stack_status(state_dir: StateDirOpt = None) -> None:
    """Service (and worker node), URL, pid and health of the stack (exit 1 unless all are healthy)."""
    try:
        rows = stack.status(state_dir)
    except stack.StackError as e:
        _fail(str(e))
    console.print(stack_table(rows))
    if not all(r.healthy for r in rows if r.name != "serve"):
        raise typer.Exit(1)


@stack_app.command("logs")
def stack_logs(
    service: Annotated[str, typer.Argument(help="s3 | mlflow | ray | prometheus")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="how many of the last lines")] = 40,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing what is appended (Ctrl-C stops)")]
    = False,
    state_dir: StateDirOpt = None,
) -> None:
    """Print the last lines of a stack service's log (and with -f, what it writes next)."""
    try:
        path = stack.log_file(service, state_dir)
    except stack.StackError as e:
        _fail(str(e))
    if lines:
        print(log_tail(path, lines), flush=True)
    if follow:
        try:
            stack.follow(path, lambda chunk: (sys.stdout.write(chunk), sys.stdout.flush()))
        except KeyboardInterrupt:
            pass


@app.command()
def metrics(
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", help="Prometheus URL (default: $EDP_PROMETHEUS_URL, the local stack's, or :9090)")] = None,
    window: Annotated[str, typer.Option("--window", help="rate window, a PromQL duration")] = "1m",
) -> None:
    """Request rate and p50/p95/p99 latency of the Serve app by route, from Prometheus."""
    if not sm.is_duration(window):
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
    print_latency(rows, window, url)


@app.command()
def compare(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    window: Annotated[str, typer.Option("--window", help="time window, a PromQL duration")] = "15m",
    prometheus: Annotated[str | None, typer.Option(
        "--prometheus", help="Prometheus URL (default: $EDP_PROMETHEUS_URL, the local stack's, or :9090)")] = None,
) -> None:
    """Champion vs challenger on live traffic: requests, errors, latency, response length, emotions, agreement."""
    if not sm.is_duration(window):
        _fail(f"--window {window!r} is not a PromQL duration like 30s, 5m, 1h")
    url = prometheus or sm.default_prometheus_url()
    try:
        result = do_compare(sm.Prometheus(url).query, name, window)
    except sm.MetricsError as e:
        _fail(str(e))
    if not result.models:
        console.print(f"no answers of {name!r} in Prometheus at {url} over the last {window}: is the Serve app "
                      "receiving traffic (Ray exports after ~10-15 s, Prometheus scrapes every 5 s)?", soft_wrap=True)
        raise typer.Exit(1)
    print_comparison(result, url)


@app.command()
def demo(
    data: Annotated[str | None, typer.Option("--data", help="dataset (default: $ED_DATA_DIR or the sample)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="local stack state directory")] = None,
    requests: Annotated[int, typer.Option("--requests", help="HTTP requests sent to the endpoint")] = 60,
) -> None:
    """The whole loop on this machine: stack up, data, sweep (ray job), promote, serve, requests, latency."""
    try:
        result = demo_loop.run(data, state_dir, console, requests)
    except (ConfigError, DataError, StackError, PromotionError, demo_loop.DemoError) as e:
        _fail(str(e))
    print_demo(result)


if __name__ == "__main__":
    app()
