"""Ray Train / Ray Tune cost on this machine: the same tiny run plain, through a 1-worker and a 2-worker
TorchTrainer, and the smoke sweep, all on a local Ray (2 CPUs, no dashboard) with a throwaway sqlite
MLflow store.

Yardstick: the plain single-process `trainers.loop.Trainer` (1 torch thread, as a Ray worker with
< 2 CPUs gets) on the same config, data and steps. Wall time is end to end (prepare cache hit, MLflow run,
worker start-up, training, final evaluation and logging; for Ray also the worker group and the gloo
process group). Training steps/s is the steady-state rate of the training steps alone, from the trainer's
own rate lines (the plain trainer's `log` hook; the Ray workers' stdout files). Steps/s with evaluations
runs from the first to the last evaluation (the `on_eval` hook for the plain trainer, timestamps of the
`valid_loss` metric in MLflow for Ray): it adds the evaluations, checkpoint writes and, for Ray,
`report` + checkpoint persistence + MLflow logging. With 2 workers each step is 2 shards of
`batch_size` examples (gloo all-reduce of the gradients).
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "cluster" / "configs" / "sweeps" / "smoke.yaml"
# the same tiny run everywhere: evaluations at 20, 40, 60; a rate logged every 5 steps
TRAIN = {"model": "escm", "model_overrides": {"flavour": "tiny"}, "device": "cpu", "seed": 0, "batch_size": 8,
         "max_steps": 60, "eval_every": 20, "log_every": 5, "warmup": 20, "lr_factor": 2.0,
         "eval_generate": 1, "num_samples": 1}
STEP_LINE = re.compile(r"\bstep (\d+) epoch \d+ loss \S+ lr \S+ (\d+) ex/s")


def _with_evals(points: list[tuple[int, float]]) -> float:
    """Steps per second from the first to the last evaluation; points = [(step, seconds)]."""
    (s0, t0), (s1, t1) = min(points), max(points)
    return (s1 - s0) / max(t1 - t0, 1e-9)


def _between_evals(log_text: str, examples_per_step: int) -> float | None:
    """Median steps/s of the trainer's logged windows that hold no evaluation and are not the first.

    The trainer logs `step N ... R ex/s` every `log_every` steps, R measured since the previous line; the
    window after an evaluation step (and the first, warm-up one) also holds that work: left out."""
    rates = [int(r) / examples_per_step for step, r in STEP_LINE.findall(log_text)
             if int(step) > TRAIN["log_every"] and (int(step) - TRAIN["log_every"]) % TRAIN["eval_every"]]
    return statistics.median(rates) if rates else None


def plain(train: dict) -> dict:
    """The yardstick: Trainer(...).train() in this process, 1 torch thread."""
    from trainers.config import TrainConfig
    from trainers.data.prepare import prepare
    from trainers.loop import Trainer

    cfg = TrainConfig.model_validate(train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    evals: list[tuple[int, float]] = []
    lines: list[str] = []
    try:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, prepare(cfg.data), log=lines.append,
                          on_eval=lambda m, p: evals.append((int(m["step"]), time.perf_counter())))
        result = trainer.train()
        wall = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"run": "plain Trainer (1 thread)", "workers": 1, "steps": result["step"], "wall_s": wall,
            "steps_per_s": _between_evals("\n".join(lines), cfg.batch_size),
            "with_evals_steps_per_s": _with_evals(evals)}


def _worker_logs(logs: Path, since: dict[Path, int] | None = None) -> tuple[dict[Path, int], str]:
    """Sizes of the Ray workers' stdout files, and what was appended to them after `since`."""
    sizes = {f: f.stat().st_size for f in logs.glob("worker-*.out")}
    new = [f.read_bytes()[(since or {}).get(f, 0):].decode(errors="replace") for f in sizes] if since else []
    return sizes, "\n".join(new)


def ray_train(train: dict, workers: int, tmp: Path, uri: str, logs: Path) -> dict:
    """The same run through `cluster.distributed.ddp.run_train` (TorchTrainer, gloo when workers > 1)."""
    from cluster.distributed.ddp import RayTrainConfig, run_train
    from cluster.tracking.runs import client

    cfg = RayTrainConfig.model_validate({
        "name": f"bench-{workers}w", "storage_path": str(tmp / "ray"),
        "train": {**train, "out_dir": str(tmp / f"ray-{workers}w")},
        "scaling": {"workers": workers, "cpus_per_worker": 0.9},
        "tracking": {"uri": uri, "state_dir": str(tmp / "mlflow"), "experiment": "bench-ray-train",
                     "log_model": False}})
    before, _ = _worker_logs(logs)
    result = run_train(cfg)
    _, printed = _worker_logs(logs, before)
    history = client(uri).get_metric_history(result["run_id"], "valid_loss")
    evals = [(int(m.step), m.timestamp / 1000) for m in history]
    return {"run": f"Ray TorchTrainer, {workers} worker{'s (gloo DDP)' if workers > 1 else ''}",
            "workers": workers, "steps": int(result["metrics"]["step"]), "wall_s": result["wall_s"],
            "steps_per_s": _between_evals(printed, train["batch_size"] * workers),
            "with_evals_steps_per_s": _with_evals(evals)}


def sweep(tmp: Path, uri: str) -> dict:
    """The smoke sweep (cluster/configs/sweeps/smoke.yaml) as `edp sweep` runs it, and its trials run one
    after the other by the plain Trainer (the yardstick: no Ray, no MLflow)."""
    from cluster.distributed.tuning import load_sweep, run_sweep

    cfg = load_sweep(SMOKE, [f"base.data.cache_dir={tmp / 'prepared'}", f"storage_path={tmp / 'ray'}",
                             f"work_dir={tmp / 'sweeps'}", f"tracking.uri={uri}",
                             f"tracking.state_dir={tmp / 'mlflow'}", "tracking.experiment=bench-smoke"])
    serial = sum(plain(cfg.trial_config(g["variant"], g["seed"], {}, str(tmp / "serial" / g["variant"]))
                       .model_dump())["wall_s"] for g in cfg.grid())
    summary = run_sweep(cfg)
    if summary["errors"]:
        raise RuntimeError(f"smoke sweep failed: {summary['errors']}")
    return {"trials": summary["trials"], "wall_s": summary["wall_s"],
            "trials_per_min": summary["trials"] / summary["wall_s"] * 60,
            "serial_plain_s": serial, "max_steps": cfg.base["max_steps"],
            "concurrent": cfg.max_concurrent_trials, "cpu_per_trial": cfg.resources.cpu,
            "variants": [v.name for v in cfg.variants]}


def run() -> dict:
    import ray

    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="edp-bench-sweep-") as d:
        tmp = Path(d)
        uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
        (tmp / "mlflow").mkdir()
        train = {**TRAIN, "data": {"source": "sample", "cache_dir": str(tmp / "prepared")}}
        prepare(load_config(DataConfig, **train["data"]))  # cold parse once, outside every timing
        rows = [plain({**train, "out_dir": str(tmp / "plain")})]
        t0 = time.perf_counter()
        ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - t0
        logs = Path(ctx.address_info["session_dir"]) / "logs"
        try:
            rows += [ray_train(train, w, tmp, uri, logs) for w in (1, 2)]
            smoke = sweep(tmp, uri)
        finally:
            ray.shutdown()
    load.append(os.getloadavg()[0])
    base = rows[0]
    for r in rows:
        r["wall_vs_plain"] = r["wall_s"] / base["wall_s"]
        r["with_evals_vs_plain"] = r["with_evals_steps_per_s"] / base["with_evals_steps_per_s"]
        if r["steps_per_s"] and base["steps_per_s"]:
            r["examples_per_s"] = r["steps_per_s"] * TRAIN["batch_size"] * r["workers"]
            r["vs_plain"] = r["steps_per_s"] / base["steps_per_s"]
    return {"train": rows, "sweep": smoke, "ray_init_s": ray_init_s, "load": load}


def _x(value: float | None, fmt: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


def as_markdown(r: dict) -> str:
    t, s = TRAIN, r["sweep"]
    plain, one, two = r["train"]
    lines = [
        f"Same run everywhere: tiny ESCM on the embedded sample, batch {t['batch_size']} per worker, "
        f"{t['max_steps']} steps, evaluation every {t['eval_every']}; Ray workers 0.9 CPU each. "
        "*Training steps/s*: median of the trainer's own rate lines (every "
        f"{t['log_every']} steps) over windows without an evaluation; *with evaluations*: the rate "
        f"from the first to the last evaluation. Load average {r['load'][0]:.1f} at start, "
        f"{r['load'][1]:.1f} at end (machine shared with other work: expect noise).", "",
        "| run | wall s | vs plain | training steps/s | examples/s | vs plain "
        "| steps/s with evaluations | vs plain |", "|---|---|---|---|---|---|---|---|"]
    for x in r["train"]:
        lines.append(f"| {x['run']} | {x['wall_s']:.1f} | {x['wall_vs_plain']:.2f}x "
                     f"| {_x(x['steps_per_s'])} | {_x(x.get('examples_per_s'), '.0f')} "
                     f"| {_x(x.get('vs_plain'), '.2f', 'x')} | {x['with_evals_steps_per_s']:.1f} "
                     f"| {x['with_evals_vs_plain']:.2f}x |")
    per_eval = [(1 / x["with_evals_steps_per_s"] - 1 / x["steps_per_s"]) * t["eval_every"]
                if x["steps_per_s"] else None for x in (plain, one)]
    step_overhead = None if one.get("vs_plain") is None else 1 / one["vs_plain"] - 1
    scaling = (two["examples_per_s"] / one["examples_per_s"]
               if "examples_per_s" in one and "examples_per_s" in two else None)
    lines += [
        "", f"Ray Train overhead, 1 worker vs plain on the same steps: training steps "
        f"{_x(step_overhead, '+.0%')} (target < 15% at steady state, issue 5); with an evaluation "
        f"every {t['eval_every']} steps {1 / one['with_evals_vs_plain'] - 1:+.0%}: an evaluation costs "
        f"{_x(per_eval[1], '.2f', ' s')} under Ray vs {_x(per_eval[0], '.2f', ' s')} plain (Ray adds "
        "`report` + checkpoint persistence + MLflow logging); end to end "
        f"{one['wall_vs_plain']:.1f}x the plain wall time (worker group start-up; `ray.init` itself, "
        f"{r['ray_init_s']:.1f} s, not counted). 2 vs 1 worker: {_x(scaling, '.2f', 'x')} "
        "the training examples/s (ideal 2x with 2 free cores).", "",
        "| sweep | trials | wall s | trials/min "
        "| yardstick: same trials, plain Trainer, one after the other |",
        "|---|---|---|---|---|",
        f"| smoke (`cluster/configs/sweeps/smoke.yaml`: {' + '.join(s['variants'])}, tiny, "
        f"{s['max_steps']} steps, {s['concurrent']} concurrent at {s['cpu_per_trial']} CPU) "
        f"| {s['trials']} | {s['wall_s']:.1f} | {s['trials_per_min']:.1f} "
        f"| {s['serial_plain_s']:.1f} s (sweep = {s['wall_s'] / s['serial_plain_s']:.1f}x) |", "",
        "Sweep wall time is end to end (`run_sweep`: data check, parent run, Tune trials with nested "
        "MLflow child runs, their plots and models, the ablation table); Ray was already up."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(as_markdown(run()))
