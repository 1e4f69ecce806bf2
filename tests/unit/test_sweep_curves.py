"""`edp report`: a sweep's learning curves read back from a real MLflow store (sqlite in tmp_path), with runs nested
under a parent the way the sweep makes them (cluster.tracking.runs.start_run, tags variant/seed)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from cluster.tracking.curves import ReportError, write_report
from cluster.tracking.runs import TrackingConfig, start_run
from services.registry import client

STEPS = [100, 200, 300, 400]
ESCM = {  # seed -> metric -> value per step
    0: {"valid_acc": [0.30, 0.32, 0.34, 0.36], "valid_ppl": [50.0, 45.0, 40.0, 38.0],
        "valid_dist_1": [0.010, 0.012, 0.014, 0.016], "valid_dist_2": [0.05, 0.06, 0.07, 0.08]},
    1: {"valid_acc": [0.31, 0.33, 0.35, 0.37], "valid_ppl": [52.0, 46.0, 41.0, 39.0],
        "valid_dist_1": [0.011, 0.013, 0.015, 0.017], "valid_dist_2": [0.05, 0.06, 0.07, 0.09]},
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep parent with escm (seeds 0, 1; four evaluations) and no_dcgcn (seed 0; two evaluations, the second
    logged twice as a retried trial does, Dist only over a sample), and a parent without children."""
    root = tmp_path_factory.mktemp("mlflow")
    tracking = TrackingConfig(uri=f"sqlite:///{root / 'mlflow.db'}", state_dir=str(root))
    uri = tracking.resolved_uri()
    c = client(uri)
    parent = start_run(tracking, "sweep-test", "ablation", tags={"kind": "sweep", "sweep": "ablation"})
    c.log_param(parent, "variants", "no_dcgcn,escm")  # the sweep file's order, not the alphabet's
    for seed, metrics in ESCM.items():
        run = start_run(tracking, "sweep-test", f"escm-s{seed}", parent_run_id=parent,
                        tags={"variant": "escm", "seed": str(seed)})
        for key, values in metrics.items():
            for step, value in zip(STEPS, values, strict=True):
                c.log_metric(run, key, value, step=step)
    run = start_run(tracking, "sweep-test", "no_dcgcn-s0", parent_run_id=parent,
                    tags={"variant": "no_dcgcn", "seed": "0"})
    for key, values in {"valid_acc": [0.20, 0.24, 0.26], "valid_ppl": [60.0, 55.0, 54.0],
                        "valid_dist_1_sampled": [0.01, 0.02, 0.03], "valid_dist_2_sampled": [0.1, 0.2, 0.3]}.items():
        for i, (step, value) in enumerate(zip([100, 200, 200], values, strict=True)):  # step 200 again: the
            c.log_metric(run, key, value, timestamp=1_000 + i, step=step)             # retry's (later) value wins
    lonely = start_run(tracking, "sweep-test", "single", tags={"kind": "sweep"})
    return {"uri": uri, "parent": parent, "lonely": lonely, "root": root}


def test_table_is_the_mean_and_std_over_seeds_and_last_evaluations(store, tmp_path):
    report = write_report(store["uri"], store["parent"], tmp_path, last=3)
    no_dcgcn, escm = report.rows
    assert [no_dcgcn["variant"], escm["variant"]] == ["no_dcgcn", "escm"] and escm["seeds"] == 2
    # escm Acc: seed 0's last three 32, 34, 36 and seed 1's 33, 35, 37 pooled
    assert escm["Acc"] == pytest.approx(34.5) and escm["Acc_std"] == pytest.approx(math.sqrt(3.5))
    assert escm["Acc_n"] == 6
    assert escm["PPL"] == pytest.approx((45 + 40 + 38 + 46 + 41 + 39) / 6)
    assert escm["Dist-1"] == pytest.approx((1.2 + 1.4 + 1.6 + 1.3 + 1.5 + 1.7) / 6)
    assert escm["Dist-2"] == pytest.approx((6 + 7 + 8 + 6 + 7 + 9) / 6)
    # no_dcgcn: two evaluations only (fewer than --last), step 200's retried value 26, not 24
    assert no_dcgcn["Acc"] == pytest.approx(23.0) and no_dcgcn["Acc_n"] == 2
    assert no_dcgcn["PPL"] == pytest.approx(57.0) and no_dcgcn["Dist-1"] == pytest.approx(2.0)
    assert "| escm (2) | 34.50 ± 1.87 | 41.50 ± 3.27 |" in report.markdown
    assert "Dist-1: valid_dist_1_sampled" in report.markdown and "Dist-1: valid_dist_1," in report.markdown


def test_last_one_is_each_seeds_final_evaluation(store, tmp_path):
    escm = write_report(store["uri"], store["parent"], tmp_path, last=1).rows[1]
    assert escm["Acc"] == pytest.approx(36.5) and escm["Acc_std"] == pytest.approx(math.sqrt(0.5))


def test_files_are_written_and_the_figure_is_a_png(store, tmp_path):
    report = write_report(store["uri"], store["parent"], tmp_path / "out")
    assert report.paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.paths["csv"].read_text().splitlines()[0].startswith("variant,seeds,Acc,Acc_std,Acc_n,PPL")
    assert store["parent"] in report.paths["markdown"].read_text()


def test_unknown_run_and_childless_parent_are_named(store, tmp_path):
    with pytest.raises(ReportError, match="no MLflow run '0123456789abcdef0123456789abcdef'"):
        write_report(store["uri"], "0123456789abcdef0123456789abcdef", tmp_path)
    with pytest.raises(ReportError, match=f"run '{store['lonely']}' .* has no child runs"):
        write_report(store["uri"], store["lonely"], tmp_path)
    with pytest.raises(ReportError, match="--last must be >= 1, got 0"):
        write_report(store["uri"], store["parent"], tmp_path, last=0)


def test_edp_report_prints_the_table_and_fails_clearly(store, tmp_path):
    from cluster.cli import app

    ok = CliRunner().invoke(app, ["report", "--parent", store["parent"], "--tracking-uri", store["uri"],
                                  "--out", str(tmp_path), "--last", "2"])
    assert ok.exit_code == 0, ok.output
    assert "| escm (2) | 35.50 ± 1.29" in ok.output and (tmp_path / "curves.png").exists()
    bad = CliRunner().invoke(app, ["report", "--parent", "nope", "--tracking-uri", store["uri"]])
    assert bad.exit_code == 2 and "no MLflow run 'nope'" in bad.output
