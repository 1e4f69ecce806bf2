"""The `edp` CLI and `python -m trainers.train`: summaries, clear errors, evaluate on any source."""

from __future__ import annotations

import json
import math
import re

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from trainers import train as train_entry

runner = CliRunner()


def test_data_prepare_prints_summary(tmp_path):
    result = runner.invoke(app, ["data", "prepare", "--data", "sample", "--out", str(tmp_path),
                                 "--set", "vectors=none"])
    assert result.exit_code == 0, result.output
    assert "conversations" in result.output and "vocabulary" in result.output
    again = runner.invoke(app, ["data", "prepare", "--data", "sample", "--out", str(tmp_path),
                                "--set", "vectors=none"])
    assert "cache hit" in again.output


def test_bad_setting_exits_2_naming_the_field(tmp_path):
    result = runner.invoke(app, ["data", "prepare", "--out", str(tmp_path), "--set", "min_freq=-1"])
    assert result.exit_code == 2 and "min_freq" in result.output


def test_validate_lists_invalid_records(tmp_path):
    (tmp_path / "ed_train.jsonl").write_text(json.dumps(
        {"conv_id": "x:1", "emotion": "bored", "situation": "s", "utterances": ["a", "b"],
         "speakers": ["speaker", "listener"]}) + "\n")
    result = runner.invoke(app, ["data", "validate", str(tmp_path)])
    assert result.exit_code == 1 and "x:1" in result.output and "bad emotion label 'bored'" in result.output


def test_train_then_evaluate_on_another_source(tmp_path, prepared_sample, sample_dir):
    run = tmp_path / "run"
    code = train_entry.main(["--model", "escm", "--data", "sample", "--out", str(run), "--device", "cpu",
                             "--max-steps", "4", "--eval-every", "4", "--set", "model_overrides.flavour=tiny",
                             "--set", f"data.cache_dir={prepared_sample.path.parent}", "--set", "eval_generate=2",
                             "--set", "num_samples=2"])
    assert code == 0 and (run / "metrics.json").exists()
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run / "checkpoints" / "best.pt"),
                                 "--data", str(sample_dir / "ed_valid.jsonl"), "--split", "valid",
                                 "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())["final"]
    # the same preprocessing and weights: identical teacher-forced perplexity to the trainer's own evaluation
    assert abs(metrics["metrics"]["ppl"] - trained["valid_ppl"]) < 1e-3 * trained["valid_ppl"]
    assert metrics["metrics"]["ppl_token"] == pytest.approx(trained["valid_ppl_token"], rel=1e-3)
    assert set(metrics["definitions"]) >= {"acc", "ppl", "ppl_token", "dist_n", "dist_n_nltk"}
    assert {"dist_1", "dist_2", "dist_1_nltk", "dist_2_nltk"} <= set(metrics["metrics"])
    assert not any(k.endswith("_sampled") for k in metrics["metrics"])  # edp evaluate decodes the whole split
    for name, value in metrics["metrics"].items():  # every figure printed whole, even at CliRunner's 80 columns
        assert re.search(rf"{name}\s+│\s+{re.escape(f'{value:.4g}')}", result.output), name
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == metrics["examples"] == 50
    assert set(predictions[0]) == {"conv_id", "turn", "context", "gold_emotion", "predicted_emotion", "predicted_prob",
                                   "generated", "reference", "nll_sum", "num_tokens"}
    # anyone can recompute both perplexities and the accuracy from predictions.jsonl
    nll, tokens = [p["nll_sum"] for p in predictions], [p["num_tokens"] for p in predictions]
    assert all(n >= 1 for n in tokens)
    assert math.exp(sum(a / n for a, n in zip(nll, tokens)) / len(nll)) == pytest.approx(metrics["metrics"]["ppl"])
    assert math.exp(sum(nll) / sum(tokens)) == pytest.approx(metrics["metrics"]["ppl_token"])
    assert math.exp(sum(nll) / sum(tokens)) != pytest.approx(metrics["metrics"]["ppl"])  # the definitions differ
    acc = sum(p["predicted_emotion"] == p["gold_emotion"] for p in predictions) / len(predictions)
    assert acc == pytest.approx(metrics["metrics"]["acc"])


def test_train_bad_config_and_missing_checkpoint(tmp_path):
    assert train_entry.main(["--out", str(tmp_path), "--set", "batch_size=0"]) == 2
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--data", "sample"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_train_builds_the_ray_config_of_the_job_entrypoint(monkeypatch, tmp_path):
    """`edp train` and `python -m cluster.jobs.train` build the same RayTrainConfig: --device and --no-resume
    reach it; Ray Train options with --local are refused."""
    from cluster.jobs import train as train_job

    built = []
    monkeypatch.setattr(train_job, "run", lambda cfg: built.append(cfg) or 0)
    options = ["--model", "escm", "--data", "sample", "--out", str(tmp_path), "--device", "cpu", "--max-steps", "3",
               "--workers", "2", "--gpus-per-worker", "0", "--no-resume", "--set", "train.batch_size=4"]
    result = runner.invoke(app, ["train", *options])
    assert result.exit_code == 0, result.output
    assert built[0] == train_job.config_from_args(train_job.parse_args(options))
    cfg = built[0]
    assert (cfg.train.device, cfg.train.max_steps, cfg.train.batch_size, cfg.train.out_dir) == (
        "cpu", 3, 4, str(tmp_path))
    assert cfg.scaling.workers == 2 and cfg.resume is False
    assert train_job.build_config().resume is True

    result = runner.invoke(app, ["train", "--local", "--workers", "2"])
    assert result.exit_code == 2 and "--workers and --gpus-per-worker are Ray Train options" in result.output
    result = runner.invoke(app, ["train", "--set", "scaling.workers=0"])
    assert result.exit_code == 2 and built[1:] == []


def test_local_train_builds_the_config_of_python_m_trainers_train(monkeypatch, tmp_path):
    """`edp train --local` and `python -m trainers.train` build the same TrainConfig; --no-resume reaches the run;
    a bad value exits 2 naming the field."""
    runs = []
    monkeypatch.setattr(train_entry, "run", lambda cfg, resume=True: runs.append((cfg, resume)) or {"final": {}})
    options = ["--model", "iamm", "--data", "sample", "--out", str(tmp_path), "--device", "cpu", "--max-steps", "3",
               "--set", "batch_size=4"]
    result = runner.invoke(app, ["train", "--local", *options, "--no-resume"])
    assert result.exit_code == 0, result.output
    assert runs == [(train_entry.config_from_args(train_entry.parse_args(options)), False)]
    result = runner.invoke(app, ["train", "--local", "--set", "batch_size=0"])
    assert result.exit_code == 2 and "batch_size" in result.output and len(runs) == 1
    (tmp_path / "run.yaml").write_text("max_steps: 7\n")
    result = runner.invoke(app, ["train", "--local", "-c", str(tmp_path / "run.yaml")])  # -c: --config, as before
    assert result.exit_code == 0, result.output
    assert runs[-1][0] == train_entry.config_from_args(train_entry.parse_args(["--config", str(tmp_path / "run.yaml")]))
    assert runs[-1][0].max_steps == 7


def test_no_resume_forgets_the_stored_run_and_its_mlflow_run_id(tmp_path):
    from cluster.distributed.ddp import forget_run
    from cluster.jobs import train as train_job
    from cluster.tracking.runs import RUN_ID_FILE

    cfg = train_job.build_config(name="r1", train={"out_dir": str(tmp_path / "out")},
                                 storage_path=str(tmp_path / "ray"), resume=False)
    stored, other = tmp_path / "ray" / "r1" / "checkpoint_000001", tmp_path / "ray" / "r2"
    stored.mkdir(parents=True)
    other.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / RUN_ID_FILE).write_text("abc")
    forget_run(cfg)
    assert not (tmp_path / "ray" / "r1").exists() and other.exists()
    assert not (tmp_path / "out" / RUN_ID_FILE).exists()
    forget_run(cfg)  # nothing stored: nothing to do


def test_promote_takes_a_sweep_or_the_challenger_not_both_and_compare_checks_its_window(monkeypatch):
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    result = runner.invoke(app, ["promote", "--name", "escm"])
    assert result.exit_code == 2 and "--experiment and --metric" in result.output
    result = runner.invoke(app, ["promote", "--name", "escm", "--from-challenger", "--experiment", "x"])
    assert result.exit_code == 2 and "drop --experiment" in result.output
    result = runner.invoke(app, ["compare", "--name", "escm", "--window", "5 minutes"])
    assert result.exit_code == 2 and "not a PromQL duration" in result.output


def test_apply_without_a_dashboard_address_says_how_to_give_one(monkeypatch):
    from cluster.serve_rollout import RolloutError, dashboard_address

    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    with pytest.raises(RolloutError, match="--serve-address .* RAY_DASHBOARD_ADDRESS"):
        dashboard_address(None)
    monkeypatch.setenv("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    assert dashboard_address(None) == "http://127.0.0.1:8265"
    assert dashboard_address("http://head:8265") == "http://head:8265"
