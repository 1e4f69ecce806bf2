"""`python -m cluster.jobs.train`: one distributed (DDP) training run on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m cluster.jobs.train --model escm --data s3://ed/prepared --workers 4 --gpus-per-worker 1

Parse -> `build_config` (a RayTrainConfig) -> `run_train` (TorchTrainer, MLflow run) -> print the final metrics
-> close.
A YAML `--config` holds a RayTrainConfig (name, train, scaling, storage_path, max_failures, tracking, resume).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.jobs import run_job
from trainers.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML RayTrainConfig")
    p.add_argument("--name", help="run name (Ray storage folder, MLflow run name)")
    p.add_argument("--model", choices=["transformer", "escm", "iamm"])
    p.add_argument("--data", help="dataset source: 'sample', dir, .tar.gz or s3://")
    p.add_argument("--out", help="local working directory of rank 0 (checkpoints, samples)")
    p.add_argument("--device", help="auto | cpu | cuda[:N] (with GPUs per worker: each worker's own GPU)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, help="DDP workers")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--storage-path", help="Ray checkpoints: local dir or s3://bucket/prefix")
    p.add_argument("--max-failures", type=int)
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if a run of this name is stored")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field (dotted, e.g. train.lr_factor=2), repeatable")
    return p.parse_args(argv)


def build_config(config: str | Path | None = None, overrides: list[str] | None = None, *, name: str | None = None,
                 model: str | None = None, data: str | None = None, out: str | Path | None = None,
                 device: str | None = None, max_steps: int | None = None, workers: int | None = None,
                 gpus_per_worker: float | None = None, cpus_per_worker: float | None = None,
                 storage_path: str | None = None, max_failures: int | None = None, tracking_uri: str | None = None,
                 resume: bool | None = None):
    """The RayTrainConfig from a YAML file, these options (None: not given) and `--set` overrides, in that order
    (`edp train` builds it here too)."""
    from cluster.distributed.ddp import RayTrainConfig

    train = {"model": model, "data": {"source": data} if data else None, "out_dir": str(out) if out else None,
             "device": device, "max_steps": max_steps}
    train = {k: v for k, v in train.items() if v is not None}
    scaling = {k: v for k, v in {"workers": workers, "gpus_per_worker": gpus_per_worker,
                                  "cpus_per_worker": cpus_per_worker}.items() if v is not None}
    return load_config(RayTrainConfig, config, overrides, name=name, train=train or None, scaling=scaling or None,
                       storage_path=storage_path, max_failures=max_failures, resume=resume,
                       tracking={"uri": tracking_uri} if tracking_uri else None)


def config_from_args(args: argparse.Namespace):
    return build_config(args.config, args.overrides, name=args.name, model=args.model, data=args.data, out=args.out,
                        device=args.device, max_steps=args.max_steps, workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                        storage_path=args.storage_path, max_failures=args.max_failures,
                        tracking_uri=args.tracking_uri, resume=False if args.no_resume else None)


def run(cfg) -> int:
    """Train, then print the run id, checkpoint, wall time and final metrics as one JSON line."""
    from cluster.distributed.ddp import run_train

    result = run_train(cfg)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
    print(json.dumps({"run_id": result["run_id"], "checkpoint": result["checkpoint"],
                      "wall_s": result["wall_s"], "metrics": metrics}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_job(lambda: config_from_args(args), run)


if __name__ == "__main__":
    sys.exit(main())
