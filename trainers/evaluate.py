"""Evaluate a trained model on any ED-format source (jsonl dir/file, official CSV dir or tar.gz, s3://).

The model is a serving bundle directory (trainers.model_bundle: safetensors + JSON, what the registry
holds) or a local training checkpoint file (`*.pt`, unpickled: only your own).

Writes `metrics.json` (Acc / PPL / Dist-1 / Dist-2 / BLEU) and `predictions.jsonl` (one line per
example: conv_id, turn, gold and predicted emotion with its probability, generated response,
reference). Decoding settings are the checkpoint's (the paper's greedy decoding by default)
unless overridden.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from trainers.data.prepare import split_with_vocab
from trainers.data.records import DataError
from trainers.data.sources import load_splits
from trainers.data.vocab import Vocab
from trainers.loop import CHECKPOINT_FORMAT, Evaluator, TensorSplit, TrainConfig, resolve_device
from trainers.model_bundle import load_bundle, save_bundle
from trainers.models import build_model


def _checkpoint_state(path: str | Path, device: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=resolve_device(device), weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not an edp checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def _rebuild(state: dict, device: str) -> tuple[TrainConfig, torch.nn.Module, Vocab]:
    cfg = TrainConfig.model_validate(state["config"])
    vocab = Vocab(state["vocab"])
    model = build_model(state["model_name"], len(vocab), vocab.emotion_ids(), **state["model_config"])
    model.load_state_dict(state["model"])
    return cfg, model.to(resolve_device(device)).eval(), vocab


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[TrainConfig, torch.nn.Module, Vocab]:
    """Rebuild (config, model with weights, vocabulary) from a trainer checkpoint file."""
    return _rebuild(_checkpoint_state(path, device), device)


def export_bundle(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A serving bundle (weights, config, vocabulary; no optimizer state) from a local training checkpoint."""
    state = _checkpoint_state(checkpoint, "cpu")
    cfg, model, vocab = _rebuild(state, "cpu")
    return save_bundle(out_dir, cfg, model, vocab, data_key=state.get("data_key"))


def load_model(path: str | Path, device: str = "cpu") -> tuple[TrainConfig, torch.nn.Module, Vocab]:
    """A bundle directory (safetensors + JSON, never unpickled) or a local training checkpoint file."""
    return load_bundle(path, device) if Path(path).is_dir() else load_checkpoint(path, device)


def evaluate_checkpoint(checkpoint: str | Path, source: str, split: str, out_dir: str | Path, *,
                        device: str = "cpu", decode: dict | None = None, skip_invalid: bool = False,
                        label: str | None = None) -> dict:
    """Metrics and predictions of `checkpoint` (a file or bundle; `label` names it in metrics.json) on a split."""
    cfg, model, vocab = load_model(checkpoint, device)
    cfg = cfg.model_copy(update={"device": device, "decode": {**cfg.decode, **(decode or {})}})
    report = load_splits(source, splits=[split], skip_invalid=skip_invalid)[split]
    prepared = split_with_vocab(split, report, vocab, cfg.data)
    dev = resolve_device(device)
    data = TensorSplit(prepared, len(vocab), cfg, dev, iamm=cfg.model == "iamm")
    evaluator = Evaluator(model, vocab, cfg, dev)
    metrics = evaluator.evaluate(data, generate=0)
    predictions = evaluator.generate(range(len(data)), data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": label or str(checkpoint), "source": source, "split": split, "examples": len(data),
              "skipped": len(report.invalid), "decode": cfg.decode_config().__dict__, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with (out / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps({k: p[k] for k in ("conv_id", "turn", "gold_emotion", "predicted_emotion",
                                                  "predicted_prob", "generated", "reference")}) + "\n")
    return result
