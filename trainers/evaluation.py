"""Evaluation: `Evaluator` (teacher-forced metrics and decoding over a `TensorSplit`, what the trainer evaluates
with) and `evaluate_model` (a trained checkpoint or serving bundle on any ED-format source, what `edp evaluate`
runs).

Metrics are the papers' (trainers.metrics.DEFINITIONS): per-example emotion accuracy, the per-example PPL of the
pointer-generator mixture (and the token-level `ppl_token`), Dist-1/2 and BLEU over the decoded responses: of the
whole split, or `_sampled` over its first examples when only those are decoded.

`evaluate_model` reads any ED-format source (jsonl dir/file, official CSV dir or tar.gz, s3://) and writes
`metrics.json` (Acc / PPL / PPL_token / Dist-1 / Dist-2 / BLEU over the whole split, and the `definitions` of each)
and `predictions.jsonl` (one line per example: conv_id, turn, context, gold and predicted emotion with its probability,
generated response, reference, and the reference's teacher-forced summed NLL `nll_sum` over its `num_tokens`
target tokens, EOS included: enough to recompute both PPLs). Decoding settings are the run's (the paper's greedy
decoding by default) unless overridden. Unseen context words are encoded as the run's `unseen_vectors` says (or its
override), with the same lookup serving uses (trainers/data/unseen.py); metrics.json's `unseen_vectors` records the
setting, its source and scale, and how many examples had such a word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers import artifacts
from trainers.batching import TensorSplit, tensor_split
from trainers.config import DecodeConfig
from trainers.data.emotions import EMOTIONS
from trainers.data.prepare import split_with_vocab
from trainers.data.sources import load_splits
from trainers.data.unseen import unseen_vectors_for
from trainers.decoding import decode, ids_to_tokens
from trainers.device import autocast, native_bf16, resolve_device
from trainers.metrics import DEFINITIONS, MetricAccumulator, sampled
from trainers.models.interface import Targets
from trainers.tokens import UNK


@dataclass
class Evaluation:
    """One evaluation of a split: its metrics; per example, in the split's order, the teacher-forced summed target
    NLL, target token count and predicted/gold emotion ids (None without an emotion head); the records of the
    decoded examples (`Evaluator.generate`)."""

    metrics: dict[str, float]
    nll_sum: np.ndarray  # (N,) float
    num_tokens: np.ndarray  # (N,) int
    emotion_pred: np.ndarray | None  # (N,) int
    emotion_gold: np.ndarray | None  # (N,) int
    generated: list[dict]


class Evaluator:
    """Evaluate `model` in batches of `batch_size`, decoding with `decode`, bf16 autocast when `bf16` applies."""

    def __init__(self, model: torch.nn.Module, vocab, device: torch.device, *, batch_size: int,
                 decode: DecodeConfig, bf16: bool):
        self.model, self.vocab, self.device = model, vocab, device
        self.batch_size, self.decode_config, self.bf16 = batch_size, decode, bf16

    def _autocast(self):
        return autocast(self.bf16, self.device)

    def evaluate(self, data: TensorSplit, generate: int = 0) -> dict:
        """The metrics of `run(data, generate)`."""
        return self.run(data, generate).metrics

    def run(self, data: TensorSplit, generate: int = 0) -> Evaluation:
        """Teacher-forced loss/PPL and emotion accuracy on all of `data`; Dist-1/2 and BLEU over the decoded
        responses of all of it (`generate` = 0: the primary names) or of its first `generate` examples (the
        `_sampled` names and `sample_size`)."""
        nll_sum, num_tokens, pred, gold = self.teacher_forced(data)
        acc = MetricAccumulator()
        acc.add(nll_sum=nll_sum, num_tokens=num_tokens)
        if pred is not None:
            acc.add(emotion_pred=pred, emotion_gold=gold)
        n = len(data) if generate == 0 else min(generate, len(data))
        generated = self.generate(range(n), data)
        if generated:
            acc.add(hypotheses=[g["generated_tokens"] for g in generated],
                    references=[g["reference_tokens"] for g in generated])
        metrics = acc.compute()
        if generate:
            generation = {k: metrics.pop(k) for k in list(metrics) if k.startswith(("dist_", "distinct_", "bleu_"))}
            metrics.update(sampled(generation, n))
        return Evaluation(metrics, nll_sum, num_tokens, pred, gold, generated)

    @torch.inference_mode()
    def teacher_forced(self, data: TensorSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Under teacher forcing over all of `data`, per example in `data`'s order: the summed target NLL, the
        target token count, the predicted and the gold emotion id (both None without an emotion head)."""
        model = self.model
        model.eval()
        nll_sum, num_tokens = np.zeros(len(data)), np.zeros(len(data), dtype=np.int64)
        pred, gold = np.zeros(len(data), dtype=np.int64), np.zeros(len(data), dtype=np.int64)
        has_emotion = True
        for k, rows in data.plan(self.batch_size, 0, 0, shuffle=False):
            batch = data.rows_batch(k, rows)
            with self._autocast():
                out = model(batch, Targets.of(batch))
            index = data.buckets[k].rows[rows]
            nll_sum[index] = out.nll_sum.float().cpu().numpy()
            num_tokens[index] = out.num_tokens.cpu().numpy()
            has_emotion = out.emotion_logits is not None
            if has_emotion:
                pred[index] = out.emotion_logits.argmax(-1).cpu().numpy()
                gold[index] = batch.emotion.cpu().numpy()
        return (nll_sum, num_tokens) + ((pred, gold) if has_emotion else (None, None))

    @torch.inference_mode()
    def generate(self, indices, data: TensorSplit) -> list[dict]:
        """Decode examples `indices`; returns per example the text fields and predicted emotion."""
        model = self.model
        model.eval()
        indices = np.asarray(list(indices), dtype=np.int64)
        results: dict[int, dict] = {}
        for k in np.unique(data.where[indices, 0]):
            members = indices[data.where[indices, 0] == k]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s:s + self.batch_size]
                rows = data.where[chunk, 1]
                batch = data.rows_batch(int(k), rows)
                with self._autocast():
                    state = model.encode(batch)
                    ids = decode(model, batch, self.decode_config, state=state)
                    logits = state.emotion_logits
                oovs = [data.encoded[i].oov for i in chunk]
                tokens = ids_to_tokens(ids.tolist(), self.vocab.itos, oovs)
                probs = None if logits is None else torch.softmax(logits.float(), -1)
                for j, i in enumerate(chunk):
                    results[int(i)] = self._record(data, int(i), tokens[j], probs[j] if probs is not None else None)
        return [results[int(i)] for i in indices]

    def _record(self, data: TensorSplit, i: int, tokens: list[str], probs: torch.Tensor | None) -> dict:
        ex, split = data.split.examples[i], data.split
        pred = None if probs is None else int(probs.argmax())
        return {
            "conv_id": ex.conv_id, "turn": ex.turn, "context": list(ex.context), "situation": ex.situation,
            "reference": ex.target, "generated": " ".join(tokens), "generated_tokens": tokens,
            "reference_tokens": list(split.tokens[split.features[i].target]), "gold_emotion": ex.emotion,
            "predicted_emotion": None if pred is None else EMOTIONS[pred],
            "predicted_prob": None if probs is None else float(probs[pred]),
        }


def evaluate_model(model_path: str | Path, source: str, split: str, out_dir: str | Path, *,
                   device: str = "cpu", decode: dict | None = None, skip_invalid: bool = False,
                   label: str | None = None, bf16: bool | None = None, unseen_vectors: bool | None = None) -> dict:
    """Metrics and predictions of the model at `model_path` (a checkpoint file or a bundle directory; `label`
    names it in metrics.json) on a split. `bf16` overrides the run's bf16 setting (False: float32 compute on
    every machine, what a release's card records); the result's `dtype` says how the weights were stored and
    what the computation ran in. `unseen_vectors` overrides the run's setting of that name."""
    loaded = artifacts.load(model_path, device)
    cfg, model, vocab = loaded.train_config(), loaded.model, loaded.vocab
    recorded_unseen = cfg.unseen_vectors
    cfg = cfg.model_copy(update={"device": device, "decode": {**cfg.decode, **(decode or {})},
                                 **({} if bf16 is None else {"bf16": bf16}),
                                 **({} if unseen_vectors is None else {"unseen_vectors": unseen_vectors})})
    unseen = unseen_vectors_for(cfg, model.cfg.emb_dim)
    report = load_splits(source, splits=[split], skip_invalid=skip_invalid)[split]
    prepared = split_with_vocab(split, report, vocab, cfg.data)
    dev = resolve_device(device)
    data = tensor_split(cfg, prepared, len(vocab), dev, unseen)
    evaluator = Evaluator(model, vocab, dev, batch_size=cfg.eval_batch_size, decode=cfg.decode_config(),
                          bf16=cfg.bf16)
    evaluation = evaluator.run(data, generate=0)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": label or str(model_path), "source": source, "split": split, "examples": len(data),
              "skipped": len(report.invalid), "decode": cfg.decode_config().__dict__,
              "dtype": {"weights": loaded.weights_dtype, "compute": compute_dtype(cfg.bf16, dev)},
              "unseen_vectors": unseen_report(data, cfg.unseen_vectors, recorded_unseen, unseen),
              "metrics": evaluation.metrics, "definitions": DEFINITIONS}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    with (out / "predictions.jsonl").open("w") as f:
        for p, nll, n in zip(evaluation.generated, evaluation.nll_sum, evaluation.num_tokens, strict=True):
            record = {k: p[k] for k in ("conv_id", "turn", "context", "gold_emotion", "predicted_emotion",
                                        "predicted_prob", "generated", "reference")}
            f.write(json.dumps({**record, "nll_sum": float(nll), "num_tokens": int(n)}) + "\n")
    return result


def unseen_report(data: TensorSplit, enabled: bool, recorded: bool, unseen) -> dict:
    """metrics.json's `unseen_vectors`: the setting used, the model's own (`recorded`; they differ under an
    override), and with it on the lookup's source and scale and the examples with at least one unseen context word
    encoded with its vector."""
    n = max(len(data), 1)
    with_unk = sum(int((e.context_ids == UNK).any()) for e in data.encoded)
    out = {"enabled": enabled, "model_setting": recorded, "override": enabled != recorded,
           "examples_with_unk_context_word": with_unk, "share_with_unk_context_word": with_unk / n}
    if unseen is not None:
        with_vector = sum(int(e.context_unseen.any()) for e in data.encoded)
        out.update(unseen.describe(), examples_with_unseen_vector=with_vector, share_with_unseen_vector=with_vector / n)
    return out


def compute_dtype(bf16: bool, device: torch.device) -> str:
    """What the evaluation's matmuls ran in: bf16 autocast where it applies (trainers.device), else float32."""
    return "bfloat16 autocast" if bf16 and native_bf16(device.type) else "float32"
