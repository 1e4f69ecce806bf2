"""The Transformer layers shared by the Transformer baseline, ESCM and IAMM: the model config, attention, the
convolutional feed-forward network, encoder and decoder blocks and stacks, and the decoder's KV cache.

Architecture choices, taken from the authors' MoEL/CEM-derived code (the tie-breaker where the ESCM
paper is silent; read, not copied):

- Pre-norm Transformer blocks (LayerNorm before each sub-layer, residual after) with one final LayerNorm
  after the stack; 1 layer, 2 heads; queries/keys/values projected to a total depth of 40 (20 per head)
  without bias; the feed-forward network is conv(k=3) -> ReLU -> conv(k=3) with 50 filters, padded on
  both sides in the encoder and on the left (causal) in the decoder. Padded positions are zeroed before
  each convolution so that padding never leaks into real positions. The authors' FFN also applies a
  ReLU after its last layer; by default we do not (`ffn_relu_out` restores it). No dropout by default
  (the authors' encoders get none).
- Inputs: word embedding x sqrt(emb_dim) (+ dialogue-state embedding in the encoder) -> bias-free
  projection emb_dim -> d_model -> + sinusoidal timing signal (tensor2tensor layout: sines then cosines).
  The dialogue states have their own table by default; `state_from_words` looks them up in the word table
  at [CLS] / [SPK] / [LSN] instead, as the authors' `mask_input` does (trainers.models.interface).
- Initialisation: N(0, 1/emb_dim) embeddings and PyTorch's layer defaults; `xavier_init` gives every other
  matrix xavier-uniform values instead, as the authors' main.py does (`xavier_init_`).

Models import only torch (and the dependency-free special-token table, trainers.tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.tokens import CLS, LSN, PAD, SPK

STATE_WORDS = (PAD, CLS, SPK, LSN)  # the word of each dialogue state (STATE_PAD, STATE_CLS, ...), `state_from_words`
NEG_INF = -1e9  # finite "minus infinity" for masked scores (no NaN on fully masked rows)


@dataclass
class ModelConfig:
    """Hyperparameters shared by every encoder-decoder model here (paper defaults)."""

    emb_dim: int = 300  # word-vector size (GloVe / spaCy 300-d)
    d_model: int = 300  # hidden size d
    num_layers: int = 1
    num_heads: int = 2
    attn_depth: int = 40  # total query/key/value depth over all heads (authors' --depth)
    ffn_dim: int = 50  # filters of the conv feed-forward network (authors' --filter)
    ffn_kernel: int = 3  # conv width of the FFN; 1 gives the usual position-wise FFN
    dropout: float = 0.0
    max_len: int = 1024  # longest context / response the timing signal covers
    num_states: int = 4  # dialogue states: pad, CLS, speaker, listener
    label_smoothing: float = 0.0
    tie_embeddings: bool = False  # share generator projection with the word embedding
    pack_targets: bool = True  # training: output layer at real target tokens only (same loss, less work)
    ffn_relu_out: bool = False  # ReLU after the FFN's last convolution too (the authors' FFN)
    state_from_words: bool = False  # dialogue states are word-table rows [CLS]/[SPK]/[LSN] (authors' mask_input)
    xavier_init: bool = False  # xavier-uniform every matrix except the word embedding (authors' main.py)

    def __post_init__(self):
        for f in ("emb_dim", "d_model", "num_layers", "num_heads", "attn_depth", "ffn_dim", "ffn_kernel",
                  "max_len", "num_states"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.attn_depth % self.num_heads:
            raise ValueError(f"attn_depth ({self.attn_depth}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.state_from_words and self.num_states != len(STATE_WORDS):
            raise ValueError(f"state_from_words needs num_states == {len(STATE_WORDS)}, got {self.num_states}")
        if self.tie_embeddings and self.emb_dim != self.d_model:
            raise ValueError(f"tie_embeddings needs emb_dim == d_model, "
                             f"got {self.emb_dim} and {self.d_model}")

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def timing_signal(length: int, channels: int) -> torch.Tensor:
    """Sinusoidal position signal (1, length, channels): sin of all timescales, then cos, zero-padded."""
    n = channels // 2
    log_inc = math.log(1.0e4) / max(n - 1, 1)
    inv = torch.exp(torch.arange(n, dtype=torch.float32) * -log_inc)  # (n,)
    t = torch.arange(length, dtype=torch.float32)[:, None] * inv[None]  # (length, n)
    sig = torch.cat([torch.sin(t), torch.cos(t)], dim=1)
    return F.pad(sig, (0, channels % 2)).unsqueeze(0)


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with bias-free projections to a total depth split over heads."""

    def __init__(self, d_q: int, d_kv: int, depth: int, num_heads: int, d_out: int, dropout: float = 0.0):
        super().__init__()
        self.h, self.dropout = num_heads, dropout
        self.q = nn.Linear(d_q, depth, bias=False)
        self.k = nn.Linear(d_kv, depth, bias=False)
        self.v = nn.Linear(d_kv, depth, bias=False)
        self.o = nn.Linear(depth, d_out, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        return x.view(B, L, self.h, D // self.h).transpose(1, 2)  # (B, h, L, D/h)

    def forward(self, x, mem, key_mask=None, causal=False, return_logits=False):
        """x (B, T, d_q), mem (B, L, d_kv), key_mask (B, L) bool True = attend.

        Returns (out (B, T, d_out), logits) where logits (B, T, L) are the head-averaged attention scores
        with masked keys at NEG_INF when return_logits, else None."""
        return self.attend(x, *self.keys_values(mem), key_mask, causal, return_logits)

    def keys_values(self, mem):
        """mem (B, L, d_kv) -> keys, values (B, h, L, depth/h): what incremental decoding keeps."""
        return self._split(self.k(mem)), self._split(self.v(mem))

    def attend(self, x, k, v, key_mask=None, causal=False, return_logits=False):
        """`forward` with the keys and values (B, h, S, depth/h) already projected. Under `causal` the T
        queries are the last T of the S positions (the earlier ones are cached when T < S)."""
        q = self._split(self.q(x))
        T, S = q.size(2), k.size(2)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        causal = causal and T > 1  # a lone query is the newest position: it sees every key
        if causal and T < S:
            seen = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # query i is position S - T + i
            mask, causal = seen if mask is None else mask & seen, False
        p = self.dropout if self.training else 0.0
        if not return_logits:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
            logits = None
        else:
            s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, h, T, L)
            if causal:
                T, L = s.shape[-2:]
                s = s.masked_fill(torch.ones(T, L, dtype=torch.bool, device=s.device).triu(1), NEG_INF)
            if mask is not None:
                s = s.masked_fill(~mask, NEG_INF)
            logits = s.mean(1)  # (B, T, L)
            y = F.dropout(s.float().softmax(-1).to(v.dtype), p, self.training) @ v
        y = y.transpose(1, 2).reshape(x.size(0), x.size(1), -1)  # (B, T, depth)
        return self.o(y), logits


class ConvFeedForward(nn.Module):
    """conv -> ReLU -> conv (-> ReLU with `relu_out`) over time; `causal` pads on the left only (decoder)."""

    def __init__(self, d: int, ffn_dim: int, kernel: int, causal: bool, dropout: float = 0.0,
                 relu_out: bool = False):
        super().__init__()
        self.relu_out = relu_out
        self.pad = (kernel - 1, 0) if causal else (kernel // 2, (kernel - 1) // 2)
        self.c1 = nn.Conv1d(d, ffn_dim, kernel)
        self.c2 = nn.Conv1d(ffn_dim, d, kernel)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None):  # x (B, L, d), mask (B, L) bool
        if mask is not None:
            x = x * mask[..., None]
        h = F.relu(self.c1(F.pad(x.transpose(1, 2), self.pad)))  # (B, ffn, L)
        h = self.drop(h)
        if mask is not None:
            h = h * mask[:, None, :]
        y = self.c2(F.pad(h, self.pad)).transpose(1, 2)  # (B, L, d)
        return F.relu(y) if self.relu_out else y


class EncoderBlock(nn.Module):
    def __init__(self, d: int, cfg: ModelConfig):
        super().__init__()
        self.ln_attn, self.ln_ffn = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = MultiHeadAttention(d, d, cfg.attn_depth, cfg.num_heads, d, cfg.dropout)
        self.ffn = ConvFeedForward(d, cfg.ffn_dim, cfg.ffn_kernel, causal=False, dropout=cfg.dropout,
                                   relu_out=cfg.ffn_relu_out)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        h = self.ln_attn(x)
        x = x + self.drop(self.attn(h, h, mask)[0])
        return x + self.drop(self.ffn(self.ln_ffn(x), mask))


class Encoder(nn.Module):
    """Bias-free input projection + timing signal + pre-norm blocks + final LayerNorm (Enc of eqs. 1, 6)."""

    def __init__(self, d_in: int, d: int, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(d_in, d, bias=False)
        self.register_buffer("pos", timing_signal(cfg.max_len, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d, cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x, mask):  # x (B, L, d_in), mask (B, L) -> (B, L, d)
        L = x.size(1)
        if L > self.pos.size(1):
            raise ValueError(f"sequence length {L} exceeds max_len {self.pos.size(1)}")
        x = self.proj(self.drop(x)) + self.pos[:, :L]
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)


class DecoderBlock(nn.Module):
    def __init__(self, d: int, d_mem: int, cfg: ModelConfig):
        super().__init__()
        self.ln_self, self.ln_cross, self.ln_ffn = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.self_attn = MultiHeadAttention(d, d, cfg.attn_depth, cfg.num_heads, d, cfg.dropout)
        self.cross_attn = MultiHeadAttention(d, d_mem, cfg.attn_depth, cfg.num_heads, d, cfg.dropout)
        self.ffn = ConvFeedForward(d, cfg.ffn_dim, cfg.ffn_kernel, causal=True, dropout=cfg.dropout,
                                   relu_out=cfg.ffn_relu_out)
        self.ffn_past = 2 * (cfg.ffn_kernel - 1)  # earlier FFN inputs an output depends on (two causal convs)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mem, mem_mask, return_logits=False, cache: KVCache | None = None):
        """x (B, T, d) -> (B, T, d) and the cross-attention logits. With `cache`, x holds the positions after
        the ones it already decoded: their self-attention keys/values and last FFN inputs are reused, the
        memory's keys/values are projected at the first step only, and this block's entry is extended."""
        past = None if cache is None else cache.blocks.get(self)
        h = self.ln_self(x)
        self_kv = self.self_attn.keys_values(h)
        if past is not None:
            self_kv = tuple(torch.cat(pair, dim=2) for pair in zip(past.self_kv, self_kv))
        mem_kv = self.cross_attn.keys_values(mem) if past is None else past.mem_kv
        x = x + self.drop(self.self_attn.attend(h, *self_kv, causal=True)[0])
        y, logits = self.cross_attn.attend(self.ln_cross(x), *mem_kv, mem_mask, return_logits=return_logits)
        x = x + self.drop(y)
        f = self.ln_ffn(x)
        f_seen = f if past is None else torch.cat([past.ffn_in, f], dim=1)
        x = x + self.drop(self.ffn(f_seen)[:, -x.size(1):])
        if cache is not None:
            cache.blocks[self] = BlockCache(self_kv, mem_kv, f_seen[:, max(f_seen.size(1) - self.ffn_past, 0):])
        return x, logits


class Decoder(nn.Module):
    """Causal decoder over target embeddings attending to a memory of width d_mem (eq. 19's Dec)."""

    def __init__(self, d_in: int, d: int, d_mem: int, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(d_in, d, bias=False)
        self.register_buffer("pos", timing_signal(cfg.max_len, d), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d, d_mem, cfg) for _ in range(cfg.num_layers))
        self.ln = nn.LayerNorm(d, eps=1e-6)

    def forward(self, y_emb, mem, mem_mask, cache: KVCache | None = None):
        """y_emb (B, T, d_in) -> states (B, T, d), copy logits (B, T, L) from the last block. With `cache`,
        y_emb holds the positions after the cache.length already decoded (see `KVCache`)."""
        start = 0 if cache is None else cache.length
        T = start + y_emb.size(1)
        if T > self.pos.size(1):
            raise ValueError(f"response length {T} exceeds max_len {self.pos.size(1)}")
        x = self.proj(self.drop(y_emb)) + self.pos[:, start:T]
        logits = None
        for i, block in enumerate(self.blocks):
            x, logits = block(x, mem, mem_mask, return_logits=i == len(self.blocks) - 1, cache=cache)
        return self.ln(x), logits


def xavier_init_(model: nn.Module) -> None:
    """Xavier-uniform values for every parameter of 2+ dimensions except the word embedding (`model.embedding`,
    set from word vectors by the trainer), as the authors' main.py does after building a model; padding rows
    of embedding tables are zeroed again (they are never attended to). Biases and LayerNorms keep their
    defaults."""
    word = model.embedding.weight
    for p in model.parameters():
        if p.dim() > 1 and p is not word:
            nn.init.xavier_uniform_(p)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and m.weight is not word:
                m.weight[m.padding_idx].zero_()


@dataclass
class BlockCache:
    """A decoder block's state after the positions decoded so far."""

    self_kv: tuple[torch.Tensor, torch.Tensor]  # self-attention keys, values (B, h, t, depth/h)
    mem_kv: tuple[torch.Tensor, torch.Tensor]  # cross-attention keys, values of the memory (B, h, L, depth/h)
    ffn_in: torch.Tensor  # (B, <= ffn_past, d) the last FFN inputs, as far back as its causal convolutions see

    def select_rows(self, index: torch.Tensor) -> BlockCache:
        def pick(t):
            return t.index_select(0, index)
        return BlockCache(tuple(map(pick, self.self_kv)), tuple(map(pick, self.mem_kv)), pick(self.ffn_in))


class KVCache:
    """Incremental decoding state for `decode_step(enc, ys, cache)`: how many positions of ys are decoded and,
    per decoder block (IAMM has two decoders), its `BlockCache`. Each step then runs the decoder on the new
    position only instead of the whole prefix."""

    def __init__(self):
        self.length = 0
        self.blocks: dict[nn.Module, BlockCache] = {}

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index`, in place (beam search's surviving hypotheses, as `Encoding.select_rows`)."""
        self.blocks = {block: c.select_rows(index) for block, c in self.blocks.items()}
