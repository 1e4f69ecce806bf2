"""The serving model format: weights in safetensors, a JSON config and the vocabulary, in one directory.

    bundle/
      model.safetensors   the model's parameters and buffers (tensors only: the format cannot carry code)
      config.json         {"format": "edp-bundle/1", "model_name", "model_config", "train_config", "data_key"}
      vocab.json          the vocabulary (trainers.data.vocab format)

    save_bundle("bundle", cfg, model, vocab, data_key=manifest["key"])
    config, model, vocab = load_bundle("bundle")   # config: the run's TrainConfig as a dict

`load_bundle` reads JSON and safetensors only; nothing is ever unpickled, so a bundle downloaded from the
registry cannot run code when it is loaded. Training checkpoints (`*.pt`: pickled, optimizer and RNG
state) serve `Trainer.resume` only; what is registered and served is a bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from trainers.checkpoint import InferenceConfig
from trainers.data.records import DataError
from trainers.data.vocab import Vocab
from trainers.device import resolve_device
from trainers.models import build_model

BUNDLE_FORMAT = "edp-bundle/1"
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


class BundleError(DataError):
    """Not a serving bundle (missing or malformed file); says which file and what to do."""


def save_bundle(out_dir: str | Path, cfg: InferenceConfig, model: torch.nn.Module, vocab: Vocab,
                data_key: str | None = None) -> Path:
    """Write `model`'s weights, its resolved config and `vocab` into `out_dir` (created); returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"format": BUNDLE_FORMAT, "model": cfg.model})
    config = {"format": BUNDLE_FORMAT, "model_name": cfg.model, "model_config": vars(model.cfg),
              "train_config": cfg.model_dump(mode="json"), "data_key": data_key}
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    vocab.save(out / VOCAB)
    return out


def is_bundle(path: Path) -> bool:
    return all((path / f).is_file() for f in (WEIGHTS, CONFIG, VOCAB))


def find_bundle(root: str | Path) -> Path | None:
    """The shallowest directory under `root` (itself included) that holds a bundle's three files."""
    root = Path(root)
    candidates = [root, *sorted((p.parent for p in root.rglob(CONFIG)), key=lambda p: (len(p.parts), str(p)))]
    return next((p for p in candidates if is_bundle(p)), None)


def read_config(path: str | Path) -> dict:
    """The bundle's config.json, checked for the format."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {file}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file} is not an edp bundle config (expected format {BUNDLE_FORMAT!r})")
    return config


def load_bundle(path: str | Path, device: str = "cpu") -> tuple[dict, torch.nn.Module, Vocab]:
    """Rebuild (run config as saved, model with weights, vocabulary) from a bundle directory: JSON + safetensors
    only (the same triple as `trainers.checkpoint.load_model`)."""
    path = Path(path)
    if not is_bundle(path):
        pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        raise BundleError(f"{path} is not a serving bundle: it needs {WEIGHTS}, {CONFIG} and {VOCAB}"
                          + (f"; pickled files are never loaded for serving ({', '.join(pickles)})" if pickles else "")
                          + ". Export one from a training checkpoint with trainers.evaluate.export_bundle.")
    config = read_config(path)
    vocab = Vocab.load(path / VOCAB)
    model = build_model(config["model_name"], len(vocab), vocab.emotion_ids(), **config["model_config"])
    try:
        load_model(model, str(path / WEIGHTS), strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise BundleError(f"{path / WEIGHTS} does not match the model of {path / CONFIG}: {e}") from e
    return config["train_config"], model.to(resolve_device(device)).eval(), vocab
