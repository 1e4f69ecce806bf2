"""A sweep's placement (cluster.distributed.placement): trials that fit no node fail at once naming what to change;
node types an autoscaler can add count; `--dry-run` plans without Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.distributed.placement import PlacementError, check_placement, node_types_from_env
from cluster.distributed.tuning import load_sweep

SWEEPS = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "sweeps"
CPU_NODE = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e10}}
HEAD = {"Alive": True, "Resources": {"memory": 1e10}}  # the chart's head: num-cpus 0


def test_gpu_trials_on_a_cpu_only_cluster_fail_at_once_naming_what_to_change():
    escm = load_sweep(SWEEPS / "escm-ablation.yaml")  # 1 CPU + 0.25 GPU per trial
    with pytest.raises(PlacementError, match=r"needs \{'CPU': 1.0, 'GPU': 0.25\} on one node.*resources.gpu"):
        check_placement(escm, [HEAD, CPU_NODE, {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}}], [])


def test_placement_counts_node_types_an_autoscaler_can_add():
    escm = load_sweep(SWEEPS / "escm-ablation.yaml")
    gpu_type = {"group": "gpu", "max": 2, "CPU": 8.0, "GPU": 1.0}
    assert "up to 8 trial(s) at once" in check_placement(escm, [HEAD], [gpu_type])  # 2 GPUs / 0.25, capped at 8
    smoke = load_sweep(SWEEPS / "smoke.yaml")  # 0.9 CPU per trial, max 2 concurrent
    assert "up to 2 trial(s)" in check_placement(smoke, [HEAD, CPU_NODE], [])


def test_node_types_parse_kubernetes_cpu_quantities(monkeypatch):
    monkeypatch.setenv("EDP_NODE_TYPES", '[{"group": "cpu", "max": 3, "CPU": "500m", "GPU": 0}]')
    assert node_types_from_env() == [{"group": "cpu", "max": 3, "CPU": 0.5, "GPU": 0.0}]
    monkeypatch.setenv("EDP_NODE_TYPES", '{"cpu": 1}')
    with pytest.raises(PlacementError, match="EDP_NODE_TYPES"):
        node_types_from_env()


def test_dry_run_prints_every_trial_and_starts_nothing(capsys, monkeypatch):
    from cluster.jobs.sweep import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["--config", str(SWEEPS / "escm-ablation.yaml"), "--set", "seeds=[0]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 trial(s) = 6 variant(s) x 1 seed(s)" in out and "placement not checked" in out
    assert all(f"{v} " in out for v in ("no_desv", "no_dcgcn", "no_vr", "no_vp", "no_vdes"))


def test_edp_sweep_dry_run_is_the_jobs_dry_run(monkeypatch):
    from typer.testing import CliRunner

    from cluster.cli import app

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("EDP_NODE_TYPES", '[{"group": "cpu", "max": 2, "CPU": "4", "GPU": 0}]')
    result = CliRunner().invoke(app, ["sweep", "--config", str(SWEEPS / "escm-ablation.yaml"), "--dry-run"])
    assert result.exit_code == 2 and "no node of this cluster has it" in str(result.output) + str(result.exception)
    result = CliRunner().invoke(app, ["sweep", "--config", str(SWEEPS / "smoke.yaml"), "--dry-run"])
    assert result.exit_code == 0 and "3 trial(s)" in result.output and "up to 2 trial(s) at once" in result.output
