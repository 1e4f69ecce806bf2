"""Sweep files: every shipped file validates; a bad file fails naming the field, before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.mlflow.reports import ablation_table, table_csv, table_markdown
from cluster.ray.tune import SweepConfig, load_sweep
from trainers.config import ConfigError

SWEEPS = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "sweeps"


def test_shipped_sweeps_validate_and_expand():
    escm = load_sweep(SWEEPS / "escm-ablation.yaml")
    assert [v.name for v in escm.variants] == ["escm", "no_desv", "no_dcgcn", "no_vr", "no_vp", "no_vdes"]
    assert len(escm.grid()) == 18
    assert escm.trial_config("no_vr", 2, {}).model_overrides == {"no_vr": True}
    assert escm.trial_config("no_vr", 2, {}).seed == 2
    iamm = load_sweep(SWEEPS / "iamm-ablation.yaml")
    assert {v.name for v in iamm.variants} == {"iamm", "no_ea", "no_ia", "no_ws"} and len(iamm.grid()) == 12
    hp = load_sweep(SWEEPS / "escm-hparams.yaml")
    assert hp.scheduler.type == "asha" and hp.num_samples > 1 and hp.resources.gpu == 0.25
    cfg = hp.trial_config("default", 0, {"lr_factor": 0.5, "model_overrides.d_pr": 25, "batch_size": 32})
    assert (cfg.lr_factor, cfg.model_overrides["d_pr"], cfg.batch_size) == (0.5, 25, 32)
    iamm_search = set(load_sweep(SWEEPS / "iamm-hparams.yaml").search)
    assert iamm_search >= {"model_overrides.k1", "model_overrides.k3"}
    smoke = load_sweep(SWEEPS / "smoke.yaml")
    assert [v.name for v in smoke.variants] == ["transformer", "escm", "escm-no_vr"] and smoke.seeds == [0]


def _bad(tmp_path, mutate) -> str:
    data = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_sweep(path)
    return str(e.value)


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["variants"][1]["set"].update({"model_overrides.no_vrr": True}),
     ["variants[1] (escm)", "no_vrr"]),
    (lambda d: d.update(seeds="zero"), ["seeds"]),
    (lambda d: d.update(search={"lr_factor": {"type": "loguniform", "low": 0, "high": 1}}),
     ["search.lr_factor", "low > 0"]),
    (lambda d: d.update(search={"warmup": {"type": "choice", "values": [-5]}}), ["warmup"]),
    (lambda d: d["base"].update(batch_size=0), ["batch_size"]),
    (lambda d: d.update(metric="bleu"), ["metric"]),
    (lambda d: d.update(resources={"cpu": 0}), ["resources.cpu"]),
    (lambda d: d.update(max_concurent_trials=2), ["max_concurent_trials"]),
    (lambda d: d["variants"].append({"name": "escm"}), ["duplicate", "escm"]),
    (lambda d: d.update(scheduler={"type": "asha", "max_t": 100}), ["max_t"]),
])
def test_bad_sweep_names_the_field(tmp_path, mutate, expected):
    message = _bad(tmp_path, mutate)
    for word in expected:
        assert word in message, message


def test_bad_sweep_job_fails_before_ray_starts(tmp_path):
    data = yaml.safe_load((SWEEPS / "smoke.yaml").read_text())
    data["variants"][0]["set"]["model_overrides.dropout"] = 1.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    # RAY_ADDRESS points nowhere: any attempt to start or reach Ray would fail differently
    env = {**os.environ, "PYTHONPATH": str(SWEEPS.parents[2]), "RAY_ADDRESS": "127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "cluster.jobs.sweep", "--config", str(bad)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "variants[0] (transformer)" in proc.stderr and "dropout" in proc.stderr
    assert "ray" not in proc.stderr.lower().replace("array", "")


class _Run:
    def __init__(self, variant, **metrics):
        self.data = type("D", (), {"tags": {"variant": variant}, "metrics": metrics})()
        self.info = type("I", (), {"run_name": variant, "run_id": variant})()


def test_ablation_table_mean_std_in_paper_units():
    def run(variant, acc, ppl, d1, d2):
        return _Run(variant, final_valid_acc=acc, final_valid_ppl=ppl, final_valid_dist1=d1,
                    final_valid_dist2=d2)

    runs = [run("escm", 0.40, 35.0, 0.01, 0.05), run("escm", 0.42, 37.0, 0.03, 0.07),
            run("no_vr", 0.38, 36.0, 0.02, 0.06)]
    rows = ablation_table(runs, ["escm", "no_vr"])
    escm = rows[0]
    assert escm["variant"] == "escm" and escm["seeds"] == 2
    assert escm["Acc"] == pytest.approx(41.0) and escm["Acc_std"] == pytest.approx(2 ** 0.5)
    assert escm["PPL"] == pytest.approx(36.0) and escm["Dist-1"] == pytest.approx(2.0)
    md = table_markdown(rows)
    assert "| escm (n=2) | 41.00 ± 1.41 | 36.00 ± 1.41 | 2.00 ± 1.41 | 6.00 ± 1.41 |" in md
    assert table_csv(rows).splitlines()[0].startswith("variant,seeds,Acc,Acc_std,PPL")


def test_search_spec_rejects_empty_choice():
    with pytest.raises(ValueError, match="values"):
        SweepConfig.model_validate({"name": "x", "search": {"warmup": {"type": "choice", "values": []}}})
