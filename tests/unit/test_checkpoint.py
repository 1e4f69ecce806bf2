"""Checkpoint format, atomic save, pruning, loading, RNG state and code version (trainers.checkpoint)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.data.records import DataError


def test_save_is_atomic_and_prune_keeps_the_newest_step_checkpoints(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        path = ckpt.save({"format": ckpt.CHECKPOINT_FORMAT, "step": step}, ckpt.step_path(d, step))
    ckpt.save({"format": ckpt.CHECKPOINT_FORMAT, "step": 4}, d / "best.pt")
    assert path.name == "step_00000006.pt" and not list(d.glob("*.tmp"))
    ckpt.prune(d, keep=2)
    assert [p.name for p in ckpt.step_checkpoints(d)] == ["step_00000004.pt", "step_00000006.pt"]
    assert (d / "best.pt").exists() and ckpt.load(d / "best.pt")["step"] == 4


def test_load_names_a_missing_or_foreign_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ckpt.load(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="not an edp checkpoint"):
        ckpt.load(tmp_path / "other.pt")


def test_rng_state_round_trip():
    ckpt.seed_everything(3)
    state = ckpt.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.seed_everything(99)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_code_version_is_a_stable_hash():
    assert ckpt.code_version() == ckpt.code_version() and len(ckpt.code_version()) == 16


def test_inference_config_reads_its_part_of_a_run_config():
    from trainers.loop import TrainConfig

    run = TrainConfig(model="iamm", max_context=64, bf16=False, decode={"max_len": 5}, batch_size=3)
    cfg = ckpt.InferenceConfig.of_run(run.model_dump())
    assert (cfg.model, cfg.max_context, cfg.bf16, cfg.decode_config().max_len) == ("iamm", 64, False, 5)
    assert cfg.data == run.data
