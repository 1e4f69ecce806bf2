"""Serving (services/*, trainers.inference) loads no training module: a replica needs no training loop."""

from __future__ import annotations

import json
import subprocess
import sys

TRAINING_MODULES = ["trainers.loop", "trainers.evaluation", "trainers.optim", "trainers.batching",
                    "trainers.train"]


def test_serving_imports_no_training_module():
    code = ("import json, sys\n"
            "import services.app, services.pyfunc_model, services.registry, trainers.inference\n"
            f"print(json.dumps([m for m in {TRAINING_MODULES!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
