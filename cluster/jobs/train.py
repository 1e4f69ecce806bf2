"""`python -m cluster.jobs.train`: one distributed (DDP) training run on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m cluster.jobs.train --model escm --data s3://ed/prepared --workers 4 --gpus-per-worker 1

Parse -> build `RayTrainConfig` -> `run_train` (TorchTrainer, MLflow run) -> print the final metrics -> close.
A YAML `--config` holds a RayTrainConfig (name, train, scaling, storage_path, max_failures, tracking).
"""

from __future__ import annotations

import argparse
import json
import sys

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
    p.add_argument("--max-steps", type=int)
    p.add_argument("--workers", type=int, help="DDP workers")
    p.add_argument("--gpus-per-worker", type=float)
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--storage-path", help="Ray checkpoints: local dir or s3://bucket/prefix")
    p.add_argument("--max-failures", type=int)
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field (dotted, e.g. train.lr_factor=2), repeatable")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace):
    from cluster.ray_train import RayTrainConfig

    train = {"model": args.model, "data": {"source": args.data} if args.data else None, "out_dir": args.out,
             "max_steps": args.max_steps}
    train = {k: v for k, v in train.items() if v is not None}
    scaling = {k: v for k, v in {"workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
                                  "cpus_per_worker": args.cpus_per_worker}.items() if v is not None}
    return load_config(RayTrainConfig, args.config, args.overrides, name=args.name, train=train or None,
                       scaling=scaling or None, storage_path=args.storage_path,
                       max_failures=args.max_failures,
                       tracking={"uri": args.tracking_uri} if args.tracking_uri else None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(cfg) -> int:
        from cluster.ray_train import run_train

        result = run_train(cfg)
        metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
        print(json.dumps({"run_id": result["run_id"], "checkpoint": result["checkpoint"],
                          "wall_s": result["wall_s"], "metrics": metrics}))
        return 0

    return run_job(lambda: config_from_args(args), run)


if __name__ == "__main__":
    sys.exit(main())
