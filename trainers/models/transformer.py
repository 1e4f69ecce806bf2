"""Vanilla Transformer encoder-decoder baseline (the papers' "Transformer" row; Vaswani et al., 2017).

Encoder over the context (word + position + dialogue-state embeddings), decoder with the
pointer-generator output layer, no emotion head (emotion_logits is None, emo_loss is 0). Blocks and
interface in `trainers.models.interface`. Label smoothing 0.1 by default, as the authors' MoEL-derived
Transformer trains with LabelSmoothing(0.1). Unseen context words' vectors (evaluation and serving under
`unseen_vectors`) enter through `embed_context` (trainers.models.interface).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainers.models.batch import Batch
from trainers.models.interface import CONTEXT_KEYS, Encoding, PointerGeneratorSeq2Seq, require
from trainers.models.layers import Encoder, ModelConfig


@dataclass
class TransformerConfig(ModelConfig):
    label_smoothing: float = 0.1  # authors' Transformer baseline


class TransformerSeq2Seq(PointerGeneratorSeq2Seq):
    def __init__(self, cfg: TransformerConfig, vocab_size: int, emotion_word_ids=None):
        super().__init__(cfg, vocab_size, d_mem=cfg.d_model)
        self.enc_ctx = Encoder(cfg.emb_dim, cfg.d_model, cfg)

    def encode(self, batch: Batch) -> Encoding:
        require(batch, *CONTEXT_KEYS)
        mask = batch.context_mask
        H_ctx = self.enc_ctx(self.embed_context(batch), mask)  # (B, L, d)
        return Encoding(H_ctx, mask, batch.context_ext_ids, int(batch.max_oov))
