"""The control plane (tests/k8s/control_plane.py), started once per session; skips where it cannot run."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.k8s import toolchain
from tests.k8s.control_plane import KUBECTL, NEEDED, ControlPlane


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    built = toolchain.binaries()
    missing = [name for name in NEEDED if name not in built] + ([] if toolchain.kuberay_crds() else ["KubeRay CRDs"])
    if missing:
        pytest.skip(f"Kubernetes toolchain not built ({', '.join(missing)} missing): run `make k8s-tools`")
    for tool in (KUBECTL, "unshare", "openssl"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not on PATH")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs as root (it will give pods their own namespaces)")
    with ControlPlane(built, toolchain.kuberay_crds(), tmp_path_factory.mktemp("k8s")) as cp:
        yield cp
