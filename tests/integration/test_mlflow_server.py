"""The MLflow tracking server the platform starts is real: runs and artifacts go through HTTP."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_server_records_a_run_with_an_artifact(mlflow_server, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    exp = client.create_experiment("smoke")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "valid_acc", 0.5, step=3)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    assert client.get_metric_history(run.info.run_id, "valid_acc")[0].step == 3
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["note.txt"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")   # proxied by the server, not a local path
