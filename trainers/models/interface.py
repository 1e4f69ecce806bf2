"""The model interface: what a model takes and returns, and the encoder-decoder base every model here extends.

    enc = model.encode(batch)                      # Encoding: memory, mask, pointer ids, emotion logits
    log_probs = model.decode_step(enc, ys, cache)  # the next token's distribution (trainers.decoding)
    out = model(batch, Targets.of(batch))          # Output: the encoding and the losses (training)

`batch` is a `Batch` (trainers.models.batch; built by trainers/data/collate.py); `PointerGeneratorSeq2Seq`
holds the word and dialogue-state embeddings, the decoder (trainers.models.layers) and the pointer-generator
(trainers.models.output); subclasses implement `encode`.

Unseen context words (`unseen_vectors`, trainers/data/unseen.py): a batch of evaluation or serving may carry the
scaled pretrained vectors of its [UNK] context words (`unseen_vectors`, indexed by `context_unseen`, IAMM's
`utt_unseen` / `situation_unseen`); `with_unseen` puts them in place of the [UNK] row, wherever a model embeds its
context words (the Transformer's and ESCM's `E_c`, so ESCM's eq. 3 too; IAMM's turns and situation). The decoder's
inputs and the pointer's extended ids are untouched. A batch without them (training) runs as it always did.

Models import only torch (and the dependency-free special-token table, trainers.tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.batch import Batch
from trainers.models.layers import STATE_WORDS, Decoder, KVCache, ModelConfig
from trainers.models.output import PointerGenerator, label_smoothed_nll
from trainers.tokens import CLS, LSN, PAD, SIT, SOS, SPK, STATE_PAD, UNK

CONTEXT_KEYS = ("context_ids", "context_ext_ids", "context_state", "context_mask", "max_oov")


def require(batch: Batch, *keys: str) -> None:
    """Raise a clear error when `batch` lacks (has None in) any of the fields `keys` a model reads."""
    missing = [k for k in keys if getattr(batch, k, None) is None]
    if missing:
        raise ValueError(f"batch lacks {missing}; see the batch contract in trainers/data/collate.py")


@dataclass
class Encoding:
    """What `encode(batch)` returns: the decoder's memory, the pointer's source ids, the emotion heads'
    logits and the encoder's analysis outputs. Tensors are batch-first."""

    memory: torch.Tensor  # (B, L, d_mem) what the decoder attends to (H_ctx; ESCM H_ctx ++ H_cor; IAMM H_c)
    mask: torch.Tensor  # (B, L) bool, True at real positions
    ext_ids: torch.Tensor  # (B, L) extended ids of the memory positions: the words the pointer copies
    max_oov: int  # extended-vocabulary slots this batch needs
    emotion_logits: torch.Tensor | None = None  # (B, E) the emotion prediction (log-probs); None: no head
    head_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, E) per head, one CE loss each
    extras: dict = field(default_factory=dict)  # analysis only (ESCM "gcn_p"; IAMM "associated", "trace")

    def select_rows(self, index: torch.Tensor) -> Encoding:
        """The encoding of batch rows `index` (beams expanded or reordered). `extras` describe the batch as
        encoded and are not carried over."""
        def pick(v):
            if isinstance(v, dict):
                return {k: t.index_select(0, index) for k, t in v.items()}
            return v.index_select(0, index) if isinstance(v, torch.Tensor) else v
        return replace(self, **{f.name: pick(getattr(self, f.name)) for f in fields(self) if f.name != "extras"},
                       extras={})


@dataclass
class Targets:
    """What the training losses compare against (as nanoGPT's `forward(idx, targets)`)."""

    ids: torch.Tensor  # (B, T) response word ids + EOS, PAD after (OOV words are UNK)
    ext_ids: torch.Tensor  # (B, T) the same in extended ids: OOV words copied from the context get V + k
    emotion: torch.Tensor | None = None  # (B,) gold emotion ids; None: no emotion loss

    @classmethod
    def of(cls, batch: Batch) -> Targets:
        """The targets of a collated batch (trainers/data/collate.py)."""
        require(batch, "target_ids", "target_ext_ids")
        return cls(batch.target_ids, batch.target_ext_ids, batch.emotion)


@dataclass
class Output:
    """`forward(batch, targets)`: the encoding and, when targets were given, the losses (ESCM eq. 21, IAMM
    eq. 35: loss = gen_loss + emo_loss)."""

    encoding: Encoding
    loss: torch.Tensor | None = None
    gen_loss: torch.Tensor | None = None  # generation loss per non-PAD target token (label-smoothed if set)
    emo_loss: torch.Tensor | None = None  # sum of `emo_losses`; 0 without emotion heads or gold emotions
    emo_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # cross-entropy per emotion head
    nll_sum: torch.Tensor | None = None  # (B,) per example: unsmoothed summed NLL of its targets (detached)
    num_tokens: torch.Tensor | None = None  # (B,) per example: its non-PAD target tokens (EOS included)

    @property
    def emotion_logits(self) -> torch.Tensor | None:
        return self.encoding.emotion_logits


class PointerGeneratorSeq2Seq(nn.Module):
    """Word/state embeddings, decoder and pointer-generator; subclasses implement `encode`.

    Interface used by decoding, the trainer and serving:
      encode(batch) -> Encoding
      decode_step(enc, ys, cache=None) -> log-probs (B, V + max_oov) of the next token after ys (B, t)
        extended ids; `cache` (start_cache()) makes it incremental
      forward(batch, targets=None) -> Output: the encoding, and the losses when `targets` are given.
    """

    never_generate = (PAD, SOS, CLS, SPK, LSN, SIT)  # structural tokens decoding must not emit

    def __init__(self, cfg: ModelConfig, vocab_size: int, d_mem: int):
        super().__init__()
        if vocab_size <= CLS:
            raise ValueError(f"vocab_size must exceed the special ids (> {CLS}), got {vocab_size}")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.emb_dim, padding_idx=PAD)
        if cfg.state_from_words:
            self.register_buffer("state_words", torch.tensor(STATE_WORDS), persistent=False)
        else:
            self.state_embedding = nn.Embedding(cfg.num_states, cfg.emb_dim, padding_idx=STATE_PAD)
        tables = [self.embedding] + ([] if cfg.state_from_words else [self.state_embedding])
        for emb in tables:
            nn.init.normal_(emb.weight, std=cfg.emb_dim ** -0.5)  # x sqrt(emb_dim) -> unit scale
            emb.weight.data[emb.padding_idx].zero_()
        self.decoder = Decoder(cfg.emb_dim, cfg.d_model, d_mem, cfg)
        self.generator = PointerGenerator(cfg.d_model, vocab_size)
        if cfg.tie_embeddings:
            self.generator.proj.weight = self.embedding.weight

    def embed(self, ids):  # word ids (any shape); ids >= V are mapped to UNK
        ids = ids.masked_fill(ids >= self.vocab_size, UNK)
        return self.embedding(ids) * math.sqrt(self.cfg.emb_dim)

    def embed_many(self, *ids, states=()):
        """`embed` of several id tensors, then `embed_state` of the `states` tensors, through ONE lookup of the
        word table (the states join it under `state_from_words`), so that backward builds the dense (V x emb)
        gradient once rather than once per tensor (on CPU, a step's largest memory traffic after the output
        layer). -> a list of (*shape, emb_dim), ids first."""
        from_words = self.cfg.state_from_words
        words = list(ids) + ([self.state_words[s] for s in states] if from_words else [])
        flat = self.embed(torch.cat([i.flatten() for i in words]))
        found = [e.view(*i.shape, -1) for i, e in zip(words, flat.split([i.numel() for i in words]))]
        return found if from_words else found + [self.embed_state(s) for s in states]

    def embed_state(self, state):
        """Dialogue-state embedding x sqrt(emb_dim) of state ids (any shape): its own table, or with
        `state_from_words` the word-table rows of [CLS] / [SPK] / [LSN] (pad states: the zero PAD row)."""
        if self.cfg.state_from_words:
            return self.embed(self.state_words[state])
        return self.state_embedding(state) * math.sqrt(self.cfg.emb_dim)

    def with_unseen(self, E, index, vectors):
        """E (B, *S, emb) word embeddings (x sqrt(emb_dim)) with, where `index` (B, *S) > 0, the unseen word's
        vector `vectors`[b, index - 1] ((B, N, emb), scaled as training scaled the vectors) x sqrt(emb_dim) instead
        of the [UNK] row. E itself when `index` is None (no unseen vectors in the batch)."""
        if index is None:
            return E
        B, emb = index.size(0), E.size(-1)
        table = F.pad(vectors, (0, 0, 1, 0))  # (B, 1 + N, emb), row 0: none
        flat = index.reshape(B, -1)  # (B, n)
        picked = table.gather(1, flat[..., None].expand(-1, -1, emb)).view_as(E) * math.sqrt(self.cfg.emb_dim)
        return torch.where(index[..., None] > 0, picked.to(E.dtype), E)

    def embed_context(self, batch: Batch):  # word + dialogue-state embeddings of the context, one lookup, (B, L, emb)
        E_c, E_r = self.embed_many(batch.context_ids, states=(batch.context_state,))
        return self.with_unseen(E_c, batch.context_unseen, batch.unseen_vectors) + E_r

    def encode(self, batch: Batch) -> Encoding:
        raise NotImplementedError

    def _decoder_states(self, enc: Encoding, ys, cache: KVCache | None = None):
        """ys (B, t) extended ids -> decoder states s (B, t, d), copy logits (B, t, L); with `cache`, ys are
        the positions after the cache.length decoded ones. IAMM overrides."""
        return self.decoder(self.embed(ys), enc.memory, enc.mask, cache)

    def start_cache(self) -> KVCache:
        """An empty cache for incremental `decode_step` calls on one batch."""
        return KVCache()

    def decode_step(self, enc: Encoding, ys, cache: KVCache | None = None):
        """Log-probs (B, V + max_oov) of the token after ys (B, t). With `cache` (from `start_cache`, given
        at every step of one decoding and reordered with the beams), only ys[:, cache.length:] run through
        the decoder; the result is the same."""
        if cache is not None:
            if ys.size(1) <= cache.length:
                raise ValueError(f"ys has {ys.size(1)} positions, the cache already holds {cache.length}")
            ys = ys[:, cache.length:]
        s, copy_logits = self._decoder_states(enc, ys, cache)
        if cache is not None:
            cache.length += ys.size(1)
        return self.generator(s[:, -1:], copy_logits[:, -1:], enc.ext_ids, enc.max_oov)[:, 0]

    def generation_loss(self, enc: Encoding, ys, tgt_ext):
        """Teacher-forced generation loss over the non-PAD targets -> (loss_sum, nll (B,), num_tokens (B,)): the
        label-smoothed loss summed over the batch, the unsmoothed NLL and the token count per example (the papers'
        PPL averages each example's mean NLL, trainers.metrics).

        With `pack_targets` (training) the output layer, the step's largest cost, runs only at the N real
        target tokens (one host sync for N) and no (N, V + max_oov) distribution is built: without label
        smoothing only log P(y) is computed (`PointerGenerator.log_prob_of`), with it the smoothing sum is
        taken in closed form (`PointerGenerator.smoothed_nll`). Same values either way."""
        s, copy_logits = self._decoder_states(enc, ys)
        ext, max_oov = enc.ext_ids, enc.max_oov
        eps = self.cfg.label_smoothing
        num_tokens = (tgt_ext != PAD).sum(1)
        if not self.cfg.pack_targets:
            loss_sum, token_nll, _ = label_smoothed_nll(self.generator(s, copy_logits, ext, max_oov).flatten(0, 1),
                                                        tgt_ext.flatten(), self.vocab_size, eps)
            return loss_sum, token_nll.view_as(tgt_ext).sum(1), num_tokens
        b, t = (tgt_ext != PAD).nonzero(as_tuple=True)  # (N,), (N,)
        s, copy_logits, ext, target = s[b, t], copy_logits[b, t], ext[b], tgt_ext[b, t]
        if eps == 0:
            token_nll = -self.generator.log_prob_of(s, copy_logits, ext, target)
            loss_sum = token_nll.sum()
        else:
            loss_sum, token_nll, _ = self.generator.smoothed_nll(s, copy_logits, ext, target, eps)
        return loss_sum, token_nll.new_zeros(len(tgt_ext)).index_add(0, b, token_nll), num_tokens

    def forward(self, batch: Batch, targets: Targets | None = None) -> Output:
        """The encoding of `batch`; with `targets`, also the losses (teacher forcing)."""
        enc = self.encode(batch)
        if targets is None:
            return Output(enc)
        ys = torch.cat([torch.full_like(targets.ids[:, :1], SOS), targets.ids[:, :-1]], dim=1)  # (B, T)
        loss_sum, nll, n = self.generation_loss(enc, ys, targets.ext_ids)
        gen_loss = loss_sum / n.sum().clamp_min(1)
        emo_losses = {} if targets.emotion is None else {
            name: F.cross_entropy(logits.float(), targets.emotion) for name, logits in enc.head_logits.items()}
        emo_loss = sum(emo_losses.values()) if emo_losses else gen_loss.new_zeros(())
        return Output(enc, gen_loss + emo_loss, gen_loss, emo_loss, emo_losses, nll.detach(), n)
