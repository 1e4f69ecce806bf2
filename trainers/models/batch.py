"""`Batch`: what a model's `encode` / `forward` take, padded tensors with masks (built by
trainers/data/collate.py, `pad_escm` / `pad_iamm`, and the trainer's fast path, trainers/batching.py).

B = batch, L = context length, T = target length, V = vocab size; IAMM adds M = turns, Lu = longest turn,
Ls = situation length, R = 5 relations, K = phrases, Lk = phrase length. A field a model does not read is None
(the Transformer reads the context only, ESCM adds POS and dependencies, IAMM turns, situation and knowledge).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """The collated batch every model reads (trainers/data/collate.py documents how each field is built)."""

    context_ids: torch.Tensor  # (B, L) word ids; position 0 is [CLS]; turns concatenated; PAD = 0
    context_ext_ids: torch.Tensor  # (B, L) as context_ids, OOV words get V + k (k: index in the example's OOVs)
    context_state: torch.Tensor  # (B, L) 0 pad, 1 [CLS], 2 speaker turn, 3 listener turn
    context_mask: torch.Tensor  # (B, L) bool, True at real tokens
    max_oov: int  # extended-vocabulary slots this batch needs (longest OOV list)
    # ESCM
    context_pos: torch.Tensor | None = None  # (B, L) 0 pad, 1 [CLS], 2 + index in annotate.POS_TAGS
    context_dep: torch.Tensor | None = None  # (B, L, L) directed parse: [h, a] = 2 + label of arc h -> a, [r, r] ROOT
    # targets (a batch of requests has EOS-only targets and no gold emotion)
    target_ids: torch.Tensor | None = None  # (B, T) response ids + EOS, PAD after
    target_ext_ids: torch.Tensor | None = None  # (B, T) as target_ids, OOV words copied from the context get V + k
    emotion: torch.Tensor | None = None  # (B,) gold emotion ids; None: no gold emotions
    # IAMM
    utt_ids: torch.Tensor | None = None  # (B, M, Lu) each turn's word ids (no [CLS])
    utt_mask: torch.Tensor | None = None  # (B, M, Lu) bool, True at real tokens
    utt_state: torch.Tensor | None = None  # (B, M) 2 speaker / 3 listener, 0 for padded turns
    turn_mask: torch.Tensor | None = None  # (B, M) bool, True at real turns
    situation_ids: torch.Tensor | None = None  # (B, Ls) situation word ids
    situation_mask: torch.Tensor | None = None  # (B, Ls) bool, True at real tokens
    knowledge_ids: torch.Tensor | None = None  # (B, M + 1, R, K, Lk) relation phrases per turn, situation last; 0 none
    knowledge_mask: torch.Tensor | None = None  # (B, M + 1, R, K, Lk) bool
    # unseen context words (evaluation and serving with `unseen_vectors`; None in training, trainers/data/unseen.py)
    unseen_vectors: torch.Tensor | None = None  # (B, N, emb) float: per example its unseen words' scaled vectors
    context_unseen: torch.Tensor | None = None  # (B, L) 1 + row of unseen_vectors at such a word, 0 elsewhere
    utt_unseen: torch.Tensor | None = None  # (B, M, Lu) the same for IAMM's turns
    situation_unseen: torch.Tensor | None = None  # (B, Ls) the same for IAMM's situation

    @property
    def size(self) -> int:
        """B, the number of examples."""
        return self.context_ids.size(0)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """A batch with `fn` applied to every tensor field (None fields and max_oov kept)."""
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()})

    def to(self, device) -> Batch:
        return self.map_tensors(lambda t: t.to(device))

    def select_rows(self, index: torch.Tensor) -> Batch:
        """The batch of rows `index` (a 1-D index tensor on the batch's device)."""
        return self.map_tensors(lambda t: t.index_select(0, index))
