"""`Evaluator`: teacher-forced metrics and decoding over a `TensorSplit` (the trainer and `edp evaluate` use it).

Metrics are the papers' (trainers.metrics): emotion accuracy, PPL from the pointer-generator NLL,
Dist-1/2 and BLEU over the decoded responses.
"""

from __future__ import annotations

import numpy as np
import torch

from trainers.batching import TensorSplit
from trainers.data.emotions import EMOTIONS
from trainers.decoding import DecodeConfig, decode, ids_to_tokens
from trainers.device import autocast
from trainers.metrics import MetricAccumulator
from trainers.models.common import Targets


class Evaluator:
    """Evaluate `model` in batches of `batch_size`, decoding with `decode`, bf16 autocast when `bf16` applies."""

    def __init__(self, model: torch.nn.Module, vocab, device: torch.device, *, batch_size: int,
                 decode: DecodeConfig, bf16: bool):
        self.model, self.vocab, self.device = model, vocab, device
        self.batch_size, self.decode_config, self.bf16 = batch_size, decode, bf16

    def _autocast(self):
        return autocast(self.bf16, self.device)

    @torch.inference_mode()
    def evaluate(self, data: TensorSplit, generate: int = 0) -> dict:
        """Teacher-forced loss/PPL and emotion accuracy on all of `data`, plus
        Dist-1/2 and BLEU over the greedy/beam/sampled responses of its first `generate` examples (0 = all)."""
        model = self.model
        model.eval()
        acc = MetricAccumulator()
        for k, rows in data.plan(self.batch_size, 0, 0, shuffle=False):
            batch = data.rows_batch(k, rows)
            with self._autocast():
                out = model(batch, Targets.of(batch))
            logits = out.emotion_logits
            acc.add(nll_sum=out.nll_sum.float(), num_tokens=out.num_tokens,
                    emotion_pred=None if logits is None else logits.argmax(-1),
                    emotion_gold=None if logits is None else batch["emotion"])
        metrics = acc.compute()
        n = len(data) if generate == 0 else min(generate, len(data))
        if n:
            generated = self.generate(range(n), data)
            gen_acc = MetricAccumulator()
            gen_acc.add(hypotheses=[g["generated_tokens"] for g in generated],
                        references=[g["reference_tokens"] for g in generated])
            metrics.update({k: v for k, v in gen_acc.compute().items() if k.startswith(("dist", "bleu"))})
        return metrics

    @torch.inference_mode()
    def emotion_predictions(self, data: TensorSplit) -> tuple[list[int], list[int]]:
        """(predicted, gold) emotion ids over `data`; empty lists for a model without an emotion head."""
        pred, gold = [], []
        for k, rows in data.plan(self.batch_size, 0, 0, shuffle=False):
            batch = data.rows_batch(k, rows)
            with self._autocast():
                logits = self.model.eval().encode(batch).emotion_logits
            if logits is None:
                return [], []
            pred += logits.argmax(-1).tolist()
            gold += batch["emotion"].tolist()
        return pred, gold

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
