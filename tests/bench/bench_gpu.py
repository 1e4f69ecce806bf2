"""`make bench-gpu`: the GPU figures (issue 16), written into BENCHMARKS.md's "GPU" section.

1. Training step: ms/step and examples/s of the Transformer, ESCM and IAMM (paper-sized, the trainer's own
   `Trainer.train_step`: bf16 autocast, fused Adam) at batch 16 and at the largest batch that fits (doubling
   from 16 until CUDA is out of memory or no length bucket holds that many examples), eager vs
   `torch.compile` (Inductor) vs CUDA graphs (torch.compile's `cudagraphs` backend). One batch of the most populated
   length bucket, repeated, so the compiled modes see one shape; the first (warm-up) steps, compilation
   included, are timed apart.
2. Full runs: ESCM on the data to the recipe's end (TrainConfig defaults: 13,500 steps, evaluation every 500
   steps, early stop), wall time and final valid metrics; paper: 2,734 s on a T4, target <= 60 s. IAMM the
   same, target <= 120 s. Wall time from building the Trainer (data to the device) to its final metrics.
3. Ablation grid: cluster/configs/sweeps/escm-ablation.yaml (6 variants x 3 seeds) through Ray Tune
   (`run_sweep`, MLflow on a throwaway sqlite store), every trial at 1/6 GPU so 6 run at once on the one GPU,
   `--grid-steps` steps each; the full-recipe wall time is projected linearly (an upper bound: the
   projection also multiplies start-up). Target: 6 x 3 to the recipe's end in <= 10 minutes.
4. Serving: ESCM (paper-sized, one training step, so every reply runs to the 30-token cap) served as
   `edp serve` serves it (registry alias, Serve config cluster/configs/serve/responders.yaml, app escm) by ONE
   replica holding the GPU; open-loop load of `--rate` requests/s (100) for `--serve-seconds`, latency client side.
   Target: p99 <= 60 ms.

On a GPU machine (one H100/H200; sized for at most 8 minutes with the ED data already prepared by `edp data
prepare`, not yet timed on one: no GPU was lent when it was written; `--only` splits it):

    make clean-venv && make bench-gpu TORCH_INDEX=https://download.pytorch.org/whl/cu130 \\
        BENCH_ARGS="--data /path/to/ed"
    # or with the repo and a .venv holding a CUDA torch already there (no network needed):
    .venv/bin/python -m tests.bench.bench_gpu --data /path/to/ed --out BENCHMARKS.md

`--only steps,full,grid,serve` runs a subset (the section is rewritten with what ran). `--quick` runs every
part on the CPU with tiny models and a few steps (2 grid trials, 2 s of serving) and writes to a temporary
file unless `--out` names another: `make test` runs it that way (tests/unit/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from trainers.models.batch import Batch

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "cluster" / "configs" / "sweeps" / "escm-ablation.yaml"
MODELS = ("transformer", "escm", "iamm")
MODES = ("eager", "compile", "cudagraphs")
TARGET_S = {"escm": 60, "iamm": 120}
SERVE_MODEL = "escm-bench-gpu"


@dataclass
class Sizes:
    """What one run measures; `quick` shrinks every part to seconds on a CPU."""

    flavour: str = "paper"
    warmup: int = 5
    steps: int = 30
    max_batch: int = 4096
    recipe: dict = field(default_factory=dict)          # TrainConfig overrides of the full runs ({}: the recipe)
    grid_steps: int = 1000
    grid_trials: int | None = None                      # None: the whole grid
    grid_gpu: float = 1 / 6
    rate: float = 100.0
    serve_seconds: float = 20.0


QUICK = Sizes(flavour="tiny", warmup=1, steps=3, max_batch=32, grid_steps=4, grid_trials=2, rate=10.0,
              serve_seconds=2.0, recipe={"max_steps": 8, "eval_every": 4, "eval_generate": 4, "num_samples": 2,
                                         "batch_size": 8, "warmup": 20})


# ---- the only places that reach past the trainers' public API (Trainer, TrainConfig) ----------------------


def with_mode(trainer, mode: str):
    """Run `trainer.train_step` eager, under torch.compile (Inductor), or as CUDA graphs (torch.compile's
    `cudagraphs` backend: the captured forward and backward replayed, no code generation, so it compiles in
    seconds): replaces the module the step calls (`Trainer.model`) by a compiled `Trainer.raw_model`."""
    trainer.model = trainer.raw_model
    if mode != "eager":
        torch._dynamo.reset()
        trainer.model = torch.compile(trainer.raw_model, dynamic=False,
                                      backend="cudagraphs" if mode == "cudagraphs" else "inductor")
    return trainer


def one_batch(trainer, batch_size: int) -> Batch | None:
    """`batch_size` training examples of the most populated length bucket as one device batch (None when no
    bucket holds that many)."""
    plan = [p for p in trainer.train_data.plan(batch_size, seed=0, epoch=0) if len(p[1]) == batch_size]
    if not plan:
        return None
    counts: dict[int, int] = {}
    for k, _ in plan:
        counts[k] = counts.get(k, 0) + 1
    k = max(counts, key=counts.get)
    return trainer.train_data.rows_batch(k, next(rows for b, rows in plan if b == k))


# ---- 1. training step --------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(trainer, batch: Batch, warmup: int, steps: int) -> dict:
    """Seconds of the warm-up steps (compilation included) and ms per step after them."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(batch)
    _sync(trainer.device)
    t1 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    _sync(trainer.device)
    return {"warmup_s": t1 - t0, "ms_per_step": (time.perf_counter() - t1) / steps * 1e3}


def largest_batch(trainer, sizes: Sizes) -> int:
    """The largest batch (16 doubled) whose eager step runs without running out of memory."""
    fits, b = 16, 32
    while b <= sizes.max_batch:
        batch = one_batch(trainer, b)
        if batch is None:
            break
        try:
            time_steps(trainer, batch, 1, 1)
        except torch.OutOfMemoryError:
            break
        finally:
            del batch
            if trainer.device.type == "cuda":
                torch.cuda.empty_cache()
        fits, b = b, b * 2
    return fits


def step_speed(prepared, device: str, sizes: Sizes) -> list[dict]:
    from trainers.config import TrainConfig, load_config
    from trainers.loop import Trainer

    modes = MODES if torch.device(device).type == "cuda" else ("eager",)  # compile applies on CUDA only
    rows = []
    for name in MODELS:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(TrainConfig, model=name, out_dir=out, device=device,
                              model_overrides={"flavour": sizes.flavour}, data=prepared_data(prepared))
            trainer = Trainer(cfg, prepared, log=lambda s: None)
            for bs in dict.fromkeys((16, largest_batch(with_mode(trainer, "eager"), sizes))):
                batch = one_batch(trainer, bs)
                if batch is None:
                    raise RuntimeError(f"no length bucket of {prepared.manifest['source']} holds {bs} examples")
                for mode in modes:
                    try:
                        t = time_steps(with_mode(trainer, mode), batch, sizes.warmup, sizes.steps)
                    except torch.OutOfMemoryError:
                        t = None
                    rows.append({"model": name, "batch": bs, "mode": mode, **(t or {"oom": True}),
                                 **({"examples_per_s": bs / t["ms_per_step"] * 1e3} if t else {})})
            del trainer
    return rows


# ---- 2. full runs ------------------------------------------------------------------------------------------


def prepared_data(prepared) -> dict:
    return {"source": prepared.manifest["source"], "cache_dir": str(prepared.path.parent)}


def full_run(prepared, model: str, device: str, sizes: Sizes) -> dict:
    """`Trainer(...).train()` with the recipe (TrainConfig defaults) on `prepared`."""
    from trainers.config import TrainConfig, load_config
    from trainers.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(TrainConfig, model=model, out_dir=out, device=device, data=prepared_data(prepared),
                          model_overrides={"flavour": sizes.flavour}, **sizes.recipe)
        t0 = time.perf_counter()
        result = Trainer(cfg, prepared, log=lambda s: None).train()
        wall = time.perf_counter() - t0
    final = result["final"]
    return {"model": model, "steps": result["step"], "max_steps": cfg.max_steps, "wall_s": wall, "final": final}


# ---- 3. ablation grid through Ray Tune ---------------------------------------------------------------------


def grid(prepared, device: str, sizes: Sizes, tmp: Path) -> dict:
    from cluster.distributed.tuning import SweepConfig, load_sweep, run_sweep
    from trainers.config import TrainConfig

    gpu = sizes.grid_gpu if torch.device(device).type == "cuda" else 0
    per_device = round(1 / gpu) if gpu else 2
    cpu = max(0.5, min(2.0, ((os.cpu_count() or 2) - 1) / per_device)) if gpu else 0.9
    data = prepared_data(prepared)
    cfg = load_sweep(GRID, [f"base.data.source={data['source']}", f"base.data.cache_dir={data['cache_dir']}",
                            f"base.device={device}", f"base.max_steps={sizes.grid_steps}",
                            f"base.eval_every={sizes.grid_steps}", f"base.model_overrides.flavour={sizes.flavour}",
                            f"resources.gpu={gpu}", f"resources.cpu={cpu}", f"max_concurrent_trials={per_device}",
                            f"storage_path={tmp / 'ray'}", f"work_dir={tmp / 'sweeps'}",
                            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"tracking.state_dir={tmp / 'mlflow'}",
                            "tracking.experiment=bench-gpu-grid", "tracking.log_model=false"])
    if sizes.grid_trials:  # --quick: the first variants, one seed
        cfg = SweepConfig.model_validate({**cfg.model_dump(), "seeds": cfg.seeds[:1],
                                          "variants": [v.model_dump() for v in cfg.variants[:sizes.grid_trials]]})
    summary = run_sweep(cfg)
    if summary["errors"]:
        raise RuntimeError(f"grid failed: {summary['errors']}")
    recipe = TrainConfig().max_steps
    return {"trials": summary["trials"], "variants": len(cfg.variants), "seeds": len(cfg.seeds),
            "steps": sizes.grid_steps, "wall_s": summary["wall_s"], "gpu": gpu, "cpu": cpu,
            "concurrent": per_device, "projected_recipe_s": summary["wall_s"] * recipe / sizes.grid_steps,
            "recipe_steps": recipe}


# ---- 4. serving --------------------------------------------------------------------------------------------


async def open_loop(url: str, rate: float, seconds: float) -> dict:
    """POST /v1/respond at a fixed `rate` (requests start on schedule, whatever is in flight)."""
    import httpx

    from tests.bench.bench_serve import timed_request

    latencies: list[float] = []
    errors = 0

    async def one(client, i: int) -> None:
        nonlocal errors
        seconds = await timed_request(client, i)
        if seconds is None:
            errors += 1
        else:
            latencies.append(seconds)

    n = max(1, int(rate * seconds))
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits, trust_env=False) as client:
        t0, tasks = time.perf_counter(), []
        for i in range(n):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, i)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ms = np.asarray(latencies or [float("nan")]) * 1e3
    return {"requests": n, "errors": errors, "offered_per_s": rate, "served_per_s": len(latencies) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def serving(prepared, device: str, sizes: Sizes, tmp: Path) -> dict:
    from cluster.local import serve as serve_local
    from cluster.local.processes import free_port
    from cluster.local.services import start_mlflow
    from tests.integration.registry_models import register_champion, train_tiny

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    checkpoint, _ = train_tiny(prepared, tmp / "model", max_steps=1, max_len=30, flavour=sizes.flavour,
                               source=prepared.manifest["source"])
    mlflow = start_mlflow(tmp / "mlflow-serve")
    try:
        register_champion(mlflow.url, checkpoint, SERVE_MODEL, 0.0, "bench-gpu-serve")
        spec = serve_local.from_config(None, SERVE_MODEL, "champion",
                                       {"mlflow_tracking_uri": mlflow.url, "device": device})
        gpus = {"num_gpus": 1} if torch.device(device).type == "cuda" else {}
        options = {k: v for k, v in spec.deployment_options.items() if k != "autoscaling_config"}
        spec.deployment_options = {**options, "num_replicas": 1, "ray_actor_options": {"num_cpus": 1, **gpus}}
        url = serve_local.run(spec, port=free_port())
        asyncio.run(open_loop(url, sizes.rate, min(2.0, sizes.serve_seconds)))  # warm the proxy and replica
        result = asyncio.run(open_loop(url, sizes.rate, sizes.serve_seconds))
    finally:
        mlflow.stop()
    return {**result, "max_len": 30, "flavour": sizes.flavour}


# ---- report ------------------------------------------------------------------------------------------------


def machine(device: str) -> str:
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        what = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = "CPU only"
    return f"{what}, {os.cpu_count()} CPU cores, torch {torch.__version__}, Python {sys.version.split()[0]}"


def as_markdown(r: dict) -> str:
    lines = ["## GPU", "", f"Generated by `make bench-gpu` (tests/bench/bench_gpu.py{' --quick' if r['quick'] else ''}"
             f") on {r['machine']}; data: {r['data']} ({r['vocab']:,} words). Total {r['total_s']:.0f} s.", ""]
    if "steps" in r:
        lines += ["### Training step", "", "| model | batch | mode | ms/step | examples/s | warm-up s (compile) |",
                  "|---|---|---|---|---|---|"]
        for x in r["steps"]:
            if x.get("oom"):
                lines.append(f"| {x['model']} | {x['batch']} | {x['mode']} | out of memory | | |")
            else:
                lines.append(f"| {x['model']} | {x['batch']} | {x['mode']} | {x['ms_per_step']:.2f} "
                             f"| {x['examples_per_s']:,.0f} | {x['warmup_s']:.1f} |")
        lines.append("")
    if "full" in r:
        lines += ["### Full runs to the recipe's end", "",
                  "| model | steps (of max) | wall s | target s | valid acc | valid ppl | ppl_token | dist-1 "
                  "| dist-2 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for x in r["full"]:
            f = x["final"]
            lines.append(f"| {x['model']} | {x['steps']:,} ({x['max_steps']:,}) | {x['wall_s']:.0f} "
                         f"| {TARGET_S.get(x['model'], '')} | {f.get('valid_acc', math.nan):.4f} "
                         f"| {f.get('valid_ppl', math.nan):.2f} | {f.get('valid_ppl_token', math.nan):.2f} "
                         f"| {f.get('valid_dist_1', math.nan):.3f} "
                         f"| {f.get('valid_dist_2', math.nan):.3f} |")
        lines += ["", "Paper (ESCM): 2,734 s on a T4 to convergence.", ""]
    if "grid" in r:
        g = r["grid"]
        lines += ["### ESCM ablation grid (Ray Tune, trials packed on one device)", "",
                  f"{g['variants']} variants x {g['seeds']} seeds = {g['trials']} trials, {g['steps']:,} steps each, "
                  f"{g['concurrent']} at once ({g['gpu']:.3f} GPU, {g['cpu']:.1f} CPU per trial): "
                  f"**{g['wall_s']:.0f} s**; to the recipe's {g['recipe_steps']:,} steps projected "
                  f"{g['projected_recipe_s'] / 60:.1f} min (linear in steps; target <= 10 min).", ""]
    if "serve" in r:
        s = r["serve"]
        lines += ["### Serving (one replica, open-loop load)", "",
                  f"{s['flavour']} ESCM, {s['max_len']}-token replies: {s['offered_per_s']:.0f} requests/s offered "
                  f"for {s['requests']} requests, {s['served_per_s']:.1f}/s served, {s['errors']} errors; "
                  f"**p50 {s['p50_ms']:.0f} ms, p99 {s['p99_ms']:.0f} ms** (target p99 <= 60 ms).", ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace the `## GPU` section of `path` (up to the next `## ` heading), or append one."""
    old = path.read_text() if path.exists() else ""
    m = re.search(r"^## GPU\b.*?(?=^## |\Z)", old, re.MULTILINE | re.DOTALL)
    new = old[:m.start()] + text + "\n" + old[m.end():] if m else old.rstrip("\n") + ("\n\n" if old else "") + text
    path.write_text(new.rstrip("\n") + "\n")


def run(data: str, device: str, sizes: Sizes, only: set[str], quick: bool) -> dict:
    from trainers.config import DataConfig, load_config
    from trainers.data.prepare import prepare

    t0 = time.perf_counter()
    prepared = prepare(load_config(DataConfig, source=data, n_process=min(8, os.cpu_count() or 1)))
    r = {"quick": quick, "machine": machine(device), "data": data, "vocab": len(prepared.vocab)}
    print(f"bench-gpu: prepared {data} in {time.perf_counter() - t0:.0f} s", flush=True)

    def part(key: str, fn, *args):
        if key in only:
            t = time.perf_counter()
            r[key] = fn(*args)
            print(f"bench-gpu: {key} in {time.perf_counter() - t:.0f} s", flush=True)

    part("steps", step_speed, prepared, device, sizes)
    part("full", lambda: [full_run(prepared, m, device, sizes) for m in ("escm", "iamm")])
    if only & {"grid", "serve"}:
        import ray
        from ray import serve

        gpus = {"num_gpus": 1} if torch.device(device).type == "cuda" else {}
        if ray.is_initialized():  # e.g. a test session's Ray: this bench wants its own
            ray.shutdown()
        ray.init(address="local", num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False, **gpus)
        try:
            with tempfile.TemporaryDirectory(prefix="edp-bench-gpu-") as d:
                part("grid", grid, prepared, device, sizes, Path(d))
                part("serve", serving, prepared, device, sizes, Path(d))
        finally:
            if "serve" in only:
                serve.shutdown()
            ray.shutdown()
    r["total_s"] = time.perf_counter() - t0
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", default=os.environ.get("ED_DATA_DIR") or "sample")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="file whose `## GPU` section is rewritten (default BENCHMARKS.md; "
                                                 "with --quick a temporary file)")
    p.add_argument("--only", default="steps,full,grid,serve")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a CPU check of every part")
    p.add_argument("--grid-steps", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="serving load, requests/s")
    p.add_argument("--serve-seconds", type=float, default=None)
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in ("grid_steps", "rate", "serve_seconds") if getattr(args, k) is not None}
    sizes = replace(QUICK if args.quick else Sizes(), **given)
    out = Path(args.out or (tempfile.mkstemp(prefix="bench-gpu-", suffix=".md")[1] if args.quick else
                            ROOT / "BENCHMARKS.md"))
    if args.quick and out.resolve() == (ROOT / "BENCHMARKS.md").resolve():
        p.error("--quick figures never go into BENCHMARKS.md")
    if args.quick:
        torch.set_num_threads(1)  # a smoke check of every part: on a shared CPU one thread is the fastest
    result = run(args.data, args.device, sizes, set(args.only.split(",")), args.quick)
    write_section(out, as_markdown(result))
    print(f"bench-gpu: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
