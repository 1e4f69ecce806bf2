"""Evaluation metrics with the definitions of the papers (ESCM Sec. 4.3, IAMM Sec. 4.3).

Both papers follow CEM (Sabour et al., 2022) and MoEL, whose evaluation code defines:
  Acc     emotion classification accuracy over all examples (fraction here; tables show x100).
  PPL     exp(mean token NLL of the reference responses under teacher forcing), PAD ignored.
  Dist-n  corpus-level distinct n-grams (Li et al., 2016): the number of *unique* n-grams over
          all generated responses divided by the *total* number of n-grams in them
          (CEM's `calc_distinct_n`). Returned as a fraction; the tables report it x100.
  BLEU    not in the papers' tables; corpus BLEU-1..4 for reference (see `bleu`).

Interpretations (recorded here as DESIGN.md asks):
- PPL is token-level: exp(sum NLL / number of reference tokens, EOS included). The ESCM code's
  test-time figure is exp of the mean over examples of each example's mean token NLL;
  `MetricAccumulator` also reports that as "ppl_example" when given per-example sums.
- Dist-n counts n-grams over the given token lists; CEM re-tokenises the detokenised strings
  with nltk's word_tokenize, which gives the same tokens for spaCy-tokenised text up to rare
  punctuation splits.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch

from trainers.data.emotions import NUM_EMOTIONS

# What the valid_* figures mean (logged with every run; promotion compares only runs that share it): change it
# whenever a definition above changes.
METRIC_DEFINITION = "acc: per example; ppl: token-level; dist-n: corpus unique/total n-grams; bleu: corpus"

PPL_LOG_CAP = 100.0  # the authors' exp(min(loss, 100)): keeps exp finite for a diverged model
# Which way is better for each validation metric (early stopping, sweeps, promotion).
METRIC_MODES = {"valid_ppl": "min", "valid_loss": "min", "valid_acc": "max", "valid_dist1": "max",
                "valid_dist2": "max", "valid_bleu4": "max"}


def _as_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().reshape(-1).tolist()
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    return list(x)


def emotion_accuracy(pred_ids, gold_ids) -> float:
    """Fraction of examples whose predicted emotion equals the gold one (0..1)."""
    pred, gold = _as_list(pred_ids), _as_list(gold_ids)
    if len(pred) != len(gold):
        raise ValueError(f"emotion_accuracy: {len(pred)} predictions for {len(gold)} gold labels")
    if not gold:
        raise ValueError("emotion_accuracy: no examples")
    return sum(int(p) == int(g) for p, g in zip(pred, gold, strict=True)) / len(gold)


def perplexity(nll_sum: float, num_tokens: int) -> float:
    """exp(total token NLL / total tokens), the exponent capped at PPL_LOG_CAP."""
    if num_tokens <= 0:
        raise ValueError(f"perplexity: num_tokens must be > 0, got {num_tokens}")
    return math.exp(min(float(nll_sum) / float(num_tokens), PPL_LOG_CAP))


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(responses: list[list[str]], n: int) -> float:
    """Dist-n = |unique n-grams over all responses| / |n-grams over all responses| (fraction).

    Corpus level, as CEM's calc_distinct_n: an n-gram repeated in two responses counts once in
    the numerator and twice in the denominator. Multiply by 100 for the papers' tables.
    Returns 0.0 when the responses hold no n-gram.
    """
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    all_ngrams = [g for tokens in responses for g in _ngrams(tokens, n)]
    return len(set(all_ngrams)) / len(all_ngrams) if all_ngrams else 0.0


def bleu(hypotheses: list[list[str]], references: list[list[str]], max_n: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_n (Papineni et al., 2002) of tokenised hypotheses, one reference each.

    BLEU-n = BP * exp(sum_{k<=n} (1/n) log p_k), p_k = clipped k-gram matches / hypothesis k-grams
    summed over the corpus, BP = min(1, exp(1 - r/c)) with corpus lengths r (references) and c
    (hypotheses). No smoothing: BLEU-n is 0 when some p_k (k <= n) is 0. This equals sacrebleu
    with tokenize="none", smooth_method="none" and nltk's corpus_bleu with uniform weights.
    Fractions in 0..1 (sacrebleu prints x100).
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses for {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    c = sum(len(h) for h in hypotheses)
    r = sum(len(ref) for ref in references)
    for hyp, ref in zip(hypotheses, references, strict=True):
        for k in range(1, max_n + 1):
            hyp_counts, ref_counts = Counter(_ngrams(hyp, k)), Counter(_ngrams(ref, k))
            matches[k - 1] += sum(min(cnt, ref_counts[g]) for g, cnt in hyp_counts.items())
            totals[k - 1] += sum(hyp_counts.values())
    bp = 0.0 if c == 0 else min(1.0, math.exp(1.0 - r / c))
    out = {}
    for n in range(1, max_n + 1):
        if any(matches[k] == 0 for k in range(n)):
            out[f"bleu{n}"] = 0.0
            continue
        log_p = sum(math.log(matches[k] / totals[k]) for k in range(n)) / n
        out[f"bleu{n}"] = bp * math.exp(log_p)
    return out


def confusion_matrix(pred, gold, num_classes: int = NUM_EMOTIONS) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = gold class, column = predicted class."""
    pred, gold = np.asarray(_as_list(pred), dtype=np.int64), np.asarray(_as_list(gold), dtype=np.int64)
    if pred.shape != gold.shape:
        raise ValueError(f"confusion_matrix: {pred.size} predictions for {gold.size} gold labels")
    for name, ids in (("pred", pred), ("gold", gold)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} ids must be in [0, {num_classes}), "
                             f"got range [{ids.min()}, {ids.max()}]")
    counts = np.bincount(gold * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class MetricAccumulator:
    """Collects per-batch evaluation outputs; `compute()` gives the epoch's metrics.

    Keys of `compute()`: "loss" (mean token NLL), "ppl", "acc", "dist1", "dist2", "bleu1".."bleu4",
    plus "ppl_example" when per-example NLLs were given. A group of keys is present only when
    its inputs were collected (e.g. no "dist*"/"bleu*" for a validation pass without decoding).
    """

    def __init__(self, num_classes: int = NUM_EMOTIONS):
        self.num_classes = num_classes
        self.nll_sum, self.num_tokens = 0.0, 0
        self.example_mean_nll: list[float] = []
        self.emotion_pred: list[int] = []
        self.emotion_gold: list[int] = []
        self.hypotheses: list[list[str]] = []
        self.references: list[list[str]] = []

    def add(self, nll_sum=None, num_tokens=None, emotion_pred=None, emotion_gold=None,
            hypotheses: list[list[str]] | None = None, references: list[list[str]] | None = None) -> None:
        """Add one batch. nll_sum/num_tokens: scalars (batch totals) or (B,) per-example tensors."""
        if (nll_sum is None) != (num_tokens is None):
            raise ValueError("MetricAccumulator.add: give nll_sum and num_tokens together")
        if nll_sum is not None:
            nll, ntok = _as_list(torch.as_tensor(nll_sum)), _as_list(torch.as_tensor(num_tokens))
            if len(nll) != len(ntok):
                raise ValueError(f"MetricAccumulator.add: nll_sum has {len(nll)} entries, "
                                 f"num_tokens {len(ntok)}")
            self.nll_sum += float(sum(nll))
            self.num_tokens += int(sum(ntok))
            if isinstance(nll_sum, torch.Tensor) and nll_sum.dim() == 1:
                self.example_mean_nll += [a / b for a, b in zip(nll, ntok, strict=True) if b > 0]
        if (emotion_pred is None) != (emotion_gold is None):
            raise ValueError("MetricAccumulator.add: give emotion_pred and emotion_gold together")
        if emotion_pred is not None:
            pred, gold = _as_list(emotion_pred), _as_list(emotion_gold)
            if len(pred) != len(gold):
                raise ValueError(f"MetricAccumulator.add: {len(pred)} emotion predictions "
                                 f"for {len(gold)} golds")
            self.emotion_pred += [int(p) for p in pred]
            self.emotion_gold += [int(g) for g in gold]
        if hypotheses is not None:
            if references is not None and len(references) != len(hypotheses):
                raise ValueError(f"MetricAccumulator.add: {len(hypotheses)} hypotheses for "
                                 f"{len(references)} references")
            self.hypotheses += [list(h) for h in hypotheses]
            if references is not None:
                self.references += [list(r) for r in references]

    def confusion(self) -> np.ndarray:
        return confusion_matrix(self.emotion_pred, self.emotion_gold, self.num_classes)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.num_tokens > 0:
            out["loss"] = self.nll_sum / self.num_tokens
            out["ppl"] = perplexity(self.nll_sum, self.num_tokens)
        if self.example_mean_nll:
            out["ppl_example"] = math.exp(min(float(np.mean(self.example_mean_nll)), PPL_LOG_CAP))
        if self.emotion_gold:
            out["acc"] = emotion_accuracy(self.emotion_pred, self.emotion_gold)
        if self.hypotheses:
            out["dist1"] = distinct_n(self.hypotheses, 1)
            out["dist2"] = distinct_n(self.hypotheses, 2)
            if len(self.references) == len(self.hypotheses):
                out.update(bleu(self.hypotheses, self.references))
        return out
