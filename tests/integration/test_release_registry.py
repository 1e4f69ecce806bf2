"""A released model (trainers.release) registered on a real MLflow server (`edp models register`): a version holding
the same bundle, tagged with its card, loaded back through services/registry.py as serving loads any version."""

from __future__ import annotations

import uuid

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from cluster.cli import app
from cluster.tracking.releases import register_release
from services import registry
from trainers import release
from trainers.data.sources import EMBEDDED_SAMPLE
from trainers.inference import Request

pytestmark = pytest.mark.integration


def test_a_release_registers_as_a_version_that_the_registry_loads(mlflow_server, tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "models" / "escm-tiny"
    card = release.release(ckpt, out, source=str(EMBEDDED_SAMPLE), split="valid", commit="abc123", log=lambda s: None)
    name = f"released-{uuid.uuid4().hex[:8]}"
    first = register_release(out, name, alias="champion", tracking_uri=mlflow_server, log=lambda s: None)

    c = MlflowClient(mlflow_server)
    mv = c.get_model_version(name, first.version)
    metrics = card["evaluation"]["metrics"]
    assert mv.tags["valid_acc"] == repr(float(metrics["acc"])) and mv.tags["valid_ppl"] == repr(float(metrics["ppl"]))
    assert mv.tags["metric.final_valid_dist_1"] == repr(float(metrics["dist_1"]))
    assert mv.tags["source"] == f"release:{out}" and mv.tags["bundle_sha256"] == card["bundle_sha256"]
    assert mv.tags["code.git_commit"] == "abc123" and mv.run_id == first.run_id

    resolved = registry.resolve(f"models:/{name}@champion", mlflow_server, cache_dir=tmp_path / "cache")
    try:  # the very files of the release, loaded as serving loads a version
        assert release.bundle_sha256(release.file_records(resolved.bundle)) == card["bundle_sha256"]
        (answer,) = registry.load_responder(resolved, warm_up=False).respond([Request(["I lost my keys again."])])
        assert isinstance(answer.response, str) and answer.emotion
    finally:
        registry.discard(resolved)

    result = CliRunner().invoke(app, ["models", "register", str(out), "--name", name, "--alias", "champion",
                                      "--tracking-uri", mlflow_server])
    assert result.exit_code == 0, result.output
    aliases = {a: str(v) for a, v in c.get_registered_model(name).aliases.items()}
    assert aliases["previous"] == first.version and aliases["champion"] != first.version


def test_register_refuses_a_directory_that_does_not_match_its_card(mlflow_server, tiny_checkpoint, tmp_path):
    ckpt, _ = tiny_checkpoint
    out = tmp_path / "escm-tiny"
    release.release(ckpt, out, log=lambda s: None)
    (out / "vocab.json").write_text((out / "vocab.json").read_text() + " ")
    result = CliRunner().invoke(app, ["models", "register", str(out), "--name", "never-registered",
                                      "--tracking-uri", mlflow_server])
    assert result.exit_code == 2 and "vocab.json" in result.output
