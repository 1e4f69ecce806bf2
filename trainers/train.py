"""`python -m trainers.train`: one training run with plain PyTorch (no Ray, no MLflow).

    python -m trainers.train --model escm --data ../shared/data/ed --device cuda --out runs/escm
    python -m trainers.train --config run.yaml --set max_steps=2000 --set model_overrides.no_vr=true

Parse -> prepare data (cached) -> build the trainer -> resume from the newest checkpoint in --out
(unless --no-resume) -> train -> metrics.json and samples.jsonl in --out.
"""

from __future__ import annotations

import argparse
import sys

from trainers.config import ConfigError, load_config
from trainers.data.records import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainers.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML TrainConfig")
    p.add_argument("--model", choices=["transformer", "escm", "iamm"])
    p.add_argument("--data", help="dataset source: 'sample', dir, .tar.gz or s3://")
    p.add_argument("--device", help="auto | cpu | cuda[:N]")
    p.add_argument("--out", help="output directory (checkpoints, metrics.json, samples.jsonl)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if --out has checkpoints")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field (dotted), repeatable")
    return p.parse_args(argv)


def build_config(config: str | None = None, overrides: list[str] | None = None, **fields):
    """The run's TrainConfig from a YAML file, `--set` overrides and named fields (None: not given); `edp train
    --local` builds it here too."""
    from trainers.config import TrainConfig

    data = {"source": fields.pop("data")} if fields.get("data") else None
    fields.pop("data", None)
    return load_config(TrainConfig, config, overrides, data=data, **fields)


def config_from_args(args: argparse.Namespace):
    return build_config(args.config, args.overrides, model=args.model, data=args.data, device=args.device,
                        out_dir=args.out, max_steps=args.max_steps, batch_size=args.batch_size,
                        eval_every=args.eval_every, seed=args.seed)


def run(cfg, resume: bool = True) -> dict:
    """Prepare the data (cached), build the Trainer, resume from the newest checkpoint in cfg.out_dir (unless
    `resume` is False), train; returns the trainer's result."""
    from trainers.data.prepare import prepare
    from trainers.loop import Trainer

    trainer = Trainer(cfg, prepare(cfg.data))
    if resume:
        trainer.resume()
    return trainer.train()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(config_from_args(args), resume=not args.no_resume)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print({k: round(v, 4) for k, v in result["final"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
