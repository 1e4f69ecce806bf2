"""`python -m cluster.jobs.sweep --config cluster/configs/sweeps/smoke.yaml`: a sweep as a Ray job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m cluster.jobs.sweep --config cluster/configs/sweeps/escm-ablation.yaml --set seeds=[0]

Parse (the sweep file is validated before Ray starts) -> run (ray.init() attaches to the job's
cluster; outside a job it starts a local instance) -> print the ablation table -> close.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cluster.distributed.placement import check_placement, plan_lines
from cluster.distributed.tuning import load_sweep, run_sweep
from cluster.jobs.runner import run_job
from cluster.tracking.reports import table_markdown


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cluster.jobs.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep YAML (cluster/configs/sweeps/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a sweep field (dotted), e.g. base.max_steps=100; repeatable")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials and their resources, check they fit the cluster at RAY_ADDRESS "
                        "(when set), and exit without running anything")
    return p.parse_args(argv)


def dry_run(cfg) -> int:
    """Print the plan and check placement: on the cluster at RAY_ADDRESS when set, else on the node types in
    EDP_NODE_TYPES when set; exit 2 when trials can never run."""
    print("\n".join(plan_lines(cfg)))
    if not os.environ.get("RAY_ADDRESS"):
        if os.environ.get("EDP_NODE_TYPES"):  # a chart's pod before its cluster exists: check its node types
            print(check_placement(cfg, []) + " (EDP_NODE_TYPES)")
        else:
            print("not attached to a cluster (RAY_ADDRESS unset): placement not checked")
        return 0
    import ray  # Ray only to attach for the placement check

    ray.init(address=os.environ["RAY_ADDRESS"], include_dashboard=False, log_to_driver=False)
    print(check_placement(cfg, ray.nodes()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def run(cfg) -> int:
        summary = run_sweep(cfg)
        print(table_markdown(summary["rows"], cfg.paper))
        print(json.dumps({k: summary[k] for k in ("parent_run_id", "best_run_id", "trials", "errors", "wall_s")}))
        return 1 if summary["errors"] else 0

    return run_job(lambda: load_sweep(args.config, args.overrides), dry_run if args.dry_run else run)


if __name__ == "__main__":
    sys.exit(main())
