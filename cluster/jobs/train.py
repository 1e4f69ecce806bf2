"""`python -m cluster.jobs.train`: one distributed (DDP) training run on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m cluster.jobs.train --model escm --data s3://ed/prepared --workers 4 --gpus-per-worker 1

Parse -> `build_config` (a RayTrainConfig) -> `run_train` (TorchTrainer, MLflow run) -> print the final metrics
-> close.
A YAML `--config` holds a RayTrainConfig (name, train, scaling, storage_path, max_failures, tracking, resume).
The training flags are `python -m trainers.train`'s (`trainers.train.TRAIN_FLAGS`, set under `train.`); this
module adds the Ray Train flags (`RAY_FLAGS`). `edp train` parses with this same parser.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.jobs.runner import run_job
from trainers import train as train_entry
from trainers.config import load_config
from trainers.train import Flag

RAY_FLAGS = (
    Flag("--name", "name", "run name (Ray storage folder, MLflow run name)"),
    Flag("--workers", "scaling.workers", "DDP workers", type=int),
    Flag("--gpus-per-worker", "scaling.gpus_per_worker", type=float),
    Flag("--cpus-per-worker", "scaling.cpus_per_worker", type=float),
    Flag("--storage-path", "storage_path", "Ray checkpoints: local dir or s3://bucket/prefix"),
    Flag("--max-failures", "max_failures", type=int),
    Flag("--tracking-uri", "tracking.uri", "MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)"),
)


def parser(prog: str = "python -m cluster.jobs.train", description: str | None = __doc__) -> argparse.ArgumentParser:
    """`python -m trainers.train`'s parser (a RayTrainConfig YAML, fields under `train.`) plus `RAY_FLAGS`."""
    p = train_entry.parser(
        prog, description, config_help="YAML RayTrainConfig",
        set_help="override any field (dotted, e.g. train.lr_factor=2), repeatable",
        helps={"--out": "local working directory of rank 0 (checkpoints, samples)",
               "--device": "auto | cpu | cuda[:N] (with GPUs per worker: each worker's own GPU)",
               "--no-resume": "start afresh even if a run of this name is stored"})
    train_entry.add_flags(p.add_argument_group("Ray Train"), RAY_FLAGS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def build_config(config: str | Path | None = None, overrides: list[str] | None = None, **fields):
    """The RayTrainConfig from a YAML file, its fields (None: not given; `train={...}` TrainConfig fields) and
    `--set` overrides, in that order."""
    from cluster.distributed.ddp import RayTrainConfig  # Ray Train, torch: only once a run is built

    return load_config(RayTrainConfig, config, overrides, **fields)


def config_from_args(args: argparse.Namespace):
    return build_config(args.config, args.overrides, train=train_entry.flag_fields(args) or None,
                        resume=False if args.no_resume else None, **train_entry.flag_fields(args, RAY_FLAGS))


def run(cfg) -> int:
    """Train, then print the run id, checkpoint, wall time and final metrics as one JSON line."""
    from cluster.distributed.ddp import run_train  # Ray: only when the job runs

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
