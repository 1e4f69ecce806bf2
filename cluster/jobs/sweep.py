"""`python -m cluster.jobs.sweep --config cluster/configs/sweeps/smoke.yaml`: a sweep as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m cluster.jobs.sweep --config cluster/configs/sweeps/escm-ablation.yaml --set seeds=[0]

Parse (the sweep file is validated before Ray starts) -> run (ray.init() attaches to the job's
cluster; outside a job it starts a local instance) -> print the ablation table -> close.
"""

from __future__ import annotations

import argparse
import json
import sys

from cluster.jobs import run_job


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.jobs.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (cluster/configs/sweeps/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field (dotted), e.g. base.max_steps=100; repeatable")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cluster.mlflow.reports import table_markdown
    from cluster.ray.tune import load_sweep, run_sweep

    def run(cfg) -> int:
        summary = run_sweep(cfg)
        print(table_markdown(summary["rows"]))
        print(json.dumps({k: summary[k] for k in ("parent_run_id", "best_run_id", "trials", "errors", "wall_s")}))
        return 1 if summary["errors"] else 0

    return run_job(lambda: load_sweep(args.config, args.overrides), run)


if __name__ == "__main__":
    sys.exit(main())
