"""Registry promotion on a real MLflow server: best child, refuse a worse model, force, rollback, tags;
the direction from the metric, dry runs, like-with-like comparison; serving never unpickles a version."""

from __future__ import annotations

import json
import pickle
import tempfile
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cluster.tracking.promotion import PromotionError, promote, rollback
from services import registry
from tests.integration.registry_models import bundle_of, log_sweep
from trainers.inference import Request

pytestmark = pytest.mark.integration


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def aliases(c: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in c.get_registered_model(name).aliases.items()}


def trials(*accs, model="escm"):
    models = model if isinstance(model, list) else [model] * len(accs)
    return [{"name": f"t{i}", "metrics": {"valid_acc": a, "valid_ppl": 100 - 10 * a}, "params": {"model": m}}
            for i, (a, m) in enumerate(zip(accs, models))]


def test_promote_refuse_force_rollback(mlflow_server, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    c = MlflowClient(mlflow_server)
    exp, name = unique("sweep"), unique("escm")
    ids = log_sweep(mlflow_server, exp, ckpt, trials(0.1, 0.3, 0.2))
    stray = c.create_run(c.get_experiment_by_name(exp).experiment_id, run_name="not-a-child").info.run_id
    c.log_metric(stray, "valid_acc", 0.99)  # a better run that is not a child of the sweep: ignored
    c.set_terminated(stray, "FINISHED")
    lines = []

    first = promote(exp, "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lines.append)
    assert first.action == "promoted" and first.candidate_run_id == ids["t1"]
    mv = c.get_model_version(name, first.version)
    assert mv.run_id == ids["t1"] and mv.tags["run_id"] == ids["t1"]
    assert float(mv.tags["metric.valid_acc"]) == pytest.approx(0.3) and "metric.valid_ppl" in mv.tags
    assert aliases(c, name) == {"champion": first.version}
    assert any("champion: none" in line for line in lines) and any("valid_acc=0.3" in line for line in lines)

    # the same sweep again: the candidate already is the champion
    assert promote(exp, "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lambda s: None
                   ).action == "unchanged"

    # a worse model is refused and nothing changes; the decision says what was compared
    worse_exp = unique("sweep")
    log_sweep(mlflow_server, worse_exp, ckpt, trials(0.25), pyfunc=False)
    lines.clear()
    refused = promote(worse_exp, "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lines.append)
    assert refused.action == "refused" and refused.champion_value == pytest.approx(0.3)
    assert any("0.25 is worse than champion 0.3" in line for line in lines)
    assert aliases(c, name) == {"champion": first.version}
    assert len(c.search_model_versions(f"name = '{name}'")) == 1

    # --force promotes it anyway; the replaced version stays reachable as `previous`
    forced = promote(worse_exp, "valid_acc", "max", name=name, force=True, tracking_uri=mlflow_server,
                     log=lines.append)
    assert forced.action == "promoted" and forced.previous_version == first.version
    assert aliases(c, name) == {"champion": forced.version, "previous": first.version}
    assert any("but --force" in line for line in lines)

    # rollback: champion back to previous; the demoted version is tagged; no second rollback
    back = rollback(name, tracking_uri=mlflow_server, log=lambda s: None)
    assert back.version == first.version and aliases(c, name) == {"champion": first.version}
    assert "rolled_back" in c.get_model_version(name, forced.version).tags
    with pytest.raises(PromotionError, match="previous"):
        rollback(name, tracking_uri=mlflow_server, log=lambda s: None)


def test_where_filter_min_mode_and_errors(mlflow_server, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    exp, name = unique("sweep"), unique("escm")
    ids = log_sweep(mlflow_server, exp, ckpt, trials(0.1, 0.3, 0.2, model=["escm", "transformer", "escm"]),
                    pyfunc=False)
    d = promote(exp, "valid_acc", "max", "params.model = 'escm'", name=name, tracking_uri=mlflow_server,
                log=lambda s: None)
    assert d.candidate_run_id == ids["t2"]                       # the 0.3 run is a transformer
    d = promote(exp, "valid_ppl", "min", name=unique("escm"), tracking_uri=mlflow_server, log=lambda s: None)
    assert d.candidate_run_id == ids["t1"] and d.candidate_value == pytest.approx(97.0)
    d = promote(exp, "valid_ppl", name=unique("escm"), tracking_uri=mlflow_server, log=lambda s: None)
    assert d.candidate_run_id == ids["t1"]                       # valid_ppl: lower is better by itself
    with pytest.raises(PromotionError, match=r"unknown metric 'valid_bleu9'.*--mode.*valid_acc.*valid_ppl"):
        promote(exp, "valid_bleu9", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    with pytest.raises(PromotionError, match="does not exist"):
        promote(unique("nope"), "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    with pytest.raises(PromotionError, match="no FINISHED child run"):
        promote(exp, "valid_bleu9", "max", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    with pytest.raises(PromotionError, match="bad --where"):
        promote(exp, "valid_acc", "max", "params.model ~ 'x'", name=name, tracking_uri=mlflow_server,
                log=lambda s: None)
    with pytest.raises(ValueError, match="mode"):
        promote(exp, "valid_acc", "up", name=name, tracking_uri=mlflow_server)


@pytest.mark.parametrize("pyfunc", [True, False], ids=["pyfunc-model", "run-artifact"])
def test_registry_resolves_both_model_layouts_and_loads_a_responder(mlflow_server, tiny_checkpoint, pyfunc):
    if pyfunc and not registry_pyfunc_available():
        pytest.skip("services/pyfunc_model.py / cluster.tracking.runs not present yet")
    ckpt, _ = tiny_checkpoint
    exp, name = unique("sweep"), unique("escm")
    ids = log_sweep(mlflow_server, exp, ckpt, trials(0.4), pyfunc=pyfunc)
    promote(exp, "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    source = MlflowClient(mlflow_server).get_model_version(name, "1").source
    assert source.startswith("models:/m-" if pyfunc else f"runs:/{ids['t0']}/model")

    resolved = registry.resolve(f"models:/{name}@champion", mlflow_server)
    assert (resolved.version, resolved.run_id) == ("1", ids["t0"]) and resolved.bundle.is_dir()
    (answer,) = registry.load_responder(resolved).respond([Request(["I lost my keys again."])])
    assert isinstance(answer.response, str) and answer.emotion is not None
    registry.discard(resolved)
    assert not resolved.local_dir.exists()
    with pytest.raises(registry.RegistryError, match="no alias 'previous'"):
        registry.resolve(f"models:/{name}@previous", mlflow_server)
    with pytest.raises(registry.RegistryError, match="not a registry URI"):
        registry.resolve(f"runs:/{ids['t0']}/model", mlflow_server)


def registry_pyfunc_available() -> bool:
    from tests.integration.registry_models import pyfunc_available

    return pyfunc_available()


def test_cli_promote_and_rollback(mlflow_server, tiny_checkpoint):
    from cluster.cli import app

    ckpt, _ = tiny_checkpoint
    runner, name = CliRunner(), unique("escm")
    exp_a, exp_b = unique("sweep"), unique("sweep")
    log_sweep(mlflow_server, exp_a, ckpt, trials(0.5), pyfunc=False)
    log_sweep(mlflow_server, exp_b, ckpt, trials(0.2), pyfunc=False)
    base = ["--metric", "valid_acc", "--mode", "max", "--name", name, "--tracking-uri", mlflow_server]
    ok = runner.invoke(app, ["promote", "--experiment", exp_a, *base])
    assert ok.exit_code == 0 and "champion -> v1" in ok.output, ok.output
    refused = runner.invoke(app, ["promote", "--experiment", exp_b, *base])
    assert refused.exit_code == 1 and "refuse" in refused.output and "worse" in refused.output
    forced = runner.invoke(app, ["promote", "--experiment", exp_b, *base, "--force"])
    assert forced.exit_code == 0 and "previous -> v1" in forced.output, forced.output
    back = runner.invoke(app, ["rollback", "--name", name, "--tracking-uri", mlflow_server])
    assert back.exit_code == 0 and "champion -> v1" in back.output, back.output
    again = runner.invoke(app, ["rollback", "--name", name, "--tracking-uri", mlflow_server])
    assert again.exit_code == 2 and "previous" in again.output


def test_cli_registers_a_challenger_then_promotes_it_moving_both_aliases(mlflow_server, tiny_checkpoint):
    from cluster.cli import app

    ckpt, _ = tiny_checkpoint
    runner, name, c = CliRunner(), unique("escm"), MlflowClient(mlflow_server)
    exp_a, exp_b = unique("sweep"), unique("sweep")
    log_sweep(mlflow_server, exp_a, ckpt, trials(0.5), pyfunc=False)
    log_sweep(mlflow_server, exp_b, ckpt, trials(0.6), pyfunc=False)
    base = ["--metric", "valid_acc", "--name", name, "--tracking-uri", mlflow_server]
    assert runner.invoke(app, ["promote", "--experiment", exp_a, *base]).exit_code == 0
    challenger = runner.invoke(app, ["promote", "--experiment", exp_b, *base, "--alias", "challenger"])
    assert challenger.exit_code == 0 and "challenger -> v2 (champion unchanged)" in challenger.output
    assert aliases(c, name) == {"champion": "1", "challenger": "2"}
    promoted = runner.invoke(app, ["promote", "--name", name, "--from-challenger", "--tracking-uri", mlflow_server])
    assert promoted.exit_code == 0 and "champion is v2" in promoted.output, promoted.output
    assert aliases(c, name) == {"champion": "2", "previous": "1"}
    assert c.get_model_version(name, "2").tags["promoted_from"] == "challenger"
    again = runner.invoke(app, ["promote", "--name", name, "--from-challenger", "--tracking-uri", mlflow_server])
    assert again.exit_code == 2 and "no alias 'challenger'" in again.output


def test_direction_comes_from_the_metric_and_dry_run_registers_nothing(mlflow_server, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    c = MlflowClient(mlflow_server)
    exp, name = unique("sweep"), unique("escm")
    ids = log_sweep(mlflow_server, exp, ckpt, trials(0.1, 0.3, 0.2), pyfunc=False)  # ppl 99, 97, 98
    lines = []
    dry = promote(exp, "valid_ppl", name=name, dry_run=True, tracking_uri=mlflow_server, log=lines.append)
    assert dry.action == "would_promote" and dry.candidate_run_id == ids["t1"]
    text = "\n".join(lines)
    assert "ranked by valid_ppl (min is better)" in text and "1. t1=97" in text and "3. t0=99" in text
    assert "nothing registered" in text and c.search_registered_models(f"name = '{name}'") == []
    # --mode overrides the metric's direction; final_<metric> has its metric's direction
    assert promote(exp, "valid_ppl", "max", name=name, dry_run=True, tracking_uri=mlflow_server,
                   log=lambda s: None).candidate_run_id == ids["t0"]
    with pytest.raises(PromotionError, match="no FINISHED child run"):  # direction known, no such metric logged
        promote(exp, "final_valid_ppl", name=name, dry_run=True, tracking_uri=mlflow_server, log=lambda s: None)

    done = promote(exp, "valid_ppl", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    tags = c.get_model_version(name, done.version).tags
    run_params = c.get_run(ids["t1"]).data.params
    assert tags["promoted_metric"] == "valid_ppl" and tags["promoted_mode"] == "min"
    assert float(tags["metric.valid_ppl"]) == pytest.approx(97.0)
    assert {k: tags[k] for k in ("data.key", "eval.split", "metric_definition")} == {
        k: run_params[k] for k in ("data.key", "eval.split", "metric_definition")}
    assert json.loads(tags["recipe"]) == {}  # the helper's runs log no config.* params (real runs do)

    # a dry run against a champion says what it would do and moves nothing
    lines.clear()
    better = unique("sweep")
    log_sweep(mlflow_server, better, ckpt, trials(0.9), pyfunc=False)
    assert promote(better, "valid_ppl", name=name, dry_run=True, tracking_uri=mlflow_server,
                   log=lines.append).action == "would_promote"
    assert any("not worse than champion 97" in line for line in lines)
    assert aliases(c, name) == {"champion": done.version}


def test_runs_on_other_data_or_metric_definitions_are_not_compared(mlflow_server, tiny_checkpoint):
    ckpt, _ = tiny_checkpoint
    c = MlflowClient(mlflow_server)
    exp, name = unique("sweep"), unique("escm")
    log_sweep(mlflow_server, exp, ckpt, trials(0.3), pyfunc=False)
    first = promote(exp, "valid_acc", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    key = c.get_model_version(name, first.version).tags["data.key"]

    # a better run on other data is refused, both keys printed; --force promotes it
    other = unique("sweep")
    log_sweep(mlflow_server, other, ckpt, [{"name": "t0", "metrics": {"valid_acc": 0.9},
                                            "params": {"model": "escm", "data.key": "full-ed-0123"}}], pyfunc=False)
    lines = []
    refused = promote(other, "valid_acc", name=name, tracking_uri=mlflow_server, log=lines.append)
    assert refused.action == "refused" and aliases(c, name) == {"champion": first.version}
    why = next(line for line in lines if "not comparable" in line)
    assert f"data.key={key}" in why and "data.key=full-ed-0123" in why and "--force" in why
    forced = promote(other, "valid_acc", name=name, force=True, tracking_uri=mlflow_server, log=lines.append)
    assert forced.action == "promoted" and c.get_model_version(name, forced.version).tags["data.key"] == "full-ed-0123"

    # inside one sweep: runs measured with another metric definition make the ranking meaningless
    mixed = unique("sweep")
    log_sweep(mlflow_server, mixed, ckpt, [
        {"name": "t0", "metrics": {"valid_acc": 0.95}, "params": {"metric_definition": "ppl: per-example"}},
        {"name": "t1", "metrics": {"valid_acc": 0.5}}], pyfunc=False)
    lines.clear()
    assert promote(mixed, "valid_acc", name=unique("escm"), tracking_uri=mlflow_server,
                   log=lines.append).action == "refused"
    assert any("measured on other data or metric definitions" in line and "ppl: per-example" in line
               for line in lines)


class WritesAMarker:
    """Unpickling this creates a file: the proof that a loader ran code from a pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("with_bundle", [False, True], ids=["pickle-only", "bundle-and-pickle"])
def test_a_version_carrying_a_malicious_pickle_never_runs_it(mlflow_server, tiny_checkpoint, tmp_path, with_bundle):
    """A registered version whose files hold a pickle that would create a marker file: serving refuses a
    version without a bundle, loads the bundle of one that has it, and never unpickles anything."""
    ckpt, _ = tiny_checkpoint
    c = MlflowClient(mlflow_server)
    exp, name = unique("sweep"), unique("escm")
    marker = tmp_path / "pwned"
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        if with_bundle:
            for f in bundle_of(ckpt).iterdir():
                (files / f.name).write_bytes(f.read_bytes())
        for evil in ("checkpoint.pt", "best.pt", "model.pkl"):
            (files / evil).write_bytes(pickle.dumps(WritesAMarker(marker)))
        exp_id = c.create_experiment(exp)
        parent = c.create_run(exp_id).info.run_id
        run_id = c.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
        c.log_metric(run_id, "valid_acc", 0.5)
        c.log_artifacts(run_id, tmp, "model")
        c.set_terminated(run_id, "FINISHED")
    promote(exp, "valid_acc", name=name, tracking_uri=mlflow_server, log=lambda s: None)

    if with_bundle:
        resolved = registry.resolve(f"models:/{name}@champion", mlflow_server)
        (answer,) = registry.load_responder(resolved).respond([Request(["I lost my keys again."])])
        assert isinstance(answer.response, str)
        registry.discard(resolved)
    else:
        with pytest.raises(registry.RegistryError, match=r"no serving bundle.*never loaded: best\.pt, checkpoint\.pt"):
            registry.resolve(f"models:/{name}@champion", mlflow_server)
    assert not marker.exists()


def test_cli_evaluate_a_registered_model_and_promote_dry_run(mlflow_server, tiny_checkpoint, tmp_path, sample_dir):
    from cluster.cli import app

    ckpt, final = tiny_checkpoint
    runner, name, exp = CliRunner(), unique("escm"), unique("sweep")
    log_sweep(mlflow_server, exp, ckpt, trials(0.5), pyfunc=False)
    base = ["--experiment", exp, "--metric", "valid_acc", "--name", name, "--tracking-uri", mlflow_server]
    dry = runner.invoke(app, ["promote", *base, "--dry-run"])
    assert dry.exit_code == 0 and "would_promote" in dry.output and "(dry run)" in dry.output, dry.output
    unknown = runner.invoke(app, ["promote", *base[:2], "--metric", "bleu", *base[4:]])
    assert unknown.exit_code == 2 and "unknown metric 'bleu'" in unknown.output
    assert runner.invoke(app, ["promote", *base]).exit_code == 0
    out = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", "--model", f"models:/{name}@champion", "--data",
                                 str(sample_dir / "ed_valid.jsonl"), "--split", "valid", "--out", str(out),
                                 "--tracking-uri", mlflow_server])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"].startswith(f"models:/{name}@champion (version 1, run ")
    # the registered bundle is the trained model: the trainer's own teacher-forced perplexity
    assert metrics["metrics"]["ppl"] == pytest.approx(final["valid_ppl"], rel=1e-3)
    missing = runner.invoke(app, ["evaluate", "--model", f"models:/{name}@nope", "--data", str(sample_dir),
                                  "--tracking-uri", mlflow_server])
    assert missing.exit_code == 2 and "no alias 'nope'" in missing.output
    both = runner.invoke(app, ["evaluate", "--model", f"models:/{name}@champion", "--checkpoint", str(ckpt),
                               "--data", "sample"])
    assert both.exit_code == 2 and "exactly one" in both.output
