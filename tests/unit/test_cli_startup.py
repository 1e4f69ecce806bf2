"""`edp` starts fast: importing the CLI and the run configs loads none of torch, Ray, MLflow or spaCy (the CUDA
build of torch alone takes seconds to import); each command imports what it needs when it runs."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ["torch", "ray", "mlflow", "spacy", "boto3"]


def test_cli_and_configs_import_no_heavy_library():
    code = ("import json, sys\n"
            "import cluster.cli, trainers.config\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
