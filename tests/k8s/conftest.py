"""The control plane (tests/k8s/control_plane.py), started once per session, and the process kubelet
(tests/k8s/kubelet.py), once per module that asks for it; both skip where they cannot run."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.k8s import toolchain
from tests.k8s.api import Api
from tests.k8s.control_plane import KUBECTL, NEEDED, ControlPlane
from tests.k8s.kubelet import Kubelet

REPO = Path(__file__).resolve().parents[2]


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


@pytest.fixture(scope="module")
def kubelet(control_plane, tmp_path_factory):
    """Two process-kubelet nodes (edp-node-0, edp-node-1) for a test module; every pod, netns, veth, the bridge
    and the nodes are removed afterwards, also when a test failed."""
    for tool in ("ip", "nsenter", "chroot"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} is not on PATH (the process kubelet needs it)")
    ca = control_plane.dir / "certs" / "apiserver.crt"  # the API server's own, with its CA
    kubelet = Kubelet(Api(control_plane.server, control_plane.token, str(ca)), tmp_path_factory.mktemp("kubelet"),
                      checkout=REPO, venv=Path(sys.prefix), ca=ca.read_bytes(), nodes=2, backoff_s=1.0)
    with kubelet:
        yield kubelet
