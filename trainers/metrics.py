"""Evaluation metrics with the definitions of the papers (ESCM Sec. 4.3, IAMM Sec. 4.3).

Both papers follow CEM (Sabour et al., 2022) and MoEL, whose evaluation code (read in the ESCM and IAMM
repositories: `evaluate` in src/models/common.py, `train_one_batch(train=False)`, src/scripts/evaluate.py) defines
the primary figures, named as in `DEFINITIONS`:
  acc        emotion accuracy per example (fraction here; tables show x100). The prediction is the argmax of
             the model's `emotion_logits`: for ESCM and IAMM the summed logits of the emotion heads, as the code
             that produced the papers' Acc. (The code averages per-batch accuracies; we average per example,
             which equals it when every batch is full.)
  ppl        teacher-forced, exp(mean over examples of each example's mean NLL over its non-PAD target tokens,
             EOS included), the NLL of the pointer-generator mixture: the code's per-example NLLLoss(mean)
             averaged over the split, then exp. A short example weighs as much as a long one. One difference:
             a target word outside the vocabulary that the context holds is scored here by its extended id
             (its copy probability), where the reference scores UNK; the vocabulary is built from train, so
             such words are rare in valid.
  dist_n     corpus-level distinct n-grams (Li et al., 2016) of the greedy responses of the whole split:
             |unique n-grams over all responses| / |n-grams over all responses| (CEM's `calc_distinct_n`), a
             fraction (tables x100). The step limit is the run's `decode.max_len` (the authors' max_dec_step 50
             lets greedy emit 51 tokens); metrics.json records the decoding used.
  dist_n_nltk  dist_n as the reference computes it (ESCM's src/scripts/evaluate.py, CEM's calc_distinct_n): each
             greedy response is written out as its tokens joined by spaces, re-tokenised with nltk's
             word_tokenize, and the distinct n-grams counted over those words (`nltk_words`).
Also reported:
  ppl_token  exp(total NLL / total non-PAD target tokens): token-level, what this platform called PPL before.
  loss       total NLL / total target tokens (log ppl_token).
  bleu_n     corpus BLEU-1..4, not in the papers' tables (see `bleu`).
  distinct_responses  the share of responses that are distinct strings (1.0: no two alike): how generic a model
             is, which corpus Dist hides when a few stock replies repeat across the split.
  *_sampled  dist_n / bleu_n over the first `sample_size` examples only (training-time evaluations): not
             comparable with the papers' figures (Dist-1 4.65 on 256 responses vs 0.82 on the whole split for
             the same ESCM checkpoint), hence never under the primary name.

`dist_n` counts n-grams over our decoded tokens (spaCy's tokenisation of the vocabulary). `dist_n_nltk` splits
the space-joined response as nltk does, which differs from our tokens where nltk's rules split further: "cannot"
-> "can" "not", "wanna" -> "wan" "na", emoticons (":)" -> ":" ")"), misspelt contractions ("don;t"), ...; a
response's final token that carries its own period ("p.m." -> "p.m" "."); and `"` becomes "``" (one to one).
word_tokenize first splits a text into sentences with punkt, whose model is data nltk downloads at run time
(impossible here), then runs NLTKWordTokenizer on each sentence; `nltk_words` runs NLTKWordTokenizer on the whole
response. On our decoded text the two agree at any sentence split punkt could choose between two tokens
(tests/unit/test_metrics.py checks every split point), except after a token with its own final period (an
abbreviation such as "p.m." or "etc.") where punkt ends a sentence: word_tokenize then splits that period off,
we do not. The reference's reading of its results file also strips the leading characters of "Greedy:" from
each response (str.strip with a character set, so "really ..." is read as "ally ..."); not reproduced.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from functools import cache

import numpy as np

from trainers.data.emotions import NUM_EMOTIONS

DEFINITIONS = {
    "acc": "per example: argmax of the emotion logits (ESCM, IAMM: summed head logits) == gold, averaged",
    "ppl": "exp(mean over examples of each example's mean NLL over its non-PAD target tokens, EOS included), "
           "teacher-forced pointer-generator mixture (papers, CEM/MoEL evaluation)",
    "ppl_token": "exp(total NLL / total non-PAD target tokens, EOS included), teacher-forced (token-level)",
    "loss": "total NLL / total non-PAD target tokens",
    "dist_n": "corpus unique n-grams / all n-grams over the decoded tokens of the whole split's responses",
    "dist_n_nltk": "dist_n over nltk words as the papers' code: each response's tokens joined by spaces and split "
                   "by nltk's NLTKWordTokenizer (word_tokenize without punkt's sentence split: the same words "
                   "except after an abbreviation with a final period that punkt would end a sentence at)",
    "bleu_n": "corpus BLEU-n, one reference per response, no smoothing",
    "distinct_responses": "distinct response token sequences / responses, over the whole split",
    "*_sampled": "the same over the first sample_size examples of the split only: not comparable with the papers",
}
# What the valid_* figures mean (logged with every run; promotion compares only runs that share it): change it
# whenever a definition above changes.
METRIC_DEFINITION = ("papers: acc per example (summed head logits); ppl exp(mean per-example NLL), ppl_token "
                     "token-level; dist-n corpus over the whole split, *_sampled over a sample; bleu corpus")

PPL_LOG_CAP = 100.0  # the authors' exp(min(loss, 100)): keeps exp finite for a diverged model
SAMPLED = "_sampled"  # suffix of generation metrics computed over a sample of the split
GENERATION_METRICS = ("valid_dist_1", "valid_dist_2", "valid_dist_1_nltk", "valid_dist_2_nltk",
                      "valid_bleu_4")  # from decoded responses; all: higher better
# Which way is better for each validation metric (early stopping, sweeps, promotion).
METRIC_MODES = {"valid_ppl": "min", "valid_ppl_token": "min", "valid_loss": "min", "valid_acc": "max",
                **{k: "max" for k in GENERATION_METRICS}, **{k + SAMPLED: "max" for k in GENERATION_METRICS}}


def _as_list(x) -> list:
    """A tensor, array, sequence or scalar as a flat list (this module does not import torch: configs import it)."""
    if hasattr(x, "detach"):  # a torch.Tensor
        return x.detach().cpu().reshape(-1).tolist()
    return np.asarray(x).reshape(-1).tolist()


def emotion_accuracy(pred_ids, gold_ids) -> float:
    """Fraction of examples whose predicted emotion equals the gold one (0..1)."""
    pred, gold = _as_list(pred_ids), _as_list(gold_ids)
    if len(pred) != len(gold):
        raise ValueError(f"emotion_accuracy: {len(pred)} predictions for {len(gold)} gold labels")
    if not gold:
        raise ValueError("emotion_accuracy: no examples")
    return sum(int(p) == int(g) for p, g in zip(pred, gold, strict=True)) / len(gold)


def token_perplexity(nll_sum: float, num_tokens: int) -> float:
    """`ppl_token`: exp(total token NLL / total tokens), the exponent capped at PPL_LOG_CAP."""
    if num_tokens <= 0:
        raise ValueError(f"token_perplexity: num_tokens must be > 0, got {num_tokens}")
    return math.exp(min(float(nll_sum) / float(num_tokens), PPL_LOG_CAP))


def example_perplexity(nll_sums: Sequence[float], num_tokens: Sequence[int]) -> float:
    """`ppl`, the papers': exp(mean_i nll_sums[i] / num_tokens[i]), one term per example, exponent capped."""
    if len(nll_sums) != len(num_tokens):
        raise ValueError(f"example_perplexity: {len(nll_sums)} NLL sums for {len(num_tokens)} token counts")
    if not nll_sums:
        raise ValueError("example_perplexity: no examples")
    if min(num_tokens) <= 0:
        raise ValueError("example_perplexity: every example needs >= 1 target token (its EOS at least)")
    mean_nll = float(np.mean([float(a) / int(n) for a, n in zip(nll_sums, num_tokens, strict=True)]))
    return math.exp(min(mean_nll, PPL_LOG_CAP))


def sampled(metrics: dict[str, float], sample_size: int) -> dict[str, float]:
    """Generation metrics computed over `sample_size` examples of a split: `_sampled` names plus the size."""
    return {**{k + SAMPLED: v for k, v in metrics.items()}, "sample_size": sample_size}


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


@cache
def _nltk_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer  # here: configs import this module, serving never needs nltk

    return NLTKWordTokenizer()


def nltk_words(tokens: Sequence[str]) -> list[str]:
    """A decoded response's `tokens` as the reference's Dist sees them: joined by spaces, split into words by
    nltk's word tokenizer (the module docstring says where this can differ from word_tokenize)."""
    return _nltk_tokenizer().tokenize(" ".join(tokens))


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
            out[f"bleu_{n}"] = 0.0
            continue
        log_p = sum(math.log(matches[k] / totals[k]) for k in range(n)) / n
        out[f"bleu_{n}"] = bp * math.exp(log_p)
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


def _paired(name_a: str, a, name_b: str, b) -> tuple[list, list]:
    """Two per-example arguments of `MetricAccumulator.add` as flat lists: both given with one entry per example,
    or both None (two empty lists)."""
    if (a is None) != (b is None):
        raise ValueError(f"MetricAccumulator.add: give {name_a} and {name_b} together")
    if a is None:
        return [], []
    a, b = _as_list(a), _as_list(b)
    if len(a) != len(b):
        raise ValueError(f"MetricAccumulator.add: {name_a} has {len(a)} entries, {name_b} {len(b)}")
    return a, b


class MetricAccumulator:
    """Collects per-batch evaluation outputs; `compute()` gives the metrics of everything added.

    Keys of `compute()` (see DEFINITIONS): "loss", "ppl", "ppl_token", "acc", "dist_1", "dist_2", "dist_1_nltk",
    "dist_2_nltk", "distinct_responses", "bleu_1".."bleu_4". A group of keys is present only when its inputs were
    collected (e.g. no "dist_*"/"bleu_*" for a validation pass without decoding).
    """

    def __init__(self, num_classes: int = NUM_EMOTIONS):
        self.num_classes = num_classes
        self.example_nll: list[float] = []
        self.example_tokens: list[int] = []
        self.emotion_pred: list[int] = []
        self.emotion_gold: list[int] = []
        self.hypotheses: list[list[str]] = []
        self.references: list[list[str]] = []

    def add(self, nll_sum=None, num_tokens=None, emotion_pred=None, emotion_gold=None,
            hypotheses: list[list[str]] | None = None, references: list[list[str]] | None = None) -> None:
        """Add one batch. nll_sum/num_tokens: per example, (B,) (a scalar is one example): each example's summed
        target NLL and its number of target tokens."""
        nll, ntok = _paired("nll_sum", nll_sum, "num_tokens", num_tokens)
        self.example_nll += [float(v) for v in nll]
        self.example_tokens += [int(n) for n in ntok]
        pred, gold = _paired("emotion_pred", emotion_pred, "emotion_gold", emotion_gold)
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
        if self.example_nll:
            nll_sum, num_tokens = sum(self.example_nll), sum(self.example_tokens)
            out["loss"] = nll_sum / num_tokens
            out["ppl"] = example_perplexity(self.example_nll, self.example_tokens)
            out["ppl_token"] = token_perplexity(nll_sum, num_tokens)
        if self.emotion_gold:
            out["acc"] = emotion_accuracy(self.emotion_pred, self.emotion_gold)
        if self.hypotheses:
            out["dist_1"] = distinct_n(self.hypotheses, 1)
            out["dist_2"] = distinct_n(self.hypotheses, 2)
            words = [nltk_words(h) for h in self.hypotheses]
            out["dist_1_nltk"], out["dist_2_nltk"] = distinct_n(words, 1), distinct_n(words, 2)
            out["distinct_responses"] = len({tuple(h) for h in self.hypotheses}) / len(self.hypotheses)
            if len(self.references) == len(self.hypotheses):
                out.update(bleu(self.hypotheses, self.references))
        return out
