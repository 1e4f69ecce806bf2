"""`python -m trainers.train`: one training run with plain PyTorch (no Ray, no MLflow).

    python -m trainers.train --model escm --data ../shared/data/ed --device cuda --out runs/escm
    python -m trainers.train --config run.yaml --set max_steps=2000 --set model_overrides.no_vr=true

Parse -> prepare data (cached) -> build the trainer -> resume from the newest checkpoint in --out
(unless --no-resume) -> train -> metrics.json and samples.jsonl in --out.

The training options (flag -> TrainConfig field) are defined once, in `TRAIN_FLAGS`: `python -m
cluster.jobs.train` and `edp train` extend `parser()` with their Ray Train flags and read the same fields with
`flag_fields`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

from trainers.config import ConfigError, TrainConfig, load_config
from trainers.data.records import DataError


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the config field (dotted) it sets."""

    flag: str
    field: str
    help: str | None = None
    type: type = str
    choices: tuple[str, ...] | None = None


TRAIN_FLAGS = (
    Flag("--model", "model", choices=("transformer", "escm", "iamm")),
    Flag("--data", "data.source", "dataset source: 'sample', dir, .tar.gz or s3://"),
    Flag("--device", "device", "auto | cpu | cuda[:N]"),
    Flag("--out", "out_dir", "output directory (checkpoints, metrics.json, samples.jsonl)"),
    Flag("--max-steps", "max_steps", type=int),
    Flag("--batch-size", "batch_size", type=int),
    Flag("--eval-every", "eval_every", type=int),
    Flag("--seed", "seed", type=int),
)


def _dest(flag: Flag) -> str:
    return flag.flag.removeprefix("--").replace("-", "_")


def add_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup, flags: tuple[Flag, ...],
              helps: dict[str, str] | None = None) -> None:
    """Add `flags` to `p`; `helps` rewords a flag's help (flag -> text)."""
    for f in flags:
        p.add_argument(f.flag, dest=_dest(f), type=f.type, choices=f.choices, help=(helps or {}).get(f.flag, f.help))


def flag_fields(args: argparse.Namespace, flags: tuple[Flag, ...] = TRAIN_FLAGS) -> dict[str, Any]:
    """The config fields the `flags` given in `args` set, as a tree (`{"data": {"source": ...}}`); flags not given
    are left out."""
    tree: dict[str, Any] = {}
    for f in flags:
        value = getattr(args, _dest(f))
        if value is None:
            continue
        *parents, leaf = f.field.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def parser(prog: str = "python -m trainers.train", description: str | None = __doc__,
           config_help: str = "YAML TrainConfig", set_help: str = "override any config field (dotted), repeatable",
           helps: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The training command line: --config, the `TRAIN_FLAGS`, --no-resume and --set. `helps` rewords a flag's
    help (flag -> text) where the run happens elsewhere (e.g. `--out` on Ray: rank 0's working directory)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help=config_help)
    add_flags(p, TRAIN_FLAGS, helps)
    p.add_argument("--no-resume", action="store_true",
                   help=(helps or {}).get("--no-resume", "start fresh even if --out has checkpoints"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def build_config(config: str | None = None, overrides: list[str] | None = None, **fields):
    """The run's TrainConfig from a YAML file, TrainConfig fields (None: not given) and `--set` overrides, in that
    order."""

    return load_config(TrainConfig, config, overrides, **fields)


def config_from_args(args: argparse.Namespace):
    return build_config(args.config, args.overrides, **flag_fields(args))


def run(cfg, resume: bool = True) -> dict:
    """Prepare the data (cached), build the Trainer, resume from the newest checkpoint in cfg.out_dir (unless
    `resume` is False), train; returns the trainer's result."""
    from trainers.data.prepare import prepare  # torch, spaCy: only when a run starts
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
