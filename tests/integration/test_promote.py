"""Registry promotion on a real MLflow server: best child, refuse a worse model, force, rollback, tags."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cluster.mlflow.promotion import PromotionError, promote, rollback
from services import registry
from tests.integration.registry_models import log_sweep

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
        pytest.skip("services/pyfunc_model.py / cluster.mlflow.runs not present yet")
    ckpt, _ = tiny_checkpoint
    exp, name = unique("sweep"), unique("escm")
    ids = log_sweep(mlflow_server, exp, ckpt, trials(0.4), pyfunc=pyfunc)
    promote(exp, "valid_acc", "max", name=name, tracking_uri=mlflow_server, log=lambda s: None)
    source = MlflowClient(mlflow_server).get_model_version(name, "1").source
    assert source.startswith("models:/m-" if pyfunc else f"runs:/{ids['t0']}/model")

    resolved = registry.resolve(f"models:/{name}@champion", mlflow_server)
    assert (resolved.version, resolved.run_id) == ("1", ids["t0"]) and resolved.checkpoint.is_file()
    (answer,) = registry.load_responder(resolved).respond([{"context": ["I lost my keys again."]}])
    assert isinstance(answer["response"], str) and answer["emotion"] is not None
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
