"""Regenerate the KubeRay CRD schemas the chart tests validate against.

Keeps only the served `v1` version's `openAPIV3Schema` of each CRD and drops the
human `description` strings (they carry no validation), written as compact JSON.

    python tests/helm/schemas/extract_crd_schemas.py ../shared/schemas/kuberay tests/helm/schemas
"""

import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node, parent_key=None):
    """Drop `description: <str>` keys, except where `description` is a property name."""
    if isinstance(node, dict):
        return {
            k: strip_descriptions(v, k)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str) and parent_key != "properties")
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(src: Path, dst: Path) -> None:
    for crd_file in sorted(src.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        kind = crd["spec"]["names"]["kind"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(v1["schema"]["openAPIV3Schema"])
        out = dst / f"{kind.lower()}-v1.json"
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{crd_file.name} -> {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
