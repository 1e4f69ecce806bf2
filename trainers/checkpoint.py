"""Trainer checkpoints: the format, atomic save and pruning, loading, RNG state and code version.

A checkpoint describes itself (nanoGPT style): the resolved run config, the model name and config, the
vocabulary, the prepared data's key, the code version, the step and the training state, so that it can
resume a run (`trainers.loop.Trainer`), be evaluated (`trainers.evaluate`) or be served
(`trainers.inference`) with nothing else at hand. Serving reads only the part of the run config
that inference needs (`InferenceConfig`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from trainers.config import StrictModel
from trainers.data.prepare import DataConfig
from trainers.data.records import DataError
from trainers.data.vocab import Vocab
from trainers.decoding import DecodeConfig
from trainers.device import resolve_device
from trainers.models import build_model

CHECKPOINT_FORMAT = "edp-checkpoint/1"
TRAINERS_DIR = Path(__file__).resolve().parent


class InferenceConfig(StrictModel):
    """The run settings a trained model is used with: architecture, preprocessing, lengths, precision, decoding."""

    model: Literal["transformer", "escm", "iamm"] = "escm"
    data: DataConfig = Field(default_factory=DataConfig)
    max_context: int = Field(400, ge=8)
    max_target: int = Field(60, ge=4)
    bf16: bool = Field(True, description="bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX)")
    decode: dict[str, Any] = Field(default_factory=dict, description="DecodeConfig fields")

    @model_validator(mode="after")
    def _check_decode(self) -> InferenceConfig:
        DecodeConfig(**self.decode)  # fail early on bad decoding settings
        return self

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(**self.decode)

    @classmethod
    def of_run(cls, config: dict) -> InferenceConfig:
        """The inference part of a checkpoint's run config (a dumped `TrainConfig`)."""
        return cls.model_validate({k: v for k, v in config.items() if k in cls.model_fields})


# ------------------------------------------------------------------------------------------------
# Save, prune, load


def save(state: dict, path: Path) -> Path:
    """Write `state` to `path` atomically (a reader never sees a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def step_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def step_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The `step_*.pt` checkpoints in `ckpt_dir`, oldest first."""
    return sorted(ckpt_dir.glob("step_*.pt"))


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (`best.pt` is never pruned)."""
    for old in step_checkpoints(ckpt_dir)[:-keep]:
        old.unlink()


def load(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's state dict; `DataError` when the file is missing or not an edp checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not an edp checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def load_model(path: str | Path, device: str = "cpu") -> tuple[dict, torch.nn.Module, Vocab]:
    """Rebuild (run config as saved, model with weights in eval mode, vocabulary) from a checkpoint file."""
    dev = resolve_device(device)
    return model_from_state(load(path, dev), dev)


def model_from_state(state: dict, dev: torch.device) -> tuple[dict, torch.nn.Module, Vocab]:
    """`load_model` of a checkpoint already loaded."""
    vocab = Vocab(state["vocab"])
    model = build_model(state["model_name"], len(vocab), vocab.emotion_ids(), **state["model_config"])
    model.load_state_dict(state["model"])
    return state["config"], model.to(dev).eval(), vocab


@functools.cache
def code_version() -> str:
    """Hash of the trainers/ source that wrote the checkpoint."""
    h = hashlib.sha256()
    for f in sorted(TRAINERS_DIR.rglob("*.py")):
        h.update(str(f.relative_to(TRAINERS_DIR)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# RNG state (resume reproduces the uninterrupted run)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
