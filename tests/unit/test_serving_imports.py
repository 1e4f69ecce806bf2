"""Import boundaries. Serving (services/*, trainers.inference) loads no training module: a replica needs no
training loop. The replica's logic (services/replica.py) is plain Python: no Ray, FastAPI, MLflow or torch. `edp`
itself starts without the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_MODULES = ["trainers.loop", "trainers.evaluation", "trainers.optim", "trainers.batching",
                    "trainers.train"]
NOT_IN_THE_REPLICA = ["ray", "fastapi", "starlette", "mlflow", "torch"]


def loaded_after(imports: str, modules: list[str]) -> list[str]:
    """Which of `modules` a fresh interpreter has loaded after `import <imports>` (a package is loaded as soon as
    any of its submodules is)."""
    code = ("import json, sys\n"
            f"import {imports}\n"
            f"print(json.dumps([m for m in {modules!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_imports_no_training_module():
    imports = "services.app, services.pyfunc_model, services.registry, services.replica, trainers.inference"
    assert loaded_after(imports, TRAINING_MODULES) == []


def test_the_replica_module_imports_no_ray_no_fastapi_no_mlflow_no_torch():
    assert loaded_after("services.replica", NOT_IN_THE_REPLICA) == []


def test_edp_starts_without_torch_ray_mlflow_spacy_or_boto3():
    """`edp` starts fast: the CLI and the run configs import none of the heavy libraries (the CUDA build of torch
    alone takes seconds); each command imports what it needs when it runs."""
    assert loaded_after("cluster.cli, trainers.config", ["torch", "ray", "mlflow", "spacy", "boto3"]) == []
