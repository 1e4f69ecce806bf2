"""Placement: what each trial of a sweep asks of the Ray cluster, checked before any trial starts.

    print("\n".join(plan_lines(cfg)))          # every grid point, its resources and the totals
    print(check_placement(cfg, ray.nodes()))   # PlacementError when a trial fits on no node (or node type)

Plain Python over `ray.nodes()` entries and the chart's EDP_NODE_TYPES: no Ray import, so a dry run and the
unit tests plan without a cluster.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from trainers.config import ConfigError

if TYPE_CHECKING:
    from cluster.distributed.tuning import SweepConfig

class PlacementError(ConfigError):
    """A sweep's trials can never be placed on the cluster it is attached to."""


def trial_bundles(cfg: SweepConfig) -> list[dict[str, float]]:
    """The resource bundles of one trial: one bundle in the trial process, or a driver + one per DDP worker.
    Each bundle must fit on a single node."""
    r = cfg.resources
    worker = {"CPU": r.cpu, **({"GPU": r.gpu} if r.gpu else {})}
    return [worker] if r.workers == 1 else [{"CPU": r.driver_cpu}] + [worker] * r.workers


def trial_count(cfg: SweepConfig) -> int:
    return len(cfg.grid()) * cfg.num_samples


def plan_lines(cfg: SweepConfig) -> list[str]:
    """A human-readable plan: every grid point, the trial's resources, and the total."""
    bundles = trial_bundles(cfg)
    storage = cfg.storage_path or os.environ.get("EDP_CHECKPOINT_URI") or "runs/ray"
    per_trial = {k: sum(b.get(k, 0.0) for b in bundles) for k in ("CPU", "GPU")}
    lines = [f"sweep {cfg.name}: {trial_count(cfg)} trial(s) = {len(cfg.variants)} variant(s) x "
             f"{len(cfg.seeds)} seed(s) x {cfg.num_samples} sample(s); metric {cfg.metric} ({cfg.mode})",
             f"per trial: {bundles} (total CPU {per_trial['CPU']:g}, GPU {per_trial['GPU']:g}); "
             f"max_concurrent_trials {cfg.max_concurrent_trials or 'unlimited'}; storage {storage}"]
    for v in cfg.variants:
        for seed in cfg.seeds:
            model = cfg.trial_config(v.name, seed, {}).model
            sets = ", ".join(f"{k}={val}" for k, val in v.set.items()) or "-"
            lines.append(f"  {v.name:<20} seed {seed:<3} model {model:<12} set: {sets}")
    if cfg.search:
        lines.append("  search: " + ", ".join(f"{k}~{s.type}" for k, s in cfg.search.items()))
    return lines


def _cpu_quantity(q: str | float) -> float:
    """A Kubernetes CPU quantity ("4", "500m", 2) in CPUs."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def node_types_from_env() -> list[dict]:
    """The node types an autoscaling cluster can add (EDP_NODE_TYPES, set by the chart): a cluster that scales
    from zero has no GPU node until a trial asks for one, so the placement check counts these too."""
    raw = os.environ.get("EDP_NODE_TYPES", "").strip()
    if not raw:
        return []
    try:
        types = json.loads(raw)
        return [{"group": t.get("group", "?"), "max": int(t.get("max", 1)), "CPU": _cpu_quantity(t["CPU"]),
                 "GPU": float(t.get("GPU", 0))} for t in types]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PlacementError(f"EDP_NODE_TYPES is not a JSON list of {{group, max, CPU, GPU}}: {e}") from None


def check_placement(cfg: SweepConfig, nodes: list[dict], node_types: list[dict] | None = None) -> str:
    """Raise PlacementError when some bundle of a trial fits on no alive node (`ray.nodes()` entries) and on no
    node type the cluster can scale to; otherwise return a one-line summary of how many trials fit at once."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", False)]
    types = node_types_from_env() if node_types is None else node_types
    capacities = alive + [{"CPU": t["CPU"], "GPU": t["GPU"]} for t in types]
    for bundle in trial_bundles(cfg):
        if not any(all(cap.get(k, 0.0) >= need for k, need in bundle.items()) for cap in capacities):
            have = [{k: cap[k] for k in ("CPU", "GPU") if cap.get(k)} for cap in capacities]
            raise PlacementError(
                f"sweep {cfg.name}: a trial needs {bundle} on one node, but no node of this cluster has it "
                f"(nodes and node types: {have}); lower resources.cpu/resources.gpu in the sweep file, or add "
                f"nodes that provide them (e.g. the chart's GPU worker group: ray.workerGroups.gpu.enabled=true)")
    totals = {k: sum(cap.get(k, 0.0) for cap in alive) + sum(t[k] * t["max"] for t in types) for k in ("CPU", "GPU")}
    need = {k: sum(b.get(k, 0.0) for b in trial_bundles(cfg)) for k in ("CPU", "GPU")}
    at_once = min(int(totals[k] // need[k]) for k in need if need[k])
    if cfg.max_concurrent_trials:
        at_once = min(at_once, cfg.max_concurrent_trials)
    scaled = f" (+ {sum(t['max'] for t in types)} autoscaled node(s))" if types else ""
    return (f"fits: {len(alive)} node(s){scaled}, CPU {totals['CPU']:g}, GPU {totals['GPU']:g} in all; "
            f"up to {at_once} trial(s) at once")
