"""Sweep files: every shipped file validates; a bad file fails naming the field, before Ray starts."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.distributed.tuning import SweepConfig, load_sweep
from cluster.tracking.reports import PaperReference, ablation_table, directions, table_csv, table_markdown
from trainers.config import ConfigError

SWEEPS = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "sweeps"


def test_shipped_sweeps_validate_and_expand():
    escm = load_sweep(SWEEPS / "escm-ablation.yaml")
    assert [v.name for v in escm.variants] == ["escm", "no_desv", "no_dcgcn", "no_vr", "no_vp", "no_vdes"]
    assert len(escm.grid()) == 18
    assert escm.trial_config("no_vr", 2, {}).model_overrides == {"no_vr": True}
    assert escm.trial_config("no_vr", 2, {}).seed == 2
    # the paper's Dist was counted on nltk words: its figures sit under those columns
    assert escm.paper.rows["escm"]["Dist-1_nltk"] == 1.19 and "Dist-1" not in escm.paper.rows["escm"]
    iamm = load_sweep(SWEEPS / "iamm-ablation.yaml")
    # without a knowledge backend no variant is a paper row: the names say so
    assert [v.name for v in iamm.variants] == ["iamm_no_knowledge", "no_ws_no_knowledge"] and len(iamm.grid()) == 6
    assert iamm.trial_config("iamm_no_knowledge", 0, {}).data.knowledge == "none"
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
        return _Run(variant, final_valid_acc=acc, final_valid_ppl=ppl, final_valid_ppl_token=ppl + 10,
                    final_valid_dist_1=d1, final_valid_dist_2=d2, final_valid_dist_1_nltk=d1 / 2,
                    final_valid_dist_2_nltk=d2 / 2)

    runs = [run("escm", 0.40, 35.0, 0.01, 0.05), run("escm", 0.42, 37.0, 0.03, 0.07),
            run("no_vr", 0.38, 36.0, 0.02, 0.06)]
    rows = ablation_table(runs, ["escm", "no_vr"])
    escm = rows[0]
    assert escm["variant"] == "escm" and escm["seeds"] == 2
    assert escm["Acc"] == pytest.approx(41.0) and escm["Acc_std"] == pytest.approx(2 ** 0.5)
    assert escm["PPL"] == pytest.approx(36.0) and escm["Dist-1"] == pytest.approx(2.0)
    md = table_markdown(rows)
    assert ("| escm (n=2) | 41.00 ± 1.41 | 36.00 ± 1.41 | 46.00 ± 1.41 | 2.00 ± 1.41 | 6.00 ± 1.41 | 1.00 ± 0.71 | "
            "3.00 ± 0.71 |") in md
    assert md.startswith("| Model | Acc | PPL | PPL_token | Dist-1 | Dist-2 | Dist-1_nltk | Dist-2_nltk |")
    assert table_csv(rows).splitlines()[0].startswith("variant,seeds,Acc,Acc_std,PPL,PPL_std,PPL_token")


def test_ablation_table_never_shows_sampled_dist_as_the_papers():
    """A run whose Dist-n was computed over a sample only (or logged under the old names) has no Dist column."""
    old = _Run("escm", final_valid_acc=0.4, final_valid_ppl=40.0, final_valid_dist1=0.05,
               valid_dist_1_sampled=0.05)
    row = ablation_table([old])[0]
    assert row["Acc"] == pytest.approx(40.0) and math.isnan(row["Dist-1"]) and math.isnan(row["PPL_token"])
    assert "| escm (n=1) | 40.00 ± 0.00 | 40.00 ± 0.00 | n/a | n/a | n/a |" in table_markdown([row])


def test_paper_rows_sit_under_ours_and_each_ablation_is_compared_by_direction():
    def run(variant, acc, ppl):
        return _Run(variant, final_valid_acc=acc, final_valid_ppl=ppl)

    rows = ablation_table([run("escm", 0.40, 36.0), run("no_vr", 0.38, 35.0), run("no_vp", 0.40, 37.0),
                           run("extra", 0.1, 90.0)], ["escm", "no_vr", "no_vp", "extra"])
    paper = PaperReference(source="Table 3", baseline="escm", rows={
        "escm": {"Acc": 41.19, "PPL": 34.82}, "no_vr": {"Acc": 40.0, "PPL": 34.02},
        "no_vp": {"Acc": 39.41, "PPL": 34.45}})
    found = {(d["variant"], d["column"]): d for d in directions(rows, paper)}
    # no_vr: Acc -2.00 (paper -1.19) same way; PPL -1.00 (paper -0.80) same way
    assert found["no_vr", "Acc"]["delta"] == pytest.approx(-2.0) and found["no_vr", "Acc"]["same"] is True
    assert found["no_vr", "PPL"]["same"] is True
    # no_vp: Acc unchanged (undecided); PPL +1.00 against the paper's -0.37: opposite
    assert found["no_vp", "Acc"]["same"] is None and found["no_vp", "PPL"]["same"] is False
    assert ("extra", "Acc") not in found  # no paper row: nothing to compare
    md = table_markdown(rows, paper)
    assert ("| escm (n=1) | 40.00 ± 0.00 | 36.00 ± 0.00 | n/a | n/a | n/a | n/a | n/a |\n"
            "| escm, paper | 41.19 | 34.82 | – | – | – | – | – |") in md
    assert "| no_vp | +0.00 (-1.78) | +1.00 (-0.37) ✗ |" in md
    assert "2 of 3 changes move in the paper's direction." in md and "Paper: Table 3." in md


def test_paper_reference_must_name_the_tables_columns_and_its_baseline():
    base = {"name": "x", "variants": [{"name": "escm"}], "base": {"model": "escm"}}

    def paper(baseline, rows):
        return {"source": "s", "baseline": baseline, "rows": rows}

    # a sweep run on some of the variants (--set variants=...) keeps the paper's other rows, unshown
    subset = SweepConfig.model_validate({**base, "paper": paper("escm", {"escm": {"Acc": 1}, "no_vr": {"Acc": 1}})})
    assert "no_vr" not in table_markdown(ablation_table([_Run("escm", final_valid_acc=0.4)]), subset.paper)
    with pytest.raises(ValueError, match="unknown column"):
        SweepConfig.model_validate({**base, "paper": paper("escm", {"escm": {"BLEU": 1}})})
    with pytest.raises(ValueError, match="baseline 'full' has no row"):
        SweepConfig.model_validate({**base, "paper": paper("full", {"escm": {"Acc": 1}})})
    assert load_sweep(SWEEPS / "escm-ablation.yaml").paper.rows["no_dcgcn"]["PPL"] == 33.52


def test_search_spec_rejects_empty_choice():
    with pytest.raises(ValueError, match="values"):
        SweepConfig.model_validate({"name": "x", "search": {"warmup": {"type": "choice", "values": []}}})


# ------------------------------------------------------------------------------------------------
# Storage on a cluster of several nodes (placement: test_placement.py)

CPU_NODE = {"Alive": True, "Resources": {"CPU": 4.0, "memory": 1e10}}
HEAD = {"Alive": True, "Resources": {"memory": 1e10}}  # the chart's head: num-cpus 0


def test_storage_defaults_to_the_checkpoint_uri_and_refuses_local_paths_on_several_nodes(monkeypatch):
    from cluster.distributed.ddp import resolve_storage

    monkeypatch.delenv("EDP_CHECKPOINT_URI", raising=False)
    monkeypatch.delenv("EDP_NODE_TYPES", raising=False)
    assert resolve_storage(None, [CPU_NODE]) == "runs/ray"  # one node: a local directory works
    monkeypatch.setenv("EDP_CHECKPOINT_URI", "s3://bucket/ckpt")
    assert resolve_storage(None, [HEAD, CPU_NODE]) == "s3://bucket/ckpt"
    assert resolve_storage("s3://other/x", [HEAD, CPU_NODE]) == "s3://other/x"
    with pytest.raises(ConfigError, match="EDP_CHECKPOINT_URI=s3://"):
        resolve_storage("runs/ray", [HEAD, CPU_NODE])
    monkeypatch.setenv("EDP_NODE_TYPES", '[{"group": "gpu", "max": 1, "CPU": 8, "GPU": 1}]')
    with pytest.raises(ConfigError, match="several nodes"):  # only the head is up, but workers will join
        resolve_storage("runs/ray", [HEAD])
