"""S3 paths end to end against a real SeaweedFS on 127.0.0.1 (conftest.s3_server).

1. An MLflow server with `--artifacts-destination s3://<bucket>/mlflow`: a trained run's artifacts and its
   pyfunc model land in the bucket and load back. Only the server holds S3 credentials: the client side
   (this process and the process loading the model) runs with no AWS_* variables.
2. Ray Train checkpoints to `s3://<bucket>/ray` (endpoint and credentials from AWS_* on the driver only)
   and, after an injected worker failure, resumes from the checkpoint stored there.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cluster.tracking.runs import RUN_ID_FILE, RunLogger, TrackingConfig, client, end_run, start_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
RESPONSE_KEYS = {"response", "emotion", "emotion_top", "evidence", "screened", "screen"}


def keys_under(s3, bucket: str, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def without_aws(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """`env` with no AWS_* / MLFLOW_S3_* settings and no ~/.aws files: no way to reach S3 directly."""
    env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "MLFLOW_S3_"))}
    return {**env, "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")}


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    for name in [k for k in os.environ if k.startswith(("AWS_", "MLFLOW_S3_"))]:
        monkeypatch.delenv(name)
    for k, v in without_aws({}, tmp_path).items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def bucket(s3_server):
    name = f"edp-paths-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def s3_mlflow(s3_server, bucket, tmp_path_factory):
    """An MLflow server proxying artifacts to s3://<bucket>/mlflow; S3 credentials only in its env."""
    from cluster.local.services import start_mlflow

    t0 = time.perf_counter()
    service = start_mlflow(tmp_path_factory.mktemp("mlflow-s3"), artifacts_destination=f"s3://{bucket}/mlflow",
                           env={"AWS_ACCESS_KEY_ID": s3_server.access_key,
                                "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                                "MLFLOW_S3_ENDPOINT_URL": s3_server.url,
                                "AWS_DEFAULT_REGION": "us-east-1"})
    print(f"\nMLflow server with S3 artifact proxy up in {time.perf_counter() - t0:.1f} s")
    yield service
    service.stop()


def test_mlflow_run_artifacts_and_model_land_in_s3_and_load_back(s3_server, bucket, s3_mlflow, prepared_sample,
                                                                no_aws_env, tmp_path):
    from trainers.config import TrainConfig, load_config
    from trainers.loop import Trainer

    t0 = time.perf_counter()
    cfg = load_config(TrainConfig, model="escm", out_dir=str(tmp_path / "out"), device="cpu", use_vectors=False,
                      data={"source": "sample", "cache_dir": str(prepared_sample.path.parent)},
                      model_overrides={"flavour": "tiny"}, warmup=20, lr_factor=2.0, batch_size=8, max_steps=4,
                      eval_every=4, log_every=1, eval_generate=2, num_samples=1, max_target=20,
                      decode={"max_len": 12})
    tracking = TrackingConfig(uri=s3_mlflow.url, experiment=f"s3-{uuid.uuid4().hex[:6]}")
    run_id = start_run(tracking, tracking.experiment, "s3-run", tags={"model": "escm"})
    logger = RunLogger(s3_mlflow.url, run_id)
    trainer = Trainer(cfg, prepared_sample, log=lambda s: None,
                      on_eval=lambda metrics, _: logger.log_eval(metrics, trainer.history))
    logger.log_setup(trainer, None)
    result = trainer.train()
    logger.log_final(trainer, result)  # vocab, samples, plots, final metrics, pyfunc model with its bundle
    end_run(s3_mlflow.url, run_id)
    t_log = time.perf_counter() - t0

    run = client(s3_mlflow.url).get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never sees s3://
    s3 = s3_server.client()
    run_prefix = f"mlflow/{run.info.experiment_id}/{run_id}/artifacts/"
    run_keys = {k.removeprefix(run_prefix) for k in keys_under(s3, bucket, run_prefix)}
    assert {"config.yaml", "vocab.json", "samples.jsonl", "final_metrics.json", "plots/loss_curve.png",
            "plots/emotion_confusion.png"} <= run_keys
    stored = json.loads(s3.get_object(Bucket=bucket, Key=run_prefix + "final_metrics.json")["Body"].read())
    assert stored == pytest.approx(result["final"], nan_ok=True)
    mlmodel = [k for k in keys_under(s3, bucket, "mlflow/") if k.endswith("/MLmodel")]
    assert len(mlmodel) == 1, mlmodel  # the logged model, with its serving bundle beside it
    model_keys = keys_under(s3, bucket, mlmodel[0].removesuffix("MLmodel"))
    assert {f"artifacts/bundle/{f}" for f in ("model.safetensors", "config.json", "vocab.json")} <= {
        k.removeprefix(mlmodel[0].removesuffix("MLmodel")) for k in model_keys}, model_keys
    assert not any(k.endswith(".pt") for k in model_keys), model_keys
    assert any("/code/trainers/" in k for k in model_keys)

    # the model loads back through the server's proxy in a fresh process without any S3 credentials
    t1 = time.perf_counter()
    requests = [{"context": ["I got a new puppy!"]},
                {"context": ["My flight got cancelled.", "Oh no, what happened?"], "situation": "stuck"}]
    code = (f"import json, mlflow; m = mlflow.pyfunc.load_model('runs:/{run_id}/model'); "
            f"print(json.dumps(m.predict(json.loads({json.dumps(requests)!r}))))")
    env = {**without_aws(dict(os.environ), tmp_path), "MLFLOW_TRACKING_URI": s3_mlflow.url,
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(answers) == 2 and all(set(a) == RESPONSE_KEYS for a in answers)
    assert all(isinstance(a["response"], str) and a["emotion_top"] for a in answers)
    print(f"\ntrain 4 steps + log run and model to S3 via the proxy: {t_log:.1f} s; "
          f"load + predict in a fresh process: {time.perf_counter() - t1:.1f} s")


@pytest.mark.slow
def test_ray_train_checkpoints_to_s3_and_resumes_from_there(s3_server, bucket, s3_mlflow, ray_local,
                                                            prepared_sample, worker_fails_once, monkeypatch,
                                                            tmp_path):
    import torch

    from cluster.distributed.ddp import RayTrainConfig, run_train

    # S3 endpoint and credentials on the driver only (the Ray workers of `ray_local` never had them)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    name = f"s3-ddp-{uuid.uuid4().hex[:6]}"
    cfg = RayTrainConfig.model_validate({
        "name": name, "storage_path": f"s3://{bucket}/ray", "max_failures": 1,
        "train": {"model": "escm", "model_overrides": {"flavour": "tiny"}, "device": "cpu", "max_steps": 8,
                  "eval_every": 4, "log_every": 1, "warmup": 20, "lr_factor": 2.0, "batch_size": 8,
                  "eval_generate": 2, "num_samples": 1, "out_dir": str(tmp_path / "out"),
                  "data": {"source": "sample", "cache_dir": str(prepared_sample.path.parent)}},
        "scaling": {"workers": 2, "cpus_per_worker": 0.9},
        "tracking": {"uri": s3_mlflow.url, "experiment": name, "log_model": False}})
    t0 = time.perf_counter()
    result = run_train(cfg)
    print(f"\n2-worker TorchTrainer, checkpoints in S3, one injected failure: {time.perf_counter() - t0:.1f} s")

    m = result["metrics"]
    assert m["step"] == 8 and m["resumed_from_step"] == 4  # resumed from the step-4 checkpoint, not from 0
    assert (tmp_path / "out" / ".failure_injected").read_text() == str(worker_fails_once) == "6"
    assert result["checkpoint"].startswith(f"{bucket}/ray/{name}/")  # a path on the S3 filesystem

    s3 = s3_server.client()
    keys = keys_under(s3, bucket, f"ray/{name}/")
    checkpoints = sorted(k for k in keys if k.endswith("/checkpoint.pt"))
    assert len(checkpoints) == 2, keys  # steps 4 and 8 (num_to_keep=2)
    steps = []
    for key in checkpoints:
        state = torch.load(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()),
                           map_location="cpu", weights_only=False)
        steps.append(state["step"])
        run_id_key = key.removesuffix("checkpoint.pt") + RUN_ID_FILE
        assert s3.get_object(Bucket=bucket, Key=run_id_key)["Body"].read().decode() == result["run_id"]
    assert sorted(steps) == [4, 8]
    assert f"{result['checkpoint']}/checkpoint.pt".removeprefix(f"{bucket}/") in checkpoints

    run = client(s3_mlflow.url).get_run(result["run_id"])  # one MLflow run across the retry
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == "4"
    run_prefix = f"mlflow/{run.info.experiment_id}/{result['run_id']}/artifacts/"
    assert "final_metrics.json" in {k.removeprefix(run_prefix) for k in keys_under(s3, bucket, run_prefix)}


@pytest.mark.slow
def test_sweep_stores_its_trials_in_s3_with_the_drivers_endpoint(s3_server, bucket, s3_mlflow, ray_local,
                                                                 prepared_sample, monkeypatch, tmp_path):
    """The smoke sweep with storage_path s3://: Tune's experiment state and every trial's checkpoints land in
    the bucket, with the endpoint and keys known to the driver only."""
    from cluster.distributed.tuning import load_sweep, run_sweep

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    experiment = f"s3-sweep-{uuid.uuid4().hex[:6]}"
    smoke = ROOT / "cluster" / "configs" / "sweeps" / "smoke.yaml"
    cfg = load_sweep(smoke, [f"base.data.cache_dir={prepared_sample.path.parent}", f"name={experiment}",
                             f"storage_path=s3://{bucket}/sweeps", f"work_dir={tmp_path}/work",
                             f"tracking.uri={s3_mlflow.url}", f"tracking.experiment={experiment}",
                             "tracking.log_model=false"])
    summary = run_sweep(cfg)
    assert summary["errors"] == [] and summary["trials"] == 3

    keys = keys_under(s3_server.client(), bucket, f"sweeps/{experiment}/")
    assert any(k.endswith("tuner.pkl") for k in keys), keys[:20]
    trials = {k.split("/")[2] for k in keys if k.endswith("/checkpoint.pt")}
    assert len(trials) == 3, keys  # every trial checkpointed into the bucket
    # the driver's prepared data is published beside the checkpoints, under its cache key, for other nodes
    assert f"sweeps/prepared/{prepared_sample.manifest['key']}/manifest.json" in \
        keys_under(s3_server.client(), bucket, "sweeps/prepared/")

    # one trial of 2 DDP workers: its TorchTrainer is built inside the trial actor, which has no AWS_*
    # settings, so the storage it writes to must be the one resolved on the driver
    ddp = f"{experiment}-ddp"
    cfg = load_sweep(smoke, [f"base.data.cache_dir={prepared_sample.path.parent}", f"name={ddp}",
                             f"storage_path=s3://{bucket}/sweeps", f"work_dir={tmp_path}/work",
                             f"tracking.uri={s3_mlflow.url}", f"tracking.experiment={ddp}",
                             "tracking.log_model=false", "resources.workers=2", "resources.cpu=0.8",
                             "resources.driver_cpu=0.1", "max_concurrent_trials=1"])
    cfg = cfg.model_copy(update={"variants": cfg.variants[1:2]})  # escm only
    summary = run_sweep(cfg)
    assert summary["errors"] == [] and summary["trials"] == 1
    keys = keys_under(s3_server.client(), bucket, f"sweeps/{ddp}-")  # the trial's TorchTrainer run
    assert any(k.endswith("/checkpoint.pt") for k in keys), keys[:20]


def test_ray_storage_filesystem_takes_endpoint_and_keys_from_the_driver(s3_server, bucket, monkeypatch, tmp_path):
    """What Ray ships to its controller and workers works in a process with no AWS_* settings."""
    from cluster.distributed.ddp import storage_location

    assert storage_location("runs/ray") == (None, str(Path("runs/ray").resolve()))
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    host = s3_server.url.removeprefix("http://")
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", s3_server.url)
        from_env = storage_location(f"s3://{bucket}/ray")
    from_query = storage_location(f"s3://{bucket}/ray?endpoint_override={host}&scheme=http")
    write = ("import pickle, sys, pyarrow.fs; fs, path = pickle.loads(sys.stdin.buffer.read()); "
             "f = fs.open_output_stream(path + '/probe.txt'); f.write(path.encode()); f.close()")
    for i, (fs, path) in enumerate((from_env, from_query)):
        assert path == f"{bucket}/ray"
        proc = subprocess.run([sys.executable, "-c", write], input=pickle.dumps((fs, f"{path}/{i}")),
                              capture_output=True, env=without_aws(dict(os.environ), tmp_path), timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()[-2000:]
        body = s3_server.client().get_object(Bucket=bucket, Key=f"ray/{i}/probe.txt")["Body"].read()
        assert body == f"{bucket}/ray/{i}".encode()
