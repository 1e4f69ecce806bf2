"""What a training run writes and what everything else loads: training checkpoints and serving bundles.

A training checkpoint (`*.pt`, pickled) describes itself (nanoGPT style): the resolved run config, the model
name and config, the vocabulary, the prepared data's key, the hash of the trainers/ source that wrote it, the
step and the training state (optimizer, schedule, RNG), so that it can resume a run (`trainers.loop.Trainer`),
be evaluated or be exported with nothing else at hand. It is written atomically and pruned to the newest few.

A serving bundle is what is registered and served; nothing in it is ever unpickled, so a bundle downloaded
from the registry cannot run code when it is loaded:

    bundle/
      model.safetensors   the model's parameters and buffers (tensors only: the format cannot carry code)
      config.json         {"format": "edp-bundle/1", "model_name", "model_config", "train_config", "data_key",
                           "weights_dtype"}: float32, float16 (a release's halved weights, cast back to float32
                           on load: the model always runs in float32 on the CPU) or "int8-rowcol+fp16" (the big
                           matrices int8 with a float32 scale per row, the rest float16: trainers.quantize;
                           dequantized to float32 on load)
      vocab.json          the vocabulary (trainers.data.vocab format)

One way to load a model, whatever holds it:

    loaded = load("runs/train/checkpoints/best.pt")     # a training checkpoint file
    loaded = load("bundle/")                            # a serving bundle directory (JSON + safetensors)
    # a registry URI (models:/escm@champion): services.registry resolves it and downloads its bundle, then
    # hands that directory to load()
    loaded.model, loaded.vocab, loaded.train_config(), loaded.inference_config(), loaded.data_key
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_model as save_safetensors

from trainers import quantize
from trainers.config import InferenceConfig, TrainConfig, as_recorded
from trainers.data.records import DataError
from trainers.data.vocab import Vocab
from trainers.device import resolve_device
from trainers.models import build_model

CHECKPOINT_FORMAT = "edp-checkpoint/1"
BUNDLE_FORMAT = "edp-bundle/1"
WEIGHTS, CONFIG, VOCAB = "model.safetensors", "config.json", "vocab.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
REGISTRY_SCHEME = "models:/"
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}  # the bundle weights cast to one dtype
INT8 = quantize.FORMAT  # the other way a bundle's weights may be stored
WEIGHT_FORMATS = (*WEIGHT_DTYPES, INT8)
TRAINERS_DIR = Path(__file__).resolve().parent


class BundleError(DataError):
    """Not a serving bundle (missing or malformed file); says which file and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A trained model ready to use: weights loaded, on its device, in eval mode."""

    run_config: dict            # the run's config as saved (a dumped TrainConfig)
    model: torch.nn.Module
    vocab: Vocab
    data_key: str | None        # the prepared data's key (trainers.data.prepare), when recorded
    weights_dtype: str = "float32"  # how the weights were stored (the model itself is float32)

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(as_recorded(self.run_config))

    def inference_config(self) -> InferenceConfig:
        """Only the part of the run config that inference needs (what serving reads)."""
        return InferenceConfig.of_run(self.run_config)


def load(source: str | Path, device: str = "cpu", *, bundle_only: bool = False) -> LoadedModel:
    """The model held by `source`: a training checkpoint file or a serving bundle directory. `bundle_only`
    refuses anything but a bundle (serving: nothing is unpickled). A `models:/` URI is the registry's to resolve
    (services.registry downloads its bundle first), and is refused here with a message that says so."""
    if str(source).startswith(REGISTRY_SCHEME):
        raise DataError(f"{source} is a registry URI: resolve it through the registry first (`edp evaluate "
                        "--model`, services.registry.resolve), or give a local checkpoint file or bundle directory")
    path = Path(source)
    if bundle_only or path.is_dir():
        return _load_bundle(path, device)
    dev = resolve_device(device)
    return _from_checkpoint_state(read_checkpoint(path, dev), dev)


# ------------------------------------------------------------------------------------------------
# Training checkpoints: save (atomic), prune, read


def save_checkpoint(state: dict, path: Path) -> Path:
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


def read_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's whole state dict (training state included, for resuming); `DataError` when the file is
    missing or not an edp checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not an edp checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def _from_checkpoint_state(state: dict, dev: torch.device) -> LoadedModel:
    vocab = Vocab(state["vocab"])
    model = build_model(state["model_name"], len(vocab), vocab.emotion_ids(), **state["model_config"])
    model.load_state_dict(state["model"])
    return LoadedModel(state["config"], model.to(dev).eval(), vocab, state.get("data_key"))


@functools.cache
def trainers_source_hash() -> str:
    """Hash of the trainers/ source (every .py under it): the code version a checkpoint records."""
    h = hashlib.sha256()
    for f in sorted(TRAINERS_DIR.rglob("*.py")):
        h.update(str(f.relative_to(TRAINERS_DIR)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Serving bundles: save, export, find, read


def save_bundle(out_dir: str | Path, cfg: InferenceConfig, model: torch.nn.Module, vocab: Vocab,
                data_key: str | None = None, weights_dtype: str = "float32",
                int8_min_elements: int | None = None) -> Path:
    """Write `model`'s weights (stored as `weights_dtype`, one of WEIGHT_FORMATS; for INT8, 2-D tensors of at
    least `int8_min_elements`, default quantize.MIN_ELEMENTS, are int8), its resolved config and `vocab` into
    `out_dir` (created); returns it."""
    if weights_dtype not in WEIGHT_FORMATS:
        raise BundleError(f"weights_dtype {weights_dtype!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": BUNDLE_FORMAT, "model": cfg.model, "weights_dtype": weights_dtype}
    if weights_dtype == INT8:
        min_elements = quantize.MIN_ELEMENTS if int8_min_elements is None else int8_min_elements
        save_file(quantize.quantize_state(unique_state(model), min_elements), str(out / WEIGHTS), metadata=metadata)
    else:
        stored = model if weights_dtype == "float32" else copy.deepcopy(model).to(WEIGHT_DTYPES[weights_dtype])
        save_safetensors(stored, str(out / WEIGHTS), metadata=metadata)
    config = {"format": BUNDLE_FORMAT, "model_name": cfg.model, "model_config": vars(model.cfg),
              "train_config": cfg.model_dump(mode="json"), "data_key": data_key, "weights_dtype": weights_dtype}
    (out / CONFIG).write_text(json.dumps(config, indent=1))
    vocab.save(out / VOCAB)
    return out


def export_bundle(checkpoint: str | Path, out_dir: str | Path, weights_dtype: str = "float32") -> Path:
    """A serving bundle (weights, config, vocabulary; no optimizer state) from a local training checkpoint."""
    loaded = _from_checkpoint_state(read_checkpoint(checkpoint), torch.device("cpu"))
    return save_bundle(out_dir, loaded.train_config(), loaded.model, loaded.vocab, data_key=loaded.data_key,
                       weights_dtype=weights_dtype)


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state dict with each shared tensor once, under its first name (tied embeddings are stored once)."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def is_bundle(path: Path) -> bool:
    return all((path / f).is_file() for f in (WEIGHTS, CONFIG, VOCAB))


def find_bundle(root: str | Path) -> Path | None:
    """The shallowest directory under `root` (itself included) that holds a bundle's three files."""
    root = Path(root)
    candidates = [root, *sorted((p.parent for p in root.rglob(CONFIG)), key=lambda p: (len(p.parts), str(p)))]
    return next((p for p in candidates if is_bundle(p)), None)


def read_bundle_config(path: str | Path) -> dict:
    """The bundle's config.json, checked for the format."""
    file = Path(path) / CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {file}: {e}") from e
    if not isinstance(config, dict) or config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{file} is not an edp bundle config (expected format {BUNDLE_FORMAT!r})")
    return config


def _load_bundle(path: Path, device: str) -> LoadedModel:
    """JSON + safetensors only: a directory without a bundle's three files is refused, its pickles named."""
    if not is_bundle(path):
        pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        raise BundleError(f"{path} is not a serving bundle: it needs {WEIGHTS}, {CONFIG} and {VOCAB}"
                          + (f"; pickled files are never loaded for serving ({', '.join(pickles)})" if pickles else "")
                          + ". Export one from a training checkpoint with trainers.artifacts.export_bundle.")
    config = read_bundle_config(path)
    vocab = Vocab.load(path / VOCAB)
    model = build_model(config["model_name"], len(vocab), vocab.emotion_ids(), **config["model_config"])
    dtype = config.get("weights_dtype", "float32")
    if dtype not in WEIGHT_FORMATS:
        raise BundleError(f"{path / CONFIG}: weights_dtype {dtype!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    if dtype == INT8:
        _load_int8(model, path / WEIGHTS)
    else:
        try:  # load_state_dict copies into the float32 model: float16 weights are cast back here
            load_safetensors(model, str(path / WEIGHTS), strict=True)
        except (SafetensorError, RuntimeError) as e:
            raise BundleError(f"{path / WEIGHTS} does not match the model of {path / CONFIG}: {e}") from e
    return LoadedModel(config["train_config"], model.to(resolve_device(device)).eval(), vocab, config.get("data_key"),
                       dtype)


def _load_int8(model: torch.nn.Module, file: Path) -> None:
    """Dequantize `file`'s tensors into `model` (float32), every tensor checked against the model's first."""
    try:
        stored = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise BundleError(f"cannot read {file}: {e}") from e
    try:
        state = quantize.dequantize_state(stored, unique_state(model))
    except ValueError as e:
        raise BundleError(f"{file} ({INT8}): {e}") from e
    model.load_state_dict(state, strict=False)  # exactly the unique tensors: only tied aliases are not named
