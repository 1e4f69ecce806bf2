"""The Kubernetes toolchain's pins agree with each other (offline: reads the wrapper modules' go.mod files)."""

from __future__ import annotations

import re

from tests.k8s.toolchain import K8S_VERSION, MODULES, TOOLS, tool_dir


def _go_mod(name: str) -> str:
    return (MODULES / name / "go.mod").read_text()


def test_kubernetes_wrapper_requires_the_pinned_release_and_replaces_every_staging_module_by_it():
    text = _go_mod("kubernetes")
    assert f"require k8s.io/kubernetes {K8S_VERSION}" in text
    staging = re.findall(r"^\s*(k8s\.io/[\w-]+) => (k8s\.io/[\w-]+) (v\S+)$", text, re.MULTILINE)
    assert len(staging) >= 30, "the wrapper must replace each staging module k8s.io/kubernetes points at ./staging"
    published = "v0." + K8S_VERSION.removeprefix("v1.")
    assert all(a == b and v == published for a, b, v in staging), staging
    assert (MODULES / "kubernetes" / "go.sum").stat().st_size > 0


def test_every_wrapper_module_is_pinned_and_every_tool_has_its_own_cache_dir():
    etcd = next(t for t in TOOLS if t.name == "etcd")
    assert f"require go.etcd.io/etcd/server/v3 {etcd.version}" in _go_mod("etcd")
    for tool in TOOLS:
        assert re.fullmatch(r"v\d+\.\d+\.\d+", tool.version), tool
        assert tool_dir(tool).name == f"{tool.name}-{tool.version}"
        if tool.module:
            assert (MODULES / tool.module / "go.sum").is_file(), tool.module
    kubernetes = next(t for t in TOOLS if t.name == "kubernetes")
    assert f"-X k8s.io/component-base/version.gitVersion={K8S_VERSION}" in kubernetes.ldflags


def test_the_operator_brings_its_own_crds_at_its_version():
    kuberay = next(t for t in TOOLS if t.name == "kuberay")
    assert ("config/crd/bases", "crds") in kuberay.module_files


def test_every_tool_built_from_the_kubernetes_wrapper_is_imported_by_its_tools_go():
    """go.sum covers a package only when the wrapper module imports it: a tool added to TOOLS without its line in
    tools.go would not build offline from the pinned sums."""
    tools_go = (MODULES / "kubernetes" / "tools.go").read_text()
    built = [p for t in TOOLS if t.module == "kubernetes" for p in t.packages]
    assert "k8s.io/kubernetes/cmd/kube-scheduler" in built
    for package in built:
        assert f'_ "{package}"' in tools_go, package
    assert {t.version for t in TOOLS if t.module == "kubernetes"} == {K8S_VERSION}
