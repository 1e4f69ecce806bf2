"""Training recipes: one switch (`recipe:` in a TrainConfig) for a named bundle of training settings.

A recipe only supplies values a run does not set itself: anything given explicitly (YAML, `--set`, CLI flags,
sweep parameters, `model_overrides` keys) wins over the recipe's value for that field.

- "platform" (the default): the TrainConfig defaults as they are, tuned on this platform (gradient clipping
  at 2, word vectors rescaled to the model's init scale, the platform's init, 13,500 steps with early
  stopping on valid PPL every 500 steps, decoding up to 30 tokens, unseen context words as [UNK]). Existing
  sweeps, benchmarks and checkpoints use it.
- "paper": the authors' code where the papers are silent (github.com/zhouzhouyang520/
  EmpatheticDialogueGeneration_ESCM for the Transformer and ESCM, github.com/zhouzhouyang520/IAMM; read, not
  copied): no gradient clipping; word vectors at their own scale (the embedding multiplies rows by
  sqrt(emb_dim)) and words without a vector drawn from N(0, 0.01^2); xavier-uniform for every other matrix;
  dialogue states as word-table rows; the FFN's ReLU after its last layer too; greedy decoding of up to 51
  tokens (their loop runs max_dec_step + 1 = 51 steps); their schedule and checkpoint rule (`SCHEDULES`);
  their batches (`batching: random`: DataLoader(shuffle=True) over the whole split, so a batch mixes lengths and
  its generation loss, a mean over the batch's target tokens as their NLLLoss, weighs long targets more);
  ESCM's graph as their code builds it (`gcn_graph: reference`, unscaled eq. 8 scores, POS and relation
  embeddings x sqrt(d_pr) as their `Embeddings` wrapper returns them: `gcn_embed_scale`); the Transformer
  baseline with their label smoothing 0.1; IAMM as their model.py computes it where it departs from the paper
  (trainers/models/iamm.py says how): the association weights reweighted by Linear(k, k) + sigmoid
  (`association_weights: reference`), the word selector over the top 15 of the memory V before Enc_m
  (`word_selector: reference`, `k3: 15`), a [CLS] before every turn in H_c (`utterance_cls`) and word +
  dialogue-state embeddings as the explicit association's inputs (`association_inputs: words_states`). Without a
  knowledge backend (`has_knowledge=False`) IAMM still lacks the implicit association and P_cs: no row of the
  paper's tables applies to it under either recipe.
  At evaluation and serving (not a training setting), `unseen_vectors`: their vocabulary spans every split, so a
  word seen only at evaluation keeps its pretrained vector; ours is the training split's, and a context word
  outside it that has a vector in the run's source is embedded with it (scaled as training scaled the vectors)
  instead of [UNK] (trainers/data/unseen.py). A run saved before the option has it off.
"""

from __future__ import annotations

from typing import Any

RECIPE_NAMES = ("platform", "paper")

# The authors' training loop, per model: train to `max_steps`; from `eval_from` on, evaluate on valid every
# 800 steps and keep the weights of the last evaluation whose PPL is <= the best kept so far (starting at 100)
# or whose PPL < select_ppl with Acc > select_acc. ESCM's main.py: evaluations at steps 11,200 ... 18,400
# (n_iter >= 11000, (n_iter + 1) % 800 == 0, stop after n_iter > 18000), PPL < 43 and Acc > 0.385; the
# Transformer baseline runs through the same main.py. IAMM's main.py: 10,400 ... 17,600, PPL < 38, Acc > 0.5.
SCHEDULES: dict[str, dict[str, Any]] = {
    "transformer": {"max_steps": 18400, "eval_from": 11200, "select_ppl": 43.0, "select_acc": 0.385},
    "escm": {"max_steps": 18400, "eval_from": 11200, "select_ppl": 43.0, "select_acc": 0.385},
    "iamm": {"max_steps": 17600, "eval_from": 10400, "select_ppl": 38.0, "select_acc": 0.5},
}

_PAPER_COMMON: dict[str, Any] = {
    "grad_clip": 0.0,
    "embedding_init": "vectors",
    "eval_every": 800,
    "selection": "reference",
    "batching": "random",
    "unseen_vectors": True,
    "decode": {"strategy": "greedy", "max_len": 51},
    "model_overrides": {"xavier_init": True, "state_from_words": True, "ffn_relu_out": True},
}

_PAPER_MODEL_OVERRIDES: dict[str, dict[str, Any]] = {
    "transformer": {"label_smoothing": 0.1},
    "escm": {"gcn_graph": "reference", "gcn_scaled": False, "gcn_embed_scale": True},
    "iamm": {"association_weights": "reference", "word_selector": "reference", "k3": 15, "utterance_cls": True,
             "association_inputs": "words_states"},
}


def recipe_values(name: str, model: str) -> dict[str, Any]:
    """The TrainConfig values recipe `name` gives a run of `model` (nested as in TrainConfig)."""
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {name!r}; choose from {list(RECIPE_NAMES)}")
    if name == "platform":
        return {}
    values = {**_PAPER_COMMON, **SCHEDULES[model]}
    values["model_overrides"] = {**_PAPER_COMMON["model_overrides"], **_PAPER_MODEL_OVERRIDES[model]}
    return values
