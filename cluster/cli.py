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


@app.command()
def evaluate(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help="trainer checkpoint (.pt)")],
    data: Annotated[str, typer.Option("--data", help="dir, .jsonl, official CSV dir/.tar.gz, s3://")],
    split: Annotated[str, typer.Option("--split", help="split name in the source")] = "valid",
    out: Annotated[Path, typer.Option("--out", help="where metrics.json and predictions.jsonl go")] = Path("eval"),
    device: Annotated[str, typer.Option("--device")] = "cpu",
    strategy: Annotated[str | None, typer.Option("--strategy", help="greedy | beam | sample")] = None,
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid")] = False,
) -> None:
    """Evaluate a checkpoint on any ED-format source: Acc / PPL / Dist-1 / Dist-2 / BLEU + predictions."""
    from trainers.evaluate import evaluate_checkpoint

    try:
        result = evaluate_checkpoint(checkpoint, data, split, out, device=device,
                                     decode={"strategy": strategy} if strategy else None, skip_invalid=skip_invalid)
    except (ConfigError, DataError, ValueError) as e:
        _fail(str(e))
    table = Table(title=f"{split}: {result['examples']} examples ({result['skipped']} skipped)")
    for k in result["metrics"]:
        table.add_column(k, justify="right")
    table.add_row(*(f"{v:.4g}" for v in result["metrics"].values()))
    console.print(table)
    console.print(f"wrote {out}/metrics.json and {out}/predictions.jsonl")


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


@app.command()
def demo(
    data: Annotated[str | None, typer.Option("--data", help="dataset (default: $ED_DATA_DIR or the sample)")] = None,
) -> None:
    """The whole loop on the embedded default. At this stage: prepare the data and print the summary."""
    import os

    from trainers.data.prepare import DataConfig

    start = time.perf_counter()
    try:
        cfg = load_config(DataConfig, source=data or os.environ.get("ED_DATA_DIR") or "sample")
        prepare_with_summary(cfg)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    console.print(f"[green]demo finished in {time.perf_counter() - start:.1f} s[/]")


if __name__ == "__main__":
    app()
