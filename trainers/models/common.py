"""Blocks shared by the Transformer baseline and ESCM (and later IAMM).

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
  at [CLS] / [SPK] / [LSN] instead, as the authors' `mask_input` does.
- Initialisation: N(0, 1/emb_dim) embeddings and PyTorch's layer defaults; `xavier_init` gives every other
  matrix xavier-uniform values instead, as the authors' main.py does (`xavier_init_`).
- Pointer-generator (See et al., 2017) as in the authors' `Generator`: p_gen = sigmoid(w . s_t + b) from
  the decoder output s_t only; the copy distribution is softmax over source positions of the head-averaged
  cross-attention logits of the last decoder layer, scattered onto the extended vocabulary V + max_oov
  with `context_ext_ids`.
- Generation loss: NLL per non-PAD target token over the extended vocabulary, averaged over tokens, with
  optional label smoothing (see `label_smoothed_nll`).

Models import only torch (and the dependency-free special-token table, trainers.tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.tokens import CLS, LSN, PAD, SIT, SOS, SPK, STATE_PAD, UNK

NUM_EMOTIONS = 32  # == trainers.data.emotions.NUM_EMOTIONS
STATE_WORDS = (PAD, CLS, SPK, LSN)  # the word of each dialogue state (STATE_PAD, STATE_CLS, ...), `state_from_words`
NEG_INF = -1e9  # finite "minus infinity" for masked scores (no NaN on fully masked rows)
LOG_P_MIN = math.log(1e-20)  # log-probabilities are clamped here (a target the model cannot produce)


# ----------------------------------------------------------------------------------------------
# Config


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


# ----------------------------------------------------------------------------------------------
# Transformer blocks


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


# ----------------------------------------------------------------------------------------------
# Heads and losses


class EmotionHead(nn.Module):
    """Attention-aggregation emotion classifier, eqs. 10-14; returns logits (softmax of eq. 14 left out)."""

    def __init__(self, d: int, num_emotions: int = NUM_EMOTIONS):
        super().__init__()
        self.w_a1 = nn.Linear(d, d)
        self.w_s1 = nn.Linear(d, 1, bias=False)  # a bias before a softmax over positions is a no-op
        self.w_a2 = nn.Linear(d, d)
        self.w_s2 = nn.Linear(d, num_emotions)

    def forward(self, H, mask):  # H (B, L, d), mask (B, L) -> (B, E)
        scores = self.w_s1(torch.tanh(self.w_a1(H))).squeeze(-1)  # eqs. 10-11, (B, L)
        P_s = scores.float().masked_fill(~mask, NEG_INF).softmax(-1).to(H.dtype)
        H2 = torch.einsum("bl,bld->bd", P_s, H)  # eq. 12, (B, d)
        return self.w_s2(torch.tanh(self.w_a2(H2)))  # eqs. 13-14 (logits)


class PointerGenerator(nn.Module):
    """Final distribution over V + max_oov: p_gen * P_vocab + (1 - p_gen) * copy (See et al., 2017)."""

    def __init__(self, d: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.proj = nn.Linear(d, vocab_size)
        self.p_gen = nn.Linear(d, 1)

    def forward(self, s, copy_logits, ext_ids, max_oov: int):
        """s (B, T, d), copy_logits (B, T, L) masked, ext_ids (B, L) -> log-probs (B, T, V + max_oov)."""
        p_gen = torch.sigmoid(self.p_gen(s).float())  # (B, T, 1)
        P_vocab = self.proj(s).float().softmax(-1) * p_gen  # (B, T, V)
        P = F.pad(P_vocab, (0, max_oov))  # (B, T, V + max_oov)
        copy = copy_logits.float().softmax(-1) * (1.0 - p_gen)  # (B, T, L)
        P = P.scatter_add(2, ext_ids[:, None, :].expand(-1, s.size(1), -1), copy)
        return P.clamp_min(1e-20).log()

    def log_prob_of(self, s, copy_logits, ext_ids, target):
        """log P(y) of the targets only, the same value as `forward(...)[y]`:
            P(y) = p_gen * softmax(W s)[y] + (1 - p_gen) * sum_{l: ext_ids[l] = y} softmax(copy_logits)[l].
        s (N, d), copy_logits (N, L), ext_ids (N, L), target (N,) extended ids -> (N,)."""
        p_gen = torch.sigmoid(self.p_gen(s).float()).squeeze(-1)  # (N,)
        log_P_vocab = self.proj(s).log_softmax(-1, dtype=torch.float32)  # (N, V)
        P_vocab = log_P_vocab.gather(1, target.clamp_max(self.vocab_size - 1)[:, None]).squeeze(1).exp()
        P_vocab = P_vocab * (target < self.vocab_size)  # OOV targets: copy only
        P_copy = (copy_logits.float().softmax(-1) * (ext_ids == target[:, None])).sum(-1)
        return (p_gen * P_vocab + (1.0 - p_gen) * P_copy).clamp_min(1e-20).log()


    def smoothed_nll(self, s, copy_logits, ext_ids, target, eps: float):
        """`label_smoothed_nll` of the mixture at N targets without building the (N, V + max_oov) distribution.

        s (N, d), copy_logits (N, L) masked, ext_ids (N, L), target (N,) non-PAD extended ids
        -> (loss_sum, token_nll (N,), N). With g = p_gen, q = softmax(W s + b) over the V words, a =
        softmax(copy_logits) and C_w = sum_{l: ext_ids[l] = w} a_l, the mixture is P(w) = g q_w + (1 - g) C_w.
        C_w = 0 for every w that is not one of the L source ids, where log P(w) = log g + log q_w, so

            sum_{w < V} log P(w) = V log g + sum_w log q_w + sum_{u in U} [log P(u) - log g - log q_u]

        with U the distinct in-vocabulary source ids and log P(u) = logaddexp(log g + log q_u,
        log(1 - g) + log C_u). The smoothing sum of `label_smoothed_nll` is this minus log P(PAD) and, for
        y < V, log P(y). Only log q (N, V) is built: the rest are reductions over V and values at the L + 2
        ids U, y, PAD (U and its C_u from one sort of the source ids). Same values and gradients as the
        materialised version, except where that one clamps P(w) at 1e-20 before the log: the smoothing terms
        here are exact there (the target's NLL keeps the clamp). With eps > 0 training keeps every word
        near eps / V, far above 1e-20.
        """
        V, L = self.vocab_size, ext_ids.size(1)
        x = self.p_gen(s).float().squeeze(-1)  # (N,)
        log_g, log_1mg = F.logsigmoid(x)[:, None], F.logsigmoid(-x)[:, None]  # log p_gen, log(1 - p_gen)
        log_q = self.proj(s).log_softmax(-1, dtype=torch.float32)  # (N, V)
        a = copy_logits.float().softmax(-1)  # (N, L)
        ids, order = ext_ids.sort(-1)  # runs of equal source ids
        new_run = torch.ones_like(ids, dtype=torch.bool)
        new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = new_run.long().cumsum(1) - 1  # (N, L) run of each sorted position
        C_U = torch.zeros_like(a).scatter_add(1, run, a.gather(1, order))  # column r: C of run r
        U = torch.zeros_like(ids).scatter(1, run, ids)  # column r: the id of run r
        in_U = (torch.arange(L, device=ids.device) <= run[:, -1:]) & (U < V)  # (N, L)
        C_y = (a * (ext_ids == target[:, None])).sum(-1, keepdim=True)
        C_pad = (a * (ext_ids == PAD)).sum(-1, keepdim=True)
        at = torch.cat([U, target[:, None], torch.full_like(target[:, None], PAD)], 1).clamp_max(V - 1)
        log_q_at = log_q.gather(1, at)  # (N, L + 2)
        in_vocab = torch.cat([in_U, target[:, None] < V, torch.ones_like(in_U[:, :1])], 1)
        log_P = _mixture_log_prob(log_g, log_1mg, log_q_at, torch.cat([C_U, C_y, C_pad], 1), in_vocab)
        log_P_U, log_P_y, log_P_pad = log_P[:, :L], log_P[:, L], log_P[:, L + 1]
        total = V * log_g[:, 0] + log_q.sum(-1) + torch.where(in_U, log_P_U - log_g - log_q_at[:, :L], 0.0).sum(-1)
        y_in = target < V
        smooth = total - log_P_pad - torch.where(y_in, log_P_y, 0.0)  # sum over S (see label_smoothed_nll)
        lp_y = log_P_y.clamp_min(LOG_P_MIN)
        loss = -(1 - eps) * lp_y - eps * smooth / ((V - 1) - y_in.long())
        return loss.sum(), -lp_y, target.new_tensor(target.numel())

def _mixture_log_prob(log_g, log_1mg, log_q, C, in_vocab):
    """log(g q [in_vocab] + (1 - g) C) from log g, log(1 - g), log q and C >= 0: -inf where both parts are 0,
    with finite gradients everywhere (the log of C is taken only where C > 0)."""
    has_copy = C > 0
    log_copy = torch.where(has_copy, log_1mg + torch.where(has_copy, C, 1.0).log(), -math.inf)
    return torch.where(in_vocab, torch.logaddexp(log_g + log_q, log_copy), log_copy)


def label_smoothed_nll(log_probs, target, vocab_size: int, eps: float, pad: int = PAD):
    """Label-smoothed token NLL over the extended vocabulary, PAD targets ignored.

    log_probs (N, V + max_oov), target (N,) extended ids. Per token:
        loss = -(1 - eps) * log p[y] - eps / n * sum_{j in S} log p[j],
    S = base-vocabulary ids except PAD and y (n = |S|), as in the authors' LabelSmoothing (size - 2).
    The extended slots get no smoothing mass: they hold probability 0 outside the example's own copies.
    Returns (loss_sum, token_nll, num_tokens); token_nll (N,) is the unsmoothed -log p[y], 0 at PAD targets.
    """
    keep = target != pad
    lp_y = log_probs.gather(1, target[:, None]).squeeze(1)  # (N,)
    nll = -(lp_y * keep)
    if eps > 0:
        in_vocab = target < vocab_size
        s = log_probs[:, :vocab_size].sum(1) - log_probs[:, pad] - lp_y * in_vocab
        n = (vocab_size - 1) - in_vocab.long()
        loss = (-(1 - eps) * lp_y - eps * s / n) * keep
        loss_sum = loss.sum()
    else:
        loss_sum = nll.sum()
    return loss_sum, nll, keep.sum()


# ----------------------------------------------------------------------------------------------
# The model interface: a typed encoding, the training targets, the outputs

CONTEXT_KEYS = ("context_ids", "context_ext_ids", "context_state", "context_mask", "max_oov")


def require(batch: dict, *keys: str) -> None:
    missing = [k for k in keys if k not in batch]
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
    def of(cls, batch: dict) -> Targets:
        """The targets of a collated batch (trainers/data/collate.py)."""
        require(batch, "target_ids", "target_ext_ids")
        return cls(batch["target_ids"], batch["target_ext_ids"], batch.get("emotion"))


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


# ----------------------------------------------------------------------------------------------
# Encoder-decoder base


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

    def embed_context(self, batch):  # word + dialogue-state embeddings of the context, one lookup, (B, L, emb)
        E_c, E_r = self.embed_many(batch["context_ids"], states=(batch["context_state"],))
        return E_c + E_r

    def encode(self, batch) -> Encoding:
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

    def forward(self, batch, targets: Targets | None = None) -> Output:
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
