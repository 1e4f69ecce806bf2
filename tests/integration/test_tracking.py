"""MLflow tracking against a real server: nested runs, run reuse, rank-0 logging, the pyfunc model."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from cluster.tracking.runs import RUN_ID_FILE, RunLogger, TrackingConfig, client, start_run
from trainers.metrics import METRIC_DEFINITION

pytestmark = pytest.mark.integration
RESPONSE_KEYS = {"response", "emotion", "emotion_top", "evidence", "screened", "screen"}


@pytest.fixture(scope="module")
def logged_run(mlflow_server, prepared_sample, tmp_path_factory):
    """A tiny ESCM trained 4 steps in-process and logged like a rank-0 Ray worker does."""
    from trainers.config import TrainConfig
    from trainers.loop import Trainer

    out = tmp_path_factory.mktemp("tracked")
    data = {"source": "sample", "cache_dir": str(prepared_sample.path.parent)}
    cfg = TrainConfig(model="escm", model_overrides={"flavour": "tiny"}, device="cpu", max_steps=4,
                      eval_every=2, log_every=1, warmup=20, lr_factor=2.0, batch_size=8, eval_generate=4,
                      num_samples=4, out_dir=str(out), data=data)
    tracking = TrackingConfig(uri=mlflow_server)
    experiment = f"tracking-{uuid.uuid4().hex[:8]}"
    parent = start_run(tracking, experiment, "parent")
    run_id = start_run(tracking, experiment, "child", parent_run_id=parent, run_id_file=out / RUN_ID_FILE)
    logger = RunLogger(mlflow_server, run_id)
    trainer = Trainer(cfg, prepared_sample, on_eval=lambda m, p: logger.log_eval(m, trainer.history))
    logger.log_setup(trainer, None)
    result = trainer.train()
    logger.log_final(trainer, result)
    return {"uri": mlflow_server, "run_id": run_id, "parent": parent, "out": out, "tracking": tracking,
            "experiment": experiment}


def test_child_run_is_nested_and_reused_on_retry(logged_run):
    c = client(logged_run["uri"])
    run = c.get_run(logged_run["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == logged_run["parent"]
    again = start_run(logged_run["tracking"], logged_run["experiment"], "child",
                      parent_run_id=logged_run["parent"], run_id_file=logged_run["out"] / RUN_ID_FILE)
    assert again == logged_run["run_id"]


def test_child_logs_config_versions_substitutions_metrics_and_artifacts(logged_run):
    c = client(logged_run["uri"])
    run = c.get_run(logged_run["run_id"])
    p = run.data.params
    assert p["config.model"] == "escm" and p["config.max_steps"] == "4" and p["model.d_model"] == "32"
    assert p["data.key"] and p["code.trainers_sha256"] and "substitution.parser" in p
    assert p["recipe"] == p["config.recipe"] == run.data.tags["recipe"] == "platform"  # the settings bundle
    assert any(k.startswith("substitution.knowledge") for k in p)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "valid_ppl")] == [2, 4]
    assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    assert "final_valid_ppl" in run.data.metrics and "final_valid_acc" in run.data.metrics
    # the papers' names: sampled Dist during training (with its sample size), whole-split Dist at the end only
    m = run.data.metrics
    assert [x.step for x in c.get_metric_history(run.info.run_id, "valid_dist_1_sampled")] == [2, 4]
    assert m["valid_sample_size"] == 4 and "valid_dist_1" not in m and "final_valid_dist_1_sampled" not in m
    assert {"final_valid_ppl_token", "final_valid_dist_1", "final_valid_dist_2", "final_valid_dist_1_nltk",
            "final_valid_dist_2_nltk"} <= set(m)
    assert p["eval.split"] == "valid" and p["metric_definition"] == METRIC_DEFINITION
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "vocab.json", "samples.jsonl", "metric_definitions.json", "plots"} <= names
    assert {a.path for a in c.list_artifacts(run.info.run_id, "plots")} == {
        "plots/emotion_confusion.png", "plots/loss_curve.png"}


def test_pyfunc_model_holds_the_bundle_a_signature_and_an_input_example(logged_run):
    from services.pyfunc_model import SIGNATURE
    from services.schemas import RespondRequest, RespondResponse

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{logged_run['run_id']}/model",
                                                     tracking_uri=logged_run["uri"]))
    assert sorted(p.name for p in (local / "artifacts" / "bundle").iterdir()) == [
        "config.json", "model.safetensors", "vocab.json"]
    assert not list(local.rglob("*.pt")) and not list(local.rglob("*.pkl"))
    info = mlflow.models.get_model_info(f"runs:/{logged_run['run_id']}/model")
    assert info.signature == SIGNATURE and (local / "input_example.json").is_file()
    # the signature is the HTTP schema's: same fields, same required ones (less the registry's `model`)
    assert {c.name: c.required for c in SIGNATURE.inputs.inputs} == {
        k: f.is_required() for k, f in RespondRequest.model_fields.items()}
    assert {c.name for c in SIGNATURE.outputs.inputs} == set(RespondResponse.model_fields) - {"model"}


def test_pyfunc_model_answers_the_http_json(logged_run):
    mlflow.set_tracking_uri(logged_run["uri"])
    model = mlflow.pyfunc.load_model(f"runs:/{logged_run['run_id']}/model")
    out = model.predict([{"context": ["I passed my driving test today!"], "situation": None},
                         {"context": ["My dog died.", "Oh no, I am sorry.", "Thanks."],
                          "situation": "sad day"}])
    assert len(out) == 2 and all(set(o) == RESPONSE_KEYS for o in out)
    assert isinstance(out[0]["response"], str) and isinstance(out[0]["emotion"], str)
    assert len(out[0]["emotion_top"]) == 3 and {"label", "prob"} == set(out[0]["emotion_top"][0])
    frame = model.predict(pd.DataFrame({"context": [["I lost my keys again."]], "situation": [None]}))
    assert set(frame[0]) == RESPONSE_KEYS
    with pytest.raises(Exception, match="context"):
        model.predict([{"context": []}])
    local = mlflow.artifacts.download_artifacts(f"runs:/{logged_run['run_id']}/model/requirements.txt")
    reqs = Path(local).read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and any(r.startswith("spacy==") for r in reqs)


def test_mlflow_models_predict_answers_like_the_endpoint(logged_run, tmp_path):
    """The `mlflow models predict` CLI on the logged model gives the Responder's (the endpoint's) answers."""
    import json
    import os
    import subprocess
    import sys

    from trainers.inference import Request, Responder

    requests = [{"context": ["I passed my driving test today!"], "situation": None},
                {"context": ["My dog died.", "Oh no, I am sorry.", "Thanks."], "situation": "sad day"}]
    (tmp_path / "in.json").write_text(json.dumps({"inputs": requests}))
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    done = subprocess.run([str(mlflow_cli), "models", "predict", "-m", f"runs:/{logged_run['run_id']}/model",
                           "-i", str(tmp_path / "in.json"), "-t", "json", "-o", str(tmp_path / "out.json"),
                           "--env-manager", "local"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": logged_run["uri"]})
    assert done.returncode == 0, done.stderr[-3000:]
    predicted = json.loads((tmp_path / "out.json").read_text())["predictions"]
    bundle = mlflow.artifacts.download_artifacts(f"runs:/{logged_run['run_id']}/model/artifacts/bundle",
                                                 dst_path=str(tmp_path / "dl"), tracking_uri=logged_run["uri"])
    expected = Responder.from_bundle(bundle).respond([Request(**r) for r in requests])
    assert predicted == [e.body() for e in expected] and all(set(e.body()) == RESPONSE_KEYS for e in expected)
