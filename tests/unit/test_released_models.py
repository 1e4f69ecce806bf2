"""The released models in the repo's models/ folder: each one's files match its card (sha256), it loads, its card.md
is its card.json rendered, and it fits the size limit; with ED_DATA_DIR, `edp evaluate --model` reproduces its
card's metrics exactly. Before anything is released, the same check runs on a tiny release made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from tests.integration.registry_models import train_tiny
from trainers import artifacts, release

FLOAT_SUMS = {"loss", "ppl", "ppl_token"}
RELEASED = sorted(d for d in release.MODELS_DIR.iterdir() if d.is_dir() and not d.name.startswith(".")) \
    if release.MODELS_DIR.is_dir() else []


def check_released(root: Path) -> list[release.Released]:
    """What every released model under `root` must satisfy; the rows checked."""
    rows = release.released_models(root)
    for r in rows:
        assert r.ok, f"{r.path}: {r.problems}"
        assert (r.path / release.CARD_MD).read_text() == release.render_card(r.card), f"{r.path}: card.md is stale"
        assert sum(f["bytes"] for f in r.card["files"].values()) <= release.MAX_BUNDLE_BYTES
        loaded = artifacts.load(r.path)
        assert loaded.weights_dtype == r.card["model"]["weights_dtype"]
        assert sum(p.numel() for p in loaded.model.parameters()) == r.card["model"]["params"]
        assert r.card["data"]["licence"].startswith("CC BY-NC 4.0")
    return rows


def test_the_released_models_match_their_cards(prepared_sample, tmp_path):
    rows = check_released(release.MODELS_DIR)
    assert [r.path for r in rows] == RELEASED
    if rows:
        return
    # nothing released yet: the same check on a tiny release, and it catches a changed file
    checkpoint = train_tiny(prepared_sample, tmp_path / "run", max_steps=2)[0]
    release.release(checkpoint, tmp_path / "models" / "tiny", log=lambda s: None)
    assert [r.path.name for r in check_released(tmp_path / "models")] == ["tiny"]
    config = tmp_path / "models" / "tiny" / artifacts.CONFIG
    config.write_text(config.read_text().replace('"escm"', '"iamm"', 1))
    with pytest.raises(AssertionError, match="config.json"):
        check_released(tmp_path / "models")


def _has_split(data_dir: Path, split: str) -> bool:
    return (data_dir / f"ed_{split}.jsonl").is_file() or (data_dir / f"{split}.csv").is_file()


@pytest.mark.slow
@pytest.mark.fulldata
@pytest.mark.parametrize("directory", RELEASED, ids=[d.name for d in RELEASED])
def test_edp_evaluate_reproduces_the_cards_metrics_on_ed(directory, ed_data_dir, tmp_path):
    card = release.read_card(directory)
    if card["evaluation"] is None:
        pytest.skip(f"{directory.name}'s card has no metrics")
    split = card["evaluation"]["split"]
    if not _has_split(ed_data_dir, split):
        pytest.skip(f"ED_DATA_DIR has no {split} split")
    result = CliRunner().invoke(app, ["evaluate", "--model", str(directory), "--data", str(ed_data_dir),
                                      "--split", split, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["examples"] == card["evaluation"]["examples"]
    got, want = metrics["metrics"], card["evaluation"]["metrics"]
    assert want.keys() <= got.keys()  # a card made before a metric existed (distinct_responses) lacks it
    for name, value in want.items():
        if name in FLOAT_SUMS:  # sums of float NLL: their last bits follow the thread count and the CPU
            assert got[name] == pytest.approx(value, rel=1e-6), name
        else:  # counts (Acc, Dist, BLEU): every digit the card prints, and more (half its last digit, x100)
            assert got[name] == pytest.approx(value, abs=5e-5), name


def test_ray_job_uploads_leave_the_released_bundles_out():
    """`ray job submit --working-dir .` (README, the demo's sweep) reads .rayignore: no job needs models/."""
    from ray._private.runtime_env.packaging import get_excludes_from_ignore_files

    root = release.MODELS_DIR.parent
    excluded = get_excludes_from_ignore_files(root, include_gitignore=True)
    assert any(f(root / "models" / "escm-ed" / "model.safetensors") for f in excluded)
    assert not any(f(root / "cluster" / "demo.py") for f in excluded)
    assert not any(f(root / "trainers" / "release.py") for f in excluded)
